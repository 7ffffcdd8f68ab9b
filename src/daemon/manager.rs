//! clusterd's own manager (systemd, or anything speaking sd_notify): when clusterd is started
//! with `NOTIFY_SOCKET`, it sends the messages the supervisor decides
//! (`supervisor::host::HostMessage`) as datagrams there, and `WATCHDOG=1` every half
//! `WATCHDOG_USEC` (only if `WATCHDOG_PID` is unset or ours). The environment is read once at
//! start ([`Manager::from_env`]) and never changed; workers get clusterd's own notify socket,
//! never this one (`NOTIFY_SOCKET` and `WATCHDOG_*` are reserved and withheld from them).
//!
//! Sending never blocks the loop: the socket is non-blocking and a failed send is a debug line
//! (a manager that does not read loses messages, not clusterd's time).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr, sendto, socket};

/// Where clusterd's manager listens, and the watchdog it asked for.
#[derive(Debug)]
pub struct Manager {
    socket: OwnedFd,
    addr: UnixAddr,
    watchdog: Option<Watchdog>,
}

/// `WATCHDOG=1` every `period` (half of `WATCHDOG_USEC`), next at `next`.
#[derive(Debug, Clone, Copy)]
struct Watchdog {
    period: Duration,
    next: Instant,
}

/// Why `NOTIFY_SOCKET` cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("NOTIFY_SOCKET={path:?}")]
pub struct ManagerError {
    /// The value of `NOTIFY_SOCKET`.
    pub path: String,
    /// What went wrong.
    #[source]
    pub cause: io::Error,
}

impl Manager {
    /// The manager named by clusterd's environment (`NOTIFY_SOCKET`, `WATCHDOG_USEC`,
    /// `WATCHDOG_PID`), if any.
    pub fn from_env(now: Instant) -> Result<Option<Manager>, ManagerError> {
        let Some(path) = std::env::var("NOTIFY_SOCKET")
            .ok()
            .filter(|p| !p.is_empty())
        else {
            return Ok(None);
        };
        let fail = |cause: io::Error| ManagerError {
            path: path.clone(),
            cause,
        };
        let addr = match path.strip_prefix('@') {
            Some(name) => UnixAddr::new_abstract(name.as_bytes()),
            None => UnixAddr::new(path.as_str()),
        }
        .map_err(|e| fail(e.into()))?;
        let socket = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(|e| fail(e.into()))?;
        let ours = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|pid| pid == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|usec| *usec > 0 && ours)
            .map(|usec| {
                let period = Duration::from_micros(usec / 2);
                Watchdog {
                    period,
                    next: now + period,
                }
            });
        Ok(Some(Manager {
            socket,
            addr,
            watchdog,
        }))
    }

    /// Sends `text` (newline-separated assignments); a failure is only logged.
    pub fn send(&self, text: &str) {
        if let Err(error) = sendto(
            self.socket.as_raw_fd(),
            text.as_bytes(),
            &self.addr,
            MsgFlags::MSG_NOSIGNAL,
        ) {
            tracing::debug!("cannot notify the manager ({text:?}): {error}");
        }
    }

    /// When the next `WATCHDOG=1` is due: one deadline of the event loop.
    pub fn watchdog_due(&self) -> Option<Instant> {
        self.watchdog.map(|w| w.next)
    }

    /// Sends `WATCHDOG=1` if it is due at `now`, and schedules the next.
    pub fn watchdog(&mut self, now: Instant) {
        let Some(watchdog) = &mut self.watchdog else {
            return;
        };
        if watchdog.next > now {
            return;
        }
        // On the beat, not from whenever the loop got to it: a late wake-up does not delay
        // every later heartbeat (one missed by more than a period starts over from now).
        watchdog.next += watchdog.period;
        if watchdog.next <= now {
            watchdog.next = now + watchdog.period;
        }
        self.send("WATCHDOG=1");
    }
}

/// `CLOCK_MONOTONIC` in microseconds, for `MONOTONIC_USEC=`.
pub fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1000
}
