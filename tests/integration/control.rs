//! The control socket: status, permissions, robustness against bad clients, reload --wait.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::util::{Clusterd, alive, wait_until};

const SECOND: Duration = Duration::from_secs(1);

const HELLO: &str = r#"
[sockets.http]
listen = "127.0.0.1:0"

[apps.web]
command = ["{hello}"]
workers = 3
sockets = ["http"]
ready = "notify"
ready_timeout = "5s"
"#;

#[test]
fn status_pids_match_the_live_workers_and_track_a_crash() {
    let mut clusterd = Clusterd::start(HELLO);
    clusterd.wait_ready("web", 3, 20 * SECOND);
    let serving = clusterd.serving("web");
    assert_eq!(serving.len(), 3);
    let status = clusterd.status();
    for (slot, pid, generation, state) in &serving {
        assert!(alive(*pid));
        // The first worker of its slot.
        let worker = crate::util::worker_in(&status, "web", *slot).expect("worker");
        assert_eq!(worker["restarts"], 0, "{worker}");
        assert_eq!((*generation, state.as_str()), (1, "ready"));
    }

    let (_, victim, _, _) = serving[1];
    nix::sys::signal::kill(victim, Signal::SIGKILL).expect("kill");
    assert!(
        wait_until(10 * SECOND, || {
            let status = clusterd.status();
            let slot = &status["apps"][0]["workers"]
                .as_array()
                .expect("workers")
                .iter()
                .find(|w| w["slot"] == 1)
                .cloned();
            slot.as_ref().is_some_and(|w| {
                w["restarts"] == 1
                    && w["last_exit"]
                        .as_str()
                        .is_some_and(|e| e.contains("SIGKILL"))
                    && w["pid"]
                        .as_i64()
                        .is_some_and(|p| p != i64::from(victim.as_raw()))
                    && w["state"] == "ready"
            })
        }),
        "status never showed the restart: {}",
        clusterd.status()
    );

    let table = String::from_utf8(clusterd.ctl(&["status"]).stdout).expect("utf8");
    assert!(table.contains("web: 3/3 ready"), "{table}");
    assert!(table.lines().all(|l| l.chars().count() <= 80), "{table}");
    assert!(clusterd.stop().success());
}

#[test]
fn the_socket_is_private_and_other_uids_are_refused() {
    let mut clusterd = Clusterd::start(HELLO);
    clusterd.wait_ready("web", 3, 20 * SECOND);
    let socket = clusterd.control_socket();
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let dir_mode = std::fs::metadata(socket.parent().expect("dir"))
        .expect("dir")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700);

    if nix::unistd::getuid().is_root() {
        // Open the file permissions wide so that only the peer-credential check stands in the
        // way, then talk as `nobody`.
        for dir in socket.ancestors().skip(1).take(3) {
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777));
        }
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let output = std::process::Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(crate::util::clusterd_bin())
            .arg("status")
            .arg("--socket")
            .arg(&socket)
            .output()
            .expect("setpriv");
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("permission denied"), "{stderr}");
        clusterd.wait_for_line("refused a client with uid 65534", 5 * SECOND);
    } else {
        crate::util::skip("not root: the other-uid part of this test needs setpriv as root");
    }
    assert!(clusterd.stop().success());
}

/// Sends raw bytes and returns the one reply line (or what arrived before the close).
fn raw_exchange(socket: &std::path::Path, bytes: &[u8], close_write: bool) -> String {
    let mut stream = UnixStream::connect(socket).expect("connect");
    stream.set_read_timeout(Some(10 * SECOND)).expect("timeout");
    let _ = stream.write_all(bytes);
    if close_write {
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
    let mut line = String::new();
    let _ = BufReader::new(stream).read_line(&mut line);
    line
}

#[test]
fn bad_clients_get_errors_and_status_keeps_answering() {
    let mut clusterd = Clusterd::start(HELLO);
    clusterd.wait_ready("web", 3, 20 * SECOND);
    let socket = clusterd.control_socket();

    // A client that connects and never writes: it must not block anybody else.
    let silent = UnixStream::connect(&socket).expect("connect");
    let started = Instant::now();
    assert_eq!(clusterd.serving("web").len(), 3);
    assert!(
        started.elapsed() < 4 * SECOND,
        "status waited for the silent client"
    );

    let garbage = raw_exchange(&socket, b"garbage\n", false);
    assert!(garbage.contains("\"kind\":\"malformed\""), "{garbage}");
    let truncated = raw_exchange(&socket, b"{\"v\":1,\"cmd\":\"status\"", true);
    assert!(
        truncated.contains("\"kind\":\"malformed\"") && truncated.contains("truncated"),
        "{truncated}"
    );
    let unknown = raw_exchange(&socket, b"{\"v\":1,\"cmd\":\"teleport\"}\n", false);
    assert!(
        unknown.contains("\"kind\":\"unknown-command\""),
        "{unknown}"
    );
    let newer = raw_exchange(&socket, b"{\"v\":7,\"cmd\":\"status\"}\n", false);
    assert!(newer.contains("\"kind\":\"version\""), "{newer}");
    let bad_app = raw_exchange(
        &socket,
        b"{\"v\":1,\"cmd\":\"scale\",\"app\":\"nope\",\"workers\":2}\n",
        false,
    );
    assert!(
        bad_app.contains("\"kind\":\"bad-request\"") && bad_app.contains("no app"),
        "{bad_app}"
    );

    // 100 MB without a newline: refused after the frame limit, without reading it all.
    let mut huge = UnixStream::connect(&socket).expect("connect");
    huge.set_read_timeout(Some(10 * SECOND)).expect("timeout");
    huge.set_write_timeout(Some(10 * SECOND)).expect("timeout");
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..100 {
        if huge.write_all(&chunk).is_err() {
            break;
        }
    }
    let mut reply = String::new();
    let _ = huge.read_to_string(&mut reply);
    assert!(reply.contains("\"kind\":\"too-large\""), "{reply:?}");

    // The silent client is timed out with an error reply.
    let mut line = String::new();
    silent.set_read_timeout(Some(10 * SECOND)).expect("timeout");
    let _ = BufReader::new(&silent).read_line(&mut line);
    assert!(line.contains("\"kind\":\"timeout\""), "{line:?}");

    // Still serving, same workers.
    assert_eq!(clusterd.serving("web").len(), 3);
    assert!(clusterd.stop().success());
}

#[test]
fn reload_wait_exits_zero_on_success_and_non_zero_on_abort() {
    let clusterd = Clusterd::start_with_files(
        r#"
[sockets.http]
listen = "127.0.0.1:0"

[apps.web]
command = ["{dir}/worker.sh"]
workers = 2
sockets = ["http"]
ready = "notify"
ready_timeout = "10s"
"#,
        &[("worker.sh", "#!/bin/sh\nexec {hello}\n")],
    );
    clusterd.wait_ready("web", 2, 20 * SECOND);

    let ok = clusterd.ctl(&["reload", "--wait"]);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{stdout}");
    assert!(
        stdout.contains("web: reload completed, generation 2"),
        "{stdout}"
    );
    assert!(
        stdout.contains("web[1] generation 2 ready"),
        "progress lines are streamed: {stdout}"
    );
    let before = clusterd.serving("web");
    assert!(before.iter().all(|(_, _, generation, _)| *generation == 2));

    // A broken new version: the rollout aborts, exit code non-zero, old workers keep serving.
    crate::util::write_executable(
        &clusterd.dir.path().join("worker.sh"),
        "#!/bin/sh\nexit 1\n",
    );
    let aborted = clusterd.ctl(&["reload", "web", "--wait"]);
    let stdout = String::from_utf8_lossy(&aborted.stdout);
    assert_eq!(aborted.status.code(), Some(1), "{stdout}");
    assert!(
        stdout
            .contains("web: reload ABORTED: slot 0 generation 3 exited with status 1 before ready"),
        "{stdout}"
    );
    assert_eq!(clusterd.serving("web"), before);
    assert!(before.iter().all(|(_, pid, _, _)| alive(*pid)));
    let status = clusterd.status();
    assert_eq!(status["apps"][0]["last_reload"]["outcome"], "aborted");
}

/// Checks that every line is a comment or `name{labels} value` and returns the samples.
fn parse_exposition(text: &str) -> Vec<(String, f64)> {
    let mut samples = Vec::new();
    assert!(text.trim_end().ends_with("# EOF"), "no # EOF terminator");
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "bad labels in {line:?}");
        }
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        samples.push((series.to_owned(), value));
    }
    samples
}

#[test]
fn metrics_parse_and_match_status() {
    let mut clusterd = Clusterd::start(&format!("[metrics]\nlisten = \"127.0.0.1:0\"\n{HELLO}"));
    clusterd.wait_ready("web", 3, 20 * SECOND);
    let addr = clusterd.metrics_addr();
    let scrape = || {
        let response = crate::util::http_get(addr, "/metrics").expect("scrape");
        assert_eq!(response.status, 200);
        parse_exposition(&response.body)
    };
    let value = |samples: &[(String, f64)], series: &str| {
        samples
            .iter()
            .find(|(s, _)| s == series)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no {series}"))
    };

    let samples = scrape();
    let ready = clusterd
        .serving("web")
        .iter()
        .filter(|w| w.3 == "ready")
        .count();
    assert_eq!(
        value(&samples, "clusterd_workers{app=\"web\",state=\"ready\"}"),
        ready as f64
    );
    assert_eq!(ready, 3);
    assert!(value(&samples, "clusterd_rss_bytes") > 0.0);
    assert_eq!(
        value(
            &samples,
            "clusterd_time_to_ready_seconds_count{app=\"web\"}"
        ),
        3.0
    );
    assert!(
        samples
            .iter()
            .any(|(s, v)| s.starts_with("clusterd_worker_rss_bytes{") && *v > 0.0)
    );

    let (_, victim, _, _) = clusterd.serving("web")[0];
    nix::sys::signal::kill(victim, Signal::SIGKILL).expect("kill");
    assert!(wait_until(10 * SECOND, || {
        let samples = scrape();
        samples
            .iter()
            .any(|(s, v)| s == "clusterd_worker_restarts_total{app=\"web\"}" && *v == 1.0)
    }));
    let output = clusterd.ctl(&["reload", "--wait"]);
    assert!(output.status.success());
    let samples = scrape();
    assert_eq!(
        value(
            &samples,
            "clusterd_reloads_total{app=\"web\",outcome=\"completed\"}"
        ),
        1.0
    );
    assert!(clusterd.stop().success());
}

/// (cpu seconds, rss bytes, members) of the processes `member` selects by pid, process group
/// and `/proc/<pid>/cgroup` text, summed from every `/proc/*/stat` on the host: the reference
/// the status figures must agree with.
fn usage_from_proc(member: impl Fn(i32, i32, &str) -> bool) -> (f64, u64, Vec<i32>) {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    let (mut cpu, mut rss, mut members) = (0.0, 0, Vec::new());
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').and_then(|i| stat.get(i + 2..)) else {
            continue;
        };
        let f: Vec<&str> = rest.split(' ').collect();
        let Some(group) = f.get(2).and_then(|g| g.parse::<i32>().ok()) else {
            continue;
        };
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if member(pid, group, &cgroup) {
            let field = |n: usize| f.get(n).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            cpu += (field(11) + field(12)) as f64 / ticks;
            // `statm`'s resident count, as clusterd reads it: `stat`'s is the kernel's
            // approximate per-CPU sum (newer kernels make `statm` exact), off by hundreds of
            // pages when processes move between CPUs.
            let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap_or_default();
            let resident = statm.split(' ').nth(1).and_then(|v| v.parse::<u64>().ok());
            rss += resident.unwrap_or(0) * page;
            members.push(pid);
        }
    }
    (cpu, rss, members)
}

/// `pid:comm:statm` of each of `pids`, to tell what a failed comparison counted.
fn members_of(pids: &[i32]) -> String {
    let read = |pid: &i32, file: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default()
    };
    let members: Vec<String> = pids
        .iter()
        .map(|p| format!("{p}:{}:{}", read(p, "comm").trim(), read(p, "statm").trim()))
        .collect();
    members.join(", ")
}

/// The `0::` line of `/proc/<pid>/cgroup` (the cgroup v2 path), if any.
fn cgroup_line(cgroups: &str) -> Option<&str> {
    cgroups.lines().find(|l| l.starts_with("0::"))
}

#[test]
fn status_counts_a_workers_children_as_proc_does() {
    // Two children in the worker's process group, and one that leaves it (setsid).
    let mut clusterd = Clusterd::start(
        r#"
[apps.forks]
command = ["sh", "-c", "sleep 1000 & sleep 1000 & setsid sleep 1000 & wait"]
workers = 1
"#,
    );
    clusterd.wait_ready("forks", 1, 20 * SECOND);
    let worker = clusterd.serving_pids("forks")[0].as_raw();
    // Contained by its cgroup, the worker is measured from it: every process in the cgroup,
    // the one that left the group too. Otherwise, by its process group.
    let containment = clusterd.status()["containment"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let by_cgroup =
        containment.starts_with("cgroup v2") && !containment.contains("process group only");
    let own_cgroup = std::fs::read_to_string(format!("/proc/{worker}/cgroup")).unwrap();
    let own_cgroup = cgroup_line(&own_cgroup).unwrap_or("none").to_owned();
    if by_cgroup {
        assert!(own_cgroup.contains("/w-forks."), "{own_cgroup}");
    }
    let reference = || {
        usage_from_proc(|_, group, cgroups| match by_cgroup {
            true => cgroup_line(cgroups) == Some(&own_cgroup),
            false => group == worker,
        })
    };
    // The children are up and have become `sleep` (not forked shells any more).
    let expected = if by_cgroup { 4 } else { 3 };
    assert!(wait_until(10 * SECOND, || {
        let (_, _, members) = reference();
        members.len() == expected
            && members.iter().filter(|p| **p != worker).all(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim() == "sleep")
            })
    }));
    let (_, _, members) = reference();
    let child_rss = members
        .iter()
        .filter(|p| **p != worker)
        .map(|p| {
            let statm = std::fs::read_to_string(format!("/proc/{p}/statm")).unwrap_or_default();
            statm
                .split(' ')
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                * 4096
        })
        .min()
        .unwrap_or(0);
    assert!(child_rss > 0, "children without memory: {members:?}");
    // Idle processes: the figures settle, and then status and /proc agree to within half of
    // the smallest child's memory (so a child left out would show) and a few CPU ticks.
    let mut last = String::new();
    let agree = wait_until(10 * SECOND, || {
        let status = clusterd.status();
        let slot = &status["apps"][0]["workers"][0];
        let (cpu, rss, _) = reference();
        let (Some(s_cpu), Some(s_rss)) = (slot["cpu_seconds"].as_f64(), slot["rss_bytes"].as_u64())
        else {
            last = format!("no usage in {slot}");
            return false;
        };
        let (_, _, now) = reference();
        last = format!(
            "status cpu {s_cpu} rss {s_rss}; /proc cpu {cpu} rss {rss} of {} ({containment})",
            members_of(&now)
        );
        s_rss.abs_diff(rss) < child_rss / 2 && (s_cpu - cpu).abs() < 0.05
    });
    assert!(agree, "{last}");
    assert!(clusterd.stop().success());
}

#[test]
fn control_connections_over_the_cap_are_answered_busy_and_the_next_ones_served() {
    // The test holds 512 connections: room for them beside the other tests' descriptors.
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    let mut clusterd = Clusterd::start(HELLO);
    clusterd.wait_ready("web", 3, 20 * SECOND);
    let socket = clusterd.control_socket();
    // 512 clients that have sent half a request each (clusterd times them out after 5 s).
    let held: Vec<UnixStream> = (0..512)
        .map(|_| {
            let mut stream = UnixStream::connect(&socket).expect("connect");
            stream.write_all(b"{\"v\":1,").expect("write");
            stream
        })
        .collect();
    let refused = raw_exchange(&socket, b"{\"v\":1,\"cmd\":\"status\"}\n", false);
    assert!(
        refused.contains("\"kind\":\"busy\"") && refused.contains("512"),
        "{refused}"
    );
    drop(held);
    // Their slots come free as they close: status answers again.
    let mut last = String::new();
    assert!(
        wait_until(10 * SECOND, || {
            last = raw_exchange(&socket, b"{\"v\":1,\"cmd\":\"status\"}\n", false);
            last.contains("\"reply\":\"status\"")
        }),
        "{last}"
    );
    assert!(clusterd.stop().success());
}

#[test]
fn metrics_connections_over_the_cap_are_refused_with_503() {
    let mut clusterd = Clusterd::start(&format!("[metrics]\nlisten = \"127.0.0.1:0\"\n{HELLO}"));
    let addr = clusterd.metrics_addr();
    // 64 idle connections hold every slot (accepted in order, before the next one).
    let mut held: Vec<std::net::TcpStream> = (0..64)
        .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
        .collect();
    let response = crate::util::http_get(addr, "/healthz").expect("refusal");
    assert_eq!(response.status, 503);
    assert_eq!(response.body, "too many metrics connections\n");
    // A slot freed is a slot served again.
    held.pop();
    assert!(wait_until(10 * SECOND, || {
        crate::util::http_get(addr, "/healthz").is_ok_and(|r| r.status == 200)
    }));
    drop(held);
    assert!(clusterd.stop().success());
}

#[test]
fn a_second_start_is_refused_and_a_stale_socket_is_replaced() {
    let mut first = Clusterd::start(HELLO);
    first.wait_ready("web", 3, 20 * SECOND);
    let second = std::process::Command::new(crate::util::clusterd_bin())
        .arg("start")
        .arg(&first.manifest)
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .expect("second start");
    assert_eq!(second.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("another clusterd is already running for this manifest"),
        "{stderr}"
    );
    assert_eq!(
        first.serving("web").len(),
        3,
        "the first one is undisturbed"
    );

    // SIGKILL leaves the socket file behind; the next start replaces it.
    first.signal(Signal::SIGKILL);
    first.wait_exit(10 * SECOND);
    assert!(first.control_socket().exists());
    let manifest = std::fs::read_to_string(&first.manifest).expect("manifest");
    let mut again = std::process::Command::new(crate::util::clusterd_bin())
        .arg("start")
        .arg(&first.manifest)
        .env_remove("XDG_RUNTIME_DIR")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("restart");
    let socket = first.control_socket();
    let answered = wait_until(20 * SECOND, || clusterd_status_ok(&socket));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(again.id() as i32),
        Signal::SIGTERM,
    );
    let _ = again.wait();
    assert!(
        answered,
        "a start after a crash did not come up (manifest: {manifest})"
    );
}

fn clusterd_status_ok(socket: &std::path::Path) -> bool {
    std::process::Command::new(crate::util::clusterd_bin())
        .args(["status", "--socket"])
        .arg(socket)
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn restart_scale_and_signal_commands() {
    let mut clusterd = Clusterd::start(
        r#"
[apps.sleepy]
command = ["sh", "-c", "trap 'echo got HUP' HUP; echo up; while :; do sleep 0.1; done"]
workers = 2
stop_timeout = "2s"
"#,
    );
    clusterd.wait_for_lines("] up", 2, 10 * SECOND);
    let before = clusterd.serving("sleepy");

    let output = clusterd.ctl(&["restart", "sleepy:1"]);
    assert!(output.status.success(), "{output:?}");
    assert!(wait_until(10 * SECOND, || {
        let now = clusterd.serving("sleepy");
        now.len() == 2 && now[0] == before[0] && now[1].1 != before[1].1
    }));

    let output = clusterd.ctl(&["scale", "sleepy", "3"]);
    assert!(output.status.success());
    assert!(wait_until(10 * SECOND, || clusterd.serving("sleepy").len() == 3));

    let output = clusterd.ctl(&["signal", "sleepy", "HUP"]);
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("sent SIGHUP to 3 workers of sleepy"));
    clusterd.wait_for_lines("got HUP", 3, 10 * SECOND);

    // Bad arguments are refused with a reason and change nothing.
    let output = clusterd.ctl(&["restart", "sleepy:9"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("has no slot 9"));
    let output = clusterd.ctl(&["signal", "sleepy", "SIGNOPE"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(clusterd.serving("sleepy").len(), 3);

    let output = clusterd.ctl(&["stop"]);
    assert!(output.status.success());
    assert!(clusterd.wait_exit(20 * SECOND).success());
}

#[test]
fn stop_with_no_worker_alive_answers_before_clusterd_exits() {
    // Every slot waits in backoff: nothing is left to stop, so the loop ends at once; the
    // client must still hear its reply.
    let mut clusterd = Clusterd::start(
        r#"
[apps.crashy]
command = ["sh", "-c", "exit 3"]
workers = 2
backoff_initial = "30s"
"#,
    );
    assert!(wait_until(20 * SECOND, || {
        let output = clusterd.ctl(&["status", "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
        status["apps"][0]["workers"]
            .as_array()
            .is_some_and(|w| w.len() == 2 && w.iter().all(|w| w["state"] == "backoff"))
    }));
    let output = clusterd.ctl(&["stop"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(clusterd.wait_exit(20 * SECOND).success());
}
