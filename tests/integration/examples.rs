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
    clusterd.wait_ready("web", 2, 30 * SECOND);
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

/// `examples/systemd`: the units pass `systemd-analyze verify`, with `ExecStart=` pointing at
/// the built clusterd (verify checks that it exists and is executable). On systemd older than
/// 253, which does not know `Type=notify-reload`, the variant the README gives for it
/// (`Type=notify` with `ExecReload=/bin/kill -HUP $MAINPID`) is verified instead. Any
/// warning fails the test.
#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    let version = match Command::new("systemd-analyze").arg("--version").output() {
        Ok(output) if output.status.success() => String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u32>().ok())
            .expect("systemd-analyze --version: `systemd N ...`"),
        other => {
            crate::util::require(&format!(
                "cannot run systemd-analyze ({other:?}); Debian's `systemd` package provides it"
            ));
            return;
        }
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let source = repo().join("examples/systemd");
    let readme = std::fs::read_to_string(source.join("README.md")).expect("README");
    let fallback = "Type=notify` with `ExecReload=/bin/kill -HUP $MAINPID`";
    assert!(readme.contains(fallback), "the README's fallback changed");
    for unit in ["clusterd.service", "clusterd.socket"] {
        let mut text = std::fs::read_to_string(source.join(unit)).expect("unit");
        text = text.replace(
            "/usr/local/bin/clusterd",
            &clusterd_bin().display().to_string(),
        );
        if version < 253 {
            text = text.replace(
                "Type=notify-reload\n",
                "Type=notify\nExecReload=/bin/kill -HUP $MAINPID\n",
            );
        }
        std::fs::write(dir.path().join(unit), text).expect("write unit");
    }
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("clusterd.service"))
        .arg(dir.path().join("clusterd.socket"))
        .output()
        .expect("systemd-analyze verify");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.trim().is_empty(),
        "systemd-analyze verify (systemd {version}): {:?}\n{said}",
        output.status
    );
}
