//! The core's promises, with apps that are not polite: a new version that dies right after
//! READY=1, an app that takes seconds to start and never signals readiness, outside kills,
//! and a rollout that must not make the loop spin.

use std::collections::BTreeSet;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::util::{Clusterd, alive, http_get, wait_until, whoami};

const SECOND: Duration = Duration::from_secs(1);

/// Generation 1 is the hello server; later generations are a broken deploy that says
/// READY=1 (as gunicorn's master does before its worker imports the app) and dies 0.4 s later.
const BROKEN_AFTER_READY: &str = r#"#!/bin/sh
if [ "$CLUSTERD_GENERATION" = 1 ]; then exec {hello}; fi
"$CLUSTERD_EXE" notify READY=1
sleep 0.4
echo "ImportError: no module named app" >&2
exit 1
"#;

/// Like [`BROKEN_AFTER_READY`], but told when to die: slot 0's new worker says READY=1 and
/// dies once the test creates `die`; the other slots' new workers never get ready.
const BROKEN_WHEN_TOLD: &str = r#"#!/bin/sh
if [ "$CLUSTERD_GENERATION" = 1 ]; then exec {hello}; fi
if [ "$CLUSTERD_WORKER_ID" != 0 ]; then exec sleep 1000; fi
"$CLUSTERD_EXE" notify READY=1
while [ ! -e "{dir}/die" ]; do sleep 0.05; done
echo "ImportError: no module named app" >&2
exit 1
"#;

fn broken_manifest(bake: &str) -> String {
    format!(
        r#"
[supervisor]
stop_timeout = "5s"

[sockets.http]
listen = "127.0.0.1:0"

[apps.web]
command = ["{{dir}}/app.sh"]
workers = 3
sockets = ["http"]
ready = "notify"
{bake}
"#
    )
}

/// Every request of `count` on a fresh connection, counting failures.
fn failures(addr: std::net::SocketAddr, count: usize) -> usize {
    (0..count)
        .filter(|_| !matches!(http_get(addr, "/"), Ok(r) if r.status == 200))
        .count()
}

#[test]
fn a_version_that_crashes_after_ready_aborts_the_reload_and_the_old_workers_keep_answering() {
    // A bake far longer than the broken version's life, however slow a loaded machine makes
    // its `sleep 0.4`: it dies before its slot is promoted (the reload ends then, not after
    // the bake).
    let mut clusterd = Clusterd::start_with_files(
        &broken_manifest("[apps.web.reload]\nbake = \"60s\""),
        &[("app.sh", BROKEN_AFTER_READY)],
    );
    let addr = clusterd.socket_addr("http");
    clusterd.wait_ready("web", 3, 20 * SECOND);
    let old: BTreeSet<Pid> = clusterd.serving("web").iter().map(|w| w.1).collect();

    let output = clusterd.ctl(&["reload", "--wait"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        !output.status.success(),
        "reload --wait must fail: {stdout}"
    );
    assert!(stdout.contains("ABORTED"), "{stdout}");

    // The same three old workers serve, and they answer.
    let now: BTreeSet<Pid> = clusterd.serving("web").iter().map(|w| w.1).collect();
    assert_eq!(now, old, "{}", clusterd.output());
    let status = clusterd.status();
    assert_eq!(status["apps"][0]["last_reload"]["outcome"], "aborted");
    assert_eq!(failures(addr, 50), 0);
    let mut answered = BTreeSet::new();
    for _ in 0..300 {
        answered.insert(whoami(addr).expect("request").1);
        if answered.len() == 3 {
            break;
        }
    }
    assert!(answered.is_subset(&old));
    assert!(clusterd.stop().success());
}

#[test]
fn a_promoted_version_that_dies_before_the_rollout_ends_is_rolled_back_and_no_request_fails() {
    // Slot 0 is promoted (its old worker stopped) while slot 1's new worker is not ready yet;
    // then the new version dies, with the rollout still under way.
    let mut clusterd = Clusterd::start_with_files(
        &broken_manifest("[apps.web.reload]\nbake = \"200ms\""),
        &[("app.sh", BROKEN_WHEN_TOLD)],
    );
    let addr = clusterd.socket_addr("http");
    clusterd.wait_ready("web", 3, 20 * SECOND);

    let done = std::sync::atomic::AtomicBool::new(false);
    let failed = std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            let mut failed = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                failed += failures(addr, 10);
            }
            failed
        });
        let reload = scope.spawn(|| clusterd.ctl(&["reload", "--wait"]));
        let promoted = clusterd.wait_worker("web", 0, 30 * SECOND, |w| {
            w["generation"] == 2 && w["state"] == "ready"
        });
        let status = clusterd.status();
        assert_eq!(
            status["apps"][0]["reloading"]["done"], 1,
            "{promoted} {status}"
        );
        std::fs::write(clusterd.dir.path().join("die"), "").expect("write die");
        let output = reload.join().expect("reload thread");
        assert!(!output.status.success());
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        load.join().expect("load thread")
    });
    assert_eq!(failed, 0, "{}", clusterd.output());

    // Every slot runs generation 1 again (the broken generation was rolled back), ready.
    assert!(
        wait_until(20 * SECOND, || {
            let serving = clusterd.serving("web");
            serving.len() == 3 && serving.iter().all(|w| w.2 == 1 && w.3 == "ready")
        }),
        "{}",
        clusterd.output()
    );
    let status = clusterd.status();
    assert!(
        status["apps"][0]["last_reload"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("the slot goes back to generation 1")),
        "{status}"
    );
    assert!(clusterd.stop().success());
}

#[test]
fn an_app_that_starts_slowly_without_readiness_keeps_its_old_workers_serving() {
    // Like Express or uvicorn: 1.5 s to start, never says READY. The manifest says nothing
    // about readiness: an app with sockets gets the default delay and bake.
    let slow = "#!/bin/sh\nsleep 1.5\nexec {hello}\n";
    let manifest = r#"
[supervisor]
stop_timeout = "5s"

[sockets.http]
listen = "127.0.0.1:0"

[apps.web]
command = ["{dir}/slow.sh"]
workers = 3
sockets = ["http"]
"#;
    let mut clusterd = Clusterd::start_with_files(manifest, &[("slow.sh", slow)]);
    let addr = clusterd.socket_addr("http");
    assert!(wait_until(20 * SECOND, || {
        let serving = clusterd.serving("web");
        serving.len() == 3 && serving.iter().all(|w| w.3 == "ready")
    }));
    let old: Vec<Pid> = clusterd.serving("web").iter().map(|w| w.1).collect();
    clusterd.signal(Signal::SIGUSR2);
    // While the first new worker starts (1.5 s before it even listens), all three old
    // workers serve.
    let mut status = serde_json::Value::Null;
    assert!(
        wait_until(20 * SECOND, || {
            status = clusterd.status();
            status["apps"][0]["workers"]
                .as_array()
                .expect("workers")
                .iter()
                .any(|w| w["generation"] == 2 && w["state"] == "starting")
        }),
        "no new worker started"
    );
    let still = old.iter().filter(|pid| alive(**pid)).count();
    assert_eq!(
        still, 3,
        "old workers stopped before a new one was ready: {status}"
    );
    assert_eq!(status["apps"][0]["reloading"]["done"], 0, "{status}");
    assert_eq!(failures(addr, 20), 0);
    assert!(clusterd.stop().success());
}

/// CPU seconds (user + system) of a process.
fn cpu_seconds(pid: Pid) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = stat[stat.rfind(')').expect(")") + 2..].split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[test]
fn a_rollout_of_delay_workers_does_not_make_the_loop_spin() {
    let manifest = r#"
[supervisor]
stop_timeout = "2s"

[apps.sleepy]
command = ["sleep", "1000"]
workers = 2
ready = "delay"
ready_delay = "2s"
"#;
    let mut clusterd = Clusterd::start(manifest);
    clusterd.wait_ready("sleepy", 2, 20 * SECOND);
    let before = cpu_seconds(clusterd.pid());
    let output = clusterd.ctl(&["reload", "--wait"]);
    assert!(output.status.success(), "{}", clusterd.output());
    let used = cpu_seconds(clusterd.pid()) - before;
    // The rollout takes about 6 s (two slots: 2 s delay + 1 s bake each); a spinning loop
    // burns all of it. The bound is generous for a loaded machine.
    assert!(
        used < 1.0,
        "clusterd used {used:.2} s of CPU over a ~6 s rollout"
    );
    assert!(clusterd.stop().success());
}

#[test]
fn outside_kills_of_serving_workers_never_put_a_slot_in_backoff() {
    let manifest = r#"
[supervisor]
stop_timeout = "5s"
log_format = "json"

[sockets.http]
listen = "127.0.0.1:0"

[apps.web]
command = ["{hello}"]
workers = 4
sockets = ["http"]
ready = "notify"
"#;
    let mut clusterd = Clusterd::start(manifest);
    let addr = clusterd.socket_addr("http");
    clusterd.wait_ready("web", 4, 20 * SECOND);
    for round in 0..8 {
        let serving = clusterd.serving("web");
        let (slot, victim, _, _) = serving[round % serving.len()].clone();
        nix::sys::signal::kill(victim, Signal::SIGKILL).expect("kill");
        assert!(
            wait_until(10 * SECOND, || {
                clusterd
                    .serving("web")
                    .iter()
                    .any(|w| w.0 == slot && w.1 != victim && w.3 == "ready")
            }),
            "slot {slot} was not replaced:\n{}",
            clusterd.output()
        );
        let status = clusterd.status();
        for worker in status["apps"][0]["workers"].as_array().unwrap() {
            assert_ne!(worker["state"], "backoff", "{status}");
            assert_eq!(worker["crash_streak"], 0, "{status}");
        }
    }
    assert_eq!(failures(addr, 20), 0);
    // Each kill was logged as a restart with no crash streak ("no crash").
    assert!(
        wait_until(10 * SECOND, || clusterd.events("restarting").len() >= 8),
        "{}",
        clusterd.output()
    );
    let restarts = clusterd.events("restarting");
    assert!(
        restarts.iter().all(|e| e["crash_streak"] == 0),
        "{restarts:?}"
    );
    assert!(clusterd.stop().success());
}

#[test]
fn an_app_that_sets_its_own_path_is_found_by_check_start_and_spawn() {
    let manifest = r#"
[apps.tool]
command = ["my-tool"]
env = { PATH = "{dir}/bin:/usr/bin:/bin" }
"#;
    let files = [("bin/my-tool", "#!/bin/sh\nexec sleep 1000\n")];
    let mut clusterd = Clusterd::start_with_files(manifest, &files);
    clusterd.wait_worker("tool", 0, 10 * SECOND, |w| !w["pid"].is_null());
    let check = std::process::Command::new(crate::util::clusterd_bin())
        .arg("check")
        .arg(&clusterd.manifest)
        .output()
        .expect("check");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(clusterd.stop().success());
}

/// Generation 1 is the hello server; a later generation crashes at once in a slot marked by
/// the file `crash-<slot>`.
const CRASH_IN_SLOT: &str = r#"#!/bin/sh
if [ "$CLUSTERD_GENERATION" -ge 2 ] && [ -e "{dir}/crash-$CLUSTERD_WORKER_ID" ]; then
  echo "slot $CLUSTERD_WORKER_ID: bad config" >&2
  exit 1
fi
exec {hello}
"#;

#[test]
fn a_crash_in_the_canary_or_in_a_later_batch_aborts_the_rollout_and_no_request_fails() {
    let mut clusterd = Clusterd::start_with_files(
        &broken_manifest("workers = 4").replace("workers = 3\n", ""),
        &[("app.sh", CRASH_IN_SLOT)],
    );
    let addr = clusterd.socket_addr("http");
    let crash = |slot: Option<usize>| {
        for s in 0..4 {
            let _ = std::fs::remove_file(clusterd.dir.path().join(format!("crash-{s}")));
        }
        if let Some(slot) = slot {
            std::fs::write(clusterd.dir.path().join(format!("crash-{slot}")), "").expect("mark");
        }
    };
    let reload = |clusterd: &Clusterd| {
        let load = std::thread::spawn(move || failures(addr, 200));
        let output = clusterd.ctl(&["reload", "--wait"]);
        assert_eq!(load.join().expect("load"), 0, "{}", clusterd.output());
        output
    };
    assert!(wait_until(20 * SECOND, || {
        let serving = clusterd.serving("web");
        serving.len() == 4 && serving.iter().all(|w| w.3 == "ready")
    }));
    let old: Vec<Pid> = clusterd.serving("web").iter().map(|w| w.1).collect();

    // The canary (slot 0) crashes: every old worker keeps serving.
    crash(Some(0));
    let output = reload(&clusterd);
    assert!(!output.status.success(), "{output:?}");
    let status = clusterd.status();
    let reason = status["apps"][0]["last_reload"]["reason"].as_str().unwrap();
    assert!(reason.starts_with("slot 0 generation 2"), "{reason}");
    let now: Vec<Pid> = clusterd.serving("web").iter().map(|w| w.1).collect();
    assert_eq!(now, old);

    // Slot 3 is in the third batch (after the canary, slot 1, then slots 2 and 3): its crash
    // aborts; slots 0 and 1, promoted before it started, keep their live new workers, and
    // slot 3 keeps its old one.
    crash(Some(3));
    let output = reload(&clusterd);
    assert!(!output.status.success(), "{output:?}");
    let status = clusterd.status();
    let reason = status["apps"][0]["last_reload"]["reason"].as_str().unwrap();
    assert!(reason.starts_with("slot 3 generation 3"), "{reason}");
    assert!(
        wait_until(20 * SECOND, || {
            let serving = clusterd.serving("web");
            serving.len() == 4 && serving.iter().all(|w| w.3 == "ready")
        }),
        "{}",
        clusterd.output()
    );
    let serving = clusterd.serving("web");
    assert_eq!((serving[0].2, serving[1].2), (3, 3), "{serving:?}");
    assert_eq!((serving[3].1, serving[3].2), (old[3], 1), "{serving:?}");
    assert!(alive(old[3]));

    // Fixed: the next rollout completes, every slot on the new generation.
    crash(None);
    let output = reload(&clusterd);
    assert!(output.status.success(), "{output:?}");
    assert!(clusterd.serving("web").iter().all(|w| w.2 == 4));
    assert!(clusterd.stop().success());
}
