//! Rolling reload, readiness, watchdog and manifest re-read (SIGHUP).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::util::{Clusterd, alive, app_in, http_get, wait_until};

const SECOND: Duration = Duration::from_secs(1);

/// A worker that becomes ready only when the test creates `go-<generation>` in the temp dir,
/// and says so through `clusterd notify` (a child process: the supervisor must attribute it to
/// the worker by its process group).
const GATED: &str = r#"#!/bin/sh
echo "waiting for go-$CLUSTERD_GENERATION"
while [ ! -e "{dir}/go-$CLUSTERD_GENERATION" ]; do sleep 0.05; done
"$CLUSTERD_EXE" notify READY=1 "STATUS=gated generation $CLUSTERD_GENERATION"
exec sleep 1000
"#;

/// How many processes of `app` in a status run generation `generation` (any role).
fn of_generation(status: &serde_json::Value, app: &str, generation: u64) -> usize {
    app_in(status, app).expect("app")["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter(|w| !w["pid"].is_null() && w["generation"] == generation)
        .count()
}

fn gated_manifest(workers: usize, ready_timeout: &str) -> String {
    format!(
        r#"
[supervisor]
stop_timeout = "2s"
log_format = "json"

[apps.gated]
command = ["{{dir}}/gated.sh"]
workers = {workers}
ready = "notify"
ready_timeout = "{ready_timeout}"
"#
    )
}

#[test]
fn readiness_gates_the_rollout_and_a_never_ready_worker_aborts_it() {
    let mut clusterd =
        Clusterd::start_with_files(&gated_manifest(2, "30s"), &[("gated.sh", GATED)]);
    let go = |generation: u32| {
        std::fs::write(clusterd.dir.path().join(format!("go-{generation}")), "").expect("go")
    };
    clusterd.wait_for_lines("waiting for go-1", 2, 10 * SECOND);
    assert!(
        clusterd
            .serving("gated")
            .iter()
            .all(|(_, _, _, state)| state == "starting")
    );
    go(1);
    clusterd.wait_ready("gated", 2, 10 * SECOND);
    let generation_1 = clusterd.serving("gated");
    let status = clusterd.status();
    assert_eq!(
        status["apps"][0]["workers"][0]["status_text"],
        "gated generation 1"
    );

    // The rollout holds on the first new worker until the test lets it become ready: that
    // worker cannot be ready before go-2 exists, so what status shows now holds until then.
    clusterd.signal(Signal::SIGUSR2);
    clusterd.wait_for_line("waiting for go-2", 10 * SECOND);
    let status = clusterd.status();
    assert_eq!(status["apps"][0]["reloading"]["done"], 0, "{status}");
    assert_eq!(
        clusterd.serving("gated"),
        generation_1,
        "old workers must keep serving"
    );
    assert_eq!(
        of_generation(&status, "gated", 2),
        1,
        "surge 1: one new worker at a time: {status}"
    );
    go(2);
    clusterd.wait_event("rollout_done", 20 * SECOND, |e| {
        e["app"] == "gated" && e["generation"] == 2 && e["workers"] == 2
    });
    let generation_2 = clusterd.serving("gated");
    assert!(
        generation_2
            .iter()
            .all(|(_, _, generation, state)| *generation == 2 && state == "ready")
    );
    assert!(
        generation_1.iter().all(|(_, pid, _, _)| !alive(*pid)),
        "old workers were not stopped"
    );
    assert!(clusterd.stop().success());

    // A new generation that never becomes ready aborts the rollout; the old workers stay.
    let mut clusterd = Clusterd::start_with_files(&gated_manifest(2, "1s"), &[("gated.sh", GATED)]);
    std::fs::write(clusterd.dir.path().join("go-1"), "").expect("go");
    clusterd.wait_ready("gated", 2, 10 * SECOND);
    let old = clusterd.serving("gated");
    clusterd.signal(Signal::SIGUSR2);
    let aborted = clusterd.wait_event("aborted", 10 * SECOND, |e| {
        e["app"] == "gated" && e["generation"] == 2
    });
    assert!(
        aborted["reason"]
            .as_str()
            .is_some_and(|r| r.contains("slot 0 generation 2 was not ready within 1.0s")),
        "{aborted}"
    );
    assert_eq!(aborted["kept_generations"], serde_json::json!([1, 1]));
    assert_eq!(clusterd.serving("gated"), old);
    assert!(old.iter().all(|(_, pid, _, _)| alive(*pid)));
    let status = clusterd.status();
    assert_eq!(status["apps"][0]["last_reload"]["outcome"], "aborted");
    assert!(clusterd.stop().success());
}

/// Keep-alive HTTP/1.1 client: reuses its connection until the server says `Connection: close`
/// (then reconnects). Any error on an established connection counts as a failed request.
struct KeepAlive {
    addr: SocketAddr,
    stream: Option<BufReader<TcpStream>>,
}

impl KeepAlive {
    fn get(&mut self, path: &str) -> std::io::Result<u16> {
        if self.stream.is_none() {
            let stream = TcpStream::connect_timeout(&self.addr, 5 * SECOND)?;
            stream.set_read_timeout(Some(10 * SECOND))?;
            self.stream = Some(BufReader::new(stream));
        }
        let reader = self.stream.as_mut().expect("connected");
        write!(
            reader.get_mut(),
            "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n"
        )?;
        let mut status_line = String::new();
        if reader.read_line(&mut status_line)? == 0 {
            self.stream = None;
            return Err(std::io::Error::other("connection closed before a response"));
        }
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let (mut length, mut close) = (0usize, false);
        loop {
            let mut header = String::new();
            reader.read_line(&mut header)?;
            let header = header.trim_end().to_ascii_lowercase();
            if header.is_empty() {
                break;
            }
            if let Some(v) = header.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            close |= header == "connection: close";
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        if close {
            self.stream = None;
        }
        Ok(status)
    }
}

#[test]
fn a_rollout_under_load_fails_no_request() {
    let mut clusterd = Clusterd::start(
        r#"
[supervisor]
stop_timeout = "10s"

[sockets.http]
listen = "127.0.0.1:0"

[apps.web]
command = ["{hello}"]
workers = 4
sockets = ["http"]
ready = "notify"
"#,
    );
    let addr = clusterd.socket_addr("http");
    clusterd.wait_ready("web", 4, 20 * SECOND);

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for i in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        clients.push(std::thread::spawn(move || {
            let mut keep_alive = KeepAlive { addr, stream: None };
            // Bounded: at most 20 000 requests per client.
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let result = if i % 2 == 0 {
                    http_get(addr, "/").map(|r| r.status)
                } else {
                    keep_alive.get("/")
                };
                match result {
                    Ok(200) => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(status) => {
                        eprintln!("client {i}: status {status}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => {
                        eprintln!("client {i}: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    assert!(
        wait_until(10 * SECOND, || ok.load(Ordering::Relaxed) > 100),
        "load did not start"
    );
    for round in 0..2 {
        let output = clusterd.ctl(&["reload", "--wait"]);
        assert!(
            output.status.success(),
            "round {round}: {}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
    let before_stop = ok.load(Ordering::Relaxed);
    assert!(wait_until(10 * SECOND, || ok.load(Ordering::Relaxed)
        > before_stop + 100));
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().expect("client thread");
    }

    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "failed requests during the rollouts"
    );
    let serving = clusterd.serving("web");
    assert_eq!(serving.len(), 4);
    assert!(
        serving.iter().all(|(_, _, generation, _)| *generation == 3),
        "{serving:?}"
    );
    assert!(clusterd.stop().success());
}

#[test]
fn a_worker_that_stops_heartbeating_is_replaced() {
    let clusterd = Clusterd::start(
        r#"
[supervisor]
log_format = "json"

[sockets.http]
listen = "127.0.0.1:0"

[apps.healthy]
command = ["{hello}"]
workers = 1
sockets = ["http"]
ready = "notify"
watchdog = "2s"

[apps.hung]
command = ["{hello}"]
workers = 1
sockets = ["http"]
ready = "notify"
watchdog = "2s"
env = { HELLO_NO_WATCHDOG = "1" }
"#,
    );
    let healthy = clusterd.first_pid("healthy[0]");
    let missed = clusterd.wait_event("watchdog_missed", 10 * SECOND, |_| true);
    assert_eq!(
        (&missed["app"], &missed["slot"]),
        (&"hung".into(), &0.into()),
        "{missed}"
    );
    assert_eq!(missed["period_ms"], 2000, "{missed}");
    // The hung one is replaced, and its replacement misses its heartbeat too: two watchdog
    // periods pass meanwhile, in which the healthy one (WATCHDOG_USEC is set for it too)
    // heartbeats and is never killed.
    clusterd.wait_worker("hung", 0, 20 * SECOND, |w| {
        w["restarts"].as_u64() >= Some(2)
    });
    let worker = clusterd.wait_worker("healthy", 0, 10 * SECOND, |w| !w["pid"].is_null());
    assert_eq!(worker["restarts"], 0, "{worker}");
    assert_eq!(crate::util::json_pid(&worker), healthy);
    let missed = clusterd.events("watchdog_missed");
    assert!(
        missed.iter().all(|e| e["app"] == "hung"),
        "{}",
        clusterd.output()
    );
}

#[test]
fn sighup_rejects_a_broken_manifest_and_applies_a_scale_down() {
    let manifest = |workers: usize| {
        format!(
            "[supervisor]\nstop_timeout = \"2s\"\nlog_format = \"json\"\n[apps.sleepy]\ncommand = [\"sleep\", \"1000\"]\nworkers = {workers}\n"
        )
    };
    let mut clusterd = Clusterd::start(&manifest(4));
    clusterd.wait_worker("sleepy", 3, 10 * SECOND, |w| !w["pid"].is_null());
    let before = clusterd.serving("sleepy");
    assert_eq!(before.len(), 4);

    clusterd.rewrite_manifest("[apps.sleepy]\ncommand = [\"sleep\"]\nworkers = -3\n");
    clusterd.signal(Signal::SIGHUP);
    let rejected = clusterd.wait_for_line("manifest re-read rejected", 10 * SECOND);
    assert!(rejected.contains("nothing changed"));
    // The errors follow on the next lines of the log.
    clusterd.wait_for_line(
        "apps.sleepy.workers: expected a positive integer",
        5 * SECOND,
    );
    assert_eq!(clusterd.serving("sleepy"), before);

    clusterd.rewrite_manifest(&manifest(2));
    clusterd.signal(Signal::SIGHUP);
    clusterd.wait_event("reconfigured", 10 * SECOND, |e| {
        e["changes"]
            .as_array()
            .is_some_and(|c| c.contains(&"sleepy: workers 4 -> 2".into()))
    });
    assert!(wait_until(10 * SECOND, || clusterd.serving("sleepy").len() == 2));
    let after = clusterd.serving("sleepy");
    assert_eq!(after, before[..2]);
    assert!(wait_until(10 * SECOND, || before[2..]
        .iter()
        .all(|(_, pid, _, _)| !alive(*pid))));
    assert_eq!(clusterd.status()["apps"][0]["desired"], 2);

    // SIGTTIN adds one back.
    clusterd.signal(Signal::SIGTTIN);
    assert!(wait_until(10 * SECOND, || clusterd.serving("sleepy").len() == 3));
    assert!(clusterd.stop().success());
}

#[test]
fn reload_requests_during_a_rollout_coalesce_into_one_more() {
    let clusterd = Clusterd::start_with_files(&gated_manifest(1, "30s"), &[("gated.sh", GATED)]);
    std::fs::write(clusterd.dir.path().join("go-1"), "").expect("go");
    clusterd.wait_ready("gated", 1, 10 * SECOND);
    // The first request starts generation 2, which waits for go-2; the next two coalesce.
    for _ in 0..3 {
        assert!(clusterd.ctl(&["reload"]).status.success());
    }
    clusterd.wait_for_line("waiting for go-2", 10 * SECOND);
    // (The log travels apart from the worker's output: wait for its events, then count.)
    assert!(wait_until(10 * SECOND, || {
        clusterd.events("reload_queued").len() >= 2
    }));
    assert_eq!(
        clusterd.events("reload_queued").len(),
        2,
        "{}",
        clusterd.output()
    );
    for generation in [2, 3] {
        std::fs::write(clusterd.dir.path().join(format!("go-{generation}")), "").expect("go");
    }
    // Once generation 3 is rolled out and no rollout is under way, nothing more is pending
    // (a pending request would have started at once).
    let mut status = serde_json::Value::Null;
    assert!(wait_until(20 * SECOND, || {
        status = clusterd.status();
        status["apps"][0]["last_reload"]["generation"] == 3
            && status["apps"][0]["reloading"].is_null()
    }));
    assert_eq!(
        status["apps"][0]["last_reload"]["outcome"], "completed",
        "{status}"
    );
    // The log travels apart from status: wait for its lines, then count them.
    assert!(wait_until(10 * SECOND, || {
        clusterd.events("rollout_done").len() >= 2
    }));
    let done: Vec<_> = clusterd
        .events("rollout_done")
        .iter()
        .map(|e| e["generation"].clone())
        .collect();
    assert_eq!(done, [2, 3], "exactly one more rollout");
    assert_eq!(clusterd.serving("gated")[0].2, 3);
    assert_eq!(clusterd.count("waiting for go-4"), 0);
}

#[test]
fn sighup_adds_apps_and_rolls_an_app_whose_command_changed() {
    let before = "[supervisor]\nlog_format = \"json\"\n[apps.web]\ncommand = [\"sleep\", \"1000\"]\nworkers = 2\n";
    let clusterd = Clusterd::start(before);
    clusterd.wait_worker("web", 1, 10 * SECOND, |w| !w["pid"].is_null());
    let old = clusterd.serving("web");
    clusterd.rewrite_manifest(&format!(
        "{before}env = {{ COLOR = \"blue\" }}\n[apps.extra]\ncommand = [\"sleep\", \"999\"]\n"
    ));
    clusterd.signal(Signal::SIGHUP);
    let changed = clusterd.wait_event("reconfigured", 10 * SECOND, |_| true);
    let changes = changed["changes"].as_array().expect("changes");
    assert!(
        changes.contains(&"+extra".into())
            && changes.iter().any(|c| c
                .as_str()
                .is_some_and(|c| c.starts_with("web: command/env/cwd/sockets changed"))),
        "{changed}"
    );
    clusterd.wait_event("rollout_done", 20 * SECOND, |e| {
        e["app"] == "web" && e["generation"] == 2
    });
    let new = clusterd.serving("web");
    assert!(new.iter().all(|(_, pid, generation, _)| *generation == 2
        && crate::util::env_var(*pid, "COLOR").as_deref() == Some("blue")));
    assert!(old.iter().all(|(_, pid, _, _)| !alive(*pid)));
    assert_eq!(clusterd.serving("extra").len(), 1);

    // Removing the app stops its worker.
    let extra = clusterd.serving("extra")[0].1;
    clusterd.rewrite_manifest(&format!("{before}env = {{ COLOR = \"blue\" }}\n"));
    clusterd.signal(Signal::SIGHUP);
    clusterd.wait_event("reconfigured", 10 * SECOND, |e| {
        e["changes"]
            .as_array()
            .is_some_and(|c| c.contains(&"-extra".into()))
    });
    assert!(wait_until(10 * SECOND, || !alive(extra)));
}

#[test]
fn delay_readiness_and_extend_timeout() {
    // `delay`: ready after being alive for ready_delay. The second app needs 2 s to be ready
    // but has a ready_timeout of 1 s, which it extends by EXTEND_TIMEOUT_USEC.
    let clusterd = Clusterd::start(
        r#"
[supervisor]
log_format = "json"

[apps.delayed]
command = ["sleep", "1000"]
ready = "delay"
ready_delay = "500ms"

[apps.slow]
command = ["sh", "-c", "\"$CLUSTERD_EXE\" notify EXTEND_TIMEOUT_USEC=10000000; sleep 2; \"$CLUSTERD_EXE\" notify READY=1; exec sleep 1000"]
ready = "notify"
ready_timeout = "1s"
"#,
    );
    clusterd.wait_worker("delayed", 0, 10 * SECOND, |w| !w["pid"].is_null());
    let early = clusterd.status();
    let state = |status: &serde_json::Value, app: &str| {
        status["apps"]
            .as_array()
            .expect("apps")
            .iter()
            .find(|a| a["name"] == app)
            .expect("app")["workers"][0]["state"]
            .clone()
    };
    assert_eq!(state(&early, "delayed"), "starting", "{early}");
    clusterd.wait_event("ready", 5 * SECOND, |e| e["app"] == "delayed");
    assert!(wait_until(5 * SECOND, || state(
        &clusterd.status(),
        "delayed"
    ) == "ready"));
    let ready_ms = clusterd.status()["apps"][0]["workers"][0]["ready_ms"]
        .as_u64()
        .expect("ready_ms");
    assert!(ready_ms >= 500, "ready after {ready_ms} ms");

    clusterd.wait_event("ready", 10 * SECOND, |e| e["app"] == "slow");
    assert!(wait_until(10 * SECOND, || state(
        &clusterd.status(),
        "slow"
    ) == "ready"));
    assert!(
        clusterd.events("not_ready").is_empty(),
        "{}",
        clusterd.output()
    );
    let status = clusterd.status();
    assert_eq!(
        app_in(&status, "slow").expect("slow")["workers"][0]["restarts"],
        0,
        "{status}"
    );
}

#[test]
fn hostile_notifications_cannot_hurt_the_supervisor() {
    // Absurd values, garbage and a watchdog trigger: clusterd must keep running, and the
    // trigger must get the worker replaced.
    let clusterd = Clusterd::start(
        r#"
[supervisor]
log_format = "json"

[apps.rogue]
command = ["sh", "-c", "\"$CLUSTERD_EXE\" notify EXTEND_TIMEOUT_USEC=18446744073709551615 EXTEND_TIMEOUT_USEC=-1 READY=maybe STATUS= garbage; \"$CLUSTERD_EXE\" notify READY=1; sleep 0.2; \"$CLUSTERD_EXE\" notify WATCHDOG=trigger; exec sleep 1000"]
ready = "notify"
ready_timeout = "10s"
"#,
    );
    clusterd.wait_event("watchdog_triggered", 10 * SECOND, |e| {
        e["app"] == "rogue" && e["slot"] == 0
    });
    let rogue = clusterd.wait_worker("rogue", 0, 10 * SECOND, |w| {
        w["restarts"].as_u64() >= Some(1) && !w["pid"].is_null()
    });
    assert_eq!(rogue["restarts"], 1, "{rogue}");
    assert!(
        !clusterd.output().contains("panicked"),
        "{}",
        clusterd.output()
    );
}
