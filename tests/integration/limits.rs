//! Day-two limits: `max_memory`, `restart_limit`, and `{slot}` in the environment.

use std::time::Duration;

use nix::unistd::Pid;

use crate::util::{Clusterd, env_var, wait_until};

const SECOND: Duration = Duration::from_secs(1);

/// The workers of the first app in a status, as JSON objects.
fn workers(clusterd: &Clusterd) -> Vec<serde_json::Value> {
    clusterd.status()["apps"][0]["workers"]
        .as_array()
        .expect("workers")
        .clone()
}

#[test]
fn a_worker_past_max_memory_is_restarted_with_the_reason_in_status() {
    // Slot 0 fills 120 MiB; slot 1 stays small.
    let manifest = r#"
[supervisor]
stop_timeout = "2s"
log_format = "json"

[apps.fat]
log_format = "text"
command = ["python3", "-c", "import os, time\nif os.environ['CLUSTERD_WORKER_ID'] == '0' and os.environ['CLUSTERD_GENERATION'] == '1':\n    x = b'x' * (120 << 20)\nprint('allocated', flush=True)\ntime.sleep(1000)"]
workers = 2
max_memory = "60M"
"#;
    let mut clusterd = Clusterd::start(manifest);
    clusterd.wait_for_lines("] allocated", 2, 20 * SECOND);
    let first = clusterd.first_pid("fat[0]");
    let over = clusterd.wait_event("over_memory", 20 * SECOND, |e| {
        e["app"] == "fat" && e["slot"] == 0
    });
    assert_eq!(crate::util::json_pid(&over), first, "{over}");
    assert_eq!(over["limit_bytes"], 60 << 20, "{over}");
    assert!(over["bytes"].as_u64() > Some(60 << 20), "{over}");
    let slot0 = clusterd.wait_worker("fat", 0, 10 * SECOND, |w| {
        !w["pid"].is_null() && crate::util::json_pid(w) != first
    });
    let reason = slot0["restart_reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(reason.starts_with("memory: "), "{slot0}");
    // The small worker was left alone.
    let slot1 = clusterd.wait_worker("fat", 1, 10 * SECOND, |w| !w["pid"].is_null());
    assert_eq!(slot1["restarts"], 0, "{slot1}");
    assert!(slot1["restart_reason"].is_null(), "{slot1}");
    assert!(clusterd.stop().success());
}

#[test]
fn restart_limit_stops_a_crash_loop_and_clusterd_restart_revives_it() {
    let manifest = r#"
[apps.loop]
command = ["sh", "-c", "echo run; exit 3"]
backoff_initial = "10ms"
backoff_max = "50ms"
restart_limit = { burst = 3, interval = "30s" }
"#;
    let mut clusterd = Clusterd::start(manifest);
    clusterd.wait_for_line("loop[0] run", 10 * SECOND);
    assert!(
        wait_until(20 * SECOND, || workers(&clusterd)[0]["state"] == "failed"),
        "{}",
        clusterd.output()
    );
    let failed = &workers(&clusterd)[0];
    assert!(
        failed["last_exit"]
            .as_str()
            .is_some_and(|r| r.contains("restart_limit")),
        "{failed}"
    );
    let runs = clusterd.count("loop[0] run");
    assert_eq!(runs, 4, "the first run and three restarts");
    let output = clusterd.ctl(&["restart", "loop:0"]);
    assert!(output.status.success());
    clusterd.wait_for_lines("loop[0] run", runs + 1, 10 * SECOND);
    assert!(clusterd.stop().success());
}

#[test]
fn slot_in_an_environment_value_is_the_workers_slot() {
    let manifest = r#"
[apps.ports]
command = ["sleep", "1000"]
workers = 2
env = { METRICS_PORT = "91{slot}", PLAIN = "x" }
"#;
    let mut clusterd = Clusterd::start(manifest);
    for slot in 0..2 {
        let pid: Pid = clusterd.first_pid(&format!("ports[{slot}]"));
        assert_eq!(env_var(pid, "METRICS_PORT"), Some(format!("91{slot}")));
        assert_eq!(env_var(pid, "PLAIN"), Some("x".into()));
    }
    assert!(clusterd.stop().success());
}

#[test]
fn manifest_strings_take_variables_from_clusterds_environment() {
    let manifest = r#"
[apps.kv]
command = ["sleep", "1000"]
workers = "${CLUSTERD_TEST_WORKERS:-1}"
env = { SEEDS = "${CLUSTERD_TEST_SEEDS:-127.0.0.1:7000}", PRICE = "$$5", FALLBACK = "${CLUSTERD_TEST_UNSET:-used}" }
"#;
    let mut clusterd = Clusterd::start_with(manifest, |command| {
        command
            .env("CLUSTERD_TEST_WORKERS", "2")
            .env("CLUSTERD_TEST_SEEDS", "10.1.2.3:7000,10.1.2.4:7000")
            .env_remove("CLUSTERD_TEST_UNSET");
    });
    let pid = clusterd.first_pid("kv[1]");
    assert_eq!(
        env_var(pid, "SEEDS").as_deref(),
        Some("10.1.2.3:7000,10.1.2.4:7000")
    );
    assert_eq!(env_var(pid, "PRICE").as_deref(), Some("$5"));
    assert_eq!(env_var(pid, "FALLBACK").as_deref(), Some("used"));
    assert!(clusterd.stop().success());
}
