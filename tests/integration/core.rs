//! The core: shared sockets, spawning, crash restart with backoff, graceful shutdown.

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::util::{Clusterd, alive, env_var, http_get, json_pid, wait_until, whoami};

const SECOND: Duration = Duration::from_secs(1);

fn hello_manifest(workers: usize) -> String {
    format!(
        r#"
[supervisor]
stop_timeout = "5s"

[sockets.http]
listen = "127.0.0.1:0"

[apps.web]
command = ["{{hello}}"]
workers = {workers}
sockets = ["http"]
ready = "notify"
"#
    )
}

#[test]
fn workers_share_one_port_and_more_than_one_slot_answers() {
    let mut clusterd = Clusterd::start(&hello_manifest(4));
    let addr = clusterd.socket_addr("http");
    clusterd.wait_ready("web", 4, 20 * SECOND);

    let mut slots = BTreeSet::new();
    for _ in 0..200 {
        let (slot, pid) = whoami(addr).expect("request");
        // LISTEN_PID is the worker's own pid.
        assert_eq!(env_var(pid, "LISTEN_PID"), Some(pid.to_string()));
        assert_eq!(env_var(pid, "CLUSTERD_WORKER_ID"), Some(slot.to_string()));
        slots.insert(slot);
        if slots.len() > 1 {
            break;
        }
    }
    assert!(
        slots.len() > 1,
        "only slot(s) {slots:?} answered 200 fresh connections"
    );
    assert!(clusterd.stop().success());
}

/// The worker's open fds, as (fd, link target).
fn open_fds(pid: Pid) -> Vec<(i32, String)> {
    let mut fds: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read fds")
        .filter_map(|e| {
            let e = e.ok()?;
            let fd = e.file_name().to_str()?.parse().ok()?;
            Some((fd, std::fs::read_link(e.path()).ok()?.display().to_string()))
        })
        .collect();
    fds.sort();
    fds
}

#[test]
fn sockets_arrive_at_fd_3_and_nothing_else_leaks() {
    // clusterd's own parent leaks an inheritable fd to it; workers must not get it.
    let leaked = std::fs::File::open("/dev/null").expect("open");
    let leaked_fd = leaked.as_raw_fd();
    let mut clusterd = Clusterd::start_with(
        r#"
[sockets.a]
listen = "127.0.0.1:0"
[sockets.b]
listen = "unix:b.sock"

[apps.sleeper]
command = ["sleep", "60"]
workers = 1
sockets = ["a", "b"]
"#,
        // SAFETY: the closure runs in the child between fork and exec and makes only async-signal-
        // safe calls (dup2) on a descriptor number copied in before the fork.
        move |command| unsafe {
            command.pre_exec(move || {
                if libc::dup2(leaked_fd, 20) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        },
    );
    let pid = clusterd.first_pid("sleeper[0]");
    assert!(
        wait_until(5 * SECOND, || env_var(pid, "LISTEN_FDS").is_some()),
        "worker never exec'd"
    );

    let fds = open_fds(pid);
    let numbers: Vec<i32> = fds.iter().map(|(fd, _)| *fd).collect();
    assert_eq!(numbers, [0, 1, 2, 3, 4], "fds of the worker: {fds:?}");
    assert!(
        fds[3].1.starts_with("socket:") && fds[4].1.starts_with("socket:"),
        "{fds:?}"
    );
    assert_eq!(fds[0].1, "/dev/null");
    assert_eq!(env_var(pid, "LISTEN_PID"), Some(pid.to_string()));
    assert_eq!(env_var(pid, "LISTEN_FDS").as_deref(), Some("2"));
    assert_eq!(env_var(pid, "LISTEN_FDNAMES").as_deref(), Some("a:b"));
    assert_eq!(env_var(pid, "CLUSTERD_APP").as_deref(), Some("sleeper"));
    assert_eq!(env_var(pid, "CLUSTERD_GENERATION").as_deref(), Some("1"));
    // Its own process group.
    assert_eq!(nix::unistd::getpgid(Some(pid)).expect("pgid"), pid);

    let socket_file = clusterd.dir.path().join("b.sock");
    assert!(socket_file.exists());
    assert!(clusterd.stop().success());
    assert!(
        !socket_file.exists(),
        "the unix socket file was not removed at exit"
    );
    drop(leaked);
}

#[test]
fn a_killed_worker_is_replaced_in_the_same_slot_and_requests_keep_succeeding() {
    let mut clusterd = Clusterd::start(&hello_manifest(2));
    let addr = clusterd.socket_addr("http");
    clusterd.wait_ready("web", 2, 20 * SECOND);
    let victim = clusterd.first_pid("web[1]");

    nix::sys::signal::kill(victim, Signal::SIGKILL).expect("kill worker");
    let replacement = clusterd.wait_worker("web", 1, 10 * SECOND, |w| {
        !w["pid"].is_null() && json_pid(w) != victim
    });
    assert_eq!(replacement["restarts"], 1, "{replacement}");
    assert!(
        clusterd
            .output()
            .contains(&format!("web[1] pid {victim} exited with signal SIGKILL"))
    );

    // Every request on a fresh connection succeeds, during and after the replacement.
    let mut failures = 0;
    for _ in 0..100 {
        match http_get(addr, "/") {
            Ok(r) if r.status == 200 => {}
            _ => failures += 1,
        }
    }
    assert_eq!(failures, 0);
    assert!(clusterd.stop().success());
}

#[test]
fn a_crash_loop_is_spaced_by_exponential_backoff() {
    let started = std::time::Instant::now();
    let clusterd = Clusterd::start(
        r#"
[supervisor]
log_format = "json"

[apps.crasher]
command = ["sh", "-c", "exit 3"]
workers = 1
backoff_initial = "100ms"
backoff_max = "400ms"
"#,
    );
    // `restarts` counts crashes replaced; the delays of the first five replacements are 0,
    // 0.1, 0.2, 0.4 and 0.4 s (capped), so the sixth crash cannot come sooner than 1.1 s after
    // the start: a bound that load cannot break (it only makes things slower). The exact delays, the cap and the reset
    // are checked with a simulated clock in the core's tests (src/supervisor/tests.rs).
    let mut seen_backoff = false;
    let crasher = clusterd.wait_worker("crasher", 0, 30 * SECOND, |w| {
        // Between crashes the slot waits in backoff (most of the time, once capped).
        seen_backoff |= w["state"] == "backoff";
        seen_backoff && w["restarts"].as_u64() >= Some(6)
    });
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1100),
        "6 crashes after {took:?}: not spaced by backoff\n{}",
        clusterd.output()
    );
    assert!(crasher["crash_streak"].as_u64() >= Some(3), "{crasher}");
    assert!(
        wait_until(10 * SECOND, || clusterd
            .events("restarting")
            .iter()
            .any(|e| e["flapping"] == true)),
        "{}",
        clusterd.output()
    );
    assert!(
        clusterd
            .events("restarting")
            .iter()
            .all(|e| e["status"] == "status 3" && e["app"] == "crasher"),
        "{}",
        clusterd.output()
    );
}

#[test]
fn a_command_that_cannot_be_executed_is_reported_once() {
    let mut clusterd = Clusterd::start(
        r#"
[apps.vanishing]
command = ["./worker.sh"]
workers = 1
backoff_initial = "10ms"
"#
        .replace("./worker.sh", "{dir}/worker.sh")
        .as_str(),
    );
    // The script does not exist yet: clusterd refuses to start.
    let status = clusterd.wait_exit(10 * SECOND);
    assert_eq!(status.code(), Some(2), "{}", clusterd.output());
    assert!(
        clusterd
            .output()
            .contains("apps.vanishing.command: cannot find an executable")
    );

    // Now it exists at start, then disappears: the respawn fails once, with the reason.
    let dir = tempfile::tempdir().expect("dir");
    let script = dir.path().join("worker.sh");
    std::fs::write(&script, "#!/bin/sh\nrm -f \"$0\"\nexit 1\n").expect("write script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let mut clusterd = Clusterd::start(&format!(
        "[supervisor]\nlog_format = \"json\"\n[apps.vanishing]\ncommand = [\"{}\"]\nworkers = 1\n",
        script.display()
    ));
    // The slot fails, and a failed slot waits for a reload or restart (the core's tests
    // check that nothing respawns it): the one report is all there is.
    let slot = clusterd.wait_worker("vanishing", 0, 10 * SECOND, |w| w["state"] == "failed");
    assert_eq!(slot["restarts"], 1, "one crash, one failed respawn: {slot}");
    assert!(
        slot["last_exit"]
            .as_str()
            .is_some_and(|e| e.starts_with("cannot find program")),
        "{slot}"
    );
    let down = clusterd.wait_event("spawn_failed", 10 * SECOND, |e| {
        e["app"] == "vanishing" && e["slot"] == 0
    });
    assert!(down["retry_in_ms"].is_null(), "stays down: {down}");
    assert_eq!(
        clusterd.events("spawn_failed").len(),
        1,
        "{}",
        clusterd.output()
    );
    assert!(clusterd.stop().success());
}

#[test]
fn sigterm_stops_every_worker_and_their_children() {
    let mut clusterd = Clusterd::start(
        r#"
[supervisor]
stop_timeout = "10s"

[apps.polite]
command = ["sh", "-c", "trap 'echo got TERM; seq 1 3000; echo last words; exit 0' TERM; sleep 1000 & echo child $!; wait"]
workers = 3
"#,
    );
    let children: Vec<Pid> = clusterd
        .wait_for_lines("] child ", 3, 10 * SECOND)
        .iter()
        .map(|l| {
            Pid::from_raw(
                l.rsplit(' ')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .expect("pid"),
            )
        })
        .collect();
    let workers = clusterd.serving_pids("polite");
    assert_eq!(workers.len(), 3);
    assert!(children.iter().chain(&workers).all(|p| alive(*p)));
    // A backgrounded child is a forked shell until it execs `sleep`; a SIGTERM in that window
    // is taken by the shell's inherited trap and `sleep` would then (rightly) need SIGKILL.
    assert!(wait_until(10 * SECOND, || children.iter().all(|p| {
        std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "sleep")
    })));

    let status = clusterd.stop();
    assert!(status.success(), "{status:?}");
    // Each worker ran its trap (its output is prefixed with its slot).
    for i in 0..3 {
        assert!(
            clusterd.output().contains(&format!("polite[{i}] got TERM")),
            "{}",
            clusterd.output()
        );
        // Everything a worker writes before it exits reaches clusterd's output.
        assert!(
            clusterd
                .output()
                .contains(&format!("polite[{i}] last words")),
            "lost output of polite[{i}]"
        );
    }
    for pid in children.iter().chain(&workers) {
        assert!(!alive(*pid), "{pid} survived the shutdown");
    }
}

#[test]
fn a_worker_ignoring_sigterm_is_killed_after_stop_timeout() {
    let mut clusterd = Clusterd::start(
        r#"
[supervisor]
log_format = "json"

[apps.stubborn]
command = ["sh", "-c", "trap '' TERM; echo up; while :; do sleep 0.1; done"]
workers = 2
stop_timeout = "1s"
log_format = "text"
"#,
    );
    clusterd.wait_for_lines("] up", 2, 10 * SECOND);
    let workers = clusterd.serving_pids("stubborn");
    assert_eq!(workers.len(), 2);
    let status = clusterd.stop();
    assert!(status.success());
    let killed: Vec<Pid> = clusterd
        .events("stop_timeout")
        .iter()
        .map(crate::util::json_pid)
        .collect();
    assert_eq!(
        killed.iter().collect::<std::collections::BTreeSet<_>>(),
        workers.iter().collect(),
        "SIGKILL after stop_timeout for each: {}",
        clusterd.output()
    );
    assert!(workers.iter().all(|p| !alive(*p)));
}

#[test]
fn a_second_sigterm_kills_at_once() {
    let mut clusterd = Clusterd::start(
        r#"
[supervisor]
log_format = "json"

[apps.stubborn]
command = ["sh", "-c", "trap '' TERM; echo up; while :; do sleep 0.1; done"]
workers = 1
stop_timeout = "60s"
log_format = "text"
"#,
    );
    clusterd.wait_for_line("] up", 10 * SECOND);
    let worker = clusterd.first_pid("stubborn[0]");
    clusterd.signal(Signal::SIGTERM);
    clusterd.wait_event("stopping", 5 * SECOND, |e| e["workers"] == 1);
    clusterd.signal(Signal::SIGTERM);
    // Far sooner than the 60 s stop timeout.
    let status = clusterd.wait_exit(10 * SECOND);
    assert!(status.success());
    assert!(!alive(worker));
}

#[test]
fn killing_clusterd_leaves_no_worker_alive() {
    let mut clusterd = Clusterd::start(&hello_manifest(3));
    clusterd.wait_ready("web", 3, 20 * SECOND);
    let workers = clusterd.serving_pids("web");
    assert_eq!(workers.len(), 3);
    clusterd.signal(Signal::SIGKILL);
    clusterd.wait_exit(5 * SECOND);
    assert!(
        wait_until(5 * SECOND, || workers.iter().all(|p| !alive(*p))),
        "workers outlived a killed supervisor"
    );
}

#[test]
fn a_port_in_use_is_a_clear_error_before_any_worker_starts() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let mut clusterd = Clusterd::start(&format!(
        "[sockets.http]\nlisten = \"127.0.0.1:{port}\"\n[apps.web]\ncommand = [\"sleep\", \"60\"]\nsockets = [\"http\"]\n"
    ));
    let status = clusterd.wait_exit(10 * SECOND);
    assert_eq!(status.code(), Some(1));
    let output = clusterd.output();
    assert!(
        output.contains(&format!("socket http: cannot listen on 127.0.0.1:{port}")),
        "{output}"
    );
    assert!(output.contains("in use"), "{output}");
    assert!(!output.contains("started pid"), "{output}");
}

/// Zombie children of `parent`, from /proc.
fn zombie_children(parent: Pid) -> usize {
    std::fs::read_dir("/proc")
        .expect("proc")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("stat")).ok())
        .filter(|stat| {
            let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
                return false;
            };
            let mut fields = after.split(' ');
            let state = fields.next();
            let ppid = fields.next().and_then(|p| p.parse::<i32>().ok());
            state == Some("Z") && ppid == Some(parent.as_raw())
        })
        .count()
}

#[test]
fn orphaned_grandchildren_are_adopted_and_reaped() {
    // The worker keeps creating orphans: each subshell exits at once, leaving its `sleep` to
    // be re-parented to clusterd (a child subreaper), which must reap it when it exits.
    let mut clusterd = Clusterd::start(
        r#"
[supervisor]
log_format = "json"

[apps.orphans]
command = ["sh", "-c", "echo up; while :; do (sleep 0.05 &); sleep 0.02; done"]
log_format = "text"
"#,
    );
    clusterd.wait_for_line("orphans[0] up", 10 * SECOND);
    let supervisor = clusterd.pid();
    // Orphans come and go (only the log says each was adopted and reaped).
    assert!(
        wait_until(20 * SECOND, || clusterd.events("reaped").len() > 10),
        "orphans were not adopted"
    );
    assert!(
        wait_until(5 * SECOND, || zombie_children(supervisor) == 0),
        "{} zombies left unreaped",
        zombie_children(supervisor)
    );
    assert!(clusterd.stop().success());
}

#[test]
fn sockets_from_socket_activation_are_passed_through_by_name() {
    // As systemd would: a listening socket at fd 3 named "http", LISTEN_PID = clusterd's pid.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let fd = listener.as_raw_fd();
    let mut clusterd = Clusterd::start_activated(
        // The manifest's address would fail to bind (port 1): the inherited socket is used.
        &hello_manifest(2).replace("127.0.0.1:0", "127.0.0.1:1"),
        // SAFETY: the closure runs in the child between fork and exec and makes only async-signal-
        // safe calls (dup2, fcntl) on a descriptor number copied in before the fork.
        move |command| unsafe {
            command.env("LISTEN_FDS", "1").env("LISTEN_FDNAMES", "http");
            command.pre_exec(move || {
                // dup2(3, 3) would leave close-on-exec set: clear it by hand in that case.
                let placed = if fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, 3)
                };
                if placed < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        },
    );
    let line = clusterd.wait_for_line("socket http listening on", 10 * SECOND);
    assert!(line.ends_with(&format!("{addr} (inherited)")), "{line}");
    // Status: the address as it is, and that it was inherited.
    assert_eq!(clusterd.socket_addr("http"), addr);
    assert_eq!(clusterd.status()["sockets"][0]["inherited"], true);
    clusterd.wait_ready("web", 2, 20 * SECOND);
    drop(listener); // only clusterd and its workers hold it now
    let response = http_get(addr, "/").expect("request");
    assert_eq!(response.status, 200);
    // The workers get the socket at fd 3 with their own LISTEN_PID, not clusterd's.
    let worker = clusterd.first_pid("web[0]");
    assert_eq!(env_var(worker, "LISTEN_PID"), Some(worker.to_string()));
    assert!(clusterd.stop().success());
}
