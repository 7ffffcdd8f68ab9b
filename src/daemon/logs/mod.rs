//! Where output goes: workers' lines and clusterd's own events, to clusterd's stdout/stderr or
//! to log files, in text or JSON, and into the memory `clusterd logs` reads.
//!
//! All of it is one value, [`Logs`], that boot builds from the manifest and hands to the
//! driver (a cheap handle: the driver passes clones to what needs one — the forwarders, the
//! control server, the `tracing` subscriber of clusterd's own lines); dropping or closing it
//! writes what is queued (a bounded wait) and ends the writer threads. Nothing is global.
//!
//! Every line takes the same path: [`pipes`] reads it from a worker's pipe in batches (or
//! [`Logs::event`] and the `tracing` [`layer`] get it from clusterd), the [`Hub`] keeps it
//! and hands it to followers ([`ring`]), it is formatted ([`format`]) for its destination,
//! and a writer thread writes it ([`pipes`]' byte-bounded queues: backpressure on the worker
//! while the writer keeps up, drop and count when a write blocks for a second; a failed write
//! is dropped and counted too). The event loop never writes, opens or renames a file: each
//! log file has a writer thread ([`file::LogFile`]), which opens it on its first line,
//! rotates it by size and reopens it on SIGUSR1.
//!
//! Destinations (manifest `log`, per app with a `[supervisor]` default): `"stdout"`, a
//! directory (`<dir>/<app>.log`, and `<dir>/clusterd.log` for the events), or a file. When
//! nothing is written, the default is stdout, or the run directory's `clusterd.log` for a
//! detached supervisor. Several apps may share a file; its rotation settings are those of
//! the first configuration that named it (`[supervisor]` first).

pub mod event;
mod file;
pub mod format;
pub mod layer;
pub mod pipes;
pub mod ring;

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clusterd_manifest::{LogConfig, LogFormat, LogTarget};
use clusterd_proto::LogStream;

pub use ring::{Filter, Hub};

use self::format::{LineFormat, Style};
use self::pipes::{Batch, Sink};

/// Lines kept in memory per app for `clusterd logs`.
const RING_LINES: usize = 2000;
/// Bytes kept in memory per app.
const RING_BYTES: usize = 1 << 20;
/// How long closing [`Logs`] waits for what is queued to be written.
const CLOSE_FLUSH: Duration = Duration::from_millis(1500);
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
        Arc::new(Source {
            app,
            slot,
            generation,
            pid: AtomicU32::new(pid.unwrap_or(0)),
        })
    }

    /// clusterd's events (the [`Hub`] keeps one).
    pub fn events() -> Arc<Self> {
        Arc::new(Source {
            app: EVENTS.to_owned(),
            slot: None,
            generation: None,
            pid: AtomicU32::new(0),
        })
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

/// Where a source's lines are written, and how.
#[derive(Clone)]
pub struct Destination {
    /// The writer of stdout lines: clusterd's stdout, or a log file.
    stdout: Arc<Sink>,
    /// The writer of stderr lines and events: clusterd's stderr, or the same log file.
    stderr: Arc<Sink>,
    style: Style,
}

impl Destination {
    /// The writer of `stream`'s lines.
    fn sink(&self, stream: LogStream) -> &Arc<Sink> {
        match stream {
            LogStream::Stdout => &self.stdout,
            LogStream::Stderr | LogStream::Log => &self.stderr,
        }
    }
}

/// Why a log destination cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A configured file cannot be opened or created.
    #[error("cannot open log file {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        cause: io::Error,
    },
    /// A writer thread cannot be started.
    #[error("cannot start the writer of {what}")]
    Writer {
        /// clusterd's stdout, stderr, or a file.
        what: String,
        /// What failed.
        #[source]
        cause: io::Error,
    },
}

/// A supervisor's output: its writers, its memory of recent lines and what was decided at
/// start. A handle: clones share it.
#[derive(Clone)]
pub struct Logs(Arc<Inner>);

struct Inner {
    hub: Hub,
    writers: Writers,
    /// Where a `log` nobody wrote goes: stdout, or the detached supervisor's file.
    default: LogTarget,
    /// Where clusterd's events go.
    events: Destination,
    /// The most detailed level of clusterd's events that is written.
    level: tracing::Level,
}

/// The writer threads: clusterd's stdout and stderr, and one per log file.
struct Writers {
    stdout: Arc<Sink>,
    stderr: Arc<Sink>,
    /// The writers of the log files, by path (started on first use).
    files: Mutex<HashMap<PathBuf, Arc<Sink>>>,
    /// Every writer thread, joined when closing.
    threads: Mutex<Vec<(Arc<Sink>, JoinHandle<()>)>>,
}

/// The level of clusterd's own lines: `CLUSTERD_LOG` (`debug`, `info`, `warn`...), else info.
pub fn max_level() -> tracing::Level {
    std::env::var("CLUSTERD_LOG")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(tracing::Level::INFO)
}

impl Logs {
    /// Starts the writers of clusterd's stdout and stderr, decides the default destination
    /// (`detached`: the run directory's `clusterd.log`) and where clusterd's events go, and
    /// checks at once that every configured file can be opened (creating directories), so
    /// that a typo fails `start` instead of losing lines.
    pub fn new(
        supervisor: &LogConfig,
        apps: &[(&str, &LogConfig)],
        detached: Option<&Path>,
    ) -> Result<Self, LogError> {
        let default = match detached {
            Some(file) => LogTarget::File(file.to_path_buf()),
            None => LogTarget::Stdout,
        };
        let check = |config: &LogConfig, name: &str| -> Result<(), LogError> {
            let target = config.target.as_ref().unwrap_or(&default);
            if let Some(path) = file_of(target, name) {
                check_writable(&path)?;
            }
            Ok(())
        };
        check(supervisor, EVENTS)?;
        for (name, config) in apps {
            check(config, name)?;
        }
        let writers = Writers::start()?;
        let events = match writers.resolve(supervisor, EVENTS, &default) {
            // On a terminal (or journald), as `tracing` always showed them.
            Destination {
                style: Style::Bare, ..
            } => Destination {
                stdout: writers.stderr.clone(),
                stderr: writers.stderr.clone(),
                style: Style::Console {
                    ansi: std::io::IsTerminal::is_terminal(&std::io::stderr()),
                },
            },
            other => other,
        };
        Ok(Logs(Arc::new(Inner {
            hub: Hub::new(ring::Bounds {
                lines: RING_LINES,
                bytes: RING_BYTES,
            }),
            writers,
            default,
            events,
            level: max_level(),
        })))
    }

    /// The memory of recent lines.
    pub fn hub(&self) -> &Hub {
        &self.0.hub
    }

    /// The destination of an app's lines.
    pub fn destination(&self, config: &LogConfig, app: &str) -> Destination {
        self.0.writers.resolve(config, app, &self.0.default)
    }

    /// The forwarder of a worker's `stream` to `destination`.
    pub fn forwarder(
        &self,
        source: Arc<Source>,
        stream: LogStream,
        destination: &Destination,
    ) -> Forwarder {
        Forwarder {
            logs: self.clone(),
            format: LineFormat::new(destination.style, &source.app, source.slot, stream),
            sink: destination.sink(stream).clone(),
            source,
            stream,
        }
    }

    /// Logs one of clusterd's typed events: kept with its fields (`event`, `app`, `slot`,
    /// `pid`, `generation` and its own) and written to the events' destination — as JSON
    /// with those fields, or as text with today's wording.
    pub fn event(&self, notice: &clusterd_core::Notice) {
        use clusterd_core::Level;
        let level = match notice.level {
            Level::Error => tracing::Level::ERROR,
            Level::Warn => tracing::Level::WARN,
            Level::Info => tracing::Level::INFO,
            Level::Debug => tracing::Level::DEBUG,
        };
        if level > self.0.level {
            return;
        }
        let message = format!(
            "{} {}",
            event::level_name(notice.level),
            event::text(notice)
        );
        self.log(message.as_bytes(), event::all_fields(notice));
    }

    /// Keeps one of clusterd's lines (`message` with its level first) with its fields and
    /// writes it to the events' destination. The log never waits: a full queue drops it.
    fn log(&self, message: &[u8], fields: serde_json::Map<String, serde_json::Value>) {
        let record = self.0.hub.publish_event(message, fields);
        let events = &self.0.events;
        let bytes = format::line(&record, events.style);
        events
            .sink(LogStream::Log)
            .push_or_drop(Batch { bytes, lines: 1 });
    }

    /// A `tracing` subscriber for clusterd's own lines that logs them here (at the level of
    /// [`max_level`]); the supervisor's thread installs it for as long as it runs.
    pub fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + 'static {
        use tracing_subscriber::Layer;
        use tracing_subscriber::layer::SubscriberExt;
        let filter = tracing_subscriber::filter::LevelFilter::from_level(self.0.level);
        tracing_subscriber::registry()
            .with(layer::EventLayer::new(self.clone()).with_filter(filter))
    }

    /// SIGUSR1: every log file is closed and opened again (after an external logrotate moved it).
    pub fn reopen_files(&self) {
        let files = self
            .0
            .writers
            .files
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for sink in files.values() {
            sink.reopen();
        }
    }

    /// Installs the SIGUSR1 handler (at once: SIGUSR1 kills by default) and a task that
    /// reopens the log files on each one. Must run inside a `LocalSet`.
    pub fn listen_for_reopen(&self) -> io::Result<()> {
        let mut usr1 =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
        let logs = self.clone();
        tokio::task::spawn_local(async move {
            while usr1.recv().await.is_some() {
                logs.reopen_files();
                tracing::info!(event = "logs_reopened", "SIGUSR1: log files reopened");
            }
        });
        Ok(())
    }

    /// Waits (at most `bound`) until every writer has written what is queued (before an
    /// upgrade's exec).
    pub fn flush(&self, bound: Duration) {
        let deadline = Instant::now() + bound;
        for sink in self.0.writers.sinks() {
            sink.flush(deadline);
        }
    }

    /// Lines dropped so far because clusterd's stdout, stderr or a log file was not written
    /// (not read, blocked, or failing).
    pub fn dropped_lines(&self) -> u64 {
        let writers = &self.0.writers;
        let files = writers.files.lock().unwrap_or_else(|e| e.into_inner());
        [&writers.stdout, &writers.stderr]
            .into_iter()
            .chain(files.values())
            .map(|sink| sink.dropped())
            .sum()
    }

    /// Writes what is queued (waiting at most [`CLOSE_FLUSH`]) and ends the writer threads;
    /// lines logged afterwards are dropped and counted. Dropping the last handle does it too.
    pub fn close(&self) {
        self.0.writers.close();
    }
}

impl Writers {
    /// Starts the writers of clusterd's stdout and stderr.
    fn start() -> Result<Self, LogError> {
        let mut threads = Vec::new();
        let mut start = |fd, name: &str| -> Result<Arc<Sink>, LogError> {
            let (sink, thread) =
                pipes::spawn_writer(name, pipes::RawWriter(fd)).map_err(|cause| {
                    LogError::Writer {
                        what: name.to_owned(),
                        cause,
                    }
                })?;
            threads.push((sink.clone(), thread));
            Ok(sink)
        };
        let stdout = start(1, "clusterd-stdout")?;
        let stderr = start(2, "clusterd-stderr")?;
        Ok(Writers {
            stdout,
            stderr,
            files: Mutex::default(),
            threads: Mutex::new(threads),
        })
    }

    /// Where `name`'s lines go under `config` (`default` where it names no target).
    fn resolve(&self, config: &LogConfig, name: &str, default: &LogTarget) -> Destination {
        let target = config.target.as_ref().unwrap_or(default);
        let std = |style| Destination {
            stdout: self.stdout.clone(),
            stderr: self.stderr.clone(),
            style,
        };
        let (Some(path), format) = (file_of(target, name), config.format) else {
            return std(match config.format {
                LogFormat::Text => Style::Bare,
                LogFormat::Json => Style::Json,
            });
        };
        match self.file_sink(&path, config) {
            Ok(sink) => Destination {
                stdout: sink.clone(),
                stderr: sink,
                style: match format {
                    LogFormat::Text => Style::Timed,
                    LogFormat::Json => Style::Json,
                },
            },
            Err(error) => {
                tracing::error!(
                    "cannot start the writer of log file {}: {error}; writing to stdout",
                    path.display()
                );
                std(match format {
                    LogFormat::Text => Style::Bare,
                    LogFormat::Json => Style::Json,
                })
            }
        }
    }

    /// The writer of the file at `path`, started on first use.
    fn file_sink(&self, path: &Path, config: &LogConfig) -> io::Result<Arc<Sink>> {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sink) = files.get(path) {
            return Ok(sink.clone());
        }
        let target = file::LogFile::new(path.to_path_buf(), config.max_size, config.keep);
        let (sink, thread) = pipes::spawn_writer("clusterd-logfile", target)?;
        files.insert(path.to_path_buf(), sink.clone());
        self.threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((sink.clone(), thread));
        Ok(sink)
    }

    fn sinks(&self) -> Vec<Arc<Sink>> {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        threads.iter().map(|(sink, _)| sink.clone()).collect()
    }

    /// Writes what is queued, within [`CLOSE_FLUSH`], and ends the threads.
    fn close(&self) {
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        let deadline = Instant::now() + CLOSE_FLUSH;
        for (sink, _) in &threads {
            sink.flush(deadline);
        }
        for (sink, thread) in threads {
            // A writer still blocked in a write (nobody reads) is left behind, not waited for.
            if sink.stop() {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        self.close();
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
    let error = |cause| LogError::Open {
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

/// One worker stream on its way: kept, formatted, written.
pub struct Forwarder {
    logs: Logs,
    source: Arc<Source>,
    stream: LogStream,
    format: LineFormat,
    sink: Arc<Sink>,
}

impl pipes::Lines for Forwarder {
    fn record(&mut self, lines: &[&[u8]]) -> Batch {
        let size: usize = lines.iter().map(|l| l.len()).sum();
        let mut batch = Batch {
            bytes: Vec::with_capacity(size + lines.len() * 48),
            lines: lines.len() as u64,
        };
        let format = &mut self.format;
        self.logs
            .0
            .hub
            .publish_lines(&self.source, self.stream, lines.iter().copied(), |record| {
                format.write(record, &mut batch.bytes)
            });
        batch
    }

    async fn push(&self, batch: Batch) {
        self.sink.push_waiting(batch).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clusterd_s_own_lines_are_kept_with_their_fields_and_written_before_close_returns() {
        let dir = tempfile::tempdir().unwrap();
        let config = |format| LogConfig {
            target: Some(LogTarget::Dir(dir.path().to_path_buf())),
            format,
            max_size: None,
            keep: 1,
        };
        let logs = Logs::new(&config(LogFormat::Json), &[], None).unwrap();
        tracing::subscriber::with_default(logs.subscriber(), || {
            tracing::warn!(
                event = "cgroup_join_failed",
                app = "web",
                slot = 1u64,
                "cannot join"
            );
            tracing::debug!("below the level: not kept");
        });
        let kept = logs.hub().tail(&Filter::default(), 10);
        assert_eq!(kept.len(), 1);
        assert_eq!(
            &*kept[0].message,
            b"WARN cannot join event=cgroup_join_failed app=web slot=1"
        );
        logs.close();
        let written = std::fs::read_to_string(dir.path().join("clusterd.log")).unwrap();
        let line: serde_json::Value = serde_json::from_str(written.trim()).unwrap();
        assert_eq!(line["event"], "cgroup_join_failed");
        assert_eq!(line["app"], "web");
        assert_eq!(line["slot"], 1);
        assert_eq!(line["level"], "WARN");
        // Closed: what comes later is counted, not written.
        logs.log(b"INFO late", Default::default());
        assert_eq!(logs.dropped_lines(), 1);
        // A second value is independent of the first.
        let text = Logs::new(&config(LogFormat::Text), &[], None).unwrap();
        assert_eq!(text.hub().tail(&Filter::default(), 10).len(), 0);
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
