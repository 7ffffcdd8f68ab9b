//! Control requests, one handler per command (the CLI's `control/client.rs` is the other side).
//! `reload --wait` registers a waiter that receives progress lines and, when the rollouts it
//! asked for have ended, their outcomes.

use clusterd_proto::{ErrorKind, Reply, Request};
use nix::sys::signal::killpg;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;

use super::Supervisor;
use super::status::app_reload;
use crate::control::server::{ControlRequest, error};

/// The most workers `scale` accepts for one app.
const MAX_WORKERS: usize = 4096;

/// A `reload --wait` client waiting for rollouts to end.
pub(super) struct ReloadWaiter {
    /// Each app and the generation whose outcome is awaited.
    targets: Vec<(String, u64)>,
    reply: UnboundedSender<Reply>,
}

impl Supervisor {
    /// Carries out one control request and replies.
    pub(super) fn on_control(&mut self, ControlRequest { request, reply }: ControlRequest) {
        let answer = match request {
            Request::Status {} => Ok(Some(Reply::Status(self.status()))),
            Request::Reload { app, wait } => self.reload_command(app, wait, &reply),
            Request::Restart { app, slot } => self.restart_command(&app, slot),
            Request::Scale { app, workers } => self.scale_command(&app, workers),
            Request::Signal { app, signal } => self.signal_command(&app, &signal),
            Request::Stop {} => {
                if !self.shutting_down {
                    self.begin_shutdown("stop requested");
                }
                Ok(Some(Reply::Done {
                    message: "stopping".into(),
                }))
            }
        };
        match answer {
            Ok(Some(line)) | Err(line) => {
                let _ = reply.send(line);
            }
            Ok(None) => {} // a waiter keeps the reply channel
        }
    }

    fn check_app(&self, app: &str) -> Result<(), Reply> {
        if self.apps.contains_key(app) {
            Ok(())
        } else {
            let known: Vec<&str> = self.apps.keys().map(String::as_str).collect();
            Err(error(
                ErrorKind::BadRequest,
                &format!("no app {app:?} (apps: {})", known.join(", ")),
            ))
        }
    }

    fn reload_command(
        &mut self,
        app: Option<String>,
        wait: bool,
        reply: &UnboundedSender<Reply>,
    ) -> Result<Option<Reply>, Reply> {
        if let Some(app) = &app {
            self.check_app(app)?;
        }
        if self.shutting_down {
            return Err(error(ErrorKind::BadRequest, "clusterd is shutting down"));
        }
        self.request_reload(app.as_deref());
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
        self.reload_waiters.push(ReloadWaiter {
            targets,
            reply: reply.clone(),
        });
        self.settle_waiters();
        Ok(None)
    }

    fn restart_command(&mut self, app: &str, slot: Option<usize>) -> Result<Option<Reply>, Reply> {
        self.check_app(app)?;
        let Some(index) = slot else {
            self.request_reload(Some(app));
            return Ok(Some(Reply::Done {
                message: format!("rolling restart of {app} started"),
            }));
        };
        let now = Instant::now();
        let state = self.apps.get_mut(app).expect("checked");
        let Some(slot) = state.slots.get_mut(index) else {
            return Err(error(
                ErrorKind::BadRequest,
                &format!("{app} has no slot {index} (it has {})", state.slots.len()),
            ));
        };
        slot.failed = None;
        slot.respawn_at = Some(now);
        let old = slot.current.take();
        if let Some(pid) = old {
            self.stop_worker(pid, now);
        }
        Ok(Some(Reply::Done {
            message: format!("restarting {app}[{index}]"),
        }))
    }

    fn scale_command(&mut self, app: &str, workers: usize) -> Result<Option<Reply>, Reply> {
        self.check_app(app)?;
        if workers > MAX_WORKERS {
            return Err(error(
                ErrorKind::BadRequest,
                &format!("at most {MAX_WORKERS} workers"),
            ));
        }
        self.scale(app, workers);
        Ok(Some(Reply::Done {
            message: format!("{app} scaled to {workers} workers"),
        }))
    }

    fn signal_command(&mut self, app: &str, signal: &str) -> Result<Option<Reply>, Reply> {
        self.check_app(app)?;
        let Some(signal) = clusterd_manifest::parse_signal(signal) else {
            return Err(error(
                ErrorKind::BadRequest,
                &format!("unknown signal {signal:?}"),
            ));
        };
        let mut sent = 0;
        for (pid, worker) in &self.workers {
            if worker.app == app && worker.exited.is_none() && killpg(*pid, signal).is_ok() {
                sent += 1;
            }
        }
        Ok(Some(Reply::Done {
            message: format!("sent {} to {sent} workers of {app}", signal.as_str()),
        }))
    }

    /// Sends a progress line to the waiters interested in `app`.
    pub(super) fn progress(&mut self, app: &str, message: &str) {
        self.reload_waiters.retain(|waiter| {
            if waiter.targets.iter().any(|(name, _)| name == app) {
                waiter
                    .reply
                    .send(Reply::Progress {
                        message: message.to_owned(),
                    })
                    .is_ok()
            } else {
                !waiter.reply.is_closed()
            }
        });
    }

    /// Answers the waiters whose rollouts have all ended.
    pub(super) fn settle_waiters(&mut self) {
        let apps = &self.apps;
        let shutting_down = self.shutting_down;
        self.reload_waiters.retain(|waiter| {
            let mut outcomes = Vec::new();
            for (name, target) in &waiter.targets {
                match apps.get(name).and_then(|a| a.last_reload.as_ref()) {
                    Some(outcome) if outcome.generation() >= *target => {
                        outcomes.push(app_reload(name, outcome))
                    }
                    _ if shutting_down || !apps.contains_key(name) => {
                        outcomes.push(clusterd_proto::AppReload {
                            app: name.clone(),
                            outcome: clusterd_proto::ReloadResult::Aborted,
                            generation: *target,
                            reason: Some("clusterd is shutting down or the app was removed".into()),
                        })
                    }
                    _ => return !waiter.reply.is_closed(),
                }
            }
            let _ = waiter.reply.send(Reply::Reloaded { outcomes });
            false
        });
    }
}
