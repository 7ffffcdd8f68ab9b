//! The manifest's schema: walks the spanned document table by table, converts every key,
//! applies the defaults, resolves relative paths, and cross-checks what spans tables (socket
//! references, addresses bound twice). Every problem is collected; a [`Manifest`] comes out
//! only when there is none.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::signal::Signal;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::doc::{Bad, Checker, Field, KeyPath, Table, Value};
use crate::error::Problem;
use crate::listen::{self, Resolver};
use crate::model::*;
use crate::values::{self, NAME_CHARS};

/// Default `[supervisor].stop_timeout`.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `backlog`.
pub(crate) const BACKLOG: u32 = 1024;
/// Default `backoff_initial`.
const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// Default `backoff_max`.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Default `backoff_reset`.
const BACKOFF_RESET: Duration = Duration::from_secs(10);
/// Default `ready_delay`.
const READY_DELAY: Duration = Duration::from_secs(1);
/// How long a worker of an app intercepted by default may run without listening before it
/// counts as ready all the same: a queue consumer never listens, and a server that listens
/// late must not be counted on (its old worker steered out) before it does.
const LISTEN_FALLBACK: Duration = Duration::from_secs(5);
/// Default `drain` of intercepted apps.
const DRAIN: Duration = Duration::from_secs(1);
/// Default `ready_timeout`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `watch_delay`.
const WATCH_DELAY: Duration = Duration::from_millis(500);
/// Default `[apps.NAME.reload] bake`: a new worker must stay up this long after it is ready
/// before its old worker stops, so that a version that dies right after READY=1 (or right
/// after a guessed readiness) aborts the rollout instead of replacing a healthy worker.
const BAKE: Duration = Duration::from_secs(1);

const TOP_KEYS: &[&str] = &["supervisor", "sockets", "apps", "metrics"];
const SUPERVISOR_KEYS: &[&str] = &[
    "stop_timeout",
    "run_dir",
    "log",
    "log_format",
    "log_max_size",
    "log_keep",
];
/// Default `log_keep`.
const LOG_KEEP: usize = 5;
/// The most rotated files `log_keep` may ask for.
const MAX_LOG_KEEP: i64 = 1000;
const SOCKET_KEYS: &[&str] = &[
    "listen",
    "backlog",
    "mode",
    "tcp_nodelay",
    "keepalive",
    "reuseport",
];
const APP_KEYS: &[&str] = &[
    "command",
    "workers",
    "sockets",
    "env",
    "cwd",
    "stop_signal",
    "stop_timeout",
    "restart",
    "backoff_initial",
    "backoff_max",
    "backoff_reset",
    "ready",
    "ready_delay",
    "ready_timeout",
    "watchdog",
    "kv_segment",
    "kv_watchdog",
    "max_memory",
    "restart_limit",
    "intercept",
    "drain",
    "balance",
    "ipc",
    "ipc_broadcast",
    "reload",
    "log",
    "log_format",
    "log_max_size",
    "log_keep",
    "watch",
    "watch_ignore",
    "watch_delay",
];
const RESTART_LIMIT_KEYS: &[&str] = &["burst", "interval"];
const RELOAD_KEYS: &[&str] = &["surge", "bake", "bake_each"];
const METRICS_KEYS: &[&str] = &["listen"];

use crate::model::{RESERVED_ENV, RESERVED_ENV_PREFIX};

/// Where the manifest lives, and how host names are resolved.
pub(crate) struct Origin {
    /// The manifest, absolute.
    pub(crate) path: PathBuf,
    /// Its directory, against which relative paths resolve.
    pub(crate) dir: PathBuf,
    /// Resolves host names of TCP addresses.
    pub(crate) resolver: Resolver,
}

/// Checks the parsed document `doc` of `text` and builds the manifest.
pub(crate) fn manifest(
    doc: &Spanned<DeTable<'_>>,
    text: &str,
    origin: &Origin,
) -> Result<Manifest, Vec<Problem>> {
    let mut cx = Checker::new(text);
    let root = Table {
        key: KeyPath::root(),
        span: doc.span(),
        entries: doc.get_ref(),
    };
    cx.check_keys(&root, TOP_KEYS);

    let supervisor = supervisor(&mut cx, &root, origin);
    let sockets = sockets(&mut cx, &root, origin);
    let default_stop = supervisor.as_ref().map_or(STOP_TIMEOUT, |s| s.stop_timeout);
    let default_log = supervisor
        .as_ref()
        .map_or_else(LogConfig::default_config, |s| s.log.clone());
    let defaults = AppDefaults {
        stop_timeout: default_stop,
        log: default_log,
    };
    let apps = apps(&mut cx, &root, origin, sockets.as_ref(), &defaults);
    let metrics = metrics(&mut cx, &root, origin, sockets.as_ref());

    let sockets: Option<BTreeMap<String, SocketConfig>> = sockets.and_then(|sockets| {
        sockets
            .into_iter()
            .map(|(name, socket)| socket.map(|s| (name, s.config)))
            .collect()
    });
    match (supervisor, sockets, apps, metrics) {
        (Some(supervisor), Some(sockets), Some(apps), Some(metrics)) if !cx.has_problems() => {
            Ok(Manifest {
                path: origin.path.clone(),
                dir: origin.dir.clone(),
                supervisor,
                sockets,
                apps,
                metrics,
            })
        }
        _ => {
            let problems = cx.into_problems();
            debug_assert!(!problems.is_empty(), "a part failed without a problem");
            Err(problems)
        }
    }
}

/// `[supervisor]`, optional.
fn supervisor(
    cx: &mut Checker<'_>,
    root: &Table<'_, '_>,
    origin: &Origin,
) -> Option<SupervisorConfig> {
    let Some(value) = root.get("supervisor") else {
        return Some(SupervisorConfig {
            stop_timeout: STOP_TIMEOUT,
            run_dir: None,
            log: LogConfig::default_config(),
        });
    };
    let table = cx.table(value, root.key.child("supervisor"), SUPERVISOR_KEYS)?;
    let log = log(cx, &table, origin, &LogConfig::default_config());
    let stop_timeout = cx
        .field(&table, "stop_timeout", values::duration)
        .or(STOP_TIMEOUT);
    let run_dir = cx
        .field(&table, "run_dir", |v| values::path(v, &origin.dir))
        .optional();
    Some(SupervisorConfig {
        stop_timeout: stop_timeout?,
        run_dir: run_dir?,
        log: log?,
    })
}

/// A socket whose settings are all valid, with where its `listen` is written.
struct CheckedSocket {
    config: SocketConfig,
    listen_span: Range<usize>,
}

/// Every `[sockets.NAME]`, by name, `None` for a socket with a problem (its name still counts
/// as defined, so apps referring to it are not reported as well).
type Sockets = BTreeMap<String, Option<CheckedSocket>>;

/// `[sockets.NAME]`, optional; `None` when `sockets` is not a table, so that which sockets
/// exist is unknown.
fn sockets(cx: &mut Checker<'_>, root: &Table<'_, '_>, origin: &Origin) -> Option<Sockets> {
    let mut sockets = BTreeMap::new();
    let Some(value) = root.get("sockets") else {
        return Some(sockets);
    };
    let table = cx.map(value, root.key.child("sockets"))?;
    for (name, value) in table.iter() {
        let key = table.key.child(name.get_ref());
        if !values::is_name(name.get_ref()) {
            cx.report(
                name.span(),
                &key,
                format!(
                    "expected a socket name made of {NAME_CHARS} (it goes into LISTEN_FDNAMES), found {:?}",
                    name.get_ref()
                ),
            );
        }
        let socket = socket(cx, value, key, origin);
        sockets.insert(name.get_ref().to_string(), socket);
    }
    check_socket_conflicts(cx, &table, &sockets);
    Some(sockets)
}

/// One `[sockets.NAME]` table.
fn socket(
    cx: &mut Checker<'_>,
    value: &Value<'_>,
    key: KeyPath,
    origin: &Origin,
) -> Option<CheckedSocket> {
    let table = cx.table(value, key, SOCKET_KEYS)?;
    let listen = cx.required(
        &table,
        "listen",
        "an address like \"127.0.0.1:8000\" or \"unix:run/http.sock\"",
        |v| {
            let s = values::c_string(v)?;
            listen::listen(s, &origin.dir, origin.resolver).map_err(Bad::Message)
        },
    );
    let backlog = cx
        .field(&table, "backlog", |v| values::integer_in(v, 1, 65535))
        .or(i64::from(BACKLOG));
    let mode = cx.field(&table, "mode", values::mode);
    let mode = match (&listen, mode) {
        (Some(Listen::Tcp(addr)), Field::Valid(_)) => {
            if let Some(value) = table.get("mode") {
                cx.report(
                    value.span(),
                    &table.key.child("mode"),
                    format!(
                        "mode only applies to unix sockets, and this one listens on TCP {addr}"
                    ),
                );
            }
            None
        }
        (_, mode) => mode.optional(),
    };
    let tcp_nodelay = cx.field(&table, "tcp_nodelay", values::boolean).or(true);
    let keepalive = cx.field(&table, "keepalive", keepalive).or(Keepalive::Off);
    let reuseport = cx.field(&table, "reuseport", values::boolean).or(false);
    if let Some(Listen::Unix(path)) = &listen {
        for name in ["tcp_nodelay", "keepalive", "reuseport"] {
            if let Some(value) = table.get(name) {
                cx.report(
                    value.span(),
                    &table.key.child(name),
                    format!(
                        "{name} only applies to TCP sockets, and this one listens on unix:{}",
                        path.display()
                    ),
                );
            }
        }
    }
    let listen_span = table.get("listen")?.span();
    Some(CheckedSocket {
        config: SocketConfig {
            listen: listen?,
            // In 1..=65535.
            backlog: backlog? as u32,
            mode: mode?,
            tcp_nodelay: tcp_nodelay?,
            keepalive: keepalive?,
            reuseport: reuseport?,
        },
        listen_span,
    })
}

/// `keepalive`: a boolean, or a positive duration (on, with that idle time).
fn keepalive(value: &Value<'_>) -> Result<Keepalive, Bad> {
    match value.get_ref() {
        DeValue::Boolean(true) => Ok(Keepalive::On),
        DeValue::Boolean(false) => Ok(Keepalive::Off),
        DeValue::String(_) => values::positive_duration(value).map(Keepalive::Idle),
        _ => Err(Bad::expected(
            "true, false or an idle time like \"60s\" before the first probe",
        )),
    }
}

/// Reports each socket whose address conflicts with one written before it.
fn check_socket_conflicts(cx: &mut Checker<'_>, table: &Table<'_, '_>, sockets: &Sockets) {
    let mut in_order: Vec<(&String, &CheckedSocket)> = sockets
        .iter()
        .filter_map(|(name, socket)| Some((name, socket.as_ref()?)))
        .collect();
    in_order.sort_by_key(|(_, socket)| socket.listen_span.start);
    for (i, (name, socket)) in in_order.iter().enumerate() {
        let earlier = in_order[..i]
            .iter()
            .find(|(_, other)| listen::conflicts(&socket.config.listen, &other.config.listen));
        if let Some((other_name, other)) = earlier {
            cx.report(
                socket.listen_span.clone(),
                &table.key.child(name).child("listen"),
                format!(
                    "{} conflicts with sockets.{}, which listens on {}",
                    listen::show(&socket.config.listen),
                    KeyPath::root().child(other_name),
                    listen::show(&other.config.listen)
                ),
            );
        }
    }
}

/// `[apps.NAME]`: at least one.
fn apps(
    cx: &mut Checker<'_>,
    root: &Table<'_, '_>,
    origin: &Origin,
    sockets: Option<&Sockets>,
    defaults: &AppDefaults,
) -> Option<BTreeMap<String, AppConfig>> {
    const NO_APP: &str =
        "no app defined: at least one [apps.NAME] table with a command is required";
    let Some(value) = root.get("apps") else {
        cx.report(root.span.clone(), &root.key.child("apps"), NO_APP);
        return None;
    };
    let table = cx.map(value, root.key.child("apps"))?;
    if table.entries.is_empty() {
        cx.report(table.span.clone(), &table.key, NO_APP);
        return None;
    }
    let mut apps = BTreeMap::new();
    let mut valid = true;
    for (name, value) in table.iter() {
        let key = table.key.child(name.get_ref());
        if !values::is_name(name.get_ref()) {
            let message = format!(
                "expected an app name made of {NAME_CHARS}, found {:?}",
                name.get_ref()
            );
            cx.report(name.span(), &key, message);
            valid = false;
        }
        match app(cx, value, key, origin, sockets, defaults) {
            Some(app) => {
                apps.insert(name.get_ref().to_string(), app);
            }
            None => valid = false,
        }
    }
    // ip-hash buckets are one app's slots: its sockets must be its own.
    for (name, value) in table.iter() {
        let Some(app) = apps.get(name.get_ref().as_ref() as &str) else {
            continue;
        };
        if app.balance != Balance::IpHash {
            continue;
        }
        for socket in &app.sockets {
            let shared = apps
                .iter()
                .find(|(other, a)| other.as_str() != name.get_ref() && a.sockets.contains(socket));
            if let Some((other, _)) = shared {
                cx.report(
                    value.span(),
                    &table.key.child(name.get_ref()).child("balance"),
                    format!(
                        "balance = \"ip-hash\" needs the app's sockets to itself: socket \
                         {socket:?} is also used by app {other:?}"
                    ),
                );
                valid = false;
            }
        }
    }
    valid.then_some(apps)
}

/// One `[apps.NAME]` table.
fn app(
    cx: &mut Checker<'_>,
    value: &Value<'_>,
    key: KeyPath,
    origin: &Origin,
    sockets: Option<&Sockets>,
    defaults: &AppDefaults,
) -> Option<AppConfig> {
    let table = cx.table(value, key, APP_KEYS)?;
    let dir = &origin.dir;

    let command = command(cx, &table, dir);
    let workers = cx.field(&table, "workers", values::workers).or(1);
    let app_sockets = app_sockets(cx, &table, sockets);
    let env = env(cx, &table);
    let cwd = cx
        .field(&table, "cwd", |v| values::path(v, dir))
        .or(dir.clone());
    // `"disconnect"`: close the channel first, then SIGTERM.
    let stop = cx
        .field(&table, "stop_signal", |v| match v.get_ref() {
            DeValue::String(s) if s.as_ref() == "disconnect" => Ok((Signal::SIGTERM, true)),
            _ => values::signal(v).map(|signal| (signal, false)),
        })
        .or((Signal::SIGTERM, false));
    let (stop_signal, stop_disconnect) = match stop {
        Some((signal, disconnect)) => (Some(signal), Some(disconnect)),
        None => (None, None),
    };
    let stop_timeout = cx
        .field(&table, "stop_timeout", values::duration)
        .or(defaults.stop_timeout);
    let restart = cx
        .field(&table, "restart", |v| {
            values::choice(
                v,
                &[
                    ("always", RestartPolicy::Always),
                    ("on-failure", RestartPolicy::OnFailure),
                    ("never", RestartPolicy::Never),
                ],
            )
        })
        .or(RestartPolicy::Always);
    let backoff = backoff(cx, &table);
    // An app with sockets that says nothing about readiness is given a moment to start
    // listening before a rollout counts on it (see `readiness`).
    let has_sockets = table.get("sockets").is_some();
    // Several workers and no socket declared: they would all bind the same port; like Node's
    // cluster primary, clusterd binds it on the first one's request and shares it.
    let intercept_auto =
        table.get("intercept").is_none() && !has_sockets && workers.is_some_and(|w| w > 1);
    let intercept = cx.field(&table, "intercept", values::boolean).or(false);
    let drain = cx.field(&table, "drain", values::duration);
    let drain = match (intercept.map(|i| i || intercept_auto), drain) {
        (Some(true), drain) => drain.or(DRAIN).map(|d| (!d.is_zero()).then_some(d)),
        // Any other app with sockets: a delay only when it asks for it.
        (_, Field::Valid(drain)) if has_sockets => Some((!drain.is_zero()).then_some(drain)),
        (_, Field::Valid(_)) => {
            if let Some(value) = table.get("drain") {
                cx.report(
                    value.span(),
                    &table.key.child("drain"),
                    "drain applies to apps with sockets, whose TCP sockets clusterd then steers",
                );
            }
            None
        }
        (_, Field::Invalid) => None,
        (_, Field::Absent) => Some(None),
    };
    // Steered sockets balance a multi-worker app; one worker keeps the shared queue (which
    // outlives it) unless it drains or is intercepted.
    let auto = matches!(table.get("workers").map(|v| v.get_ref()), Some(DeValue::String(s)) if s.as_ref() == "auto");
    let steered_by_default = auto
        || workers.is_some_and(|n| n > 1)
        || drain.is_some_and(|d| d.is_some())
        || intercept == Some(true);
    let balance = cx
        .field(&table, "balance", |v| {
            values::choice(
                v,
                &[
                    ("round-robin", Balance::RoundRobin),
                    ("least-queued", Balance::LeastQueued),
                    ("random", Balance::Random),
                    ("ip-hash", Balance::IpHash),
                    ("shared", Balance::Shared),
                ],
            )
        })
        .or(if steered_by_default {
            Balance::RoundRobin
        } else {
            Balance::Shared
        });
    if !has_sockets && let Some(value) = table.get("balance") {
        cx.report(
            value.span(),
            &table.key.child("balance"),
            "balance applies to apps with sockets: it says how their connections reach the workers",
        );
    }
    if balance == Some(Balance::Shared)
        && drain.is_some_and(|d| d.is_some())
        && let (Some(value), Some(_)) = (table.get("drain"), table.get("balance"))
    {
        cx.report(
            value.span(),
            &table.key.child("drain"),
            "drain steers a retiring worker's own socket out: balance = \"shared\" has one \
             queue for all, set drain = \"0s\" or another balance",
        );
    }
    // Intercepted apps drain by default, but not from a shared queue.
    let drain = match balance {
        Some(Balance::Shared) => drain.map(|_| None),
        _ => drain,
    };
    let ipc = ipc(cx, &table, command.as_deref(), stop_disconnect);
    let ready = readiness(
        cx,
        &table,
        has_sockets,
        intercept == Some(true) || intercept_auto,
        intercept_auto,
    );
    // Applied by the supervisor where this kernel can trap calls; until then (and where it
    // cannot) the app is what it would be without interception.
    let (intercept_auto, drain, ready) = match (intercept_auto, drain, ready) {
        (true, Some(drain), Some(ready)) => {
            let fallback = match ready {
                Readiness::Listen | Readiness::ListenOrDelay(_) => Readiness::Immediate,
                other => other,
            };
            let auto = AutoIntercept { drain, ready };
            (Some(auto), Some(None), Some(fallback))
        }
        (_, drain, ready) => (None, drain, ready),
    };
    if ready == Some(Readiness::Message) && ipc.is_some_and(|(ipc, _)| !ipc) {
        if let Some(value) = table.get("ready") {
            cx.report(
                value.span(),
                &table.key.child("ready"),
                "ready = \"message\" needs ipc = true: the message comes on the worker's channel",
            );
        }
    }
    let ready_timeout = cx
        .field(&table, "ready_timeout", values::positive_duration)
        .or(READY_TIMEOUT);
    let watchdog = cx
        .field(&table, "watchdog", values::positive_duration)
        .optional();
    let kv_segment = cx.field(&table, "kv_segment", values::name).optional();
    let kv_watchdog = cx
        .field(&table, "kv_watchdog", values::positive_duration)
        .optional();
    if let (Some(value), None) = (table.get("kv_watchdog"), table.get("kv_segment")) {
        cx.report(
            value.span(),
            &table.key.child("kv_watchdog"),
            "kv_watchdog watches the tend owner of a KV segment: set kv_segment too",
        );
    }
    let reload = reload(cx, &table);
    let max_memory = cx.field(&table, "max_memory", values::size).optional();
    let restart_limit = restart_limit(cx, &table);
    let log = log(cx, &table, origin, &defaults.log);
    let watch = watch(cx, &table, cwd.as_ref());

    Some(AppConfig {
        command: command?,
        workers: workers?,
        sockets: app_sockets?,
        env: env?,
        cwd: cwd?,
        stop_signal: stop_signal?,
        stop_timeout: stop_timeout?,
        restart: restart?,
        backoff: backoff?,
        ready: ready?,
        ready_timeout: ready_timeout?,
        watchdog: watchdog?,
        reload: reload?,
        max_memory: max_memory?,
        restart_limit: restart_limit?,
        intercept: intercept?,
        intercept_auto,
        drain: drain?,
        balance: balance?,
        kv_segment: kv_segment?,
        kv_watchdog: kv_watchdog?,
        log: log?,
        ipc: ipc?.0,
        ipc_broadcast: ipc?.1,
        stop_disconnect: stop_disconnect?,
        watch: watch?,
    })
}

/// `watch` (`true`: the app's `cwd`; or paths relative to it), `watch_ignore` and
/// `watch_delay`. `cwd` is `None` when it was invalid (reported already): then the paths are
/// checked but not resolved.
fn watch(
    cx: &mut Checker<'_>,
    table: &Table<'_, '_>,
    cwd: Option<&PathBuf>,
) -> Option<Option<WatchConfig>> {
    let here = cwd.cloned().unwrap_or_default();
    let paths = cx.field(table, "watch", |v| match v.get_ref() {
        DeValue::Boolean(true) => Ok(vec![here.clone()]),
        DeValue::Boolean(false) => Ok(Vec::new()),
        DeValue::Array(items) if !items.is_empty() => {
            items.iter().map(|item| values::path(item, &here)).collect()
        }
        _ => Err(Bad::expected(
            "true, false or a non-empty array of paths (relative to the app's cwd)",
        )),
    });
    let ignore = match cx.field(table, "watch_ignore", |v| match v.get_ref() {
        DeValue::Array(items) => Ok(items),
        _ => Err(Bad::expected(
            "an array of glob patterns, like [\"*.tmp\", \"dist\"]",
        )),
    }) {
        Field::Absent => Some(Vec::new()),
        Field::Invalid => None,
        Field::Valid(items) => {
            let key = table.key.child("watch_ignore");
            let mut patterns = Vec::with_capacity(items.len());
            for item in items.iter() {
                match glob(item) {
                    Ok(pattern) => patterns.push(pattern),
                    Err(bad) => cx.reject(item, &key, bad),
                }
            }
            (patterns.len() == items.len()).then_some(patterns)
        }
    };
    let delay = cx
        .field(table, "watch_delay", values::positive_duration)
        .or(WATCH_DELAY);
    let paths = match paths {
        Field::Invalid => return None,
        Field::Valid(paths) if !paths.is_empty() => paths,
        Field::Absent | Field::Valid(_) => {
            for key in ["watch_ignore", "watch_delay"] {
                if let Some(value) = table.get(key) {
                    cx.report(
                        value.span(),
                        &table.key.child(key),
                        format!("{key} applies to watched files: set watch too"),
                    );
                }
            }
            return Some(None);
        }
    };
    cwd?;
    Some(Some(WatchConfig {
        paths,
        ignore: ignore?,
        delay: delay?,
    }))
}

/// A glob pattern of `watch_ignore`.
fn glob(value: &Value<'_>) -> Result<String, Bad> {
    let pattern = values::c_string(value)?;
    if pattern.is_empty() {
        return Err(Bad::expected("a non-empty glob pattern"));
    }
    globset::Glob::new(pattern)
        .map_err(|e| Bad::Message(format!("not a glob pattern: {}", e.kind())))?;
    Ok(pattern.to_owned())
}

/// What an app takes from `[supervisor]` unless it sets it.
struct AppDefaults {
    stop_timeout: Duration,
    log: LogConfig,
}

impl LogConfig {
    /// The settings when nothing is written: the default destination, text, no rotation.
    fn default_config() -> Self {
        LogConfig {
            target: None,
            format: LogFormat::Text,
            max_size: None,
            keep: LOG_KEEP,
        }
    }
}

/// `log`, `log_format`, `log_max_size` and `log_keep` of `table`, each defaulting to
/// `inherited`'s.
fn log(
    cx: &mut Checker<'_>,
    table: &Table<'_, '_>,
    origin: &Origin,
    inherited: &LogConfig,
) -> Option<LogConfig> {
    let target = cx
        .field(table, "log", |v| values::log_target(v, &origin.dir))
        .optional();
    let format = cx
        .field(table, "log_format", |v| {
            values::choice(v, &[("text", LogFormat::Text), ("json", LogFormat::Json)])
        })
        .or(inherited.format);
    let max_size = cx.field(table, "log_max_size", values::size).optional();
    let keep = cx
        .field(table, "log_keep", |v| {
            values::integer_in(v, 0, MAX_LOG_KEEP)
        })
        .optional();
    Some(LogConfig {
        target: target?.or_else(|| inherited.target.clone()),
        format: format?,
        max_size: max_size?.or(inherited.max_size),
        // In 0..=MAX_LOG_KEEP.
        keep: keep?.map_or(inherited.keep, |k| k as usize),
    })
}

/// `ipc` and `ipc_broadcast`. `ipc` defaults to true when the command runs `node` (its
/// `process.send` then works as under the cluster module, and a Node worker without message
/// listeners is not kept alive by the channel), else false. `ipc_broadcast` and
/// `stop_signal = "disconnect"` need it.
fn ipc(
    cx: &mut Checker<'_>,
    table: &Table<'_, '_>,
    command: Option<&[String]>,
    stop_disconnect: Option<bool>,
) -> Option<(bool, bool)> {
    let runs_node = command
        .and_then(|argv| argv.first())
        .and_then(|program| Path::new(program).file_name())
        .is_some_and(|name| name == "node" || name == "nodejs");
    let ipc = cx.field(table, "ipc", values::boolean).or(runs_node);
    let broadcast = cx.field(table, "ipc_broadcast", values::boolean).or(false);
    if ipc == Some(false) {
        let needs = [
            ("ipc_broadcast", broadcast == Some(true)),
            ("stop_signal", stop_disconnect == Some(true)),
        ];
        for (key, set) in needs {
            if let (true, Some(value)) = (set, table.get(key)) {
                cx.report(
                    value.span(),
                    &table.key.child(key),
                    format!("{key} needs ipc = true (the worker's message channel)"),
                );
            }
        }
    }
    Some((ipc?, broadcast?))
}

/// `command`: required, a non-empty array of strings; a relative `argv[0]` with a `/` is made
/// absolute against `dir`.
fn command(cx: &mut Checker<'_>, table: &Table<'_, '_>, dir: &Path) -> Option<Vec<String>> {
    const EXAMPLE: &str =
        "the program and its arguments, like [\"bin/server\", \"--port\", \"8000\"]";
    let key = table.key.child("command");
    let items = cx.required(table, "command", EXAMPLE, |v| match v.get_ref() {
        DeValue::Array(items) if !items.is_empty() => Ok(items),
        _ => Err(Bad::expected("a non-empty array of strings")),
    })?;
    let mut argv = Vec::with_capacity(items.len());
    let mut valid = true;
    for (i, item) in items.iter().enumerate() {
        match values::c_string(item) {
            Ok("") if i == 0 => {
                let bad = Bad::Message("the program name (argv[0]) must not be empty".to_owned());
                cx.reject(item, &key, bad);
                valid = false;
            }
            Ok(arg) => argv.push(arg.to_owned()),
            Err(bad) => {
                cx.reject(item, &key, bad);
                valid = false;
            }
        }
    }
    if !valid {
        return None;
    }
    if argv[0].contains('/') {
        argv[0] = values::resolve(dir, Path::new(&argv[0]))
            .to_string_lossy()
            .into_owned();
    }
    Some(argv)
}

/// `sockets` of an app: names of defined sockets (`None`: unknown, as `sockets` is invalid),
/// no duplicates.
fn app_sockets(
    cx: &mut Checker<'_>,
    table: &Table<'_, '_>,
    sockets: Option<&Sockets>,
) -> Option<Vec<String>> {
    let key = table.key.child("sockets");
    let items = match cx.field(table, "sockets", |v| match v.get_ref() {
        DeValue::Array(items) => Ok(items),
        _ => Err(Bad::expected("an array of socket names")),
    }) {
        Field::Absent => return Some(Vec::new()),
        Field::Invalid => return None,
        Field::Valid(items) => items,
    };
    let mut names: Vec<String> = Vec::new();
    let mut valid = true;
    for item in items.iter() {
        let checked = values::string(item).and_then(|name| {
            if names.iter().any(|listed| listed == name) {
                return Err(Bad::Message(format!("socket {name:?} is listed twice")));
            }
            match sockets {
                Some(sockets) if !sockets.contains_key(name) => {
                    Err(Bad::Message(unknown_socket(name, sockets)))
                }
                _ => Ok(name),
            }
        });
        match checked {
            Ok(name) => names.push(name.to_owned()),
            Err(bad) => {
                cx.reject(item, &key, bad);
                valid = false;
            }
        }
    }
    valid.then_some(names)
}

/// The message for a reference to a socket that is not defined.
fn unknown_socket(name: &str, sockets: &Sockets) -> String {
    if sockets.is_empty() {
        return format!("unknown socket {name:?}: no [sockets.NAME] is defined");
    }
    let defined: Vec<String> = sockets.keys().map(|k| format!("{k:?}")).collect();
    format!(
        "unknown socket {name:?}, the defined sockets are: {}",
        defined.join(", ")
    )
}

/// `env`: a table of strings; names non-empty, without `=` or NUL, and not one clusterd sets.
fn env(cx: &mut Checker<'_>, table: &Table<'_, '_>) -> Option<BTreeMap<String, String>> {
    let Some(value) = table.get("env") else {
        return Some(BTreeMap::new());
    };
    let env = cx.map(value, table.key.child("env"))?;
    let mut vars = BTreeMap::new();
    let mut valid = true;
    for (name, value) in env.iter() {
        let key = env.key.child(name.get_ref());
        let name_problem = if name.get_ref().is_empty() {
            Some("an environment variable name must not be empty".to_owned())
        } else if name.get_ref().contains(['=', '\0']) {
            Some("an environment variable name must not contain '=' or NUL".to_owned())
        } else if RESERVED_ENV.contains(&name.get_ref().as_ref())
            || name.get_ref().starts_with(RESERVED_ENV_PREFIX)
        {
            Some(format!(
                "{} is set by clusterd for each worker and cannot be set here",
                name.get_ref()
            ))
        } else {
            None
        };
        if let Some(message) = name_problem {
            cx.report(name.span(), &key, message);
            valid = false;
        }
        match values::c_string(value) {
            Ok(s) => {
                vars.insert(name.get_ref().to_string(), s.to_owned());
            }
            Err(bad) => {
                cx.reject(value, &key, bad);
                valid = false;
            }
        }
    }
    valid.then_some(vars)
}

/// `backoff_initial`, `backoff_max` (not below the initial delay) and `backoff_reset`.
fn backoff(cx: &mut Checker<'_>, table: &Table<'_, '_>) -> Option<Backoff> {
    let initial = cx
        .field(table, "backoff_initial", values::positive_duration)
        .or(BACKOFF_INITIAL);
    let max = cx
        .field(table, "backoff_max", values::duration)
        .or(BACKOFF_MAX);
    let reset_after = cx
        .field(table, "backoff_reset", values::duration)
        .or(BACKOFF_RESET);
    let (initial, max) = (initial?, max?);
    if max < initial {
        // Whichever of the two is written gets the blame; `backoff_max` when both are.
        let (name, message) = if table.get("backoff_max").is_some() {
            (
                "backoff_max",
                format!(
                    "backoff_max ({}) must not be less than backoff_initial ({})",
                    humantime::format_duration(max),
                    humantime::format_duration(initial)
                ),
            )
        } else {
            (
                "backoff_initial",
                format!(
                    "backoff_initial ({}) must not exceed backoff_max (default {})",
                    humantime::format_duration(initial),
                    humantime::format_duration(max)
                ),
            )
        };
        if let Some(value) = table.get(name) {
            cx.report(value.span(), &table.key.child(name), message);
        }
        return None;
    }
    Some(Backoff {
        initial,
        max,
        reset_after: reset_after?,
    })
}

/// How `ready` was written, before `ready_delay` is attached.
#[derive(Clone, Copy, PartialEq)]
enum ReadyKind {
    Immediate,
    Delay,
    Notify,
    Listen,
    Message,
}

/// `ready` and `ready_delay` (only with `ready = "delay"`). Without `ready`, an app with
/// sockets is `"delay"` (it must stay up `ready_delay` before it counts as ready: most servers
/// never signal readiness, and a rollout must not stop every old worker before the new ones
/// listen), an intercepted app is `"listen"` (its `listen()` is trapped, so it says when it
/// listens) and an app without sockets is `"immediate"`. `"listen"` needs `intercept = true`;
/// with `ready_delay` it is "listen or alive that long", the default (with 5s) of an app
/// intercepted by default, which may never listen (a queue consumer).
fn readiness(
    cx: &mut Checker<'_>,
    table: &Table<'_, '_>,
    has_sockets: bool,
    intercept: bool,
    intercept_auto: bool,
) -> Option<Readiness> {
    let default = if intercept {
        ReadyKind::Listen
    } else if has_sockets {
        ReadyKind::Delay
    } else {
        ReadyKind::Immediate
    };
    let kind = cx
        .field(table, "ready", |v| {
            values::choice(
                v,
                &[
                    ("immediate", ReadyKind::Immediate),
                    ("delay", ReadyKind::Delay),
                    ("notify", ReadyKind::Notify),
                    ("listen", ReadyKind::Listen),
                    ("message", ReadyKind::Message),
                ],
            )
        })
        .or(default);
    if kind == Some(ReadyKind::Listen) && !intercept {
        if let Some(value) = table.get("ready") {
            cx.report(
                value.span(),
                &table.key.child("ready"),
                "ready = \"listen\" needs intercept = true: only a trapped listen() is seen",
            );
        }
        return None;
    }
    let delay = cx.field(table, "ready_delay", values::duration);
    match (kind?, delay) {
        (ReadyKind::Delay, delay) => delay.or(READY_DELAY).map(Readiness::Delay),
        (ReadyKind::Listen, Field::Valid(delay)) => Some(Readiness::ListenOrDelay(delay)),
        (ReadyKind::Listen, Field::Absent) if intercept_auto && table.get("ready").is_none() => {
            Some(Readiness::ListenOrDelay(LISTEN_FALLBACK))
        }
        (_, Field::Invalid) => None,
        (kind, Field::Valid(_)) => {
            let written = match kind {
                ReadyKind::Notify => "ready is \"notify\"",
                ReadyKind::Message => "ready is \"message\"",
                _ if table.get("ready").is_some() => "ready is \"immediate\"",
                _ => "ready defaults to \"immediate\"",
            };
            if let Some(value) = table.get("ready_delay") {
                cx.report(
                    value.span(),
                    &table.key.child("ready_delay"),
                    format!(
                        "ready_delay only applies with ready = \"delay\" or \"listen\", but \
                         {written}"
                    ),
                );
            }
            None
        }
        (ReadyKind::Immediate, Field::Absent) => Some(Readiness::Immediate),
        (ReadyKind::Notify, Field::Absent) => Some(Readiness::Notify),
        (ReadyKind::Listen, Field::Absent) => Some(Readiness::Listen),
        (ReadyKind::Message, Field::Absent) => Some(Readiness::Message),
    }
}

/// `[apps.NAME.reload]`, optional.
fn reload(cx: &mut Checker<'_>, table: &Table<'_, '_>) -> Option<ReloadConfig> {
    let Some(value) = table.get("reload") else {
        return Some(ReloadConfig {
            surge: 1,
            bake: BAKE,
            bake_each: false,
        });
    };
    let reload = cx.table(value, table.key.child("reload"), RELOAD_KEYS)?;
    let surge = cx
        .field(&reload, "surge", |v| {
            values::integer_in(v, 1, values::MAX_WORKERS)
        })
        .or(1);
    let bake = cx.field(&reload, "bake", values::duration).or(BAKE);
    let bake_each = cx.field(&reload, "bake_each", values::boolean).or(false);
    Some(ReloadConfig {
        // In 1..=MAX_WORKERS.
        surge: surge? as usize,
        bake: bake?,
        bake_each: bake_each?,
    })
}

/// `restart_limit = { burst = 5, interval = "10s" }`, optional.
fn restart_limit(cx: &mut Checker<'_>, table: &Table<'_, '_>) -> Option<Option<RestartLimit>> {
    let Some(value) = table.get("restart_limit") else {
        return Some(None);
    };
    let limit = cx.table(value, table.key.child("restart_limit"), RESTART_LIMIT_KEYS)?;
    let burst = cx.required(&limit, "burst", "restarts allowed within interval", |v| {
        values::integer_in(v, 1, 1_000_000)
    });
    let interval = cx.required(
        &limit,
        "interval",
        "a duration like \"10s\"",
        values::positive_duration,
    );
    Some(Some(RestartLimit {
        // In 1..=1_000_000.
        burst: burst? as u32,
        interval: interval?,
    }))
}

/// `[metrics]`, optional: a TCP `listen` not taken by a socket.
fn metrics(
    cx: &mut Checker<'_>,
    root: &Table<'_, '_>,
    origin: &Origin,
    sockets: Option<&Sockets>,
) -> Option<Option<MetricsConfig>> {
    let Some(value) = root.get("metrics") else {
        return Some(None);
    };
    let table = cx.table(value, root.key.child("metrics"), METRICS_KEYS)?;
    let listen = cx.required(
        &table,
        "listen",
        "a TCP address like \"127.0.0.1:9100\"",
        |v| {
            let s = values::c_string(v)?;
            if s.starts_with("unix:") {
                return Err(Bad::expected("a TCP address like \"127.0.0.1:9100\""));
            }
            listen::tcp(s, origin.resolver).map_err(Bad::Message)
        },
    )?;
    let taken = sockets.into_iter().flatten().find_map(|(name, socket)| {
        let socket = socket.as_ref()?;
        listen::conflicts(&Listen::Tcp(listen), &socket.config.listen).then_some((name, socket))
    });
    if let (Some((name, socket)), Some(value)) = (taken, table.get("listen")) {
        cx.report(
            value.span(),
            &table.key.child("listen"),
            format!(
                "{listen} conflicts with sockets.{}, which listens on {}",
                KeyPath::root().child(name),
                listen::show(&socket.config.listen)
            ),
        );
        return None;
    }
    Some(Some(MetricsConfig { listen }))
}
