//! Where output goes: workers' lines and clusterd's own events, to clusterd's stdout/stderr or
//! to log files, in text or JSON, and into the memory `clusterd logs` reads.
//!
//! Every line takes the same path: [`pipes`] reads it from a worker's pipe (or
//! [`EventWriter`] gets it from the log), the [`Hub`] keeps it and hands it to followers
//! ([`ring`]), it is formatted ([`format`]) for its destination, and a writer thread writes it
//! ([`pipes`]' byte-bounded queues: backpressure on the worker while the writer keeps up,
//! drop and count when a write blocks for a second; a failed write is dropped and counted
//! too). The event loop never writes, opens or renames a file: each log file has a writer
//! thread ([`file::LogFile`]), which opens it on its first line, rotates it by size and reopens
//! it on SIGUSR1.
//!
//! Destinations (manifest `log`, per app with a `[supervisor]` default): `"stdout"`, a
//! directory (`<dir>/<app>.log`, and `<dir>/clusterd.log` for the events), or a file. When
//! nothing is written, the default is stdout, or the run directory's `clusterd.log` for a
//! detached supervisor. Several apps may share a file; its rotation settings are those of
//! the first configuration that named it (`[supervisor]` first).

pub mod event;
mod file;
pub mod format;
pub mod pipes;
pub mod ring;

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use clusterd_manifest::{LogConfig, LogFormat, LogTarget};
use clusterd_proto::LogStream;

pub use ring::{Filter, Hub, Record};

use self::pipes::{Push, Sink};

/// Lines kept in memory per app for `clusterd logs`.
const RING_LINES: usize = 2000;
/// Bytes kept in memory per app.
const RING_BYTES: usize = 1 << 20;
/// The name of clusterd's own events (as an app name in `clusterd logs`, and the file name
/// in a log directory).
pub const EVENTS: &str = "clusterd";

/// Who wrote a line: a worker (app, slot, generation and, once spawned, pid), or clusterd.
#[derive(Debug)]
pub struct Source {
    /// The app, or [`EVENTS`].
    pub app: String,
    /// The worker's slot.
    pub slot: Option<usize>,
    /// The worker's generation.
    pub generation: Option<u64>,
    /// The worker's pid; 0 until it is known.
    pid: AtomicU32,
}

impl Source {
    /// A worker's source; its pid comes with [`Source::set_pid`].
    pub fn worker(app: &str, slot: usize, generation: u64) -> Arc<Self> {
        Arc::new(Source {
            app: app.to_owned(),
            slot: Some(slot),
            generation: Some(generation),
            pid: AtomicU32::new(0),
        })
    }

    /// The source of a line a previous clusterd handed over.
    pub fn restored(
        app: String,
        slot: Option<usize>,
        generation: Option<u64>,
        pid: Option<u32>,
    ) -> Arc<Self> {
        if app == EVENTS && slot.is_none() {
            return Source::events();
        }
        Arc::new(Source {
            app,
            slot,
            generation,
            pid: AtomicU32::new(pid.unwrap_or(0)),
        })
    }

    /// clusterd's events.
    pub fn events() -> Arc<Self> {
        static EVENTS_SOURCE: OnceLock<Arc<Source>> = OnceLock::new();
        EVENTS_SOURCE
            .get_or_init(|| {
                Arc::new(Source {
                    app: EVENTS.to_owned(),
                    slot: None,
                    generation: None,
                    pid: AtomicU32::new(0),
                })
            })
            .clone()
    }

    /// The worker's pid, once spawned.
    pub fn set_pid(&self, pid: u32) {
        self.pid.store(pid, Ordering::Relaxed);
    }

    /// The pid, if known.
    pub fn pid(&self) -> Option<u32> {
        match self.pid.load(Ordering::Relaxed) {
            0 => None,
            pid => Some(pid),
        }
    }
}

/// The supervisor's memory of recent lines.
pub fn hub() -> &'static Hub {
    static HUB: OnceLock<Hub> = OnceLock::new();
    HUB.get_or_init(|| {
        Hub::new(ring::Bounds {
            lines: RING_LINES,
            bytes: RING_BYTES,
        })
    })
}

/// Where a stream's lines are written, and how.
#[derive(Clone, Copy)]
pub enum Destination {
    /// clusterd's stdout (stdout lines) or stderr (stderr lines and events); text without
    /// time, as clusterd always wrote.
    Std(LogFormat),
    /// A log file's writer.
    File(&'static Sink, LogFormat),
}

impl Destination {
    /// Formats `record` for this destination.
    fn format(self, record: &Record) -> Vec<u8> {
        match self {
            Destination::Std(LogFormat::Text) => format::text(record, false),
            Destination::File(_, LogFormat::Text) => format::text(record, true),
            Destination::Std(LogFormat::Json) | Destination::File(_, LogFormat::Json) => {
                format::json(record)
            }
        }
    }

    /// The writer of `stream`'s lines.
    fn sink(self, stream: LogStream) -> &'static Sink {
        match self {
            Destination::Std(_) if stream == LogStream::Stdout => pipes::stdout(),
            Destination::Std(_) => pipes::stderr(),
            Destination::File(sink, _) => sink,
        }
    }
}

/// What is decided once, at start.
struct Settings {
    /// Where a `log` nobody wrote goes: stdout, or the detached supervisor's file.
    default: LogTarget,
    /// Where clusterd's events go.
    events: Destination,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// The writer threads of the log files, by path. They live as long as clusterd.
fn files() -> &'static Mutex<HashMap<PathBuf, &'static Sink>> {
    static FILES: OnceLock<Mutex<HashMap<PathBuf, &'static Sink>>> = OnceLock::new();
    FILES.get_or_init(Default::default)
}

/// Why a log destination cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("cannot open log file {path}")]
pub struct LogError {
    /// The file.
    pub path: PathBuf,
    /// What failed.
    #[source]
    pub cause: io::Error,
}

/// Decides the default destination (`detached`: the run directory's `clusterd.log`) and
/// where clusterd's events go, and checks at once that every configured file can be opened
/// (creating directories), so that a typo fails `start` instead of losing lines. Call once,
/// before the supervisor runs.
pub fn configure(
    supervisor: &LogConfig,
    apps: &[(&str, &LogConfig)],
    detached: Option<&Path>,
) -> Result<(), LogError> {
    let default = match detached {
        Some(file) => LogTarget::File(file.to_path_buf()),
        None => LogTarget::Stdout,
    };
    let settings_default = default.clone();
    let check = |config: &LogConfig, name: &str| -> Result<(), LogError> {
        let target = config.target.as_ref().unwrap_or(&settings_default);
        if let Some(path) = file_of(target, name) {
            check_writable(&path)?;
        }
        Ok(())
    };
    check(supervisor, EVENTS)?;
    for (name, config) in apps {
        check(config, name)?;
    }
    let events = resolve(supervisor, EVENTS, &default);
    let _ = SETTINGS.set(Settings { default, events });
    Ok(())
}

/// The destination of an app's lines.
pub fn destination(config: &LogConfig, app: &str) -> Destination {
    let default = SETTINGS
        .get()
        .map_or(LogTarget::Stdout, |s| s.default.clone());
    resolve(config, app, &default)
}

fn resolve(config: &LogConfig, name: &str, default: &LogTarget) -> Destination {
    let target = config.target.as_ref().unwrap_or(default);
    match file_of(target, name) {
        None => Destination::Std(config.format),
        Some(path) => match file_sink(&path, config) {
            Ok(sink) => Destination::File(sink, config.format),
            Err(error) => {
                tracing::error!(
                    "cannot start the writer of log file {}: {error}; writing to stdout",
                    path.display()
                );
                Destination::Std(config.format)
            }
        },
    }
}

/// The file `name` writes to under `target`.
fn file_of(target: &LogTarget, name: &str) -> Option<PathBuf> {
    match target {
        LogTarget::Stdout => None,
        LogTarget::Dir(dir) => Some(dir.join(format!("{name}.log"))),
        LogTarget::File(file) => Some(file.clone()),
    }
}

fn check_writable(path: &Path) -> Result<(), LogError> {
    let error = |cause| LogError {
        path: path.to_path_buf(),
        cause,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(error)?;
    }
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
        .map(drop)
        .map_err(error)
}

/// The writer of the file at `path`, started on first use.
fn file_sink(path: &Path, config: &LogConfig) -> io::Result<&'static Sink> {
    let mut files = files().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(sink) = files.get(path) {
        return Ok(sink);
    }
    let target = file::LogFile::new(path.to_path_buf(), config.max_size, config.keep);
    let sink = pipes::spawn_writer("clusterd-logfile", target)?;
    files.insert(path.to_path_buf(), sink);
    Ok(sink)
}

/// SIGUSR1: every log file is closed and opened again (after an external logrotate moved it).
pub fn reopen_files() {
    let files = files().lock().unwrap_or_else(|e| e.into_inner());
    for sink in files.values() {
        sink.reopen();
    }
}

/// Installs the SIGUSR1 handler (at once: SIGUSR1 kills by default) and a task that reopens
/// the log files on each one. Must run inside a `LocalSet`.
pub fn listen_for_reopen() -> io::Result<()> {
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
    tokio::task::spawn_local(async move {
        while usr1.recv().await.is_some() {
            reopen_files();
            tracing::info!("SIGUSR1: log files reopened");
        }
    });
    Ok(())
}

/// One worker stream on its way: kept, formatted, written.
pub struct Forwarder {
    source: Arc<Source>,
    stream: LogStream,
    destination: Destination,
}

impl Forwarder {
    /// The forwarder of a worker's `stream`, to `destination`.
    pub fn new(source: Arc<Source>, stream: LogStream, destination: Destination) -> Self {
        Forwarder {
            source,
            stream,
            destination,
        }
    }
}

impl pipes::Lines for Forwarder {
    fn record(&self, message: &[u8]) -> Vec<u8> {
        let record = hub().publish(&self.source, self.stream, message);
        self.destination.format(&record)
    }

    fn push(&self, line: Vec<u8>) -> Push {
        self.destination.sink(self.stream).push(line)
    }
}

/// The log's writer: each event is kept (as app `clusterd`) and written to the events'
/// destination — clusterd's stderr, as formatted by `tracing`, or the supervisor's log file.
/// The log never waits: a full queue drops the line.
#[derive(Clone, Copy, Default)]
pub struct EventWriter;

impl Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let message = strip_ansi(buf.trim_ascii());
        // `tracing` prints the time first; the record has its own.
        let without_time = match message.iter().position(|b| *b == b' ') {
            Some(i) if message[..i].ends_with(b"Z") && message[0].is_ascii_digit() => {
                message[i..].trim_ascii_start()
            }
            _ => &message[..],
        };
        let record = hub().publish(&Source::events(), LogStream::Log, without_time);
        let _ = match SETTINGS.get().map(|s| s.events) {
            Some(destination @ Destination::File(sink, _)) => {
                sink.push(destination.format(&record))
            }
            Some(Destination::Std(LogFormat::Json)) => pipes::stderr().push(format::json(&record)),
            _ => pipes::stderr().push(buf.to_vec()),
        };
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Logs one of clusterd's typed events. Where the events' destination is JSON, the line is
/// built from the event (its `event`, `app`, `slot`, `pid`, `generation` and own fields);
/// as text it takes `tracing`'s path like every other line of clusterd's.
pub fn event(notice: &clusterd_core::Notice) {
    use clusterd_core::Level;
    let enabled = match notice.level {
        Level::Error => tracing::enabled!(tracing::Level::ERROR),
        Level::Warn => tracing::enabled!(tracing::Level::WARN),
        Level::Info => tracing::enabled!(tracing::Level::INFO),
        Level::Debug => tracing::enabled!(tracing::Level::DEBUG),
    };
    if !enabled {
        return;
    }
    let text = event::text(notice);
    let json_sink = match SETTINGS.get().map(|s| s.events) {
        Some(Destination::File(sink, LogFormat::Json)) => Some(sink),
        Some(Destination::Std(LogFormat::Json)) => Some(pipes::stderr()),
        _ => None,
    };
    if let Some(sink) = json_sink {
        let message = format!("{} {text}", event::level_name(notice.level));
        let record = hub().publish(&Source::events(), LogStream::Log, message.as_bytes());
        let _ = sink.push(event::json(notice, &record));
        return;
    }
    match notice.level {
        Level::Error => tracing::error!("{text}"),
        Level::Warn => tracing::warn!("{text}"),
        Level::Info => tracing::info!("{text}"),
        Level::Debug => tracing::debug!("{text}"),
    }
}

/// `text` without ANSI colour sequences (`ESC [ ... m`).
fn strip_ansi(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i] == 0x1b && text.get(i + 1) == Some(&b'[') {
            i += 2;
            while i < text.len() && !text[i].is_ascii_alphabetic() {
                i += 1;
            }
            i += 1;
        } else {
            out.push(text[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ansi_colours_are_stripped() {
        assert_eq!(
            strip_ansi(b"\x1b[32m INFO\x1b[0m started"),
            b" INFO started".to_vec()
        );
    }

    #[test]
    fn targets_name_their_files() {
        let dir = LogTarget::Dir(PathBuf::from("/var/log/app"));
        assert_eq!(
            file_of(&dir, "web"),
            Some(PathBuf::from("/var/log/app/web.log"))
        );
        let file = LogTarget::File(PathBuf::from("/var/log/all.log"));
        assert_eq!(
            file_of(&file, "web"),
            Some(PathBuf::from("/var/log/all.log"))
        );
        assert_eq!(file_of(&LogTarget::Stdout, "web"), None);
    }
}
