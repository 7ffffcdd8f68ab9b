//! The status snapshot: what `clusterd status` shows and `clusterd status --json` prints.
//! Field names are part of the stable JSON interface; fields are only ever added.

use serde::{Deserialize, Serialize};

/// The whole supervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The supervisor's pid.
    pub pid: u32,
    /// The manifest it runs.
    pub manifest: String,
    /// Milliseconds since it started.
    pub uptime_ms: u64,
    /// Its own resident memory, in bytes.
    pub rss_bytes: u64,
    /// Whether it is shutting down.
    pub stopping: bool,
    /// The listening sockets.
    pub sockets: Vec<SocketStatus>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (`[supervisor] metrics`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
    /// The apps, by name.
    pub apps: Vec<AppStatus>,
    /// What holds each worker and everything it starts: `cgroup v2 (...)` or
    /// `process groups (why not cgroups)`.
    #[serde(default)]
    pub containment: String,
    /// Lines of output (workers' and clusterd's own) dropped because clusterd's stdout or
    /// stderr was not read fast enough.
    #[serde(default)]
    pub output_dropped: u64,
    /// Whether every app has its desired number of ready workers, no rollout is aborting and
    /// the supervisor is not stopping (what `/readyz` and `clusterd status --check` answer).
    #[serde(default)]
    pub ready: bool,
    /// Why not ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ready: Option<String>,
    /// The supervisor's clusterd version.
    #[serde(default)]
    pub version: String,
    /// How many times it was upgraded in place (`clusterd upgrade`).
    #[serde(default)]
    pub upgrades: u32,
    /// Milliseconds since the last upgrade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgraded_ms: Option<u64>,
}

/// One listening socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SocketStatus {
    /// Its name in the manifest.
    pub name: String,
    /// The address it is bound to (`127.0.0.1:8000`, `unix:/path`).
    pub address: String,
    /// The app it was bound for on demand (an intercepted worker's `bind()` of an address no
    /// `[sockets.*]` declares; named `port-PORT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// How new connections reach the workers, as the host does it now: `shared` (one accept
    /// queue), or a steered socket per worker picked `round-robin`, `random` (also where round
    /// robin fell back) or by `ip-hash` (absent from a clusterd older than this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<String>,
    /// Inherited from clusterd's own manager (socket activation), not bound by clusterd.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inherited: bool,
}

/// One app.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppStatus {
    /// Its name.
    pub name: String,
    /// Workers wanted (slots).
    pub desired: usize,
    /// Slots with a live worker.
    pub running: usize,
    /// Slots whose worker is ready.
    pub ready: usize,
    /// Slots down by their restart policy (finished one-shot tasks: `restart = "never"`, or
    /// `"on-failure"` after exit 0). Readiness wants `desired - done` ready workers.
    #[serde(default)]
    pub done: usize,
    /// The rollout in progress.
    pub reloading: Option<RolloutStatus>,
    /// How the last rollout ended.
    pub last_reload: Option<AppReload>,
    /// The pid of the worker that says it holds the KV tend lock (`X_CLUSTERD_KV_TEND=owner`).
    pub tend_owner: Option<u32>,
    /// Milliseconds since the tend owner last said it tends (it does every round): a large
    /// value means a hung owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tend_heard_ms: Option<u64>,
    /// Every worker process (serving, starting, stopping) and every empty slot.
    pub workers: Vec<WorkerStatus>,
}

/// A rollout in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutStatus {
    /// The generation being rolled out.
    pub generation: u64,
    /// Slots promoted so far.
    pub done: usize,
    /// Slots in all.
    pub total: usize,
}

/// How one app's rollout ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppReload {
    /// The app.
    pub app: String,
    /// `completed` or `aborted`.
    pub outcome: ReloadResult,
    /// The generation rolled out (or attempted).
    pub generation: u64,
    /// Why it aborted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The outcome of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReloadResult {
    /// Every slot runs the new generation.
    Completed,
    /// Stopped part-way; old workers kept serving.
    Aborted,
}

/// The state of a worker or slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkerState {
    /// Spawned, not ready yet.
    Starting,
    /// Serving.
    Ready,
    /// Told to stop, or its process group is draining.
    Stopping,
    /// No worker: waiting for the crash backoff to pass.
    Backoff,
    /// No worker: the command cannot be executed; waits for a reload or restart.
    Failed,
    /// No worker: it exited and the restart policy does not restart it (`done`), or clusterd
    /// is stopping.
    Exited,
}

/// What a worker is to its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkerRole {
    /// The slot's serving worker.
    Serving,
    /// A rollout's new worker, not yet promoted.
    Candidate,
    /// Replaced or removed, on its way out.
    Retiring,
}

/// One worker process, or an empty slot (no `pid`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Its slot (`CLUSTERD_WORKER_ID`).
    pub slot: usize,
    /// Its pid; `None` for an empty slot.
    pub pid: Option<u32>,
    /// Its state.
    pub state: WorkerState,
    /// What it is to the slot.
    pub role: WorkerRole,
    /// Its generation.
    pub generation: u64,
    /// Milliseconds since it was spawned.
    pub uptime_ms: Option<u64>,
    /// Milliseconds from spawn to ready.
    pub ready_ms: Option<u64>,
    /// Unexpected exits of this slot replaced so far.
    pub restarts: u32,
    /// Crashes in a row; 3 or more is flapping.
    pub crash_streak: u32,
    /// How the slot's previous worker ended, e.g. `signal SIGKILL after 12.5s`.
    pub last_exit: Option<String>,
    /// An empty slot down by its restart policy (state `exited`): a finished one-shot task,
    /// not missing for readiness.
    #[serde(default)]
    pub done: bool,
    /// With `done`: the exit code its worker ended with (absent: killed by a signal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// CPU use of its process group since the previous status (or since it started), percent
    /// of one core.
    pub cpu_percent: Option<f64>,
    /// Total CPU seconds of its process group.
    pub cpu_seconds: Option<f64>,
    /// Resident memory of its process group, bytes.
    pub rss_bytes: Option<u64>,
    /// The last `STATUS=` text it sent.
    pub status_text: Option<String>,
    /// Why the slot's worker was last replaced: `crash (status 1)`, `killed from outside
    /// (signal SIGKILL)`, `memory: ...`, `reload (generation 3)`, `operator (clusterd
    /// restart)`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_reason: Option<String>,
    /// Whether it holds its app's KV tend lock.
    pub tend_owner: bool,
    /// Messages it sent on its channel (`ipc`).
    #[serde(default)]
    pub messages_received: u64,
    /// Messages for it that were dropped because it did not read its channel.
    #[serde(default)]
    pub messages_dropped: u64,
    /// Its last few messages (JSON text, each cut to 256 bytes), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub last_messages: Vec<String>,
}
