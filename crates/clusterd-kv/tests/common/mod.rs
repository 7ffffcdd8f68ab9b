//! Helpers for the crate's process-level tests: `Agent` drives one `clusterd-kv agent`
//! process (one real client) over its stdin/stdout, and `wait_until` polls a condition with
//! a deadline.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

/// How long any single agent reply may take.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(20);
/// Segment prefix used by the tests.
pub const PREFIX: &str = "kvtest";

/// One `clusterd-kv agent` process; killed (by pid) when dropped.
pub struct Agent {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// The agent's pid.
    pub pid: u32,
}

impl Agent {
    /// Starts an agent on `seeds` with its segment in `dir` and waits until it is connected.
    pub fn spawn(seeds: &str, dir: &Path, extra: &[&str]) -> Agent {
        Self::spawn_with_env(seeds, dir, extra, &[])
    }

    /// Like [`Agent::spawn`], with extra environment variables.
    pub fn spawn_with_env(
        seeds: &str,
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Agent {
        let mut child = Command::new(env!("CARGO_BIN_EXE_clusterd-kv"))
            .envs(env.iter().copied())
            .arg("agent")
            .args(["--seeds", seeds, "--prefix", PREFIX])
            .arg("--dir")
            .arg(dir)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn clusterd-kv agent");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let pid = child.id();
        let mut agent = Agent {
            stdin: child.stdin.take(),
            child,
            lines,
            pid,
        };
        let ready = agent.read_line();
        assert!(ready.starts_with("ready "), "agent {pid} said {ready:?}");
        agent
    }

    fn read_line(&mut self) -> String {
        match self.lines.recv_timeout(REPLY_TIMEOUT) {
            Ok(line) => line,
            Err(e) => {
                let status = self.child.try_wait();
                panic!(
                    "agent {} gave no answer ({e}); exit status {status:?}",
                    self.pid
                )
            }
        }
    }

    /// Sends one command line and returns the answer line.
    pub fn cmd(&mut self, line: &str) -> String {
        let stdin = self.stdin.as_mut().expect("agent stdin open");
        writeln!(stdin, "{line}").expect("write to agent");
        stdin.flush().expect("flush agent stdin");
        self.read_line()
    }

    /// The agent's counters, by name.
    pub fn stats(&mut self) -> HashMap<String, String> {
        let line = self.cmd("stats");
        let rest = line
            .strip_prefix("stats ")
            .unwrap_or_else(|| panic!("bad stats {line:?}"));
        rest.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// One numeric counter.
    pub fn stat(&mut self, name: &str) -> u64 {
        let stats = self.stats();
        stats[name]
            .parse()
            .unwrap_or_else(|_| panic!("{name} not numeric: {stats:?}"))
    }

    /// The agent's role: owner, follower, local or closed.
    pub fn role(&mut self) -> String {
        self.stats()["role"].clone()
    }

    /// Sends `signal` to the agent.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), signal)
            .expect("signal agent");
    }

    /// SIGKILLs the agent and reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `exit` and waits (bounded) for a clean exit.
    pub fn exit(&mut self) {
        let stdin = self.stdin.as_mut().expect("agent stdin open");
        writeln!(stdin, "exit").expect("write to agent");
        drop(self.stdin.take());
        let child = &mut self.child;
        wait_until("agent exits", Duration::from_secs(10), || {
            child.try_wait().expect("try_wait").is_some()
        });
        assert!(
            self.child.wait().unwrap().success(),
            "agent {} failed",
            self.pid
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `cond` until it holds; panics after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Index of the one owner among `agents`, asserting there is exactly one.
pub fn the_owner(agents: &mut [Agent]) -> usize {
    let roles: Vec<String> = agents.iter_mut().map(Agent::role).collect();
    let owners: Vec<usize> = (0..roles.len()).filter(|&i| roles[i] == "owner").collect();
    assert_eq!(owners.len(), 1, "roles: {roles:?}");
    owners[0]
}
