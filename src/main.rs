//! The `clusterd` command line: `start` runs a manifest's workers in the foreground; the other
//! commands check a manifest or help workers talk to a running supervisor.
//!
//! Exit codes: 0 success, 1 runtime error, 2 invalid manifest or usage.

mod notify;
mod output;
mod reaper;
mod rundir;
mod signals;
mod sockets;
mod spawn;
mod supervisor;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use clusterd_manifest::Manifest;

use crate::notify::NotifySocket;
use crate::rundir::RunDir;
use crate::sockets::Sockets;

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
    /// Validate a manifest: exit 0, or print every problem and exit 2.
    Check {
        /// The manifest.
        manifest: PathBuf,
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
    init_logging();
    match cli.command {
        Command::Start { manifest, run_dir } => start(&manifest, run_dir.as_deref()),
        Command::Check { manifest } => check(&manifest),
        Command::Notify { assignments } => report(notify_command(&assignments)),
    }
}

fn init_logging() {
    let level = std::env::var("CLUSTERD_LOG")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(tracing::Level::INFO);
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
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
            let workers: usize = manifest.apps.values().map(|a| a.workers).sum();
            println!(
                "{}: ok ({} apps, {} workers, {} sockets)",
                path.display(),
                manifest.apps.len(),
                workers,
                manifest.sockets.len()
            );
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn start(path: &Path, run_dir: Option<&Path>) -> ExitCode {
    let manifest = match load_manifest(path) {
        Ok(manifest) => manifest,
        Err(code) => return code,
    };
    // A command that cannot be found is a mistake to report now, not a crash loop later.
    for (name, app) in &manifest.apps {
        if spawn::resolve_program(
            &app.command[0],
            &app.cwd,
            std::env::var_os("PATH").as_deref(),
        )
        .is_none()
        {
            eprintln!(
                "{}: apps.{name}.command: cannot find an executable {:?} (working directory {})",
                path.display(),
                app.command[0],
                app.cwd.display()
            );
            return ExitCode::from(EXIT_USAGE);
        }
    }
    report(run_supervisor(manifest, run_dir))
}

fn run_supervisor(manifest: Manifest, run_dir: Option<&Path>) -> anyhow::Result<()> {
    // Orphaned grandchildren are re-parented to us, so the reaper collects them too.
    nix::sys::prctl::set_child_subreaper(true).context("cannot become a child subreaper")?;

    let run_dir = RunDir::for_manifest(&manifest, run_dir);
    run_dir
        .create()
        .with_context(|| format!("cannot create run directory {}", run_dir.path.display()))?;
    let sockets = Sockets::bind_all(&manifest.sockets)?;
    let pid_file = run_dir.pid_file();
    std::fs::write(&pid_file, format!("{}\n", std::process::id()))
        .with_context(|| format!("cannot write pid file {}", pid_file.display()))?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the event loop")?;
    let local = tokio::task::LocalSet::new();
    let result = local.block_on(&runtime, async {
        let notify = NotifySocket::bind(&run_dir.notify_socket())
            .with_context(|| format!("cannot bind {}", run_dir.notify_socket().display()))?;
        supervisor::run(manifest, sockets, notify).await
    });
    let _ = std::fs::remove_file(&pid_file);
    result
}

fn notify_command(assignments: &[String]) -> anyhow::Result<()> {
    let socket = std::env::var("NOTIFY_SOCKET")
        .context("NOTIFY_SOCKET is not set: not running under a supervisor")?;
    notify::send_with_barrier(&socket, &assignments.join("\n"), Duration::from_secs(5))
        .with_context(|| format!("cannot notify {socket}"))
}
