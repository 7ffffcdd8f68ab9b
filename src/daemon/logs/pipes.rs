//! The pipes of the log pipeline: each worker's stdout and stderr forwarded in batches of
//! whole lines (what a line becomes, and where it goes, is [`super`]'s business), and the
//! writer threads of clusterd's stdout, stderr and log files. Nothing here ever blocks the
//! event loop.
//!
//! - **Reading**: a worker's pipes are read by a small tokio task that ends at EOF, which comes
//!   when the worker and every descendant holding the pipe have exited. Each read takes what
//!   the pipe holds (up to [`READ_BYTES`]); its whole lines are handed on together, as one
//!   batch, and a line begun waits for the next read. Lines longer than [`MAX_LINE`] are
//!   split; bytes are passed through as they are (not necessarily UTF-8).
//! - **Writing**: clusterd's stdout (workers' stdout), stderr (workers' stderr and the log)
//!   and each log file are written by a thread of their own ([`Sink`]) from a queue bounded in
//!   bytes ([`QUEUE_BYTES`]) of formatted batches. While the reader keeps reading, a full
//!   queue makes the forwarding task wait — woken by the writer when it has made room, not by
//!   polling — so it stops reading the worker's pipe (ordinary pipe backpressure for a worker
//!   that outpaces its reader) and nothing is lost. When the reader stalls — one write blocked
//!   for [`STALL`] (a full pipe nobody drains, a stopped terminal) — batches that do not fit
//!   are dropped and their lines counted ([`Sink::dropped`]), the workers' pipes keep
//!   draining, and the supervisor goes on. A write that fails (a full disk) drops and counts
//!   its lines. A batch holds whole lines only and a write never splits a line, so lines from
//!   different workers never interleave.
//! - **Exit**: [`Sink::flush`] waits, for a bounded time, until a queue is written;
//!   [`Sink::stop`] then ends its thread.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::unix::pipe;
use tokio::sync::Notify;
use tokio::task::JoinSet;

/// The longest line forwarded in one piece; longer lines are split.
pub const MAX_LINE: usize = 16 * 1024;

/// The most one read of a worker's pipe takes (a pipe holds 64 KiB by default).
const READ_BYTES: usize = 64 * 1024;

/// Bytes queued per stream before a writer waits (or, stalled, drops).
const QUEUE_BYTES: usize = 1 << 20;

/// A write blocked this long means nobody reads: from then on, what does not fit is dropped.
const STALL: Duration = Duration::from_secs(1);

/// What became of a batch offered to a [`Sink`].
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    /// Queued, or dropped and counted because the reader has stalled (or the sink stopped).
    Done,
    /// No room, but the reader is reading: offer it again once [`Sink::room`] is notified.
    Full(Batch),
}

/// Formatted whole lines, written together.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// The bytes, each line with its newline.
    pub bytes: Vec<u8>,
    /// How many lines (what is counted if they are dropped).
    pub lines: u64,
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
    /// Signalled when a batch is queued into an empty queue, a reopen or stop asked (for the
    /// writer) and when the queue empties (for [`Sink::flush`]).
    changed: Condvar,
    /// Notified when the writer has made room after a push found the queue full.
    room: Notify,
    dropped: AtomicU64,
}

#[derive(Default)]
struct Queue {
    batches: VecDeque<Batch>,
    bytes: usize,
    /// When the write in progress began; `None` while the writer waits for lines.
    writing_since: Option<Instant>,
    /// [`Sink::reopen`] was asked.
    reopen: bool,
    /// A push found the queue full: the writer notifies [`Sink::room`] once it took some.
    wanted: bool,
    /// [`Sink::stop`] was asked: the writer ends once the queue is empty.
    stopped: bool,
}

impl Sink {
    fn new() -> Self {
        Sink {
            state: Mutex::new(Queue::default()),
            changed: Condvar::new(),
            room: Notify::new(),
            dropped: AtomicU64::new(0),
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Offers a batch: queued, or (the reader stalled, or the sink stopped) dropped and
    /// counted, or given back.
    pub fn push(&self, batch: Batch) -> Push {
        let mut queue = self.queue();
        if queue.stopped {
            self.dropped.fetch_add(batch.lines, Ordering::Relaxed);
            return Push::Done;
        }
        if queue.bytes + batch.bytes.len() <= QUEUE_BYTES || queue.batches.is_empty() {
            // The writer waits only for an empty queue: wake it only then.
            if queue.batches.is_empty() {
                self.changed.notify_all();
            }
            queue.bytes += batch.bytes.len();
            queue.batches.push_back(batch);
            return Push::Done;
        }
        if queue.writing_since.is_some_and(|t| t.elapsed() >= STALL) {
            self.dropped.fetch_add(batch.lines, Ordering::Relaxed);
            Push::Done
        } else {
            queue.wanted = true;
            Push::Full(batch)
        }
    }

    /// Offers a batch and, while the queue is full and the reader reads, waits for room
    /// (woken by the writer; at most [`STALL`] at a time, to see whether it has stalled).
    pub async fn push_waiting(&self, mut batch: Batch) {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            // Registered before the push: a notification between the two is not missed.
            room.as_mut().enable();
            match self.push(batch) {
                Push::Done => return,
                Push::Full(back) => batch = back,
            }
            let _ = tokio::time::timeout(STALL, room).await;
        }
    }

    /// Offers a batch that must not wait (clusterd's own events): a full queue drops it.
    pub fn push_or_drop(&self, batch: Batch) {
        let lines = batch.lines;
        if let Push::Full(_) = self.push(batch) {
            self.dropped.fetch_add(lines, Ordering::Relaxed);
        }
    }

    /// Asks the writer to reopen its target before the next line.
    pub fn reopen(&self) {
        let mut queue = self.queue();
        queue.reopen = true;
        self.changed.notify_all();
    }

    /// Lines dropped so far because this output was not written (not read, blocked, or
    /// failing).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The writer thread: writes queued batches, as many as fit one write (a batch that
    /// cannot be written is dropped and its lines counted), until [`Sink::stop`].
    fn run(&self, out: &mut impl Target) {
        let limit = out.batch_bytes();
        let mut bytes = Vec::with_capacity(limit);
        let mut taken: Vec<Batch> = Vec::new();
        loop {
            let mut lines = 0;
            let wanted;
            {
                let mut queue = self.queue();
                queue.writing_since = None;
                loop {
                    if std::mem::take(&mut queue.reopen) {
                        break;
                    }
                    if !queue.batches.is_empty() {
                        // Everything queued that fits one write (at least one batch): one
                        // system call for many short lines.
                        let mut size = 0;
                        while let Some(batch) = queue.batches.front() {
                            if !taken.is_empty() && size + batch.bytes.len() > limit {
                                break;
                            }
                            let batch = queue.batches.pop_front().expect("a front batch");
                            queue.bytes -= batch.bytes.len();
                            size += batch.bytes.len();
                            lines += batch.lines;
                            taken.push(batch);
                        }
                        queue.writing_since = Some(Instant::now());
                        break;
                    }
                    if queue.stopped {
                        return;
                    }
                    self.changed.notify_all();
                    queue = self.changed.wait(queue).unwrap_or_else(|e| e.into_inner());
                }
                wanted = std::mem::take(&mut queue.wanted);
            }
            if wanted {
                self.room.notify_waiters();
            }
            if taken.is_empty() {
                out.reopen();
                continue;
            }
            // One batch is written as it is; several are copied together first.
            let result = if let [one] = &taken[..] {
                write_whole_lines(out, &one.bytes, limit)
            } else {
                bytes.clear();
                for batch in &taken {
                    bytes.extend_from_slice(&batch.bytes);
                }
                write_whole_lines(out, &bytes, limit)
            };
            taken.clear();
            if result.is_err() {
                self.dropped.fetch_add(lines, Ordering::Relaxed);
            }
        }
    }

    /// Waits until everything queued is written, or `deadline`.
    pub fn flush(&self, deadline: Instant) {
        let mut queue = self.queue();
        while !queue.batches.is_empty() || queue.writing_since.is_some() {
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

    /// Asks the writer to end once its queue is written; what is pushed from then on is
    /// dropped and counted. Returns whether the writer is idle (not blocked in a write), so
    /// that joining it returns at once.
    pub fn stop(&self) -> bool {
        let mut queue = self.queue();
        queue.stopped = true;
        self.changed.notify_all();
        queue.batches.is_empty() && queue.writing_since.is_none()
    }
}

/// Writes `bytes` (whole lines) in writes of at most `limit` bytes, each ending at a line's
/// end (a single line longer than `limit` is one write of its own).
fn write_whole_lines(out: &mut impl Target, mut bytes: &[u8], limit: usize) -> io::Result<()> {
    let mut result = Ok(());
    while !bytes.is_empty() {
        let take = if bytes.len() <= limit {
            bytes.len()
        } else {
            match memchr::memrchr(b'\n', &bytes[..limit]) {
                Some(end) => end + 1,
                None => memchr::memchr(b'\n', bytes).map_or(bytes.len(), |end| end + 1),
            }
        };
        // A failed write loses its lines only; the rest is still tried.
        if let Err(error) = out.write_line(&bytes[..take]) {
            result = Err(error);
        }
        bytes = &bytes[take..];
    }
    result
}

/// Starts a writer thread for `target`, named `name`; it runs until [`Sink::stop`].
pub fn spawn_writer(
    name: &str,
    mut target: impl Target,
) -> io::Result<(Arc<Sink>, JoinHandle<()>)> {
    let sink = Arc::new(Sink::new());
    let writer = sink.clone();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || writer.run(&mut target))?;
    Ok((sink, thread))
}

/// Writes to a descriptor of clusterd's own (1 or 2) with plain `write(2)`: no lock shared
/// with the rest of the program and no buffering, so each message is one system call.
pub struct RawWriter(pub RawFd);

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

/// Where [`copy_lines`] puts each batch of lines ([`crate::daemon::logs::Forwarder`]; a
/// collector in tests).
pub trait Lines {
    /// Takes note of lines read together (each without its newline) and returns them
    /// formatted for the output, as one batch.
    fn record(&mut self, lines: &[&[u8]]) -> Batch;
    /// Hands a batch to the output, waiting while the output is full and its reader reads.
    fn push(&self, batch: Batch) -> impl std::future::Future<Output = ()>;
}

/// Creates a pipe for one worker stream: the write end for the worker, and a task in `tasks`
/// that forwards what arrives on the read end until end of file. The supervisor waits for
/// these tasks before it exits, so a worker's last words are not lost.
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
pub fn resume(
    mut out: impl Lines + 'static,
    read: OwnedFd,
    tasks: &mut JoinSet<()>,
) -> io::Result<()> {
    let receiver = pipe::Receiver::from_owned_fd(read)?;
    while tasks.try_join_next().is_some() {}
    tasks.spawn_local(async move { copy_lines(receiver, &mut out).await });
    Ok(())
}

/// Calls `each` for every whole line at the start of `buf` (without its newline; a line
/// longer than `max` in pieces of `max` bytes) and returns the bytes they took: what is left
/// is a line begun, shorter than `max`.
fn whole_lines<'a>(buf: &'a [u8], max: usize, mut each: impl FnMut(&'a [u8])) -> usize {
    let mut start = 0;
    loop {
        let rest = &buf[start..];
        // The newline may sit just after a line of exactly `max` bytes.
        match memchr::memchr(b'\n', &rest[..rest.len().min(max + 1)]) {
            Some(end) => {
                each(&rest[..end]);
                start += end + 1;
            }
            None if rest.len() >= max => {
                each(&rest[..max]);
                start += max;
            }
            None => return start,
        }
    }
}

async fn copy_lines(receiver: impl tokio::io::AsyncRead + Unpin, out: &mut impl Lines) {
    let mut reader = BufReader::with_capacity(READ_BYTES, receiver);
    // A line begun in an earlier read.
    let mut begun: Vec<u8> = Vec::new();
    loop {
        let buf = match reader.fill_buf().await {
            Ok(buf) => buf,
            Err(_) => &[],
        };
        if buf.is_empty() {
            // End of file: a last line without its newline is still a line.
            if !begun.is_empty() {
                let batch = out.record(&[&begun]);
                out.push(batch).await;
            }
            return;
        }
        let mut used = 0;
        if !begun.is_empty() {
            // Complete the line begun first, on its own.
            let room = MAX_LINE - begun.len();
            let (take, whole) = match memchr::memchr(b'\n', &buf[..buf.len().min(room + 1)]) {
                Some(end) => (end + 1, true),
                None => (buf.len().min(room), false),
            };
            begun.extend_from_slice(&buf[..take]);
            used = take;
            if whole || begun.len() >= MAX_LINE {
                if whole {
                    begun.pop();
                }
                let batch = out.record(&[&begun]);
                begun.clear();
                reader.consume(used);
                out.push(batch).await;
                continue;
            }
        }
        let total = buf.len();
        let buf = &buf[used..];
        let mut lines: Vec<&[u8]> = Vec::new();
        let whole = whole_lines(buf, MAX_LINE, |line| lines.push(line));
        begun.extend_from_slice(&buf[whole..]);
        let batch = (!lines.is_empty()).then(|| out.record(&lines));
        reader.consume(total);
        if let Some(batch) = batch {
            out.push(batch).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collects each batch, every line prefixed.
    #[derive(Default)]
    struct Batches(std::cell::RefCell<Vec<Vec<u8>>>);

    impl Lines for Batches {
        fn record(&mut self, lines: &[&[u8]]) -> Batch {
            let mut batch = Batch::default();
            for line in lines {
                batch.bytes.extend_from_slice(b"web[0] ");
                batch.bytes.extend_from_slice(line);
                batch.bytes.push(b'\n');
                batch.lines += 1;
            }
            batch
        }

        async fn push(&self, batch: Batch) {
            self.0.borrow_mut().push(batch.bytes);
        }
    }

    /// The batches `copy_lines` makes of `input`, read in pieces of `piece` bytes.
    fn forward_bytes(input: &[u8], piece: usize) -> Vec<Vec<u8>> {
        let mut batches = Batches::default();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let reader = tokio::io::BufReader::with_capacity(piece, input);
        runtime.block_on(copy_lines(reader, &mut batches));
        batches.0.into_inner()
    }

    /// The lines of the batches.
    fn lines(batches: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let all = batches.concat();
        all.split_inclusive(|b| *b == b'\n')
            .map(<[u8]>::to_vec)
            .collect()
    }

    #[test]
    fn prefixes_each_line_and_passes_bytes_through() {
        let batches = forward_bytes(b"one\n\xff\xfe binary\nlast without newline", 1 << 16);
        assert_eq!(
            lines(&batches),
            vec![
                b"web[0] one\n".to_vec(),
                b"web[0] \xff\xfe binary\n".to_vec(),
                b"web[0] last without newline\n".to_vec(),
            ]
        );
        // The lines of one read make one batch; the line begun waits for the end.
        assert_eq!(batches.len(), 2);
    }

    #[test]
    fn a_line_split_across_reads_is_whole_and_every_batch_ends_a_line() {
        let input: Vec<u8> = (0..200)
            .flat_map(|i| format!("line {i} {}\n", "y".repeat(i % 37)).into_bytes())
            .collect();
        for piece in [1, 7, 64, 1000] {
            let batches = forward_bytes(&input, piece);
            assert!(batches.iter().all(|b| b.ends_with(b"\n")));
            let expected: Vec<Vec<u8>> = input
                .split_inclusive(|b| *b == b'\n')
                .map(|l| [b"web[0] ".as_slice(), l].concat())
                .collect();
            assert_eq!(lines(&batches), expected, "reads of {piece} bytes");
        }
    }

    #[test]
    fn splits_long_lines() {
        let long = vec![b'x'; MAX_LINE * 2 + 10];
        for piece in [1000, 1 << 16] {
            let lines = lines(&forward_bytes(&long, piece));
            assert_eq!(lines.len(), 3);
            assert_eq!(lines[0].len(), "web[0] ".len() + MAX_LINE + 1);
            assert_eq!(lines[2].len(), "web[0] ".len() + 10 + 1);
        }
        // A line of exactly MAX_LINE bytes is one line.
        let mut exact = vec![b'x'; MAX_LINE];
        exact.push(b'\n');
        assert_eq!(lines(&forward_bytes(&exact, 1 << 16)).len(), 1);
    }
}

#[cfg(test)]
mod sink_tests {
    use super::*;

    fn batch(bytes: usize) -> Batch {
        Batch {
            bytes: vec![b'x'; bytes],
            lines: 1,
        }
    }

    #[test]
    fn a_full_queue_waits_while_the_reader_reads_and_drops_once_it_stalls() {
        let sink = Sink::new();
        assert_eq!(sink.push(batch(QUEUE_BYTES / 2)), Push::Done);
        assert_eq!(sink.push(batch(QUEUE_BYTES / 2)), Push::Done);
        // Full, with no write under way: the reader is not known to be stuck.
        assert!(matches!(sink.push(batch(QUEUE_BYTES / 2)), Push::Full(_)));
        // A write blocked for longer than STALL: drop and count.
        sink.state.lock().unwrap().writing_since = Some(Instant::now() - STALL);
        assert_eq!(sink.push(batch(QUEUE_BYTES / 2)), Push::Done);
        assert_eq!(sink.dropped(), 1);
        // A batch larger than the bound still goes through an empty queue.
        let empty = Sink::new();
        assert_eq!(empty.push(batch(QUEUE_BYTES + 1)), Push::Done);
    }

    /// A target that records its writes, and blocks in them until opened.
    #[derive(Clone, Default)]
    struct Recorder {
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
        open: Arc<(Mutex<bool>, Condvar)>,
    }

    impl Target for Recorder {
        fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
            let (open, changed) = &*self.open;
            let mut open = open.lock().unwrap();
            while !*open {
                open = changed.wait(open).unwrap();
            }
            self.writes.lock().unwrap().push(line.to_vec());
            Ok(())
        }

        fn batch_bytes(&self) -> usize {
            16
        }
    }

    #[test]
    fn a_waiting_push_is_woken_when_the_writer_makes_room_and_writes_end_lines() {
        let recorder = Recorder::default();
        let (sink, thread) = spawn_writer("test-writer", recorder.clone()).unwrap();
        // The writer takes the first batch and blocks in its write; the queue fills.
        let first = Batch {
            bytes: b"aaaa\nbbbbbbbbbbbbbbbbbbbb\ncc\n".to_vec(),
            lines: 3,
        };
        assert_eq!(sink.push(first), Push::Done);
        while sink.queue().writing_since.is_none() {
            std::thread::yield_now();
        }
        assert_eq!(sink.push(batch(QUEUE_BYTES)), Push::Done);
        // Once the push waits, the write is let through.
        let opener = std::thread::spawn({
            let sink = sink.clone();
            let open = recorder.open.clone();
            move || {
                while !sink.queue().wanted {
                    std::thread::yield_now();
                }
                *open.0.lock().unwrap() = true;
                open.1.notify_all();
                Instant::now()
            }
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(sink.push_waiting(batch(10)));
        let opened = opener.join().unwrap();
        assert!(
            opened.elapsed() < STALL,
            "woken by the writer, not the timeout"
        );
        sink.flush(Instant::now() + Duration::from_secs(10));
        assert!(sink.stop());
        thread.join().unwrap();
        let writes = recorder.writes.lock().unwrap();
        // At most 16 bytes a write, split between lines; a longer line alone.
        assert_eq!(writes[0], b"aaaa\n");
        assert_eq!(writes[1], b"bbbbbbbbbbbbbbbbbbbb\n");
        assert_eq!(writes[2], b"cc\n");
        assert_eq!(sink.dropped(), 0);
        // Stopped: what comes later is dropped and counted.
        assert_eq!(sink.push(batch(1)), Push::Done);
        assert_eq!(sink.dropped(), 1);
    }
}
