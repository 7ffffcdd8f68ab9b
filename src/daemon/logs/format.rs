//! The line formats, shared by log files, clusterd's stdout and stderr, and `clusterd logs`.
//!
//! - **text**: `2026-11-21T10:00:00.123Z web[0] message` for a worker's stdout,
//!   `... web[0]! message` for its stderr, `... clusterd INFO message` for clusterd's events.
//!   The message's bytes are written as they are. On clusterd's stdout (`log = "stdout"`)
//!   there is no time (journald and docker add their own): `web[0] message`, as always.
//!   clusterd's events on its stderr read `2026-11-21T10:00:00.123Z  INFO message`.
//! - **json**: one [`LogLine`] object per line. A message that is not UTF-8 is base64 with
//!   `"base64": true`, so that nothing is lost or replaced. An event carries its fields
//!   ([`Record::fields`]): `event`, the `app`, `slot`, `pid` and `generation` of the worker
//!   it is about, and its own.
//!
//! A worker's lines are formatted by its [`LineFormat`], batch by batch into one buffer: the
//! `app[slot]` prefix is made once, and the time once per millisecond ([`Stamp`]).

use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use clusterd_proto::{LogLine, LogStream};
use serde::Serialize;
use serde_json::Value;

use super::ring::Record;

/// RFC 3339, UTC, milliseconds.
pub fn time(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// A line's time as text, made again only when the millisecond changes: the lines of a busy
/// worker share it.
#[derive(Debug, Default)]
pub struct Stamp {
    /// Milliseconds since the epoch of `text`.
    millis: Option<u128>,
    text: String,
}

impl Stamp {
    /// `at` as [`time`] writes it.
    pub fn at(&mut self, at: SystemTime) -> &str {
        let millis = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        if self.millis != Some(millis) {
            use std::fmt::Write;
            self.text.clear();
            let _ = write!(self.text, "{}", humantime::format_rfc3339_millis(at));
            self.millis = Some(millis);
        }
        &self.text
    }
}

/// How a destination writes lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Text without time (clusterd's stdout and stderr: journald and docker add their own).
    Bare,
    /// Text with time (log files).
    Timed,
    /// JSON.
    Json,
    /// Text as a terminal shows clusterd's events: time, level (coloured with `ansi`), message.
    Console {
        /// Colour the level.
        ansi: bool,
    },
}

/// The formatter of one source's stream: its prefix made once, its time once a millisecond.
#[derive(Debug)]
pub struct LineFormat {
    style: Style,
    /// `web[0] ` or `web[0]! ` (text styles).
    prefix: Vec<u8>,
    stamp: Stamp,
}

impl LineFormat {
    /// The format of `app`'s (`slot`'s) `stream` in `style`.
    pub fn new(style: Style, app: &str, slot: Option<usize>, stream: LogStream) -> Self {
        let mut prefix = Vec::with_capacity(app.len() + 8);
        write_prefix(&mut prefix, app, slot, stream);
        LineFormat {
            style,
            prefix,
            stamp: Stamp::default(),
        }
    }

    /// Appends `record`, formatted, to `out` (newline included).
    pub fn write(&mut self, record: &Record, out: &mut Vec<u8>) {
        match self.style {
            Style::Bare => {
                out.extend_from_slice(&self.prefix);
                out.extend_from_slice(&record.message);
                out.push(b'\n');
            }
            Style::Timed => {
                out.extend_from_slice(self.stamp.at(record.time).as_bytes());
                out.push(b' ');
                out.extend_from_slice(&self.prefix);
                out.extend_from_slice(&record.message);
                out.push(b'\n');
            }
            Style::Json => {
                let time = self.stamp.at(record.time);
                write_json(record, time, out);
            }
            Style::Console { ansi } => {
                let time = self.stamp.at(record.time);
                write_console(record, time, ansi, out);
            }
        }
    }
}

/// `record` in `style`, newline included (one line: no stamp to reuse).
pub fn line(record: &Record, style: Style) -> Vec<u8> {
    let source = &record.source;
    let mut out = Vec::with_capacity(record.message.len() + source.app.len() + 40);
    LineFormat::new(style, &source.app, source.slot, record.stream).write(record, &mut out);
    out
}

/// An event's level and message: `INFO started` → (`INFO`, `started`).
fn split_level(message: &[u8]) -> (Option<&'static str>, &[u8]) {
    const LEVELS: [&str; 5] = ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"];
    for level in LEVELS {
        if let Some(rest) = message.strip_prefix(level.as_bytes())
            && let Some(rest) = rest.strip_prefix(b" ")
        {
            return (Some(level), rest.trim_ascii_start());
        }
    }
    (None, message)
}

/// The fields of [`LogLine`] an event's fields may not replace.
const OWN: [&str; 5] = ["time", "stream", "level", "message", "base64"];

/// A record as a protocol line (and a JSON log line).
pub fn log_line(record: &Record) -> LogLine {
    let source = &record.source;
    let (level, message) = match record.stream {
        LogStream::Log => split_level(&record.message),
        _ => (None, &record.message[..]),
    };
    let (message, base64) = match std::str::from_utf8(message) {
        Ok(text) => (text.to_owned(), false),
        Err(_) => (STANDARD.encode(message), true),
    };
    let mut line = LogLine {
        time: time(record.time),
        app: source.app.clone(),
        slot: source.slot,
        pid: source.pid(),
        generation: source.generation,
        stream: record.stream,
        level: level.map(str::to_owned),
        message,
        base64,
        fields: Default::default(),
    };
    for (key, value) in record.fields.iter().flat_map(|f| f.iter()) {
        match (key.as_str(), value) {
            ("app", Value::String(app)) => line.app.clone_from(app),
            ("slot", value) => line.slot = value.as_u64().and_then(|v| usize::try_from(v).ok()),
            ("pid", value) => line.pid = value.as_u64().and_then(|v| u32::try_from(v).ok()),
            ("generation", value) => line.generation = value.as_u64(),
            (key, _) if OWN.contains(&key) => {}
            (key, value) => {
                line.fields.insert(key.to_owned(), value.clone());
            }
        }
    }
    line
}

/// The bytes of a line's message (base64 decoded; an invalid base64 message as it is).
pub fn message_bytes(line: &LogLine) -> Vec<u8> {
    if line.base64 {
        STANDARD
            .decode(&line.message)
            .unwrap_or_else(|_| line.message.clone().into_bytes())
    } else {
        line.message.clone().into_bytes()
    }
}

/// A JSON line, newline included.
pub fn json(record: &Record) -> Vec<u8> {
    clusterd_proto::encode_line(&log_line(record))
}

/// A worker's line as [`LogLine`] serializes it, borrowed: nothing is allocated for a line
/// that is UTF-8.
#[derive(Serialize)]
struct JsonLine<'a> {
    time: &'a str,
    app: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    slot: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    generation: Option<u64>,
    stream: LogStream,
    message: Cow<'a, str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    base64: bool,
}

/// Appends `record` as JSON (what [`json`] makes) to `out`.
fn write_json(record: &Record, time: &str, out: &mut Vec<u8>) {
    if record.stream == LogStream::Log || record.fields.is_some() {
        out.extend_from_slice(&json(record));
        return;
    }
    let source = &record.source;
    let (message, base64) = match std::str::from_utf8(&record.message) {
        Ok(text) => (Cow::Borrowed(text), false),
        Err(_) => (Cow::Owned(STANDARD.encode(&record.message)), true),
    };
    let line = JsonLine {
        time,
        app: &source.app,
        slot: source.slot,
        pid: source.pid(),
        generation: source.generation,
        stream: record.stream,
        message,
        base64,
    };
    if serde_json::to_writer(&mut *out, &line).is_ok() {
        out.push(b'\n');
    }
}

/// Appends one of clusterd's events as a terminal shows it: `time  INFO message`.
fn write_console(record: &Record, time: &str, ansi: bool, out: &mut Vec<u8>) {
    let (level, message) = split_level(&record.message);
    out.extend_from_slice(time.as_bytes());
    out.push(b' ');
    if let Some(level) = level {
        let colour = match level {
            "ERROR" => "31",
            "WARN" => "33",
            "INFO" => "32",
            "DEBUG" => "34",
            _ => "35",
        };
        let padded = format!("{level:>5}");
        if ansi {
            out.extend_from_slice(format!("\x1b[{colour}m{padded}\x1b[0m").as_bytes());
        } else {
            out.extend_from_slice(padded.as_bytes());
        }
        out.push(b' ');
    }
    out.extend_from_slice(message);
    out.push(b'\n');
}

/// A protocol line as text, as a log file has it. An event reads `clusterd LEVEL message`
/// whichever worker it is about.
pub fn text_of_line(line: &LogLine) -> Vec<u8> {
    let mut message = message_bytes(line);
    if let Some(level) = &line.level {
        let mut with_level = format!("{level} ").into_bytes();
        with_level.append(&mut message);
        message = with_level;
    }
    let (app, slot) = match line.stream {
        LogStream::Log => (super::EVENTS, None),
        _ => (line.app.as_str(), line.slot),
    };
    let mut out = Vec::with_capacity(message.len() + 60);
    out.extend_from_slice(line.time.as_bytes());
    out.push(b' ');
    write_prefix(&mut out, app, slot, line.stream);
    out.extend_from_slice(&message);
    out.push(b'\n');
    out
}

/// `web[0] `, `web[0]! ` (stderr) or `clusterd `.
fn write_prefix(out: &mut Vec<u8>, app: &str, slot: Option<usize>, stream: LogStream) {
    use std::io::Write;
    out.extend_from_slice(app.as_bytes());
    if let Some(slot) = slot {
        let _ = write!(out, "[{slot}]");
    }
    if stream == LogStream::Stderr {
        out.push(b'!');
    }
    out.push(b' ');
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::daemon::logs::Source;

    fn record(source: Arc<Source>, stream: LogStream, message: &[u8]) -> Record {
        Record {
            seq: 1,
            time: UNIX_EPOCH + Duration::from_millis(1_795_000_000_123),
            source,
            stream,
            message: message.into(),
            fields: None,
        }
    }

    #[test]
    fn text_marks_stderr_and_keeps_bytes() {
        let web = Source::worker("web", 2, 7);
        let out = record(web.clone(), LogStream::Stdout, b"hello");
        assert_eq!(
            line(&out, Style::Timed),
            b"2026-11-18T11:06:40.123Z web[2] hello\n"
        );
        assert_eq!(line(&out, Style::Bare), b"web[2] hello\n");
        let err = record(web, LogStream::Stderr, b"\xff oops");
        assert_eq!(line(&err, Style::Bare), b"web[2]! \xff oops\n");
        let event = record(Source::events(), LogStream::Log, b"INFO started");
        assert_eq!(
            line(&event, Style::Timed),
            b"2026-11-18T11:06:40.123Z clusterd INFO started\n"
        );
    }

    #[test]
    fn json_has_every_field_and_is_lossless_for_binary() {
        let web = Source::worker("web", 1, 3);
        web.set_pid(4242);
        let line = json(&record(
            web.clone(),
            LogStream::Stderr,
            "héllo \"x\"".as_bytes(),
        ));
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(value["time"], "2026-11-18T11:06:40.123Z");
        assert_eq!(value["app"], "web");
        assert_eq!(value["slot"], 1);
        assert_eq!(value["pid"], 4242);
        assert_eq!(value["generation"], 3);
        assert_eq!(value["stream"], "stderr");
        assert_eq!(value["message"], "héllo \"x\"");
        assert!(value.get("base64").is_none());
        assert_eq!(line.last(), Some(&b'\n'));

        let binary = b"\x00\xff\xfe text";
        let line = log_line(&record(web, LogStream::Stdout, binary));
        assert!(line.base64);
        assert_eq!(message_bytes(&line), binary);
        let parsed: LogLine = serde_json::from_slice(&clusterd_proto::encode_line(&line)).unwrap();
        assert_eq!(message_bytes(&parsed), binary);
    }

    #[test]
    fn events_carry_their_level() {
        let line = log_line(&record(
            Source::events(),
            LogStream::Log,
            b"WARN disk  full",
        ));
        assert_eq!(line.level.as_deref(), Some("WARN"));
        assert_eq!(line.message, "disk  full");
        assert_eq!(line.pid, None);
        assert_eq!(
            text_of_line(&line),
            b"2026-11-18T11:06:40.123Z clusterd WARN disk  full\n"
        );
    }

    #[test]
    fn lines_in_the_same_millisecond_share_a_stamp_and_the_next_millisecond_gets_its_own() {
        let mut stamp = Stamp::default();
        let at = UNIX_EPOCH + Duration::from_millis(1_795_000_000_123);
        assert_eq!(stamp.at(at), "2026-11-18T11:06:40.123Z");
        // 0.9 ms later: the same millisecond, the same text (not made again).
        let same = at + Duration::from_micros(900);
        let before = stamp.text.as_ptr();
        assert_eq!(stamp.at(same), "2026-11-18T11:06:40.123Z");
        assert_eq!(stamp.text.as_ptr(), before);
        // The millisecond turns: the new time.
        assert_eq!(
            stamp.at(at + Duration::from_millis(1)),
            "2026-11-18T11:06:40.124Z"
        );
        assert_eq!(
            stamp.at(at + Duration::from_secs(1)),
            "2026-11-18T11:06:41.123Z"
        );
        // Back in time (a clock step) is a change too.
        assert_eq!(stamp.at(at), "2026-11-18T11:06:40.123Z");
    }

    #[test]
    fn a_line_format_writes_each_line_of_a_batch_with_its_prefix_and_time() {
        let web = Source::worker("web", 0, 1);
        let mut format = LineFormat::new(Style::Timed, "web", Some(0), LogStream::Stderr);
        let mut out = Vec::new();
        let first = record(web.clone(), LogStream::Stderr, b"one");
        let mut second = record(web, LogStream::Stderr, b"two");
        format.write(&first, &mut out);
        second.time += Duration::from_millis(5);
        format.write(&second, &mut out);
        assert_eq!(
            out,
            b"2026-11-18T11:06:40.123Z web[0]! one\n2026-11-18T11:06:40.128Z web[0]! two\n"
        );
    }

    #[test]
    fn the_borrowed_json_line_is_the_protocol_line() {
        let web = Source::worker("web", 1, 3);
        web.set_pid(4242);
        for message in [
            b"plain".as_slice(),
            "h\u{e9}llo \"q\" \\ \t".as_bytes(),
            b"\x00\xff binary",
        ] {
            let record = record(web.clone(), LogStream::Stdout, message);
            let mut out = Vec::new();
            LineFormat::new(Style::Json, "web", Some(1), LogStream::Stdout)
                .write(&record, &mut out);
            assert_eq!(out, json(&record));
        }
    }

    #[test]
    fn an_event_line_carries_the_worker_and_the_event_fields() {
        let mut event = record(Source::events(), LogStream::Log, b"INFO web[1] started");
        let fields = serde_json::json!({
            "event": "started", "app": "web", "slot": 1, "pid": 4242, "generation": 3,
            "command": "node app.js", "message": "not this one",
        });
        let serde_json::Value::Object(fields) = fields else {
            unreachable!()
        };
        event.fields = Some(Box::new(fields));
        let parsed = log_line(&event);
        assert_eq!(parsed.app, "web");
        assert_eq!(parsed.slot, Some(1));
        assert_eq!(parsed.pid, Some(4242));
        assert_eq!(parsed.generation, Some(3));
        assert_eq!(parsed.level.as_deref(), Some("INFO"));
        assert_eq!(parsed.message, "web[1] started");
        assert_eq!(parsed.fields["event"], "started");
        assert_eq!(parsed.fields["command"], "node app.js");
        assert!(!parsed.fields.contains_key("message"));
        // As text it is still clusterd's line.
        assert_eq!(
            text_of_line(&parsed),
            b"2026-11-18T11:06:40.123Z clusterd INFO web[1] started\n"
        );
        assert_eq!(
            line(&event, Style::Console { ansi: false }),
            b"2026-11-18T11:06:40.123Z  INFO web[1] started\n"
        );
    }
}
