//! Rolling reload. For each slot in turn: start the next generation's worker (the candidate),
//! wait until it is ready, let it bake (`reload.bake`: it must stay up that long), promote it,
//! stop the old worker and wait for it to exit. Up to `reload.surge` slots are in flight.
//!
//! Fail-safe: **any** exit of a new-generation worker before the rollout has completed aborts
//! it — a candidate's (before or after READY=1), and a promoted worker's too. On abort the
//! candidates are stopped, the old workers not yet replaced keep serving, promoted slots whose
//! new worker is alive keep it, and a promoted slot whose new worker died goes back to the
//! generation (and configuration) it had. Requests that arrive during a rollout coalesce into
//! one more rollout after it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tracing::Level;

use super::core::Core;
use super::event::{Action, Observation};
use super::state::{Phase, ReloadOutcome, SlotState, StopReason, WorkerId};

/// A rollout in progress for one app.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// The generation being rolled out.
    pub generation: u64,
    /// Slots not started yet, in order.
    pending: VecDeque<usize>,
    /// Slots in flight.
    active: Vec<Step>,
    /// Slots promoted so far, with the generation each had before.
    promoted: Vec<(usize, u64)>,
    /// Another reload was requested meanwhile.
    pub again: bool,
}

/// One slot in flight.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    slot: usize,
    stage: Stage,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
enum Stage {
    /// The candidate is starting.
    Starting(WorkerId),
    /// The candidate is ready and must stay up until `until`.
    Baking {
        candidate: WorkerId,
        #[serde(with = "super::handover::instant")]
        until: Instant,
    },
    /// The candidate was promoted; the old worker is stopping.
    Retiring(WorkerId),
}

impl Rollout {
    fn new(generation: u64, slots: usize) -> Self {
        Rollout {
            generation,
            pending: (0..slots).collect(),
            active: Vec::new(),
            promoted: Vec::new(),
            again: false,
        }
    }

    /// Whether `id` is one of its unpromoted new workers.
    pub fn is_candidate(&self, id: WorkerId) -> bool {
        self.active.iter().any(|s| s.candidate() == Some(id))
    }

    /// The candidate in flight for `slot`.
    pub fn candidate(&self, slot: usize) -> Option<WorkerId> {
        self.active
            .iter()
            .filter(|s| s.slot == slot)
            .find_map(Step::candidate)
    }

    /// The generation `slot` had before this rollout promoted it, if it did.
    pub fn promoted_from(&self, slot: usize) -> Option<u64> {
        self.promoted
            .iter()
            .find(|(s, _)| *s == slot)
            .map(|(_, generation)| *generation)
    }

    /// Forgets slots at or above `first` (the app was scaled down); returns their candidates,
    /// to be stopped.
    pub fn forget_slots_from(&mut self, first: usize) -> Vec<WorkerId> {
        self.pending.retain(|s| *s < first);
        self.promoted.retain(|(s, _)| *s < first);
        let (gone, kept) = std::mem::take(&mut self.active)
            .into_iter()
            .partition::<Vec<_>, _>(|s| s.slot >= first);
        self.active = kept;
        gone.iter().filter_map(Step::candidate).collect()
    }

    /// Slots promoted, and in all, for status: `(done, total)`.
    pub fn progress(&self) -> (usize, usize) {
        let in_flight = self
            .active
            .iter()
            .filter(|s| s.candidate().is_some())
            .count();
        let done = self.promoted.len();
        (done, done + self.pending.len() + in_flight)
    }

    /// When the next candidate has baked.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.active
            .iter()
            .filter_map(|s| match s.stage {
                Stage::Baking { until, .. } => Some(until),
                _ => None,
            })
            .min()
    }
}

impl Step {
    fn candidate(&self) -> Option<WorkerId> {
        match self.stage {
            Stage::Starting(id) | Stage::Baking { candidate: id, .. } => Some(id),
            Stage::Retiring(_) => None,
        }
    }
}

impl Core {
    /// `SIGUSR2` / `clusterd reload [APP]`: starts a rollout of `app` (all apps when `None`),
    /// or marks one more to follow the rollout in progress.
    pub(super) fn request_reload(&mut self, now: Instant, app: Option<&str>) {
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
                self.log(
                    Level::INFO,
                    format!(
                        "reload of {name} requested during a rollout; another one will follow it"
                    ),
                );
                continue;
            }
            let config = app
                .next_config
                .take()
                .unwrap_or_else(|| Arc::clone(app.latest()));
            app.generation += 1;
            let generation = app.generation;
            app.configs.insert(generation, config);
            app.rollout = Some(Rollout::new(generation, app.slots.len()));
            let message = format!(
                "reload of {name}: rolling {} workers to generation {generation}",
                app.slots.len()
            );
            self.log(Level::INFO, message);
            self.advance_rollout(&name, now);
        }
    }

    /// Moves a rollout forward as far as it can go at `now`.
    pub(super) fn advance_rollout(&mut self, name: &str, now: Instant) {
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        let Some(mut rollout) = app.rollout.take() else {
            return;
        };
        let config = Arc::clone(app.config(rollout.generation));
        let (bake, surge) = (config.reload.bake, config.reload.surge.max(1));

        // Candidates that became ready start baking; baked ones are promoted; retiring old
        // workers that have exited finish their step.
        let mut to_stop = Vec::new();
        let mut promoted_lines = Vec::new();
        let workers = &self.workers;
        rollout.active.retain_mut(|step| {
            if let Stage::Starting(candidate) = step.stage
                && let Some(Phase::Ready { since, .. }) = workers.get(&candidate).map(|w| w.phase)
            {
                step.stage = Stage::Baking {
                    candidate,
                    until: since + bake,
                };
            }
            match step.stage {
                Stage::Starting(_) => true,
                Stage::Baking { until, .. } if until > now => true,
                Stage::Baking { candidate, .. } => {
                    let slot = &mut app.slots[step.slot];
                    let old = slot.worker();
                    slot.state = SlotState::Occupied(candidate);
                    rollout.promoted.push((step.slot, slot.generation));
                    slot.generation = rollout.generation;
                    slot.crash_streak = 0;
                    slot.last_restart = Some(format!("reload (generation {})", rollout.generation));
                    match old {
                        Some(old) => {
                            promoted_lines.push(format!(
                                "{name}[{}] generation {} ready; stopping the old worker",
                                step.slot, rollout.generation
                            ));
                            to_stop.push(old);
                            step.stage = Stage::Retiring(old);
                            true
                        }
                        None => false,
                    }
                }
                Stage::Retiring(old) => workers.get(&old).is_some_and(|w| w.is_running()),
            }
        });
        for line in promoted_lines {
            self.progress(name, &line);
        }
        for old in to_stop {
            self.stop(now, old, StopReason::Retired);
        }

        // Start the next slots, up to the surge.
        while rollout
            .active
            .iter()
            .filter(|s| s.candidate().is_some())
            .count()
            < surge
        {
            let Some(slot) = rollout.pending.pop_front() else {
                break;
            };
            let candidate = self.spawn(now, name, slot, rollout.generation);
            rollout.active.push(Step {
                slot,
                stage: Stage::Starting(candidate),
            });
        }

        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        if !rollout.pending.is_empty() || !rollout.active.is_empty() {
            app.rollout = Some(rollout);
            return;
        }
        app.last_reload = Some(ReloadOutcome::Completed {
            generation: rollout.generation,
        });
        let message = format!(
            "reload of {name} complete: {} workers on generation {}",
            app.slots.len(),
            rollout.generation
        );
        self.log(Level::INFO, message);
        self.push(Action::Observe(Observation::Reload {
            app: name.to_owned(),
            completed: true,
        }));
        self.prune_configs(name);
        if rollout.again {
            self.request_reload(now, Some(name));
        }
    }

    /// Stops a rollout: its candidates are stopped; old workers keep serving.
    pub(super) fn abort_rollout(&mut self, now: Instant, name: &str, reason: String) {
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        let Some(rollout) = app.rollout.take() else {
            return;
        };
        let doomed: Vec<WorkerId> = rollout.active.iter().filter_map(Step::candidate).collect();
        let kept: Vec<String> = app
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{i}:g{}", s.generation))
            .collect();
        app.last_reload = Some(ReloadOutcome::Aborted {
            generation: rollout.generation,
            reason: reason.clone(),
        });
        self.log(
            Level::ERROR,
            format!(
                "reload of {name} aborted: {reason}; old workers keep serving (slot:generation {})",
                kept.join(" ")
            ),
        );
        self.push(Action::Observe(Observation::Reload {
            app: name.to_owned(),
            completed: false,
        }));
        for id in doomed {
            self.stop(now, id, StopReason::Aborted);
        }
        self.prune_configs(name);
        if rollout.again {
            self.log(
                Level::INFO,
                "running the reload requested during the aborted rollout".into(),
            );
            self.request_reload(now, Some(name));
        }
    }

    /// Drops the configurations of generations nothing refers to any more.
    fn prune_configs(&mut self, name: &str) {
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        let mut live: Vec<u64> = app.slots.iter().map(|s| s.generation).collect();
        live.push(app.generation);
        live.extend(
            self.workers
                .values()
                .filter(|w| w.app == name)
                .map(|w| w.generation),
        );
        live.extend(app.rollout.as_ref().map(|r| r.generation));
        app.configs
            .retain(|generation, _| live.contains(generation));
    }
}
