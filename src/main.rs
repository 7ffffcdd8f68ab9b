//! The `clusterd` command line: `start` runs a manifest's workers in the foreground; the other
//! commands check a manifest or help workers talk to a running supervisor.
//!
//! Exit codes: 0 success, 1 runtime error, 2 invalid manifest or usage.

mod boot;
mod containment;
mod control;
mod intercept;
mod ipc;
mod lifecycle;
mod logs;
mod manager;
mod metrics;
mod notify;
mod os;
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

use crate::control::client::{self, LogsTarget, Target};
use crate::control::render;
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
    // The supervisor (`start`, `run`) writes its log and its workers' output through
    // non-blocking writer threads (see `output`); the CLI commands write directly.
    let supervises = matches!(
        cli.command,
        Command::Start { detach: false, .. } | Command::Run(_) | Command::HandoverResume { .. }
    );
    match cli.command {
        _ if supervises => match output::init() {
            Ok(()) => init_logging(|| logs::EventWriter),
            Err(error) => {
                eprintln!("clusterd: cannot start the output threads: {error}");
                return ExitCode::FAILURE;
            }
        },
        _ => init_logging(std::io::stderr),
    }
    let code = match cli.command {
        Command::Start {
            manifest,
            run_dir,
            detach: true,
            timeout,
            ..
        } => start_detached(&manifest, run_dir.as_deref(), timeout),
        Command::Start {
            manifest,
            run_dir,
            detached,
            ..
        } => start(&manifest, run_dir.as_deref(), detached),
        Command::HandoverResume { fd } => report(resume(fd)),
        Command::HandoverCheck => match supervisor::check_handover(io::stdin().lock()) {
            Ok(line) => match print_out(format_args!("{line}\n")) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            },
            Err(error) => {
                eprintln!("clusterd: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Upgrade { binary, target } => report(upgrade_command(binary, &target)),
        Command::Check { manifest } => check(&manifest),
        Command::Run(args) => run_command(&args),
        Command::Notify { assignments } => report(notify_command(&assignments)),
        Command::Status {
            json,
            check,
            file,
            mut target,
        } => {
            if let Some(file) = file {
                target.manifest = file;
            }
            control_command(&target, Request::Status {}, |reply| match reply {
                Reply::Status(status) if check => match status.not_ready {
                    _ if status.ready => print_out(format_args!("ready\n")).map(|()| true),
                    reason => print_out(format_args!(
                        "not ready: {}\n",
                        reason.as_deref().unwrap_or("unknown")
                    ))
                    .map(|()| false),
                },
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
        Command::Stop {
            timeout,
            no_wait,
            target,
        } => lifecycle::stop(&target, timeout, no_wait),
        Command::Logs {
            spec,
            lines,
            follow,
            json,
            target,
        } => logs_command(spec, lines, follow, json, &target.into()),
    };
    if supervises {
        // What is still queued for stdout and stderr gets a bounded moment to be written.
        output::flush(Duration::from_millis(1500));
    }
    code
}

/// `clusterd logs`: prints each line as it arrives (text as in a log file, or JSON).
fn logs_command(
    spec: Option<String>,
    lines: usize,
    follow: bool,
    json: bool,
    target: &Target,
) -> ExitCode {
    let (app, slot) = match spec.as_deref().map(|s| s.split_once(':')) {
        None => (None, None),
        Some(None) => (spec, None),
        Some(Some((app, slot))) => match slot.parse() {
            Ok(slot) => (Some(app.to_owned()), Some(slot)),
            Err(_) => {
                eprintln!(
                    "clusterd: {:?}: expected APP or APP:SLOT",
                    spec.unwrap_or_default()
                );
                return ExitCode::from(EXIT_USAGE);
            }
        },
    };
    let request = Request::Logs {
        app,
        slot,
        lines,
        follow,
    };
    let timeout = (!follow).then_some(Duration::from_secs(30));
    let result = target.socket_path().and_then(|socket| {
        client::call_streaming(&socket, request, timeout, |reply| {
            let Reply::Log(line) = reply else {
                return Ok(());
            };
            let text = if json {
                clusterd_proto::encode_line(&line)
            } else {
                logs::format::text_of_line(&line)
            };
            let mut out = io::stdout().lock();
            out.write_all(&text)?;
            out.flush()
        })
    });
    match result {
        Ok(Reply::Done { .. }) => ExitCode::SUCCESS,
        Ok(Reply::Error { message, .. }) => {
            eprintln!("clusterd: {message}");
            ExitCode::FAILURE
        }
        Ok(other) => {
            eprintln!("clusterd: unexpected reply: {other:?}");
            ExitCode::FAILURE
        }
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("clusterd: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `clusterd start --detach`: checks the manifest here (problems are reported to the caller),
/// then hands over to [`lifecycle::start_detached`].
fn start_detached(path: &Path, run_dir: Option<&Path>, timeout: Option<Duration>) -> ExitCode {
    let manifest = match load_manifest(path) {
        Ok(manifest) => manifest,
        Err(code) => return code,
    };
    let missing = missing_programs(&manifest);
    if !missing.is_empty() {
        for problem in missing {
            eprintln!("{problem}");
        }
        return ExitCode::from(EXIT_USAGE);
    }
    lifecycle::start_detached(&manifest, run_dir, timeout)
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

fn start(path: &Path, run_dir: Option<&Path>, detached: bool) -> ExitCode {
    match load_manifest(path) {
        Ok(manifest) => run_manifest(manifest, run_dir, detached),
        Err(code) => code,
    }
}

/// `start` and `run` once the manifest is valid: refuse what cannot run here, then supervise.
fn run_manifest(manifest: Manifest, run_dir: Option<&Path>, detached: bool) -> ExitCode {
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
    report(boot::boot(boot::Start::Fresh {
        manifest: Box::new(manifest),
        run_dir: run_dir.map(Path::to_path_buf),
        detached,
    }))
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
    run_manifest(manifest, None, false)
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

fn notify_command(assignments: &[String]) -> anyhow::Result<()> {
    let socket = std::env::var("NOTIFY_SOCKET")
        .context("NOTIFY_SOCKET is not set: not running under a supervisor")?;
    notify::send_with_barrier(&socket, &assignments.join("\n"), Duration::from_secs(5))
        .with_context(|| format!("cannot notify {socket}"))
}

/// `clusterd upgrade`: asks the supervisor to exec `binary` (it checks it first), then waits
/// until the new one answers status, and says how long that took.
fn upgrade_command(binary: Option<PathBuf>, target: &Target) -> anyhow::Result<()> {
    let socket = target.socket_path()?;
    let timeout = Some(Duration::from_secs(30));
    let status = |socket: &Path| match client::call(socket, Request::Status {}, timeout, |_| Ok(()))
    {
        Ok(Reply::Status(status)) => Ok(*status),
        Ok(other) => anyhow::bail!("unexpected reply {other:?}"),
        Err(error) => Err(error),
    };
    let before = status(&socket)?;
    let binary = binary
        .map(|b| std::path::absolute(&b).with_context(|| format!("{}", b.display())))
        .transpose()?;
    let started = std::time::Instant::now();
    let request = Request::Upgrade {
        binary: binary.map(|b| b.display().to_string()),
    };
    match client::call(&socket, request, timeout, |_| Ok(()))? {
        Reply::Done { message } => print_out(format_args!("{message}\n"))?,
        Reply::Error { message, .. } => anyhow::bail!("{message}"),
        other => anyhow::bail!("unexpected reply {other:?}"),
    }
    let deadline = started + Duration::from_secs(30);
    loop {
        // Connections wait in the control socket's queue while the exec runs.
        if let Ok(after) = status(&socket)
            && after.upgrades > before.upgrades
        {
            anyhow::ensure!(
                after.pid == before.pid,
                "the supervisor's pid changed from {} to {}",
                before.pid,
                after.pid
            );
            let workers: usize = after.apps.iter().map(|a| a.running).sum();
            print_out(format_args!(
                "upgraded clusterd pid {} from {} to {} in {} ms; {workers} workers kept\n",
                after.pid,
                before.version,
                after.version,
                started.elapsed().as_millis()
            ))?;
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the supervisor did not come back upgraded within 30 s; see its log"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The new side of an upgrade: takes the state and descriptors the previous clusterd of this
/// pid handed over and runs its workers on. A state it cannot read starts nothing: clusterd
/// exits non-zero (and the workers, its children, follow through `PR_SET_PDEATHSIG`) rather
/// than starting a second set of workers beside them.
fn resume(fd: i32) -> anyhow::Result<()> {
    let handover = supervisor::read_handover(fd)
        .context("cannot take over from the previous clusterd; starting no worker")?;
    boot::boot(boot::Start::Resumed(Box::new(handover)))
}
