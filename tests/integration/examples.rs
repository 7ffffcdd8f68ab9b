//! The bundled manifests and the Node.js and Python examples, run under clusterd for real.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::util::{Clusterd, clusterd_bin, http_get, wait_until};

const SECOND: Duration = Duration::from_secs(1);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_bundled_manifests_are_valid() {
    for manifest in [
        "supervisor.toml",
        "examples/node/supervisor.toml",
        "examples/node/ipc.toml",
        "examples/python/supervisor.toml",
        "examples/kv-http/supervisor.toml",
        "examples/node-kv/supervisor.toml",
    ] {
        let output = Command::new(clusterd_bin())
            .arg("check")
            .arg(repo().join(manifest))
            .output()
            .expect("check");
        assert!(
            output.status.success(),
            "{manifest}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Runs `command` (an interpreter and a server script) as 2 workers with `ready = "notify"`,
/// checks both slots answer, rolls a reload, and stops cleanly.
fn serve_and_reload(interpreter: &str, script: &Path) {
    let mut clusterd = Clusterd::start(&format!(
        r#"
[supervisor]
stop_timeout = "10s"

[sockets.http]
listen = "127.0.0.1:0"

[apps.web]
command = ["{interpreter}", "{}"]
workers = 2
sockets = ["http"]
ready = "notify"
ready_timeout = "20s"
"#,
        script.display()
    ));
    let addr = clusterd.socket_addr("http");
    clusterd.wait_for_lines("ready after", 2, 30 * SECOND);
    let mut slots = std::collections::BTreeSet::new();
    assert!(
        wait_until(20 * SECOND, || {
            if let Ok(response) = http_get(addr, "/whoami") {
                assert_eq!(response.status, 200);
                let json: serde_json::Value = serde_json::from_str(&response.body).expect("json");
                slots.insert(json["slot"].as_u64().expect("slot"));
            }
            slots.len() == 2
        }),
        "not every slot answered: {slots:?}"
    );
    let output = clusterd.ctl(&["reload", "--wait"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(
        clusterd
            .serving("web")
            .iter()
            .all(|(_, _, generation, state)| *generation == 2 && state == "ready")
    );
    assert_eq!(http_get(addr, "/").expect("request").status, 200);
    assert!(clusterd.stop().success(), "{}", clusterd.output());
}

#[test]
fn the_node_example_serves_on_the_inherited_fd_and_reloads() {
    serve_and_reload("node", &repo().join("examples/node/server.js"));
}

#[test]
fn the_python_example_serves_on_the_inherited_fd_and_reloads() {
    serve_and_reload("python3", &repo().join("examples/python/server.py"));
}

#[test]
fn the_node_example_own_tests_pass() {
    let output = Command::new("node")
        .arg("--test")
        .arg(repo().join("examples/node"))
        .output()
        .expect("node");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_python_example_own_tests_pass() {
    let output = Command::new("python3")
        .args(["-m", "unittest", "discover", "-s"])
        .arg(repo().join("examples/python"))
        .output()
        .expect("python3");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
