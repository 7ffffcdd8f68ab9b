//! The sd_notify receiver: a unix datagram socket (`NOTIFY_SOCKET`) on which workers send
//! `READY=1`, `STATUS=...`, `WATCHDOG=1` and friends. The kernel stamps every datagram with the
//! sender's credentials (`SO_PASSCRED`), which is how the supervisor knows which worker spoke;
//! nothing in the message itself is trusted for that. File descriptors sent along (the
//! `BARRIER=1` protocol of `systemd-notify`) are closed once the message has been handled, which
//! tells the sender it was.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, UnixCredentials, recvmsg, setsockopt, sockopt,
};
use nix::unistd::Pid;
use tokio::io::Interest;
use tokio::net::UnixDatagram;

/// One datagram from a worker (or one of its descendants).
#[derive(Debug)]
pub struct Notification {
    /// The sender's pid, from the kernel.
    pub pid: Pid,
    /// `KEY=value` assignments, in order.
    pub assignments: Vec<(String, String)>,
    /// Descriptors passed along; dropping them releases a waiting `clusterd notify`.
    pub fds: Vec<OwnedFd>,
}

/// The bound notify socket.
pub struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    /// Binds the socket at `path` (replacing a stale file) with `SO_PASSCRED` on.
    pub fn bind(path: &Path) -> io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let socket = UnixDatagram::bind(path)?;
        setsockopt(&socket, sockopt::PassCred, &true)?;
        Ok(NotifySocket {
            socket,
            path: path.to_path_buf(),
        })
    }

    /// Where workers send: the value of `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the next well-formed datagram. Malformed ones are dropped.
    pub async fn recv(&self) -> Notification {
        loop {
            let received = self
                .socket
                .async_io(Interest::READABLE, || {
                    receive_one(self.socket.as_raw_fd()).map_err(io::Error::from)
                })
                .await;
            match received {
                Ok(Some(notification)) => return notification,
                Ok(None) => {}
                Err(e) => tracing::debug!("notify socket: {e}"),
            }
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The largest datagram read; sd_notify messages are small.
const MAX_DATAGRAM: usize = 4096;

fn receive_one(fd: RawFd) -> nix::Result<Option<Notification>> {
    let mut buf = [0u8; MAX_DATAGRAM];
    let mut cmsg = nix::cmsg_space!(UnixCredentials, [RawFd; 16]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )?;
    let len = msg.bytes;
    let mut pid = None;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        match c {
            ControlMessageOwned::ScmCredentials(creds) => pid = Some(Pid::from_raw(creds.pid())),
            ControlMessageOwned::ScmRights(received) => {
                // SAFETY: the kernel just installed these descriptors in our table for us.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                )
            }
            _ => {}
        }
    }
    let Some(pid) = pid else { return Ok(None) };
    let Ok(text) = std::str::from_utf8(&buf[..len]) else {
        return Ok(None);
    };
    Ok(Some(Notification {
        pid,
        assignments: parse(text),
        fds,
    }))
}

/// Parses newline-separated `KEY=value` assignments; lines without `=` are ignored.
pub fn parse(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Sends `state` to `NOTIFY_SOCKET` and waits until the supervisor has handled it (the
/// `BARRIER=1` protocol): a pipe's write end goes along with the datagram, and the receiver
/// closing it is the acknowledgement. This is `clusterd notify`, for workers that cannot send
/// datagrams themselves; waiting matters because the supervisor identifies the sender by its
/// pid, which must still exist when the message is read.
pub fn send_with_barrier(
    socket: &str,
    state: &str,
    timeout: std::time::Duration,
) -> io::Result<()> {
    use nix::sys::socket::{ControlMessage, UnixAddr, sendmsg};
    let addr = match socket.strip_prefix('@') {
        Some(name) => UnixAddr::new_abstract(name.as_bytes())?,
        None => UnixAddr::new(socket)?,
    };
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let iov = [io::IoSlice::new(state.as_bytes())];
    let fds = [write.as_raw_fd()];
    sendmsg(
        sock.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        Some(&addr),
    )?;
    drop(write);
    let mut poll = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(&read),
        nix::poll::PollFlags::POLLIN,
    )];
    let millis = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    match nix::poll::poll(&mut poll, millis)? {
        0 => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the supervisor did not acknowledge the notification",
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn parses_assignments_and_skips_junk() {
        assert_eq!(
            parse("READY=1\nSTATUS=serving 3 clients\ngarbage\nEXTEND_TIMEOUT_USEC=5000000"),
            vec![
                ("READY".into(), "1".into()),
                ("STATUS".into(), "serving 3 clients".into()),
                ("EXTEND_TIMEOUT_USEC".into(), "5000000".into())
            ]
        );
    }
}
