//! The test harness: starts the real `clusterd` binary on a manifest in a fresh temp dir,
//! collects its output, and waits on conditions with deadlines (never fixed sleeps).
//!
//! - **Watchdog**: a thread holds a pidfd of the test's own supervisor and SIGKILLs it through
//!   that pidfd if it outlives [`WATCHDOG`], so no test can hang (and no other test's
//!   supervisor, nor a reused pid, is ever hit).
//! - **Leaks**: every supervisor is started with a mark of its own in its environment
//!   ([`MARK`]), which its workers and their descendants inherit. When a [`Clusterd`] is
//!   dropped, every process still carrying the mark is killed; if the supervisor had exited
//!   on its own (a stop, not a SIGKILL), a marked process that outlives it fails the test.
//! - **Skips**: a test that cannot run here calls [`skip`] or [`require`]: the reason is
//!   printed and counted (`scripts/test` reports it), and under CI a missing kernel feature
//!   fails the test instead.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

#[path = "../common/http.rs"]
mod http;
pub use http::http_get;

/// The longest any supervisor started by a test may live.
const WATCHDOG: Duration = Duration::from_secs(180);

/// The environment variable that marks the processes of one [`Clusterd`]: its value is unique
/// to each start, and everything the supervisor starts inherits it.
const MARK: &str = "CLUSTERD_TEST_MARK";

/// How long the processes of a supervisor that exited may take to be gone.
const LEFTOVER_WAIT: Duration = Duration::from_secs(10);

/// The built `clusterd` binary.
pub fn clusterd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_clusterd"))
}

/// A binary of the workspace's examples (`hello`, `kv-http`), built next to `clusterd`.
pub fn example_bin(name: &str) -> PathBuf {
    let path = clusterd_bin().with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (`cargo build --workspace`)",
        path.display()
    );
    path
}

/// Output lines collected from a process, shared with the reader threads.
#[derive(Default)]
struct Lines {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
    /// Streams that reached end of file.
    closed: Mutex<usize>,
}

/// A running `clusterd start` and its temp dir.
pub struct Clusterd {
    child: Child,
    lines: Arc<Lines>,
    /// The temp dir holding the manifest (and the run dir, `.clusterd/`).
    pub dir: tempfile::TempDir,
    /// The manifest's path.
    pub manifest: PathBuf,
    exit: Option<ExitStatus>,
    /// Whether the harness reads clusterd's stdout and stderr (see [`Clusterd::start_unread`]).
    reading: bool,
    /// The values of [`MARK`] of this supervisor's environment and of those it took over
    /// from (see [`Clusterd::start_again`]).
    marks: Vec<String>,
}

impl Clusterd {
    /// Writes `manifest` to `clusterd.toml` in a new temp dir and starts clusterd on it.
    /// `{hello}` in the manifest stands for the hello example's path, `{dir}` for the temp dir.
    pub fn start(manifest: &str) -> Self {
        Self::start_with(manifest, |_| {})
    }

    /// Like [`Clusterd::start`], with a chance to adjust the command first.
    pub fn start_with(manifest: &str, adjust: impl FnOnce(&mut Command)) -> Self {
        Self::start_full(manifest, &[], adjust)
    }

    /// Like [`Clusterd::start_with`], with clusterd exec'd by `sh -c 'LISTEN_PID=$$ exec ...'`
    /// so that `LISTEN_PID` is clusterd's own pid, as under systemd socket activation.
    pub fn start_activated(manifest: &str, adjust: impl FnOnce(&mut Command)) -> Self {
        Self::start_activated_with_files(manifest, &[], adjust)
    }

    /// Like [`Clusterd::start_activated`], after writing executable `files` into the temp dir
    /// (as [`Clusterd::start_with_files`] does).
    pub fn start_activated_with_files(
        manifest: &str,
        files: &[(&str, &str)],
        adjust: impl FnOnce(&mut Command),
    ) -> Self {
        Self::start_wrapped_with_files(
            manifest,
            files,
            &["sh", "-c", "LISTEN_PID=$$ exec \"$0\" \"$@\""],
            adjust,
        )
    }

    /// Like [`Clusterd::start_with`], with clusterd's command line run by `wrapper` (a
    /// program and its arguments, e.g. `unshare --pid --fork`).
    pub fn start_wrapped(
        manifest: &str,
        wrapper: &[&str],
        adjust: impl FnOnce(&mut Command),
    ) -> Self {
        Self::start_wrapped_with_files(manifest, &[], wrapper, adjust)
    }

    fn start_wrapped_with_files(
        manifest: &str,
        files: &[(&str, &str)],
        wrapper: &[&str],
        adjust: impl FnOnce(&mut Command),
    ) -> Self {
        Self::start_full(manifest, files, |command| {
            let args: Vec<_> = command.get_args().map(|a| a.to_owned()).collect();
            let mut wrapped = Command::new(wrapper[0]);
            wrapped
                .args(&wrapper[1..])
                .arg(clusterd_bin())
                .args(args)
                .current_dir(command.get_current_dir().expect("dir"))
                .env_remove("XDG_RUNTIME_DIR")
                .env("CLUSTERD_LOG", "debug")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            *command = wrapped;
            adjust(command);
        })
    }

    /// Like [`Clusterd::start`], after writing executable `files` (name, content; expanded
    /// like the manifest) into the temp dir.
    pub fn start_with_files(manifest: &str, files: &[(&str, &str)]) -> Self {
        Self::start_full(manifest, files, |_| {})
    }

    /// Like [`Clusterd::start_with_files`], but clusterd's stdout and stderr are pipes that
    /// nobody reads (they fill up); [`Clusterd::output`] stays empty.
    pub fn start_unread(manifest: &str, files: &[(&str, &str)]) -> Self {
        Self::start_inner(manifest, files, |_| {}, false)
    }

    /// The pipes of clusterd's stdout and stderr, while they are not read.
    pub fn unread_pipes(&self) -> Option<[std::os::fd::BorrowedFd<'_>; 2]> {
        use std::os::fd::AsFd;
        Some([
            self.child.stdout.as_ref()?.as_fd(),
            self.child.stderr.as_ref()?.as_fd(),
        ])
    }

    fn start_full(
        manifest: &str,
        files: &[(&str, &str)],
        adjust: impl FnOnce(&mut Command),
    ) -> Self {
        Self::start_inner(manifest, files, adjust, true)
    }

    fn start_inner(
        manifest: &str,
        files: &[(&str, &str)],
        adjust: impl FnOnce(&mut Command),
        reading: bool,
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, content) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().expect("a file in the dir")).expect("mkdir");
            write_executable(&path, &expand(content, dir.path()));
        }
        let text = expand(manifest, dir.path());
        let path = dir.path().join("clusterd.toml");
        std::fs::write(&path, text).expect("write manifest");
        Self::launch(dir, path, adjust, reading)
    }

    /// Starts clusterd again on this one's manifest and temp dir (so on the same run dir),
    /// after this one has exited (waited for, up to 10 s).
    pub fn start_again(mut self) -> Self {
        self.wait_exit(Duration::from_secs(10));
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
        let path = self.manifest.clone();
        let reading = self.reading;
        // What the first run left is the new run's to find (and, in the end, this harness's
        // to sweep).
        let marks = std::mem::take(&mut self.marks);
        drop(self);
        let mut again = Self::launch(dir, path, |_| {}, reading);
        again.marks.extend(marks);
        again
    }

    fn launch(
        dir: tempfile::TempDir,
        path: PathBuf,
        adjust: impl FnOnce(&mut Command),
        reading: bool,
    ) -> Self {
        let mut command = Command::new(clusterd_bin());
        command
            .arg("start")
            .arg(&path)
            .current_dir(dir.path())
            .env_remove("XDG_RUNTIME_DIR")
            .env("CLUSTERD_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        adjust(&mut command);
        // After `adjust`, which may replace the command (a wrapper).
        static STARTS: AtomicU64 = AtomicU64::new(0);
        let mark = format!(
            "{}-{}",
            std::process::id(),
            STARTS.fetch_add(1, Ordering::Relaxed)
        );
        command.env(MARK, &mark);
        let mut child = command.spawn().expect("spawn clusterd");
        let lines = Arc::new(Lines::default());
        if reading {
            collect(child.stdout.take().expect("stdout"), lines.clone());
            collect(child.stderr.take().expect("stderr"), lines.clone());
        }
        watchdog(Pid::from_raw(child.id() as i32));
        Clusterd {
            child,
            lines,
            dir,
            manifest: path,
            exit: None,
            reading,
            marks: vec![mark],
        }
    }

    /// clusterd's pid.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Everything printed so far, one line each.
    pub fn output(&self) -> String {
        self.lines.lines.lock().expect("lines").join("\n")
    }

    /// How many lines printed so far contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines
            .lines
            .lock()
            .expect("lines")
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until `n` lines contain `needle`; returns them. Panics with the output on timeout.
    pub fn wait_for_lines(&self, needle: &str, n: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.lines.lines.lock().expect("lines");
        loop {
            let found: Vec<String> = lines
                .iter()
                .filter(|l| l.contains(needle))
                .cloned()
                .collect();
            if found.len() >= n {
                return found;
            }
            let now = Instant::now();
            if now >= deadline {
                drop(lines);
                panic!(
                    "timed out waiting for {n} lines with {needle:?}; output:\n{}",
                    self.output()
                );
            }
            lines = self
                .lines
                .changed
                .wait_timeout(lines, deadline - now)
                .expect("lines")
                .0;
        }
    }

    /// clusterd's typed events named `event` so far (`log_format = "json"` for the
    /// supervisor), in order.
    pub fn events(&self, event: &str) -> Vec<serde_json::Value> {
        self.lines
            .lines
            .lock()
            .expect("lines")
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
            .filter(|v| v["event"] == event)
            .collect()
    }

    /// Waits for an event named `event` for which `condition` holds; returns it. Panics with
    /// the output on timeout.
    pub fn wait_event(
        &self,
        event: &str,
        timeout: Duration,
        condition: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        let mut lines = self.lines.lines.lock().expect("lines");
        loop {
            let found = lines
                .iter()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
                .find(|v| v["event"] == event && condition(v));
            if let Some(found) = found {
                return found;
            }
            let now = Instant::now();
            if now >= deadline {
                drop(lines);
                panic!(
                    "timed out waiting for event {event:?}; output:\n{}",
                    self.output()
                );
            }
            lines = self
                .lines
                .changed
                .wait_timeout(lines, deadline - now)
                .expect("lines")
                .0;
        }
    }

    /// Waits for one line containing `needle`.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for_lines(needle, 1, timeout).remove(0)
    }

    /// The address clusterd bound for socket `name`, from status (waiting, bounded, for
    /// clusterd to answer).
    pub fn socket_addr(&self, name: &str) -> SocketAddr {
        let mut last = serde_json::Value::Null;
        let mut address = None;
        let found = self.status_until(Duration::from_secs(20), |status| {
            last = status.clone();
            address = last["sockets"]
                .as_array()
                .and_then(|s| s.iter().find(|s| s["name"] == name))
                .and_then(|s| s["address"].as_str().map(str::to_owned));
            address.is_some()
        });
        assert!(
            found,
            "socket {name} is not in status: {last:#}\noutput:\n{}",
            self.output()
        );
        let address = address.expect("address");
        address
            .parse()
            .unwrap_or_else(|_| panic!("not an address: {address:?}"))
    }

    /// Where clusterd serves `/metrics` (`[metrics] listen`), from status.
    pub fn metrics_addr(&self) -> SocketAddr {
        let mut address = None;
        let found = self.status_until(Duration::from_secs(20), |status| {
            address = status["metrics"].as_str().and_then(|a| a.parse().ok());
            address.is_some()
        });
        assert!(found, "no metrics address in status:\n{}", self.output());
        address.expect("address")
    }

    /// The pid of the first worker started for `label` (`app[slot]`), waiting (bounded) for
    /// status to show one. If the slot has been restarted since, the first pid is no longer
    /// in status and comes from the first typed `started` event of the slot (a test that lets
    /// a slot restart before it asks sets `[supervisor] log_format = "json"`).
    pub fn first_pid(&self, label: &str) -> Pid {
        let (app, slot) = label
            .strip_suffix(']')
            .and_then(|l| l.split_once('['))
            .and_then(|(app, slot)| Some((app, slot.parse().ok()?)))
            .unwrap_or_else(|| panic!("not a worker label (`app[slot]`): {label:?}"));
        let worker = self.wait_worker(app, slot, Duration::from_secs(10), |w| !w["pid"].is_null());
        if worker["restarts"] == 0 && worker["generation"] == 1 {
            return json_pid(&worker);
        }
        let first = self.wait_event("started", Duration::from_secs(10), |e| {
            e["app"] == app && e["slot"] == slot
        });
        json_pid(&first)
    }

    /// Waits until status (once clusterd answers) shows the serving worker of `app` in `slot` with `condition`
    /// holding; returns it. Panics with the last status on timeout.
    pub fn wait_worker(
        &self,
        app: &str,
        slot: u64,
        timeout: Duration,
        mut condition: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        let mut found = None;
        let held = self.status_until(timeout, |status| {
            last = status.clone();
            found = worker_in(&last, app, slot).filter(|w| condition(w));
            found.is_some()
        });
        assert!(
            held,
            "timed out waiting for {app}[{slot}] in status: {last:#}\noutput:\n{}",
            self.output()
        );
        found.expect("found")
    }

    /// Waits until status shows `n` ready workers of `app` (`ready` of the app).
    pub fn wait_ready(&self, app: &str, n: u64, timeout: Duration) {
        let mut last = serde_json::Value::Null;
        let ready = self.status_until(timeout, |status| {
            last = status.clone();
            app_in(&last, app).is_some_and(|a| a["ready"].as_u64() >= Some(n))
        });
        assert!(
            ready,
            "timed out waiting for {n} ready workers of {app}: {last:#}\noutput:\n{}",
            self.output()
        );
    }

    /// Sends `signal` to clusterd.
    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("signal clusterd");
    }

    /// Waits for clusterd to exit; kills it and panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(status) = self.exit {
            return status;
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exit = Some(status);
                // Its last lines may still be on their way through the reader threads.
                let lines = self.lines.clone();
                assert!(
                    !self.reading
                        || wait_until(Duration::from_secs(5), || *lines
                            .closed
                            .lock()
                            .expect("closed")
                            == 2),
                    "clusterd's output did not reach end of file"
                );
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "clusterd did not exit within {timeout:?}; output:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs a control command against this supervisor: `clusterd ARGS... -f MANIFEST`.
    /// Its stdout and stderr are read while it runs (so a long answer never blocks it);
    /// panics if it has not finished within 60 s.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        let mut command = Command::new(clusterd_bin());
        command
            .args(args)
            .arg("-f")
            .arg(&self.manifest)
            .env_remove("XDG_RUNTIME_DIR");
        output_within(&mut command, Duration::from_secs(60))
            .unwrap_or_else(|| panic!("`clusterd {}` did not finish within 60s", args.join(" ")))
    }

    /// `clusterd status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let output = self.ctl(&["status", "--json"]);
        assert!(
            output.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("status JSON")
    }

    /// `clusterd status --json`, parsed; `None` while clusterd does not answer (not up yet,
    /// or gone).
    pub fn try_status(&self) -> Option<serde_json::Value> {
        let output = self.ctl(&["status", "--json"]);
        if !output.status.success() {
            return None;
        }
        Some(serde_json::from_slice(&output.stdout).expect("status JSON"))
    }

    /// Asks status (`null` while clusterd does not answer) until `condition` holds of it or
    /// `timeout` passes; returns whether it held. Each ask is a client process and a request
    /// to the loop, so the pause between asks grows from 10 ms to 200 ms: quick to notice
    /// what comes soon, light on a loaded machine for what takes long.
    pub fn status_until(
        &self,
        timeout: Duration,
        mut condition: impl FnMut(&serde_json::Value) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(10);
        loop {
            if condition(&self.try_status().unwrap_or_default()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// The serving workers of `app` in a status: (slot, pid, generation, state).
    pub fn serving(&self, app: &str) -> Vec<(u64, Pid, u64, String)> {
        let status = self.status();
        let apps = status["apps"].as_array().expect("apps");
        let app = apps
            .iter()
            .find(|a| a["name"] == app)
            .expect("app in status");
        app["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .filter(|w| w["role"] == "serving" && !w["pid"].is_null())
            .map(|w| {
                (
                    w["slot"].as_u64().expect("slot"),
                    Pid::from_raw(w["pid"].as_i64().expect("pid") as i32),
                    w["generation"].as_u64().expect("generation"),
                    w["state"].as_str().expect("state").to_owned(),
                )
            })
            .collect()
    }

    /// The pids of `app`'s serving workers, from status, in slot order.
    pub fn serving_pids(&self, app: &str) -> Vec<Pid> {
        self.serving(app).into_iter().map(|w| w.1).collect()
    }

    /// The control socket's path (in the run dir beside the manifest).
    pub fn control_socket(&self) -> PathBuf {
        self.dir.path().join(".clusterd/clusterd/control.sock")
    }

    /// Rewrites the manifest (same `{hello}`/`{dir}` expansion as at start).
    pub fn rewrite_manifest(&self, manifest: &str) {
        std::fs::write(&self.manifest, expand(manifest, self.dir.path()))
            .expect("rewrite manifest");
    }

    /// SIGTERM, then waits for a clean exit and returns its status.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait_exit(Duration::from_secs(30))
    }
}

impl Drop for Clusterd {
    /// Kills clusterd if it still runs, then every process it left (see [`MARK`]). If
    /// clusterd had exited on its own, anything it left is a leak and fails the test.
    fn drop(&mut self) {
        use std::os::unix::process::ExitStatusExt;
        let killed = match self.exit {
            None => {
                // SIGKILL: the workers follow through PR_SET_PDEATHSIG; what they started
                // (maybe in sessions of their own) is swept below.
                let _ = self.child.kill();
                let _ = self.child.wait();
                true
            }
            Some(status) => status.signal() == Some(libc::SIGKILL),
        };
        let mut left = Vec::new();
        let gone = wait_until(LEFTOVER_WAIT, || {
            left = marked(&self.marks);
            if killed {
                for pid in &left {
                    let _ = kill(*pid, Signal::SIGKILL);
                }
            }
            left.is_empty()
        });
        if gone {
            return;
        }
        let described: Vec<String> = left.iter().map(|p| describe(*p)).collect();
        for pid in &left {
            let _ = kill(*pid, Signal::SIGKILL);
        }
        if !std::thread::panicking() {
            panic!(
                "{} after clusterd {}: {}",
                if killed {
                    "processes survived SIGKILL"
                } else {
                    "processes left running"
                },
                if killed { "was killed" } else { "exited" },
                described.join(", ")
            );
        }
    }
}

/// Starts the watchdog of a supervisor: a thread that holds a pidfd of `pid` (our child, not
/// yet waited for, so the pid is still its own) and SIGKILLs it through that pidfd if it is
/// still running after [`WATCHDOG`]. The thread ends as soon as the process exits.
fn watchdog(pid: Pid) {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    assert!(
        fd >= 0,
        "pidfd_open({pid}): {} (Linux 5.3 or later is needed)",
        std::io::Error::last_os_error()
    );
    // SAFETY: a descriptor just returned to us and owned by nobody else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    std::thread::spawn(move || {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::{AsFd, AsRawFd};
        let deadline = Instant::now() + WATCHDOG;
        loop {
            // A pidfd is readable once its process has exited.
            let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
            let left = deadline.saturating_duration_since(Instant::now());
            let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            match poll(&mut fds, timeout) {
                Ok(0) if Instant::now() >= deadline => break,
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) | Err(_) => return,
            }
        }
        eprintln!("watchdog: clusterd {pid} outlived its test ({WATCHDOG:?}): killing it");
        // SAFETY: pidfd_send_signal on our own pidfd, no siginfo, no flags.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    });
}

/// Runs `command` with its stdout and stderr read by threads while it runs; `None` (after
/// killing it) if it has not finished within `timeout`.
pub fn output_within(command: &mut Command, timeout: Duration) -> Option<std::process::Output> {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = Pid::from_raw(child.id() as i32);
    let (done, finished) = std::sync::mpsc::channel();
    // wait_with_output reads both pipes while it waits.
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match finished.recv_timeout(timeout) {
        Ok(output) => Some(output.expect("output")),
        Err(_) => {
            // Not reaped yet (the thread still waits for it), so the pid is still its own.
            let _ = kill(pid, Signal::SIGKILL);
            let _ = finished.recv();
            None
        }
    }
}

/// Live processes whose environment has [`MARK`] set to one of `marks`.
fn marked(marks: &[String]) -> Vec<Pid> {
    if marks.is_empty() {
        return Vec::new();
    }
    let needles: Vec<String> = marks.iter().map(|m| format!("{MARK}={m}")).collect();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .map(Pid::from_raw)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                env.split(|b| *b == 0)
                    .any(|kv| needles.iter().any(|n| kv == n.as_bytes()))
            }) && alive(*pid)
        })
        .collect()
}

/// `pid (command line)`, for a message.
fn describe(pid: Pid) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let words: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    format!("{pid} ({})", words.join(" "))
}

/// Whether tests run under CI (`CI=true`), where a test that cannot run fails instead of
/// skipping.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Records that the calling test (named after its thread, as the test harness names them)
/// skips its checks, and why: printed, and appended to the file `CLUSTERD_TEST_SKIPS` names
/// (`scripts/test` counts them). For what a machine may
/// lack in CI too (e.g. root); see [`require`] for what CI must have.
pub fn skip(reason: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    eprintln!("SKIPPED: {test}: {reason}");
    if let Some(path) = std::env::var_os("CLUSTERD_TEST_SKIPS") {
        let line = format!("{test}: {}\n", reason.replace('\n', " "));
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
    }
}

/// A test that needs something CI must have (a kernel feature, a toolchain): under CI it
/// fails with `reason`; elsewhere it is a counted [`skip`].
pub fn require(reason: &str) {
    assert!(!under_ci(), "cannot run under CI: {reason}");
    skip(reason);
}

/// `app` in a status.
pub fn app_in<'a>(status: &'a serde_json::Value, app: &str) -> Option<&'a serde_json::Value> {
    status["apps"].as_array()?.iter().find(|a| a["name"] == app)
}

/// The serving worker (or empty slot) of `app` in `slot` in a status.
pub fn worker_in(status: &serde_json::Value, app: &str, slot: u64) -> Option<serde_json::Value> {
    app_in(status, app)?["workers"]
        .as_array()?
        .iter()
        .find(|w| w["slot"] == slot && w["role"] == "serving")
        .cloned()
}

/// The `pid` of a worker in a status.
pub fn json_pid(worker: &serde_json::Value) -> Pid {
    Pid::from_raw(worker["pid"].as_i64().expect("a pid") as i32)
}

/// Writes an executable file atomically (write a temp file, then rename), so that a
/// concurrent exec never sees it half-written.
pub fn write_executable(path: &Path, content: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).expect("write file");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Expands `{hello}` and `{dir}` in a manifest or script.
pub fn expand(manifest: &str, dir: &Path) -> String {
    let mut text = manifest.replace("{dir}", &dir.display().to_string());
    if text.contains("{hello}") {
        text = text.replace("{hello}", &example_bin("hello").display().to_string());
    }
    text
}

fn collect(stream: impl Read + Send + 'static, lines: Arc<Lines>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if std::env::var_os("CLUSTERD_TEST_ECHO").is_some() {
                eprintln!("{line}");
            }
            lines.lines.lock().expect("lines").push(line);
            lines.changed.notify_all();
        }
        *lines.closed.lock().expect("closed") += 1;
    });
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True while `pid` is a live process (not a zombie).
pub fn alive(pid: Pid) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rfind(')').and_then(|i| stat[i + 2..].chars().next()) != Some('Z'),
        Err(_) => false,
    }
}

/// The environment of a running process.
pub fn environ(pid: Pid) -> Vec<(String, String)> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).expect("read environ");
    raw.split(|b| *b == 0)
        .filter_map(|kv| {
            std::str::from_utf8(kv)
                .ok()?
                .split_once('=')
                .map(|(k, v)| (k.into(), v.into()))
        })
        .collect()
}

/// One environment variable of a running process.
pub fn env_var(pid: Pid, key: &str) -> Option<String> {
    environ(pid)
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

/// `GET /whoami` from the hello example: (slot, pid).
pub fn whoami(addr: SocketAddr) -> std::io::Result<(usize, Pid)> {
    let response = http_get(addr, "/whoami")?;
    let json: serde_json::Value =
        serde_json::from_str(&response.body).map_err(std::io::Error::other)?;
    let slot = json["slot"]
        .as_u64()
        .ok_or_else(|| std::io::Error::other("no slot"))? as usize;
    let pid = json["pid"]
        .as_i64()
        .ok_or_else(|| std::io::Error::other("no pid"))? as i32;
    Ok((slot, Pid::from_raw(pid)))
}
