//! The feature × lifecycle matrix (issue 17, item 5): each feature runs under one supervisor
//! that walks every lifecycle event in turn — start (foreground or `-d`), rolling reload, a
//! SIGHUP re-read that changes an app, `clusterd upgrade`, SIGUSR1, scale up and down,
//! `restart APP:SLOT`, `kill -9` of a worker, stop — and after each event the same
//! invariants are checked by [`Matrix`]:
//!
//! - the app serves, with 0 failed requests under a small concurrent load for the events that
//!   promise it (all but `kill -9` and stop);
//! - the pids that should be kept are kept: all of them across an upgrade and SIGUSR1, the
//!   untouched slots across scale, `restart APP:SLOT` and `kill -9`; a rolled app has new pids
//!   of a newer generation; clusterd's own pid never changes;
//! - `status --json` tells the truth (every serving pid is alive and is the app and slot it
//!   says, by its environment), `status --check` and `/readyz` agree, and the log has a
//!   `started` event for every worker status shows (its typed fields in a JSON log, its
//!   wording in a text one);
//! - nothing leaks: clusterd holds no more sockets and pipes than it did with the same number
//!   of workers (nor a file twice, nor a log file it reopened), workers' cgroups are not inside clusterd's own, and after the stop every worker
//!   pid ever seen is gone and so is clusterd's cgroup tree.
//!
//! A case that fails does not end the walk: each event is one case, its failure is recorded
//! (the supervisor goes on if it can), and the test fails at the end with the table of every
//! case, so one run shows each feature × event that is broken.

mod features;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::util::{Clusterd, alive, clusterd_bin, env_var, http_get, wait_until};

const SECOND: Duration = Duration::from_secs(1);

/// How long a lifecycle event may take to settle (a rollout, an upgrade) on a loaded machine.
const SETTLE: Duration = Duration::from_secs(30);

/// A supervisor under test: started in the foreground (the harness's [`Clusterd`]) or with
/// `clusterd start -d` (then not our child: found through its pid file and control socket).
pub enum Supervisor {
    /// `clusterd start` or `clusterd run`, our child.
    Foreground(Clusterd),
    /// `clusterd start -d`.
    Detached(Detached),
}

/// A supervisor started with `clusterd start -d`, SIGKILLed on drop if still alive.
pub struct Detached {
    /// The temp dir holding the manifest.
    pub dir: tempfile::TempDir,
    /// The manifest's path.
    pub manifest: PathBuf,
    /// clusterd's pid, once known.
    pub pid: Option<Pid>,
}

impl Detached {
    /// Writes `manifest` (with `{dir}`, `{hello}` expanded) and executable `files` into a new
    /// temp dir and runs `clusterd start -d` on it; returns it and the command's output.
    pub fn start(manifest: &str, files: &[(&str, &str)]) -> (Detached, Output) {
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, content) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().expect("a file in the dir")).expect("mkdir");
            crate::util::write_executable(&path, &crate::util::expand(content, dir.path()));
        }
        let path = dir.path().join("app.toml");
        std::fs::write(&path, crate::util::expand(manifest, dir.path())).expect("manifest");
        let output = Command::new(clusterd_bin())
            .args(["start", "-d"])
            .arg(&path)
            .current_dir(dir.path())
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .stdin(Stdio::null())
            .output()
            .expect("clusterd start -d");
        let mut detached = Detached {
            dir,
            manifest: path,
            pid: None,
        };
        detached.pid = detached.pid_from_file();
        (detached, output)
    }

    /// The run dir's pid file.
    pub fn pid_file(&self) -> PathBuf {
        self.dir.path().join(".clusterd/app/clusterd.pid")
    }

    fn pid_from_file(&self) -> Option<Pid> {
        std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
            .map(Pid::from_raw)
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.or_else(|| self.pid_from_file())
            && alive(pid)
        {
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
}

/// Runs `clusterd ARGS... --file MANIFEST`, bounded to 60 s, its output read while it runs.
pub fn ctl_at(manifest: &Path, args: &[&str]) -> Output {
    let child = Command::new(clusterd_bin())
        .args(args)
        .arg("--file")
        .arg(manifest)
        .env_remove("XDG_RUNTIME_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn clusterd client");
    let pid = Pid::from_raw(child.id() as i32);
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + 60 * SECOND;
            while !done.load(Ordering::Relaxed) {
                if Instant::now() >= deadline {
                    // Still our unreaped child: the pid cannot have been reused.
                    let _ = kill(pid, Signal::SIGKILL);
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let output = child.wait_with_output().expect("client output");
    done.store(true, Ordering::Relaxed);
    watchdog.join().expect("client watchdog");
    output
}

impl Supervisor {
    /// The manifest the control commands name.
    pub fn manifest(&self) -> &Path {
        match self {
            Supervisor::Foreground(c) => &c.manifest,
            Supervisor::Detached(d) => &d.manifest,
        }
    }

    /// The temp dir of the run.
    pub fn dir(&self) -> &Path {
        match self {
            Supervisor::Foreground(c) => c.dir.path(),
            Supervisor::Detached(d) => d.dir.path(),
        }
    }

    /// clusterd's pid.
    pub fn pid(&self) -> Pid {
        match self {
            Supervisor::Foreground(c) => c.pid(),
            Supervisor::Detached(d) => d.pid.expect("the detached supervisor's pid"),
        }
    }

    /// clusterd's pid, if known (a failed `start -d` has none).
    pub fn known_pid(&self) -> Option<Pid> {
        match self {
            Supervisor::Foreground(c) => Some(c.pid()),
            Supervisor::Detached(d) => d.pid,
        }
    }

    /// `clusterd status --json`, once it answers (bounded).
    pub fn wait_status(&self) -> serde_json::Value {
        let mut status = None;
        wait_until(SETTLE, || {
            status = self.try_status();
            status.is_some()
        });
        status.expect("clusterd's status does not answer")
    }

    /// `clusterd ARGS... --file MANIFEST`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        ctl_at(self.manifest(), args)
    }

    /// `clusterd status --json`, parsed; panics with the client's words if it fails.
    pub fn status(&self) -> serde_json::Value {
        let output = self.ctl(&["status", "--json"]);
        assert!(
            output.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("status JSON")
    }

    /// `clusterd status --json`, parsed, or `None` if it does not answer (yet).
    pub fn try_status(&self) -> Option<serde_json::Value> {
        let output = self.ctl(&["status", "--json"]);
        if !output.status.success() {
            return None;
        }
        serde_json::from_slice(&output.stdout).ok()
    }

    /// Sends `signal` to clusterd.
    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("signal clusterd");
    }
}

/// What the walk expects of an app.
#[derive(Clone, Debug)]
pub enum Kind {
    /// Long-running: this many workers, all ready and serving when settled.
    Serving(usize),
    /// Its only slot was failed by `restart_limit` and stays failed.
    Failed,
    /// A one-shot task (`restart = "on-failure"`, exit 0): done, and not missing.
    OneShot,
}

/// What an event does to the workers, checked once it has settled.
#[derive(Clone, Debug)]
pub enum Expect {
    /// Every worker keeps its pid (upgrade, SIGUSR1).
    AllKept,
    /// Every worker of the app is new, of a newer generation; the others are kept.
    Rolled(&'static str),
    /// The slot's worker is new; every other worker is kept.
    Replaced(&'static str, u64),
    /// The app now has this many workers; the slots below both counts keep their pids.
    Scaled(&'static str, usize),
}

/// A lifecycle event, performed by [`Matrix::event`].
pub enum Event {
    /// `clusterd reload --wait APP`.
    Reload(&'static str),
    /// Rewrite the manifest with this text (it must change the app), then SIGHUP.
    Sighup(&'static str, String),
    /// SIGHUP with nothing to re-read (`clusterd run`): nothing changes.
    SighupNoFile,
    /// `clusterd upgrade` (to the same binary).
    Upgrade,
    /// SIGUSR1, after moving every `*.log` in these directories aside (as logrotate does).
    Usr1(Vec<PathBuf>),
    /// `clusterd scale APP N`.
    Scale(&'static str, usize),
    /// `clusterd restart APP:SLOT`.
    RestartSlot(&'static str, u64),
    /// `kill -9` of the slot's worker.
    Kill9(&'static str, u64),
    /// A feature's own event: its name and what to do (given the serving workers' pids).
    Custom(&'static str, std::cell::Cell<Option<CustomAction>>),
}

/// What an [`Event::Custom`] does, given the supervisor and the serving workers' pids.
pub type CustomAction = Box<dyn FnOnce(&Supervisor, &BTreeMap<(String, u64), Pid>)>;

impl Event {
    /// A feature's own event.
    pub fn custom(
        name: &'static str,
        action: impl FnOnce(&Supervisor, &BTreeMap<(String, u64), Pid>) + 'static,
    ) -> Event {
        Event::Custom(name, std::cell::Cell::new(Some(Box::new(action))))
    }
}

impl Event {
    fn name(&self) -> String {
        match self {
            Event::Reload(app) => format!("reload {app}"),
            Event::Sighup(app, _) => format!("SIGHUP changing {app}"),
            Event::SighupNoFile => "SIGHUP (no file)".into(),
            Event::Upgrade => "upgrade".into(),
            Event::Usr1(_) => "SIGUSR1".into(),
            Event::Scale(app, n) => format!("scale {app} {n}"),
            Event::RestartSlot(app, slot) => format!("restart {app}:{slot}"),
            Event::Kill9(app, slot) => format!("kill -9 {app}[{slot}]"),
            Event::Custom(name, _) => (*name).to_owned(),
        }
    }

    /// Whether the event promises that no request fails.
    fn promises_service(&self) -> bool {
        !matches!(self, Event::Kill9(..) | Event::Custom(..))
    }
}

/// Client threads sending `GET PATH` over fresh connections until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(usize, Vec<String>)>>,
}

impl Load {
    fn start(addr: SocketAddr, path: &'static str, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..clients)
            .map(|_| {
                let flag = stop.clone();
                std::thread::spawn(move || {
                    let (mut ok, mut failures) = (0, Vec::new());
                    while !flag.load(Ordering::Relaxed) {
                        match http_get(addr, path) {
                            Ok(r) if r.status == 200 => ok += 1,
                            Ok(r) => failures.push(format!("status {}: {}", r.status, r.body)),
                            Err(e) => failures.push(e.to_string()),
                        }
                    }
                    (ok, failures)
                })
            })
            .collect();
        Load { stop, threads }
    }

    /// Stops the clients: (answered, failures).
    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut ok, mut failures) = (0, Vec::new());
        for thread in self.threads {
            let (n, f) = thread.join().expect("load thread");
            ok += n;
            failures.extend(f);
        }
        (ok, failures)
    }
}

/// A serving worker as status shows it.
#[derive(Clone, Debug, PartialEq)]
struct Worker {
    pid: Pid,
    generation: u64,
}

type Workers = BTreeMap<(String, u64), Worker>;

/// A feature's own check, run after the common ones in every case (given the case's name).
type Check = Box<dyn Fn(&Matrix, &str)>;

/// One feature's walk through the lifecycle events, and the table of its cases.
pub struct Matrix {
    feature: &'static str,
    /// The supervisor under test.
    pub sup: Supervisor,
    apps: BTreeMap<&'static str, Kind>,
    /// Where the app answers (`GET path` must be 200), if it serves.
    pub serve: Option<(SocketAddr, &'static str)>,
    /// The metrics listener, for `/readyz`.
    pub metrics: Option<SocketAddr>,
    /// clusterd's events log file; `None`: the foreground harness's output.
    events_log: Option<PathBuf>,
    /// Whether `status --check` and `/readyz` must say ready when settled.
    readiness: bool,
    /// clusterd's descriptor count by number of live workers.
    fds: BTreeMap<usize, (usize, Vec<String>)>,
    /// Every worker pid ever seen.
    seen: BTreeSet<Pid>,
    /// clusterd's pid as first seen.
    pid: Option<Pid>,
    /// The cgroup tree clusterd made for its workers, if any.
    cgroup_tree: Option<PathBuf>,
    results: Vec<(String, Result<(), String>)>,
    /// Whether an upgrade was performed (later cases are named "... after upgrade").
    upgraded: bool,
    /// How later cases are named: "after upgrade" or "after a refused upgrade".
    after: &'static str,
    /// A check the feature adds to every case, after the common ones.
    extra: Option<Check>,
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

/// clusterd's open descriptors: (how many are not files, every target). Files (its log files)
/// are opened lazily and reopened on SIGUSR1, so they are checked by [`files_problem`].
fn open_fds(pid: Pid) -> (usize, Vec<String>) {
    let mut targets: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| {
                    let target = std::fs::read_link(e.path())
                        .map(|t| t.display().to_string())
                        .unwrap_or_default();
                    format!("{}={target}", e.file_name().to_string_lossy())
                })
                .collect()
        })
        .unwrap_or_default();
    targets.sort();
    let not_files = targets
        .iter()
        .filter(|t| {
            let target = t.split_once('=').map_or("", |(_, t)| t);
            !target.starts_with('/') || target == "/dev/null"
        })
        .count();
    (not_files, targets)
}

/// A file clusterd holds twice (stdin, stdout and stderr aside), or a log file moved aside
/// (for SIGUSR1) that it still holds.
fn files_problem(targets: &[String]) -> Option<String> {
    let files: Vec<&str> = targets
        .iter()
        .filter_map(|t| t.split_once('='))
        .filter(|(fd, t)| !["0", "1", "2"].contains(fd) && t.starts_with('/') && *t != "/dev/null")
        .map(|(_, t)| t)
        .collect();
    let unique: BTreeSet<&str> = files.iter().copied().collect();
    if unique.len() != files.len() {
        return Some(format!("a file is open twice: {files:?}"));
    }
    files
        .iter()
        .find(|f| f.contains(".log.moved"))
        .map(|f| format!("{f} is still open after the reopen"))
}

impl Matrix {
    /// A matrix over `sup`, whose `apps` are expected as given. The start case is recorded by
    /// [`Matrix::started`].
    pub fn new(feature: &'static str, sup: Supervisor, apps: &[(&'static str, Kind)]) -> Self {
        Matrix {
            feature,
            sup,
            apps: apps.iter().cloned().collect(),
            serve: None,
            metrics: None,
            events_log: None,
            readiness: true,
            fds: BTreeMap::new(),
            seen: BTreeSet::new(),
            pid: None,
            cgroup_tree: None,
            results: Vec::new(),
            upgraded: false,
            after: "",
            extra: None,
        }
    }

    /// The app answers `GET path` on `addr` with 200 (and is loaded during events).
    pub fn serving(mut self, addr: SocketAddr, path: &'static str) -> Self {
        self.serve = Some((addr, path));
        self
    }

    /// clusterd's events go to this file (relative to the temp dir).
    pub fn events_log(mut self, path: &str) -> Self {
        self.events_log = Some(self.sup.dir().join(path));
        self
    }

    /// `status --check` and `/readyz` are not checked (with why, for the table).
    pub fn without_readiness(mut self, why: &str) -> Self {
        eprintln!("matrix {}: readiness not checked: {why}", self.feature);
        self.readiness = false;
        self
    }

    /// A check run after the common ones in every case (given the case's name).
    pub fn with_check(mut self, check: impl Fn(&Matrix, &str) + 'static) -> Self {
        self.extra = Some(Box::new(check));
        self
    }

    /// Everything clusterd logged so far (its events), across rotated and moved files.
    pub fn log(&self) -> String {
        match (&self.events_log, &self.sup) {
            (Some(path), _) => log_files(path),
            (None, Supervisor::Foreground(c)) => c.output(),
            (None, Supervisor::Detached(_)) => String::new(),
        }
    }

    /// Runs `check` as the case `name` (named "... after upgrade" once an upgrade was
    /// performed), recording its outcome; false if it failed. Not run once clusterd is gone.
    pub fn case(&mut self, name: &str, check: impl FnOnce(&mut Matrix)) -> bool {
        let name = if self.upgraded {
            format!("{name} {}", self.after)
        } else {
            name.to_owned()
        };
        if self.pid.is_some() && !self.supervisor_alive() {
            self.results
                .push((name, Err("not run: clusterd is gone".to_owned())));
            return false;
        }
        self.run_case(&name, check)
    }

    /// Runs `check` as the case `name` whatever happened before.
    fn run_case(&mut self, name: &str, check: impl FnOnce(&mut Matrix)) -> bool {
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| check(self)));
        let took = started.elapsed();
        let outcome = outcome.map_err(panic_message);
        eprintln!(
            "matrix {} / {name}: {} in {took:.1?}",
            self.feature,
            if outcome.is_ok() { "ok" } else { "FAILED" }
        );
        let failed = outcome.is_err();
        self.results.push((name.to_owned(), outcome));
        !failed
    }

    /// Whether clusterd (as first seen) is still alive.
    pub fn supervisor_alive(&self) -> bool {
        self.pid.is_some_and(alive)
    }

    /// The start case: `first` (e.g. checking `start -d`'s output, finding the address),
    /// then the apps settle and every invariant holds.
    pub fn started(&mut self, how: &str, first: impl FnOnce(&mut Matrix)) -> bool {
        self.case(&format!("start ({how})"), |m| {
            m.pid = m.sup.known_pid();
            first(m);
            m.pid = Some(m.sup.pid());
            let before = Workers::new();
            m.settle_and_check(&before, None, "start");
        })
    }

    /// The serving workers (and one-shot/failed slots' states) in a status.
    fn workers(&self, status: &serde_json::Value) -> Workers {
        let mut workers = Workers::new();
        for app in status["apps"].as_array().expect("apps") {
            let name = app["name"].as_str().expect("name").to_owned();
            for w in app["workers"].as_array().expect("workers") {
                if w["role"] != "serving" {
                    continue;
                }
                let Some(pid) = w["pid"].as_i64() else {
                    continue;
                };
                workers.insert(
                    (name.clone(), w["slot"].as_u64().expect("slot")),
                    Worker {
                        pid: Pid::from_raw(pid as i32),
                        generation: w["generation"].as_u64().expect("generation"),
                    },
                );
            }
        }
        workers
    }

    /// Why the status is not settled yet, if it is not: every app as its [`Kind`] says, no
    /// rollout, no worker but the serving ones.
    fn unsettled(&self, status: &serde_json::Value) -> Option<String> {
        let apps = status["apps"].as_array().expect("apps");
        for (name, kind) in &self.apps {
            let Some(app) = apps.iter().find(|a| a["name"] == *name) else {
                return Some(format!("{name} is not in status"));
            };
            let workers = app["workers"].as_array().expect("workers");
            match kind {
                Kind::Serving(n) => {
                    if !app["reloading"].is_null() {
                        return Some(format!("{name}: a rollout is in progress"));
                    }
                    if app["desired"] != *n || app["ready"] != *n {
                        return Some(format!(
                            "{name}: {} of {} ready, expected {n}",
                            app["ready"], app["desired"]
                        ));
                    }
                    let serving = workers
                        .iter()
                        .filter(|w| w["role"] == "serving" && w["state"] == "ready")
                        .count();
                    if serving != *n || workers.len() != *n {
                        return Some(format!(
                            "{name}: {serving} serving ready workers of {} listed, expected {n}",
                            workers.len()
                        ));
                    }
                }
                Kind::Failed => {
                    if workers.len() != 1 || workers[0]["state"] != "failed" {
                        return Some(format!("{name}: not failed: {}", app["workers"]));
                    }
                }
                Kind::OneShot => {
                    if workers.iter().any(|w| !w["pid"].is_null()) {
                        return Some(format!("{name}: still running: {}", app["workers"]));
                    }
                }
            }
        }
        None
    }

    /// Waits until the apps settle, then checks the pid expectation against `before` and
    /// every invariant; returns the workers now.
    fn settle_and_check(
        &mut self,
        before: &Workers,
        expect: Option<&Expect>,
        case: &str,
    ) -> Workers {
        let mut why = None;
        let mut status = serde_json::Value::Null;
        let settled = wait_until(SETTLE, || {
            if !self.supervisor_alive() {
                why = Some("clusterd is gone".to_owned());
                return true;
            }
            let Some(now) = self.sup.try_status() else {
                why = Some("status does not answer".to_owned());
                return false;
            };
            status = now;
            why = self.unsettled(&status);
            why.is_none()
                && expect
                    .is_none_or(|e| self.expectation(before, &self.workers(&status), e).is_ok())
        });
        if !self.supervisor_alive() {
            let how = match &mut self.sup {
                Supervisor::Foreground(c) => c.wait_exit(10 * SECOND).to_string(),
                Supervisor::Detached(_) => "not our child".to_owned(),
            };
            panic!(
                "clusterd (pid {}) is gone ({how}); its log:\n{}",
                self.sup.pid(),
                self.tail()
            );
        }
        let now = self.workers(&status);
        assert!(
            settled,
            "not settled after {SETTLE:?}: {why:?}\nstatus: {status}"
        );
        if let Some(expect) = expect
            && let Err(error) = self.expectation(before, &now, expect)
        {
            panic!("{error}\nbefore: {before:?}\nnow: {now:?}");
        }
        self.check_invariants(&status, &now, case);
        now
    }

    /// The expectation `expect` between the workers `before` and `now`.
    fn expectation(&self, before: &Workers, now: &Workers, expect: &Expect) -> Result<(), String> {
        let kept = |key: &(String, u64)| -> Result<(), String> {
            match (before.get(key), now.get(key)) {
                (Some(b), Some(n)) if b.pid == n.pid => Ok(()),
                (b, n) => Err(format!("{}[{}] was not kept: {b:?} -> {n:?}", key.0, key.1)),
            }
        };
        let replaced = |key: &(String, u64)| -> Result<(), String> {
            match (before.get(key), now.get(key)) {
                (Some(b), Some(n)) if b.pid != n.pid => Ok(()),
                (b, n) => Err(format!(
                    "{}[{}] was not replaced: {b:?} -> {n:?}",
                    key.0, key.1
                )),
            }
        };
        for key in before.keys() {
            let app = key.0.as_str();
            match expect {
                Expect::AllKept => kept(key)?,
                Expect::Rolled(a) if *a == app => {
                    replaced(key)?;
                    if now[key].generation <= before[key].generation {
                        return Err(format!("{app}[{}]: generation did not grow", key.1));
                    }
                }
                Expect::Replaced(a, slot) if *a == app && *slot == key.1 => replaced(key)?,
                Expect::Scaled(a, n) if *a == app && key.1 >= *n as u64 => {}
                _ => kept(key)?,
            }
        }
        if let Expect::Scaled(a, n) = expect {
            let count = now.keys().filter(|k| k.0 == *a).count();
            if count != *n {
                return Err(format!("{a} has {count} workers, expected {n}"));
            }
        }
        Ok(())
    }

    /// The last lines of clusterd's log, for a failure message.
    fn tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The invariants every settled case checks.
    fn check_invariants(&mut self, status: &serde_json::Value, now: &Workers, case: &str) {
        // clusterd is the same process.
        let pid = self.pid.expect("clusterd's pid");
        assert_eq!(
            status["pid"].as_i64(),
            Some(i64::from(pid.as_raw())),
            "clusterd's pid changed"
        );

        // Status tells the truth: each worker is alive and is who status says.
        for ((app, slot), worker) in now {
            assert!(
                alive(worker.pid),
                "{app}[{slot}] pid {} in status is not alive",
                worker.pid
            );
            assert_eq!(
                env_var(worker.pid, "CLUSTERD_APP").as_deref(),
                Some(app.as_str()),
                "pid {} is not {app}'s",
                worker.pid
            );
            assert_eq!(
                env_var(worker.pid, "CLUSTERD_WORKER_ID"),
                Some(slot.to_string()),
                "pid {} is not slot {slot}",
                worker.pid
            );
            self.seen.insert(worker.pid);
        }

        // Readiness agrees.
        if self.readiness {
            assert_eq!(
                status["ready"], true,
                "status says not ready: {}",
                status["not_ready"]
            );
            let check = self.sup.ctl(&["status", "--check"]);
            assert_eq!(
                check.status.code(),
                Some(0),
                "status --check: {}{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
            if let Some(metrics) = self.metrics {
                let readyz = http_get(metrics, "/readyz").expect("GET /readyz");
                assert_eq!(readyz.status, 200, "/readyz: {}", readyz.body);
            }
        }

        // The app serves.
        if let Some((addr, path)) = self.serve {
            for _ in 0..5 {
                let response = http_get(addr, path).expect("a request after the event");
                assert_eq!(response.status, 200, "{}", response.body);
            }
        }

        // The log tells the truth: every worker status shows was logged as started.
        let mut missing = Vec::new();
        let logged = wait_until(10 * SECOND, || {
            let started = started_in(&self.log());
            missing = now
                .iter()
                .filter(|((app, slot), w)| !started.contains(&(app.clone(), *slot, w.pid)))
                .map(|(k, w)| format!("{}[{}] pid {}", k.0, k.1, w.pid))
                .collect();
            missing.is_empty()
        });
        assert!(
            logged,
            "not in clusterd's log as started: {missing:?}\n{}",
            self.tail()
        );
        // And so does `clusterd logs clusterd`, the ring of clusterd's events it keeps.
        let ring = self.sup.ctl(&["logs", "clusterd", "-n", "2000"]);
        let ring = String::from_utf8_lossy(&ring.stdout).into_owned();
        let missing: Vec<String> = now
            .iter()
            .map(|((app, slot), w)| format!("{app}[{slot}] started pid {} ", w.pid))
            .filter(|line| !ring.contains(line.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "not in `clusterd logs clusterd`: {missing:?}"
        );

        // Contained beside clusterd: where clusterd made a cgroup tree (status says so), no
        // worker's cgroup lies inside clusterd's own (a cgroup v2 parent with processes cannot
        // enable controllers for its children). Vacuous in the root cgroup.
        if let Some(tree) = status["containment"]
            .as_str()
            .and_then(|c| c.strip_prefix("cgroup v2 ("))
            .and_then(|c| c.strip_suffix(')'))
        {
            self.cgroup_tree.get_or_insert_with(|| PathBuf::from(tree));
            let own = cgroup_of(pid).expect("clusterd's cgroup");
            for ((app, slot), worker) in now {
                let theirs = cgroup_of(worker.pid).unwrap_or_default();
                assert!(
                    own == "/" || !theirs.starts_with(&format!("{own}/")),
                    "{app}[{slot}]'s cgroup {theirs} is inside clusterd's own {own}"
                );
            }
        }

        // No descriptor leaked: no more sockets, pipes and other non-files than the last time
        // this many workers ran (fewer is fine: a descriptor of the start-up may close later),
        // no file held twice, no log file held once it was moved aside and reopened.
        let workers = now.len();
        let baseline = self.fds.get(&workers).cloned();
        let mut fds = open_fds(pid);
        let held = wait_until(10 * SECOND, || {
            fds = open_fds(pid);
            baseline.as_ref().is_none_or(|(count, _)| fds.0 <= *count)
                && files_problem(&fds.1).is_none()
        });
        if !held {
            let (count, targets) = baseline.clone().unwrap_or((fds.0, Vec::new()));
            assert!(
                fds.0 <= count,
                "clusterd holds {} descriptors that are not files, {count} before with \
                 {workers} workers; before: {targets:?}\nnow: {:?}",
                fds.0,
                fds.1
            );
            panic!("{}", files_problem(&fds.1).unwrap_or_default());
        }
        if let Some((count, targets)) = baseline
            && fds.0 >= count
        {
            fds = (count, targets);
        }
        self.fds.insert(workers, fds);

        if let Some(extra) = &self.extra {
            extra(self, case);
        }
    }

    /// Performs `event` under load where it promises service, then waits for `expect` and
    /// checks every invariant.
    pub fn event(&mut self, event: Event, expect: Expect) -> bool {
        let name = event.name();
        let upgrade = matches!(event, Event::Upgrade);
        let passed = self.case(&name.clone(), |m| {
            let before = m.workers(&m.sup.status());
            let load = match (m.serve, event.promises_service()) {
                (Some((addr, path)), true) => Some(Load::start(addr, path, 3)),
                _ => None,
            };
            let upgrades = m.sup.status()["upgrades"].as_u64();
            let usr1_before = m.log().matches("SIGUSR1: log files reopened").count();
            let upgraded_before = m.log().matches("upgraded in place from clusterd").count();
            if let Expect::Scaled(app, n) = expect {
                m.apps.insert(app, Kind::Serving(n));
            }
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                m.perform(&event, &before);
                m.settle_and_check(&before, Some(&expect), &name);
            }))
            .map_err(panic_message);
            let served = match load {
                Some(load) => {
                    let (answered, failures) = load.finish();
                    if failures.is_empty() {
                        Ok(())
                    } else {
                        Err(format!(
                            "{} of {} requests failed during {name}: {:?}",
                            failures.len(),
                            answered + failures.len(),
                            &failures[..failures.len().min(5)]
                        ))
                    }
                }
                None => Ok(()),
            };
            match (outcome, served) {
                (Ok(()), Ok(())) => {}
                (Err(e), Ok(())) | (Ok(()), Err(e)) => panic!("{e}"),
                (Err(e), Err(f)) => panic!("{e}\nand {f}"),
            }
            match &event {
                Event::Upgrade => {
                    assert_eq!(
                        m.sup.status()["upgrades"].as_u64(),
                        upgrades.map(|u| u + 1),
                        "status does not count the upgrade"
                    );
                    // The new clusterd logs where the old one did.
                    let logged = wait_until(10 * SECOND, || {
                        m.log().matches("upgraded in place from clusterd").count() > upgraded_before
                    });
                    assert!(
                        logged,
                        "no `upgraded in place` in clusterd's log (its events go elsewhere):\n{}",
                        m.tail()
                    );
                }
                Event::Usr1(dirs) => {
                    let reopened = wait_until(10 * SECOND, || {
                        m.log().matches("SIGUSR1: log files reopened").count() > usr1_before
                    });
                    assert!(
                        reopened,
                        "no `log files reopened` in clusterd's log:\n{}",
                        m.tail()
                    );
                    for dir in dirs {
                        for fresh in moved_logs(dir) {
                            assert!(
                                wait_until(10 * SECOND, || fresh.exists()),
                                "{} was not opened again",
                                fresh.display()
                            );
                        }
                    }
                }
                _ => {}
            }
        });
        if !self.upgraded {
            // Later cases run after an upgrade, or after one that was refused.
            let upgrades = match self.supervisor_alive() {
                true => self.sup.try_status().and_then(|s| s["upgrades"].as_u64()),
                false => None,
            };
            if upgrades.is_some_and(|u| u > 0) || (upgrade && upgrades.is_none()) {
                (self.upgraded, self.after) = (true, "after upgrade");
            } else if upgrade {
                (self.upgraded, self.after) = (true, "after a refused upgrade");
            }
        }
        passed
    }

    fn perform(&mut self, event: &Event, before: &Workers) {
        let ok = |output: Output, what: &str| {
            assert!(
                output.status.success(),
                "{what}: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        };
        match event {
            Event::Reload(app) => ok(self.sup.ctl(&["reload", "--wait", app]), "reload"),
            Event::Sighup(_, manifest) => {
                std::fs::write(
                    self.sup.manifest(),
                    crate::util::expand(manifest, self.sup.dir()),
                )
                .expect("rewrite manifest");
                self.sup.signal(Signal::SIGHUP);
            }
            Event::SighupNoFile => self.sup.signal(Signal::SIGHUP),
            Event::Upgrade => {
                let output = self.sup.ctl(&["upgrade"]);
                let said = String::from_utf8_lossy(&output.stdout).into_owned();
                ok(output, "upgrade");
                let n = before.len();
                assert!(said.contains(&format!("{n} workers kept")), "{said}");
            }
            Event::Usr1(dirs) => {
                for dir in dirs {
                    for entry in std::fs::read_dir(dir).expect("log dir").flatten() {
                        let path = entry.path();
                        if path.extension().is_some_and(|e| e == "log") {
                            let mut n = 0;
                            let moved = loop {
                                n += 1;
                                let moved = path.with_extension(format!("log.moved{n}"));
                                if !moved.exists() {
                                    break moved;
                                }
                            };
                            std::fs::rename(&path, moved).expect("move the log aside");
                        }
                    }
                }
                self.sup.signal(Signal::SIGUSR1);
            }
            Event::Scale(app, n) => ok(self.sup.ctl(&["scale", app, &n.to_string()]), "scale"),
            Event::RestartSlot(app, slot) => ok(
                self.sup.ctl(&["restart", &format!("{app}:{slot}")]),
                "restart",
            ),
            Event::Kill9(app, slot) => {
                let worker = &before[&(app.to_string(), *slot)];
                kill(worker.pid, Signal::SIGKILL).expect("kill -9 the worker");
            }
            Event::Custom(_, action) => {
                let pids = before.iter().map(|(k, w)| (k.clone(), w.pid)).collect();
                (action.take().expect("a custom action runs once"))(&self.sup, &pids);
            }
        }
    }

    /// `clusterd stop`; then clusterd and every worker pid ever seen are gone. Then prints
    /// the table of cases and fails the test if any case failed.
    pub fn stop_and_report(mut self, after: impl FnOnce(&Matrix)) {
        let was_alive = self.supervisor_alive();
        if was_alive {
            self.case("stop", |m| {
                let output = m.sup.ctl(&["stop"]);
                assert!(
                    output.status.success(),
                    "stop: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
                if let Supervisor::Foreground(c) = &mut m.sup {
                    assert!(c.wait_exit(30 * SECOND).success(), "clusterd's exit status");
                }
                assert!(
                    !m.supervisor_alive(),
                    "stop returned before clusterd exited"
                );
                after(m);
            });
        } else {
            self.results
                .push(("stop".into(), Err("not run: clusterd is gone".into())));
        }
        self.run_case("nothing left after stop", |m| {
            let left: Vec<Pid> = {
                let mut left = Vec::new();
                wait_until(10 * SECOND, || {
                    left = m.seen.iter().copied().filter(|p| alive(*p)).collect();
                    left.is_empty()
                });
                left
            };
            assert!(
                left.is_empty(),
                "workers still alive after the stop: {left:?}"
            );
            if let Some(tree) = &m.cgroup_tree {
                assert!(!tree.exists(), "{} is left after the stop", tree.display());
            }
            if let Supervisor::Detached(d) = &m.sup {
                assert!(!d.pid_file().exists(), "the pid file is left");
            }
        });
        self.report();
    }

    fn report(&self) {
        let mut table = format!("matrix {}:\n", self.feature);
        for (name, outcome) in &self.results {
            match outcome {
                Ok(()) => table.push_str(&format!("  ok      {name}\n")),
                Err(e) => table.push_str(&format!(
                    "  FAILED  {name}: {}\n",
                    e.lines().take(12).collect::<Vec<_>>().join("\n          ")
                )),
            }
        }
        eprintln!("{table}");
        assert!(self.results.iter().all(|(_, o)| o.is_ok()), "{table}");
    }
}

/// The cgroup v2 path of `pid` (`0::PATH` in /proc/PID/cgroup).
fn cgroup_of(pid: Pid) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// The logs moved aside in `dir` (`NAME.log.movedN`), by the name each came from.
fn moved_logs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.extension()
                        .is_some_and(|e| e.to_string_lossy().starts_with("moved"))
                })
                .map(|p| p.with_extension(""))
                .collect()
        })
        .unwrap_or_default()
}

/// The text of the log file `path` with its rotated (`.1`...) and moved-aside versions.
/// The workers a log says were started, as (app, slot, pid): from the typed `started` events
/// of a JSON log (`event`, `app`, `slot`, `pid`), and from a text log by the text format's
/// wording (`web[0] started pid 123 `), which is what that format promises its readers.
fn started_in(log: &str) -> BTreeSet<(String, u64, Pid)> {
    log.lines()
        .filter_map(
            |line| match serde_json::from_str::<serde_json::Value>(line.trim()) {
                Ok(event) if event["event"] == "started" => Some((
                    event["app"].as_str()?.to_owned(),
                    event["slot"].as_u64()?,
                    Pid::from_raw(i32::try_from(event["pid"].as_i64()?).ok()?),
                )),
                Ok(_) => None,
                Err(_) => {
                    let (label, rest) = line.split_once(" started pid ")?;
                    let label = label.rsplit(' ').next()?;
                    let (app, slot) = label.strip_suffix(']')?.split_once('[')?;
                    let pid = rest.split(' ').next()?.parse().ok()?;
                    Some((app.to_owned(), slot.parse().ok()?, Pid::from_raw(pid)))
                }
            },
        )
        .collect()
}

pub fn log_files(path: &Path) -> String {
    let name = path
        .file_name()
        .expect("a file")
        .to_string_lossy()
        .into_owned();
    let mut files: Vec<PathBuf> = std::fs::read_dir(path.parent().expect("a dir"))
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(&name))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}
