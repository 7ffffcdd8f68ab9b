//! Telling the supervisor who tends, over its notify socket. A process supervised by clusterd
//! (or anything else speaking sd_notify) has `NOTIFY_SOCKET` in its environment; the
//! supervisor learns the sender's pid from the kernel (`SO_PASSCRED`), so it needs to read no
//! file of ours — in particular nothing in world-writable `/dev/shm` — to know which of its
//! workers holds the tend lock.
//!
//! The protocol, one small datagram each, non-blocking, errors ignored (a supervisor that is
//! not listening must never slow a client down):
//!
//! - `X_CLUSTERD_KV_TEND=owner` and `X_CLUSTERD_KV_SEGMENT=<segment file name>`, when the
//!   client takes the tend lock, and again after every tend round as a heartbeat;
//! - `X_CLUSTERD_KV_TEND=released` and the same `X_CLUSTERD_KV_SEGMENT=...`, when it gives
//!   the lock up (`close`, drop).
//!
//! A tend owner that dies sends nothing: its exit tells the supervisor. At a takeover the new
//! owner's `owner` may arrive before the old one's `released`, so the supervisor keeps the
//! state per sender pid: the owner is the pid whose last word was `owner` and that lives.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;

/// The environment variable naming the supervisor's notify socket (sd_notify's).
pub const ENV_NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// The key of the tend-ownership assignment.
pub const KEY_TEND: &str = "X_CLUSTERD_KV_TEND";
/// The key naming the segment the assignment is about.
pub const KEY_SEGMENT: &str = "X_CLUSTERD_KV_SEGMENT";

/// A client's sender of tend notifications; does nothing without `NOTIFY_SOCKET`.
pub struct TendNotifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    owner: Vec<u8>,
    released: Vec<u8>,
}

impl TendNotifier {
    /// A notifier for `segment` sending to `$NOTIFY_SOCKET`, if set and usable.
    pub fn from_env(segment: &Path) -> Self {
        Self::new(std::env::var_os(ENV_NOTIFY_SOCKET).as_deref(), segment)
    }

    /// A notifier for `segment` sending to `socket` (a path, or `@name` for an abstract
    /// address); inert when `socket` is `None` or unusable.
    pub fn new(socket: Option<&std::ffi::OsStr>, segment: &Path) -> Self {
        let name = segment
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let message =
            |state: &str| format!("{KEY_TEND}={state}\n{KEY_SEGMENT}={name}").into_bytes();
        TendNotifier {
            target: socket.and_then(open),
            owner: message("owner"),
            released: message("released"),
        }
    }

    /// This client holds the tend lock (sent on taking it and after every tend round).
    pub fn owner(&self) {
        self.send(&self.owner);
    }

    /// This client gave the tend lock up.
    pub fn released(&self) {
        self.send(&self.released);
    }

    fn send(&self, message: &[u8]) {
        if let Some((socket, addr)) = &self.target {
            let _ = socket.send_to_addr(message, addr);
        }
    }
}

/// An unbound, non-blocking datagram socket and the address to send to.
fn open(socket: &std::ffi::OsStr) -> Option<(UnixDatagram, SocketAddr)> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = socket.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name).ok()?,
        None if bytes.starts_with(b"/") => SocketAddr::from_pathname(socket).ok()?,
        None => return None,
    };
    let datagram = UnixDatagram::unbound().ok()?;
    datagram.set_nonblocking(true).ok()?;
    Some((datagram, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_owner_and_released_to_the_socket_and_nothing_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let receiver = UnixDatagram::bind(&path).unwrap();
        receiver.set_nonblocking(true).unwrap();
        let segment = Path::new("/dev/shm/clusterd-kv-00000000000000ff");
        let notifier = TendNotifier::new(Some(path.as_os_str()), segment);
        notifier.owner();
        notifier.released();
        let mut buf = [0u8; 256];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(
            &buf[..n],
            b"X_CLUSTERD_KV_TEND=owner\nX_CLUSTERD_KV_SEGMENT=clusterd-kv-00000000000000ff"
        );
        let n = receiver.recv(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"X_CLUSTERD_KV_TEND=released\n"));

        // No socket, a relative path, or nobody listening: silently nothing.
        TendNotifier::new(None, segment).owner();
        TendNotifier::new(Some("relative".as_ref()), segment).owner();
        drop(receiver);
        notifier.owner();
    }
}
