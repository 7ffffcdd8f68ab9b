//! clusterd's control protocol, shared by the supervisor, the `clusterd` CLI and the tests.
//!
//! Framing: one JSON object per line (newline-delimited), at most [`MAX_FRAME`] bytes. Every
//! request carries the protocol version `v` and a command `cmd`; the reply is one or more lines:
//! zero or more [`Reply::Progress`] lines, then exactly one final reply, after which the server
//! closes the connection. A request that is not valid JSON, too long, of another version or of
//! an unknown command gets a [`Reply::Error`] with an [`ErrorKind`] that tells these apart.
//!
//! ```text
//! > {"v":1,"cmd":"status"}
//! < {"reply":"status","pid":4242,...}
//! > {"v":1,"cmd":"reload","app":"web","wait":true}
//! < {"reply":"progress","message":"web[0] pid 5150 (generation 2) ready"}
//! < {"reply":"reloaded","outcomes":[{"app":"web","outcome":"completed","generation":2}]}
//! > {"v":1,"cmd":"logs","app":"web","lines":2,"follow":false}
//! < {"reply":"log","time":"2026-11-21T10:00:00.120Z","app":"web","slot":0,"pid":5150,"generation":1,"stream":"stdout","message":"listening"}
//! < {"reply":"log","time":"2026-11-21T10:00:00.480Z","app":"web","slot":1,"pid":5151,"generation":1,"stream":"stderr","message":"warning: ..."}
//! < {"reply":"done","message":"2 lines"}
//! ```
//!
//! Replies that are not final: [`Reply::Progress`] and [`Reply::Log`] ([`Reply::is_final`]).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod status;

pub use status::*;

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

/// The longest line either side accepts, in bytes (without the newline).
pub const MAX_FRAME: usize = 64 * 1024;

/// A request, as sent on the wire: the version and the command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Protocol version; must be [`VERSION`].
    pub v: u32,
    /// The command.
    #[serde(flatten)]
    pub request: Request,
}

impl Envelope {
    /// Wraps a request in the current version.
    pub fn new(request: Request) -> Self {
        Envelope {
            v: VERSION,
            request,
        }
    }
}

/// The commands, one variant per CLI command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Every app and worker: answered with [`Reply::Status`].
    Status {},
    /// A rolling reload of one app, or all.
    Reload {
        /// The app; all apps when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        app: Option<String>,
        /// Stream progress and answer only when the rollout has ended.
        #[serde(default)]
        wait: bool,
    },
    /// Restart an app's workers one at a time (a rolling reload), or one slot at once.
    Restart {
        /// The app.
        app: String,
        /// One slot: its worker is stopped and replaced.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slot: Option<usize>,
    },
    /// Set an app's number of workers.
    Scale {
        /// The app.
        app: String,
        /// The new number of workers.
        workers: usize,
    },
    /// Send a signal to every worker (process group) of an app.
    Signal {
        /// The app.
        app: String,
        /// The signal, e.g. `SIGHUP`, `HUP` or `1`.
        signal: String,
    },
    /// Graceful shutdown of the supervisor.
    Stop {},
    /// The last lines of output kept in memory, then (with `follow`) the new ones as they
    /// come: [`Reply::Log`] lines, ended by [`Reply::Done`] (or [`Reply::Error`] for a follower
    /// dropped because it did not keep up).
    Logs {
        /// Only this app's lines; every app's (and clusterd's own events) when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        app: Option<String>,
        /// Only this slot's lines (with `app`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slot: Option<usize>,
        /// How many of the last lines, per app.
        #[serde(default = "default_log_lines")]
        lines: usize,
        /// Keep the connection and send new lines as they come.
        #[serde(default)]
        follow: bool,
    },
    /// Replace the supervisor in place with a clusterd binary (same pid, workers kept),
    /// after checking that the binary can read its state. Answered with [`Reply::Done`] just
    /// before the exec, or [`Reply::Error`] (nothing changed).
    Upgrade {
        /// The new binary, absolute; the one the supervisor was started from when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        binary: Option<String>,
    },
    /// Deliver a message on the channel (`ipc`) of one worker or every worker of an app.
    Send {
        /// The app.
        app: String,
        /// One slot's worker; every worker of the app when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slot: Option<usize>,
        /// The message: any JSON value (a worker reads it as one line).
        message: serde_json::Value,
    },
}

fn default_log_lines() -> usize {
    10
}

/// A reply line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Reply {
    /// The answer to [`Request::Status`].
    Status(Box<Status>),
    /// A step of a long-running command (`reload --wait`).
    Progress {
        /// What happened.
        message: String,
    },
    /// The end of `reload --wait`: how each app's rollout ended.
    Reloaded {
        /// One entry per app reloaded.
        outcomes: Vec<AppReload>,
    },
    /// The command was carried out (or started, for commands that do not wait).
    Done {
        /// What was done.
        message: String,
    },
    /// The request was refused.
    Error {
        /// Which kind of problem.
        kind: ErrorKind,
        /// A message for people.
        message: String,
    },
    /// One line of output (`logs`); more follow.
    Log(Box<LogLine>),
}

impl Reply {
    /// An error reply.
    pub fn error(kind: ErrorKind, message: &str) -> Reply {
        Reply::Error {
            kind,
            message: message.to_owned(),
        }
    }

    /// Whether this is the last reply of a request (everything but progress and log lines).
    pub fn is_final(&self) -> bool {
        !matches!(self, Reply::Progress { .. } | Reply::Log(_))
    }
}

/// One line of a worker's output, or one of clusterd's own events: a `logs` reply and, as it
/// is, a line of a `log_format = "json"` file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// When clusterd read it: RFC 3339, UTC, milliseconds (`2026-11-21T10:00:00.123Z`).
    pub time: String,
    /// The app, or `clusterd` for clusterd's own events.
    pub app: String,
    /// The worker's slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<usize>,
    /// The worker's pid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The worker's generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// Which stream.
    pub stream: LogStream,
    /// An event's level (`INFO`, `WARN`...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// The line, without its newline. When the bytes are not UTF-8, they are base64
    /// (standard alphabet, padded) and `base64` is true: nothing is lost or replaced.
    pub message: String,
    /// `message` is base64.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub base64: bool,
    /// For one of clusterd's events, its name (`event`) and its own fields; then `app`,
    /// `slot`, `pid` and `generation` above are those of the worker it is about.
    #[serde(flatten)]
    pub fields: serde_json::Map<String, serde_json::Value>,
}

/// Where a [`LogLine`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogStream {
    /// The worker's stdout.
    Stdout,
    /// The worker's stderr.
    Stderr,
    /// clusterd's own event log.
    Log,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// Not a JSON object, or not a complete line.
    Malformed,
    /// Longer than [`MAX_FRAME`].
    TooLarge,
    /// A `v` this server does not speak.
    Version,
    /// A `cmd` this server does not know (perhaps from a newer client).
    UnknownCommand,
    /// A known command with bad arguments (unknown app, bad signal ...).
    BadRequest,
    /// The client did not send a full request in time.
    Timeout,
    /// The peer's uid may not use this socket.
    Forbidden,
    /// A `logs --follow` client that fell too far behind was dropped.
    TooSlow,
    /// The server has as many connections open as it serves at once; try again.
    Busy,
}

/// Why a line could not be read as a request.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct DecodeError {
    /// The error kind to reply with.
    pub kind: ErrorKind,
    /// What was wrong.
    pub message: String,
}

/// Decodes one request line, telling garbage, other versions and unknown commands apart.
pub fn decode_request(line: &[u8]) -> Result<Request, DecodeError> {
    if line.len() > MAX_FRAME {
        return Err(DecodeError {
            kind: ErrorKind::TooLarge,
            message: format!("request longer than {MAX_FRAME} bytes"),
        });
    }
    let value: serde_json::Value = serde_json::from_slice(line).map_err(|e| DecodeError {
        kind: ErrorKind::Malformed,
        message: format!("not a JSON request: {e}"),
    })?;
    let serde_json::Value::Object(mut object) = value else {
        return Err(DecodeError {
            kind: ErrorKind::Malformed,
            message: "a request is a JSON object".into(),
        });
    };
    match object.get("v").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(VERSION) => {}
        Some(v) => {
            return Err(DecodeError {
                kind: ErrorKind::Version,
                message: format!(
                    "protocol version {v} is not supported (this supervisor speaks {VERSION})"
                ),
            });
        }
        None => {
            return Err(DecodeError {
                kind: ErrorKind::Malformed,
                message: "missing protocol version \"v\"".into(),
            });
        }
    }
    let Some(cmd) = object
        .get("cmd")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
    else {
        return Err(DecodeError {
            kind: ErrorKind::Malformed,
            message: "missing command \"cmd\"".into(),
        });
    };
    const KNOWN: &[&str] = &[
        "status", "reload", "restart", "scale", "signal", "stop", "logs", "upgrade", "send",
    ];
    if !KNOWN.contains(&cmd.as_str()) {
        return Err(DecodeError {
            kind: ErrorKind::UnknownCommand,
            message: format!("unknown command {cmd:?}"),
        });
    }
    // The version is checked; the rest must be exactly one command's fields.
    object.remove("v");
    serde_json::from_value::<Request>(serde_json::Value::Object(object)).map_err(|e| DecodeError {
        kind: ErrorKind::BadRequest,
        message: format!("bad {cmd} request: {e}"),
    })
}

/// Encodes a value as one line, newline included.
pub fn encode_line<T: Serialize>(value: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(value).expect("protocol types always serialize");
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let requests = [
            Request::Status {},
            Request::Reload {
                app: Some("web".into()),
                wait: true,
            },
            Request::Reload {
                app: None,
                wait: false,
            },
            Request::Restart {
                app: "web".into(),
                slot: Some(2),
            },
            Request::Scale {
                app: "web".into(),
                workers: 3,
            },
            Request::Signal {
                app: "web".into(),
                signal: "HUP".into(),
            },
            Request::Stop {},
            Request::Logs {
                app: Some("web".into()),
                slot: Some(1),
                lines: 5,
                follow: true,
            },
            Request::Logs {
                app: None,
                slot: None,
                lines: 10,
                follow: false,
            },
            Request::Upgrade {
                binary: Some("/usr/local/bin/clusterd".into()),
            },
            Request::Send {
                app: "web".into(),
                slot: None,
                message: serde_json::json!({"hello": 1}),
            },
            Request::Send {
                app: "web".into(),
                slot: Some(1),
                message: serde_json::json!("ready"),
            },
        ];
        for request in requests {
            let line = encode_line(&Envelope::new(request.clone()));
            assert_eq!(
                decode_request(line.trim_ascii_end()).expect("decode"),
                request
            );
        }
        assert_eq!(
            String::from_utf8(encode_line(&Envelope::new(Request::Status {}))).unwrap(),
            "{\"v\":1,\"cmd\":\"status\"}\n"
        );
    }

    #[test]
    fn log_lines_are_flat_replies_and_not_final() {
        let reply = Reply::Log(Box::new(LogLine {
            time: "2026-11-21T10:00:00.123Z".into(),
            app: "web".into(),
            slot: Some(0),
            pid: Some(42),
            generation: Some(1),
            stream: LogStream::Stderr,
            level: None,
            message: "hello".into(),
            base64: false,
            fields: Default::default(),
        }));
        let line = String::from_utf8(encode_line(&reply)).unwrap();
        assert_eq!(
            line,
            "{\"reply\":\"log\",\"time\":\"2026-11-21T10:00:00.123Z\",\"app\":\"web\",\"slot\":0,\
             \"pid\":42,\"generation\":1,\"stream\":\"stderr\",\"message\":\"hello\"}\n"
        );
        assert_eq!(serde_json::from_str::<Reply>(&line).unwrap(), reply);
        assert!(!reply.is_final());
        // An event's own fields travel flat beside the others.
        let event = "{\"reply\":\"log\",\"time\":\"2026-11-21T10:00:00.123Z\",\"app\":\"web\",\
                     \"slot\":0,\"stream\":\"log\",\"level\":\"INFO\",\"message\":\"web[0] started\",\
                     \"event\":\"started\",\"command\":\"node app.js\"}\n";
        let Reply::Log(parsed) = serde_json::from_str::<Reply>(event).unwrap() else {
            panic!("a log line");
        };
        assert_eq!(parsed.fields["event"], "started");
        assert_eq!(parsed.fields["command"], "node app.js");
        assert_eq!(parsed.fields.len(), 2);
        let again = encode_line(&Reply::Log(parsed.clone()));
        assert_eq!(
            serde_json::from_slice::<Reply>(&again).unwrap(),
            Reply::Log(parsed)
        );
        assert!(
            Reply::Done {
                message: String::new()
            }
            .is_final()
        );
        // Omitted fields take their defaults.
        assert_eq!(
            decode_request(b"{\"v\":1,\"cmd\":\"logs\"}").unwrap(),
            Request::Logs {
                app: None,
                slot: None,
                lines: 10,
                follow: false
            }
        );
    }

    #[test]
    fn bad_requests_are_told_apart() {
        let kind = |line: &str| decode_request(line.as_bytes()).unwrap_err().kind;
        assert_eq!(kind("garbage"), ErrorKind::Malformed);
        assert_eq!(kind("[1,2]"), ErrorKind::Malformed);
        assert_eq!(kind("{\"cmd\":\"status\"}"), ErrorKind::Malformed);
        assert_eq!(kind("{\"v\":1,\"cmd\":\"status\""), ErrorKind::Malformed);
        assert_eq!(kind("{\"v\":99,\"cmd\":\"status\"}"), ErrorKind::Version);
        assert_eq!(
            kind("{\"v\":1,\"cmd\":\"teleport\"}"),
            ErrorKind::UnknownCommand
        );
        assert_eq!(
            kind("{\"v\":1,\"cmd\":\"scale\",\"app\":\"web\"}"),
            ErrorKind::BadRequest
        );
        assert_eq!(
            kind("{\"v\":1,\"cmd\":\"status\",\"extra\":1}"),
            ErrorKind::BadRequest
        );
        let long = format!(
            "{{\"v\":1,\"cmd\":\"status\",\"x\":\"{}\"}}",
            "a".repeat(MAX_FRAME)
        );
        assert_eq!(kind(&long), ErrorKind::TooLarge);
    }
}
