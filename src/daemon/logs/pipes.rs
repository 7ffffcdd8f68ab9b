//! The pipes of the log pipeline: each worker's stdout and stderr forwarded one line at a time (what a
//! line becomes, and where it goes, is [`super`]'s business), and the writer threads of
//! clusterd's stdout, stderr and log files. Nothing here ever blocks the event loop.
//!
//! - **Reading**: a worker's pipes are read by a small tokio task that ends at EOF, which comes
//!   when the worker and every descendant holding the pipe have exited. Lines longer than
//!   [`MAX_LINE`] are split; bytes are passed through as they are (not necessarily UTF-8).
//! - **Writing**: clusterd's stdout (workers' stdout), stderr (workers' stderr and the log)
//!   and each log file are written by a thread of their own from a queue bounded in bytes
//!   ([`QUEUE_BYTES`]). While the reader keeps reading, a full queue makes the forwarding
//!   task wait (it stops reading the worker's pipe: ordinary pipe backpressure for a worker
//!   that outpaces its reader) and nothing is lost. When the reader stalls — one write blocked
//!   for [`STALL`] (a full pipe nobody drains, a stopped terminal) — lines that do not fit are
//!   dropped and counted ([`dropped_lines`]), the workers' pipes keep draining, and the
//!   supervisor goes on. A write that fails (a full disk) drops and counts its line. Each line
//!   is one `write`, so lines from different workers never interleave.
//! - **Exit**: [`flush`] waits, for a bounded time, until the queues are written.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::unix::pipe;
use tokio::task::JoinSet;

/// The longest line forwarded in one piece; longer lines are split.
const MAX_LINE: usize = 16 * 1024;

/// Bytes queued per stream before a writer waits (or, stalled, drops).
const QUEUE_BYTES: usize = 1 << 20;

/// A write blocked this long means nobody reads: from then on, what does not fit is dropped.
const STALL: Duration = Duration::from_secs(1);

/// How often a forwarding task looks again at a full queue whose reader is still reading.
const RETRY: Duration = Duration::from_millis(5);

/// What became of a line offered to a [`Sink`].
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    /// Queued, or dropped and counted because the reader has stalled.
    Done,
    /// No room, but the reader is reading: offer it again soon.
    Full(Vec<u8>),
}

/// What a writer thread writes to: clusterd's stdout or stderr, or a log file.
pub trait Target: Send + 'static {
    /// Writes whole lines (one or several, as one chunk).
    fn write_line(&mut self, line: &[u8]) -> io::Result<()>;
    /// How many bytes of queued lines one write may carry. `PIPE_BUF` by default: a write
    /// that size or smaller to a pipe is atomic, so lines from clusterd's stdout and stderr
    /// writers never interleave even when both are the same pipe (journald, docker).
    fn batch_bytes(&self) -> usize {
        libc::PIPE_BUF
    }
    /// Closes and opens the destination again (SIGUSR1); nothing to do for a descriptor.
    fn reopen(&mut self) {}
}

/// One of clusterd's outputs: a byte-bounded queue and the thread that writes it.
pub struct Sink {
    state: Mutex<Queue>,
    /// Signalled when a line is queued or a reopen asked (for the writer) and when the queue
    /// empties (for [`flush`]).
    changed: Condvar,
    dropped: AtomicU64,
}

#[derive(Default)]
struct Queue {
    lines: VecDeque<Vec<u8>>,
    bytes: usize,
    /// When the write in progress began; `None` while the writer waits for lines.
    writing_since: Option<Instant>,
    /// [`Sink::reopen`] was asked.
    reopen: bool,
}

impl Sink {
    fn new() -> Self {
        Sink {
            state: Mutex::new(Queue::default()),
            changed: Condvar::new(),
            dropped: AtomicU64::new(0),
        }
    }

    /// Offers a line: queued, or (the reader stalled) dropped and counted, or given back.
    pub fn push(&self, line: Vec<u8>) -> Push {
        let mut queue = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if queue.bytes + line.len() <= QUEUE_BYTES || queue.lines.is_empty() {
            queue.bytes += line.len();
            queue.lines.push_back(line);
            self.changed.notify_all();
            return Push::Done;
        }
        if queue.writing_since.is_some_and(|t| t.elapsed() >= STALL) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            Push::Done
        } else {
            Push::Full(line)
        }
    }

    /// Asks the writer to reopen its target before the next line.
    pub fn reopen(&self) {
        let mut queue = self.state.lock().unwrap_or_else(|e| e.into_inner());
        queue.reopen = true;
        self.changed.notify_all();
    }

    /// The writer thread: writes each queued line with one write (a line that cannot be
    /// written is dropped and counted).
    fn run(&self, out: &mut impl Target) {
        let limit = out.batch_bytes();
        let mut batch = Vec::with_capacity(limit);
        loop {
            // Everything queued that fits one write (at least one line): one system call for
            // many short lines.
            batch.clear();
            let mut lines = 0;
            {
                let mut queue = self.state.lock().unwrap_or_else(|e| e.into_inner());
                queue.writing_since = None;
                loop {
                    if std::mem::take(&mut queue.reopen) {
                        break;
                    }
                    if !queue.lines.is_empty() {
                        while let Some(line) = queue.lines.front() {
                            if lines > 0 && batch.len() + line.len() > limit {
                                break;
                            }
                            let line = queue.lines.pop_front().expect("a front line");
                            queue.bytes -= line.len();
                            batch.extend_from_slice(&line);
                            lines += 1;
                        }
                        queue.writing_since = Some(Instant::now());
                        break;
                    }
                    self.changed.notify_all();
                    queue = self.changed.wait(queue).unwrap_or_else(|e| e.into_inner());
                }
            }
            if lines == 0 {
                out.reopen();
                continue;
            }
            if out.write_line(&batch).is_err() {
                self.dropped.fetch_add(lines, Ordering::Relaxed);
            }
        }
    }

    /// Waits until everything queued is written, or `deadline`.
    fn flush(&self, deadline: Instant) {
        let mut queue = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while !queue.lines.is_empty() || queue.writing_since.is_some() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            queue = self
                .changed
                .wait_timeout(queue, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// clusterd's stdout and stderr.
struct Sinks {
    stdout: Sink,
    stderr: Sink,
}

static SINKS: OnceLock<Sinks> = OnceLock::new();

fn sinks() -> &'static Sinks {
    SINKS.get_or_init(|| Sinks {
        stdout: Sink::new(),
        stderr: Sink::new(),
    })
}

/// The writers started by [`spawn_writer`] (log files).
static OTHERS: Mutex<Vec<&'static Sink>> = Mutex::new(Vec::new());

fn others() -> Vec<&'static Sink> {
    OTHERS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// clusterd's stdout.
pub fn stdout() -> &'static Sink {
    &sinks().stdout
}

/// clusterd's stderr.
pub fn stderr() -> &'static Sink {
    &sinks().stderr
}

/// Starts a writer thread for `target` (a log file). It lives, like its queue, until the
/// process exits; [`flush`] and [`dropped_lines`] include it.
pub fn spawn_writer(name: &str, mut target: impl Target) -> io::Result<&'static Sink> {
    let sink: &'static Sink = Box::leak(Box::new(Sink::new()));
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || sink.run(&mut target))?;
    OTHERS.lock().unwrap_or_else(|e| e.into_inner()).push(sink);
    Ok(sink)
}

/// Starts the writer threads of clusterd's stdout and stderr. Call once, at start, before
/// anything is written; the threads live until the process exits.
pub fn init() -> io::Result<()> {
    for (fd, name) in [(1, "clusterd-stdout"), (2, "clusterd-stderr")] {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let sinks = sinks();
                let sink = if fd == 1 {
                    &sinks.stdout
                } else {
                    &sinks.stderr
                };
                sink.run(&mut RawWriter(fd))
            })?;
    }
    Ok(())
}

/// Waits (at most `bound`) until every writer has written what is queued. For the exit.
pub fn flush(bound: Duration) {
    let deadline = Instant::now() + bound;
    let sinks = sinks();
    for sink in others() {
        sink.flush(deadline);
    }
    sinks.stdout.flush(deadline);
    sinks.stderr.flush(deadline);
}

/// Lines dropped so far because clusterd's stdout, stderr or a log file was not written
/// (not read, blocked, or failing).
pub fn dropped_lines() -> u64 {
    let sinks = sinks();
    [&sinks.stdout, &sinks.stderr]
        .into_iter()
        .chain(others())
        .map(|sink| sink.dropped.load(Ordering::Relaxed))
        .sum()
}

/// Writes to a descriptor of clusterd's own (1 or 2) with plain `write(2)`: no lock shared
/// with the rest of the program and no buffering, so each message is one system call.
struct RawWriter(RawFd);

impl Target for RawWriter {
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        self.write_all(line)
    }
}

impl Write for RawWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: writing from a valid buffer to a descriptor number; a closed descriptor is an
        // error return, not undefined behaviour.
        let n = unsafe { libc::write(self.0, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where [`copy_lines`] puts each line ([`crate::daemon::logs::Forwarder`]; a collector in tests).
pub trait Lines {
    /// Takes note of a line (without its newline) and returns it formatted for the output.
    fn record(&self, message: &[u8]) -> Vec<u8>;
    /// Offers a formatted line to the output.
    fn push(&self, line: Vec<u8>) -> Push;
}

/// Creates a pipe for one worker stream: the write end for the worker, and a task in `tasks`
/// that forwards what arrives on the read end until end of file. The supervisor waits for
/// these tasks before it exits, so a worker's last words are not lost. [`init`] must have
/// been called.
///
/// Also returns a duplicate of the pipe's read end: what an upgrade hands to the next
/// clusterd, which forwards the rest with [`resume`].
pub fn forward(
    out: impl Lines + 'static,
    tasks: &mut JoinSet<()>,
) -> io::Result<(OwnedFd, OwnedFd)> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let kept = read.try_clone()?;
    resume(out, read, tasks)?;
    Ok((write, kept))
}

/// Forwards what arrives on `read`, a worker's pipe (handed over by the previous clusterd),
/// until end of file.
pub fn resume(out: impl Lines + 'static, read: OwnedFd, tasks: &mut JoinSet<()>) -> io::Result<()> {
    let receiver = pipe::Receiver::from_owned_fd(read)?;
    while tasks.try_join_next().is_some() {}
    tasks.spawn_local(async move { copy_lines(receiver, &out).await });
    Ok(())
}

async fn copy_lines(receiver: impl tokio::io::AsyncRead + Unpin, out: &impl Lines) {
    let mut reader = BufReader::with_capacity(MAX_LINE, receiver);
    // Reused for every line; what is queued is an exact-size copy, so the queue's byte bound
    // is what it holds in memory.
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
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            // One message per line, of exactly its size (the queue's bound is in bytes): wait
            // while the reader reads, drop once it has stalled.
            let mut message = out.record(&line);
            message.shrink_to_fit();
            while let Push::Full(back) = out.push(message) {
                message = back;
                tokio::time::sleep(RETRY).await;
            }
        }
        if done {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collects each line as one message.
    #[derive(Default)]
    struct Messages(std::cell::RefCell<Vec<Vec<u8>>>);

    impl Lines for Messages {
        fn record(&self, message: &[u8]) -> Vec<u8> {
            let mut line = b"web[0] ".to_vec();
            line.extend_from_slice(message);
            line.push(b'\n');
            line
        }

        fn push(&self, line: Vec<u8>) -> Push {
            self.0.borrow_mut().push(line);
            Push::Done
        }
    }

    fn forward_bytes(input: &[u8]) -> Vec<Vec<u8>> {
        let messages = Messages::default();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(copy_lines(input, &messages));
        messages.0.into_inner()
    }

    #[test]
    fn prefixes_each_line_as_one_message_and_passes_bytes_through() {
        let messages = forward_bytes(b"one\n\xff\xfe binary\nlast without newline");
        assert_eq!(
            messages,
            vec![
                b"web[0] one\n".to_vec(),
                b"web[0] \xff\xfe binary\n".to_vec(),
                b"web[0] last without newline\n".to_vec(),
            ]
        );
    }

    #[test]
    fn splits_long_lines() {
        let long = vec![b'x'; MAX_LINE * 2 + 10];
        let messages = forward_bytes(&long);
        assert_eq!(messages.len(), 3);
        assert_eq!(messages[0].len(), "web[0] ".len() + MAX_LINE + 1);
        assert_eq!(messages[2].len(), "web[0] ".len() + 10 + 1);
    }
}

#[cfg(test)]
mod sink_tests {
    use super::*;

    #[test]
    fn a_full_queue_waits_while_the_reader_reads_and_drops_once_it_stalls() {
        let sink = Sink::new();
        let line = vec![b'x'; QUEUE_BYTES / 2];
        assert_eq!(sink.push(line.clone()), Push::Done);
        assert_eq!(sink.push(line.clone()), Push::Done);
        // Full, with no write under way: the reader is not known to be stuck.
        assert!(matches!(sink.push(line.clone()), Push::Full(_)));
        // A write blocked for longer than STALL: drop and count.
        sink.state.lock().unwrap().writing_since = Some(Instant::now() - STALL);
        assert_eq!(sink.push(line.clone()), Push::Done);
        assert_eq!(sink.dropped.load(Ordering::Relaxed), 1);
        // A line larger than the bound still goes through an empty queue.
        let empty = Sink::new();
        assert_eq!(empty.push(vec![b'y'; QUEUE_BYTES + 1]), Push::Done);
    }
}
