//! `clusterd start` (in the foreground, or `--detach`ed), `run`, `check` and `stop`.
//!
//! **Start** and **run** check the manifest (every program found, interception available
//! where asked for) and boot a supervisor in this process (`daemon::boot`).
//!
//!
//! **Detach** re-executes clusterd itself (`clusterd start --detached ...`; no fork of a
//! running process) as the leader of a new session, with stdin on `/dev/null` and stdout and
//! stderr on `<run dir>/clusterd.out` (what it prints before its logs are set up, e.g. a socket
//! that cannot be bound). Its logs go where the manifest says, by default the run
//! directory's `clusterd.log`. The command then watches the new supervisor through its
//! control socket until it is ready (every slot that should be up has a ready worker: a
//! one-shot task that finished with exit 0 is not missing), with no worker exited, for
//! [`SETTLE`] (exit 0), or until a worker exits or fails, the supervisor exits, or the
//! deadline passes (exit 1 with the reason and the worker's last lines; the supervisor is
//! stopped, so that a failed start leaves nothing running).
//!
//! **Stop** asks the supervisor to stop, then waits until its process is gone (or, for a
//! supervisor in another PID namespace, its control socket and pid file).

use std::fs::File;
use std::io::{self, BufRead};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clusterd_manifest::{LogTarget, Manifest, Readiness};
use clusterd_proto::{Reply, Request, Status, WorkerRole, WorkerState};

use crate::cli::client::{self, Target};
use crate::daemon::logs::format;
use crate::daemon::rundir::RunDir;
use crate::daemon::{boot, intercept, spawn};

use super::{EXIT_USAGE, load_manifest, print_out, report};

/// How long every worker must have been ready, with no exit, for a detached start to count
/// as up (a worker that is "ready" at once and crashes a moment later is a failed start).
const SETTLE: Duration = Duration::from_secs(1);

/// How often the state is looked at while waiting.
const POLL: Duration = Duration::from_millis(100);

/// Added to the longest `stop_timeout` for `clusterd stop`'s default timeout.
const STOP_MARGIN: Duration = Duration::from_secs(10);

/// Lines of a failed worker's output shown.
const FAILURE_LINES: usize = 10;

/// `clusterd start --detach`: starts the supervisor in the background and returns once its
/// apps are up (0) or have failed to come up (1).
pub fn start_detached(
    manifest: &Manifest,
    run_dir: Option<&Path>,
    timeout: Option<Duration>,
) -> ExitCode {
    match detach(manifest, run_dir, timeout) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("clusterd: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn detach(
    manifest: &Manifest,
    run_dir: Option<&Path>,
    timeout: Option<Duration>,
) -> anyhow::Result<ExitCode> {
    let run_dir = match run_dir {
        Some(dir) => Some(std::path::absolute(dir)?),
        None => None,
    };
    let run_dir = RunDir::for_manifest(manifest, run_dir.as_deref());
    run_dir
        .create()
        .with_context(|| format!("cannot create run directory {}", run_dir.path.display()))?;
    let socket = run_dir.control_socket();
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        anyhow::bail!(
            "another clusterd is already running for this manifest (control socket {} answers)",
            socket.display()
        );
    }
    let out_path = run_dir.path.join("clusterd.out");
    let out = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&out_path)
        .with_context(|| format!("cannot create {}", out_path.display()))?;
    let exe = std::env::current_exe().context("cannot find clusterd's own executable")?;
    let mut command = Command::new(exe);
    command
        .arg("start")
        .arg(&manifest.path)
        .arg("--run-dir")
        .arg(&run_dir.path)
        .arg("--detached")
        .current_dir(&manifest.dir)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent; the CLI is
    // single-threaded here anyway.
    unsafe {
        command.pre_exec(|| nix::unistd::setsid().map(drop).map_err(io::Error::from));
    }
    let mut child = command
        .spawn()
        .context("cannot start the background clusterd")?;

    let deadline = Instant::now() + timeout.unwrap_or_else(|| start_timeout(manifest));
    let mut up_since: Option<Instant> = None;
    loop {
        if let Some(status) = child.try_wait()? {
            eprintln!(
                "clusterd: the background supervisor exited during start ({status}); it printed:"
            );
            eprint!("{}", last_lines(&out_path, 20));
            return Ok(ExitCode::FAILURE);
        }
        let status = match client::call(&socket, Request::Status {}, Some(POLL * 20), |_| Ok(())) {
            Ok(Reply::Status(status)) => Some(status),
            _ => None,
        };
        if let Some(status) = status {
            let failures = failures(&status);
            if !failures.is_empty() {
                eprintln!("clusterd: failed to start:");
                report_failures(&socket, &failures);
                stop_child(&socket, &mut child, manifest);
                return Ok(ExitCode::FAILURE);
            }
            if all_ready(&status) {
                let since = *up_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= SETTLE {
                    let workers: usize = status.apps.iter().map(|a| a.ready).sum();
                    println!(
                        "clusterd started in the background (pid {}): {} apps, {} workers ready; logs: {}",
                        status.pid,
                        status.apps.len(),
                        workers,
                        where_logs_go(manifest, &run_dir)
                    );
                    return Ok(ExitCode::SUCCESS);
                }
            } else {
                up_since = None;
            }
            if Instant::now() >= deadline {
                let waiting: Vec<String> = status
                    .apps
                    .iter()
                    .filter(|a| a.ready + a.done < a.desired)
                    .map(|a| format!("{} ({}/{} ready)", a.name, a.ready, a.desired - a.done))
                    .collect();
                eprintln!(
                    "clusterd: failed to start: not ready in time: {}",
                    waiting.join(", ")
                );
                let slots: Vec<(String, Option<usize>, String)> = status
                    .apps
                    .iter()
                    .filter(|a| a.ready + a.done < a.desired)
                    .map(|a| (a.name.clone(), None, String::new()))
                    .collect();
                report_failures(&socket, &slots);
                stop_child(&socket, &mut child, manifest);
                return Ok(ExitCode::FAILURE);
            }
        } else if Instant::now() >= deadline {
            eprintln!(
                "clusterd: the background supervisor did not answer on {} in time; it printed:",
                socket.display()
            );
            eprint!("{}", last_lines(&out_path, 20));
            let _ = child.kill();
            let _ = child.wait();
            return Ok(ExitCode::FAILURE);
        }
        std::thread::sleep(POLL);
    }
}

/// The longest a start may take: the slowest readiness, plus a margin.
fn start_timeout(manifest: &Manifest) -> Duration {
    let slowest = manifest
        .apps
        .values()
        .map(|app| match app.ready {
            Readiness::Delay(delay) | Readiness::ListenOrDelay(delay) => {
                delay.max(app.ready_timeout)
            }
            _ => app.ready_timeout,
        })
        .max()
        .unwrap_or_default();
    slowest + SETTLE + Duration::from_secs(10)
}

/// Whether the supervisor says it is ready (what `/readyz` answers).
fn all_ready(status: &Status) -> bool {
    status.ready
}

/// Slots whose worker exited or failed since the start: (app, slot, what happened). A
/// one-shot task that finished with exit 0 (`done`) did what it should.
fn failures(status: &Status) -> Vec<(String, Option<usize>, String)> {
    let mut found = Vec::new();
    for app in &status.apps {
        for worker in &app.workers {
            let finished = worker.done && worker.exit_code == Some(0);
            let exited = matches!(
                worker.state,
                WorkerState::Backoff | WorkerState::Failed | WorkerState::Exited
            ) && !finished
                || worker.restarts > 0;
            if worker.role == WorkerRole::Serving && exited {
                let what = match (&worker.last_exit, &worker.status_text) {
                    (Some(exit), _) => format!("{:?}, last exit: {exit}", worker.state),
                    (None, Some(text)) => format!("{:?}: {text}", worker.state),
                    (None, None) => format!("{:?}", worker.state),
                };
                found.push((app.name.clone(), Some(worker.slot), what.to_lowercase()));
            }
        }
    }
    found
}

/// Prints each failure and its worker's last lines.
fn report_failures(socket: &Path, failures: &[(String, Option<usize>, String)]) {
    for (app, slot, what) in failures {
        let label = match slot {
            Some(slot) => format!("{app}[{slot}]"),
            None => app.clone(),
        };
        if what.is_empty() {
            eprintln!("  {label}; its last lines:");
        } else {
            eprintln!("  {label}: {what}; its last lines:");
        }
        let request = Request::Logs {
            app: Some(app.clone()),
            slot: *slot,
            lines: FAILURE_LINES,
            follow: false,
        };
        let _ = client::call_streaming(socket, request, Some(Duration::from_secs(5)), |reply| {
            if let Reply::Log(line) = reply {
                let text = format::text_of_line(&line);
                eprint!("    {}", String::from_utf8_lossy(&text));
            }
            Ok(())
        });
    }
}

/// Stops the supervisor started by a failed detach, and waits for it (bounded).
fn stop_child(socket: &Path, child: &mut Child, manifest: &Manifest) {
    let _ = client::call(
        socket,
        Request::Stop {},
        Some(Duration::from_secs(5)),
        |_| Ok(()),
    );
    let deadline = Instant::now() + stop_timeout(Some(manifest));
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            eprintln!("clusterd: the supervisor was stopped");
            return;
        }
        std::thread::sleep(POLL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Where a detached supervisor's logs go, for people.
fn where_logs_go(manifest: &Manifest, run_dir: &RunDir) -> String {
    match &manifest.supervisor.log.target {
        None => run_dir.path.join("clusterd.log").display().to_string(),
        Some(LogTarget::Stdout) => run_dir.path.join("clusterd.out").display().to_string(),
        Some(LogTarget::Dir(dir)) => dir.display().to_string(),
        Some(LogTarget::File(file)) => file.display().to_string(),
    }
}

/// The last `n` lines of a file.
fn last_lines(path: &Path, n: usize) -> String {
    let Ok(file) = File::open(path) else {
        return String::new();
    };
    let lines: Vec<String> = io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .collect();
    let skip = lines.len().saturating_sub(n);
    lines[skip..].iter().map(|l| format!("  {l}\n")).collect()
}

/// The default wait of `clusterd stop`: the longest `stop_timeout`, plus a margin.
fn stop_timeout(manifest: Option<&Manifest>) -> Duration {
    let longest = manifest.map_or(Duration::from_secs(30), |m| {
        m.apps
            .values()
            .map(|a| a.stop_timeout)
            .chain([m.supervisor.stop_timeout])
            .max()
            .unwrap_or_default()
    });
    longest + STOP_MARGIN
}

/// `clusterd stop`: asks the supervisor to stop and (unless `no_wait`) waits until its
/// process has exited, at most `timeout` (default: the longest `stop_timeout` + 10 s).
pub fn stop(target: &Target, timeout: Option<Duration>, no_wait: bool) -> ExitCode {
    match stop_and_wait(target, timeout, no_wait) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("clusterd: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn stop_and_wait(
    target: &Target,
    timeout: Option<Duration>,
    no_wait: bool,
) -> anyhow::Result<ExitCode> {
    let socket = target.socket_path()?;
    let short = Some(Duration::from_secs(30));
    let pid = match client::call(&socket, Request::Status {}, short, |_| Ok(()))? {
        Reply::Status(status) => status.pid,
        other => anyhow::bail!("unexpected reply to status: {other:?}"),
    };
    match client::call(&socket, Request::Stop {}, short, |_| Ok(()))? {
        Reply::Done { .. } => {}
        Reply::Error { message, .. } => anyhow::bail!("{message}"),
        other => anyhow::bail!("unexpected reply to stop: {other:?}"),
    }
    if no_wait {
        println!("stopping (pid {pid})");
        return Ok(ExitCode::SUCCESS);
    }
    let timeout = timeout.unwrap_or_else(|| {
        let manifest = clusterd_manifest::load(&target.manifest).ok();
        stop_timeout(manifest.as_ref())
    });
    let deadline = Instant::now() + timeout;
    while !supervisor_gone(pid, &socket) {
        if Instant::now() >= deadline {
            eprintln!(
                "clusterd: pid {pid} is still running {} after the stop request \
                 (workers that ignore their stop signal are killed after their stop_timeout; \
                 see `clusterd status`)",
                humantime::format_duration(timeout)
            );
            return Ok(ExitCode::FAILURE);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("stopped (pid {pid})");
    Ok(ExitCode::SUCCESS)
}

/// Whether the supervisor that answered on `socket` as `pid` has exited. When `pid` is not a
/// clusterd process here (clusterd runs in another PID namespace, e.g. as PID 1 of a
/// container), what is seen of it is its run directory: the control socket no longer
/// answers and the pid file beside it is gone.
fn supervisor_gone(pid: u32, socket: &Path) -> bool {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() == "clusterd" {
        return !process_alive(pid);
    }
    std::os::unix::net::UnixStream::connect(socket).is_err()
        && !socket.with_file_name("clusterd.pid").exists()
}

/// Whether `pid` is a live process (a zombie has exited).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat.get(i + 2..)?.chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

/// `clusterd start --detach`: checks the manifest here (problems are reported to the caller),
/// then hands over to [`start_detached`].
pub fn start_detached_checked(
    path: &Path,
    run_dir: Option<&Path>,
    timeout: Option<Duration>,
) -> ExitCode {
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
    start_detached(&manifest, run_dir, timeout)
}

pub fn check(path: &Path) -> ExitCode {
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

pub fn start(path: &Path, run_dir: Option<&Path>, detached: bool) -> ExitCode {
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
            "{}: apps {} set intercept = true, but {}",
            manifest.path.display(),
            apps.join(", "),
            crate::error::Chain(&e)
        )
    })
}

pub fn run(args: &super::run::RunArgs) -> ExitCode {
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
                "{}
(the manifest these options make: clusterd run --print-manifest ...)",
                crate::error::Chain(&error)
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
