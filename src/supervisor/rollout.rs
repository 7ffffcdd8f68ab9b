//! Rolling reload: for each slot in turn, start the next generation's worker (the candidate),
//! wait until it is ready (and has baked), promote it, then stop the old worker and wait for it
//! to exit. Up to `reload.surge` slots are in flight at once. A candidate that exits or is not
//! ready in time aborts the rollout: it is killed, the remaining old workers keep serving, and
//! slots already promoted stay on the new generation. Requests that arrive during a rollout
//! coalesce into one more rollout after it.

use std::collections::VecDeque;

use nix::unistd::Pid;
use tokio::time::Instant;

use super::Supervisor;
use super::state::{Phase, ReloadOutcome};

/// A rollout in progress for one app.
#[derive(Debug)]
pub struct Rollout {
    /// The generation being rolled out.
    pub generation: u64,
    /// Slots not started yet, in order.
    pending: VecDeque<usize>,
    /// Slots in flight.
    active: Vec<Step>,
    /// Another reload was requested meanwhile.
    pub again: bool,
    /// Slots promoted so far.
    promoted: usize,
}

/// One slot in flight.
#[derive(Debug)]
struct Step {
    slot: usize,
    /// The old worker being stopped, once the candidate was promoted.
    retiring: Option<Pid>,
}

impl Rollout {
    /// Forgets slots at or above `first` (the app was scaled down).
    pub fn forget_slots_from(&mut self, first: usize) {
        self.pending.retain(|s| *s < first);
        self.active.retain(|s| s.slot < first);
    }

    /// Slots finished, in flight, and in all, for status: `(done, total)`.
    pub fn progress(&self) -> (usize, usize) {
        let total = self.promoted
            + self.pending.len()
            + self.active.iter().filter(|s| s.retiring.is_none()).count();
        (self.promoted, total)
    }
}

impl Supervisor {
    /// `SIGUSR2` / `clusterd reload [APP]`: starts a rollout of `app` (all apps when `None`), or
    /// marks one more to follow the rollout in progress.
    pub(super) fn request_reload(&mut self, app: Option<&str>) {
        if self.shutting_down {
            return;
        }
        let names: Vec<String> = match app {
            Some(name) => vec![name.to_owned()],
            None => self.apps.keys().cloned().collect(),
        };
        for name in names {
            let Some(app) = self.apps.get_mut(&name) else {
                continue;
            };
            if let Some(rollout) = &mut app.rollout {
                rollout.again = true;
                tracing::info!(
                    "reload of {name} requested during a rollout; another one will follow it"
                );
                continue;
            }
            app.generation += 1;
            let generation = app.generation;
            tracing::info!(
                "reload of {name}: rolling {} workers to generation {generation}",
                app.slots.len()
            );
            app.rollout = Some(Rollout {
                generation,
                pending: (0..app.slots.len()).collect(),
                active: Vec::new(),
                again: false,
                promoted: 0,
            });
        }
        let now = Instant::now();
        let names: Vec<String> = self.apps.keys().cloned().collect();
        for name in names {
            self.advance_rollout(&name, now);
        }
    }

    /// Moves a rollout forward as far as it can go now.
    pub(super) fn advance_rollout(&mut self, name: &str, now: Instant) {
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        let Some(mut rollout) = app.rollout.take() else {
            return;
        };
        let bake = app.config.reload.bake;
        let surge = app.config.reload.surge.max(1);

        // Promote ready candidates; finish slots whose old worker has exited.
        let mut to_stop = Vec::new();
        rollout.active.retain_mut(|step| {
            let slot = &mut app.slots[step.slot];
            if let Some(old) = step.retiring {
                return self.workers.get(&old).is_some_and(|w| w.exited.is_none());
            }
            let Some(candidate) = slot.candidate else {
                return false; // aborted or scaled away
            };
            let baked = match self.workers.get(&candidate).map(|w| w.phase) {
                Some(Phase::Ready { since }) => now >= since + bake,
                _ => false,
            };
            if !baked {
                return true;
            }
            let old = slot.current.replace(candidate);
            slot.candidate = None;
            slot.generation = rollout.generation;
            slot.failed = None;
            slot.respawn_at = None;
            slot.crash_streak = 0;
            rollout.promoted += 1;
            match old {
                Some(old) => {
                    to_stop.push(old);
                    step.retiring = Some(old);
                    true
                }
                None => false,
            }
        });
        for old in to_stop {
            if let Some(worker) = self.workers.get(&old) {
                let message = format!(
                    "{} generation {} ready; stopping pid {old}",
                    worker.label(),
                    rollout.generation
                );
                self.progress(name, &message);
            }
            self.stop_worker(old, now);
        }

        // Start the next slots, up to the surge.
        while rollout
            .active
            .iter()
            .filter(|s| s.retiring.is_none())
            .count()
            < surge
        {
            let Some(slot) = rollout.pending.pop_front() else {
                break;
            };
            match self.spawn_worker(name, slot, rollout.generation, now) {
                Ok(pid) => {
                    let app = self.apps.get_mut(name).expect("rolling it");
                    app.slots[slot].candidate = Some(pid);
                    rollout.active.push(Step {
                        slot,
                        retiring: None,
                    });
                }
                Err(error) => {
                    let app = self.apps.get_mut(name).expect("rolling it");
                    app.rollout = Some(rollout);
                    let generation = app.generation;
                    self.abort_rollout(
                        name,
                        format!("slot {slot} generation {generation} could not start: {error}"),
                    );
                    return;
                }
            }
        }

        let app = self.apps.get_mut(name).expect("rolling it");
        if !rollout.pending.is_empty() || !rollout.active.is_empty() {
            app.rollout = Some(rollout);
            return;
        }
        tracing::info!(
            "reload of {name} complete: {} workers on generation {}",
            app.slots.len(),
            rollout.generation
        );
        app.last_reload = Some(ReloadOutcome::Completed {
            generation: rollout.generation,
        });
        self.metrics.record_reload(name, true);
        if rollout.again {
            self.request_reload(Some(name));
        }
    }

    /// Stops a rollout: kills its candidates; old workers keep serving.
    pub(super) fn abort_rollout(&mut self, name: &str, reason: String) {
        let now = Instant::now();
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        let Some(rollout) = app.rollout.take() else {
            return;
        };
        let mut doomed = Vec::new();
        for step in &rollout.active {
            if let Some(candidate) = app.slots[step.slot].candidate.take() {
                doomed.push(candidate);
            }
        }
        let kept: Vec<String> = app
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{i}:g{}", s.generation))
            .collect();
        tracing::error!(
            "reload of {name} aborted: {reason}; old workers keep serving (slot:generation {})",
            kept.join(" ")
        );
        app.last_reload = Some(ReloadOutcome::Aborted {
            generation: rollout.generation,
            reason,
        });
        self.metrics.record_reload(name, false);
        for pid in doomed {
            self.kill_worker(pid, now);
        }
        if rollout.again {
            tracing::info!("running the reload requested during the aborted rollout");
            self.request_reload(Some(name));
        }
    }
}
