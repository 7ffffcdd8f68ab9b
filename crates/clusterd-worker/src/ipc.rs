//! The worker's message channel (`ipc = true`): a unix stream socket at `CLUSTERD_IPC_FD`
//! carrying one JSON value per line, both ways — the same channel Node's `process.send` uses.
//! Messages sent here reach the supervisor (`"ready"` or `{"type":"ready"}` is the readiness
//! signal of `ready = "message"`; with `ipc_broadcast` the others go to the app's other
//! workers); what `clusterd send` and broadcasts deliver arrives on [`Channel::recv`]. End of
//! file means the supervisor closed the channel (`stop_signal = "disconnect"`): time to stop.
//!
//! The API is blocking and text-based (bring your own JSON library): a reading thread and
//! [`Channel::sender`] on another are the simple way to use both directions at once.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};

use socket2::{Domain, SockRef, Type};

/// The environment variable naming the channel's fd.
pub const IPC_FD_ENV: &str = "CLUSTERD_IPC_FD";

/// The longest line the supervisor accepts (and sends), in bytes, without the newline.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Set once the channel has been taken: the fd is owned by one [`Channel`] only.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Why the channel could not be used.
#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    /// `CLUSTERD_IPC_FD` is not a descriptor number.
    #[error("{IPC_FD_ENV}={0:?} is not a file descriptor number")]
    BadFd(String),
    /// The fd is not a unix stream socket (or not open).
    #[error("{IPC_FD_ENV}={fd} is not a unix stream socket: {cause}")]
    NotASocket {
        /// The fd.
        fd: i32,
        /// What was found.
        cause: io::Error,
    },
    /// The channel was taken already.
    #[error("the message channel was already taken")]
    Taken,
}

/// One end of the channel to the supervisor.
#[derive(Debug)]
pub struct Channel {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Channel {
    /// Takes the channel named by `CLUSTERD_IPC_FD` (marking it close-on-exec, so that
    /// programs this worker runs do not inherit it). `None` when not run with `ipc = true`.
    pub fn from_env() -> Result<Option<Channel>, IpcError> {
        let Some(value) = std::env::var_os(IPC_FD_ENV) else {
            return Ok(None);
        };
        let value = value.to_string_lossy().into_owned();
        let fd: i32 = value
            .parse()
            .ok()
            .filter(|fd| *fd >= 3)
            .ok_or(IpcError::BadFd(value))?;
        if TAKEN.swap(true, Ordering::SeqCst) {
            return Err(IpcError::Taken);
        }
        let not_a_socket = |cause| IpcError::NotASocket { fd, cause };
        // SAFETY: a borrowed view for the checks only; ownership is taken below once the fd
        // is known to be an open unix stream socket, and `TAKEN` hands it out once.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let sock = SockRef::from(&borrowed);
        let domain = sock.domain().map_err(not_a_socket)?;
        let ty = sock.r#type().map_err(not_a_socket)?;
        if domain != Domain::UNIX || ty != Type::STREAM {
            return Err(not_a_socket(io::Error::other(format!(
                "found {domain:?} {ty:?}"
            ))));
        }
        sock.set_cloexec(true).map_err(not_a_socket)?;
        // SAFETY: checked above to be an open socket, owned from here on (see `TAKEN`).
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Channel::from_fd(owned).map(Some).map_err(not_a_socket)
    }

    /// A channel over a connected unix stream socket (tests, or a channel passed on).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Channel> {
        let stream = UnixStream::from(fd);
        let writer = stream.try_clone()?;
        Ok(Channel {
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Sends one message: `json` is the text of one JSON value (no newline in it).
    pub fn send(&mut self, json: &str) -> io::Result<()> {
        send_line(&mut self.writer, json)
    }

    /// A second handle for sending, e.g. from another thread while this one reads.
    pub fn sender(&self) -> io::Result<Sender> {
        Ok(Sender(self.writer.try_clone()?))
    }

    /// Waits for the next message (its JSON text); `None` once the supervisor has closed the
    /// channel. A line longer than [`MAX_MESSAGE`] is an error (`InvalidData`).
    pub fn recv(&mut self) -> io::Result<Option<String>> {
        let mut line = String::new();
        let n = (&mut self.reader)
            .take(MAX_MESSAGE as u64 + 1)
            .read_line(&mut line)?;
        if n == 0 {
            return Ok(None);
        }
        if !line.ends_with('\n') && n > MAX_MESSAGE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a message longer than MAX_MESSAGE",
            ));
        }
        line.truncate(line.trim_end_matches('\n').len());
        Ok(Some(line))
    }
}

/// A handle that only sends (see [`Channel::sender`]).
#[derive(Debug)]
pub struct Sender(UnixStream);

impl Sender {
    /// Sends one message, as [`Channel::send`].
    pub fn send(&mut self, json: &str) -> io::Result<()> {
        send_line(&mut self.0, json)
    }
}

fn send_line(stream: &mut UnixStream, json: &str) -> io::Result<()> {
    if json.contains('\n') || json.len() > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a message is one line of JSON of at most MAX_MESSAGE bytes",
        ));
    }
    let mut line = Vec::with_capacity(json.len() + 1);
    line.extend_from_slice(json.as_bytes());
    line.push(b'\n');
    stream.write_all(&line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_and_recv_are_json_lines_both_ways() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut channel = Channel::from_fd(ours.into()).unwrap();
        channel.send(r#"{"type":"ready"}"#).unwrap();
        channel.sender().unwrap().send("\"ready\"").unwrap();
        let mut supervisor = BufReader::new(theirs.try_clone().unwrap());
        let mut line = String::new();
        supervisor.read_line(&mut line).unwrap();
        assert_eq!(line, "{\"type\":\"ready\"}\n");
        line.clear();
        supervisor.read_line(&mut line).unwrap();
        assert_eq!(line, "\"ready\"\n");
        assert_eq!(
            channel.send("{\n}").unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );

        (&theirs).write_all(b"{\"hello\":1}\n[2]\n").unwrap();
        assert_eq!(channel.recv().unwrap().as_deref(), Some("{\"hello\":1}"));
        assert_eq!(channel.recv().unwrap().as_deref(), Some("[2]"));
        (&theirs).write_all(&vec![b'x'; MAX_MESSAGE + 10]).unwrap();
        assert_eq!(
            channel.recv().unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        drop(theirs);
        drop(supervisor);
        // The rest of the long line, then the end: the supervisor closed the channel.
        assert!(channel.recv().unwrap().is_some());
        assert_eq!(channel.recv().unwrap(), None);
    }
}
