//! Forwards each worker's stdout and stderr to clusterd's own, one line at a time, each line
//! prefixed with `app[slot]`. A worker's pipes are read by a small task that ends at EOF, which
//! comes when the worker and every descendant holding the pipe have exited.

use std::io::{self, Write};
use std::os::fd::OwnedFd;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::unix::pipe;
use tokio::task::JoinSet;

/// The longest line forwarded in one piece; longer lines are split.
const MAX_LINE: usize = 16 * 1024;

/// Which of clusterd's streams a worker stream goes to.
#[derive(Debug, Clone, Copy)]
pub enum Stream {
    /// The worker's stdout, to clusterd's stdout.
    Stdout,
    /// The worker's stderr, to clusterd's stderr.
    Stderr,
}

/// Creates a pipe for one worker stream: the write end for the worker, and a task in `tasks`
/// that forwards what arrives on the read end until end of file. The supervisor waits for
/// these tasks before it exits, so a worker's last words are not lost.
pub fn forward(prefix: String, stream: Stream, tasks: &mut JoinSet<()>) -> io::Result<OwnedFd> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let receiver = pipe::Receiver::from_owned_fd(read)?;
    // Forget the tasks that have finished, so the set stays as small as the live workers.
    while tasks.try_join_next().is_some() {}
    tasks.spawn_local(copy_lines(prefix, receiver, stream));
    Ok(write)
}

async fn copy_lines(prefix: String, receiver: pipe::Receiver, stream: Stream) {
    let mut reader = BufReader::with_capacity(MAX_LINE, receiver);
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        // Read up to a newline, but never buffer more than MAX_LINE.
        let done = loop {
            let buf = match reader.fill_buf().await {
                Ok(buf) => buf,
                Err(_) => break true,
            };
            if buf.is_empty() {
                break true;
            }
            let room = MAX_LINE - line.len();
            let (take, found) = match buf.iter().take(room).position(|b| *b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len().min(room), false),
            };
            line.extend_from_slice(&buf[..take]);
            reader.consume(take);
            if found || line.len() >= MAX_LINE {
                break false;
            }
        };
        if !line.is_empty() {
            write_line(&prefix, &line, stream);
        }
        if done {
            return;
        }
    }
}

fn write_line(prefix: &str, line: &[u8], stream: Stream) {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    // A closed or failing stdout must not take the supervisor down: drop the line.
    let _ = match stream {
        Stream::Stdout => write_prefixed(io::stdout().lock(), prefix, line),
        Stream::Stderr => write_prefixed(io::stderr().lock(), prefix, line),
    };
}

fn write_prefixed(mut out: impl Write, prefix: &str, line: &[u8]) -> io::Result<()> {
    out.write_all(prefix.as_bytes())?;
    out.write_all(b" ")?;
    out.write_all(line)?;
    out.write_all(b"\n")
}
