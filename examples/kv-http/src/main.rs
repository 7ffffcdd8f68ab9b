//! `kv-http`: the HTTP-over-KV example worker. JSON records live in a Redis cluster; the
//! workers of a host share one cluster map through `clusterd-kv`'s shared-memory segment, and
//! one of them (the tend owner) keeps it current.
//!
//! This file owns the process's life: settings, the listener, connecting the KV client,
//! readiness, the close hook that closes the KV client (releasing the tend lock so another
//! worker takes over at once), and the exit status. Routes live in `routes`; the accept loop
//! and the drain are the SDK's `serve_http`.

mod routes;

use std::fmt;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clusterd_kv::{KvClient, KvOptions};
use clusterd_worker::Shutdown;
use clusterd_worker::http::{Drain, serve_http};

const USAGE: &str = "\
kv-http: JSON records over HTTP, stored in a Redis cluster

USAGE: kv-http [--help]

Routes:
  GET  /<key>      the stored JSON record (200), or 404
  POST /<key>      store the JSON body (201); invalid JSON gets 400
  GET  /_kv/stats  this worker's KV role (owner/follower) and counters

It serves the first socket inherited from clusterd (LISTEN_FDS, fd 3) and binds KV_HTTP_ADDR
(default 127.0.0.1:8001) when it inherited none. It sends READY=1 once connected to the
cluster. On SIGTERM or SIGINT it stops accepting, finishes in-flight requests, closes its KV
client (another worker takes over tending the cluster map at once) and exits 0.

Settings (environment):
  REDIS_CLUSTER=<host:port,...>  seed nodes (default 127.0.0.1:7000)
  KV_HTTP_ADDR=<host:port>       fallback address (default 127.0.0.1:8001)
  KV_TEND_INTERVAL_MS=<ms>       how often the tend owner polls the topology (default 1000)
  KV_SHARED_MEMORY=0             every worker tends its own map (for comparison)
  CLUSTERD_KV_SEGMENT=<prefix>   segment name prefix (clusterd sets it from kv_segment)
  CLUSTERD_KV_DIR=<dir>          segment directory (default /dev/shm)

Exit status: 0 clean stop, 1 failure or drain timeout, 2 bad usage or settings.
";

/// How long in-flight requests get once the stop signal arrived.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long each close hook may run.
const HOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// The settings read from the environment.
struct Settings {
    seeds: String,
    addr: String,
    tend_interval: Option<Duration>,
    shared_memory: bool,
}

impl Settings {
    fn from_env() -> Result<Self, String> {
        let tend_interval = var("KV_TEND_INTERVAL_MS")?
            .map(|v| {
                v.parse()
                    .map(Duration::from_millis)
                    .map_err(|_| format!("KV_TEND_INTERVAL_MS={v:?}: expected milliseconds"))
            })
            .transpose()?;
        let shared_memory = match var("KV_SHARED_MEMORY")?.as_deref() {
            None | Some("" | "1") => true,
            Some("0") => false,
            Some(other) => return Err(format!("KV_SHARED_MEMORY={other:?}: expected 1 or 0")),
        };
        Ok(Settings {
            seeds: var("REDIS_CLUSTER")?.unwrap_or_else(|| "127.0.0.1:7000".into()),
            addr: var("KV_HTTP_ADDR")?.unwrap_or_else(|| "127.0.0.1:8001".into()),
            tend_interval,
            shared_memory,
        })
    }

    fn kv_options(&self) -> KvOptions {
        let options = KvOptions::from_seed_list(&self.seeds).shared_memory(self.shared_memory);
        match self.tend_interval {
            Some(interval) => options.tend_interval(interval),
            None => options,
        }
    }
}

fn var(name: &str) -> Result<Option<String>, String> {
    match std::env::var(name) {
        Ok(value) => Ok(Some(value)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{name} is not valid UTF-8")),
    }
}

/// Writes one log line to stderr, prefixed with the pid.
fn log(message: fmt::Arguments<'_>) {
    eprintln!("kv-http pid {}: {message}", std::process::id());
}

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        None => {}
        Some("-h" | "--help") => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("kv-http: unexpected argument {other:?}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    }
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("kv-http: {err}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("kv-http: starting the tokio runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(settings)) {
        Ok(code) => code,
        Err(err) => {
            log(format_args!("{err}"));
            ExitCode::FAILURE
        }
    }
}

/// Everything from taking the listener to the last close hook.
async fn run(settings: Settings) -> Result<ExitCode, Box<dyn std::error::Error>> {
    // First, so that a stop signal from now on begins a clean shutdown.
    let shutdown = Shutdown::new()?;

    let listener = match clusterd_worker::take(clusterd_worker::Which::Index(0))? {
        Some(listener) => listener,
        None => {
            clusterd_worker::Listener::Tcp(std::net::TcpListener::bind(&settings.addr).map_err(
                |source| clusterd_worker::ListenError::Bind {
                    addr: settings.addr.clone(),
                    source,
                },
            )?)
        }
    };
    log(format_args!("listening on {}", listener.describe()));

    let kv = Arc::new(
        KvClient::connect(settings.kv_options())
            .await
            .map_err(|e| format!("connecting to the KV cluster {}: {e}", settings.seeds))?,
    );
    log(format_args!(
        "kv client connected to {} as {}",
        settings.seeds,
        kv.role()
    ));
    let closing = Arc::clone(&kv);
    shutdown.on_close("close the KV client", move || async move {
        let role = closing.role();
        match closing.close().await {
            Ok(()) => log(format_args!("kv client closed (was {role})")),
            Err(e) => log(format_args!("closing the kv client: {e}")),
        }
    })?;

    if let Some(heartbeat) = clusterd_worker::spawn_watchdog()? {
        tokio::spawn(async move {
            if let Ok(err) = heartbeat.await {
                log(format_args!("watchdog heartbeat stopped: {err}"));
            }
        });
    }
    if let Err(err) = clusterd_worker::ready() {
        log(format_args!("READY=1 not sent: {err}"));
    }

    let stop = {
        let shutdown = shutdown.clone();
        async move {
            let reason = shutdown.wait().await;
            log(format_args!("{reason}: stopping, draining connections"));
            if let Err(err) = clusterd_worker::notify("STOPPING=1") {
                log(format_args!("{err}"));
            }
        }
    };
    let handler = move |request| routes::handle(request, Arc::clone(&kv));
    let drain = Drain {
        timeout: DRAIN_TIMEOUT,
        ..Drain::default()
    };
    let drained = serve_http(listener, handler, stop, drain).await?.in_time;
    for report in shutdown.close(HOOK_TIMEOUT).await {
        if report.outcome != clusterd_worker::HookOutcome::Completed {
            log(format_args!("{report}"));
        }
    }
    if drained {
        log(format_args!("exiting"));
        Ok(ExitCode::SUCCESS)
    } else {
        log(format_args!(
            "exiting: connections still open after {DRAIN_TIMEOUT:?}"
        ));
        Ok(ExitCode::FAILURE)
    }
}
