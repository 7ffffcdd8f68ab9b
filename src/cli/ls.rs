//! `clusterd ls` (PM2's `pm2 list` from anywhere): every supervisor of this user, found by
//! its run directory, with `--clean` to remove the stale ones.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clusterd_proto::{Reply, Request};
use nix::errno::Errno;
use nix::unistd::Pid;
use serde::Serialize;

use super::client;
use super::print_out;
use crate::daemon::rundir::RunDir;

/// How long one supervisor has to answer `status`.
const ANSWER: Duration = Duration::from_secs(2);

/// Files a supervisor leaves in a run directory it shares with nobody but itself.
const OWN_FILES: [&str; 3] = ["control.sock", "notify.sock", "clusterd.pid"];

/// What `clusterd ls` was asked for.
#[derive(Debug, clap::Args)]
pub struct LsArgs {
    /// Print JSON: one object per run directory.
    #[arg(long)]
    pub json: bool,
    /// Remove the stale run directories (no process behind the pid file and nothing listening
    /// on the control socket).
    #[arg(long)]
    pub clean: bool,
}

/// One run directory and what was found in it.
#[derive(Debug, Serialize)]
struct Entry {
    run_dir: PathBuf,
    /// `running`, `not answering` (its pid lives, its control socket did not answer) or
    /// `stale` (nothing lives there).
    state: &'static str,
    pid: Option<u32>,
    manifest: Option<String>,
    apps: Vec<App>,
    /// Why it is not `running`.
    reason: Option<String>,
    /// Whether the directory is clusterd's alone (under `$XDG_RUNTIME_DIR/clusterd/` or a
    /// `.clusterd/`), so `--clean` removes it whole; otherwise only its own files go.
    #[serde(skip)]
    owned: bool,
    /// With `--clean`: whether it was removed.
    #[serde(skip_serializing_if = "Option::is_none")]
    removed: Option<bool>,
}

/// An app of a running supervisor.
#[derive(Debug, Serialize)]
struct App {
    name: String,
    ready: usize,
    desired: usize,
}

/// `clusterd ls`.
pub fn ls(args: &LsArgs) -> ExitCode {
    let mut entries: Vec<Entry> = candidates().into_iter().map(inspect).collect();
    let mut failed = false;
    if args.clean {
        for entry in entries.iter_mut().filter(|e| e.state == "stale") {
            let removed = clean(entry);
            if let Err(error) = &removed {
                eprintln!(
                    "clusterd: cannot remove {}: {error}",
                    entry.run_dir.display()
                );
                failed = true;
            }
            entry.removed = Some(removed.is_ok());
        }
    }
    let written = if args.json {
        entries
            .iter()
            .try_for_each(|e| print_out(format_args!("{}\n", json(e))))
    } else {
        print_out(format_args!("{}", table(&entries)))
    };
    match written {
        Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => {
            eprintln!("clusterd: writing the list: {error}");
            ExitCode::FAILURE
        }
        _ if failed => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    }
}

fn json(entry: &Entry) -> String {
    serde_json::to_string(entry).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// Run directories to look at, each once: those under `$XDG_RUNTIME_DIR/clusterd/`, those
/// under `./.clusterd/` (started here without `XDG_RUNTIME_DIR`), and the run directory of
/// every `*.toml` here that exists (a manifest's own `run_dir`). Each with whether it is
/// clusterd's alone.
fn candidates() -> Vec<(PathBuf, Option<PathBuf>, bool)> {
    let mut seen = BTreeSet::new();
    let mut found = Vec::new();
    let mut add = |dir: PathBuf, manifest: Option<PathBuf>, owned: bool| {
        let key = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
        if dir.is_dir() && seen.insert(key) {
            found.push((dir, manifest, owned));
        }
    };
    let mut roots = Vec::new();
    if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        roots.push(PathBuf::from(runtime).join("clusterd"));
    }
    roots.push(PathBuf::from(".clusterd"));
    for root in roots {
        for dir in subdirectories(&root) {
            add(absolute(&dir), None, true);
        }
    }
    let mut manifests: Vec<PathBuf> = std::fs::read_dir(".")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml") && p.is_file())
        .collect();
    manifests.sort();
    for manifest in manifests {
        if let Ok(run_dir) = RunDir::for_manifest_file(&manifest, None) {
            add(absolute(&run_dir.path), Some(absolute(&manifest)), false);
        }
    }
    found
}

fn subdirectories(root: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Asks the supervisor of `run_dir` for its status; what the pid file says when it does not
/// answer.
fn inspect((run_dir, manifest, owned): (PathBuf, Option<PathBuf>, bool)) -> Entry {
    let dir = RunDir {
        path: run_dir.clone(),
    };
    let mut entry = Entry {
        run_dir,
        state: "running",
        pid: None,
        manifest: manifest.map(|m| m.display().to_string()),
        apps: Vec::new(),
        reason: None,
        owned,
        removed: None,
    };
    let answer = client::call(
        &dir.control_socket(),
        Request::Status {},
        Some(ANSWER),
        |_| Ok(()),
    );
    match answer {
        Ok(Reply::Status(status)) => {
            entry.pid = Some(status.pid);
            entry.manifest = Some(status.manifest);
            entry.apps = status
                .apps
                .into_iter()
                .map(|a| App {
                    name: a.name,
                    ready: a.ready,
                    desired: a.desired,
                })
                .collect();
            return entry;
        }
        Ok(other) => entry.reason = Some(format!("unexpected reply {other:?}")),
        Err(error) => entry.reason = Some(format!("{error:#}")),
    }
    let pid = std::fs::read_to_string(dir.pid_file())
        .ok()
        .and_then(|text| text.trim().parse::<i32>().ok())
        .filter(|pid| *pid > 0);
    entry.pid = pid.and_then(|p| u32::try_from(p).ok());
    let listening = std::os::unix::net::UnixStream::connect(dir.control_socket()).is_ok();
    let alive = pid.is_some_and(|pid| {
        !matches!(
            nix::sys::signal::kill(Pid::from_raw(pid), None),
            Err(Errno::ESRCH)
        )
    });
    if alive || listening {
        entry.state = "not answering";
    } else {
        entry.state = "stale";
        entry.reason = Some(match pid {
            Some(pid) => format!("pid {pid} is not running"),
            None => "no pid file and no control socket".to_owned(),
        });
    }
    entry
}

/// Removes a stale run directory: whole when it is clusterd's alone, else only the files a
/// supervisor leaves there (and the directory, if that empties it).
fn clean(entry: &Entry) -> std::io::Result<()> {
    if entry.owned {
        return std::fs::remove_dir_all(&entry.run_dir);
    }
    for name in OWN_FILES {
        match std::fs::remove_file(entry.run_dir.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    let _ = std::fs::remove_dir(&entry.run_dir);
    Ok(())
}

/// The table: state, pid, apps (ready/desired), manifest, run directory.
fn table(entries: &[Entry]) -> String {
    if entries.is_empty() {
        return "no supervisor found (run directories under $XDG_RUNTIME_DIR/clusterd/ and \
                ./.clusterd/, and those of ./*.toml)\n"
            .to_owned();
    }
    let mut text = format!(
        "{:<13} {:>8}  {:<24} {}\n",
        "STATE", "PID", "APPS", "MANIFEST / RUN DIR"
    );
    for entry in entries {
        let apps = if entry.apps.is_empty() {
            "-".to_owned()
        } else {
            entry
                .apps
                .iter()
                .map(|a| format!("{} {}/{}", a.name, a.ready, a.desired))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let state = match entry.removed {
            Some(true) => "removed",
            _ => entry.state,
        };
        let pid = entry.pid.map_or_else(|| "-".to_owned(), |p| p.to_string());
        text.push_str(&format!(
            "{state:<13} {pid:>8}  {apps:<24} {}\n",
            entry.manifest.as_deref().unwrap_or("-")
        ));
        text.push_str(&format!(
            "{:<13} {:>8}  {:<24} {}",
            "",
            "",
            "",
            entry.run_dir.display()
        ));
        if let Some(reason) = &entry.reason {
            text.push_str(&format!(" ({reason})"));
        }
        text.push('\n');
    }
    text
}
