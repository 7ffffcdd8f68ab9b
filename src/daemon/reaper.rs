//! The one owner of `waitpid` in its process. On every SIGCHLD it collects all exited
//! children — workers, the upgrade's `handover-check` and the grandchildren adopted by a child
//! subreaper alike — with `waitpid(-1, WNOHANG)`. Nothing else in clusterd reaps (no
//! `tokio::process`, no `Child::wait`), and whoever runs `driver::run` (which owns the reaper)
//! must have no other children: they would be reaped here as strangers. `clusterd` forks
//! nothing else in a supervising process; the in-process test is a binary of its own.

use std::io;

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use tokio::signal::unix::{SignalKind, signal};

use clusterd_core::{ExitStatus, Pid};

use crate::daemon::os::{core_pid, core_signal};

/// One reaped process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Its pid.
    pub pid: Pid,
    /// How it ended.
    pub status: ExitStatus,
}

/// Turns SIGCHLD into batches of [`Exit`]s.
pub struct Reaper {
    sigchld: tokio::signal::unix::Signal,
}

impl Reaper {
    /// Installs the SIGCHLD listener. Call this before spawning anything.
    pub fn new() -> io::Result<Self> {
        Ok(Reaper {
            sigchld: signal(SignalKind::child())?,
        })
    }

    /// Waits for the next SIGCHLD and returns everything that has exited since the last call
    /// (possibly nothing: signals coalesce, and an earlier call may have reaped already).
    /// Nothing is lost: the listener is installed before the first fork, a SIGCHLD arriving
    /// while we reap makes the next call return at once, and the kernel also sends SIGCHLD
    /// when a dead grandchild is re-parented to this subreaper.
    pub async fn next(&mut self) -> Vec<Exit> {
        self.sigchld.recv().await;
        reap_all()
    }
}

/// Reaps every child that has exited, without blocking.
pub fn reap_all() -> Vec<Exit> {
    let mut exits = Vec::new();
    loop {
        match waitpid(nix::unistd::Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => exits.push(Exit {
                pid: core_pid(pid),
                status: ExitStatus::Code(code),
            }),
            Ok(WaitStatus::Signaled(pid, sig, _core)) => exits.push(Exit {
                pid: core_pid(pid),
                // Every signal nix knows on Linux is one the core names; the shell's
                // convention otherwise.
                status: core_signal(sig)
                    .map_or(ExitStatus::Code(128 + sig as i32), ExitStatus::Signal),
            }),
            Ok(WaitStatus::StillAlive) => break,
            Ok(_) => {} // stopped/continued: not reported without WUNTRACED/WCONTINUED
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break, // ECHILD: no children at all
        }
    }
    exits
}
