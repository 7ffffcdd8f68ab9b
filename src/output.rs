//! clusterd's own output: each worker's stdout and stderr forwarded one line at a time, each
//! line prefixed with `app[slot]`, and clusterd's log. Nothing here ever blocks the event loop.
//!
//! - **Reading**: a worker's pipes are read by a small tokio task that ends at EOF, which comes
//!   when the worker and every descendant holding the pipe have exited. Lines longer than
//!   [`MAX_LINE`] are split; bytes are passed through as they are (not necessarily UTF-8).
//! - **Writing**: clusterd's stdout (worker stdout) and stderr (worker stderr and the log) are
//!   each written by a thread of [`tracing_appender::non_blocking`], fed through a lossy
//!   queue bounded in lines ([`QUEUED_LINES`]) and in bytes ([`QUEUED_BYTES`]). A reader that
//!   stops reading (a full pipe, a stopped terminal) stalls only that thread; further lines
//!   are dropped and counted ([`dropped_lines`]), and the supervisor goes on. Each line is one
//!   message, so lines from different workers never interleave.
//! - **Exit**: [`init`]'s guard flushes what is queued when dropped, for a bounded time.

use std::io::{self, Write};
use std::os::fd::{OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::unix::pipe;
use tokio::task::JoinSet;
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};

/// The longest line forwarded in one piece; longer lines are split.
const MAX_LINE: usize = 16 * 1024;

/// Lines queued per stream before further lines are dropped. (The queue's slots are allocated
/// up front, about 40 bytes each.)
const QUEUED_LINES: usize = 16 * 1024;

/// Bytes queued per stream before further lines are dropped.
const QUEUED_BYTES: usize = 4 << 20;

/// How long the exit waits for the writer threads to flush their queues.
const FLUSH_BOUND: Duration = Duration::from_millis(1500);

/// Which of clusterd's streams a worker stream goes to.
#[derive(Debug, Clone, Copy)]
pub enum Stream {
    /// The worker's stdout, to clusterd's stdout.
    Stdout,
    /// The worker's stderr, to clusterd's stderr.
    Stderr,
}

/// The non-blocking writers of clusterd's stdout and stderr.
struct Writers {
    stdout: Bounded,
    stderr: Bounded,
}

/// A [`NonBlocking`] writer that also drops (and counts) what would queue more than
/// [`QUEUED_BYTES`]. Each `write` is one message.
#[derive(Clone)]
pub struct Bounded {
    inner: NonBlocking,
    /// Lines the queue refused for want of room.
    full: ErrorCounter,
    /// Bytes queued and not yet written; the writer thread ([`RawWriter`]) subtracts.
    queued: Arc<AtomicUsize>,
    /// Lines dropped for want of bytes.
    dropped: Arc<AtomicU64>,
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let len = buf.len();
        if self.queued.fetch_add(len, Ordering::AcqRel) + len > QUEUED_BYTES {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(len);
        }
        // A refused line is never written, so its bytes are not queued. (The count is only
        // raced by writes from other threads, which clusterd's loop thread does not have.)
        let refused_before = self.full.dropped_lines();
        self.inner.write_all(buf)?;
        if self.full.dropped_lines() != refused_before {
            self.queued.fetch_sub(len, Ordering::AcqRel);
        }
        Ok(len)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Bounded {
    type Writer = Bounded;

    fn make_writer(&'a self) -> Bounded {
        self.clone()
    }
}

static WRITERS: OnceLock<Writers> = OnceLock::new();

/// Keeps the writer threads; dropping it flushes what is queued, waiting at most
/// [`FLUSH_BOUND`].
pub struct OutputGuard {
    guards: Vec<WorkerGuard>,
}

/// Starts the writer threads of clusterd's stdout and stderr and returns the writer the log
/// should use (clusterd's stderr). Call once, at start, and keep the guard until exit.
pub fn init() -> (Bounded, OutputGuard) {
    let (stdout, stdout_guard) = writer(1, "clusterd-stdout");
    let (stderr, stderr_guard) = writer(2, "clusterd-stderr");
    let log = stderr.clone();
    let _ = WRITERS.set(Writers { stdout, stderr });
    (
        log,
        OutputGuard {
            guards: vec![stdout_guard, stderr_guard],
        },
    )
}

fn writer(fd: RawFd, thread_name: &str) -> (Bounded, WorkerGuard) {
    let queued = Arc::new(AtomicUsize::new(0));
    let (inner, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name(thread_name)
        .finish(RawWriter {
            fd,
            queued: queued.clone(),
        });
    let writer = Bounded {
        full: inner.error_counter(),
        inner,
        queued,
        dropped: Arc::new(AtomicU64::new(0)),
    };
    (writer, guard)
}

/// Lines dropped so far because clusterd's stdout or stderr was not read fast enough.
pub fn dropped_lines() -> u64 {
    WRITERS.get().map_or(0, |w| {
        [&w.stdout, &w.stderr]
            .iter()
            .map(|b| b.full.dropped_lines() as u64 + b.dropped.load(Ordering::Relaxed))
            .sum()
    })
}

impl Drop for OutputGuard {
    fn drop(&mut self) {
        // A guard's drop waits for its thread (up to ~1.1 s) and, if the thread is stuck in a
        // write, prints to stdout, which may block for ever. Drop each on a thread of its own
        // and wait for them with a bound; process exit ends whatever is still stuck.
        let deadline = Instant::now() + FLUSH_BOUND;
        let (done, finished) = std::sync::mpsc::channel();
        let mut waiting = 0;
        for guard in self.guards.drain(..) {
            // If the thread cannot be started, the guard is leaked rather than dropped here.
            let guard = std::mem::ManuallyDrop::new(guard);
            let done = done.clone();
            let spawned = std::thread::Builder::new()
                .name("clusterd-flush".into())
                .spawn(move || {
                    drop(std::mem::ManuallyDrop::into_inner(guard));
                    let _ = done.send(());
                });
            waiting += usize::from(spawned.is_ok());
        }
        for _ in 0..waiting {
            let left = deadline.saturating_duration_since(Instant::now());
            if finished.recv_timeout(left).is_err() {
                break;
            }
        }
    }
}

/// Writes to a descriptor of clusterd's own (1 or 2) with plain `write(2)`: no lock shared
/// with the rest of the program and no buffering. Runs on the writer thread, which writes
/// each message with one `write_all`; what has left the queue no longer counts as queued.
struct RawWriter {
    fd: RawFd,
    queued: Arc<AtomicUsize>,
}

impl Write for RawWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: writing from a valid buffer to a descriptor number; a closed descriptor is an
        // error return, not undefined behaviour.
        let n = unsafe { libc::write(self.fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                // write_all gives the message up: none of its remaining bytes stay queued.
                self.queued.fetch_sub(buf.len(), Ordering::AcqRel);
            }
            Err(error)
        } else {
            self.queued.fetch_sub(n as usize, Ordering::AcqRel);
            Ok(n as usize)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Creates a pipe for one worker stream: the write end for the worker, and a task in `tasks`
/// that forwards what arrives on the read end until end of file. The supervisor waits for
/// these tasks before it exits, so a worker's last words are not lost. [`init`] must have
/// been called.
pub fn forward(prefix: String, stream: Stream, tasks: &mut JoinSet<()>) -> io::Result<OwnedFd> {
    let writers = WRITERS
        .get()
        .ok_or_else(|| io::Error::other("output::init was not called"))?;
    let out = match stream {
        Stream::Stdout => writers.stdout.clone(),
        Stream::Stderr => writers.stderr.clone(),
    };
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let receiver = pipe::Receiver::from_owned_fd(read)?;
    // Forget the tasks that have finished, so the set stays as small as the live workers.
    while tasks.try_join_next().is_some() {}
    tasks.spawn_local(copy_lines(prefix, receiver, out));
    Ok(write)
}

async fn copy_lines(
    prefix: String,
    receiver: impl tokio::io::AsyncRead + Unpin,
    mut out: impl Write,
) {
    let mut reader = BufReader::with_capacity(MAX_LINE, receiver);
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        line.extend_from_slice(prefix.as_bytes());
        line.push(b' ');
        let start = line.len();
        // Read up to a newline, but never buffer more than MAX_LINE.
        let done = loop {
            let buf = match reader.fill_buf().await {
                Ok(buf) => buf,
                Err(_) => break true,
            };
            if buf.is_empty() {
                break true;
            }
            let room = MAX_LINE - (line.len() - start);
            let (take, found) = match buf.iter().take(room).position(|b| *b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len().min(room), false),
            };
            line.extend_from_slice(&buf[..take]);
            reader.consume(take);
            if found || line.len() - start >= MAX_LINE {
                break false;
            }
        };
        if line.len() > start {
            if line.last() != Some(&b'\n') {
                line.push(b'\n');
            }
            // One message per line. A full queue drops the line (and counts it); a failing
            // stdout must not take the supervisor down either.
            let _ = out.write_all(&line);
        }
        if done {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collects each `write_all` as one message.
    #[derive(Default)]
    struct Messages(Vec<Vec<u8>>);

    impl Write for &mut Messages {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn forward_bytes(input: &[u8]) -> Vec<Vec<u8>> {
        let mut messages = Messages::default();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(copy_lines("web[0]".into(), input, &mut messages));
        messages.0
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

    #[test]
    fn a_stalled_reader_bounds_the_queue_in_bytes_and_counts_what_is_dropped() {
        use std::os::fd::AsRawFd;
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let (mut out, guard) = writer(write.as_raw_fd(), "test-writer");
        let line = vec![b'x'; MAX_LINE];
        // Nobody reads: the pipe fills, then the queue, then lines are dropped.
        for _ in 0..(QUEUED_BYTES / MAX_LINE + 64) {
            out.write_all(&line).unwrap();
        }
        assert!(out.dropped.load(Ordering::Relaxed) > 0);
        assert!(out.queued.load(Ordering::Relaxed) <= QUEUED_BYTES);
        // The reader goes away: the writer thread's writes fail and the queue empties.
        drop(read);
        drop(guard);
        drop(write);
        assert_eq!(out.queued.load(Ordering::Relaxed), 0);
    }
}
