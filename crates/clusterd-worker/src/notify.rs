//! Readiness and watchdog notifications: systemd's `sd_notify` datagram protocol.
//!
//! A notification is one datagram of newline-separated assignments (`READY=1`,
//! `STATUS=serving`, `STOPPING=1`, `WATCHDOG=1`, `EXTEND_TIMEOUT_USEC=n`) sent to the unix
//! datagram socket named by `NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace).
//! The free functions are no-ops when `NOTIFY_SOCKET` is unset, so a worker behaves the same
//! under clusterd, under systemd and run by hand. The supervisor tells workers apart by the
//! datagrams' credentials, so they are sent from this process itself.

use std::fmt;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::env::{EnvError, NotifyAddr, parse_notify_addr, snapshot};

/// How long one send may block when the supervisor's receive queue is full.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `NOTIFY_SOCKET` or `WATCHDOG_USEC` is malformed.
    #[error("reading the notification settings: {0}")]
    Env(#[from] EnvError),
    /// The state is empty; there is nothing to send.
    #[error("empty notification state")]
    EmptyState,
    /// The datagram could not be sent.
    #[error("sending {state:?} to notify socket {target}")]
    Send {
        /// The notify socket, as written in `NOTIFY_SOCKET`.
        target: String,
        /// The notification being sent.
        state: String,
        /// The OS error.
        source: io::Error,
    },
    /// The socket is not usable as a notify socket (e.g. a path that is too long).
    #[error("notify socket {target} is not a valid unix socket address")]
    Address {
        /// The notify socket, as written in `NOTIFY_SOCKET`.
        target: String,
        /// The OS error.
        source: io::Error,
    },
    /// No tokio runtime to run the watchdog heartbeat on.
    #[error("the watchdog heartbeat needs a tokio runtime")]
    NoRuntime,
}

/// A notify socket to send `sd_notify` datagrams to.
///
/// [`notify`] and [`ready`] use the one from `NOTIFY_SOCKET`; build one yourself to notify
/// another socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notifier {
    addr: NotifyAddr,
}

impl Notifier {
    /// A notifier for a `NOTIFY_SOCKET`-style address: an absolute path, or `@name` for the
    /// abstract namespace.
    pub fn new(address: impl AsRef<std::ffi::OsStr>) -> Result<Self, EnvError> {
        Ok(Notifier {
            addr: parse_notify_addr(address.as_ref())?,
        })
    }

    /// The notifier for `NOTIFY_SOCKET`; `Ok(None)` when the variable is unset.
    pub fn from_env() -> Result<Option<Self>, EnvError> {
        Ok(snapshot().notify.clone()?.map(|addr| Notifier { addr }))
    }

    /// Sends one datagram holding `state`, e.g. `"READY=1\nSTATUS=serving"`.
    pub fn notify(&self, state: &str) -> Result<(), NotifyError> {
        if state.is_empty() {
            return Err(NotifyError::EmptyState);
        }
        let send_error = |source| NotifyError::Send {
            target: self.to_string(),
            state: state.to_owned(),
            source,
        };
        let addr = self.socket_addr()?;
        let sock = UnixDatagram::unbound().map_err(send_error)?;
        sock.set_write_timeout(Some(SEND_TIMEOUT))
            .map_err(send_error)?;
        let sent = sock
            .send_to_addr(state.as_bytes(), &addr)
            .map_err(send_error)?;
        if sent != state.len() {
            return Err(send_error(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {sent} of {} bytes", state.len()),
            )));
        }
        Ok(())
    }

    fn socket_addr(&self) -> Result<SocketAddr, NotifyError> {
        match &self.addr {
            NotifyAddr::Path(path) => SocketAddr::from_pathname(path),
            NotifyAddr::Abstract(name) => SocketAddr::from_abstract_name(name),
        }
        .map_err(|source| NotifyError::Address {
            target: self.to_string(),
            source,
        })
    }
}

impl fmt::Display for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.addr {
            NotifyAddr::Path(path) => write!(f, "{}", Path::display(path)),
            NotifyAddr::Abstract(name) => write!(f, "@{}", String::from_utf8_lossy(name)),
        }
    }
}

/// Sends `state` (e.g. `"STATUS=warming caches"`, `"STOPPING=1"`) to `NOTIFY_SOCKET`.
///
/// Returns `Ok(false)` without sending when `NOTIFY_SOCKET` is unset, `Ok(true)` once sent.
pub fn notify(state: &str) -> Result<bool, NotifyError> {
    match Notifier::from_env()? {
        Some(notifier) => notifier.notify(state).map(|()| true),
        None => Ok(false),
    }
}

/// Tells the supervisor this worker is ready to serve (`READY=1`); see [`notify`].
pub fn ready() -> Result<bool, NotifyError> {
    notify("READY=1")
}

/// The watchdog interval from `WATCHDOG_USEC`: the worker must send `WATCHDOG=1` more often
/// than this. `Ok(None)` when no watchdog is configured for this process.
pub fn watchdog_interval() -> Result<Option<Duration>, EnvError> {
    snapshot().watchdog.clone()
}

/// Spawns the watchdog heartbeat on the current tokio runtime: `WATCHDOG=1` right away and
/// then every half [`watchdog_interval`].
///
/// `Ok(None)` when no watchdog is configured or `NOTIFY_SOCKET` is unset. The task runs until a
/// send fails and then resolves to that error; abort the handle to stop it.
pub fn spawn_watchdog() -> Result<Option<JoinHandle<NotifyError>>, NotifyError> {
    let (Some(interval), Some(notifier)) = (watchdog_interval()?, Notifier::from_env()?) else {
        return Ok(None);
    };
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| NotifyError::NoRuntime)?;
    Ok(Some(runtime.spawn(heartbeat(notifier, interval / 2))))
}

/// Sends `WATCHDOG=1` every `period` until a send fails.
async fn heartbeat(notifier: Notifier, period: Duration) -> NotifyError {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Err(err) = notifier.notify("WATCHDOG=1") {
            return err;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receiver() -> (tempfile::TempDir, UnixDatagram, Notifier) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind notify socket");
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        let notifier = Notifier::new(&path).expect("notifier");
        (dir, sock, notifier)
    }

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("a datagram within 5 s");
        String::from_utf8(buf[..n].to_vec()).expect("utf-8")
    }

    #[test]
    fn sends_one_datagram_per_notification_to_a_path() {
        let (_dir, sock, notifier) = receiver();
        notifier.notify("READY=1").expect("send");
        notifier
            .notify("STATUS=serving\nEXTEND_TIMEOUT_USEC=5000000")
            .expect("send");
        assert_eq!(recv(&sock), "READY=1");
        assert_eq!(recv(&sock), "STATUS=serving\nEXTEND_TIMEOUT_USEC=5000000");
    }

    #[test]
    fn sends_to_an_abstract_address() {
        let name = format!("clusterd-worker-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract addr");
        let sock = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        let notifier = Notifier::new(format!("@{name}")).expect("notifier");
        assert_eq!(notifier.to_string(), format!("@{name}"));
        notifier.notify("STOPPING=1").expect("send");
        assert_eq!(recv(&sock), "STOPPING=1");
    }

    #[test]
    fn a_missing_socket_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nobody-listens.sock");
        let err = Notifier::new(&path)
            .expect("notifier")
            .notify("READY=1")
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, NotifyError::Send { .. }), "{err:?}");
        assert!(
            text.contains("nobody-listens.sock") && text.contains("READY=1"),
            "{text}"
        );
        assert!(matches!(
            Notifier::new(&path).expect("notifier").notify(""),
            Err(NotifyError::EmptyState)
        ));
    }

    #[test]
    fn an_overlong_path_is_an_address_error() {
        let notifier = Notifier::new(format!("/{}", "x".repeat(200))).expect("notifier");
        assert!(matches!(
            notifier.notify("READY=1"),
            Err(NotifyError::Address { .. })
        ));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn heartbeat_repeats_until_the_socket_goes_away() {
        let (dir, sock, notifier) = receiver();
        let task = tokio::spawn(heartbeat(notifier, Duration::from_millis(20)));
        let beats = tokio::task::spawn_blocking(move || {
            let beats = [recv(&sock), recv(&sock), recv(&sock)];
            drop(sock);
            beats
        })
        .await
        .expect("receiver thread");
        assert_eq!(beats, ["WATCHDOG=1", "WATCHDOG=1", "WATCHDOG=1"]);
        std::fs::remove_file(dir.path().join("notify.sock")).expect("remove socket");
        let err = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("heartbeat stops within 5 s once sends fail")
            .expect("heartbeat task");
        assert!(matches!(err, NotifyError::Send { .. }), "{err:?}");
    }
}
