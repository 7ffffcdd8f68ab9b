//! The `clusterd` command line: `start` runs a manifest's workers in the foreground; the other
//! commands check a manifest or help workers talk to a running supervisor.
//!
//! Exit codes: 0 success, 1 runtime error, 2 invalid manifest or usage.

mod containment;
mod control;
mod intercept;
mod ipc;
mod metrics;
mod notify;
mod output;
mod procstat;
mod reaper;
mod run;
mod rundir;
mod signals;
mod sockets;
mod spawn;
mod steering;
mod supervisor;

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use clusterd_manifest::Manifest;

use crate::containment::Containment;
use crate::control::client::{self, Target};
use crate::control::render;
use crate::control::server::ControlServer;
use crate::notify::NotifySocket;
use crate::rundir::{PidFile, RunDir};
use crate::sockets::Sockets;
use clusterd_proto::{ReloadResult, Reply, Request};

/// A process supervisor: N workers sharing listening sockets, crash restart with backoff,
/// zero-downtime rolling reloads and clean shutdown, for workers in any language.
#[derive(Parser)]
#[command(name = "clusterd", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Bind the manifest's sockets and run its workers in the foreground.
    Start {
        /// The manifest.
        #[arg(default_value = "supervisor.toml")]
        manifest: PathBuf,
        /// Directory for the pid file, control and notify sockets (overrides the manifest).
        #[arg(long)]
        run_dir: Option<PathBuf>,
    },
    /// Run one app without a manifest file, exactly as the equivalent one-app manifest would
    /// (`--print-manifest` prints it). With --listen, the app's own bind() of that address is
    /// answered with clusterd's socket (intercept = true) and it is ready once it listens.
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
    /// Stop a running supervisor gracefully (like SIGTERM).
    Stop {
        #[command(flatten)]
        target: Target,
    },
    /// Send sd_notify assignments (e.g. READY=1) to $NOTIFY_SOCKET and wait until the
    /// supervisor has read them; for workers that cannot send datagrams themselves.
    Notify {
        /// Assignments such as READY=1 or STATUS=text.
        #[arg(required = true)]
        assignments: Vec<String>,
    },
}

/// Exit code for an invalid manifest or command line.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The supervisor writes its log and its workers' output through non-blocking writer
    // threads (see `output`), kept until the end of `main`; the CLI commands write directly.
    match cli.command {
        Command::Start { .. } => match output::init() {
            Ok(()) => init_logging(|| output::LogWriter),
            Err(error) => {
                eprintln!("clusterd: cannot start the output threads: {error}");
                return ExitCode::FAILURE;
            }
        },
        _ => init_logging(std::io::stderr),
    }
    match cli.command {
        Command::Start { manifest, run_dir } => {
            let code = start(&manifest, run_dir.as_deref());
            // What is still queued for stdout and stderr gets a bounded moment to be written.
            output::flush(Duration::from_millis(1500));
            code
        }
        Command::Check { manifest } => check(&manifest),
        Command::Run(args) => run_command(&args),
        Command::Notify { assignments } => report(notify_command(&assignments)),
        Command::Status {
            json,
            file,
            mut target,
        } => {
            if let Some(file) = file {
                target.manifest = file;
            }
            control_command(&target, Request::Status {}, |reply| match reply {
                Reply::Status(status) if json => {
                    let json = serde_json::to_string_pretty(&status).unwrap_or_default();
                    print_out(format_args!("{json}\n")).map(|()| true)
                }
                Reply::Status(status) => {
                    print_out(format_args!("{}", render::status_table(&status))).map(|()| true)
                }
                _ => Ok(false),
            })
        }
        Command::Reload { app, wait, target } => control_command(
            &target,
            Request::Reload { app, wait },
            |reply| match reply {
                Reply::Reloaded { outcomes } => {
                    let mut ok = true;
                    for o in outcomes {
                        match o.outcome {
                            ReloadResult::Completed => print_out(format_args!(
                                "{}: reload completed, generation {}\n",
                                o.app, o.generation
                            ))?,
                            ReloadResult::Aborted => {
                                ok = false;
                                print_out(format_args!(
                                    "{}: reload ABORTED: {}\n",
                                    o.app,
                                    o.reason.unwrap_or_default()
                                ))?;
                            }
                        }
                    }
                    Ok(ok)
                }
                _ => Ok(false),
            },
        ),
        Command::Restart { spec, target } => {
            let Some((app, slot)) = app_slot(&spec) else {
                return ExitCode::from(EXIT_USAGE);
            };
            control_command(&target, Request::Restart { app, slot }, |_| Ok(false))
        }
        Command::Send {
            spec,
            message,
            target,
        } => {
            let Some((app, slot)) = app_slot(&spec) else {
                return ExitCode::from(EXIT_USAGE);
            };
            let message = match serde_json::from_str(&message) {
                Ok(message) => message,
                Err(error) => {
                    eprintln!("clusterd: the message is not JSON: {error}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            let request = Request::Send { app, slot, message };
            control_command(&target, request, |_| Ok(false))
        }
        Command::Scale {
            app,
            workers,
            target,
        } => control_command(&target, Request::Scale { app, workers }, |_| Ok(false)),
        Command::Signal {
            app,
            signal,
            target,
        } => control_command(&target, Request::Signal { app, signal }, |_| Ok(false)),
        Command::Stop { target } => control_command(&target, Request::Stop {}, |_| Ok(false)),
    }
}

/// `APP` or `APP:SLOT`; `None` (after saying why) for anything else.
fn app_slot(spec: &str) -> Option<(String, Option<usize>)> {
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
fn print_out(text: std::fmt::Arguments<'_>) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_fmt(text)?;
    out.flush()
}

/// Whether `error` comes from writing to a closed pipe.
fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<io::Error>())
        .any(|e| e.kind() == io::ErrorKind::BrokenPipe)
}

/// Sends one control request and prints its reply. `show` handles the command's own final
/// reply and says whether it means success; `Done` and `Error` replies are handled here.
/// A closed stdout ends the command with success: whoever read the output has what it wanted.
fn control_command(
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

fn init_logging<W>(writer: W)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let level = std::env::var("CLUSTERD_LOG")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(tracing::Level::INFO);
    tracing_subscriber::fmt()
        .with_writer(writer)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_max_level(level)
        .init();
}

/// Prints an error with its causes and turns it into exit code 1.
fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("clusterd: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_manifest(path: &Path) -> Result<Manifest, ExitCode> {
    clusterd_manifest::load(path).map_err(|error| {
        eprintln!("{error}");
        ExitCode::from(EXIT_USAGE)
    })
}

fn check(path: &Path) -> ExitCode {
    match load_manifest(path) {
        Ok(manifest) => {
            // A manifest is often checked where it will not run (a build machine): a program
            // missing here is worth a warning, by the rule `start` enforces.
            for problem in missing_programs(&manifest) {
                eprintln!("warning: {problem} (`clusterd start` refuses this)");
            }
            if let Err(problem) = interception_available(&manifest) {
                eprintln!("warning: {problem} (`clusterd start` refuses this)");
            }
            let workers: usize = manifest.apps.values().map(|a| a.workers).sum();
            // A closed stdout is no reason to fail a valid manifest.
            let _ = print_out(format_args!(
                "{}: ok ({} apps, {} workers, {} sockets)\n",
                path.display(),
                manifest.apps.len(),
                workers,
                manifest.sockets.len()
            ));
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn start(path: &Path, run_dir: Option<&Path>) -> ExitCode {
    match load_manifest(path) {
        Ok(manifest) => run_manifest(manifest, run_dir),
        Err(code) => code,
    }
}

/// `start` and `run` once the manifest is valid: refuse what cannot run here, then supervise.
fn run_manifest(manifest: Manifest, run_dir: Option<&Path>) -> ExitCode {
    let missing = missing_programs(&manifest);
    if !missing.is_empty() {
        for problem in missing {
            eprintln!("{problem}");
        }
        return ExitCode::from(EXIT_USAGE);
    }
    if let Err(problem) = interception_available(&manifest) {
        eprintln!("clusterd: {problem}");
        return ExitCode::FAILURE;
    }
    report(run_supervisor(manifest, run_dir))
}

/// For a manifest with an intercepted app: whether this kernel can trap `bind`/`listen`.
fn interception_available(manifest: &Manifest) -> Result<(), String> {
    let apps: Vec<&str> = manifest
        .apps
        .iter()
        .filter(|(_, app)| app.intercept)
        .map(|(name, _)| name.as_str())
        .collect();
    if apps.is_empty() {
        return Ok(());
    }
    intercept::probe().map_err(|e| {
        format!(
            "{}: apps {} set intercept = true, but {e}",
            manifest.path.display(),
            apps.join(", ")
        )
    })
}

fn run_command(args: &run::RunArgs) -> ExitCode {
    if args.print_manifest {
        return match args.manifest_text() {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(error) => report(Err(error.into())),
        };
    }
    let manifest = match args.manifest() {
        Ok(manifest) => manifest,
        Err(error) => {
            eprintln!(
                "{error}
(the manifest these options make: clusterd run --print-manifest ...)"
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    run_manifest(manifest, None)
}

/// Apps whose command cannot be found: a mistake to report before starting, not a crash loop
/// later. The same rule as every spawn ([`spawn::find_program`]): the app's `env.PATH`, else
/// clusterd's.
fn missing_programs(manifest: &Manifest) -> Vec<String> {
    let path = std::env::var_os("PATH");
    manifest
        .apps
        .iter()
        .filter(|(_, app)| spawn::find_program(app, path.as_deref()).is_none())
        .map(|(name, app)| {
            format!(
                "{}: apps.{name}.command: cannot find an executable {:?} (working directory {})",
                manifest.path.display(),
                app.command[0],
                app.cwd.display()
            )
        })
        .collect()
}

fn run_supervisor(manifest: Manifest, run_dir: Option<&Path>) -> anyhow::Result<()> {
    // First, before anything else opens a file: sockets systemd passed to us (fds 3..).
    let inherited = sockets::take_inherited()?;
    // A supervisor holds a few descriptors per worker: use all the hard limit allows.
    match spawn::raise_nofile_limit() {
        Ok((before, after)) => tracing::debug!("descriptor limit raised from {before} to {after}"),
        Err(e) => tracing::debug!("cannot raise the descriptor limit: {e}"),
    }
    // Orphaned grandchildren are re-parented to us, so the reaper collects them too.
    nix::sys::prctl::set_child_subreaper(true).context("cannot become a child subreaper")?;

    let run_dir = RunDir::for_manifest(&manifest, run_dir);
    run_dir
        .create()
        .with_context(|| format!("cannot create run directory {}", run_dir.path.display()))?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the event loop")?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        // The control socket first: a second `start` of a running manifest fails here, before
        // it could disturb anything.
        let control = ControlServer::bind(&run_dir.control_socket())?;
        // Now that no other clusterd runs this run directory: kill what a previous run that
        // was itself killed left behind, before it can hold a port we are about to bind.
        let containment = Containment::detect(&containment::key_for(&run_dir.path));
        tracing::info!("containment: {}", containment.describe());
        match containment.sweep_leftovers() {
            Ok(killed) if killed.is_empty() => {}
            Ok(killed) => tracing::warn!(
                "killed {} processes left by a previous run: {}",
                killed.len(),
                killed.join(", ")
            ),
            Err(e) => tracing::warn!("cannot sweep a previous run's processes: {e}"),
        }
        let steered = steering::steered(&manifest);
        if !steered.is_empty() && !steering::enable_migration() {
            tracing::warn!(
                "cannot set net.ipv4.tcp_migrate_req: a worker that dies with connections queued on its own socket loses them"
            );
        }
        let sockets = Sockets::bind_all(&manifest.sockets, inherited, &steered)?;
        let notify = NotifySocket::bind(&run_dir.notify_socket())
            .with_context(|| format!("cannot bind {}", run_dir.notify_socket().display()))?;
        let metrics = match &manifest.metrics {
            Some(config) => Some(
                metrics::MetricsServer::bind(config.listen)
                    .await
                    .with_context(|| format!("metrics: cannot listen on {}", config.listen))?,
            ),
            None => None,
        };
        let pid_file = PidFile::write(run_dir.pid_file())?;
        tracing::info!(
            "clusterd pid {} running {}; control socket {}",
            std::process::id(),
            manifest.path.display(),
            run_dir.control_socket().display()
        );
        let result =
            supervisor::run(manifest, sockets, notify, control, metrics, containment).await;
        drop(pid_file);
        let dropped = output::dropped_lines();
        if dropped > 0 {
            tracing::warn!("{dropped} lines of output were dropped: stdout or stderr was not read");
        }
        result
    })
}

fn notify_command(assignments: &[String]) -> anyhow::Result<()> {
    let socket = std::env::var("NOTIFY_SOCKET")
        .context("NOTIFY_SOCKET is not set: not running under a supervisor")?;
    notify::send_with_barrier(&socket, &assignments.join("\n"), Duration::from_secs(5))
        .with_context(|| format!("cannot notify {socket}"))
}
