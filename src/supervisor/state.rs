//! The supervisor's data: apps, their slots, and the worker processes. A slot is a stable
//! position (0..N-1) that a worker occupies across restarts; a worker is one process (and its
//! process group) with a generation.

use std::time::Duration;

use clusterd_manifest::AppConfig;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::time::Instant;

use crate::reaper::ExitStatus;

/// One `[apps.NAME]` at run time.
#[derive(Debug)]
pub struct App {
    /// Its configuration (replaced by a manifest re-read).
    pub config: AppConfig,
    /// The generation the next rollout will start (bumped at each rollout).
    pub generation: u64,
    /// The slots, indexed by worker id.
    pub slots: Vec<Slot>,
    /// The rolling reload in progress, if any.
    pub rollout: Option<super::rollout::Rollout>,
    /// How the last rollout ended.
    pub last_reload: Option<ReloadOutcome>,
}

impl App {
    /// A new app whose slots are all due to start now, in generation 1.
    pub fn new(config: AppConfig, now: Instant) -> Self {
        let slots = (0..config.workers).map(|_| Slot::new(1, now)).collect();
        App {
            config,
            generation: 1,
            slots,
            rollout: None,
            last_reload: None,
        }
    }
}

/// How a rolling reload ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// Every slot runs the new generation.
    Completed {
        /// The generation rolled out.
        generation: u64,
    },
    /// Stopped part-way; the reason names the slot and what happened.
    Aborted {
        /// The generation that was being rolled out.
        generation: u64,
        /// What went wrong, e.g. `slot 2 generation 5 exited with status 1 before ready`.
        reason: String,
    },
}

impl ReloadOutcome {
    /// The generation the rollout was for.
    pub fn generation(&self) -> u64 {
        match self {
            ReloadOutcome::Completed { generation } | ReloadOutcome::Aborted { generation, .. } => {
                *generation
            }
        }
    }
}

/// A worker position that survives restarts.
#[derive(Debug)]
pub struct Slot {
    /// The worker serving in this slot.
    pub current: Option<Pid>,
    /// The next generation's worker, started by a rollout and not yet promoted.
    pub candidate: Option<Pid>,
    /// The generation of the slot's current worker (and of its replacements after a crash).
    pub generation: u64,
    /// Unexpected exits replaced so far.
    pub restarts: u32,
    /// Unexpected exits in a row without a stable uptime in between.
    pub crash_streak: u32,
    /// When the slot is due to (re)start a worker, if it is waiting to.
    pub respawn_at: Option<Instant>,
    /// How the last worker of this slot ended, for status.
    pub last_exit: Option<String>,
    /// Why the slot gave up (its command cannot be executed); cleared by a reload or restart.
    pub failed: Option<String>,
}

impl Slot {
    /// An empty slot, due to start a worker of `generation` at `at`.
    pub fn new(generation: u64, at: Instant) -> Self {
        Slot {
            current: None,
            candidate: None,
            generation,
            restarts: 0,
            crash_streak: 0,
            respawn_at: Some(at),
            last_exit: None,
            failed: None,
        }
    }
}

/// What a worker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Spawned, not ready yet; killed if still here at `ready_deadline`.
    Starting,
    /// Ready to serve, since `since`.
    Ready {
        /// When it became ready.
        since: Instant,
    },
    /// Told to stop; its group gets SIGKILL at `deadline`.
    Stopping {
        /// When SIGKILL is due (or was sent).
        deadline: Instant,
        /// Whether SIGKILL was sent.
        killed: bool,
    },
}

/// One worker process, and its process group (whose id is its pid).
#[derive(Debug)]
pub struct Worker {
    /// Its app's name.
    pub app: String,
    /// Its slot.
    pub slot: usize,
    /// Its generation.
    pub generation: u64,
    /// When it was spawned.
    pub started: Instant,
    /// What it is doing.
    pub phase: Phase,
    /// A worker not ready by then is killed.
    pub ready_deadline: Instant,
    /// Last `WATCHDOG=1` (or its start).
    pub last_heartbeat: Instant,
    /// The last `STATUS=` text it sent.
    pub status_text: Option<String>,
    /// The signal that asks it to stop.
    pub stop_signal: Signal,
    /// How long it may take to stop.
    pub stop_timeout: Duration,
    /// Set once the process itself has been reaped; the record stays while other members of
    /// its process group are still alive.
    pub exited: Option<ExitStatus>,
}

impl Worker {
    /// Display name, e.g. `web[2]`.
    pub fn label(&self) -> String {
        format!("{}[{}]", self.app, self.slot)
    }

    /// True once it is ready (and not stopping).
    pub fn is_ready(&self) -> bool {
        matches!(self.phase, Phase::Ready { .. })
    }
}
