//! The validated manifest: what the supervisor runs from. Every value here is resolved
//! (defaults applied, relative paths made absolute against the manifest's directory,
//! `"auto"` turned into a number), so the supervisor never re-interprets raw TOML. Every type
//! is serializable: the supervisor's state, configurations included, crosses `clusterd
//! upgrade` as JSON.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::signal::Signal;

/// Environment variables clusterd sets for each worker itself (or withholds): an app's `env`
/// may not set them, and clusterd's own values never reach a worker.
pub const RESERVED_ENV: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "NODE_CHANNEL_FD",
    "NODE_CHANNEL_SERIALIZATION_MODE",
];

/// Prefix of the variables clusterd sets for each worker (`CLUSTERD_WORKER_ID`, ...), which an
/// app's `env` may not set either.
pub const RESERVED_ENV_PREFIX: &str = "CLUSTERD_";

/// A whole manifest after parsing and validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The manifest file, absolute.
    pub path: PathBuf,
    /// The directory relative paths were resolved against (the manifest's directory).
    pub dir: PathBuf,
    /// `[supervisor]`.
    pub supervisor: SupervisorConfig,
    /// `[sockets.NAME]`, by name.
    pub sockets: BTreeMap<String, SocketConfig>,
    /// `[apps.NAME]`, by name.
    pub apps: BTreeMap<String, AppConfig>,
    /// `[metrics]`, when present.
    pub metrics: Option<MetricsConfig>,
}

/// `[supervisor]`: settings of the clusterd process itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisorConfig {
    /// Default grace period between the stop signal and SIGKILL (`stop_timeout`, default 10s).
    pub stop_timeout: Duration,
    /// Directory for the control socket, pid file and notify socket (`run_dir`); `None` means
    /// the default chosen by the supervisor.
    pub run_dir: Option<PathBuf>,
    /// `log`, `log_format`, `log_max_size`, `log_keep`: where clusterd's own events go, and
    /// the default of every app.
    pub log: LogConfig,
}

/// Where and how output is logged: `log`, `log_format`, `log_max_size`, `log_keep`, in
/// `[supervisor]` (the default) and in `[apps.NAME]` (each unset key inherits the
/// supervisor's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `log`: `None` when neither the app nor `[supervisor]` sets it, which means stdout in the
    /// foreground and the run directory's `clusterd.log` for `clusterd start --detach`.
    pub target: Option<LogTarget>,
    /// `log_format` (default `"text"`).
    pub format: LogFormat,
    /// `log_max_size`: a file reaching this many bytes is rotated (default: never).
    pub max_size: Option<u64>,
    /// `log_keep` (default 5): rotated files kept, `NAME.1` (newest) to `NAME.<keep>`.
    pub keep: usize,
}

/// `log`: where lines go.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum LogTarget {
    /// `"stdout"`: clusterd's stdout (workers' stdout) and stderr (workers' stderr, events).
    Stdout,
    /// A directory (written with a trailing `/`, or an existing directory): one file per
    /// app, `<dir>/<app>.log`, and `<dir>/clusterd.log` for clusterd's events. Absolute.
    Dir(PathBuf),
    /// Any other path: one file. Absolute.
    File(PathBuf),
}

/// `log_format`: how a line is written to a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum LogFormat {
    /// `"text"`: `<RFC 3339 time> app[slot] message` (stderr: `app[slot]!`).
    Text,
    /// `"json"`: one JSON object per line (see the README).
    Json,
}

/// `[sockets.NAME]`: a listening socket clusterd binds once and hands to workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocketConfig {
    /// Where to listen.
    pub listen: Listen,
    /// `backlog` (default 1024).
    pub backlog: u32,
    /// `mode` of a unix socket file, e.g. `"0660"` (default 0o666 minus umask: `None`).
    pub mode: Option<u32>,
    /// `tcp_nodelay` (TCP only, default true, as Node, Go and nginx set it): `TCP_NODELAY` on the
    /// listener, inherited by every accepted connection.
    pub tcp_nodelay: bool,
    /// `keepalive` (TCP only): `false`/absent (off), `true` (on, the kernel's timings) or a
    /// duration (on, idle time before the first probe, `TCP_KEEPIDLE`).
    pub keepalive: Keepalive,
    /// `reuseport` (TCP only, default false): `SO_REUSEPORT` on the listener, so that other
    /// processes of the same user may bind the same address.
    pub reuseport: bool,
}

impl SocketConfig {
    /// `listen` with every default of `[sockets.NAME]`: what clusterd binds on demand for an
    /// intercepted app's `bind()` of an address no socket declares.
    pub fn with_defaults(listen: Listen) -> SocketConfig {
        SocketConfig {
            listen,
            backlog: crate::schema::BACKLOG,
            mode: None,
            tcp_nodelay: true,
            keepalive: Keepalive::Off,
            reuseport: false,
        }
    }
}

/// `keepalive` of a TCP socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum Keepalive {
    /// No `SO_KEEPALIVE`.
    Off,
    /// `SO_KEEPALIVE` with the kernel's timings.
    On,
    /// `SO_KEEPALIVE` with this idle time before the first probe.
    Idle(Duration),
}

/// The address of a listening socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum Listen {
    /// `"host:port"` or `"[v6]:port"`; the host was resolved at validation time.
    Tcp(SocketAddr),
    /// `"unix:/path"`; relative paths are resolved against the manifest's directory.
    Unix(PathBuf),
}

/// `[apps.NAME]`: one group of identical workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// `command`: argv, non-empty. `argv[0]` containing a `/` was made absolute against the
    /// manifest's directory; a bare name is looked up in `PATH` at each spawn.
    pub command: Vec<String>,
    /// `workers`: an integer >= 1, or `"auto"` resolved to the number of CPUs.
    pub workers: usize,
    /// `sockets`: names of `[sockets.*]` entries, passed as fds 3, 4, ... in this order.
    pub sockets: Vec<String>,
    /// `env`: extra environment variables (the supervisor's own environment is inherited).
    pub env: BTreeMap<String, String>,
    /// `cwd`: absolute working directory (default: the manifest's directory).
    pub cwd: PathBuf,
    /// `stop_signal` (default SIGTERM), accepted as `"SIGTERM"`, `"TERM"` or a number.
    #[serde(with = "signal_number")]
    pub stop_signal: Signal,
    /// `stop_timeout` (default: `[supervisor].stop_timeout`).
    pub stop_timeout: Duration,
    /// `restart` (default `always`).
    pub restart: RestartPolicy,
    /// `backoff_initial`, `backoff_max`, `backoff_reset`.
    pub backoff: Backoff,
    /// `ready` and `ready_delay`.
    pub ready: Readiness,
    /// `ready_timeout` (default 30s): a worker not ready by then is killed.
    pub ready_timeout: Duration,
    /// `watchdog`: when set, a worker must send `WATCHDOG=1` at least this often.
    pub watchdog: Option<Duration>,
    /// `[apps.NAME.reload]`.
    pub reload: ReloadConfig,
    /// `max_memory`: a worker whose process group's resident memory exceeds this many bytes is
    /// restarted gracefully (sampled every few seconds while any app sets it).
    pub max_memory: Option<u64>,
    /// `restart_limit = { burst, interval }`: more unexpected exits than `burst` within
    /// `interval` fail the slot until `clusterd restart` (systemd's `StartLimitBurst`).
    pub restart_limit: Option<RestartLimit>,
    /// `intercept`: trap the workers' own `bind()`/`listen()` with seccomp and hand them the
    /// app's held sockets instead, or a socket clusterd binds on the first worker's request
    /// for an address no socket declares (unmodified servers). Default: true for an app with
    /// `workers > 1` and no `sockets` ([`AppConfig::intercept_auto`]), else false.
    pub intercept: bool,
    /// Interception by default (`workers > 1`, no `sockets`, `intercept` not written): what
    /// the app becomes where this kernel can trap calls, which only the supervisor can tell
    /// ([`Manifest::resolve_interception`]). Until then the app is as without interception.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intercept_auto: Option<AutoIntercept>,
    /// `drain` (apps with steered sockets; default 1s for intercepted apps, else off; `"0s"`
    /// turns it off): a retiring worker first stops getting new connections and has this long
    /// to finish what it has before its stop signal (without it, an app that drains itself is
    /// steered out right before its signal).
    pub drain: Option<Duration>,
    /// `balance` (apps with sockets; default `"round-robin"` with `workers` > 1 or `"auto"`,
    /// with `drain` or `intercept`, else `"shared"`): how new connections reach the workers of
    /// its TCP sockets: each worker its own steered socket (`"round-robin"`, `"least-queued"`,
    /// `"random"`, `"ip-hash"`), or one accept queue shared by all (`"shared"`; unix sockets
    /// always are).
    #[serde(default, skip_serializing_if = "Balance::is_default")]
    pub balance: Balance,
    /// `kv_segment`: name prefix of the KV client's shared-memory segment, passed to workers
    /// as `CLUSTERD_KV_SEGMENT`.
    pub kv_segment: Option<String>,
    /// `ipc` (default: true when `command` runs `node`, else false): a message channel per
    /// worker, a unix stream socket of newline-delimited JSON at the fd after the sockets
    /// (`CLUSTERD_IPC_FD`, and `NODE_CHANNEL_FD` so that Node's `process.send` uses it).
    pub ipc: bool,
    /// `ipc_broadcast` (default false; needs `ipc`): each worker's messages are forwarded to
    /// the app's other workers.
    pub ipc_broadcast: bool,
    /// `stop_signal = "disconnect"` (needs `ipc`): a worker is stopped by closing its channel
    /// first; `stop_signal` (then SIGTERM) follows after `stop_timeout`.
    pub stop_disconnect: bool,
    /// `kv_watchdog`: when set, the worker tending the KV map (it says so on the notify
    /// socket, `X_CLUSTERD_KV_TEND=owner`, every round) is restarted after this long without
    /// a word, so that the tend lock moves to another worker.
    pub kv_watchdog: Option<std::time::Duration>,
    /// `log`, `log_format`, `log_max_size`, `log_keep`, with what the app does not set taken
    /// from `[supervisor]`.
    pub log: LogConfig,
    /// `watch`, `watch_ignore`, `watch_delay`: a rolling reload when files change (off unless
    /// `watch` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch: Option<WatchConfig>,
}

/// `watch`: the files whose changes roll an app (PM2's `--watch`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchConfig {
    /// What is watched, absolute (relative paths resolved against the app's `cwd`; `watch =
    /// true` is the `cwd` itself): a directory with everything below it, or one file.
    pub paths: Vec<PathBuf>,
    /// `watch_ignore`: glob patterns of what does not count, besides the defaults
    /// ([`WATCH_IGNORE_DEFAULTS`] and the log files). A pattern without `/` matches any name in
    /// a path below a watched directory (`*.tmp`, `dist`); one with `/` matches a path
    /// relative to the app's `cwd` (`src/generated`), and everything below it.
    pub ignore: Vec<String>,
    /// `watch_delay` (default 500ms): the reload starts once nothing has changed for this
    /// long, so a burst of changes (a `git checkout`) is one reload.
    pub delay: Duration,
}

/// What `watch` ignores in any case: dependencies, version control, clusterd's default run
/// directory, Python's bytecode caches, log files and editors' swap and backup files.
pub const WATCH_IGNORE_DEFAULTS: &[&str] = &[
    "node_modules",
    ".git",
    ".hg",
    ".svn",
    ".clusterd",
    "__pycache__",
    "*.log",
    "*.log.[0-9]*",
    "*.swp",
    "*~",
];

/// `restart_limit`: the give-up rule for a slot that keeps dying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartLimit {
    /// At most this many restarts...
    pub burst: u32,
    /// ...within this long; one more fails the slot.
    pub interval: Duration,
}

/// How an app's TCP sockets spread new connections over its workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum Balance {
    /// Each worker listens on a steered socket of its own; the serving workers take new
    /// connections in turn (where the kernel lets clusterd load an eBPF program: else as
    /// `Random`).
    #[default]
    RoundRobin,
    /// Each worker listens on a steered socket of its own; each connection goes to the serving
    /// worker with the fewest connections waiting to be accepted, ties in turn (where the
    /// kernel lets clusterd attach a lookup program that reads the sockets' queues: else as
    /// `RoundRobin`).
    LeastQueued,
    /// Each worker listens on a steered socket of its own; each connection goes to a serving
    /// worker picked at random.
    Random,
    /// Sticky: a hash of the client's address picks a slot, and the connection goes to that
    /// slot's serving worker (to the other serving workers only while the slot has none).
    IpHash,
    /// One listening socket shared by all workers: whichever worker accepts first.
    Shared,
}

impl Balance {
    /// Its name in a manifest: `round-robin`, `random`, `ip-hash`, `shared`.
    pub fn name(&self) -> &'static str {
        match self {
            Balance::LeastQueued => "least-queued",
            Balance::RoundRobin => "round-robin",
            Balance::Random => "random",
            Balance::IpHash => "ip-hash",
            Balance::Shared => "shared",
        }
    }

    /// `"round-robin"`, the serialized default.
    pub fn is_default(&self) -> bool {
        *self == Balance::RoundRobin
    }

    /// Whether each worker gets a steered socket of its own (not `"shared"`).
    pub fn is_steered(&self) -> bool {
        *self != Balance::Shared
    }
}

/// When a worker that exited is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum RestartPolicy {
    /// Whatever the exit status.
    Always,
    /// Only after a non-zero exit or a death by signal.
    OnFailure,
    /// Never: the slot stays empty.
    Never,
}

/// Exponential backoff between repeated crashes of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    /// `backoff_initial` (default 100ms): the delay after the second crash in a row
    /// (the first crash is replaced at once).
    pub initial: Duration,
    /// `backoff_max` (default 30s): the delay never grows beyond this.
    pub max: Duration,
    /// `backoff_reset` (default 10s): a worker up this long resets the crash streak.
    pub reset_after: Duration,
}

/// The settings of an app intercepted by default, applied once interception is known to work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoIntercept {
    /// Its `drain` (default 1s, as for any intercepted app).
    pub drain: Option<Duration>,
    /// Its `ready` (default: listen, or alive 5s, whichever comes first).
    pub ready: Readiness,
}

impl Manifest {
    /// Applies interception by default ([`AppConfig::intercept_auto`]) where `available`, and
    /// returns the names of the apps it applies to (or, where not available, would have).
    pub fn resolve_interception(&mut self, available: bool) -> Vec<String> {
        let mut names = Vec::new();
        for (name, app) in &mut self.apps {
            let Some(auto) = app.intercept_auto.take() else {
                continue;
            };
            if available {
                app.intercept = true;
                app.drain = auto.drain;
                app.ready = auto.ready;
            }
            names.push(name.clone());
        }
        names
    }
}

/// How the supervisor learns that a new worker is ready to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum Readiness {
    /// `ready = "immediate"` (default for apps without sockets): as soon as it has been spawned.
    Immediate,
    /// `ready = "delay"` with `ready_delay` (default 1s): alive that long (default for apps
    /// with sockets).
    Delay(Duration),
    /// `ready = "notify"`: it sends `READY=1` to `NOTIFY_SOCKET`.
    Notify,
    /// `ready = "listen"` (default for apps with `intercept = true`, and only valid with it):
    /// it calls `listen()` on a socket it was handed in place of its own `bind()`.
    Listen,
    /// `ready = "listen"` with `ready_delay` (default for apps intercepted by default, with
    /// 5s): it listens, or it has been alive that long, whichever comes first (a worker that
    /// never listens, such as a queue consumer, still becomes ready).
    ListenOrDelay(Duration),
    /// `ready = "message"` (needs `ipc`): it sends `"ready"` or `{"type":"ready"}` on its
    /// channel (Node's `process.send('ready')`, PM2's `wait_ready`).
    Message,
}

/// `[apps.NAME.reload]`: how a rolling reload proceeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadConfig {
    /// `surge` (default 1): new workers started ahead of stopping old ones.
    pub surge: usize,
    /// `bake` (default 1s): how long the canary's new workers (the first `surge` slots) must
    /// stay ready before their old ones stop, and how long the last promoted worker must stay
    /// up before the rollout completes.
    pub bake: Duration,
    /// `bake_each` (default false): every new worker bakes before its old one stops, `surge`
    /// slots at a time, instead of the canary alone.
    #[serde(default)]
    pub bake_each: bool,
}

/// `[metrics]`: the optional Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `listen`: a TCP `host:port`.
    pub listen: SocketAddr,
}

/// A signal as its number, for the serialized form of an [`AppConfig`] (the state clusterd
/// hands to its next version across `clusterd upgrade`).
mod signal_number {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::Signal;

    pub fn serialize<S: Serializer>(signal: &Signal, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i32(signal.number())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Signal, D::Error> {
        let number = i32::deserialize(d)?;
        Signal::from_number(number)
            .ok_or_else(|| serde::de::Error::custom(format!("no signal numbered {number}")))
    }
}
