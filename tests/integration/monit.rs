//! `clusterd monit` (issue 19 item 4) driven in a real terminal: tmux runs it in a detached
//! session of its own server (`tmux -L`, so no one else's tmux is touched), keys go in with
//! `send-keys`, the screen comes out with `capture-pane`, and `#{alternate_on}` and
//! `#{cursor_flag}` tell whether the terminal was restored.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::util::{Clusterd, app_in, clusterd_bin, json_pid, wait_until, worker_in};

const SECOND: Duration = Duration::from_secs(1);

/// A tmux server of this test's own, with one session running a shell command; killed on
/// drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// Starts `command` (a shell command line) in a `width`x`height` session; `None` (after
    /// `require` says why) where tmux is missing.
    fn start(command: &str, width: u16, height: u16) -> Option<Tmux> {
        if !Command::new("tmux")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            crate::util::require(
                "tmux is missing (Debian's `tmux` package; scripts/test installs it)",
            );
            return None;
        }
        static N: AtomicU32 = AtomicU32::new(0);
        let tmux = Tmux {
            socket: format!(
                "clusterd-monit-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ),
        };
        let output = tmux
            .command()
            .args(["new-session", "-d", "-s", "monit", "-x"])
            .arg(width.to_string())
            .arg("-y")
            .arg(height.to_string())
            .arg(command)
            .output()
            .expect("run tmux");
        assert!(
            output.status.success(),
            "tmux new-session: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Some(tmux)
    }

    fn command(&self) -> Command {
        let mut command = Command::new("tmux");
        command
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .env_remove("TMUX")
            .env("TERM", "xterm-256color");
        command
    }

    fn run(&self, args: &[&str]) -> String {
        let output = self.command().args(args).output().expect("run tmux");
        assert!(
            output.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// What the pane shows now.
    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "monit"])
    }

    /// A tmux format of the pane, e.g. `#{alternate_on}`.
    fn format(&self, format: &str) -> String {
        self.run(&["display-message", "-p", "-t", "monit", format])
            .trim()
            .to_owned()
    }

    fn keys(&self, keys: &str) {
        self.run(&["send-keys", "-t", "monit", keys]);
    }

    /// Waits until the pane shows `needle`; panics with the screen after `timeout`.
    fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let mut screen = String::new();
        let shown = wait_until(timeout, || {
            screen = self.screen();
            screen.contains(needle)
        });
        assert!(
            shown,
            "the pane never showed {needle:?}; it shows:\n{screen}"
        );
        screen
    }

    /// Waits for the dashboard to have ended: the alternate screen left (the shell's own
    /// screen is back, with `monit-exit=CODE` on it) and the cursor shown.
    fn wait_restored(&self, code: i32) {
        let screen = self.wait_for(&format!("monit-exit={code}"), 10 * SECOND);
        assert_eq!(self.format("#{alternate_on}"), "0", "{screen}");
        assert_eq!(self.format("#{cursor_flag}"), "1", "the cursor is hidden");
        assert!(
            !screen.contains("apps and workers"),
            "the dashboard is still on the screen:\n{screen}"
        );
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.command().arg("kill-server").output();
    }
}

/// The shell command that runs `clusterd monit` on `socket`, then says how it exited and
/// stays, so the pane shows what the terminal looked like after it.
fn monit_command(socket: &Path) -> String {
    format!(
        "'{}' monit --socket '{}'; echo monit-exit=$?; exec sleep 600",
        clusterd_bin().display(),
        socket.display()
    )
}

#[test]
fn monit_shows_the_workers_follows_a_crash_reloads_on_r_and_quits_on_q_restoring_the_terminal() {
    let mut clusterd = Clusterd::start(
        r#"
[apps.web]
command = ["sh", "-c", "echo web is up; exec sleep 1000"]
workers = 2
"#,
    );
    clusterd.wait_ready("web", 2, 10 * SECOND);
    let Some(tmux) = Tmux::start(&monit_command(&clusterd.control_socket()), 120, 40) else {
        return;
    };
    assert!(
        wait_until(10 * SECOND, || tmux.format("#{alternate_on}") == "1"),
        "monit did not switch to the alternate screen:\n{}",
        tmux.screen()
    );
    for pid in clusterd.serving_pids("web") {
        tmux.wait_for(&pid.to_string(), 10 * SECOND);
    }
    // The first line is selected: the app, whose output the logs pane follows.
    tmux.wait_for("web is up", 10 * SECOND);

    // A worker killed from outside: its replacement's pid shows up.
    let killed = json_pid(&clusterd.wait_worker("web", 0, 10 * SECOND, |w| w["state"] == "ready"));
    kill(killed, Signal::SIGKILL).expect("kill worker");
    let replacement = json_pid(&clusterd.wait_worker("web", 0, 10 * SECOND, |w| {
        !w["pid"].is_null() && json_pid(w) != killed
    }));
    let screen = tmux.wait_for(&replacement.to_string(), 10 * SECOND);
    assert!(!screen.contains(&format!(" {killed} ")), "{screen}");

    // `r` reloads the selected app: its generation rises.
    tmux.keys("r");
    assert!(
        clusterd.status_until(30 * SECOND, |status| {
            app_in(status, "web").is_some_and(|app| app["last_reload"]["generation"] == 2)
                && (0..2).all(|slot| {
                    worker_in(status, "web", slot).is_some_and(|w| w["generation"] == 2)
                })
        }),
        "no reload to generation 2 after `r`:\n{}",
        tmux.screen()
    );
    tmux.wait_for("last reload: gen 2 completed", 10 * SECOND);

    // The supervisor goes away: monit says so and stays.
    assert!(clusterd.stop().success());
    tmux.wait_for("disconnected, retrying", 10 * SECOND);
    assert_eq!(tmux.format("#{alternate_on}"), "1");

    tmux.keys("q");
    tmux.wait_restored(0);
}

#[test]
fn monit_on_a_tiny_terminal_without_a_supervisor_draws_and_signals_restore_the_terminal() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, signal) in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP]
        .into_iter()
        .enumerate()
    {
        let command = monit_command(&dir.path().join("nobody.sock"));
        let Some(tmux) = Tmux::start(&command, 40, 10) else {
            return;
        };
        tmux.wait_for("disconnected, retrying", 10 * SECOND);
        if i == 0 {
            tmux.run(&["resize-window", "-t", "monit", "-x", "20", "-y", "5"]);
            tmux.run(&["resize-window", "-t", "monit", "-x", "40", "-y", "10"]);
            tmux.wait_for("clusterd monit", 10 * SECOND);
        }
        // The shell's child is monit.
        let shell: i32 = tmux.format("#{pane_pid}").parse().expect("pane pid");
        let mut monit = None;
        assert!(wait_until(10 * SECOND, || {
            monit = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children"))
                .ok()
                .and_then(|c| c.split_whitespace().next()?.parse::<i32>().ok());
            monit.is_some()
        }));
        kill(Pid::from_raw(monit.expect("monit's pid")), signal).expect("signal monit");
        tmux.wait_restored(128 + signal as i32);
    }
}

#[test]
fn monit_refuses_a_stdout_that_is_not_a_terminal() {
    let output = Command::new(clusterd_bin())
        .args(["monit", "--socket", "/nonexistent/control.sock"])
        .output()
        .expect("run clusterd monit");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a terminal"));
}
