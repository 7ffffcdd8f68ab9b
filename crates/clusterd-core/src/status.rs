//! Views of the core for `clusterd status` and the metrics: every app, slot and worker
//! process, with CPU and memory of each worker's process group (measured by the driver).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::process::Pid;
use clusterd_proto::{
    AppReload, AppStatus, ReloadResult, RolloutStatus, WorkerRole, WorkerState, WorkerStatus,
};

use super::core::{Core, Role};
use super::state::{App, Phase, ReloadOutcome, Slot, SlotState, Worker, WorkerId};
use crate::process::Usage;

/// CPU percentages between two looks. Each view keeps its own, so that one view's
/// sampling (a status every second) does not change what the other (a scrape) sees.
#[derive(Debug, Default)]
pub struct CpuSampler {
    last: HashMap<Pid, (Instant, f64)>,
}

impl CpuSampler {
    /// CPU use of each group since the previous call (or since `started`), percent of one core.
    pub fn sample(
        &mut self,
        now: Instant,
        usage: &HashMap<Pid, Usage>,
        started: impl Fn(Pid) -> Instant,
    ) -> HashMap<Pid, f64> {
        let percent = usage
            .iter()
            .filter_map(|(pid, u)| {
                let (since, cpu) = self.last.get(pid).copied().unwrap_or((started(*pid), 0.0));
                let wall = now.saturating_duration_since(since).as_secs_f64();
                (wall > 0.0).then(|| (*pid, (u.cpu_seconds - cpu).max(0.0) / wall * 100.0))
            })
            .collect();
        self.last = usage
            .iter()
            .map(|(pid, u)| (*pid, (now, u.cpu_seconds)))
            .collect();
        percent
    }
}

/// What the driver measured for a view.
pub struct Measured<'a> {
    /// CPU and memory by process group.
    pub usage: &'a HashMap<Pid, Usage>,
    /// CPU percent by process group (empty for views that do not show it).
    pub cpu_percent: &'a HashMap<Pid, f64>,
}

impl Core {
    /// The process groups of all workers that have a pid, with their spawn times.
    pub fn groups(&self) -> Vec<(Pid, Instant)> {
        self.workers
            .values()
            .filter_map(|w| Some((w.pid?, w.started)))
            .collect()
    }

    /// Every app's status.
    pub fn app_statuses(&self, now: Instant, measured: &Measured<'_>) -> Vec<AppStatus> {
        self.apps
            .iter()
            .map(|(name, app)| self.app_status(name, app, now, measured))
            .collect()
    }

    fn app_status(&self, name: &str, app: &App, now: Instant, m: &Measured<'_>) -> AppStatus {
        let tend_owner = app.tend.and_then(|t| self.workers.get(&t.worker)?.pid);
        let row = |id: WorkerId, slot: &Slot, role: WorkerRole| {
            let worker = self.workers.get(&id)?;
            Some(worker_status(worker, slot, role, now, m, tend_owner))
        };
        let mut workers = Vec::new();
        for (index, slot) in app.slots.iter().enumerate() {
            let serving = slot
                .worker()
                .and_then(|id| row(id, slot, WorkerRole::Serving));
            let candidate = app
                .rollout
                .as_ref()
                .and_then(|r| r.candidate(index))
                .and_then(|id| row(id, slot, WorkerRole::Candidate));
            if serving.is_none() && candidate.is_none() {
                workers.push(empty_slot(index, slot));
            }
            workers.extend(serving);
            workers.extend(candidate);
        }
        for (id, worker) in &self.workers {
            if worker.app == name && self.role(*id) == Role::Retired {
                let placeholder;
                let slot = match app.slots.get(worker.slot) {
                    Some(slot) => slot,
                    None => {
                        placeholder = Slot::new(worker.generation, now);
                        &placeholder
                    }
                };
                workers.push(worker_status(
                    worker,
                    slot,
                    WorkerRole::Retiring,
                    now,
                    m,
                    tend_owner,
                ));
            }
        }
        workers.sort_by_key(|w| (w.slot, w.role != WorkerRole::Serving, w.pid));
        let serving: Vec<&Worker> = app
            .slots
            .iter()
            .filter_map(|s| self.workers.get(&s.worker()?))
            .filter(|w| w.is_running())
            .collect();
        AppStatus {
            name: name.to_owned(),
            desired: app.slots.len(),
            running: serving.len(),
            ready: serving.iter().filter(|w| w.is_ready()).count(),
            done: app.slots.len() - super::host::wanted(app),
            reloading: app.rollout.as_ref().map(|r| {
                let (done, total) = r.progress();
                RolloutStatus {
                    generation: r.generation,
                    done,
                    total,
                }
            }),
            last_reload: app.last_reload.as_ref().map(|o| app_reload(name, o)),
            tend_owner: tend_owner.map(|p| p.as_raw() as u32),
            tend_heard_ms: app
                .tend
                .map(|t| millis(now.saturating_duration_since(t.seen))),
            workers,
        }
    }
}

/// The protocol's form of a rollout outcome.
pub(super) fn app_reload(app: &str, outcome: &ReloadOutcome) -> AppReload {
    match outcome {
        ReloadOutcome::Completed { generation } => AppReload {
            app: app.to_owned(),
            outcome: ReloadResult::Completed,
            generation: *generation,
            reason: None,
        },
        ReloadOutcome::Aborted { generation, reason } => AppReload {
            app: app.to_owned(),
            outcome: ReloadResult::Aborted,
            generation: *generation,
            reason: Some(reason.clone()),
        },
    }
}

fn worker_status(
    worker: &Worker,
    slot: &Slot,
    role: WorkerRole,
    now: Instant,
    m: &Measured<'_>,
    tend_owner: Option<Pid>,
) -> WorkerStatus {
    let (state, ready_ms) = match worker.phase {
        Phase::Spawning | Phase::Starting { .. } => (WorkerState::Starting, None),
        Phase::Ready { since, .. } => (WorkerState::Ready, Some(millis(since - worker.started))),
        Phase::Draining { .. } | Phase::Stopping { .. } => (WorkerState::Stopping, None),
    };
    let usage = worker.pid.and_then(|pid| m.usage.get(&pid));
    WorkerStatus {
        slot: worker.slot,
        pid: worker.pid.map(|p| p.as_raw() as u32),
        state,
        role,
        generation: worker.generation,
        uptime_ms: Some(millis(now.saturating_duration_since(worker.started))),
        ready_ms,
        restarts: slot.restarts,
        crash_streak: slot.crash_streak,
        last_exit: slot.last_exit.clone(),
        done: false,
        exit_code: None,
        cpu_percent: worker.pid.and_then(|pid| m.cpu_percent.get(&pid).copied()),
        cpu_seconds: usage.map(|u| u.cpu_seconds),
        rss_bytes: usage.map(|u| u.rss_bytes),
        status_text: worker.status_text.clone(),
        restart_reason: slot.last_restart.clone(),
        tend_owner: worker.pid.is_some() && worker.pid == tend_owner,
        messages_received: worker.inbox.received,
        messages_dropped: 0,
        last_messages: worker.inbox.recent.iter().cloned().collect(),
    }
}

fn empty_slot(index: usize, slot: &Slot) -> WorkerStatus {
    let (state, last_exit) = match &slot.state {
        SlotState::Failed { reason } => (WorkerState::Failed, Some(reason.clone())),
        SlotState::Backoff { .. } => (WorkerState::Backoff, slot.last_exit.clone()),
        SlotState::Done { .. } | SlotState::Stopped | SlotState::Occupied(_) => {
            (WorkerState::Exited, slot.last_exit.clone())
        }
    };
    let exit_code = match slot.state {
        SlotState::Done { code } => code,
        _ => None,
    };
    WorkerStatus {
        slot: index,
        pid: None,
        state,
        role: WorkerRole::Serving,
        generation: slot.generation,
        uptime_ms: None,
        ready_ms: None,
        restarts: slot.restarts,
        crash_streak: slot.crash_streak,
        last_exit,
        done: matches!(slot.state, SlotState::Done { .. }),
        exit_code,
        cpu_percent: None,
        cpu_seconds: None,
        rss_bytes: None,
        status_text: None,
        restart_reason: slot.last_restart.clone(),
        tend_owner: false,
        messages_received: 0,
        messages_dropped: 0,
        last_messages: Vec::new(),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
