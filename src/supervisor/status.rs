//! The status snapshot served to `clusterd status`: every app, slot and worker process, with
//! CPU and memory of each worker's process group.

use std::collections::HashMap;

use clusterd_proto::{
    AppReload, AppStatus, ReloadResult, RolloutStatus, SocketStatus, Status, WorkerRole,
    WorkerState, WorkerStatus,
};
use nix::unistd::Pid;
use tokio::time::Instant;

use super::Supervisor;
use super::state::{Phase, ReloadOutcome, Slot, Worker};
use crate::procstat;

impl Supervisor {
    /// A snapshot of everything, for the control socket.
    pub(super) fn status(&mut self) -> Status {
        let now = Instant::now();
        let groups: Vec<Pid> = self.workers.keys().copied().collect();
        let usage = procstat::group_usage(&groups);
        let mut cpu_percent = HashMap::new();
        for (pid, u) in &usage {
            let since = self
                .cpu_samples
                .get(pid)
                .copied()
                .unwrap_or_else(|| (self.workers[pid].started, 0.0));
            let wall = (now - since.0).as_secs_f64();
            if wall > 0.0 {
                cpu_percent.insert(*pid, (u.cpu_seconds - since.1).max(0.0) / wall * 100.0);
            }
        }
        self.cpu_samples = usage
            .iter()
            .map(|(pid, u)| (*pid, (now, u.cpu_seconds)))
            .collect();

        let apps = self
            .apps
            .iter()
            .map(|(name, app)| {
                let tend_owner: Option<i32> = None; // until the driver reads X_CLUSTERD_KV_TEND
                let mut workers = Vec::new();
                for (index, slot) in app.slots.iter().enumerate() {
                    for (pid, role) in [
                        (slot.current, WorkerRole::Serving),
                        (slot.candidate, WorkerRole::Candidate),
                    ] {
                        if let Some(pid) = pid
                            && let Some(worker) = self.workers.get(&pid)
                        {
                            workers.push(worker_status(
                                pid,
                                worker,
                                slot,
                                role,
                                now,
                                &usage,
                                &cpu_percent,
                                tend_owner,
                            ));
                        }
                    }
                    if slot.current.is_none() && slot.candidate.is_none() {
                        workers.push(empty_slot(index, slot));
                    }
                }
                for (pid, worker) in &self.workers {
                    let referenced = app
                        .slots
                        .get(worker.slot)
                        .is_some_and(|s| s.current == Some(*pid) || s.candidate == Some(*pid));
                    if worker.app == *name && !referenced {
                        let slot = app.slots.get(worker.slot);
                        let placeholder;
                        let slot = match slot {
                            Some(slot) => slot,
                            None => {
                                placeholder = Slot::new(worker.generation, now);
                                &placeholder
                            }
                        };
                        workers.push(worker_status(
                            *pid,
                            worker,
                            slot,
                            WorkerRole::Retiring,
                            now,
                            &usage,
                            &cpu_percent,
                            tend_owner,
                        ));
                    }
                }
                workers.sort_by_key(|w| (w.slot, w.role != WorkerRole::Serving, w.pid));
                let serving = || {
                    app.slots
                        .iter()
                        .filter_map(|s| s.current.and_then(|p| self.workers.get(&p)))
                };
                AppStatus {
                    name: name.clone(),
                    desired: app.slots.len(),
                    running: serving().count(),
                    ready: serving().filter(|w| w.is_ready()).count(),
                    reloading: app.rollout.as_ref().map(|r| {
                        let (done, total) = r.progress();
                        RolloutStatus {
                            generation: r.generation,
                            done,
                            total,
                        }
                    }),
                    last_reload: app.last_reload.as_ref().map(|o| app_reload(name, o)),
                    tend_owner: tend_owner.map(|p| p as u32),
                    workers,
                }
            })
            .collect();

        Status {
            pid: std::process::id(),
            manifest: self.manifest.path.display().to_string(),
            uptime_ms: millis(now - self.started),
            rss_bytes: procstat::self_rss(),
            stopping: self.shutting_down,
            sockets: self
                .sockets
                .iter()
                .map(|(name, s)| SocketStatus {
                    name: name.clone(),
                    address: s.address.clone(),
                })
                .collect(),
            apps,
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

#[allow(clippy::too_many_arguments)]
fn worker_status(
    pid: Pid,
    worker: &Worker,
    slot: &Slot,
    role: WorkerRole,
    now: Instant,
    usage: &HashMap<Pid, procstat::Usage>,
    cpu_percent: &HashMap<Pid, f64>,
    tend_owner: Option<i32>,
) -> WorkerStatus {
    let (state, ready_ms) = match worker.phase {
        Phase::Starting => (WorkerState::Starting, None),
        Phase::Ready { since } => (WorkerState::Ready, Some(millis(since - worker.started))),
        Phase::Stopping { .. } => (WorkerState::Stopping, None),
    };
    WorkerStatus {
        slot: worker.slot,
        pid: Some(pid.as_raw() as u32),
        state,
        role,
        generation: worker.generation,
        uptime_ms: Some(millis(now - worker.started)),
        ready_ms,
        restarts: slot.restarts,
        crash_streak: slot.crash_streak,
        last_exit: slot.last_exit.clone(),
        cpu_percent: cpu_percent.get(&pid).copied(),
        cpu_seconds: usage.get(&pid).map(|u| u.cpu_seconds),
        rss_bytes: usage.get(&pid).map(|u| u.rss_bytes),
        status_text: worker.status_text.clone(),
        tend_owner: tend_owner == Some(pid.as_raw()),
    }
}

fn empty_slot(index: usize, slot: &Slot) -> WorkerStatus {
    let state = if slot.failed.is_some() {
        WorkerState::Failed
    } else if slot.respawn_at.is_some() {
        WorkerState::Backoff
    } else {
        WorkerState::Exited
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
        last_exit: slot.failed.clone().or_else(|| slot.last_exit.clone()),
        cpu_percent: None,
        cpu_seconds: None,
        rss_bytes: None,
        status_text: None,
        tend_owner: false,
    }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
