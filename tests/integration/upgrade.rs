//! `clusterd upgrade` with every feature: a detached supervisor logging to files (SIGUSR1 after
//! the upgrade), an intercepted `clusterd run` app under load (the tutorial's child.js), and a
//! Node app whose workers talk over their channels (ipc).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::intercept::{Load, child_js, free_port, restarts, start_run};
use crate::logs::{Detached, cli, file_lines, start_detached};
use crate::util::{Clusterd, alive, clusterd_bin, wait_until, whoami, write_executable};

const SECOND: Duration = Duration::from_secs(1);

/// Every worker pid in a status, sorted.
fn worker_pids(status: &serde_json::Value) -> Vec<u64> {
    let mut pids: Vec<u64> = status["apps"]
        .as_array()
        .expect("apps")
        .iter()
        .flat_map(|a| a["workers"].as_array().expect("workers").clone())
        .filter_map(|w| w["pid"].as_u64())
        .collect();
    pids.sort();
    pids
}

fn json(output: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {output:?}"))
}

/// The reproduction of issue 17: `start -d` with `log = "logs/"`, `clusterd upgrade`, then
/// logrotate's `kill -USR1`. The upgraded clusterd logs where the first one did, and SIGUSR1
/// reopens the files instead of killing clusterd and, through PDEATHSIG, every worker.
#[test]
fn after_an_upgrade_sigusr1_reopens_the_log_files_and_kills_nothing() {
    let mut detached = Detached::new(
        r#"
[supervisor]
stop_timeout = "5s"
log = "logs/"
[sockets.http]
listen = "127.0.0.1:0"
[apps.web]
command = ["{hello}"]
workers = 2
sockets = ["http"]
ready = "notify"
[apps.tick]
command = ["sh", "-c", "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.05; done"]
"#,
    );
    let output = start_detached(&detached);
    assert!(output.status.success(), "{output:?}");
    let before = json(&cli(&detached.manifest, &["status", "--json"]));
    let pid = Pid::from_raw(before["pid"].as_i64().expect("pid") as i32);
    detached.pid = Some(pid);
    assert_eq!(worker_pids(&before).len(), 3);
    let addr: SocketAddr = before["sockets"][0]["address"]
        .as_str()
        .expect("address")
        .parse()
        .expect("an address");

    let upgrade = cli(&detached.manifest, &["upgrade"]);
    assert!(upgrade.status.success(), "{upgrade:?}");
    let logs = detached.dir.path().join("logs");
    let events = logs.join("clusterd.log");
    // The new clusterd's events go to the configured file, not to its stderr.
    assert!(
        wait_until(10 * SECOND, || file_lines(&events)
            .iter()
            .any(|l| l.contains("upgraded in place from clusterd"))),
        "{:#?}",
        file_lines(&events)
    );

    // `clusterd logs` still shows what the first clusterd kept.
    let logs_output = cli(&detached.manifest, &["logs", "clusterd", "-n", "1000"]);
    let kept = String::from_utf8_lossy(&logs_output.stdout);
    assert!(
        kept.contains("web[0] started pid") && kept.contains("upgraded in place"),
        "{logs_output:?}"
    );

    // logrotate: move the files away, then SIGUSR1.
    std::fs::rename(&events, logs.join("clusterd.log.1")).expect("rotate");
    std::fs::rename(logs.join("tick.log"), logs.join("tick.log.1")).expect("rotate");
    kill(pid, Signal::SIGUSR1).expect("SIGUSR1");
    assert!(
        wait_until(10 * SECOND, || file_lines(&events)
            .iter()
            .any(|l| l.contains("SIGUSR1: log files reopened"))),
        "clusterd alive: {}; {:#?}",
        alive(pid),
        file_lines(&events)
    );
    assert!(
        wait_until(10 * SECOND, || file_lines(&logs.join("tick.log"))
            .iter()
            .any(|l| l.contains("tick[0] tick"))),
        "the workers' lines did not go to the reopened file"
    );
    assert!(alive(pid));
    let after = json(&cli(&detached.manifest, &["status", "--json"]));
    assert_eq!(after["pid"], before["pid"]);
    assert_eq!(after["upgrades"], 1);
    assert_eq!(
        worker_pids(&after),
        worker_pids(&before),
        "a worker was replaced"
    );
    whoami(addr).expect("a worker answers");

    let output = cli(&detached.manifest, &["stop"]);
    assert!(output.status.success(), "{output:?}");
    assert!(!alive(pid));
}

/// A detached supervisor with no `log` set writes to its run directory's `clusterd.log`; the
/// upgraded one still does (it knows it was started with `-d`), its workers' lines too.
#[test]
fn a_detached_supervisor_logs_to_its_run_directory_after_an_upgrade() {
    let mut detached = Detached::new(
        r#"
[apps.tick]
command = ["sh", "-c", "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.05; done"]
"#,
    );
    let output = start_detached(&detached);
    assert!(output.status.success(), "{output:?}");
    let status = json(&cli(&detached.manifest, &["status", "--json"]));
    let pid = Pid::from_raw(status["pid"].as_i64().expect("pid") as i32);
    detached.pid = Some(pid);
    let upgrade = cli(&detached.manifest, &["upgrade"]);
    assert!(upgrade.status.success(), "{upgrade:?}");
    let log = detached.dir.path().join(".clusterd/app/clusterd.log");
    let upgraded = |lines: &[String]| {
        lines
            .iter()
            .position(|l| l.contains("upgraded in place from clusterd"))
    };
    assert!(
        wait_until(10 * SECOND, || {
            let lines = file_lines(&log);
            upgraded(&lines).is_some_and(|at| {
                lines[at..]
                    .iter()
                    .filter(|l| l.contains("tick[0] tick"))
                    .count()
                    > 3
            })
        }),
        "{:#?}",
        file_lines(&log)
    );
    let output = cli(&detached.manifest, &["stop"]);
    assert!(output.status.success(), "{output:?}");
}

/// Issue 17's "done when": `clusterd run --workers 2 --listen ADDR -- node child.js` under
/// load, `clusterd upgrade` twice, then `kill -USR1`: same clusterd pid, same worker pids,
/// no failed request, output goes on. Then a rolling reload proves the steering (each
/// worker's own socket and the program choosing among them) came across too. child.js is the
/// tutorial's file with its hard-coded port replaced by a free one, so that this test can run
/// beside the others that use it.
#[test]
fn an_intercepted_run_app_is_upgraded_twice_under_load_and_keeps_every_pid() {
    let Some(script) = child_js() else { return };
    let port = free_port();
    let script = String::from_utf8(script)
        .expect("child.js is text")
        .replace("const PORT = 8001;", &format!("const PORT = {port};"));
    assert!(script.contains(&format!("const PORT = {port};")));
    let listen = format!("127.0.0.1:{port}");
    let mut clusterd = start_run(
        &[
            "--workers",
            "2",
            "--listen",
            &listen,
            "--",
            "node",
            "child.js",
        ],
        &[("child.js", script.as_bytes())],
    );
    let addr: SocketAddr = listen.parse().expect("addr");
    clusterd.wait_ready("node", 2, 20 * SECOND);
    let before = clusterd.status();
    let pids = worker_pids(&before);
    assert_eq!(pids.len(), 2);

    let load = Load::with_clients(addr, 4);
    let served = "This request came from";
    assert!(wait_until(20 * SECOND, || clusterd.count(served) > 20));
    for n in 1..=2 {
        let upgrade = clusterd.ctl(&["upgrade"]);
        let said = String::from_utf8_lossy(&upgrade.stdout).into_owned();
        assert!(
            upgrade.status.success() && said.contains("2 workers kept"),
            "upgrade {n}: {said}{}",
            String::from_utf8_lossy(&upgrade.stderr)
        );
    }
    kill(clusterd.pid(), Signal::SIGUSR1).expect("SIGUSR1");
    clusterd.wait_for_line("event=logs_reopened", 10 * SECOND);
    let at_usr1 = clusterd.count(served);
    assert!(
        wait_until(20 * SECOND, || clusterd.count(served) > at_usr1 + 20),
        "the workers' output stopped after SIGUSR1"
    );
    let (answered, failures) = load.finish();
    assert!(answered > 0);
    assert!(
        failures.is_empty(),
        "{} of {} requests failed across the upgrades: {failures:?}",
        failures.len(),
        answered + failures.len()
    );
    let after = clusterd.status();
    assert_eq!(after["pid"], before["pid"]);
    assert_eq!(after["upgrades"], 2);
    assert_eq!(worker_pids(&after), pids, "a worker was replaced");
    assert_eq!(restarts(&clusterd, "node"), 0);

    let load = Load::with_clients(addr, 4);
    let reload = clusterd.ctl(&["reload", "--wait"]);
    assert!(
        reload.status.success(),
        "{}",
        String::from_utf8_lossy(&reload.stdout)
    );
    let (answered, failures) = load.finish();
    assert!(
        answered > 0 && failures.is_empty(),
        "{} of {} requests failed in the reload after the upgrades: {failures:?}",
        failures.len(),
        answered + failures.len()
    );
    assert!(clusterd.stop().success());
}

/// A Node app with ipc (the guide's workers, broadcasting to each other): after an upgrade
/// their channels are the same sockets, served by the new clusterd — broadcasts and
/// `clusterd send` still arrive, and closing the channels still stops them.
#[test]
fn a_node_app_with_ipc_is_upgraded_and_its_messages_still_flow() {
    let worker = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/node/ipc-worker.js");
    let mut clusterd = Clusterd::start(&format!(
        "[supervisor]\nlog_format = \"json\"\n[apps.web]\nlog_format = \"text\"\n\
         command = [\"node\", \"{}\"]\nworkers = 2\nipc_broadcast = true\n\
         ready = \"message\"\nstop_signal = \"disconnect\"\nenv = {{ IPC_INTERVAL_MS = \"50\" }}\n",
        worker.display()
    ));
    clusterd.wait_ready("web", 2, 20 * SECOND);
    let pids: Vec<Pid> = (0..2)
        .map(|slot| clusterd.first_pid(&format!("web[{slot}]")))
        .collect();
    let heard =
        |to: Pid, from: Pid| format!("worker {to} received {{\"type\":\"status\",\"pid\":{from}");
    let (a, b) = (pids[0], pids[1]);
    clusterd.wait_for_line(&heard(a, b), 20 * SECOND);
    clusterd.wait_for_line(&heard(b, a), 20 * SECOND);

    let upgrade = clusterd.ctl(&["upgrade"]);
    assert!(
        upgrade.status.success(),
        "{}{}",
        String::from_utf8_lossy(&upgrade.stdout),
        String::from_utf8_lossy(&upgrade.stderr)
    );
    clusterd.wait_for_line("event=upgraded", 10 * SECOND);
    // Broadcasts go on, both ways, through the channels the new clusterd serves.
    let counts = (clusterd.count(&heard(a, b)), clusterd.count(&heard(b, a)));
    assert!(
        wait_until(20 * SECOND, || clusterd.count(&heard(a, b)) > counts.0 + 5
            && clusterd.count(&heard(b, a)) > counts.1 + 5),
        "{}",
        clusterd.output()
    );
    let sent = clusterd.ctl(&["send", "web", r#"{"after":1}"#]);
    assert!(sent.status.success(), "{sent:?}");
    for pid in &pids {
        clusterd.wait_for_line(
            &format!("worker {pid} received {{\"after\":1}}"),
            10 * SECOND,
        );
    }
    let status = clusterd.status();
    assert_eq!(status["upgrades"], 1);
    let mut expected: Vec<u64> = pids.iter().map(|p| p.as_raw() as u64).collect();
    expected.sort();
    assert_eq!(worker_pids(&status), expected, "a worker was replaced");
    assert_eq!(
        clusterd.events("started").len(),
        2,
        "a worker was replaced: {}",
        clusterd.output()
    );

    // stop_signal = "disconnect": closing the handed-over channels still stops them.
    assert!(clusterd.stop().success());
    for pid in &pids {
        assert!(
            clusterd
                .output()
                .contains(&format!("worker {pid} disconnected; exiting")),
            "{}",
            clusterd.output()
        );
    }
}

/// The new binary's `handover-check` runs beside the loop, not in it: while it takes its
/// time, clusterd answers status, and a killed worker is reaped and replaced. Then the
/// upgrade goes on, with the replacement kept.
#[test]
fn while_the_new_binary_is_checked_clusterd_reaps_and_replaces_workers() {
    let mut clusterd = Clusterd::start(
        r#"
[sockets.http]
listen = "127.0.0.1:0"
[apps.web]
command = ["{hello}"]
workers = 2
sockets = ["http"]
ready = "notify"
"#,
    );
    clusterd.wait_ready("web", 2, 20 * SECOND);
    let dir = clusterd.dir.path().to_owned();
    // A binary whose check waits until the test says so.
    let slow = dir.join("slow-clusterd");
    write_executable(
        &slow,
        &format!(
            "#!/bin/sh\nif [ \"$1\" = handover-check ]; then\n  touch {dir}/checking\n  \
             while [ ! -e {dir}/go ]; do sleep 0.02; done\nfi\nexec {clusterd} \"$@\"\n",
            dir = dir.display(),
            clusterd = clusterd_bin().display()
        ),
    );
    let upgrade = std::process::Command::new(clusterd_bin())
        .args(["upgrade", "--binary"])
        .arg(&slow)
        .arg("-f")
        .arg(&clusterd.manifest)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("clusterd upgrade");
    assert!(wait_until(20 * SECOND, || dir.join("checking").exists()));

    let (_, victim, _, _) = clusterd.serving("web")[0].clone();
    kill(victim, Signal::SIGKILL).expect("kill a worker");
    assert!(
        wait_until(8 * SECOND, || {
            let serving = clusterd.serving("web");
            serving.len() == 2
                && serving
                    .iter()
                    .all(|(_, pid, _, state)| *pid != victim && state == "ready")
        }),
        "the killed worker was not replaced during the check:\n{}",
        clusterd.output()
    );
    assert!(dir.join("checking").exists() && !dir.join("go").exists());
    let pids = worker_pids(&clusterd.status());

    std::fs::write(dir.join("go"), "").expect("go");
    let upgrade = upgrade.wait_with_output().expect("upgrade output");
    assert!(upgrade.status.success(), "{upgrade:?}");
    let after = clusterd.status();
    assert_eq!(after["upgrades"], 1);
    assert_eq!(worker_pids(&after), pids);
    assert!(clusterd.stop().success());
}

/// A new binary whose check never answers: after 10 s the upgrade is refused, the checker
/// killed (and reaped: no zombie), and nothing changed.
#[test]
fn a_check_that_never_answers_is_given_up_after_ten_seconds() {
    let mut clusterd = Clusterd::start(
        r#"
[apps.web]
command = ["sleep", "1000"]
"#,
    );
    clusterd.wait_ready("web", 1, 20 * SECOND);
    let before = worker_pids(&clusterd.status());
    let dir = clusterd.dir.path().to_owned();
    let stuck = dir.join("stuck-clusterd");
    write_executable(
        &stuck,
        &format!(
            "#!/bin/sh\nif [ \"$1\" = handover-check ]; then echo $$ > {dir}/checker; exec sleep 1000; fi\n\
             exec {clusterd} \"$@\"\n",
            dir = dir.display(),
            clusterd = clusterd_bin().display()
        ),
    );
    let started = std::time::Instant::now();
    let upgrade = clusterd.ctl(&["upgrade", "--binary", &stuck.display().to_string()]);
    let stderr = String::from_utf8_lossy(&upgrade.stderr).into_owned();
    assert!(!upgrade.status.success(), "{upgrade:?}");
    assert!(
        stderr.contains("did not finish within 10s") && stderr.contains("nothing changed"),
        "{stderr}"
    );
    assert!(started.elapsed() >= 10 * SECOND);
    let checker: i32 = std::fs::read_to_string(dir.join("checker"))
        .expect("the checker ran")
        .trim()
        .parse()
        .expect("a pid");
    assert!(
        wait_until(10 * SECOND, || !std::path::Path::new(&format!(
            "/proc/{checker}"
        ))
        .exists()),
        "the checker was not killed and reaped"
    );
    let after = clusterd.status();
    assert_eq!(after["upgrades"], 0);
    assert_eq!(worker_pids(&after), before);
    assert!(clusterd.stop().success());
}
