//! PM2's daily habits: `clusterd startup` (the systemd unit).

use std::path::Path;
use std::process::Command;

use crate::util::{clusterd_bin, write_executable};

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
