//! Rolling reload. For each slot: start the next generation's worker (the candidate), wait
//! until it is ready, promote it, stop the old worker and wait for it to exit. The pace
//! ([`Pace`]): by default the first `reload.surge` slots are the canary, whose new workers
//! must stay up for `reload.bake` before they are promoted; after them a new worker is promoted
//! as soon as it is ready, with as many candidates in flight as slots promoted so far (at
//! least `surge`: the batches double), and the rollout completes once its last promoted worker
//! has been ready for `bake`. With `bake_each = true`, every new worker bakes, `surge` at a
//! time. Either way a slot's old worker stops only once its new one is ready, so every slot
//! that was serving keeps a ready worker throughout.
//!
//! Fail-safe: **any** exit of a new-generation worker before the rollout has completed aborts
//! it — a candidate's (before or after READY=1), and a promoted worker's too. On abort the
//! candidates are stopped, the old workers not yet replaced keep serving, promoted slots whose
//! new worker is alive keep it, and a promoted slot whose new worker died goes back to the
//! generation (and configuration) it had (as does, once its new worker ends, a promoted slot
//! whose new worker outlived the abort). Requests that arrive during a rollout coalesce into
//! one more rollout after it.
//!
//! A slot whose one-shot worker had finished (`SlotState::Done`) runs the new generation
//! again; that run finishing as its restart policy allows (exit 0) completes its step.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::event::Level;
use clusterd_manifest::RestartPolicy;
use serde::{Deserialize, Serialize};

use super::backoff::End;
use super::core::{Core, about};
use super::event::{Action, Notice, Observation, What};
use super::state::{Phase, ReloadOutcome, SlotState, StopReason, WorkerId, human};

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
    /// How it paces itself.
    #[serde(default)]
    pace: Pace,
    /// Canary slots not promoted yet (with [`Pace::Canary`]).
    #[serde(default)]
    canary: Vec<usize>,
    /// Slots whose one-shot worker had finished when their step began: a run of the new
    /// generation that finishes too completes the step instead of aborting the rollout.
    #[serde(default)]
    reruns: Vec<usize>,
    /// The latest moment a promoted new worker has been ready for `bake`: the rollout
    /// completes no earlier.
    #[serde(default, with = "crate::time::opt_instant")]
    settle: Option<Instant>,
}

/// How a rollout paces itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
enum Pace {
    /// `bake_each = true` (and rollouts handed over by an older clusterd): every new worker
    /// bakes before its old worker stops, `surge` slots at a time.
    #[default]
    Each,
    /// The canary (the first `surge` slots) bakes; then each new worker is promoted once
    /// ready, with as many in flight as slots promoted so far (at least `surge`).
    Canary,
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
        #[serde(with = "crate::time::instant")]
        until: Instant,
    },
    /// The candidate was promoted; the old worker is stopping.
    Retiring(WorkerId),
}

impl Rollout {
    fn new(generation: u64, slots: usize, surge: usize, bake_each: bool) -> Self {
        let pace = if bake_each { Pace::Each } else { Pace::Canary };
        Rollout {
            generation,
            pending: (0..slots).collect(),
            active: Vec::new(),
            promoted: Vec::new(),
            again: false,
            pace,
            canary: match pace {
                Pace::Canary => (0..slots.min(surge.max(1))).collect(),
                Pace::Each => Vec::new(),
            },
            reruns: Vec::new(),
            settle: None,
        }
    }

    /// Whether `slot`'s step re-runs a finished one-shot worker.
    pub fn reruns(&self, slot: usize) -> bool {
        self.reruns.contains(&slot)
    }

    /// How many candidates may be in flight.
    fn window(&self, surge: usize) -> usize {
        match self.pace {
            Pace::Canary if self.canary.is_empty() => surge.max(self.promoted.len()),
            Pace::Canary | Pace::Each => surge,
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
        self.canary.retain(|s| *s < first);
        self.reruns.retain(|s| *s < first);
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

    /// When the next candidate has baked, or, once every slot is done, when the last promoted
    /// worker has.
    pub fn next_deadline(&self) -> Option<Instant> {
        let settle = self
            .settle
            .filter(|_| self.pending.is_empty() && self.active.is_empty());
        self.active
            .iter()
            .filter_map(|s| match s.stage {
                Stage::Baking { until, .. } => Some(until),
                _ => None,
            })
            .chain(settle)
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
                let generation = rollout.generation;
                self.push_notice(Notice {
                    level: Level::Info,
                    app: Some(name.clone()),
                    slot: None,
                    pid: None,
                    generation: Some(generation),
                    what: What::ReloadQueued,
                });
                continue;
            }
            let config = app
                .next_config
                .take()
                .unwrap_or_else(|| Arc::clone(app.latest()));
            app.generation += 1;
            let generation = app.generation;
            let reload = config.reload;
            app.configs.insert(generation, config);
            app.rollout = Some(Rollout::new(
                generation,
                app.slots.len(),
                reload.surge,
                reload.bake_each,
            ));
            let workers = app.slots.len();
            self.push_notice(Notice {
                level: Level::Info,
                app: Some(name.clone()),
                slot: None,
                pid: None,
                generation: Some(generation),
                what: What::RolloutStarted { workers },
            });
            self.advance_rollout(&name, now);
        }
    }

    /// Watched files of `app` changed: a rollout, or one more after the one in progress
    /// (coalesced as any reload request). Nothing while shutting down or for an app that is gone.
    pub(super) fn on_files_changed(&mut self, now: Instant, app: &str, path: String, count: usize) {
        if self.shutting_down || !self.apps.contains_key(app) {
            return;
        }
        let generation = self.apps[app].generation;
        self.push_notice(Notice {
            level: Level::Info,
            app: Some(app.to_owned()),
            slot: None,
            pid: None,
            generation: Some(generation),
            what: What::WatchReload { path, count },
        });
        self.request_reload(now, Some(app));
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
            // A baking candidate that is no longer ready (killed by its watchdog, its exit
            // not reaped yet) is never promoted: its exit will abort the rollout.
            if let Stage::Baking { candidate, .. } = step.stage
                && !workers.get(&candidate).is_some_and(|w| w.is_ready())
            {
                step.stage = Stage::Starting(candidate);
            }
            if let Stage::Starting(candidate) = step.stage
                && let Some(Phase::Ready { since, .. }) = workers.get(&candidate).map(|w| w.phase)
            {
                let baking = match rollout.pace {
                    Pace::Each => true,
                    Pace::Canary => rollout.canary.contains(&step.slot),
                };
                step.stage = Stage::Baking {
                    candidate,
                    until: since + if baking { bake } else { Duration::ZERO },
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
                    rollout.canary.retain(|s| *s != step.slot);
                    // It must stay up for `bake` before the rollout completes.
                    let since = match workers.get(&candidate).map(|w| w.phase) {
                        Some(Phase::Ready { since, .. }) => since,
                        _ => now,
                    };
                    rollout.settle = rollout.settle.max(Some(since + bake));
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

        // Start the next slots, up to the window.
        while rollout
            .active
            .iter()
            .filter(|s| s.candidate().is_some())
            .count()
            < rollout.window(surge)
        {
            let Some(slot) = rollout.pending.pop_front() else {
                break;
            };
            if self.apps[name]
                .slots
                .get(slot)
                .is_some_and(|s| matches!(s.state, SlotState::Done { .. }))
            {
                rollout.reruns.push(slot);
            }
            let candidate = self.spawn(now, name, slot, rollout.generation);
            rollout.active.push(Step {
                slot,
                stage: Stage::Starting(candidate),
            });
        }

        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        if !rollout.pending.is_empty()
            || !rollout.active.is_empty()
            || rollout.settle.is_some_and(|at| at > now)
        {
            app.rollout = Some(rollout);
            return;
        }
        app.last_reload = Some(ReloadOutcome::Completed {
            generation: rollout.generation,
        });
        let workers = app.slots.len();
        self.push_notice(Notice {
            level: Level::Info,
            app: Some(name.to_owned()),
            slot: None,
            pid: None,
            generation: Some(rollout.generation),
            what: What::RolloutDone { workers },
        });
        self.push(Action::Observe(Observation::Reload {
            app: name.to_owned(),
            completed: true,
        }));
        self.prune_configs(name);
        if rollout.again {
            self.request_reload(now, Some(name));
        }
    }

    /// A candidate re-running a finished one-shot slot ended as its restart policy allows
    /// (exit 0, not `restart = "always"`): the slot is done on the new generation. Returns
    /// whether that was the case (otherwise the exit aborts the rollout).
    pub(super) fn finish_rerun(&mut self, id: WorkerId, end: &End) -> bool {
        let Some(worker) = self.workers.get(&id) else {
            return false;
        };
        let index = worker.slot;
        let finished = end.status.success() && worker.config.restart != RestartPolicy::Always;
        let Some(app) = self.apps.get_mut(&worker.app) else {
            return false;
        };
        let Some(rollout) = app.rollout.as_mut() else {
            return false;
        };
        let Some(slot) = app.slots.get_mut(index) else {
            return false;
        };
        if !finished
            || !rollout.reruns(index)
            || rollout.candidate(index) != Some(id)
            || !matches!(slot.state, SlotState::Done { .. })
        {
            return false;
        }
        rollout.active.retain(|s| s.slot != index);
        rollout.canary.retain(|s| *s != index);
        rollout.promoted.push((index, slot.generation));
        slot.generation = rollout.generation;
        slot.state = SlotState::Done { code: Some(0) };
        slot.last_exit = Some(format!("{} after {}", end.status, human(end.uptime)));
        if let Some(worker) = self.workers.get(&id) {
            let notice = about(worker, Level::Info, What::RerunDone { uptime: end.uptime });
            self.push_notice(notice);
        }
        true
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
        let kept: Vec<u64> = app.slots.iter().map(|s| s.generation).collect();
        // Promoted slots keep their live new workers, but a slot whose new worker ends later
        // goes back to the generation it had, as if it had died before the abort: with the
        // rollout no longer watching, a broken version must not be respawned.
        for (index, previous) in &rollout.promoted {
            if let Some(slot) = app.slots.get_mut(*index)
                && matches!(slot.state, SlotState::Occupied(_))
            {
                slot.generation = *previous;
            }
        }
        app.last_reload = Some(ReloadOutcome::Aborted {
            generation: rollout.generation,
            reason: reason.clone(),
        });
        self.push_notice(Notice {
            level: Level::Error,
            app: Some(name.to_owned()),
            slot: None,
            pid: None,
            generation: Some(rollout.generation),
            what: What::Aborted { reason, kept },
        });
        self.push(Action::Observe(Observation::Reload {
            app: name.to_owned(),
            completed: false,
        }));
        for id in doomed {
            self.stop(now, id, StopReason::Aborted);
        }
        self.prune_configs(name);
        if rollout.again {
            self.push_notice(Notice {
                level: Level::Info,
                app: Some(name.to_owned()),
                slot: None,
                pid: None,
                generation: None,
                what: What::ReloadAfterAbort,
            });
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
