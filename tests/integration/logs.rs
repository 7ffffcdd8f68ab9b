//! Logs (issue 11): files per app, rotation, SIGUSR1 reopen, JSON lines, `clusterd logs` and
//! its followers, `start --detach` and the waiting `stop`.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::util::{Clusterd, alive, clusterd_bin, expand, wait_until, whoami};

const SECOND: Duration = Duration::from_secs(1);

/// The lines of a file (none when it does not exist).
pub(crate) fn file_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A clusterd CLI command against `manifest` (`--file`, since `-f` is follow for `logs`).
pub(crate) fn cli(manifest: &Path, args: &[&str]) -> Output {
    let mut command = Command::new(clusterd_bin());
    command
        .args(args)
        .arg("--file")
        .arg(manifest)
        .env_remove("XDG_RUNTIME_DIR");
    crate::util::output_within(&mut command, 90 * SECOND)
        .unwrap_or_else(|| panic!("`clusterd {}` did not finish", args.join(" ")))
}

/// Whether `line` is `<RFC 3339 UTC time> <rest>`; returns the rest.
fn after_time(line: &str) -> Option<&str> {
    let (time, rest) = line.split_once(' ')?;
    humantime::parse_rfc3339(time).ok()?;
    Some(rest)
}

#[test]
fn lines_of_two_apps_land_in_their_files_timestamped_with_clusterd_events_beside() {
    let mut clusterd = Clusterd::start(
        r#"
[supervisor]
log = "logs/"
[apps.web]
command = ["sh", "-c", "echo web says hi; echo web complains >&2; exec sleep 1000"]
[apps.api]
command = ["sh", "-c", "echo api says hi; exec sleep 1000"]
"#,
    );
    let logs = clusterd.dir.path().join("logs");
    assert!(
        wait_until(10 * SECOND, || file_lines(&logs.join("web.log")).len() == 2
            && file_lines(&logs.join("api.log")).len() == 1),
        "web.log: {:?}, api.log: {:?}",
        file_lines(&logs.join("web.log")),
        file_lines(&logs.join("api.log"))
    );
    let web: BTreeSet<String> = file_lines(&logs.join("web.log"))
        .iter()
        .map(|l| after_time(l).expect("timestamped").to_owned())
        .collect();
    assert_eq!(
        web,
        BTreeSet::from(["web[0] web says hi".into(), "web[0]! web complains".into()])
    );
    let api = file_lines(&logs.join("api.log"));
    assert_eq!(after_time(&api[0]), Some("api[0] api says hi"));
    // Nothing of the workers on clusterd's own output; its events are in clusterd.log.
    assert_eq!(clusterd.count("says hi"), 0);
    let events = file_lines(&logs.join("clusterd.log"));
    assert!(
        events
            .iter()
            .any(|l| after_time(l)
                .is_some_and(|r| r.starts_with("clusterd INFO web[0] started pid"))),
        "{events:#?}"
    );
    assert!(clusterd.stop().success());
}

#[test]
fn rotation_at_the_size_keeps_the_number_of_files_asked() {
    let mut clusterd = Clusterd::start(
        r#"
[apps.web]
command = ["sh", "-c", "i=0; while [ $i -lt 400 ]; do i=$((i+1)); echo line $i of the rotation test; done; exec sleep 1000"]
log = "web.log"
log_max_size = "2K"
log_keep = 3
"#,
    );
    let path = clusterd.dir.path().join("web.log");
    let rotated = |i: usize| PathBuf::from(format!("{}.{i}", path.display()));
    assert!(
        wait_until(10 * SECOND, || file_lines(&path)
            .last()
            .is_some_and(|l| l.ends_with("line 400 of the rotation test"))),
        "{:?}",
        file_lines(&path).last()
    );
    for i in 1..=3 {
        let size = std::fs::metadata(rotated(i)).expect("rotated file").len();
        assert!(size <= 2048 && size > 1500, "{i}: {size} bytes");
    }
    assert!(!rotated(4).exists());
    // The newest lines are in order across the files: .3, .2, .1, then the file.
    let mut numbers = Vec::new();
    for file in [rotated(3), rotated(2), rotated(1), path.clone()] {
        for line in file_lines(&file) {
            let rest = after_time(&line).expect("timestamped");
            let n: u32 = rest
                .split(' ')
                .nth(2)
                .and_then(|n| n.parse().ok())
                .expect("number");
            numbers.push(n);
        }
    }
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
    assert_eq!(numbers.last(), Some(&400));
    assert!(clusterd.stop().success());
}

#[test]
fn sigusr1_after_a_move_reopens_the_file_and_no_line_is_lost() {
    const LINES: u32 = 300;
    let mut clusterd = Clusterd::start_with_files(
        r#"
[supervisor]
log = "logs/"
[apps.web]
command = ["{dir}/count.sh"]
"#,
        &[(
            "count.sh",
            "#!/bin/sh\ni=0\nwhile [ $i -lt 300 ]; do i=$((i+1)); echo count $i; sleep 0.01; done\nexec sleep 1000\n",
        )],
    );
    let logs = clusterd.dir.path().join("logs");
    let path = logs.join("web.log");
    let moved = logs.join("web.log.moved");
    assert!(wait_until(10 * SECOND, || file_lines(&path).len() >= 20));
    std::fs::rename(&path, &moved).expect("mv");
    clusterd.signal(Signal::SIGUSR1);
    assert!(
        wait_until(10 * SECOND, || path.exists()),
        "no new file after SIGUSR1"
    );
    let all = || {
        let mut lines = file_lines(&moved);
        lines.extend(file_lines(&path));
        lines
    };
    assert!(
        wait_until(30 * SECOND, || all().len() >= LINES as usize),
        "{} lines",
        all().len()
    );
    let numbers: Vec<u32> = all()
        .iter()
        .map(|l| {
            let rest = after_time(l).expect("timestamped");
            rest.rsplit(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .expect("number")
        })
        .collect();
    assert_eq!(numbers, (1..=LINES).collect::<Vec<_>>());
    assert!(!file_lines(&path).is_empty(), "the new file got lines");
    assert!(file_lines(&moved).len() >= 20);
    assert!(
        file_lines(&logs.join("clusterd.log"))
            .iter()
            .any(|l| l.ends_with("clusterd INFO SIGUSR1: log files reopened event=logs_reopened"))
    );
    assert!(clusterd.stop().success());
}

#[test]
fn json_lines_parse_with_every_field_and_binary_is_lossless() {
    let mut clusterd = Clusterd::start(
        r#"
[apps.web]
command = ["sh", "-c", "echo 'plain \"quoted\" text'; printf 'bin\\377\\376ary\\n' >&2; exec sleep 1000"]
log = "logs/"
log_format = "json"
"#,
    );
    let path = clusterd.dir.path().join("logs/web.log");
    assert!(wait_until(10 * SECOND, || file_lines(&path).len() == 2));
    let pid = clusterd.serving("web")[0].1.as_raw() as u64;
    let lines: Vec<serde_json::Value> = file_lines(&path)
        .iter()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    for line in &lines {
        assert!(humantime::parse_rfc3339(line["time"].as_str().expect("time")).is_ok());
        assert_eq!(line["app"], "web");
        assert_eq!(line["slot"], 0);
        assert_eq!(line["pid"], pid);
        assert_eq!(line["generation"], 1);
    }
    let stdout = lines
        .iter()
        .find(|l| l["stream"] == "stdout")
        .expect("stdout");
    assert_eq!(stdout["message"], "plain \"quoted\" text");
    assert!(stdout.get("base64").is_none());
    let stderr = lines
        .iter()
        .find(|l| l["stream"] == "stderr")
        .expect("stderr");
    assert_eq!(stderr["base64"], true);
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(stderr["message"].as_str().expect("message"))
        .expect("base64");
    assert_eq!(bytes, b"bin\xff\xfeary");
    assert!(clusterd.stop().success());
}

/// `clusterd logs -f ...` with its stdout read by a thread into a shared list.
struct Follower {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Follower {
    fn start(manifest: &Path, args: &[&str]) -> Self {
        let mut child = Command::new(clusterd_bin())
            .arg("logs")
            .args(args)
            .arg("--file")
            .arg(manifest)
            .env_remove("XDG_RUNTIME_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn clusterd logs");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout");
        let shared = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                shared.lock().expect("lines").push(line);
            }
        });
        Follower { child, lines }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A start, a crash, a reload and a stop, found by the JSON events' fields alone.
#[test]
fn json_events_carry_event_app_slot_pid_and_generation() {
    let mut clusterd = Clusterd::start(
        r#"
[supervisor]
log_format = "json"

[apps.web]
command = ["sh", "-c", "if [ -e '{dir}/crashed' ]; then exec sleep 1000; fi; touch '{dir}/crashed'; exit 3"]
"#,
    );
    let timeout = 20 * SECOND;
    let first = clusterd.wait_event("started", timeout, |e| {
        e["app"] == "web" && e["slot"] == 0 && e["generation"] == 1
    });
    assert_eq!(first["stream"], "log");
    assert_eq!(first["level"], "INFO");
    assert!(first["pid"].as_u64().is_some(), "{first}");
    assert!(
        first["command"]
            .as_str()
            .is_some_and(|c| c.starts_with("sh -c"))
    );

    // The crash: its pid, status and crash streak, then a new worker in the same slot.
    let crash = clusterd.wait_event("restarting", timeout, |e| e["pid"] == first["pid"]);
    assert_eq!((&crash["app"], &crash["slot"]), (&"web".into(), &0.into()));
    assert_eq!(crash["status"], "status 3");
    assert_eq!(crash["crash_streak"], 1);
    assert_eq!(crash["level"], "WARN");
    let second = clusterd.wait_event("started", timeout, |e| {
        e["slot"] == 0 && e["generation"] == 1 && e["pid"] != first["pid"]
    });
    let serving = clusterd.wait_worker("web", 0, timeout, |w| w["state"] == "ready");
    assert_eq!(serving["pid"], second["pid"]);

    // The reload: a rollout to generation 2, the new worker, the old one stopped, done.
    assert!(clusterd.ctl(&["reload", "web"]).status.success());
    clusterd.wait_event("rollout_started", timeout, |e| {
        e["app"] == "web" && e["generation"] == 2 && e["workers"] == 1
    });
    let third = clusterd.wait_event("started", timeout, |e| e["generation"] == 2);
    clusterd.wait_event("ready", timeout, |e| e["pid"] == third["pid"]);
    clusterd.wait_event("stopped", timeout, |e| {
        e["pid"] == second["pid"] && e["generation"] == 1 && e["slot"] == 0
    });
    clusterd.wait_event("rollout_done", timeout, |e| e["generation"] == 2);

    // The stop: clusterd says it stops its workers, then the worker's own exit.
    assert!(clusterd.stop().success());
    let stopping = clusterd.wait_event("stopping", timeout, |_| true);
    assert_eq!(stopping["workers"], 1);
    let last = clusterd.wait_event("stopped", timeout, |e| e["pid"] == third["pid"]);
    assert_eq!((&last["slot"], &last["generation"]), (&0.into(), &2.into()));
    assert!(
        last["status"]
            .as_str()
            .is_some_and(|s| s.contains("SIGTERM"))
    );
}

/// `clusterd logs --json` lines of clusterd's events (a text log here) as `clusterd logs`
/// returns them: with their fields.
fn json_events(manifest: &Path) -> Vec<serde_json::Value> {
    let output = cli(manifest, &["logs", "--json", "-n", "100", "clusterd"]);
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect()
}

#[test]
fn logs_json_carries_the_event_fields_and_they_cross_an_upgrade() {
    let mut clusterd = Clusterd::start(
        r#"
[apps.web]
command = ["sh", "-c", "exec sleep 1000"]
"#,
    );
    let worker = clusterd.wait_worker("web", 0, 20 * SECOND, |w| w["state"] == "ready");
    let pid = worker["pid"].clone();
    let started = |events: &[serde_json::Value]| {
        events
            .iter()
            .find(|e| e["event"] == "started" && e["pid"] == pid)
            .cloned()
    };
    // The log is text, yet what `clusterd logs` keeps is the event with its fields.
    let event = started(&json_events(&clusterd.manifest))
        .unwrap_or_else(|| panic!("no started event for {pid}"));
    assert_eq!(event["app"], "web");
    assert_eq!(event["slot"], 0);
    assert_eq!(event["generation"], 1);
    assert_eq!(event["stream"], "log");
    assert_eq!(event["level"], "INFO");
    assert_eq!(event["command"], "sh -c exec sleep 1000");
    // As text, it is clusterd's line with today's wording.
    let output = cli(&clusterd.manifest, &["logs", "-n", "100", "clusterd"]);
    let text = String::from_utf8(output.stdout).expect("utf-8");
    let expected = format!("clusterd INFO web[0] started pid {pid} (generation 1)");
    assert!(
        text.lines()
            .any(|l| after_time(l).is_some_and(|rest| rest.starts_with(&expected))),
        "{text}"
    );

    // Across an upgrade, the kept lines keep their fields.
    let upgrade = clusterd.ctl(&["upgrade"]);
    assert!(upgrade.status.success(), "{upgrade:?}");
    assert_eq!(clusterd.status()["upgrades"], 1);
    let after = started(&json_events(&clusterd.manifest))
        .unwrap_or_else(|| panic!("the started event of {pid} did not cross the upgrade"));
    assert_eq!(after, event);
    assert!(clusterd.stop().success());
}

#[test]
fn logs_prints_the_last_lines_and_follow_shows_new_ones() {
    let mut clusterd = Clusterd::start(
        r#"
[apps.web]
command = ["sh", "-c", "for i in $(seq 1 20); do echo line $i; done; while [ ! -e {dir}/go ]; do sleep 0.05; done; echo after the follower started; exec sleep 1000"]
[apps.api]
command = ["sh", "-c", "echo api line; exec sleep 1000"]
"#,
    );
    clusterd.wait_for_line("web[0] line 20", 10 * SECOND);
    clusterd.wait_for_line("api[0] api line", 10 * SECOND);
    let output = cli(&clusterd.manifest, &["logs", "-n", "5", "web"]);
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).expect("utf-8");
    let shown: Vec<&str> = text
        .lines()
        .map(|l| after_time(l).expect("timestamped"))
        .collect();
    assert_eq!(
        shown,
        [
            "web[0] line 16",
            "web[0] line 17",
            "web[0] line 18",
            "web[0] line 19",
            "web[0] line 20"
        ]
    );
    // Every app, and JSON.
    let output = cli(&clusterd.manifest, &["logs", "-n", "1", "--json"]);
    let lines: Vec<serde_json::Value> = String::from_utf8(output.stdout)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["app"] == "api" && l["message"] == "api line")
    );
    assert!(
        lines
            .iter()
            .any(|l| l["app"] == "web" && l["message"] == "line 20")
    );
    // An unknown app is an error.
    let output = cli(&clusterd.manifest, &["logs", "nope"]);
    assert_eq!(output.status.code(), Some(1));

    let follower = Follower::start(&clusterd.manifest, &["-f", "-n", "2", "web:0"]);
    assert!(wait_until(10 * SECOND, || follower.lines().len() == 2));
    std::fs::write(clusterd.dir.path().join("go"), "").expect("go");
    assert!(
        wait_until(10 * SECOND, || follower
            .lines()
            .iter()
            .any(|l| l.ends_with("web[0] after the follower started"))),
        "{:?}",
        follower.lines()
    );
    drop(follower);
    assert!(clusterd.stop().success());
}

#[test]
fn a_follower_that_never_reads_does_not_stall_the_supervisor() {
    let mut clusterd = Clusterd::start(
        r#"
[supervisor]
log = "logs/"
[apps.web]
command = ["sh", "-c", "while true; do seq 1 2000 | sed 's/^/a line of output that a follower will never read /'; sleep 0.05; done"]
workers = 2
"#,
    );
    assert!(wait_until(10 * SECOND, || clusterd
        .control_socket()
        .exists()));
    assert!(wait_until(10 * SECOND, || clusterd
        .serving("web")
        .iter()
        .filter(|(_, _, _, state)| state == "ready")
        .count()
        == 2));
    // Its stdout is a pipe nobody reads: it fills, the client stops reading its socket.
    let mut stalled = Command::new(clusterd_bin())
        .args(["logs", "-f"])
        .arg("--file")
        .arg(&clusterd.manifest)
        .env_remove("XDG_RUNTIME_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn follower");
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    while started.elapsed() < 8 * SECOND {
        let asked = Instant::now();
        assert_eq!(clusterd.serving("web").len(), 2);
        slowest = slowest.max(asked.elapsed());
    }
    assert!(slowest < 3 * SECOND, "status took {slowest:?}");
    // Workers are still replaced.
    let victim = clusterd.serving("web")[0].1;
    kill(victim, Signal::SIGKILL).expect("kill");
    assert!(wait_until(10 * SECOND, || {
        let serving = clusterd.serving("web");
        serving.len() == 2
            && serving
                .iter()
                .all(|(_, pid, _, state)| *pid != victim && state == "ready")
    }));
    // The lines keep reaching the file.
    let path = clusterd.dir.path().join("logs/web.log");
    let before = std::fs::metadata(&path).expect("web.log").len();
    assert!(wait_until(10 * SECOND, || std::fs::metadata(&path)
        .is_ok_and(|m| m.len() > before)));
    let _ = stalled.kill();
    let _ = stalled.wait();
    assert!(clusterd.stop().success());
}

/// A detached supervisor, killed if a test fails before it is stopped.
pub(crate) struct Detached {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) manifest: PathBuf,
    pub(crate) pid: Option<Pid>,
}

impl Detached {
    pub(crate) fn new(manifest: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("app.toml");
        std::fs::write(&path, expand(manifest, dir.path())).expect("manifest");
        Detached {
            dir,
            manifest: path,
            pid: None,
        }
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.path().join(".clusterd/app/clusterd.pid")
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        let pid = self.pid.or_else(|| {
            std::fs::read_to_string(self.pid_file())
                .ok()?
                .trim()
                .parse()
                .ok()
                .map(Pid::from_raw)
        });
        if let Some(pid) = pid
            && alive(pid)
        {
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
}

/// `clusterd start -d MANIFEST`, with its output.
pub(crate) fn start_detached(detached: &Detached) -> Output {
    Command::new(clusterd_bin())
        .args(["start", "-d"])
        .arg(&detached.manifest)
        .env_remove("XDG_RUNTIME_DIR")
        .stdin(Stdio::null())
        .output()
        .expect("clusterd start -d")
}

#[test]
fn start_detach_returns_once_workers_answer_and_stop_returns_once_it_is_gone() {
    let mut detached = Detached::new(
        r#"
[supervisor]
stop_timeout = "5s"
[sockets.http]
listen = "127.0.0.1:0"
[apps.web]
command = ["{hello}"]
workers = 2
sockets = ["http"]
ready = "notify"
"#,
    );
    let output = start_detached(&detached);
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("2 workers ready"));
    let status = cli(&detached.manifest, &["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status");
    let pid = Pid::from_raw(status["pid"].as_i64().expect("pid") as i32);
    detached.pid = Some(pid);
    assert_eq!(status["apps"][0]["ready"], 2);
    // Workers answer now, without waiting.
    let addr = status["sockets"][0]["address"]
        .as_str()
        .expect("address")
        .parse()
        .expect("an address");
    whoami(addr).expect("a worker answers");
    // Its log went to the run directory's clusterd.log.
    let log = file_lines(&detached.dir.path().join(".clusterd/app/clusterd.log"));
    assert!(
        log.iter().any(|l| l.contains("web[1] started pid")),
        "{log:#?}"
    );

    let output = cli(&detached.manifest, &["stop"]);
    assert!(output.status.success(), "{output:?}");
    assert!(!alive(pid), "stop returned before clusterd exited");
    assert!(!detached.pid_file().exists());
}

#[test]
fn start_detach_fails_with_the_reason_for_a_command_that_exits_at_once() {
    let detached = Detached::new(
        r#"
[apps.web]
command = ["sh", "-c", "echo 'cannot start: missing config file' >&2; exit 3"]
"#,
    );
    let output = start_detached(&detached);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("web[0]"), "{stderr}");
    assert!(stderr.contains("status 3"), "{stderr}");
    assert!(
        stderr.contains("web[0]! cannot start: missing config file"),
        "{stderr}"
    );
    // Nothing is left running.
    assert!(wait_until(10 * SECOND, || !detached.pid_file().exists()));
}

/// A one-shot task (a migration) beside a web app: it finishes, and that is no failure.
const ONE_SHOT: &str = r#"
[supervisor]
stop_timeout = "5s"
[sockets.http]
listen = "127.0.0.1:0"
[metrics]
listen = "127.0.0.1:0"
[apps.web]
command = ["{hello}"]
workers = 2
sockets = ["http"]
ready = "notify"
[apps.migrate]
command = ["sh", "-c", "echo migrated; exit 0"]
restart = "on-failure"
"#;

#[test]
fn start_detach_with_a_one_shot_beside_a_web_app_succeeds_and_readyz_counts_what_should_run() {
    let mut detached = Detached::new(ONE_SHOT);
    let output = start_detached(&detached);
    assert!(output.status.success(), "{output:?}");
    let json = || -> serde_json::Value {
        let status = cli(&detached.manifest, &["status", "--json"]);
        serde_json::from_slice(&status.stdout).expect("status")
    };
    let status = json();
    detached.pid = Some(Pid::from_raw(status["pid"].as_i64().expect("pid") as i32));
    // The migration is done (it may still have been running when start -d returned).
    let mut status = status;
    assert!(
        wait_until(10 * SECOND, || {
            status = json();
            status["apps"][0]["done"] == 1
        }),
        "{status}"
    );
    let migrate = &status["apps"][0];
    assert_eq!(migrate["name"], "migrate");
    let slot = &migrate["workers"][0];
    assert_eq!(
        (&slot["state"], &slot["done"], &slot["exit_code"]),
        (&"exited".into(), &true.into(), &0.into()),
        "{status}"
    );
    assert_eq!(status["ready"], true, "{status}");
    let check = cli(&detached.manifest, &["status", "--check"]);
    assert_eq!(check.status.code(), Some(0), "{check:?}");
    let table = cli(&detached.manifest, &["status"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("migrate: 0/0 ready, 1 done"), "{table}");
    // /readyz says the same.
    let metrics: std::net::SocketAddr = status["metrics"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no metrics address in {status}"));
    let readyz = crate::util::http_get(metrics, "/readyz").expect("readyz");
    assert_eq!(readyz.status, 200, "{}", readyz.body);
    assert!(cli(&detached.manifest, &["stop"]).status.success());
}

#[test]
fn start_detach_fails_when_a_one_shot_fails() {
    let detached = Detached::new(&ONE_SHOT.replace(
        r#"["sh", "-c", "echo migrated; exit 0"]
restart = "on-failure""#,
        r#"["sh", "-c", "echo 'migration failed' >&2; exit 4"]
restart = "never""#,
    ));
    let output = start_detached(&detached);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("migrate[0]"), "{stderr}");
    assert!(stderr.contains("status 4"), "{stderr}");
    assert!(wait_until(10 * SECOND, || !detached.pid_file().exists()));
}
