//! `clusterd notify` (sd_notify for workers that cannot send datagrams) and `clusterd send`
//! (a message on workers' channels): talking to workers.

use std::io;
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clusterd_proto::Request;
use nix::sys::socket::MsgFlags;

use super::client::Target;
use super::{EXIT_USAGE, app_slot, control_command};

/// `clusterd notify ASSIGNMENT...`.
pub fn notify(assignments: &[String]) -> anyhow::Result<()> {
    let socket = std::env::var("NOTIFY_SOCKET")
        .context("NOTIFY_SOCKET is not set: not running under a supervisor")?;
    send_with_barrier(&socket, &assignments.join("\n"), Duration::from_secs(5))
        .with_context(|| format!("cannot notify {socket}"))
}

/// `clusterd send APP[:SLOT] JSON`.
pub fn send(spec: &str, message: &str, target: &Target) -> ExitCode {
    let Some((app, slot)) = app_slot(spec) else {
        return ExitCode::from(EXIT_USAGE);
    };
    let message = match serde_json::from_str(message) {
        Ok(message) => message,
        Err(error) => {
            eprintln!("clusterd: the message is not JSON: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let request = Request::Send { app, slot, message };
    control_command(target, request, |_| Ok(false))
}

/// Sends `state` to `NOTIFY_SOCKET` and waits until the supervisor has handled it (the
/// `BARRIER=1` protocol): a pipe's write end goes along with the datagram, and the receiver
/// closing it is the acknowledgement. This is `clusterd notify`, for workers that cannot send
/// datagrams themselves; waiting matters because the supervisor identifies the sender by its
/// pid, which must still exist when the message is read.
fn send_with_barrier(socket: &str, state: &str, timeout: std::time::Duration) -> io::Result<()> {
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
