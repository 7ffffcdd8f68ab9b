//! The supervisor's data: apps, their slots, and the worker processes. A slot is a stable
//! position (0..N-1) that a worker occupies across restarts; a worker is one process (and its
//! process group) with a generation. Every deadline lives in the state that owns it, so
//! [`super::Core::next_deadline`] reads exactly what [`super::Core::tick`] fires.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::process::Pid;
use clusterd_manifest::AppConfig;
use serde::{Deserialize, Serialize};

use super::rollout::Rollout;

/// clusterd's own name for a worker, never reused (pids are).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WorkerId(pub u64);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "w{}", self.0)
    }
}

/// One `[apps.NAME]` at run time.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct App {
    /// The newest generation: the one a respawn of a new slot runs, and the one the next
    /// rollout follows.
    pub generation: u64,
    /// The configuration of each generation still running somewhere (a slot, a worker or a
    /// rollout), so that a slot keeps the version it runs when it is respawned and an aborted
    /// rollout puts a slot back on the version it had.
    pub configs: BTreeMap<u64, Arc<AppConfig>>,
    /// The slots, indexed by worker id (`CLUSTERD_WORKER_ID`).
    pub slots: Vec<Slot>,
    /// The rolling reload in progress, if any.
    pub rollout: Option<Rollout>,
    /// How the last rollout ended.
    pub last_reload: Option<ReloadOutcome>,
    /// A re-read manifest's new command, environment, directory or sockets: the next
    /// rollout's configuration.
    pub next_config: Option<Arc<AppConfig>>,
    /// The worker that says it tends the app's KV cluster map (`X_CLUSTERD_KV_TEND=owner`).
    pub tend: Option<Tend>,
}

impl App {
    /// A new app in generation 1 whose slots are all due to start at `now`.
    pub fn new(config: AppConfig, now: Instant) -> Self {
        let slots = (0..config.workers).map(|_| Slot::new(1, now)).collect();
        App {
            generation: 1,
            configs: BTreeMap::from([(1, Arc::new(config))]),
            slots,
            rollout: None,
            last_reload: None,
            next_config: None,
            tend: None,
        }
    }

    /// The newest configuration.
    pub fn latest(&self) -> &Arc<AppConfig> {
        self.config(self.generation)
    }

    /// The configuration of `generation` (the closest older one if it was pruned).
    pub fn config(&self, generation: u64) -> &Arc<AppConfig> {
        self.configs
            .range(..=generation)
            .next_back()
            .or_else(|| self.configs.iter().next())
            .map(|(_, config)| config)
            .expect("an app always keeps its newest configuration")
    }
}

/// The worker tending an app's KV cluster map, and when it last said so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tend {
    /// The owner.
    pub worker: WorkerId,
    /// Its last `X_CLUSTERD_KV_TEND=owner` (sent every tend round).
    #[serde(with = "crate::time::instant")]
    pub seen: Instant,
}

/// How a rolling reload ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slot {
    /// Who or what holds the slot.
    pub state: SlotState,
    /// The generation the slot runs (and respawns with).
    pub generation: u64,
    /// Unexpected exits replaced so far.
    pub restarts: u32,
    /// Crashes in a row (see [`super::backoff`]).
    pub crash_streak: u32,
    /// How the last worker of this slot ended, for status.
    pub last_exit: Option<String>,
    /// Why its worker was last replaced: crash, killed, memory, watchdog, reload, operator...
    pub last_restart: Option<String>,
    /// When its recent unexpected exits were replaced (for `restart_limit`).
    #[serde(with = "crate::time::instants")]
    pub recent_restarts: VecDeque<Instant>,
}

impl Slot {
    /// An empty slot, due to start a worker of `generation` at `at`.
    pub fn new(generation: u64, at: Instant) -> Self {
        Slot {
            state: SlotState::Backoff { until: at },
            generation,
            restarts: 0,
            crash_streak: 0,
            last_exit: None,
            last_restart: None,
            recent_restarts: VecDeque::new(),
        }
    }

    /// The slot's serving worker, if it has one.
    pub fn worker(&self) -> Option<WorkerId> {
        match self.state {
            SlotState::Occupied(id) => Some(id),
            _ => None,
        }
    }
}

/// What holds a slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum SlotState {
    /// A worker serves it (or is starting up in it).
    Occupied(WorkerId),
    /// Empty, and due to start a worker at `until` (now, for a first crash or a new slot).
    Backoff {
        /// When the replacement starts.
        #[serde(with = "crate::time::instant")]
        until: Instant,
    },
    /// Empty until a reload or restart: its worker cannot be started.
    Failed {
        /// Why, e.g. `cannot find program "srv" in PATH`.
        reason: String,
    },
    /// Empty for good, by intent: its worker ended and the restart policy does not start it
    /// again (`restart = "never"`, or `"on-failure"` after exit 0): a finished one-shot task.
    /// Readiness does not count it as missing; a restart of the slot or a reload runs it again.
    Done {
        /// The exit code its worker ended with (`None`: killed by a signal).
        code: Option<i32>,
    },
    /// Empty: clusterd is stopping.
    Stopped,
}

/// What a worker is doing. Each phase carries its own deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum Phase {
    /// Asked for; the driver has not reported its pid yet.
    Spawning,
    /// Running, not ready yet.
    Starting {
        /// Killed (and replaced, or its rollout aborted) if still starting then.
        #[serde(with = "crate::time::instant")]
        ready_by: Instant,
        /// With `ready = "delay"`: ready at this moment if still alive.
        #[serde(with = "crate::time::opt_instant")]
        ready_at: Option<Instant>,
    },
    /// Ready to serve.
    Ready {
        /// When it became ready.
        #[serde(with = "crate::time::instant")]
        since: Instant,
        /// With a watchdog: killed if no `WATCHDOG=1` arrives by then.
        #[serde(with = "crate::time::opt_instant")]
        watchdog_by: Option<Instant>,
    },
    /// Being retired without new connections (`drain`) or with its channel closed
    /// (`stop_signal = "disconnect"`): it finishes what it has, then gets its stop signal at
    /// `until`.
    Draining {
        /// Why it is stopping.
        why: StopReason,
        /// When its stop signal is due.
        #[serde(with = "crate::time::instant")]
        until: Instant,
    },
    /// Told to stop (or its process exited while others of its group live on).
    Stopping {
        /// Why it is stopping.
        why: StopReason,
        /// When its group gets SIGKILL; `None` once it has.
        #[serde(with = "crate::time::opt_instant")]
        kill_at: Option<Instant>,
        /// Whether the worker's own process has been reaped (its group may linger).
        exited: bool,
    },
}

/// Why a worker was told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum StopReason {
    /// Replaced by a rollout, restarted, scaled away or its app removed.
    Retired,
    /// clusterd is shutting down.
    Shutdown,
    /// It missed its watchdog deadline.
    Watchdog,
    /// It asked for it (`WATCHDOG=trigger`).
    Triggered,
    /// It was not ready within `ready_timeout`.
    NotReady,
    /// Its process exited; what is left of its group is being stopped.
    Leftovers,
    /// A rollout aborted and it was its new worker.
    Aborted,
    /// It holds the KV tend lock but stopped tending (`kv_watchdog`).
    TendHung,
    /// It used more memory than `max_memory`.
    Memory,
}

impl StopReason {
    /// True when clusterd killed the worker because something was wrong with it, so that
    /// its end counts as a crash of its slot.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            StopReason::Watchdog | StopReason::Triggered | StopReason::NotReady
        )
    }
}

/// One worker process, and its process group (whose id is its pid).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Worker {
    /// Its pid, once spawned.
    #[serde(with = "crate::process::opt_pid")]
    pub pid: Option<Pid>,
    /// Its app's name.
    pub app: String,
    /// Its slot.
    pub slot: usize,
    /// Its generation.
    pub generation: u64,
    /// The configuration it was started with.
    pub config: Arc<AppConfig>,
    /// When it was spawned.
    #[serde(with = "crate::time::instant")]
    pub started: Instant,
    /// What it is doing.
    pub phase: Phase,
    /// The last `STATUS=` text it sent.
    pub status_text: Option<String>,
    /// What it said on its channel (`ipc`).
    pub inbox: Inbox,
    /// It called `listen()` on a socket handed to it (intercepted apps).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub listened: bool,
}

/// How many of a worker's last messages status shows, and how much of each.
pub const RECENT_MESSAGES: usize = 5;
/// The longest part of a message kept for status, in bytes.
pub const RECENT_MESSAGE_BYTES: usize = 256;

/// A worker's messages, for status: how many, and the last few (each cut to
/// [`RECENT_MESSAGE_BYTES`]).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inbox {
    /// Messages received.
    pub received: u64,
    /// The last [`RECENT_MESSAGES`], oldest first.
    pub recent: VecDeque<String>,
}

impl Inbox {
    /// Counts `text` and keeps (the start of) it.
    pub fn record(&mut self, text: &str) {
        self.received += 1;
        let mut end = text.len().min(RECENT_MESSAGE_BYTES);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        if self.recent.len() == RECENT_MESSAGES {
            self.recent.pop_front();
        }
        self.recent.push_back(text[..end].to_owned());
    }
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

    /// True while its own process runs (spawned, not reaped).
    pub fn is_running(&self) -> bool {
        !matches!(
            self.phase,
            Phase::Spawning | Phase::Stopping { exited: true, .. }
        )
    }

    /// The `pid N` part of log lines.
    pub fn pid_text(&self) -> String {
        match self.pid {
            Some(pid) => format!("pid {pid}"),
            None => "(not started)".into(),
        }
    }
}

/// A duration for logs: `850ms`, `2.3s`, `4m10s`.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}
