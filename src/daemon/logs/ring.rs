//! The supervisor's memory of recent output, for `clusterd logs`: per app, the last lines
//! (bounded in lines and in bytes), and the followers (`logs --follow`), each with a queue of
//! its own bounded in lines. Publishing never waits: a follower whose queue is full is dropped
//! (its connection ends with a message saying so), so a client that stops reading costs
//! nothing but itself.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use clusterd_proto::LogStream;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use super::Source;

/// One line, as kept and sent to followers.
#[derive(Debug)]
pub struct Record {
    /// Publication order, over all apps.
    pub seq: u64,
    /// When it was read.
    pub time: SystemTime,
    /// Who wrote it.
    pub source: Arc<Source>,
    /// Which stream.
    pub stream: LogStream,
    /// The line without its newline (any bytes); for an event, its level first (`INFO ...`).
    pub message: Box<[u8]>,
    /// An event's fields (`event`, the worker's `app`, `slot`, `pid`, `generation`, and the
    /// event's own), for JSON: kept with the line, so `clusterd logs --json` shows what a JSON
    /// log file has.
    pub fields: Option<Box<Map<String, Value>>>,
}

/// A kept line as it crosses an upgrade's exec.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handed {
    /// Its [`Record::seq`].
    pub seq: u64,
    /// When it was read.
    pub time: SystemTime,
    /// The app, or `clusterd`.
    pub app: String,
    /// The worker's slot.
    pub slot: Option<usize>,
    /// The worker's generation.
    pub generation: Option<u64>,
    /// The worker's pid.
    pub pid: Option<u32>,
    /// Which stream.
    pub stream: LogStream,
    /// The line (bytes that are not UTF-8 come across replaced).
    pub message: String,
    /// An event's fields ([`Record::fields`]); absent in hand-overs from before they were kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<Box<Map<String, Value>>>,
}

/// Which lines a reader wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// One app (or `clusterd` for clusterd's events); all when `None`.
    pub app: Option<String>,
    /// One slot of that app.
    pub slot: Option<usize>,
}

impl Filter {
    fn matches(&self, record: &Record) -> bool {
        self.app
            .as_ref()
            .is_none_or(|app| *app == record.source.app)
            && self
                .slot
                .is_none_or(|slot| record.source.slot == Some(slot))
    }
}

/// The bounds of the memory.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Lines kept per app.
    pub lines: usize,
    /// Bytes of messages kept per app.
    pub bytes: usize,
}

/// The recent lines of every app, and the followers.
pub struct Hub {
    bounds: Bounds,
    state: Mutex<State>,
    /// The source of clusterd's events, made once.
    events: Arc<Source>,
}

#[derive(Default)]
struct State {
    seq: u64,
    rings: HashMap<String, Ring>,
    followers: Vec<Follower>,
    /// The apps of the manifest, so that an app that printed nothing yet is not unknown.
    apps: BTreeSet<String>,
}

#[derive(Default)]
struct Ring {
    lines: VecDeque<Arc<Record>>,
    bytes: usize,
}

struct Follower {
    filter: Filter,
    queue: mpsc::Sender<Arc<Record>>,
}

impl Hub {
    /// An empty hub.
    pub fn new(bounds: Bounds) -> Self {
        Hub {
            bounds,
            state: Mutex::new(State::default()),
            events: Source::events(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps a line and hands it to the followers that want it.
    #[cfg(test)]
    fn publish(&self, source: &Arc<Source>, stream: LogStream, message: &[u8]) -> Arc<Record> {
        let mut record = None;
        self.publish_lines(source, stream, [message], |r| record = Some(r.clone()));
        record.expect("one line published")
    }

    /// Keeps one of clusterd's events (`message` with its level first) with its fields.
    pub fn publish_event(&self, message: &[u8], fields: Map<String, Value>) -> Arc<Record> {
        let mut state = self.state();
        state.seq += 1;
        let record = Arc::new(Record {
            seq: state.seq,
            time: SystemTime::now(),
            source: self.events.clone(),
            stream: LogStream::Log,
            message: message.into(),
            fields: (!fields.is_empty()).then(|| Box::new(fields)),
        });
        self.keep(&mut state, record.clone());
        record
    }

    /// Keeps lines read together (one time for all: they were read at the same instant) and
    /// hands each to the followers that want it and to `each`, under one lock.
    pub fn publish_lines<'a>(
        &self,
        source: &Arc<Source>,
        stream: LogStream,
        lines: impl IntoIterator<Item = &'a [u8]>,
        mut each: impl FnMut(&Arc<Record>),
    ) {
        let time = SystemTime::now();
        let mut state = self.state();
        let state = &mut *state;
        if !state.rings.contains_key(&source.app) {
            state.rings.insert(source.app.clone(), Ring::default());
        }
        let ring = state.rings.get_mut(&source.app).expect("inserted above");
        for message in lines {
            state.seq += 1;
            let record = Arc::new(Record {
                seq: state.seq,
                time,
                source: source.clone(),
                stream,
                message: message.into(),
                fields: None,
            });
            ring.push(record.clone(), self.bounds);
            if !state.followers.is_empty() {
                hand_to_followers(&mut state.followers, &record);
            }
            each(&record);
        }
    }

    /// Keeps `record` in its app's ring and hands it to the followers.
    fn keep(&self, state: &mut State, record: Arc<Record>) {
        if !state.rings.contains_key(&record.source.app) {
            state
                .rings
                .insert(record.source.app.clone(), Ring::default());
        }
        let ring = state
            .rings
            .get_mut(&record.source.app)
            .expect("inserted above");
        ring.push(record.clone(), self.bounds);
        hand_to_followers(&mut state.followers, &record);
    }

    /// The last `n` lines of each app matching `filter`, oldest first.
    pub fn tail(&self, filter: &Filter, n: usize) -> Vec<Arc<Record>> {
        tail(&self.state(), filter, n)
    }

    /// [`Hub::tail`], and from then on every new matching line through a queue of `queue`
    /// lines: nothing missed, nothing twice. The receiver ends when the follower is dropped.
    pub fn follow(
        &self,
        filter: Filter,
        n: usize,
        queue: usize,
    ) -> (Vec<Arc<Record>>, mpsc::Receiver<Arc<Record>>) {
        let mut state = self.state();
        let lines = tail(&state, &filter, n);
        let (sender, receiver) = mpsc::channel(queue.max(1));
        state.followers.push(Follower {
            filter,
            queue: sender,
        });
        (lines, receiver)
    }

    /// Every kept line, oldest first, for an upgrade.
    pub fn handover(&self) -> Vec<Handed> {
        let state = self.state();
        let mut lines: Vec<Handed> = state
            .rings
            .values()
            .flat_map(|ring| ring.lines.iter())
            .map(|r| Handed {
                seq: r.seq,
                time: r.time,
                app: r.source.app.clone(),
                slot: r.source.slot,
                generation: r.source.generation,
                pid: r.source.pid(),
                stream: r.stream,
                message: String::from_utf8_lossy(&r.message).into_owned(),
                fields: r.fields.clone(),
            })
            .collect();
        lines.sort_by_key(|l| l.seq);
        lines
    }

    /// Keeps the lines a previous clusterd handed over (before any line of this one).
    pub fn restore(&self, lines: Vec<Handed>) {
        let mut state = self.state();
        for line in lines {
            let source = if line.app == super::EVENTS && line.slot.is_none() {
                self.events.clone()
            } else {
                Source::restored(line.app, line.slot, line.generation, line.pid)
            };
            state.seq = state.seq.max(line.seq);
            let record = Arc::new(Record {
                seq: line.seq,
                time: line.time,
                source,
                stream: line.stream,
                message: line.message.into_bytes().into(),
                fields: line.fields,
            });
            self.keep(&mut state, record);
        }
    }

    /// The apps of the (re-read) manifest.
    pub fn set_apps<'a>(&self, apps: impl IntoIterator<Item = &'a String>) {
        self.state().apps.extend(apps.into_iter().cloned());
    }

    /// Whether `app` is an app of the manifest or has printed something.
    pub fn knows(&self, app: &str) -> bool {
        let state = self.state();
        state.apps.contains(app) || state.rings.contains_key(app)
    }

    /// Followers connected now.
    #[cfg(test)]
    fn followers(&self) -> usize {
        self.state().followers.len()
    }
}

impl Ring {
    /// Keeps `record`, forgetting the oldest lines beyond `bounds` (but never the last one).
    fn push(&mut self, record: Arc<Record>, bounds: Bounds) {
        self.bytes += record.message.len();
        self.lines.push_back(record);
        while self.lines.len() > bounds.lines || (self.bytes > bounds.bytes && self.lines.len() > 1)
        {
            let old = self.lines.pop_front().expect("not empty");
            self.bytes -= old.message.len();
        }
    }
}

/// A full queue means a follower that does not keep up: it is dropped (its receiver sees the
/// end). A closed one has gone.
fn hand_to_followers(followers: &mut Vec<Follower>, record: &Arc<Record>) {
    followers.retain(|follower| {
        !follower.filter.matches(record) || follower.queue.try_send(record.clone()).is_ok()
    });
}

fn tail(state: &State, filter: &Filter, n: usize) -> Vec<Arc<Record>> {
    let mut lines: Vec<Arc<Record>> = state
        .rings
        .iter()
        .filter(|(app, _)| filter.app.as_ref().is_none_or(|a| a == *app))
        .flat_map(|(_, ring)| {
            let matching: Vec<&Arc<Record>> =
                ring.lines.iter().filter(|r| filter.matches(r)).collect();
            let skip = matching.len().saturating_sub(n);
            matching.into_iter().skip(skip).cloned().collect::<Vec<_>>()
        })
        .collect();
    lines.sort_by_key(|r| r.seq);
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(lines: usize, bytes: usize) -> Hub {
        Hub::new(Bounds { lines, bytes })
    }

    fn messages(records: &[Arc<Record>]) -> Vec<String> {
        records
            .iter()
            .map(|r| String::from_utf8_lossy(&r.message).into_owned())
            .collect()
    }

    #[test]
    fn each_app_keeps_its_last_lines_within_both_bounds() {
        let hub = hub(3, 10);
        let web = Source::worker("web", 0, 1);
        let api = Source::worker("api", 0, 1);
        for i in 0..5 {
            hub.publish(&web, LogStream::Stdout, format!("w{i}").as_bytes());
        }
        hub.publish(&api, LogStream::Stdout, b"a0");
        let all = Filter::default();
        assert_eq!(messages(&hub.tail(&all, 10)), ["w2", "w3", "w4", "a0"]);
        assert_eq!(messages(&hub.tail(&all, 1)), ["w4", "a0"]);
        // Bytes: a 7-byte line leaves room for one 2-byte line only.
        hub.publish(&web, LogStream::Stdout, b"1234567");
        let web_only = Filter {
            app: Some("web".into()),
            slot: None,
        };
        assert_eq!(messages(&hub.tail(&web_only, 10)), ["w4", "1234567"]);
        // A line larger than the bound is still kept, alone.
        hub.publish(&web, LogStream::Stdout, &[b'x'; 20]);
        assert_eq!(hub.tail(&web_only, 10).len(), 1);
    }

    #[test]
    fn a_slot_filter_takes_the_last_lines_of_that_slot() {
        let hub = hub(100, 1000);
        let zero = Source::worker("web", 0, 1);
        let one = Source::worker("web", 1, 1);
        for i in 0..4 {
            hub.publish(&zero, LogStream::Stdout, format!("zero {i}").as_bytes());
            hub.publish(&one, LogStream::Stderr, format!("one {i}").as_bytes());
        }
        let filter = Filter {
            app: Some("web".into()),
            slot: Some(1),
        };
        assert_eq!(messages(&hub.tail(&filter, 2)), ["one 2", "one 3"]);
    }

    #[test]
    fn followers_get_what_follows_and_a_full_one_is_dropped() {
        let hub = hub(100, 1000);
        let web = Source::worker("web", 0, 1);
        hub.publish(&web, LogStream::Stdout, b"before");
        let (tail, mut reading) = hub.follow(Filter::default(), 5, 10);
        assert_eq!(messages(&tail), ["before"]);
        let (_, mut stalled) = hub.follow(Filter::default(), 0, 2);
        let other = Filter {
            app: Some("api".into()),
            slot: None,
        };
        let (_, _unmatched) = hub.follow(other, 0, 1);
        for i in 0..3 {
            hub.publish(&web, LogStream::Stdout, format!("after {i}").as_bytes());
            let got = reading.try_recv().unwrap();
            assert_eq!(&*got.message, format!("after {i}").as_bytes());
        }
        // The stalled follower got its two lines, then was dropped; the reading one and the
        // one that matched nothing remain.
        assert_eq!(hub.followers(), 2);
        assert!(stalled.try_recv().is_ok());
        assert!(stalled.try_recv().is_ok());
        assert!(matches!(
            stalled.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        drop(reading);
        hub.publish(&web, LogStream::Stdout, b"gone");
        assert_eq!(hub.followers(), 1);
    }
}
