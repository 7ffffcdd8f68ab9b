//! The two line formats, shared by log files, clusterd's stdout and `clusterd logs`.
//!
//! - **text**: `2026-11-21T10:00:00.123Z web[0] message` for a worker's stdout,
//!   `... web[0]! message` for its stderr, `... clusterd INFO message` for clusterd's events.
//!   The message's bytes are written as they are. On clusterd's stdout (`log = "stdout"`)
//!   there is no time (journald and docker add their own): `web[0] message`, as always.
//! - **json**: one [`LogLine`] object per line. A message that is not UTF-8 is base64 with
//!   `"base64": true`, so that nothing is lost or replaced.

use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use clusterd_proto::{LogLine, LogStream};

use super::ring::Record;

/// RFC 3339, UTC, milliseconds.
pub fn time(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// An event's level and message: `INFO started` → (`INFO`, `started`).
fn split_level(message: &[u8]) -> (Option<&str>, &[u8]) {
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
    LogLine {
        time: time(record.time),
        app: source.app.clone(),
        slot: source.slot,
        pid: source.pid(),
        generation: source.generation,
        stream: record.stream,
        level: level.map(str::to_owned),
        message,
        base64,
    }
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

/// A text line, newline included; `with_time: false` for clusterd's stdout.
pub fn text(record: &Record, with_time: bool) -> Vec<u8> {
    let source = &record.source;
    let time = with_time.then(|| time(record.time));
    let mut out = Vec::with_capacity(record.message.len() + source.app.len() + 40);
    write_text(
        &mut out,
        time.as_deref(),
        &source.app,
        source.slot,
        record.stream,
        &record.message,
    );
    out
}

/// A protocol line as text, as [`text`] writes it to a file.
pub fn text_of_line(line: &LogLine) -> Vec<u8> {
    let mut message = message_bytes(line);
    if let Some(level) = &line.level {
        let mut with_level = format!("{level} ").into_bytes();
        with_level.append(&mut message);
        message = with_level;
    }
    let mut out = Vec::with_capacity(message.len() + 60);
    write_text(
        &mut out,
        Some(&line.time),
        &line.app,
        line.slot,
        line.stream,
        &message,
    );
    out
}

fn write_text(
    out: &mut Vec<u8>,
    time: Option<&str>,
    app: &str,
    slot: Option<usize>,
    stream: LogStream,
    message: &[u8],
) {
    use std::io::Write;
    if let Some(time) = time {
        out.extend_from_slice(time.as_bytes());
        out.push(b' ');
    }
    out.extend_from_slice(app.as_bytes());
    if let Some(slot) = slot {
        let _ = write!(out, "[{slot}]");
    }
    if stream == LogStream::Stderr {
        out.push(b'!');
    }
    out.push(b' ');
    out.extend_from_slice(message);
    out.push(b'\n');
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
        }
    }

    #[test]
    fn text_marks_stderr_and_keeps_bytes() {
        let web = Source::worker("web", 2, 7);
        let out = record(web.clone(), LogStream::Stdout, b"hello");
        assert_eq!(text(&out, true), b"2026-11-18T11:06:40.123Z web[2] hello\n");
        assert_eq!(text(&out, false), b"web[2] hello\n");
        let err = record(web, LogStream::Stderr, b"\xff oops");
        assert_eq!(text(&err, false), b"web[2]! \xff oops\n");
        let event = record(Source::events(), LogStream::Log, b"INFO started");
        assert_eq!(
            text(&event, true),
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
}
