//! Control requests that change something, one handler per command (the CLI's
//! `control/client.rs` is the other side; `status` is a read-only view in `status.rs`).
//! `reload --wait` registers a waiter that receives progress lines and, when the rollouts it
//! asked for have ended, their outcomes.

use std::time::Instant;

use clusterd_proto::{AppReload, ErrorKind, ReloadResult, Reply, Request};

use super::core::Core;
use super::event::{Action, ReplyTo};
use super::state::{SlotState, StopReason};
use super::status::app_reload;

/// The most workers `scale` accepts for one app.
const MAX_WORKERS: usize = 4096;

/// A `reload --wait` client waiting for rollouts to end.
#[derive(Debug)]
pub struct Waiter {
    /// Each app and the generation whose outcome is awaited.
    targets: Vec<(String, u64)>,
    reply: ReplyTo,
}

impl Core {
    /// Carries out one control request and replies.
    pub(super) fn on_control(&mut self, now: Instant, request: Request, reply: ReplyTo) {
        let answer = match request {
            Request::Status {} | Request::Logs { .. } | Request::Upgrade { .. } => {
                Err(Reply::error(
                    ErrorKind::BadRequest,
                    "status, logs and upgrade are answered outside the core",
                ))
            }
            Request::Reload { app, wait } => self.reload_command(now, app, wait, reply),
            Request::Restart { app, slot } => self.restart_command(now, &app, slot),
            Request::Scale { app, workers } => self.scale_command(now, &app, workers),
            Request::Signal { app, signal } => self.signal_command(&app, &signal),
            Request::Send { app, slot, message } => self.send_command(&app, slot, &message),
            Request::Stop {} => {
                if !self.shutting_down {
                    self.begin_shutdown(now, "stop requested");
                }
                Ok(Some(Reply::Done {
                    message: "stopping".into(),
                }))
            }
        };
        match answer {
            Ok(Some(line)) | Err(line) => self.push(Action::Reply {
                to: reply,
                reply: line,
            }),
            Ok(None) => {} // a waiter keeps the reply handle
        }
    }

    fn check_app(&self, app: &str) -> Result<(), Reply> {
        if self.apps.contains_key(app) {
            Ok(())
        } else {
            let known: Vec<&str> = self.apps.keys().map(String::as_str).collect();
            Err(Reply::error(
                ErrorKind::BadRequest,
                &format!("no app {app:?} (apps: {})", known.join(", ")),
            ))
        }
    }

    fn reload_command(
        &mut self,
        now: Instant,
        app: Option<String>,
        wait: bool,
        reply: ReplyTo,
    ) -> Result<Option<Reply>, Reply> {
        if let Some(app) = &app {
            self.check_app(app)?;
        }
        if self.shutting_down {
            return Err(Reply::error(
                ErrorKind::BadRequest,
                "clusterd is shutting down",
            ));
        }
        self.request_reload(now, app.as_deref());
        let names: Vec<String> = match app {
            Some(app) => vec![app],
            None => self.apps.keys().cloned().collect(),
        };
        if !wait {
            return Ok(Some(Reply::Done {
                message: format!("reload of {} started", names.join(", ")),
            }));
        }
        let targets = names
            .into_iter()
            .map(|name| {
                let app = &self.apps[&name];
                let target = match &app.rollout {
                    Some(rollout) if rollout.again => rollout.generation + 1,
                    Some(rollout) => rollout.generation,
                    None => app.generation,
                };
                (name, target)
            })
            .collect();
        self.waiters.push(Waiter { targets, reply });
        Ok(None)
    }

    fn restart_command(
        &mut self,
        now: Instant,
        app: &str,
        slot: Option<usize>,
    ) -> Result<Option<Reply>, Reply> {
        self.check_app(app)?;
        if self.shutting_down {
            return Err(Reply::error(
                ErrorKind::BadRequest,
                "clusterd is shutting down",
            ));
        }
        let Some(index) = slot else {
            self.request_reload(now, Some(app));
            return Ok(Some(Reply::Done {
                message: format!("rolling restart of {app} started"),
            }));
        };
        let Some(state) = self.apps.get_mut(app) else {
            return Err(Reply::error(
                ErrorKind::BadRequest,
                &format!("no app {app:?}"),
            ));
        };
        let count = state.slots.len();
        let Some(slot) = state.slots.get_mut(index) else {
            return Err(Reply::error(
                ErrorKind::BadRequest,
                &format!("{app} has no slot {index} (it has {count})"),
            ));
        };
        let old = slot.worker();
        slot.state = SlotState::Backoff { until: now };
        slot.crash_streak = 0;
        slot.recent_restarts.clear();
        slot.last_restart = Some("operator (clusterd restart)".into());
        if let Some(old) = old {
            self.stop(now, old, StopReason::Retired);
        }
        Ok(Some(Reply::Done {
            message: format!("restarting {app}[{index}]"),
        }))
    }

    fn scale_command(
        &mut self,
        now: Instant,
        app: &str,
        workers: usize,
    ) -> Result<Option<Reply>, Reply> {
        self.check_app(app)?;
        if workers > MAX_WORKERS {
            return Err(Reply::error(
                ErrorKind::BadRequest,
                &format!("at most {MAX_WORKERS} workers"),
            ));
        }
        if self.shutting_down {
            return Err(Reply::error(
                ErrorKind::BadRequest,
                "clusterd is shutting down",
            ));
        }
        self.scale(now, app, workers);
        Ok(Some(Reply::Done {
            message: format!("{app} scaled to {workers} workers"),
        }))
    }

    fn signal_command(&mut self, app: &str, signal: &str) -> Result<Option<Reply>, Reply> {
        self.check_app(app)?;
        let Some(signal) = clusterd_manifest::parse_signal(signal) else {
            return Err(Reply::error(
                ErrorKind::BadRequest,
                &format!("unknown signal {signal:?}"),
            ));
        };
        let targets: Vec<_> = self
            .workers
            .iter()
            .filter(|(_, w)| w.app == app && w.is_running())
            .filter_map(|(id, w)| Some((*id, w.pid?)))
            .collect();
        let sent = targets.len();
        for (worker, pid) in targets {
            self.push(Action::Signal {
                worker,
                pid,
                signal,
            });
        }
        Ok(Some(Reply::Done {
            message: format!("sent {} to {sent} workers of {app}", signal.as_str()),
        }))
    }

    /// Sends a progress line to the waiters interested in `app`.
    pub(super) fn progress(&mut self, app: &str, message: &str) {
        let to: Vec<ReplyTo> = self
            .waiters
            .iter()
            .filter(|w| w.targets.iter().any(|(name, _)| name == app))
            .map(|w| w.reply)
            .collect();
        for to in to {
            self.push(Action::Reply {
                to,
                reply: Reply::Progress {
                    message: message.to_owned(),
                },
            });
        }
    }

    /// Answers the waiters whose rollouts have all ended.
    pub(super) fn settle_waiters(&mut self) {
        let mut settled = Vec::new();
        self.waiters.retain(|waiter| {
            let mut outcomes = Vec::new();
            for (name, target) in &waiter.targets {
                match self.apps.get(name).and_then(|a| a.last_reload.as_ref()) {
                    Some(outcome) if outcome.generation() >= *target => {
                        outcomes.push(app_reload(name, outcome))
                    }
                    _ if self.shutting_down || !self.apps.contains_key(name) => {
                        outcomes.push(AppReload {
                            app: name.clone(),
                            outcome: ReloadResult::Aborted,
                            generation: *target,
                            reason: Some("clusterd is shutting down or the app was removed".into()),
                        })
                    }
                    _ => return true,
                }
            }
            settled.push(Action::Reply {
                to: waiter.reply,
                reply: Reply::Reloaded { outcomes },
            });
            false
        });
        for action in settled {
            self.push(action);
        }
    }
}
