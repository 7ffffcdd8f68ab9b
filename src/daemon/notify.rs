//! The sd_notify receiver: a unix datagram socket (`NOTIFY_SOCKET`) on which workers send
//! `READY=1`, `STATUS=...`, `WATCHDOG=1` and friends. The kernel stamps every datagram with the
//! sender's credentials (`SO_PASSCRED`), which is how the supervisor knows which worker spoke;
//! nothing in the message itself is trusted for that. File descriptors sent along (the
//! `BARRIER=1` protocol of `systemd-notify`) are closed once the message has been handled, which
//! tells the sender it was.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use clusterd_core::messages::parse_notify;
use nix::sys::socket::{setsockopt, sockopt};
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

    /// The socket handed over by the previous clusterd (bound at `path`).
    pub fn adopt(fd: OwnedFd, path: &Path) -> io::Result<Self> {
        let socket = std::os::unix::net::UnixDatagram::from(fd);
        socket.set_nonblocking(true)?;
        Ok(NotifySocket {
            socket: UnixDatagram::from_std(socket)?,
            path: path.to_path_buf(),
        })
    }

    /// Its descriptor, for an upgrade's hand-over.
    pub fn raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
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
                .async_io(Interest::READABLE, || receive_one(self.socket.as_raw_fd()))
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

/// The most descriptors the kernel passes in one message (`SCM_MAX_FD`).
const SCM_MAX_FD: usize = 253;

/// Bytes of control data needed for the sender's credentials and [`SCM_MAX_FD`] descriptors.
const CMSG_LEN: usize = {
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    unsafe {
        (libc::CMSG_SPACE(size_of::<libc::ucred>() as u32)
            + libc::CMSG_SPACE((SCM_MAX_FD * size_of::<RawFd>()) as u32)) as usize
    }
};

/// Reads one datagram. Every descriptor the kernel installed is owned (and so closed when
/// dropped) before anything is checked: a datagram whose control data was truncated
/// (`MSG_CTRUNC`, which room for [`SCM_MAX_FD`] descriptors should make impossible) or whose
/// text was cut (`MSG_TRUNC`) is dropped without leaking what came with it.
fn receive_one(fd: RawFd) -> io::Result<Option<Notification>> {
    // u64 words: aligned for `cmsghdr`.
    let mut cmsg = [0u64; CMSG_LEN.div_ceil(8)];
    receive_with(fd, &mut cmsg)
}

fn receive_with(fd: RawFd, cmsg: &mut [u64]) -> io::Result<Option<Notification>> {
    let mut buf = [0u8; MAX_DATAGRAM];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(cmsg) as _;
    // SAFETY: msg describes buffers we own, valid for the whole call.
    let received =
        unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) };
    if received < 0 {
        return Err(io::Error::last_os_error());
    }
    let (pid, fds) = take_control(&msg);
    if msg.msg_flags & (libc::MSG_CTRUNC | libc::MSG_TRUNC) != 0 {
        tracing::debug!(
            "notify: dropped a truncated datagram ({received} bytes, {} fds) from pid {pid:?}",
            fds.len()
        );
        return Ok(None);
    }
    let Some(pid) = pid else { return Ok(None) };
    let Ok(text) = std::str::from_utf8(&buf[..(received as usize).min(MAX_DATAGRAM)]) else {
        return Ok(None);
    };
    Ok(Some(Notification {
        pid,
        assignments: parse_notify(text),
        fds,
    }))
}

/// Walks the control messages `recvmsg` filled in — complete or truncated — and takes
/// ownership of every descriptor in them; returns them with the sender's pid.
fn take_control(msg: &libc::msghdr) -> (Option<Pid>, Vec<OwnedFd>) {
    let mut pid = None;
    let mut fds = Vec::new();
    // `msg_controllen` is a `size_t` with glibc and a `socklen_t` with musl.
    #[allow(clippy::unnecessary_cast)]
    let end = msg.msg_control as usize + msg.msg_controllen as usize;
    // SAFETY: the CMSG_* helpers walk the buffer msg_control/msg_controllen, which the kernel
    // filled with well-formed headers; every read is bounded by `end`.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(msg);
        while !header.is_null() {
            let data = libc::CMSG_DATA(header);
            let len = ((*header).cmsg_len as usize)
                .saturating_sub(data as usize - header as usize)
                .min(end.saturating_sub(data as usize));
            match ((*header).cmsg_level, (*header).cmsg_type) {
                (libc::SOL_SOCKET, libc::SCM_RIGHTS) => {
                    for i in 0..len / size_of::<RawFd>() {
                        let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                        // The kernel just installed this descriptor in our table for us.
                        fds.push(OwnedFd::from_raw_fd(raw));
                    }
                }
                (libc::SOL_SOCKET, libc::SCM_CREDENTIALS) if len >= size_of::<libc::ucred>() => {
                    let creds = std::ptr::read_unaligned(data.cast::<libc::ucred>());
                    pid = Some(Pid::from_raw(creds.pid));
                }
                _ => {}
            }
            header = libc::CMSG_NXTHDR(msg, header);
        }
    }
    (pid, fds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{ControlMessage, sendmsg};

    /// A receiver with `SO_PASSCRED` and a sender connected to it.
    fn pair() -> (
        std::os::unix::net::UnixDatagram,
        std::os::unix::net::UnixDatagram,
    ) {
        let (rx, tx) = std::os::unix::net::UnixDatagram::pair().unwrap();
        setsockopt(&rx, sockopt::PassCred, &true).unwrap();
        rx.set_nonblocking(true).unwrap();
        (rx, tx)
    }

    /// Sends `text` with `count` copies of a pipe's write end; returns the read end, which
    /// reads end of file once every copy is closed.
    fn send_pipe_copies(
        tx: &std::os::unix::net::UnixDatagram,
        text: &str,
        count: usize,
    ) -> OwnedFd {
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .unwrap();
        let fds = vec![write.as_raw_fd(); count];
        let iov = [io::IoSlice::new(text.as_bytes())];
        sendmsg::<()>(
            tx.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&fds)],
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .unwrap();
        read
    }

    /// True when every copy of the pipe's write end is closed.
    fn all_closed(read: &OwnedFd) -> bool {
        let mut byte = [0u8; 1];
        nix::unistd::read(read, &mut byte) == Ok(0)
    }

    #[test]
    fn takes_every_descriptor_of_a_full_message_and_closes_them_on_drop() {
        let (rx, tx) = pair();
        let read = send_pipe_copies(&tx, "READY=1", SCM_MAX_FD);
        let n = receive_one(rx.as_raw_fd())
            .unwrap()
            .expect("a notification");
        assert_eq!(n.pid, nix::unistd::getpid());
        assert_eq!(n.fds.len(), SCM_MAX_FD);
        assert_eq!(n.assignments, vec![("READY".into(), "1".into())]);
        assert!(!all_closed(&read));
        drop(n);
        assert!(all_closed(&read), "received descriptors leaked");
    }

    #[test]
    fn a_truncated_message_is_dropped_without_leaking_its_descriptors() {
        let (rx, tx) = pair();
        let read = send_pipe_copies(&tx, "READY=1", 200);
        // Room for the credentials and a few descriptors only: MSG_CTRUNC.
        let mut small = [0u64; 8];
        assert!(receive_with(rx.as_raw_fd(), &mut small).unwrap().is_none());
        assert!(all_closed(&read), "truncated descriptors leaked");
        // The next datagram is read normally.
        let _read = send_pipe_copies(&tx, "STATUS=ok", 1);
        let n = receive_one(rx.as_raw_fd())
            .unwrap()
            .expect("a notification");
        assert_eq!(n.assignments, vec![("STATUS".into(), "ok".into())]);
    }

    #[test]
    fn parses_assignments_and_skips_junk() {
        assert_eq!(
            parse_notify("READY=1\nSTATUS=serving 3 clients\ngarbage\nEXTEND_TIMEOUT_USEC=5000000"),
            vec![
                ("READY".into(), "1".into()),
                ("STATUS".into(), "serving 3 clients".into()),
                ("EXTEND_TIMEOUT_USEC".into(), "5000000".into())
            ]
        );
    }
}
