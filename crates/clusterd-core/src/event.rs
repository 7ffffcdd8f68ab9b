//! What goes into the core ([`Event`]) and what comes out of it ([`Action`]). The core never
//! touches the OS: the daemon turns the world into events and carries out the actions.

use std::sync::Arc;
use std::time::Duration;

use crate::process::Pid;
use clusterd_manifest::Signal;
use clusterd_manifest::{AppConfig, Manifest};
use clusterd_proto::{Reply, Request};

use super::state::WorkerId;
use crate::process::ExitStatus;
use crate::process::SupervisorSignal;

/// Where a control reply goes: a handle the driver maps to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReplyTo(pub u64);

/// Something that happened.
#[derive(Debug)]
pub enum Event {
    /// A child process was reaped. `group_empty` says whether its process group (or cgroup)
    /// has no member left.
    Exited {
        /// The reaped pid.
        pid: Pid,
        /// How it ended.
        status: ExitStatus,
        /// Nothing else of its group is alive.
        group_empty: bool,
    },
    /// What was left of an exited worker's group is gone.
    GroupEmpty(WorkerId),
    /// The driver carried out [`Action::Spawn`].
    Spawned {
        /// The worker asked for.
        worker: WorkerId,
        /// Its pid, or why it could not be started.
        result: Result<Pid, SpawnFailure>,
    },
    /// A signal to clusterd.
    Signal(SupervisorSignal),
    /// An sd_notify datagram from a worker (or one of its processes).
    Notify {
        /// The worker it came from.
        worker: WorkerId,
        /// Its `KEY=value` assignments.
        assignments: Vec<(String, String)>,
    },
    /// An intercepted worker (or one of its processes) called `listen()` on a socket clusterd
    /// handed it in place of its own `bind()`.
    Listening(WorkerId),
    /// A control request other than `status` (which is a read-only view).
    Control {
        /// The request.
        request: Request,
        /// Where replies go.
        reply: ReplyTo,
    },
    /// A re-read manifest whose new sockets are bound: apply it.
    Reconfigure(Box<Manifest>),
    /// The resident memory of workers' process groups, asked for by
    /// [`Action::MeasureMemory`].
    Memory(Vec<(WorkerId, u64)>),
    /// A message on a worker's channel (`ipc`).
    Message {
        /// The worker it came from.
        worker: WorkerId,
        /// Its JSON text.
        text: Arc<str>,
        /// It is `"ready"` or `{"type":"ready"}`.
        ready: bool,
    },
    /// Files an app watches changed (`watch`), and then nothing for `watch_delay`: a rolling
    /// reload, as `clusterd reload APP` would start.
    FilesChanged {
        /// The app.
        app: String,
        /// One of the changed paths (the first), for people.
        path: String,
        /// How many paths changed.
        count: usize,
    },
}

/// Why a spawn failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpawnFailure {
    /// What went wrong, for logs and status.
    pub message: String,
    /// Whether trying again later may work (EMFILE, EAGAIN...) rather than never (ENOENT...).
    pub transient: bool,
}

/// Something for the driver to do.
#[derive(Debug, Clone)]
pub enum Action {
    /// Fork and exec a worker; report back with [`Event::Spawned`].
    Spawn {
        /// The worker's id.
        worker: WorkerId,
        /// Its app.
        app: String,
        /// Its slot.
        slot: usize,
        /// Its generation.
        generation: u64,
        /// What to run.
        config: Arc<AppConfig>,
    },
    /// Send `signal` to a worker's process group (and everything contained with it).
    Signal {
        /// The worker.
        worker: WorkerId,
        /// Its pid (= process group id).
        pid: Pid,
        /// The signal.
        signal: Signal,
    },
    /// The worker's record is gone: release what the driver holds for it.
    Forget {
        /// The worker.
        worker: WorkerId,
    },
    /// Answer a control client.
    Reply {
        /// The client.
        to: ReplyTo,
        /// The answer.
        reply: Reply,
    },
    /// One of clusterd's events, typed: the daemon renders its text (or JSON fields).
    Event(Notice),
    /// Count something in the metrics.
    Observe(Observation),
    /// SIGHUP: re-read the manifest, bind its new sockets, and come back with
    /// [`Event::Reconfigure`] (or log why not).
    Reread,
    /// Put a worker's own listening sockets, if it has any, in (`serving`) or out of the
    /// connection steering (once ready; out at its `drain`, or right before its stop signal).
    Steer {
        /// The worker.
        worker: WorkerId,
        /// Whether it gets new connections.
        serving: bool,
    },
    /// Measure these workers' memory and come back with [`Event::Memory`].
    MeasureMemory(Vec<(WorkerId, Pid)>),
    /// Queue a message (JSON text) on a worker's channel.
    Deliver {
        /// The worker.
        worker: WorkerId,
        /// The message.
        text: Arc<str>,
    },
    /// Close a worker's channel (`stop_signal = "disconnect"`).
    Disconnect {
        /// The worker.
        worker: WorkerId,
    },
}

/// One of clusterd's events for the log: who it is about and what happened. The core says
/// what; the daemon's logs room renders it (the text, or JSON fields).
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    /// How much it matters.
    pub level: Level,
    /// The app it is about, if any.
    pub app: Option<String>,
    /// The worker's slot.
    pub slot: Option<usize>,
    /// The worker's pid.
    pub pid: Option<Pid>,
    /// The worker's (or the rollout's) generation.
    pub generation: Option<u64>,
    /// What happened, with its own fields.
    pub what: What,
}

/// The events clusterd logs, by name (`Notice::what`).
#[derive(Debug, Clone, PartialEq)]
pub enum What {
    /// A worker was spawned.
    Started {
        /// Its command line.
        command: String,
    },
    /// A worker became ready.
    Ready {
        /// Time from spawn to ready.
        after: Duration,
    },
    /// A current worker exited and its slot restarts it after a delay.
    Restarting {
        /// How it ended.
        exit: Exit,
        /// The delay before the restart.
        delay: Duration,
        /// The crash streak (0: killed from outside after serving, no crash).
        streak: u32,
        /// Whether the streak counts as flapping.
        flapping: bool,
    },
    /// A current worker exited and its slot stays down (restart policy, or shutdown).
    Exited {
        /// How it ended.
        exit: Exit,
        /// Exit status 0: a finished one-shot, else not restarted by policy.
        done: bool,
    },
    /// A retired worker (replaced, scaled away, aborted candidate) ended as asked.
    Stopped {
        /// How it ended.
        exit: Exit,
    },
    /// A rollout started (`generation` is the new one).
    RolloutStarted {
        /// Workers to roll.
        workers: usize,
    },
    /// A rollout completed: every slot runs `generation`.
    RolloutDone {
        /// Workers on the new generation.
        workers: usize,
    },
    /// A rollout aborted: its candidates stop, old workers keep serving.
    Aborted {
        /// Why.
        reason: String,
        /// Each slot's generation now.
        kept: Vec<u64>,
    },
    /// A rollout's new worker exited before it replaced the old one (the rollout aborts).
    CandidateExited {
        /// How it ended.
        exit: Exit,
        /// Whether it had been ready.
        after_ready: bool,
    },
    /// A current worker exited once too often (`restart_limit`): its slot stays down.
    Failed {
        /// How it ended.
        exit: Exit,
        /// Why the slot stays down.
        reason: String,
    },
    /// A worker could not be spawned.
    SpawnFailed {
        /// What failed.
        message: String,
        /// When the slot tries again (`None`: it stays down until a reload or restart).
        retry_in: Option<Duration>,
    },
    /// A worker's process ended but left others in its group; they are stopped.
    Leftovers,
    /// A worker missed its `ready_timeout` and is killed.
    NotReady {
        /// The timeout.
        timeout: Duration,
    },
    /// A ready worker missed its watchdog heartbeat and is killed.
    WatchdogMissed {
        /// The watchdog period.
        period: Duration,
    },
    /// A worker sent `WATCHDOG=trigger` and is killed.
    WatchdogTriggered,
    /// A worker still runs `stop_timeout` after its stop signal: SIGKILL.
    StopTimeout {
        /// The timeout.
        timeout: Duration,
    },
    /// A worker uses more memory than `max_memory` and is restarted.
    OverMemory {
        /// What it uses, in bytes.
        bytes: u64,
        /// The limit, in bytes.
        limit: u64,
    },
    /// A worker took over tending the KV cluster map.
    KvTending,
    /// The KV tend owner has not tended for `stale`: it is restarted.
    KvStale {
        /// Time since its last tend round.
        stale: Duration,
    },
    /// An app's number of workers changes.
    Scaled {
        /// Workers before.
        from: usize,
        /// Workers after.
        to: usize,
    },
    /// A reload asked for during a rollout: it follows that one.
    ReloadQueued,
    /// Watched files changed: the app is reloaded (or once more after its rollout).
    WatchReload {
        /// One of the changed paths.
        path: String,
        /// How many paths changed.
        count: usize,
    },
    /// The manifest was re-read (SIGHUP).
    Reconfigured {
        /// What changed (empty: nothing).
        changes: Vec<String>,
    },
    /// A second stop signal: every worker left is killed.
    Killing {
        /// The signal (`SIGTERM`, ...).
        why: String,
        /// Workers killed.
        workers: usize,
    },
    /// clusterd stops every worker (shutdown).
    Stopping {
        /// What asked for it (`SIGTERM`, ...).
        why: String,
        /// Workers being stopped.
        workers: usize,
    },
    /// A process that is no worker's (adopted as the child subreaper) was reaped (`pid`).
    Reaped {
        /// Its exit status.
        status: ExitStatus,
    },
    /// A worker of an app with sockets that does not intercept failed at once, before it was
    /// ready: most likely it binds the address clusterd holds itself. Once per streak.
    BindsItself {
        /// The first address of the app's sockets.
        address: String,
    },
    /// SIGTTIN/SIGTTOU with other than exactly one app in the manifest: nothing scales.
    ScaleRefused {
        /// The manifest's number of apps.
        apps: usize,
    },
    /// A rollout's candidate re-running a finished one-shot slot finished with status 0: the
    /// slot is done on the new generation.
    RerunDone {
        /// How long it ran.
        uptime: Duration,
    },
    /// The reload asked for during a rollout that aborted now starts.
    ReloadAfterAbort,
    /// A worker said `STOPPING=1` (a debug line: it may say so as often as it likes).
    SaysStopping,
    /// An intercepted worker bound an address no socket declares: clusterd bound it for the
    /// app (the worker's `bind()` and every later one of the app are answered with it).
    PortBound {
        /// The name it was given (`port-8001`).
        socket: String,
        /// The address (`[::]:8001`).
        address: String,
        /// Each worker gets a steered socket of its own on it.
        steered: bool,
    },
    /// An intercepted worker's `bind()` of an address no socket declares failed: it gets the
    /// error its own `bind()` would have.
    PortRefused {
        /// The address.
        address: String,
        /// Why (with who holds the port, when it is in use).
        reason: String,
    },
}

/// The hint of [`What::BindsItself`], also kept in the slot's last exit for status.
pub fn binds_itself_hint(address: &str) -> String {
    format!(
        "exited at once, before it was ready: if the app binds {address} itself (EADDRINUSE: \
         clusterd holds it), set intercept = true or take fd 3"
    )
}

/// How a worker ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Exit {
    /// Its exit status.
    pub status: ExitStatus,
    /// Why clusterd killed it, when it did for a failure (`watchdog`, `ready_timeout`, ...).
    pub killed: Option<&'static str>,
    /// How long it ran.
    pub uptime: Duration,
}

impl What {
    /// The event's name in JSON logs (`event`).
    pub fn name(&self) -> &'static str {
        match self {
            What::Started { .. } => "started",
            What::Ready { .. } => "ready",
            What::Restarting { .. } => "restarting",
            What::Exited { .. } => "exited",
            What::Stopped { .. } => "stopped",
            What::RolloutStarted { .. } => "rollout_started",
            What::RolloutDone { .. } => "rollout_done",
            What::Aborted { .. } => "aborted",
            What::Stopping { .. } => "stopping",
            What::CandidateExited { .. } => "candidate_exited",
            What::Failed { .. } => "failed",
            What::SpawnFailed { .. } => "spawn_failed",
            What::Leftovers => "leftovers",
            What::NotReady { .. } => "not_ready",
            What::WatchdogMissed { .. } => "watchdog_missed",
            What::WatchdogTriggered => "watchdog_triggered",
            What::StopTimeout { .. } => "stop_timeout",
            What::OverMemory { .. } => "over_memory",
            What::KvTending => "kv_tending",
            What::KvStale { .. } => "kv_stale",
            What::Scaled { .. } => "scaled",
            What::ReloadQueued => "reload_queued",
            What::WatchReload { .. } => "watch_reload",
            What::Reconfigured { .. } => "reconfigured",
            What::Killing { .. } => "killing",
            What::Reaped { .. } => "reaped",
            What::BindsItself { .. } => "binds_itself",
            What::ScaleRefused { .. } => "scale_refused",
            What::RerunDone { .. } => "rerun_done",
            What::ReloadAfterAbort => "reload_after_abort",
            What::SaysStopping => "says_stopping",
            What::PortBound { .. } => "port_bound",
            What::PortRefused { .. } => "port_refused",
        }
    }
}

/// How much a log line matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Something failed.
    Error,
    /// Something is wrong, or about to be.
    Warn,
    /// What happened.
    Info,
    /// Details.
    Debug,
}

/// A fact for the metrics.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// A worker of `app` became ready `seconds` after its spawn.
    Ready {
        /// The app.
        app: String,
        /// Time from spawn to ready.
        seconds: f64,
    },
    /// A worker of `app` was replaced after an unexpected exit.
    Restart {
        /// The app.
        app: String,
    },
    /// A worker of `app` sent a message on its channel.
    Message {
        /// The app.
        app: String,
    },
    /// A rollout of `app` ended.
    Reload {
        /// The app.
        app: String,
        /// Completed (true) or aborted.
        completed: bool,
    },
}
