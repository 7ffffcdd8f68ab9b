//! PM2's daily habits: `clusterd startup` (the systemd unit) and `clusterd ls`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::util::{Clusterd, clusterd_bin, write_executable};

/// The version of the installed systemd, or `None` (after `require` says why) without one.
fn systemd_version() -> Option<u32> {
    match Command::new("systemd-analyze").arg("--version").output() {
        Ok(output) if output.status.success() => String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u32>().ok()),
        other => {
            crate::util::require(&format!(
                "cannot run systemd-analyze ({other:?}); Debian's `systemd` package provides it"
            ));
            None
        }
    }
}

/// A manifest whose longest stop is an app's 25s (the supervisor's default is 20s), in a
/// directory whose name has a space.
fn manifest_in(dir: &Path) -> std::path::PathBuf {
    let app_dir = dir.join("my shop");
    std::fs::create_dir_all(&app_dir).expect("mkdir");
    let manifest = app_dir.join("supervisor.toml");
    std::fs::write(
        &manifest,
        "[supervisor]\nstop_timeout = \"20s\"\n\n\
         [apps.web]\ncommand = [\"sleep\", \"100\"]\nworkers = 2\nstop_timeout = \"25s\"\n",
    )
    .expect("write manifest");
    manifest
}

/// `systemd-analyze verify` of `unit` (any output fails).
fn verify(unit: &Path, version: u32) {
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit)
        .output()
        .expect("systemd-analyze verify");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.trim().is_empty(),
        "systemd-analyze verify (systemd {version}) {}: {:?}\n{said}\n{}",
        unit.display(),
        output.status,
        std::fs::read_to_string(unit).unwrap_or_default()
    );
}

#[test]
fn startup_prints_a_unit_that_systemd_analyze_verify_accepts() {
    let Some(version) = systemd_version() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let manifest = manifest_in(dir.path());
    for user in [false, true] {
        let mut command = Command::new(clusterd_bin());
        command.arg("startup").arg(&manifest);
        if user {
            command.arg("--user");
        }
        let output = command.output().expect("clusterd startup");
        let unit = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{unit}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let lines: Vec<&str> = unit.lines().collect();
        let has = |line: &str| lines.contains(&line);
        let binary = clusterd_bin();
        assert!(binary.is_absolute());
        let exec = format!(
            "ExecStart=\"{}\" start{} \"{}\"",
            binary.display(),
            if user {
                String::new()
            } else {
                " --run-dir \"/run/clusterd-my-shop\"".to_owned()
            },
            manifest.display()
        );
        assert!(has(&exec), "no {exec:?} in\n{unit}");
        for line in ["Delegate=yes", "KillMode=mixed", "TimeoutStopSec=35s"] {
            assert!(has(line), "no {line} in\n{unit}");
        }
        if version >= 253 {
            assert!(has("Type=notify-reload"), "{unit}");
        } else {
            assert!(has("Type=notify"), "{unit}");
            assert!(has("ExecReload=/bin/kill -HUP $MAINPID"), "{unit}");
        }
        assert_eq!(has("RuntimeDirectory=clusterd-my-shop"), !user, "{unit}");
        let wanted = if user {
            "WantedBy=default.target"
        } else {
            "WantedBy=multi-user.target"
        };
        assert!(has(wanted), "{unit}");
        let file = dir.path().join("clusterd-my-shop.service");
        std::fs::write(&file, &unit).expect("write unit");
        verify(&file, version);
    }
}

/// `--install --user` writes the unit under `$XDG_CONFIG_HOME/systemd/user` and runs
/// `systemctl --user daemon-reload` and `enable`: a `systemctl` first in `PATH` records its
/// arguments (the test must not enable anything in the machine's own user manager).
#[test]
fn startup_install_writes_the_user_unit_and_enables_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let manifest = manifest_in(dir.path());
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).expect("mkdir");
    let calls = dir.path().join("calls");
    write_executable(
        &bin.join("systemctl"),
        &format!("#!/bin/sh\necho \"$@\" >> '{}'\n", calls.display()),
    );
    let config = dir.path().join("config");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = Command::new(clusterd_bin())
        .args(["startup", "--user", "--install", "--name", "shop"])
        .arg(&manifest)
        .env("XDG_CONFIG_HOME", &config)
        .env("PATH", &path)
        .output()
        .expect("clusterd startup --install");
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(said.contains("systemctl --user start shop"), "{said}");
    let unit = std::fs::read_to_string(config.join("systemd/user/shop.service")).expect("unit");
    assert!(unit.contains("\nDelegate=yes\n"), "{unit}");
    let calls = std::fs::read_to_string(&calls).expect("systemctl calls");
    assert_eq!(
        calls
            .lines()
            .filter(|l| *l != "--version")
            .collect::<Vec<_>>(),
        ["--user daemon-reload", "--user enable shop.service"]
    );
}

/// `clusterd ls --json [--clean]` run in `cwd` with `XDG_RUNTIME_DIR=runtime`: one object per
/// run directory.
fn ls(cwd: &Path, runtime: &Path, clean: bool) -> Vec<serde_json::Value> {
    let mut command = Command::new(clusterd_bin());
    command
        .args(["ls", "--json"])
        .current_dir(cwd)
        .env("XDG_RUNTIME_DIR", runtime);
    if clean {
        command.arg("--clean");
    }
    let output = command.output().expect("clusterd ls");
    let said = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    said.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The entry of `run_dir` in `entries`.
fn entry<'a>(entries: &'a [serde_json::Value], run_dir: &Path) -> Option<&'a serde_json::Value> {
    entries
        .iter()
        .find(|e| e["run_dir"].as_str() == Some(&run_dir.display().to_string()))
}

/// One supervisor started here (run dir `./.clusterd/`), one started elsewhere with
/// `XDG_RUNTIME_DIR` (run dir under `$XDG_RUNTIME_DIR/clusterd/`), and a stale run dir in each
/// place, and one whose pid lives: `ls` lists both supervisors with pid, manifest and
/// ready/desired, marks the stale dirs, and `--clean` removes those only.
#[test]
fn ls_lists_every_supervisor_marks_stale_run_dirs_and_cleans_them() {
    let manifest =
        "[apps.web]\ncommand = [\"sleep\", \"1000\"]\nworkers = 2\nready = \"immediate\"\n";
    let runtime = tempfile::tempdir().expect("temp dir");
    let mut here = Clusterd::start(manifest);
    let mut elsewhere = Clusterd::start_with(manifest, |command| {
        command.env("XDG_RUNTIME_DIR", runtime.path());
    });
    here.wait_ready("web", 2, Duration::from_secs(20));
    // The harness's status reads `./.clusterd/`: this one's run dir (and its readiness) is
    // in its log only.
    elsewhere.wait_for_lines("ready after", 2, Duration::from_secs(20));
    let line = elsewhere.wait_for_line("control socket ", Duration::from_secs(20));
    let (_, socket) = line.split_once("control socket ").expect("socket");
    let elsewhere_dir = Path::new(socket).parent().expect("run dir").to_owned();
    assert!(
        elsewhere_dir.starts_with(runtime.path().join("clusterd")),
        "{line}"
    );

    // A pid that ran and was reaped.
    let mut gone = Command::new("true").spawn().expect("spawn true");
    gone.wait().expect("wait true");
    let stale_runtime = runtime.path().join("clusterd/old-0badc0de");
    std::fs::create_dir_all(&stale_runtime).expect("mkdir");
    std::fs::write(
        stale_runtime.join("clusterd.pid"),
        format!("{}\n", gone.id()),
    )
    .expect("pid file");
    let stale_here = here.dir.path().join(".clusterd/gone");
    std::fs::create_dir_all(&stale_here).expect("mkdir");

    // A pid that lives (this test's own) and no control socket: not stale, never cleaned.
    let busy = runtime.path().join("clusterd/busy-0000beef");
    std::fs::create_dir_all(&busy).expect("mkdir");
    std::fs::write(
        busy.join("clusterd.pid"),
        format!("{}\n", std::process::id()),
    )
    .expect("pid file");
    let cwd = here.dir.path();
    let entries = ls(cwd, runtime.path(), false);
    let here_dir = here.control_socket().parent().expect("run dir").to_owned();
    for (supervisor, run_dir) in [(&here, here_dir), (&elsewhere, elsewhere_dir)] {
        let found = entry(&entries, &run_dir)
            .unwrap_or_else(|| panic!("no {} in {entries:#?}", run_dir.display()));
        assert_eq!(found["state"], "running", "{found}");
        assert_eq!(
            found["pid"].as_u64(),
            Some(u64::from(supervisor.pid().as_raw().unsigned_abs())),
            "{found}"
        );
        assert_eq!(
            found["manifest"].as_str(),
            Some(supervisor.manifest.display().to_string().as_str()),
            "{found}"
        );
        assert_eq!(
            found["apps"],
            serde_json::json!([{"name": "web", "ready": 2, "desired": 2}])
        );
    }
    for stale in [&stale_runtime, &stale_here] {
        let found = entry(&entries, stale)
            .unwrap_or_else(|| panic!("no {} in {entries:#?}", stale.display()));
        assert_eq!(found["state"], "stale", "{found}");
    }
    assert_eq!(
        entry(&entries, &busy).expect("listed")["state"],
        "not answering"
    );
    assert_eq!(entries.len(), 5, "{entries:#?}");

    let cleaned = ls(cwd, runtime.path(), true);
    for stale in [&stale_runtime, &stale_here] {
        assert_eq!(entry(&cleaned, stale).expect("listed")["removed"], true);
        assert!(!stale.exists(), "{} is still there", stale.display());
    }
    let entries = ls(cwd, runtime.path(), false);
    assert!(busy.exists());
    assert_eq!(entries.len(), 3, "{entries:#?}");
    assert_eq!(
        entries.iter().filter(|e| e["state"] == "running").count(),
        2,
        "{entries:#?}"
    );
    assert!(here.stop().success());
    assert!(elsewhere.stop().success());
}
