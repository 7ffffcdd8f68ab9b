//! The `clusterd` command line: the clap definitions ([`Cli`]), one file per command family
//! ([`start`]: start, run, check and stop; [`status`]; [`reload`]: reload, restart, scale
//! and signal; [`logs`]; [`upgrade`]; [`notify`]: notify and send; [`startup`]; [`ls`];
//! [`monit`]), the control client ([`client`]) and the rendering of replies ([`render`]).

pub mod client;
pub mod logs;
pub mod ls;
pub mod monit;
pub mod notify;
pub mod reload;
pub mod render;
pub mod run;
pub mod start;
pub mod startup;
pub mod status;
pub mod upgrade;

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use clusterd_manifest::Manifest;
use clusterd_proto::{Reply, Request};

use self::client::{LogsTarget, Target};

/// A process supervisor: N workers sharing listening sockets, crash restart with backoff,
/// zero-downtime rolling reloads and clean shutdown, for workers in any language.
#[derive(Parser)]
#[command(name = "clusterd", version)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// A command.
#[derive(Subcommand)]
pub enum Command {
    /// Bind the manifest's sockets and run its workers (in the foreground, or with --detach
    /// in the background).
    Start {
        /// The manifest.
        #[arg(default_value = "supervisor.toml")]
        manifest: PathBuf,
        /// Directory for the pid file, control and notify sockets (overrides the manifest).
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// Run in the background; return once every app's workers are ready (exit 0) or one
        /// failed to come up (exit 1, with the reason). Logs default to the run directory's
        /// clusterd.log.
        #[arg(short = 'd', long)]
        detach: bool,
        /// With --detach: how long to wait for the apps (default: the longest ready_timeout
        /// plus 11s), e.g. "30s".
        #[arg(long, value_parser = humantime::parse_duration, requires = "detach")]
        timeout: Option<Duration>,
        /// Internal: this process is the background supervisor of `start --detach`.
        #[arg(long, hide = true)]
        detached: bool,
    },
    /// Run one app without a manifest file, exactly as the equivalent one-app manifest would
    /// (`--print-manifest` prints it). With --listen, the app's own bind() of that address is
    /// answered with clusterd's socket (intercept = true) and it is ready once it listens.
    /// Without it, several workers (`--workers 2`) are intercepted all the same: the port the
    /// app binds is bound by clusterd on the first worker's request and shared by all, as
    /// Node's cluster module does (`clusterd run --workers 2 -- node app.js`).
    Run(run::RunArgs),
    /// Validate a manifest: exit 0, or print every problem and exit 2.
    Check {
        /// The manifest.
        manifest: PathBuf,
    },
    /// Show every app and worker of a running supervisor.
    Status {
        /// Print JSON (stable; see the README) instead of a table.
        #[arg(long)]
        json: bool,
        /// Exit 0 if every app has its desired ready workers and no rollout is aborting, 1
        /// otherwise (with the reason): an exec probe, like `GET /readyz`.
        #[arg(long, conflicts_with = "json")]
        check: bool,
        /// The manifest (same as --file).
        file: Option<PathBuf>,
        #[command(flatten)]
        target: Target,
    },
    /// A live dashboard (PM2's `pm2 monit`): every app and worker with state, CPU and memory
    /// with their last minute, restarts, last exit, rollouts, and the selected app's logs.
    /// Keys: ↑↓/j k select, r reload the app, R/x restart the slot, +/- scale, q quit.
    Monit {
        /// The manifest (same as --file).
        file: Option<PathBuf>,
        #[command(flatten)]
        target: Target,
    },
    /// Roll every worker of an app (or of all apps) to a new generation, one at a time.
    Reload {
        /// The app; all apps when omitted.
        app: Option<String>,
        /// Follow the rollout and exit non-zero if it aborts.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Restart an app's workers one at a time (APP), or one slot's worker at once (APP:SLOT).
    Restart {
        /// APP or APP:SLOT.
        spec: String,
        #[command(flatten)]
        target: Target,
    },
    /// Set the number of workers of an app.
    Scale {
        /// The app.
        app: String,
        /// The new number of workers.
        workers: usize,
        #[command(flatten)]
        target: Target,
    },
    /// Send a signal to every worker (process group) of an app.
    Signal {
        /// The app.
        app: String,
        /// The signal: SIGHUP, HUP or 1.
        signal: String,
        #[command(flatten)]
        target: Target,
    },
    /// Deliver a JSON message on the channel (ipc) of every worker of an app (APP), or of
    /// one slot's worker (APP:SLOT); Node workers get it as a `message` event.
    Send {
        /// APP or APP:SLOT.
        spec: String,
        /// The message, e.g. '{"hello":1}'.
        message: String,
        #[command(flatten)]
        target: Target,
    },
    /// Stop a running supervisor gracefully (like SIGTERM) and wait until it has exited.
    Stop {
        /// How long to wait for the exit (default: the longest stop_timeout plus 10s).
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// Return once the stop is requested, without waiting.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Print the last lines of output of every app (or of APP, or APP:SLOT) kept in memory by
    /// the supervisor, then, with -f, follow new lines until interrupted.
    Logs {
        /// APP or APP:SLOT (`clusterd` for clusterd's own events); every app when omitted.
        spec: Option<String>,
        /// How many of the last lines, per app.
        #[arg(short = 'n', long = "lines", default_value_t = 10)]
        lines: usize,
        /// Keep printing new lines as they come (until Ctrl-C).
        #[arg(short = 'f', long)]
        follow: bool,
        /// Print one JSON object per line (the `log_format = "json"` format).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: LogsTarget,
    },
    /// Replace the running supervisor with a clusterd binary in place: same pid, the workers
    /// keep running and serving; sockets, pipes and the whole state cross over. The binary
    /// must prove it can read the state first; if not, nothing changes.
    Upgrade {
        /// The new binary (default: the one the supervisor was started from, e.g. replaced
        /// on disk by a package upgrade).
        #[arg(long)]
        binary: Option<PathBuf>,
        #[command(flatten)]
        target: Target,
    },
    /// Read a supervisor's hand-over state from stdin and say whether this binary can take
    /// over from it (run by `upgrade` on the new binary).
    #[command(hide = true)]
    HandoverCheck,
    /// Take over from the supervisor that exec'd this binary (run by `upgrade`).
    #[command(hide = true)]
    HandoverResume {
        /// The memfd holding the state.
        fd: i32,
    },
    /// Print the systemd unit that runs this manifest at boot (PM2's `pm2 startup`), or with
    /// --install write and enable it.
    Startup(startup::StartupArgs),
    /// List every supervisor of this user (PM2's `pm2 list` from anywhere): those with a run
    /// directory under $XDG_RUNTIME_DIR/clusterd/ or ./.clusterd/, or of a ./*.toml.
    Ls(ls::LsArgs),
    /// Send sd_notify assignments (e.g. READY=1) to $NOTIFY_SOCKET and wait until the
    /// supervisor has read them; for workers that cannot send datagrams themselves.
    Notify {
        /// Assignments such as READY=1 or STATUS=text.
        #[arg(required = true)]
        assignments: Vec<String>,
    },
}

/// Exit code for an invalid manifest or command line.
pub const EXIT_USAGE: u8 = 2;

/// `APP` or `APP:SLOT`; `None` (after saying why) for anything else.
pub fn app_slot(spec: &str) -> Option<(String, Option<usize>)> {
    match spec.split_once(':') {
        Some((app, slot)) => match slot.parse() {
            Ok(slot) => Some((app.to_owned(), Some(slot))),
            Err(_) => {
                eprintln!("clusterd: {spec:?}: expected APP or APP:SLOT");
                None
            }
        },
        None => Some((spec.to_owned(), None)),
    }
}

/// Writes to stdout. A reader that went away (`clusterd status | head -1`) shows up as
/// [`io::ErrorKind::BrokenPipe`], which callers treat as the normal end of the output.
pub fn print_out(text: std::fmt::Arguments<'_>) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_fmt(text)?;
    out.flush()
}

/// Whether `error` comes from writing to a closed pipe.
pub fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<io::Error>())
        .any(|e| e.kind() == io::ErrorKind::BrokenPipe)
}

/// Sends one control request and prints its reply. `show` handles the command's own final
/// reply and says whether it means success; `Done` and `Error` replies are handled here.
/// A closed stdout ends the command with success: whoever read the output has what it wanted.
pub fn control_command(
    target: &Target,
    request: Request,
    show: impl FnOnce(Reply) -> io::Result<bool>,
) -> ExitCode {
    let timeout = match request {
        Request::Reload { wait: true, .. } => None,
        _ => Some(Duration::from_secs(30)),
    };
    let result = target.socket_path().and_then(|socket| {
        client::call(&socket, request, timeout, |progress| {
            print_out(format_args!("{progress}\n"))
        })
    });
    match result {
        Ok(Reply::Done { message }) => match print_out(format_args!("{message}\n")) {
            Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
                eprintln!("clusterd: writing the reply: {e}");
                ExitCode::FAILURE
            }
            _ => ExitCode::SUCCESS,
        },
        Ok(Reply::Error { message, .. }) => {
            eprintln!("clusterd: {message}");
            ExitCode::FAILURE
        }
        Ok(reply) => match show(reply) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("clusterd: writing the reply: {e}");
                ExitCode::FAILURE
            }
        },
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("clusterd: {error:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn init_logging<W>(writer: W)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let level = crate::daemon::logs::max_level();
    tracing_subscriber::fmt()
        .with_writer(writer)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_max_level(level)
        .init();
}

/// Prints an error with its causes and turns it into exit code 1.
pub fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("clusterd: {error:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn load_manifest(path: &Path) -> Result<Manifest, ExitCode> {
    clusterd_manifest::load(path).map_err(|error| {
        eprintln!("{}", crate::error::Chain(&error));
        ExitCode::from(EXIT_USAGE)
    })
}
