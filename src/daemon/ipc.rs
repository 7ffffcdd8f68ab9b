//! Worker messaging (`ipc = true`): a unix stream socket per worker carrying newline-delimited
//! JSON, which is exactly Node's own IPC channel in its default `json` serialization. The
//! worker's end sits at the fd after its listening sockets, named by `CLUSTERD_IPC_FD` for any
//! language and by `NODE_CHANNEL_FD` (with `NODE_CHANNEL_SERIALIZATION_MODE=json`) for Node,
//! whose `process.send` / `process.on('message')` / `process.on('disconnect')` then work as
//! under the cluster module. The supervisor's end is created close-on-exec before `fork`
//! ([`pair`]).
//!
//! **Supervisor side** ([`Channels`]): two local tasks per worker, so nothing a worker does
//! can stall the loop or grow clusterd's memory without bound, and a worker that reads,
//! however slowly, loses nothing.
//!
//! - The reader reads lines of at most [`MAX_MESSAGE`] bytes. A longer line is refused with a
//!   log line and skipped up to its newline; a line that is not JSON is dropped; the channel
//!   stays open either way. Node's internal messages (`{"cmd":"NODE_..."}`) never reach the
//!   supervisor: a `NODE_HANDLE` (a socket passed with `process.send(msg, handle)`) is
//!   answered `NODE_HANDLE_ACK`, or the sender would queue every later message behind it
//!   forever; the descriptor itself is discarded by the kernel, as the reader passes no room
//!   for it. Every other message waits in the worker's own queue of [`INCOMING`] messages:
//!   when it is full, the reader waits, and so do the worker's writes (the kernel's socket
//!   buffer is the backpressure). The loop takes them round-robin, one per worker in turn
//!   ([`Channels::recv`]), so a flooding worker cannot delay the others' messages.
//! - The writer sends what the supervisor delivers (broadcasts, `clusterd send`) from the
//!   worker's outgoing queue. Once it holds [`QUEUE_BYTES`], the loop stops taking messages
//!   from the workers whose messages went to it (their readers then wait, and their writes
//!   wait in the kernel) until it drains: nothing is dropped for a receiver that reads. A
//!   receiver whose full queue has had nothing written for [`STUCK`] is stuck: the others'
//!   messages flow again and the ones for it are dropped and counted
//!   ([`Channels::dropped`]) until it writes again. Whatever happens, a queue past
//!   [`QUEUE_LIMIT`] drops (a message from a sender not yet known to go to it can land on a
//!   full queue; `clusterd send` is not held back).
//!
//! Closing a worker's channel ([`Channels::close`]) ends both tasks and closes the socket:
//! the worker sees end of file (Node: the `disconnect` event).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Notify;
use tokio::task::{AbortHandle, JoinHandle};

use clusterd_core::WorkerId;
use clusterd_core::messages::{Line, classify};

/// The longest message, in bytes, either way (without its newline).
pub const MAX_MESSAGE: usize = 64 * 1024;

/// The bytes of messages waiting to be written to one worker from which the loop stops
/// taking messages bound for it.
pub const QUEUE_BYTES: usize = 256 * 1024;

/// The most bytes of messages waiting to be written to one worker: beyond it, dropped.
pub const QUEUE_LIMIT: usize = 2 * QUEUE_BYTES;

/// How long a receiver's full queue can go without a write before it is declared stuck.
pub const STUCK: Duration = Duration::from_secs(1);

/// Messages read from one worker and not yet taken by the loop.
pub const INCOMING: usize = 16;

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
    /// Since when the queue has been full with nothing written (`None`: not full since the
    /// last write).
    stalled: Cell<Option<Instant>>,
    /// The loop's wake-up ([`Channels::recv`]): the queue has room again.
    room: Rc<Notify>,
}

impl Outbox {
    fn new(room: Rc<Notify>) -> Self {
        Outbox {
            room,
            ..Outbox::default()
        }
    }

    /// It holds [`QUEUE_BYTES`] or more: senders bound for it wait.
    fn full(&self) -> bool {
        self.bytes.get() >= QUEUE_BYTES
    }

    /// When a full queue is (or was) declared stuck.
    fn stuck_at(&self) -> Option<Instant> {
        if !self.full() {
            return None;
        }
        self.stalled.get().map(|since| since + STUCK)
    }

    /// Queues `text`, or drops and counts it when the worker is stuck or the queue is past
    /// [`QUEUE_LIMIT`].
    fn push(&self, text: Arc<str>) -> bool {
        let now = Instant::now();
        let bytes = self.bytes.get() + text.len() + 1;
        if bytes > QUEUE_LIMIT || self.stuck_at().is_some_and(|at| at <= now) {
            let dropped = self.dropped.get() + 1;
            self.dropped.set(dropped);
            return false;
        }
        self.bytes.set(bytes);
        self.queue.borrow_mut().push_back(text);
        self.wake.notify_one();
        if self.full() && self.stalled.get().is_none() {
            self.stalled.set(Some(now));
        }
        true
    }

    /// The writer wrote something: a full queue's clock starts again, and one with room
    /// again lets the loop take the messages bound for it.
    fn wrote(&self) {
        if self.full() {
            self.stalled.set(Some(Instant::now()));
        } else if self.stalled.take().is_some() {
            self.room.notify_one();
        }
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
    /// The workers its messages were delivered to: while one of them is full (and not
    /// stuck), the loop takes nothing from it.
    targets: RefCell<HashSet<WorkerId>>,
    reader: AbortHandle,
    writer: JoinHandle<()>,
}

/// What was read from a worker and not yet taken by the loop: its messages, and the bytes
/// after them (the start of a line). A line leaves `bytes` only as a message in `ready`, so
/// stopping the reader at any of its waits loses nothing.
#[derive(Default)]
struct Unread {
    /// Messages for the loop, at most [`INCOMING`] (more only handed back by an upgrade).
    ready: RefCell<VecDeque<Message>>,
    bytes: RefCell<Vec<u8>>,
    /// Skipping the rest of a line over [`MAX_MESSAGE`].
    skipping: Cell<bool>,
    /// The loop took a message: the reader may go on.
    taken: Notify,
    /// The loop's wake-up ([`Channels::recv`]): a message is ready.
    arrived: Rc<Notify>,
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
#[derive(Default)]
pub struct Channels {
    links: HashMap<WorkerId, Link>,
    /// The workers in round-robin order: the next message is taken from the first one that
    /// has one (and may send), which then goes last.
    turn: VecDeque<WorkerId>,
    /// The last message taken, and its sender: what [`Channels::send`] delivers with the
    /// same text (the same allocation) is that sender's.
    last: Option<(WorkerId, Arc<str>)>,
    /// Wakes [`Channels::recv`]: a message arrived, or a queue has room again.
    wake: Rc<Notify>,
}

impl Channels {
    /// Starts serving a worker's channel (`stream` is the supervisor's end from [`pair`]).
    pub fn watch(
        &mut self,
        worker: WorkerId,
        label: String,
        stream: StdUnixStream,
    ) -> io::Result<()> {
        let outbox = Outbox::new(Rc::clone(&self.wake));
        let unread = Unread {
            arrived: Rc::clone(&self.wake),
            ..Unread::default()
        };
        self.serve(worker, label, stream, outbox, unread)
    }

    fn serve(
        &mut self,
        worker: WorkerId,
        label: String,
        stream: StdUnixStream,
        outbox: Outbox,
        unread: Unread,
    ) -> io::Result<()> {
        stream.set_nonblocking(true)?;
        let kept = OwnedFd::from(stream.try_clone()?);
        let (read, write) = UnixStream::from_std(stream)?.into_split();
        let (outbox, unread) = (Rc::new(outbox), Rc::new(unread));
        let reader = tokio::task::spawn_local(read_lines(
            worker,
            label.clone(),
            read,
            Rc::clone(&outbox),
            Rc::clone(&unread),
        ));
        let writer = tokio::task::spawn_local(write_lines(write, Rc::clone(&outbox)));
        self.links.insert(
            worker,
            Link {
                label,
                kept,
                outbox,
                unread,
                targets: RefCell::default(),
                reader: reader.abort_handle(),
                writer,
            },
        );
        self.turn.retain(|w| *w != worker);
        self.turn.push_back(worker);
        self.wake.notify_one();
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
        self.turn.clear();
        self.last = None;
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
            let incoming = unread
                .ready
                .take()
                .iter()
                .map(|m| m.text.to_string())
                .collect();
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
                incoming: link
                    .unread
                    .ready
                    .borrow()
                    .iter()
                    .map(|m| m.text.to_string())
                    .collect(),
                unread: link.unread.bytes.borrow().clone(),
                skipping: link.unread.skipping.get(),
            })
            .collect()
    }

    /// Serves a suspended channel again (`fd` is its descriptor, owned from now on).
    pub fn resume(&mut self, state: Suspended, fd: OwnedFd) -> io::Result<()> {
        let outbox = Outbox::new(Rc::clone(&self.wake));
        *outbox.sending.borrow_mut() = state.sending;
        for text in state.outgoing {
            outbox.push(Arc::from(text));
        }
        outbox.dropped.set(state.dropped);
        let ready = state
            .incoming
            .into_iter()
            .map(|text| Message {
                worker: state.worker,
                ready: classify(text.as_bytes()) == (Line::Message { ready: true }),
                text: Arc::from(text),
            })
            .collect();
        let unread = Unread {
            ready: RefCell::new(ready),
            bytes: RefCell::new(state.unread),
            skipping: Cell::new(state.skipping),
            arrived: Rc::clone(&self.wake),
            ..Unread::default()
        };
        self.serve(
            state.worker,
            state.label,
            StdUnixStream::from(fd),
            outbox,
            unread,
        )
    }

    /// Queues a message for a worker. False when it was dropped: the worker is stuck, its
    /// queue is past [`QUEUE_LIMIT`], or it has no channel (any more).
    pub fn send(&self, worker: WorkerId, text: Arc<str>) -> bool {
        if let Some((sender, last)) = &self.last
            && Arc::ptr_eq(last, &text)
            && let Some(link) = self.links.get(sender)
        {
            link.targets.borrow_mut().insert(worker);
        }
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
            self.turn.retain(|w| *w != worker);
            for other in self.links.values() {
                other.targets.borrow_mut().remove(&worker);
            }
            // Senders held back by its full queue go on.
            self.wake.notify_one();
        }
    }

    /// The next message from the workers, round-robin: from the first in turn that has one
    /// and none of whose receivers is full (unless stuck). Cancel-safe.
    pub async fn recv(&mut self) -> Option<Message> {
        loop {
            let now = Instant::now();
            // The earliest time a full receiver holding a sender back is declared stuck.
            let mut until: Option<Instant> = None;
            for _ in 0..self.turn.len() {
                let Some(worker) = self.turn.pop_front() else {
                    break;
                };
                self.turn.push_back(worker);
                let Some(link) = self.links.get(&worker) else {
                    continue;
                };
                if link.unread.ready.borrow().is_empty() {
                    continue;
                }
                let held = link
                    .targets
                    .borrow()
                    .iter()
                    .filter_map(|target| self.links.get(target)?.outbox.stuck_at())
                    .filter(|at| *at > now)
                    .min();
                if let Some(at) = held {
                    until = Some(until.map_or(at, |u| u.min(at)));
                    continue;
                }
                let Some(message) = link.unread.ready.borrow_mut().pop_front() else {
                    continue;
                };
                link.unread.taken.notify_one();
                self.last = Some((worker, Arc::clone(&message.text)));
                return Some(message);
            }
            let woken = self.wake.notified();
            match until {
                Some(at) => {
                    tokio::select! {
                        () = woken => {}
                        () = tokio::time::sleep_until(at.into()) => {}
                    }
                }
                None => woken.await,
            }
        }
    }
}

/// Reads a worker's lines and hands its messages to the loop.
async fn read_lines(
    worker: WorkerId,
    label: String,
    mut read: OwnedReadHalf,
    outbox: Rc<Outbox>,
    unread: Rc<Unread>,
) {
    let mut chunk = vec![0u8; 16 * 1024];
    let mut refused = 0u64;
    let mut refuse = || {
        refused += 1;
        let message =
            format!("{label}: a message over {MAX_MESSAGE} bytes was refused ({refused} so far)");
        // One warning per worker; a worker that keeps doing it does not flood the log.
        if refused == 1 {
            tracing::warn!(event = "ipc_message_refused", "{message}");
        } else {
            tracing::debug!("{message}");
        }
    };
    loop {
        // Every complete line first (after an upgrade, some may be waiting already).
        loop {
            // Room in its queue first: while the loop does not take, nothing more is read.
            while unread.ready.borrow().len() >= INCOMING {
                unread.taken.notified().await;
            }
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
            {
                unread.ready.borrow_mut().push_back(message);
                unread.arrived.notify_one();
            }
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
            Ok(n) => {
                sending.drain(..n);
                outbox.wrote();
            }
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

    /// A worker with 100 messages waiting does not delay another's one: the loop takes them
    /// one worker after the other.
    #[test]
    fn messages_are_taken_round_robin_across_workers() {
        use std::io::Write;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async {
            let mut channels = Channels::default();
            let mut ends = Vec::new();
            for id in 0..2 {
                let (mine, theirs) = pair().expect("pair");
                channels
                    .watch(WorkerId(id), format!("w[{id}]"), mine)
                    .expect("watch");
                ends.push(StdUnixStream::from(theirs));
            }
            let flood: String = (0..100).map(|n| format!("{{\"flood\":{n}}}\n")).collect();
            ends[0].write_all(flood.as_bytes()).expect("write");
            // The flooder's reader fills its queue before the other one writes.
            while channels.links[&WorkerId(0)].unread.ready.borrow().len() < INCOMING {
                tokio::task::yield_now().await;
            }
            ends[1].write_all(b"{\"other\":1}\n").expect("write");
            while channels.links[&WorkerId(1)]
                .unread
                .ready
                .borrow()
                .is_empty()
            {
                tokio::task::yield_now().await;
            }
            let mut order = Vec::new();
            for _ in 0..2 {
                order.push(channels.recv().await.expect("a message").worker.0);
            }
            assert_eq!(order, [0, 1], "the other worker waited");
        });
    }

    #[test]
    fn a_full_outbox_holds_senders_back_and_drops_only_past_its_limit_or_stuck() {
        let outbox = Outbox::default();
        let big: Arc<str> = Arc::from("x".repeat(MAX_MESSAGE));
        let mut queued = 0;
        while !outbox.full() {
            assert!(outbox.push(Arc::clone(&big)));
            queued += 1;
        }
        assert_eq!(queued, QUEUE_BYTES.div_ceil(MAX_MESSAGE + 1));
        let stuck_at = outbox.stuck_at().expect("full");
        assert!(stuck_at > Instant::now(), "not stuck yet");
        // Past the limit, dropped and counted even before it is stuck.
        while outbox.push(Arc::clone(&big)) {
            queued += 1;
        }
        assert_eq!(queued, QUEUE_LIMIT / (MAX_MESSAGE + 1));
        assert_eq!(outbox.dropped.get(), 1);
        // Nothing written for the bound: stuck, a small message is dropped too.
        outbox.stalled.set(Some(Instant::now() - STUCK));
        assert!(!outbox.push(Arc::from("1")));
        assert_eq!(outbox.dropped.get(), 2);
        // Written down below the threshold: not stuck any more.
        while outbox.full() {
            outbox.pop();
        }
        outbox.wrote();
        assert_eq!(outbox.stuck_at(), None);
        assert!(outbox.push(big), "room again once written");
    }
}
