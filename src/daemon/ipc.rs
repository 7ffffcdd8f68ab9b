//! Worker messaging (`ipc = true`): a unix stream socket per worker carrying newline-delimited
//! JSON, which is exactly Node's own IPC channel in its default `json` serialization. The
//! worker's end sits at the fd after its listening sockets, named by `CLUSTERD_IPC_FD` for any
//! language and by `NODE_CHANNEL_FD` (with `NODE_CHANNEL_SERIALIZATION_MODE=json`) for Node,
//! whose `process.send` / `process.on('message')` / `process.on('disconnect')` then work as
//! under the cluster module. The supervisor's end is created close-on-exec before `fork`
//! ([`pair`]).
//!
//! **Supervisor side** ([`Channels`]): two local tasks per worker, so nothing a worker does
//! can stall the loop or grow clusterd's memory without bound.
//!
//! - The reader reads lines of at most [`MAX_MESSAGE`] bytes. A longer line is refused with a
//!   log line and skipped up to its newline; a line that is not JSON is dropped; the channel
//!   stays open either way. Node's internal messages (`{"cmd":"NODE_..."}`) never reach the
//!   supervisor: a `NODE_HANDLE` (a socket passed with `process.send(msg, handle)`) is
//!   answered `NODE_HANDLE_ACK`, or the sender would queue every later message behind it
//!   forever; the descriptor itself is discarded by the kernel, as the reader passes no room
//!   for it. Every other message goes to the loop through one channel of [`INCOMING`]
//!   entries shared by all workers: when it is full, readers wait, and so do the workers'
//!   writes (the kernel's socket buffer is the backpressure).
//! - The writer sends what the supervisor delivers (broadcasts, `clusterd send`) from a queue
//!   of at most [`QUEUE_BYTES`] per worker; a worker that does not read gets further messages
//!   dropped and counted ([`Channels::dropped`]).
//!
//! Closing a worker's channel ([`Channels::close`]) ends both tasks and closes the socket:
//! the worker sees end of file (Node: the `disconnect` event).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::rc::Rc;
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, mpsc};
use tokio::task::{AbortHandle, JoinHandle};

use clusterd_core::WorkerId;
use clusterd_core::messages::{Line, classify};

/// The longest message, in bytes, either way (without its newline).
pub const MAX_MESSAGE: usize = 64 * 1024;

/// The most bytes of messages waiting to be written to one worker.
pub const QUEUE_BYTES: usize = 256 * 1024;

/// Messages read from workers and not yet taken by the loop, all workers together.
pub const INCOMING: usize = 64;

/// The answer to a passed handle, so that Node's sender goes on sending.
const HANDLE_ACK: &str = r#"{"cmd":"NODE_HANDLE_ACK"}"#;

/// A socketpair for one worker: `(supervisor's end, worker's end)`, both close-on-exec (the
/// spawn places the worker's end at its fd without the flag).
pub fn pair() -> io::Result<(StdUnixStream, OwnedFd)> {
    let (mine, theirs) = StdUnixStream::pair()?;
    Ok((mine, theirs.into()))
}

/// A message from a worker, for the loop.
#[derive(Debug)]
pub struct Message {
    /// Who sent it.
    pub worker: WorkerId,
    /// The JSON text, as sent (one line, no newline).
    pub text: Arc<str>,
    /// It is `"ready"` or `{"type":"ready",...}`.
    pub ready: bool,
}

/// One worker's outgoing queue, shared by the loop (which pushes) and its writer task.
#[derive(Default)]
struct Outbox {
    queue: RefCell<VecDeque<Arc<str>>>,
    bytes: Cell<usize>,
    dropped: Cell<u64>,
    wake: Notify,
    /// Bytes taken from the queue and not yet written (whole messages, the first one maybe
    /// begun): what an upgrade hands over before the queue.
    sending: RefCell<Vec<u8>>,
    /// An upgrade suspends the channel: the writer stops where it is.
    stopping: Cell<bool>,
    halt: Notify,
}

impl Outbox {
    /// Queues `text`, or drops and counts it when the queue is full.
    fn push(&self, text: Arc<str>) -> bool {
        let bytes = self.bytes.get() + text.len() + 1;
        if bytes > QUEUE_BYTES {
            self.dropped.set(self.dropped.get() + 1);
            return false;
        }
        self.bytes.set(bytes);
        self.queue.borrow_mut().push_back(text);
        self.wake.notify_one();
        true
    }

    fn pop(&self) -> Option<Arc<str>> {
        let text = self.queue.borrow_mut().pop_front()?;
        self.bytes.set(self.bytes.get() - text.len() - 1);
        Some(text)
    }
}

struct Link {
    label: String,
    /// A duplicate of the supervisor's end, handed over by an upgrade.
    kept: OwnedFd,
    outbox: Rc<Outbox>,
    /// What the reader has read and not yet handed to the loop.
    unread: Rc<Unread>,
    reader: AbortHandle,
    writer: JoinHandle<()>,
}

/// Bytes read from a worker and not yet handed to the loop: the start of a line, or lines
/// waiting for room in the loop's channel. A line leaves it only once the loop has it, so
/// stopping the reader at any of its waits loses nothing.
#[derive(Default)]
struct Unread {
    /// Whole messages to hand to the loop before `bytes` (taken back from the loop's
    /// channel when an upgrade suspended it).
    lines: RefCell<VecDeque<String>>,
    bytes: RefCell<Vec<u8>>,
    /// Skipping the rest of a line over [`MAX_MESSAGE`].
    skipping: Cell<bool>,
}

/// A worker's channel as it crosses an upgrade's exec: the descriptor, what was queued for
/// the worker and what was read from it but not yet handled.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suspended {
    /// The worker.
    pub worker: WorkerId,
    /// Its label, `app[slot]`.
    pub label: String,
    /// The supervisor's end of the channel.
    pub fd: RawFd,
    /// Bytes to write to the worker first, as they are (the unsent end of a message, and
    /// whole messages).
    pub sending: Vec<u8>,
    /// Messages queued for the worker, in order, after `sending`.
    pub outgoing: Vec<String>,
    /// Messages dropped so far (its queue was full).
    pub dropped: u64,
    /// Messages read from the worker, not yet handled by the supervisor (before `unread`).
    pub incoming: Vec<String>,
    /// Bytes read from the worker and not yet handled (the start of its next lines).
    pub unread: Vec<u8>,
    /// The reader was skipping the rest of a line over [`MAX_MESSAGE`].
    pub skipping: bool,
}

/// Every worker's channel: the tasks, the outgoing queues, and the messages for the loop.
pub struct Channels {
    links: HashMap<WorkerId, Link>,
    tx: mpsc::Sender<Message>,
    rx: mpsc::Receiver<Message>,
}

impl Default for Channels {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(INCOMING);
        Channels {
            links: HashMap::new(),
            tx,
            rx,
        }
    }
}

impl Channels {
    /// Starts serving a worker's channel (`stream` is the supervisor's end from [`pair`]).
    pub fn watch(
        &mut self,
        worker: WorkerId,
        label: String,
        stream: StdUnixStream,
    ) -> io::Result<()> {
        self.serve(worker, label, stream, Rc::default(), Rc::default())
    }

    fn serve(
        &mut self,
        worker: WorkerId,
        label: String,
        stream: StdUnixStream,
        outbox: Rc<Outbox>,
        unread: Rc<Unread>,
    ) -> io::Result<()> {
        stream.set_nonblocking(true)?;
        let kept = OwnedFd::from(stream.try_clone()?);
        let (read, write) = UnixStream::from_std(stream)?.into_split();
        let reader = tokio::task::spawn_local(read_lines(
            worker,
            label.clone(),
            read,
            Rc::clone(&outbox),
            Rc::clone(&unread),
            self.tx.clone(),
        ));
        let writer = tokio::task::spawn_local(write_lines(write, Rc::clone(&outbox)));
        self.links.insert(
            worker,
            Link {
                label,
                kept,
                outbox,
                unread,
                reader: reader.abort_handle(),
                writer,
            },
        );
        Ok(())
    }

    /// Stops serving every channel, for an upgrade, where each task is: what the readers read
    /// and did not hand over, what the loop did not take yet, what the writers did not write
    /// (down to the unsent end of a message) is kept. [`Channels::resume`] serves them again,
    /// here (the exec failed) or in the new clusterd: nothing is lost or repeated.
    pub async fn suspend(&mut self) -> Vec<(Suspended, OwnedFd)> {
        for link in self.links.values() {
            link.reader.abort();
            link.outbox.stopping.set(true);
            link.outbox.halt.notify_one();
        }
        let mut taken: HashMap<WorkerId, Vec<String>> = HashMap::new();
        while let Ok(message) = self.rx.try_recv() {
            let lines = taken.entry(message.worker).or_default();
            lines.push(message.text.to_string());
        }
        let mut suspended = Vec::new();
        for (worker, link) in self.links.drain() {
            let Link {
                label,
                kept,
                outbox,
                unread,
                writer,
                ..
            } = link;
            // It stops at its next poll (the halt is already notified).
            let _ = writer.await;
            let outgoing = outbox.queue.take().iter().map(|t| t.to_string()).collect();
            // The loop's channel holds this worker's oldest messages: the reader hands back
            // messages in order.
            let mut incoming = taken.remove(&worker).unwrap_or_default();
            incoming.extend(unread.lines.take());
            let state = Suspended {
                worker,
                label,
                fd: std::os::fd::AsRawFd::as_raw_fd(&kept),
                sending: outbox.sending.take(),
                outgoing,
                dropped: outbox.dropped.get(),
                incoming,
                unread: unread.bytes.take(),
                skipping: unread.skipping.get(),
            };
            suspended.push((state, kept));
        }
        suspended
    }

    /// The channels as [`Channels::suspend`] would hand them over, without stopping anything
    /// (what `handover-check` reads).
    pub fn peek(&self) -> Vec<Suspended> {
        self.links
            .iter()
            .map(|(worker, link)| Suspended {
                worker: *worker,
                label: link.label.clone(),
                fd: std::os::fd::AsRawFd::as_raw_fd(&link.kept),
                sending: link.outbox.sending.borrow().clone(),
                outgoing: link
                    .outbox
                    .queue
                    .borrow()
                    .iter()
                    .map(|t| t.to_string())
                    .collect(),
                dropped: link.outbox.dropped.get(),
                incoming: link.unread.lines.borrow().iter().cloned().collect(),
                unread: link.unread.bytes.borrow().clone(),
                skipping: link.unread.skipping.get(),
            })
            .collect()
    }

    /// Serves a suspended channel again (`fd` is its descriptor, owned from now on).
    pub fn resume(&mut self, state: Suspended, fd: OwnedFd) -> io::Result<()> {
        let outbox = Rc::new(Outbox::default());
        *outbox.sending.borrow_mut() = state.sending;
        for text in state.outgoing {
            outbox.push(Arc::from(text));
        }
        outbox.dropped.set(state.dropped);
        let unread = Rc::new(Unread {
            lines: RefCell::new(state.incoming.into()),
            bytes: RefCell::new(state.unread),
            skipping: Cell::new(state.skipping),
        });
        self.serve(
            state.worker,
            state.label,
            StdUnixStream::from(fd),
            outbox,
            unread,
        )
    }

    /// Queues a message for a worker. False when it was dropped: its queue is full, or it
    /// has no channel (any more).
    pub fn send(&self, worker: WorkerId, text: Arc<str>) -> bool {
        self.links
            .get(&worker)
            .is_some_and(|link| link.outbox.push(text))
    }

    /// Messages dropped because the worker did not read them.
    pub fn dropped(&self, worker: WorkerId) -> u64 {
        self.links
            .get(&worker)
            .map_or(0, |link| link.outbox.dropped.get())
    }

    /// Closes a worker's channel (its `disconnect`), if it has one.
    pub fn close(&mut self, worker: WorkerId) {
        if let Some(link) = self.links.remove(&worker) {
            link.reader.abort();
            link.writer.abort();
        }
    }

    /// The next message from any worker.
    pub async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }
}

/// Reads a worker's lines and hands its messages to the loop.
async fn read_lines(
    worker: WorkerId,
    label: String,
    mut read: OwnedReadHalf,
    outbox: Rc<Outbox>,
    unread: Rc<Unread>,
    tx: mpsc::Sender<Message>,
) {
    // Messages handed back by an upgrade first, each leaving the queue once the loop has it.
    loop {
        let Some(text) = unread.lines.borrow().front().cloned() else {
            break;
        };
        let ready = classify(text.as_bytes()) == (Line::Message { ready: true });
        let message = Message {
            worker,
            text: Arc::from(text),
            ready,
        };
        if tx.send(message).await.is_err() {
            return;
        }
        unread.lines.borrow_mut().pop_front();
    }
    let mut chunk = vec![0u8; 16 * 1024];
    let mut refused = 0u64;
    let mut refuse = || {
        refused += 1;
        let message =
            format!("{label}: a message over {MAX_MESSAGE} bytes was refused ({refused} so far)");
        // One warning per worker; a worker that keeps doing it does not flood the log.
        if refused == 1 {
            tracing::warn!("{message}");
        } else {
            tracing::debug!("{message}");
        }
    };
    loop {
        // Every complete line first (after an upgrade, some may be waiting already).
        loop {
            let line = {
                let bytes = unread.bytes.borrow();
                let Some(end) = bytes.iter().position(|b| *b == b'\n') else {
                    break;
                };
                if unread.skipping.get() {
                    None
                } else if end > MAX_MESSAGE {
                    refuse();
                    None
                } else {
                    Some(bytes[..end].to_vec())
                }
            };
            if let Some(line) = line
                && let Some(message) = message_of(worker, &label, &line, &outbox)
                && tx.send(message).await.is_err()
            {
                return;
            }
            // Only now that the loop has it does the line leave `unread`.
            let mut bytes = unread.bytes.borrow_mut();
            let end = bytes.iter().position(|b| *b == b'\n').unwrap_or(0);
            bytes.drain(..=end);
            unread.skipping.set(false);
        }
        {
            let mut bytes = unread.bytes.borrow_mut();
            if !unread.skipping.get() && bytes.len() > MAX_MESSAGE {
                refuse();
                unread.skipping.set(true);
            }
            if unread.skipping.get() {
                bytes.clear();
            }
            // A buffer grown by a big message is not kept.
            if bytes.is_empty() && bytes.capacity() > 4 * chunk.len() {
                *bytes = Vec::new();
            }
        }
        let n = match read.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        unread.bytes.borrow_mut().extend_from_slice(&chunk[..n]);
    }
}

/// What one line (without its newline) is for the loop, if anything: Node's internal
/// messages are answered or ignored here, and what is not JSON is dropped.
fn message_of(worker: WorkerId, label: &str, line: &[u8], outbox: &Outbox) -> Option<Message> {
    match classify(line) {
        Line::Malformed if line.trim_ascii().is_empty() => None,
        Line::Malformed => {
            tracing::debug!("{label}: dropped a line that is not JSON");
            None
        }
        Line::Internal { handle: true } => {
            outbox.push(Arc::from(HANDLE_ACK));
            tracing::debug!("{label}: a passed handle was discarded");
            None
        }
        Line::Internal { handle: false } => None,
        // Valid JSON is valid UTF-8; an exact-size copy is what waits in the queue.
        Line::Message { ready } => Some(Message {
            worker,
            text: Arc::from(std::str::from_utf8(line).ok()?),
            ready,
        }),
    }
}

/// Writes the queued messages to a worker, one line each.
async fn write_lines(write: OwnedWriteHalf, outbox: Rc<Outbox>) {
    tokio::select! {
        () = write_queued(&write, &outbox) => {}
        () = outbox.halt.notified() => {}
    }
    if outbox.stopping.get() {
        // Suspended for an upgrade: the socket stays whole. Dropping the half would shut it
        // down for writing, and the worker would see its channel end.
        write.forget();
    }
}

/// The most bytes of whole messages taken from the queue for one write.
const BATCH: usize = 16 * 1024;

/// Writes the queue until the channel fails. Between its waits, [`Outbox::sending`] holds
/// exactly what was taken from the queue and not yet written, so it can stop at any of them.
async fn write_queued(write: &OwnedWriteHalf, outbox: &Outbox) {
    loop {
        let idle = {
            // What the loop delivered in the same turn goes out in one write.
            let mut sending = outbox.sending.borrow_mut();
            while sending.len() < BATCH
                && let Some(text) = outbox.pop()
            {
                sending.extend_from_slice(text.as_bytes());
                sending.push(b'\n');
            }
            sending.is_empty()
        };
        if idle {
            outbox.wake.notified().await;
            continue;
        }
        if write.writable().await.is_err() {
            return;
        }
        let mut sending = outbox.sending.borrow_mut();
        match write.try_write(&sending) {
            Ok(n) => drop(sending.drain(..n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_classified_as_node_and_other_languages_write_them() {
        assert_eq!(classify(b"\"ready\""), Line::Message { ready: true });
        assert_eq!(
            classify(br#"{"type":"ready","pid":4}"#),
            Line::Message { ready: true }
        );
        assert_eq!(
            classify(br#"{"type":"status","pid":4}"#),
            Line::Message { ready: false }
        );
        assert_eq!(classify(b"42"), Line::Message { ready: false });
        assert_eq!(
            classify(br#"{"cmd":"NODE_HANDLE","type":"net.Socket","msg":1}"#),
            Line::Internal { handle: true }
        );
        assert_eq!(
            classify(br#"{"cmd":"NODE_CLUSTER","act":"online"}"#),
            Line::Internal { handle: false }
        );
        assert_eq!(
            classify(br#"{"cmd":"deploy"}"#),
            Line::Message { ready: false }
        );
        assert_eq!(classify(b"{not json"), Line::Malformed);
        assert_eq!(classify(b""), Line::Malformed);
    }

    /// A channel suspended mid-traffic (the worker not reading, half a message from it read)
    /// and served again from its JSON, as an upgrade does: every message arrives once, whole,
    /// in order, both ways.
    #[test]
    fn a_suspended_channel_loses_and_repeats_nothing() {
        use std::io::{BufRead, Write};
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async {
            let (mine, theirs) = pair().expect("pair");
            let mut theirs = StdUnixStream::from(theirs);
            let worker = WorkerId(7);
            let mut channels = Channels::default();
            channels.watch(worker, "w[0]".into(), mine).expect("watch");
            theirs
                .write_all(b"{\"n\":1}\n{\"n\":2}\n{\"n\":")
                .expect("write");
            // More than the socket holds: the writer is stopped in the middle of something.
            let sent: Vec<String> = (0..200)
                .map(|i| format!("{{\"out\":{i},\"pad\":\"{}\"}}", "x".repeat(1000 + i)))
                .collect();
            for text in &sent {
                assert!(channels.send(worker, Arc::from(text.as_str())));
            }
            let first = channels.recv().await.expect("a message");
            assert_eq!(&*first.text, r#"{"n":1}"#);
            // Let the writer fill the socket and the reader read on.
            for _ in 0..50 {
                tokio::task::yield_now().await;
            }

            let mut suspended = channels.suspend().await;
            assert_eq!(suspended.len(), 1);
            let (state, fd) = suspended.pop().expect("one");
            let json = serde_json::to_string(&state).expect("encode");
            let state: Suspended = serde_json::from_str(&json).expect("decode");
            assert!(
                !state.outgoing.is_empty(),
                "the socket took everything: {json}"
            );
            channels.resume(state, fd).expect("resume");

            theirs.write_all(b"3}\n").expect("write");
            let second = channels.recv().await.expect("a message");
            let third = channels.recv().await.expect("a message");
            assert_eq!(&*second.text, r#"{"n":2}"#);
            assert_eq!(&*third.text, r#"{"n":3}"#);
            let reader = std::thread::spawn(move || {
                let mut lines = std::io::BufReader::new(theirs).lines();
                (0..200)
                    .map(|_| lines.next().expect("a line").expect("read"))
                    .collect::<Vec<String>>()
            });
            while !reader.is_finished() {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            assert!(
                reader.join().expect("reader") == sent,
                "lost, cut or repeated"
            );
        });
    }

    #[test]
    fn a_full_outbox_drops_and_counts() {
        let outbox = Outbox::default();
        let big: Arc<str> = Arc::from("x".repeat(MAX_MESSAGE));
        let mut queued = 0;
        while outbox.push(Arc::clone(&big)) {
            queued += 1;
        }
        assert_eq!(queued, QUEUE_BYTES / (MAX_MESSAGE + 1));
        assert_eq!(outbox.dropped.get(), 1);
        assert!(outbox.pop().is_some());
        assert!(outbox.push(big), "room again once one was written");
    }
}
