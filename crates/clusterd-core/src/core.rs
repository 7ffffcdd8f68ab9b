//! The supervisor's decisions, as a pure state machine: [`Core::on`] takes an [`Event`] and
//! returns the [`Action`]s it calls for; [`Core::tick`] fires what has come due;
//! [`Core::next_deadline`] says when that is. Nothing here forks, signals, reads `/proc` or
//! the clock: the time is an argument, and the driver carries out the actions. That is what
//! lets `tests.rs` drive every transition without a process.
//!
//! Worker lifecycle (see [`Phase`]): `Spawning` → `Starting` → `Ready` → `Stopping` → gone.
//! A worker is gone when its process has been reaped **and** its process group is empty.
//! What a worker's exit means is decided by what it is to its slot when it exits
//! ([`Role`]): the serving worker's exit is unexpected (restart policy, backoff), a rollout
//! candidate's aborts the rollout, a retired worker's is expected.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::event::Level;
use crate::process::Pid;
use clusterd_manifest::Signal;
use clusterd_manifest::{AppConfig, Manifest, Readiness, RestartPolicy};
use serde::{Deserialize, Serialize};

use super::backoff::{self, End};
use super::commands::Waiter;
use super::event::{
    Action, Event, Exit, Notice, Observation, SpawnFailure, What, binds_itself_hint,
};
use super::state::{App, Phase, SlotState, StopReason, Tend, Worker, WorkerId, human};
use crate::process::ExitStatus;
use crate::process::SupervisorSignal;

/// The longest extension of a deadline a worker may ask for with `EXTEND_TIMEOUT_USEC`.
const MAX_EXTEND: Duration = Duration::from_secs(24 * 3600);

/// The notify assignment with which a KV client says it holds (`owner`, repeated as a
/// heartbeat) or gave up (`released`) its app's tend lock (see the clusterd-kv crate).
pub const KV_TEND_KEY: &str = "X_CLUSTERD_KV_TEND";

/// How often workers' memory is sampled while any app sets `max_memory`.
pub const MEMORY_INTERVAL: Duration = Duration::from_secs(2);

/// The shortest wait before retrying a spawn that failed for a transient reason (EMFILE...),
/// whatever the backoff settings, so that a failing spawn can never spin.
const MIN_SPAWN_RETRY: Duration = Duration::from_millis(100);

/// What a worker is to its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The slot's serving (or starting) worker: its exit is unexpected.
    Current,
    /// A rollout's new worker, not yet promoted.
    Candidate,
    /// Replaced, removed or told to stop.
    Retired,
}

/// All the supervisor's state. It crosses `clusterd upgrade` as a [`Snapshot`] (see
/// `handover`), except what belongs to this process's connections: `reload --wait` clients.
#[derive(Debug, Default)]
pub struct Core {
    /// The apps, by name.
    pub(super) apps: BTreeMap<String, App>,
    /// The addresses of the manifest's sockets, by name, for messages.
    pub(super) socket_addresses: BTreeMap<String, String>,
    /// Every worker whose record is alive (its process, or what is left of its group).
    pub(super) workers: BTreeMap<WorkerId, Worker>,
    /// Running workers by pid.
    pids: HashMap<Pid, WorkerId>,
    next_id: u64,
    /// Set once shutdown has begun.
    pub(super) shutting_down: bool,
    /// `reload --wait` clients.
    pub(super) waiters: Vec<Waiter>,
    /// When workers' memory is sampled next (only while an app sets `max_memory`).
    memory_check: Option<Instant>,
    /// Actions decided so far, returned by `on`/`tick`.
    out: Vec<Action>,
}

/// How [`Core`] is written: the derive of its fields, private, so that the only way to write
/// or read a core is with an anchor ([`Core::snapshot`], [`Snapshot::restore`]).
#[derive(Serialize, Deserialize)]
#[serde(remote = "Core", deny_unknown_fields)]
struct Stored {
    apps: BTreeMap<String, App>,
    socket_addresses: BTreeMap<String, String>,
    workers: BTreeMap<WorkerId, Worker>,
    #[serde(with = "crate::process::pid_map")]
    pids: HashMap<Pid, WorkerId>,
    next_id: u64,
    shutting_down: bool,
    #[serde(skip)]
    waiters: Vec<Waiter>,
    #[serde(with = "crate::time::opt_instant")]
    memory_check: Option<Instant>,
    #[serde(skip)]
    out: Vec<Action>,
}

/// A core as it crosses `clusterd upgrade`: its JSON, every instant written as signed
/// nanoseconds from the `now` it was taken at ([`Core::snapshot`]). [`Snapshot::restore`]
/// reads it back against the reader's anchor (the same moment on its clock), so every
/// deadline keeps its distance. It (de)serializes as that JSON, unchanged.
#[derive(Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Snapshot(Box<serde_json::value::RawValue>);

impl Snapshot {
    /// The core written in this snapshot, its instants read relative to `anchor`.
    pub fn restore(&self, anchor: Instant) -> Result<Core, serde_json::Error> {
        crate::time::at(anchor, || {
            let mut json = serde_json::Deserializer::from_str(self.0.get());
            let core = Stored::deserialize(&mut json)?;
            json.end()?;
            Ok(core)
        })
    }
}

/// `name → address` of every socket of `manifest` (`127.0.0.1:8001`, `unix:/path`).
pub(super) fn socket_addresses(manifest: &Manifest) -> BTreeMap<String, String> {
    manifest
        .sockets
        .iter()
        .map(|(name, socket)| {
            let address = match &socket.listen {
                clusterd_manifest::Listen::Tcp(addr) => addr.to_string(),
                clusterd_manifest::Listen::Unix(path) => format!("unix:{}", path.display()),
            };
            (name.clone(), address)
        })
        .collect()
}

/// How soon after its start a failed, never-ready worker counts as "could not bind".
const EARLY_EXIT: Duration = Duration::from_secs(1);

/// Whether a worker of this app may have steered sockets of its own: declared ones, or (an
/// intercepted app) ports bound on demand. Only the daemon knows which it has; a `Steer` for a
/// worker with none does nothing.
fn may_be_steered(config: &AppConfig) -> bool {
    !config.sockets.is_empty() || config.intercept
}

/// Say what is wrong, by a documented heuristic: a worker of an app that has sockets but does
/// not intercept, which fails within [`EARLY_EXIT`] of its start and before it was ready, most
/// often tried to bind the address clusterd already holds (EADDRINUSE): unmodified servers
/// bind their own port. Returns that address (the app's first socket's).
fn binds_itself(
    config: &AppConfig,
    end: &End,
    socket_addresses: &BTreeMap<String, String>,
) -> Option<String> {
    if config.intercept || end.was_ready || end.status.success() || end.uptime >= EARLY_EXIT {
        return None;
    }
    config
        .sockets
        .iter()
        .find_map(|name| socket_addresses.get(name).cloned())
}

impl Core {
    /// The core as it is, for `clusterd upgrade`: its instants written relative to `now`.
    pub fn snapshot(&self, now: Instant) -> Result<Snapshot, serde_json::Error> {
        struct View<'a>(&'a Core);
        impl Serialize for View<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                Stored::serialize(self.0, s)
            }
        }
        crate::time::at(now, || serde_json::value::to_raw_value(&View(self))).map(Snapshot)
    }

    /// A core for `manifest` whose slots are all due to start at `now`.
    pub fn new(manifest: &Manifest, now: Instant) -> Self {
        let mut core = Core {
            apps: manifest
                .apps
                .iter()
                .map(|(name, config)| (name.clone(), App::new(config.clone(), now)))
                .collect(),
            socket_addresses: socket_addresses(manifest),
            ..Core::default()
        };
        core.schedule_memory_check(now);
        core
    }

    /// Applies `event` and everything that follows from it at `now`.
    pub fn on(&mut self, now: Instant, event: Event) -> Vec<Action> {
        match event {
            Event::Exited {
                pid,
                status,
                group_empty,
            } => self.on_exited(now, pid, status, group_empty),
            Event::GroupEmpty(id) => self.forget(id),
            Event::Spawned { worker, result } => self.on_spawned(now, worker, result),
            Event::Signal(signal) => self.on_signal(now, signal),
            Event::Notify {
                worker,
                assignments,
            } => self.on_notify(now, worker, &assignments),
            Event::Listening(worker) => self.on_listening(now, worker),
            Event::Control { request, reply } => self.on_control(now, request, reply),
            Event::Reconfigure(manifest) => self.reconfigure(now, &manifest),
            Event::Memory(measured) => self.on_memory(now, &measured),
            Event::Message {
                worker,
                text,
                ready,
            } => self.on_message(now, worker, text, ready),
            Event::FilesChanged { app, path, count } => {
                self.on_files_changed(now, &app, path, count)
            }
        }
        self.tick(now)
    }

    /// Fires everything due at `now`: readiness and stop deadlines, respawns, rollout steps,
    /// and answers `reload --wait` clients whose rollouts ended.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        self.fire_worker_deadlines(now);
        self.check_tend(now);
        self.check_memory(now);
        self.respawn_due(now);
        let names: Vec<String> = self.apps.keys().cloned().collect();
        for name in names {
            self.advance_rollout(&name, now);
        }
        self.settle_waiters();
        debug_assert!(
            self.next_deadline().is_none_or(|d| d > now),
            "a deadline at or before now survived a tick"
        );
        std::mem::take(&mut self.out)
    }

    /// The earliest moment at which [`Self::tick`] has something to do: the minimum of the
    /// deadlines held by the workers' phases, the slots' backoffs and the rollouts' bakes.
    pub fn next_deadline(&self) -> Option<Instant> {
        let workers = self.workers.values().flat_map(|w| match w.phase {
            Phase::Starting { ready_by, ready_at } => [Some(ready_by), ready_at],
            Phase::Ready { watchdog_by, .. } => [watchdog_by, None],
            Phase::Stopping { kill_at, .. } => [kill_at, None],
            Phase::Draining { until, .. } => [Some(until), None],
            Phase::Spawning => [None, None],
        });
        let apps = self.apps.values().flat_map(|app| {
            let backoffs = app.slots.iter().filter_map(|slot| match slot.state {
                SlotState::Backoff { until } if !self.shutting_down => Some(until),
                _ => None,
            });
            let tend = app
                .tend
                .and_then(|t| Some(t.seen + app.latest().kv_watchdog?));
            backoffs
                .chain(app.rollout.as_ref().and_then(|r| r.next_deadline()))
                .chain(tend)
        });
        workers.flatten().chain(apps).chain(self.memory_check).min()
    }

    /// True once shutdown has begun and every worker is gone.
    pub fn finished(&self) -> bool {
        self.shutting_down && self.workers.is_empty()
    }

    /// The worker `id`, if it is known.
    pub fn worker(&self, id: WorkerId) -> Option<&Worker> {
        self.workers.get(&id)
    }

    /// How many workers are known (running, stopping, or exited with a group left).
    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// The app `name`, if the manifest has it.
    pub fn app(&self, name: &str) -> Option<&App> {
        self.apps.get(name)
    }

    /// True once shutdown has begun.
    pub fn shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// The running worker whose process is `pid`.
    pub fn worker_by_pid(&self, pid: Pid) -> Option<WorkerId> {
        self.pids.get(&pid).copied()
    }

    /// Workers whose process has exited while others of their group live on: the driver
    /// reports each with [`Event::GroupEmpty`] once its group is empty.
    pub fn lingering(&self) -> impl Iterator<Item = (WorkerId, Pid)> + '_ {
        self.workers.iter().filter_map(|(id, w)| match w.phase {
            Phase::Stopping { exited: true, .. } => Some((*id, w.pid?)),
            _ => None,
        })
    }

    /// What `id` is to its slot.
    pub fn role(&self, id: WorkerId) -> Role {
        let Some(worker) = self.workers.get(&id) else {
            return Role::Retired;
        };
        let Some(app) = self.apps.get(&worker.app) else {
            return Role::Retired;
        };
        if app.slots.get(worker.slot).and_then(|s| s.worker()) == Some(id) {
            Role::Current
        } else if app.rollout.as_ref().is_some_and(|r| r.is_candidate(id)) {
            Role::Candidate
        } else {
            Role::Retired
        }
    }

    // ----- events -----

    fn on_exited(&mut self, now: Instant, pid: Pid, status: ExitStatus, group_empty: bool) {
        let Some(id) = self.pids.remove(&pid) else {
            self.push_notice(Notice {
                level: Level::Debug,
                app: None,
                slot: None,
                pid: Some(pid),
                generation: None,
                what: What::Reaped { status },
            });
            return;
        };
        let role = self.role(id);
        let Some(worker) = self.workers.get(&id) else {
            return;
        };
        let end = End {
            uptime: now.saturating_duration_since(worker.started),
            was_ready: worker.is_ready(),
            status,
            failed_check: matches!(worker.phase, Phase::Stopping { why, .. } if why.is_failure()),
        };
        let rerun_done = role == Role::Candidate && self.finish_rerun(id, &end);
        let Some(worker) = self.workers.get(&id) else {
            return;
        };
        match role {
            Role::Current => self.on_unexpected_exit(now, id, &end),
            Role::Candidate if rerun_done => {}
            Role::Candidate => {
                let when = if end.was_ready {
                    "after ready, before it replaced the old worker"
                } else {
                    "before ready"
                };
                let reason = format!(
                    "slot {} generation {} exited with {status} {when}",
                    worker.slot, worker.generation
                );
                let app = worker.app.clone();
                let exit = Exit {
                    status,
                    killed: None,
                    uptime: end.uptime,
                };
                let after_ready = end.was_ready;
                self.notice(Level::Warn, id, What::CandidateExited { exit, after_ready });
                self.abort_rollout(now, &app, reason);
            }
            Role::Retired => {
                let exit = Exit {
                    status,
                    killed: None,
                    uptime: end.uptime,
                };
                self.notice(Level::Info, id, What::Stopped { exit });
            }
        }
        if group_empty {
            self.forget(id);
            return;
        }
        // Others of its group live on: they are asked to stop too.
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        match &mut worker.phase {
            Phase::Stopping { exited, .. } => *exited = true,
            Phase::Draining { why, .. } => {
                let why = *why;
                self.signal_stop(now, id, why);
                if let Some(Phase::Stopping { exited, .. }) =
                    self.workers.get_mut(&id).map(|w| &mut w.phase)
                {
                    *exited = true;
                }
            }
            _ => {
                self.notice(Level::Info, id, What::Leftovers);
                // Its own process is gone: no drain (it would hide the worker from
                // `lingering`, and nothing would report its group empty), the signal now.
                self.signal_stop(now, id, StopReason::Leftovers);
                if let Some(Phase::Stopping { exited, .. }) =
                    self.workers.get_mut(&id).map(|w| &mut w.phase)
                {
                    *exited = true;
                }
            }
        }
    }

    /// The serving worker of a slot ended: record it, and schedule its replacement by policy.
    /// If it was a rollout's new worker, already promoted, the rollout aborts and the slot
    /// goes back to the generation it had.
    fn on_unexpected_exit(&mut self, now: Instant, id: WorkerId, end: &End) {
        let Some(worker) = self.workers.get(&id) else {
            return;
        };
        let (app_name, index, generation) = (worker.app.clone(), worker.slot, worker.generation);
        let killed = match worker.phase {
            Phase::Stopping { why, .. } if why.is_failure() => Some(stop_reason_text(why)),
            _ => None,
        };
        let how = match killed {
            Some(killed) => format!("{} (killed: {killed})", end.status),
            None => end.status.to_string(),
        };
        let ended = Exit {
            status: end.status,
            killed,
            uptime: end.uptime,
        };
        let shutting_down = self.shutting_down;
        let Some(app) = self.apps.get_mut(&app_name) else {
            return;
        };
        let config = app.config(generation).clone();
        let restart = !shutting_down
            && match config.restart {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => !end.status.success(),
                RestartPolicy::Never => false,
            };
        // A one-shot run by a rollout (its slot had finished) that finishes again is no
        // failure of the new version.
        let finished = !restart && !shutting_down && end.status.success();
        let rolled_back = app
            .rollout
            .as_ref()
            .filter(|r| r.generation == generation)
            .filter(|r| !(finished && r.reruns(index)))
            .and_then(|r| r.promoted_from(index));
        let address = binds_itself(&config, end, &self.socket_addresses);
        let slot = &mut app.slots[index];
        let exit = format!("{how} after {}", human(end.uptime));
        if let Some(address) = address {
            let hint = binds_itself_hint(&address);
            // Once per streak of such exits: the status keeps saying it.
            if slot
                .last_exit
                .as_deref()
                .is_none_or(|last| !last.contains(&hint))
                && let Some(worker) = self.workers.get(&id)
            {
                let notice = about(worker, Level::Warn, What::BindsItself { address });
                self.out.push(Action::Event(notice));
            }
            slot.last_exit = Some(format!("{exit}: {hint}"));
        } else {
            slot.last_exit = Some(exit);
        }
        if let Some(old) = rolled_back {
            slot.generation = old;
        }
        if shutting_down {
            slot.state = SlotState::Stopped;
            self.notice(Level::Info, id, What::Stopped { exit: ended });
        } else if !restart {
            slot.state = SlotState::Done {
                code: match end.status {
                    ExitStatus::Code(code) => Some(code),
                    ExitStatus::Signal(_) => None,
                },
            };
            let done = end.status.success();
            let level = if done { Level::Info } else { Level::Warn };
            self.notice(level, id, What::Exited { exit: ended, done });
        } else if let Some(limit) = config
            .restart_limit
            .filter(|limit| over_limit(&mut slot.recent_restarts, now, limit))
        {
            let reason = format!(
                "more than {} restarts within {} (restart_limit); `clusterd restart` revives it",
                limit.burst,
                human(limit.interval)
            );
            slot.state = SlotState::Failed {
                reason: reason.clone(),
            };
            self.notice(
                Level::Error,
                id,
                What::Failed {
                    exit: ended,
                    reason,
                },
            );
        } else {
            slot.crash_streak = backoff::next_streak(&config.backoff, slot.crash_streak, end);
            slot.restarts += 1;
            slot.last_restart = Some(if slot.crash_streak == 0 {
                format!("killed from outside ({})", end.status)
            } else {
                format!("crash ({how})")
            });
            let delay = backoff::delay(&config.backoff, slot.crash_streak);
            slot.state = SlotState::Backoff { until: now + delay };
            let streak = slot.crash_streak;
            self.out.push(Action::Observe(Observation::Restart {
                app: app_name.clone(),
            }));
            let what = What::Restarting {
                exit: ended,
                delay,
                streak,
                flapping: streak >= backoff::FLAPPING_STREAK,
            };
            self.notice(Level::Warn, id, what);
        }
        if let Some(old) = rolled_back {
            self.abort_rollout(
                now,
                &app_name,
                format!(
                    "slot {index} generation {generation} exited with {} after it replaced the \
                     old worker; the slot goes back to generation {old}",
                    end.status
                ),
            );
        }
    }

    fn on_spawned(&mut self, now: Instant, id: WorkerId, result: Result<Pid, SpawnFailure>) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        match result {
            Ok(pid) => {
                worker.pid = Some(pid);
                self.pids.insert(pid, id);
                let started = What::Started {
                    command: worker.config.command.join(" "),
                };
                match worker.phase {
                    Phase::Spawning => {
                        let config = &worker.config;
                        worker.phase = match config.ready {
                            Readiness::Immediate => Phase::Starting {
                                ready_by: now + config.ready_timeout,
                                ready_at: Some(now),
                            },
                            Readiness::Delay(delay) | Readiness::ListenOrDelay(delay) => {
                                Phase::Starting {
                                    ready_by: now + config.ready_timeout,
                                    ready_at: Some(now + delay),
                                }
                            }
                            Readiness::Notify | Readiness::Listen | Readiness::Message => {
                                Phase::Starting {
                                    ready_by: now + config.ready_timeout,
                                    ready_at: None,
                                }
                            }
                        };
                        self.notice(Level::Info, id, started);
                    }
                    // Told to stop before it existed: now it can be.
                    Phase::Stopping { why, .. } => {
                        // Running now (not `Spawning`, which `stop` would leave unsignalled).
                        worker.phase = Phase::Starting {
                            ready_by: now + worker.config.ready_timeout,
                            ready_at: None,
                        };
                        self.notice(Level::Info, id, started);
                        self.stop(now, id, why);
                    }
                    _ => {}
                }
            }
            Err(failure) => self.on_spawn_failure(now, id, failure),
        }
    }

    /// A command that cannot be executed fails its slot (no crash storm); a transient failure
    /// (EMFILE, EAGAIN...) is retried with the backoff. A candidate's failure aborts its rollout.
    fn on_spawn_failure(&mut self, now: Instant, id: WorkerId, failure: SpawnFailure) {
        let role = self.role(id);
        let Some(worker) = self.workers.remove(&id) else {
            return;
        };
        self.out.push(Action::Forget { worker: id });
        let Some(app) = self.apps.get_mut(&worker.app) else {
            return;
        };
        match role {
            Role::Current => {
                let slot = &mut app.slots[worker.slot];
                if failure.transient {
                    slot.crash_streak = slot.crash_streak.saturating_add(1);
                    let delay = backoff::delay(&worker.config.backoff, slot.crash_streak.max(2))
                        .max(MIN_SPAWN_RETRY);
                    slot.state = SlotState::Backoff { until: now + delay };
                    let what = What::SpawnFailed {
                        message: failure.message,
                        retry_in: Some(delay),
                    };
                    self.push_notice(about(&worker, Level::Error, what));
                } else {
                    slot.state = SlotState::Failed {
                        reason: failure.message.clone(),
                    };
                    let what = What::SpawnFailed {
                        message: failure.message,
                        retry_in: None,
                    };
                    self.push_notice(about(&worker, Level::Error, what));
                }
            }
            Role::Candidate => {
                let reason = format!(
                    "slot {} generation {} could not start: {}",
                    worker.slot, worker.generation, failure.message
                );
                self.abort_rollout(now, &worker.app, reason);
            }
            Role::Retired => {}
        }
    }

    fn on_signal(&mut self, now: Instant, signal: SupervisorSignal) {
        match signal {
            SupervisorSignal::Stop(sig) if !self.shutting_down => {
                self.begin_shutdown(now, sig.as_str())
            }
            SupervisorSignal::Stop(sig) => self.force_shutdown(sig.as_str()),
            SupervisorSignal::Reload => self.request_reload(now, None),
            SupervisorSignal::Reread if !self.shutting_down => self.out.push(Action::Reread),
            SupervisorSignal::Reread => {}
            SupervisorSignal::ScaleBy(delta) => self.scale_single_app(now, delta),
            // The driver's business: it replaces this process (see `handover`).
            SupervisorSignal::Upgrade => {}
        }
    }

    /// An intercepted worker called `listen()` on a socket it was handed: with
    /// `ready = "listen"` (with or without `ready_delay`), a starting worker is ready. Later listens change nothing.
    fn on_listening(&mut self, now: Instant, id: WorkerId) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        worker.listened = true;
        if matches!(
            worker.config.ready,
            Readiness::Listen | Readiness::ListenOrDelay(_)
        ) && matches!(worker.phase, Phase::Starting { .. })
        {
            self.become_ready(now, id);
        }
    }

    fn on_notify(&mut self, now: Instant, id: WorkerId, assignments: &[(String, String)]) {
        let mut triggered = false;
        for (key, value) in assignments {
            let Some(worker) = self.workers.get_mut(&id) else {
                return;
            };
            match (key.as_str(), value.as_str()) {
                ("READY", "1") => {
                    if let Phase::Starting { .. } = worker.phase {
                        self.become_ready(now, id);
                    }
                }
                ("STATUS", _) => worker.status_text = Some(value.clone()),
                ("WATCHDOG", "1") => {
                    if let Phase::Ready { watchdog_by, .. } = &mut worker.phase {
                        *watchdog_by = worker.config.watchdog.map(|period| now + period);
                    }
                }
                ("WATCHDOG", "trigger") => triggered = true,
                ("EXTEND_TIMEOUT_USEC", _) => {
                    // Capped, so that no value a worker sends can overflow the clock.
                    if let Ok(usec) = value.parse::<u64>() {
                        let until = now + Duration::from_micros(usec).min(MAX_EXTEND);
                        match &mut worker.phase {
                            Phase::Starting { ready_by, .. } => *ready_by = (*ready_by).max(until),
                            Phase::Stopping {
                                kill_at: Some(kill_at),
                                ..
                            } => *kill_at = (*kill_at).max(until),
                            _ => {}
                        }
                    }
                }
                // A worker may send this as often as it likes: never more than a debug line.
                ("STOPPING", "1") => {
                    let notice = about(worker, Level::Debug, What::SaysStopping);
                    self.push_notice(notice);
                }
                (KV_TEND_KEY, state) => self.on_tend(now, id, state),
                _ => {}
            }
        }
        if triggered && self.workers.contains_key(&id) {
            self.notice(Level::Warn, id, What::WatchdogTriggered);
            self.kill(id, StopReason::Triggered);
        }
    }

    /// `X_CLUSTERD_KV_TEND=owner|released`: the worker says it holds (repeated every tend
    /// round, a heartbeat) or gave up its app's KV tend lock.
    fn on_tend(&mut self, now: Instant, id: WorkerId, state: &str) {
        let Some(worker) = self.workers.get(&id) else {
            return;
        };
        let Some(app) = self.apps.get_mut(&worker.app) else {
            return;
        };
        match state {
            "owner" => {
                let new = app.tend.is_none_or(|t| t.worker != id);
                app.tend = Some(Tend {
                    worker: id,
                    seen: now,
                });
                if new {
                    self.notice(Level::Info, id, What::KvTending);
                }
            }
            "released" if app.tend.is_some_and(|t| t.worker == id) => app.tend = None,
            _ => {}
        }
    }

    /// `kv_watchdog`: a tend owner silent that long is restarted so that the lock moves.
    fn check_tend(&mut self, now: Instant) {
        let due: Vec<(String, Tend)> = self
            .apps
            .iter()
            .filter_map(|(name, app)| {
                let tend = app.tend?;
                let limit = app.latest().kv_watchdog?;
                (tend.seen + limit <= now).then(|| (name.clone(), tend))
            })
            .collect();
        for (name, tend) in due {
            let Some(app) = self.apps.get_mut(&name) else {
                continue;
            };
            app.tend = None;
            let Some(worker) = self.workers.get(&tend.worker) else {
                continue;
            };
            let slot = worker.slot;
            if let Some(s) = app.slots.get_mut(slot)
                && s.worker() == Some(tend.worker)
            {
                s.state = SlotState::Backoff { until: now };
                s.last_restart = Some("KV tend owner stopped tending (kv_watchdog)".into());
            }
            let stale = now.saturating_duration_since(tend.seen);
            self.notice(Level::Warn, tend.worker, What::KvStale { stale });
            self.stop(now, tend.worker, StopReason::TendHung);
            // A stopped (SIGSTOP) owner must run to handle its stop signal and close its
            // client: wake it.
            if let Some(pid) = self.workers.get(&tend.worker).and_then(|w| w.pid) {
                self.out.push(Action::Signal {
                    worker: tend.worker,
                    pid,
                    signal: Signal::SIGCONT,
                });
            }
        }
    }

    /// Schedules the next memory sample if any app sets `max_memory`; cancels it otherwise.
    pub(super) fn schedule_memory_check(&mut self, now: Instant) {
        let wanted = self.apps.values().any(|a| a.latest().max_memory.is_some());
        self.memory_check = match (wanted, self.memory_check) {
            (true, Some(at)) => Some(at),
            (true, None) => Some(now + MEMORY_INTERVAL),
            (false, _) => None,
        };
    }

    /// Asks the driver for the memory of the workers that have a limit.
    fn check_memory(&mut self, now: Instant) {
        if self.memory_check.is_none_or(|at| at > now) {
            return;
        }
        self.memory_check = Some(now + MEMORY_INTERVAL);
        let limited: Vec<(WorkerId, Pid)> = self
            .workers
            .iter()
            .filter(|(_, w)| w.config.max_memory.is_some())
            .filter(|(_, w)| matches!(w.phase, Phase::Starting { .. } | Phase::Ready { .. }))
            .filter_map(|(id, w)| Some((*id, w.pid?)))
            .collect();
        if !limited.is_empty() {
            self.out.push(Action::MeasureMemory(limited));
        }
    }

    /// A worker over its `max_memory` is replaced: its replacement starts now, beside it, and
    /// it is stopped gracefully.
    fn on_memory(&mut self, now: Instant, measured: &[(WorkerId, u64)]) {
        for (id, rss) in measured {
            let Some(worker) = self.workers.get(id) else {
                continue;
            };
            let Some(limit) = worker.config.max_memory.filter(|limit| rss > limit) else {
                continue;
            };
            if !matches!(worker.phase, Phase::Starting { .. } | Phase::Ready { .. }) {
                continue;
            }
            let slot = worker.slot;
            let reason = format!("memory: {} MiB > max_memory {} MiB", rss >> 20, limit >> 20);
            if self.role(*id) == Role::Current
                && let Some(s) = self
                    .apps
                    .get_mut(&worker.app)
                    .and_then(|a| a.slots.get_mut(slot))
            {
                s.state = SlotState::Backoff { until: now };
                s.restarts += 1;
                s.last_restart = Some(reason.clone());
            }
            let what = What::OverMemory { bytes: *rss, limit };
            self.notice(Level::Warn, *id, what);
            self.stop(now, *id, StopReason::Memory);
        }
    }

    // ----- timers -----

    /// Readiness by delay, readiness and watchdog deadlines, stop timeouts.
    fn fire_worker_deadlines(&mut self, now: Instant) {
        let due: Vec<(WorkerId, Phase)> = self
            .workers
            .iter()
            .filter(|(_, w)| match w.phase {
                Phase::Starting { ready_by, ready_at } => {
                    ready_by <= now || ready_at.is_some_and(|at| at <= now)
                }
                Phase::Ready { watchdog_by, .. } => watchdog_by.is_some_and(|at| at <= now),
                Phase::Stopping { kill_at, .. } => kill_at.is_some_and(|at| at <= now),
                Phase::Draining { until, .. } => until <= now,
                Phase::Spawning => false,
            })
            .map(|(id, w)| (*id, w.phase))
            .collect();
        for (id, phase) in due {
            let Some(worker) = self.workers.get(&id) else {
                continue;
            };
            match phase {
                Phase::Starting { ready_at, .. } if ready_at.is_some_and(|at| at <= now) => {
                    self.become_ready(now, id)
                }
                Phase::Starting { .. } => self.not_ready(now, id),
                Phase::Ready { .. } => {
                    let period = worker.config.watchdog.unwrap_or_default();
                    self.notice(Level::Warn, id, What::WatchdogMissed { period });
                    self.kill(id, StopReason::Watchdog);
                }
                Phase::Stopping { why, .. } => {
                    let timeout = worker.config.stop_timeout;
                    self.notice(Level::Warn, id, What::StopTimeout { timeout });
                    self.kill(id, why);
                }
                Phase::Draining { why, .. } => self.signal_stop(now, id, why),
                Phase::Spawning => {}
            }
        }
    }

    pub(super) fn become_ready(&mut self, now: Instant, id: WorkerId) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        let waited = now.saturating_duration_since(worker.started);
        worker.phase = Phase::Ready {
            since: now,
            watchdog_by: worker.config.watchdog.map(|period| now + period),
        };
        self.out.push(Action::Observe(Observation::Ready {
            app: worker.app.clone(),
            seconds: waited.as_secs_f64(),
        }));
        // Its own steered sockets, if it has any (the daemon knows), now get connections.
        if may_be_steered(&worker.config) {
            self.out.push(Action::Steer {
                worker: id,
                serving: true,
            });
        }
        self.notice(Level::Info, id, What::Ready { after: waited });
    }

    /// A worker missed its `ready_timeout`: it is killed; a rollout's candidate aborts the
    /// rollout, any other worker is replaced like a crash (when its exit arrives).
    fn not_ready(&mut self, now: Instant, id: WorkerId) {
        let role = self.role(id);
        let Some(worker) = self.workers.get(&id) else {
            return;
        };
        let timeout = worker.config.ready_timeout;
        let (app, slot, generation) = (worker.app.clone(), worker.slot, worker.generation);
        self.notice(Level::Warn, id, What::NotReady { timeout });
        self.kill(id, StopReason::NotReady);
        if role == Role::Candidate {
            self.abort_rollout(
                now,
                &app,
                format!(
                    "slot {slot} generation {generation} was not ready within {}",
                    human(timeout)
                ),
            );
        }
    }

    /// Starts workers in slots whose backoff has passed.
    fn respawn_due(&mut self, now: Instant) {
        if self.shutting_down {
            return;
        }
        let due: Vec<(String, usize, u64)> = self
            .apps
            .iter()
            .flat_map(|(name, app)| {
                app.slots
                    .iter()
                    .enumerate()
                    .filter(|(_, slot)| {
                        matches!(slot.state, SlotState::Backoff { until } if until <= now)
                    })
                    .map(|(index, slot)| (name.clone(), index, slot.generation))
            })
            .collect();
        for (name, index, generation) in due {
            let id = self.spawn(now, &name, index, generation);
            if let Some(slot) = self
                .apps
                .get_mut(&name)
                .and_then(|a| a.slots.get_mut(index))
            {
                slot.state = SlotState::Occupied(id);
            }
        }
    }

    // ----- actions -----

    /// Asks for a new worker of `app` in `slot`; the driver answers with [`Event::Spawned`].
    pub(super) fn spawn(
        &mut self,
        now: Instant,
        app: &str,
        slot: usize,
        generation: u64,
    ) -> WorkerId {
        self.next_id += 1;
        let id = WorkerId(self.next_id);
        let config = self.apps[app].config(generation).clone();
        self.out.push(Action::Spawn {
            worker: id,
            app: app.to_owned(),
            slot,
            generation,
            config: Arc::clone(&config),
        });
        self.workers.insert(
            id,
            Worker {
                pid: None,
                app: app.to_owned(),
                slot,
                generation,
                config,
                started: now,
                phase: Phase::Spawning,
                status_text: None,
                inbox: Default::default(),
                listened: false,
            },
        );
        id
    }

    /// Asks a worker's group to stop with its stop signal; SIGKILL follows after its stop
    /// timeout. A worker already stopping is left as it is.
    pub(super) fn stop(&mut self, now: Instant, id: WorkerId, why: StopReason) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        match worker.phase {
            Phase::Stopping { .. } | Phase::Draining { .. } => return,
            Phase::Spawning => {
                // Signalled once its pid is known (see `on_spawned`).
                worker.phase = Phase::Stopping {
                    why,
                    kill_at: None,
                    exited: false,
                };
                return;
            }
            _ => {}
        }
        // An app that cannot drain itself: no new connections first, its signal later. An
        // intercepted app without sockets has only the ports bound on demand for its workers'
        // binds: a worker that never listened on one (a queue consumer) has nothing to drain.
        let on_demand_only = worker.config.intercept && worker.config.sockets.is_empty();
        let drain = worker
            .config
            .drain
            .filter(|_| why != StopReason::Shutdown)
            .filter(|_| worker.listened || !on_demand_only);
        // `stop_signal = "disconnect"`: its channel is closed first, the signal follows.
        let disconnect = worker.config.stop_disconnect;
        if disconnect {
            self.out.push(Action::Disconnect { worker: id });
        }
        let grace = drain.max(
            disconnect
                .then_some(worker.config.stop_timeout)
                .filter(|t| !t.is_zero()),
        );
        if let Some(grace) = grace {
            worker.phase = Phase::Draining {
                why,
                until: now + grace,
            };
            // No new connections while it drains or closes its channel.
            let sockets = may_be_steered(&worker.config);
            if drain.is_some() || (sockets && disconnect && why != StopReason::Shutdown) {
                self.out.push(Action::Steer {
                    worker: id,
                    serving: false,
                });
            }
            return;
        }
        self.signal_stop(now, id, why);
    }

    /// Sends a worker's group its stop signal; SIGKILL follows after its stop timeout.
    fn signal_stop(&mut self, now: Instant, id: WorkerId, why: StopReason) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        // An app that drains itself: no new connections on its own steered sockets from now
        // (one with `drain` or `stop_signal = "disconnect"` was steered out at its stop).
        if may_be_steered(&worker.config)
            && worker.config.drain.is_none()
            && !worker.config.stop_disconnect
            && why != StopReason::Shutdown
        {
            self.out.push(Action::Steer {
                worker: id,
                serving: false,
            });
        }
        let timeout = worker.config.stop_timeout;
        if timeout.is_zero() {
            self.kill(id, why);
            return;
        }
        worker.phase = Phase::Stopping {
            why,
            kill_at: Some(now + timeout),
            exited: false,
        };
        if let Some(pid) = worker.pid {
            let signal = worker.config.stop_signal;
            self.out.push(Action::Signal {
                worker: id,
                pid,
                signal,
            });
        }
    }

    /// Sends SIGKILL to a worker's group.
    pub(super) fn kill(&mut self, id: WorkerId, why: StopReason) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        let exited = matches!(worker.phase, Phase::Stopping { exited: true, .. });
        worker.phase = Phase::Stopping {
            why,
            kill_at: None,
            exited,
        };
        if let Some(pid) = worker.pid {
            self.out.push(Action::Signal {
                worker: id,
                pid,
                signal: Signal::SIGKILL,
            });
        }
    }

    /// Drops a worker's record: its process was reaped and its group is empty.
    fn forget(&mut self, id: WorkerId) {
        let Some(worker) = self.workers.remove(&id) else {
            return;
        };
        if let Some(pid) = worker.pid
            && self.pids.get(&pid) == Some(&id)
        {
            self.pids.remove(&pid);
        }
        if let Some(app) = self.apps.get_mut(&worker.app)
            && app.tend.is_some_and(|t| t.worker == id)
        {
            app.tend = None;
        }
        self.out.push(Action::Forget { worker: id });
    }

    /// Stops every worker gracefully; clusterd exits once all are gone.
    pub(super) fn begin_shutdown(&mut self, now: Instant, why: &str) {
        let workers = self.workers.len();
        self.push_notice(Notice {
            level: Level::Info,
            app: None,
            slot: None,
            pid: None,
            generation: None,
            what: What::Stopping {
                why: why.to_owned(),
                workers,
            },
        });
        self.shutting_down = true;
        for app in self.apps.values_mut() {
            app.rollout = None;
            for slot in &mut app.slots {
                slot.state = SlotState::Stopped;
            }
        }
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            self.stop(now, id, StopReason::Shutdown);
        }
    }

    /// A second stop signal: SIGKILL to everything left.
    fn force_shutdown(&mut self, why: &str) {
        let workers = self.workers.len();
        self.push_notice(Notice {
            level: Level::Warn,
            app: None,
            slot: None,
            pid: None,
            generation: None,
            what: What::Killing {
                why: why.to_owned(),
                workers,
            },
        });
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            self.kill(id, StopReason::Shutdown);
        }
    }

    /// SIGTTIN/SIGTTOU: one worker more or fewer for the manifest's only app.
    fn scale_single_app(&mut self, now: Instant, delta: i64) {
        if self.apps.len() != 1 {
            self.push_notice(Notice {
                level: Level::Warn,
                app: None,
                slot: None,
                pid: None,
                generation: None,
                what: What::ScaleRefused {
                    apps: self.apps.len(),
                },
            });
            return;
        }
        let Some((name, app)) = self.apps.iter().next() else {
            return;
        };
        let target = usize::try_from(app.slots.len() as i64 + delta).unwrap_or(0);
        let name = name.clone();
        self.scale(now, &name, target);
    }

    /// Sets the number of slots of an app: new slots start now on the newest generation,
    /// removed ones (the highest) stop gracefully, and a rollout forgets them.
    pub(super) fn scale(&mut self, now: Instant, name: &str, target: usize) {
        if self.shutting_down {
            return;
        }
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        let before = app.slots.len();
        if target == before {
            return;
        }
        let mut to_stop = Vec::new();
        if target > before {
            let generation = app.generation;
            app.slots
                .extend((before..target).map(|_| super::state::Slot::new(generation, now)));
        } else {
            to_stop.extend(app.slots.drain(target..).filter_map(|s| s.worker()));
            if let Some(rollout) = &mut app.rollout {
                to_stop.extend(rollout.forget_slots_from(target));
            }
        }
        self.push_notice(Notice {
            level: Level::Info,
            app: Some(name.to_owned()),
            slot: None,
            pid: None,
            generation: None,
            what: What::Scaled {
                from: before,
                to: target,
            },
        });
        for id in to_stop {
            self.stop(now, id, StopReason::Retired);
        }
    }

    /// Queues a typed event about worker `id` (its app, slot, pid and generation).
    pub(super) fn notice(&mut self, level: Level, id: WorkerId, what: What) {
        if let Some(worker) = self.workers.get(&id) {
            let notice = about(worker, level, what);
            self.push_notice(notice);
        }
    }

    /// Queues a typed event.
    pub(super) fn push_notice(&mut self, notice: Notice) {
        self.out.push(Action::Event(notice));
    }

    /// Queues an action.
    pub(super) fn push(&mut self, action: Action) {
        self.out.push(action);
    }
}

/// A typed event about `worker`.
pub(super) fn about(worker: &Worker, level: Level, what: What) -> Notice {
    Notice {
        level,
        app: Some(worker.app.clone()),
        slot: Some(worker.slot),
        pid: worker.pid,
        generation: Some(worker.generation),
        what,
    }
}

fn stop_reason_text(why: StopReason) -> &'static str {
    match why {
        StopReason::Watchdog => "watchdog",
        StopReason::Triggered => "watchdog trigger",
        StopReason::NotReady => "not ready in time",
        StopReason::Retired => "retired",
        StopReason::Shutdown => "shutdown",
        StopReason::Leftovers => "leftovers",
        StopReason::Aborted => "rollout aborted",
        StopReason::TendHung => "KV tend owner hung",
        StopReason::Memory => "over max_memory",
    }
}

/// Records a restart at `now` and says whether the slot has now restarted more than `limit`
/// allows within its interval.
fn over_limit(
    recent: &mut std::collections::VecDeque<Instant>,
    now: Instant,
    limit: &clusterd_manifest::RestartLimit,
) -> bool {
    recent.push_back(now);
    while recent
        .front()
        .is_some_and(|at| now.saturating_duration_since(*at) > limit.interval)
    {
        recent.pop_front();
    }
    recent.len() > limit.burst as usize
}
