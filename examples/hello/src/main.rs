//! `hello`: the example clusterd worker, a small HTTP/1.1 server on the `clusterd-worker` SDK.
//!
//! This file owns the process's life: reading the settings, taking the listener, readiness
//! and watchdog notifications, the test-only misbehaviours, and the exit status. The routes
//! live in `routes`; the accept loop and the drain are the SDK's `serve_http`.

mod routes;

use std::fmt;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clusterd_worker::http::{Drain, serve_http};
use clusterd_worker::{Shutdown, SignalKind};

use crate::routes::Identity;

const USAGE: &str = "\
hello: an example HTTP/1.1 worker for clusterd

USAGE: hello [--help]

Routes:
  GET /            hello from <app>[<slot>] pid <pid> generation <generation>
  GET /whoami      {\"app\":..,\"slot\":..,\"pid\":..,\"generation\":..}
  GET /sleep/<ms>  answers after <ms> milliseconds (at most 60000)

It serves the first socket inherited from clusterd (LISTEN_FDS, fd 3) or the one named by
HELLO_SOCKET, and binds HELLO_ADDR (default 127.0.0.1:8000) when it inherited none.
It sends READY=1 and STATUS=serving to NOTIFY_SOCKET once serving, and WATCHDOG=1 at half of
WATCHDOG_USEC. On SIGTERM or SIGINT it stops accepting, finishes in-flight requests (at most
30 s), closes idle connections and exits 0 (1 if the drain timed out).

Settings (environment):
  HELLO_SOCKET=<name>        serve the inherited socket with this LISTEN_FDNAMES name
  HELLO_ADDR=<host:port>     fallback address (default 127.0.0.1:8000)

Test-only misbehaviours (environment):
  HELLO_READY_DELAY_MS=<ms>  wait this long before sending READY=1
  HELLO_NO_READY=1           never send READY=1
  HELLO_IGNORE_SIGTERM=1     ignore SIGTERM entirely (SIGINT still stops it)
  HELLO_EXIT_AFTER_MS=<ms>   exit with status 3 after this long
  HELLO_NO_WATCHDOG=1        never send WATCHDOG=1, even when WATCHDOG_USEC asks

Exit status: 0 clean stop, 1 failure or drain timeout, 2 bad usage or settings,
3 HELLO_EXIT_AFTER_MS.
";

/// How long in-flight requests get once the stop signal arrived.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long each close hook may run.
const HOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// The settings read from `HELLO_*` variables.
#[derive(Debug)]
struct Settings {
    socket: Option<String>,
    addr: String,
    ready_delay: Option<Duration>,
    no_ready: bool,
    ignore_sigterm: bool,
    exit_after: Option<Duration>,
    no_watchdog: bool,
}

impl Settings {
    fn from_env() -> Result<Self, String> {
        Ok(Settings {
            socket: var("HELLO_SOCKET")?,
            addr: var("HELLO_ADDR")?.unwrap_or_else(|| "127.0.0.1:8000".to_owned()),
            ready_delay: millis("HELLO_READY_DELAY_MS")?,
            no_ready: flag("HELLO_NO_READY")?,
            ignore_sigterm: flag("HELLO_IGNORE_SIGTERM")?,
            exit_after: millis("HELLO_EXIT_AFTER_MS")?,
            no_watchdog: flag("HELLO_NO_WATCHDOG")?,
        })
    }
}

fn var(name: &str) -> Result<Option<String>, String> {
    match std::env::var(name) {
        Ok(value) => Ok(Some(value)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{name} is not valid UTF-8")),
    }
}

fn flag(name: &str) -> Result<bool, String> {
    match var(name)?.as_deref() {
        None | Some("" | "0") => Ok(false),
        Some("1") => Ok(true),
        Some(other) => Err(format!("{name}={other:?}: expected 1 or 0")),
    }
}

fn millis(name: &str) -> Result<Option<Duration>, String> {
    var(name)?
        .map(|value| {
            value
                .parse()
                .map(Duration::from_millis)
                .map_err(|_| format!("{name}={value:?}: expected a number of milliseconds"))
        })
        .transpose()
}

/// The identity used in log lines, set once at startup.
static WHO: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Writes one log line to stderr, prefixed with who is speaking.
fn log(message: fmt::Arguments<'_>) {
    let who = WHO.get().map_or("hello", String::as_str);
    eprintln!("{who}: {message}");
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None => {}
        Some("-h" | "--help") => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("hello: unexpected argument {other:?}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    }
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("hello: {err}");
            return ExitCode::from(2);
        }
    };
    if settings.ignore_sigterm {
        // SAFETY: setting a signal disposition to SIG_IGN before any thread exists.
        unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("hello: starting the tokio runtime: {err}");
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
    let stop_signals: &[SignalKind] = if settings.ignore_sigterm {
        &[SignalKind::interrupt()]
    } else {
        &[SignalKind::terminate(), SignalKind::interrupt()]
    };
    let shutdown = Shutdown::with_signals(stop_signals)?;

    let info = clusterd_worker::worker_info()?;
    let me = Arc::new(Identity {
        app: info.as_ref().map_or("hello", |i| i.app.as_str()).to_owned(),
        slot: info.as_ref().map_or(0, |i| i.slot),
        pid: std::process::id(),
        generation: info.as_ref().map_or(0, |i| i.generation),
    });
    let _ = WHO.set(format!("hello {}[{}] pid {}", me.app, me.slot, me.pid));

    let (listener, origin) = take_listener(&settings)?;
    log(format_args!(
        "listening on {} ({origin}), generation {}",
        listener.describe(),
        me.generation
    ));

    if let Some(after) = settings.exit_after {
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            log(format_args!(
                "HELLO_EXIT_AFTER_MS: exiting with status 3 after {after:?}"
            ));
            std::process::exit(3);
        });
    }
    if !settings.no_watchdog {
        if let Some(heartbeat) = clusterd_worker::spawn_watchdog()? {
            tokio::spawn(async move {
                match heartbeat.await {
                    Ok(err) => log(format_args!("watchdog heartbeat stopped: {err}")),
                    Err(err) => log(format_args!("watchdog heartbeat task failed: {err}")),
                }
            });
        }
    }
    if !settings.no_ready {
        match settings.ready_delay {
            None => announce_ready(),
            Some(delay) => {
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    announce_ready();
                });
            }
        }
    }

    let hook_me = Arc::clone(&me);
    shutdown.on_close("log the last word", move || async move {
        log(format_args!(
            "close hooks ran for {}[{}]",
            hook_me.app, hook_me.slot
        ));
    })?;

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
    let handler_me = Arc::clone(&me);
    let handler = move |request| routes::handle(request, Arc::clone(&handler_me));
    let drain = Drain {
        timeout: DRAIN_TIMEOUT,
        ..Drain::default()
    };
    let drained = serve_http(listener, handler, stop, drain).await?;
    for report in shutdown.close(HOOK_TIMEOUT).await {
        if report.outcome != clusterd_worker::HookOutcome::Completed {
            log(format_args!("{report}"));
        }
    }
    if drained.in_time {
        log(format_args!(
            "exiting: served {} requests, drained {} connections",
            drained.requests, drained.connections
        ));
        Ok(ExitCode::SUCCESS)
    } else {
        log(format_args!(
            "exiting: connections still open after {DRAIN_TIMEOUT:?}"
        ));
        Ok(ExitCode::FAILURE)
    }
}

/// The inherited socket (by `HELLO_SOCKET` name, else the first), or `HELLO_ADDR` bound here.
fn take_listener(
    settings: &Settings,
) -> Result<(clusterd_worker::Listener, &'static str), clusterd_worker::ListenError> {
    let which = match &settings.socket {
        Some(name) => clusterd_worker::Which::Name(name),
        None => clusterd_worker::Which::Index(0),
    };
    if let Some(listener) = clusterd_worker::take(which)? {
        return Ok((listener, "inherited"));
    }
    let listener = std::net::TcpListener::bind(&settings.addr).map_err(|source| {
        clusterd_worker::ListenError::Bind {
            addr: settings.addr.clone(),
            source,
        }
    })?;
    Ok((clusterd_worker::Listener::Tcp(listener), "bound by hello"))
}

/// Sends `READY=1` and `STATUS=serving` in one datagram; a failure is logged, not fatal.
fn announce_ready() {
    match clusterd_worker::notify("READY=1\nSTATUS=serving") {
        Ok(true) => log(format_args!("sent READY=1")),
        Ok(false) => {}
        Err(err) => log(format_args!("{err}")),
    }
}
