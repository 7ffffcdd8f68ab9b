//! What clusterd tells the world it runs in, decided from the core: whether the host is
//! ready (for `READY=1`, `/readyz` and `clusterd status --check`), the one-line summary
//! (`STATUS=`), and the sequence of sd_notify messages to clusterd's own manager
//! ([`HostNotifier`]: `READY=1` once every app is up at start, `RELOADING=1` … `READY=1`
//! around a SIGHUP re-read or a rollout, `STATUS=` when the summary changes, `STOPPING=1`).
//! Pure: the driver sends what this decides (through `crate::manager`).

use super::core::Core;
use super::state::{App, Phase, SlotState, StopReason};

/// Why the host is not ready, for `/readyz` and `clusterd status --check`.
pub type NotReady = String;

impl Core {
    /// Serving workers of `app` that are ready.
    fn ready_workers(&self, app: &App) -> usize {
        app.slots
            .iter()
            .filter_map(|s| self.workers.get(&s.worker()?))
            .filter(|w| w.is_running() && w.is_ready())
            .count()
    }

    /// `Ok` when every slot that should be up has a ready worker, no rollout is aborting (its
    /// new workers still stopping) and clusterd is not shutting down; otherwise why not. A slot
    /// that is down by its restart policy (a finished one-shot: [`SlotState::Done`]) should not
    /// be up; a `failed` slot (`restart_limit`, a command that cannot run) should, and is
    /// named.
    pub fn readiness(&self) -> Result<(), NotReady> {
        if self.shutting_down {
            return Err("clusterd is shutting down".into());
        }
        let mut reasons = Vec::new();
        for (name, app) in &self.apps {
            let ready = self.ready_workers(app);
            let wanted = wanted(app);
            if ready < wanted {
                let failed: Vec<String> = app
                    .slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| matches!(s.state, SlotState::Failed { .. }))
                    .map(|(i, _)| i.to_string())
                    .collect();
                let failed = match failed.as_slice() {
                    [] => String::new(),
                    [one] => format!(" (slot {one} failed)"),
                    many => format!(" (slots {} failed)", many.join(", ")),
                };
                reasons.push(format!("{name}: {ready}/{wanted} workers ready{failed}"));
            }
            let aborting = self.workers.values().any(|w| {
                w.app == *name
                    && matches!(
                        w.phase,
                        Phase::Stopping {
                            why: StopReason::Aborted,
                            ..
                        }
                    )
            });
            if aborting {
                reasons.push(format!("{name}: a rollout is aborting"));
            }
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons.join("; "))
        }
    }

    /// One line for `STATUS=`: `web 4/4 ready, kv 3/4 ready (reload g2 1/4), migrate 0/0
    /// ready (1 done)`.
    pub fn summary(&self) -> String {
        let apps: Vec<String> = self
            .apps
            .iter()
            .map(|(name, app)| {
                let mut line = format!("{name} {}/{} ready", self.ready_workers(app), wanted(app));
                let done = app.slots.len() - wanted(app);
                if done > 0 {
                    line.push_str(&format!(" ({done} done)"));
                }
                if let Some(rollout) = &app.rollout {
                    let (done, total) = rollout.progress();
                    line.push_str(&format!(" (reload g{} {done}/{total})", rollout.generation));
                }
                line
            })
            .collect();
        let apps = if apps.is_empty() {
            "no apps".to_owned()
        } else {
            apps.join(", ")
        };
        if self.shutting_down {
            format!("stopping: {apps}")
        } else {
            apps
        }
    }

    /// True while some app rolls to a new generation.
    fn rolling(&self) -> bool {
        self.apps.values().any(|a| a.rollout.is_some())
    }
}

/// How many of `app`'s slots should be up: all but those down by their restart policy.
pub(super) fn wanted(app: &App) -> usize {
    app.slots
        .iter()
        .filter(|s| !matches!(s.state, SlotState::Done { .. }))
        .count()
}

/// A message for clusterd's own manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMessage {
    /// `READY=1`: started (or done reloading).
    Ready,
    /// `RELOADING=1` (with `MONOTONIC_USEC=`, added by the sender).
    Reloading,
    /// `STOPPING=1`.
    Stopping,
    /// `STATUS=` this line.
    Status(String),
}

/// Where clusterd stands with its manager.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Not every app has been up yet: no `READY=1` so far.
    #[default]
    Starting,
    /// `READY=1` was sent.
    Ready,
    /// `RELOADING=1` was sent; `READY=1` follows when no rollout is left.
    Reloading,
    /// `STOPPING=1` was sent.
    Stopping,
}

/// Decides which messages to send, from the core after each event.
#[derive(Debug, Default)]
pub struct HostNotifier {
    stage: Stage,
    /// A SIGHUP (or other reload) was seen since the last update.
    reload_seen: bool,
    /// The last `STATUS=` sent.
    status: Option<String>,
}

impl HostNotifier {
    /// A SIGHUP re-read (or another reload the manager may have asked for) was handled:
    /// the manager hears `RELOADING=1` and then `READY=1`, even when nothing changed.
    pub fn reload_seen(&mut self) {
        self.reload_seen = true;
    }

    /// The messages due now that the core is in its present state.
    pub fn update(&mut self, core: &Core) -> Vec<HostMessage> {
        let mut out = Vec::new();
        let reload_seen = std::mem::take(&mut self.reload_seen);
        if core.shutting_down() {
            if self.stage != Stage::Stopping {
                self.stage = Stage::Stopping;
                out.push(HostMessage::Stopping);
            }
        } else {
            if self.stage == Stage::Starting && core.readiness().is_ok() {
                self.stage = Stage::Ready;
                out.push(HostMessage::Ready);
            }
            if self.stage == Stage::Ready && (reload_seen || core.rolling()) {
                self.stage = Stage::Reloading;
                out.push(HostMessage::Reloading);
            }
            if self.stage == Stage::Reloading && !core.rolling() {
                self.stage = Stage::Ready;
                out.push(HostMessage::Ready);
            }
        }
        let summary = core.summary();
        if self.status.as_ref() != Some(&summary) {
            self.status = Some(summary.clone());
            out.push(HostMessage::Status(summary));
        }
        out
    }
}
