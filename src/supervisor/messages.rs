//! Worker messaging, the core's half (`ipc`): what a message from a worker means (readiness
//! for `ready = "message"`, a broadcast to the app's other workers with `ipc_broadcast`), and
//! `clusterd send`. The channels themselves are `crate::ipc`'s, in the driver.

use std::sync::Arc;
use std::time::Instant;

use clusterd_proto::{ErrorKind, Reply};

use super::core::Core;
use super::event::{Action, Observation};
use super::state::{Phase, WorkerId};
use crate::control::server::error;

impl Core {
    /// A message from a worker: counted and kept for status; `"ready"` makes a starting
    /// worker ready (as `READY=1` does, whatever its `ready` mode); any other message is
    /// forwarded to the app's other workers with `ipc_broadcast`. Readiness messages are
    /// the supervisor's and are not forwarded.
    pub(super) fn on_message(&mut self, now: Instant, id: WorkerId, text: Arc<str>, ready: bool) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        worker.inbox.record(&text);
        let (app, broadcast) = (worker.app.clone(), worker.config.ipc_broadcast);
        let starting = matches!(worker.phase, Phase::Starting { .. });
        self.push(Action::Observe(Observation::Message { app: app.clone() }));
        if ready {
            if starting {
                self.become_ready(now, id);
            }
            return;
        }
        if broadcast {
            for other in self
                .listeners(&app)
                .filter(|other| *other != id)
                .collect::<Vec<_>>()
            {
                self.push(Action::Deliver {
                    worker: other,
                    text: Arc::clone(&text),
                });
            }
        }
    }

    /// The workers of `app` whose channel is open: started and not told to stop (a retiring
    /// worker of a `drain` app still listens; a disconnected one does not).
    fn listeners<'a>(&'a self, app: &'a str) -> impl Iterator<Item = WorkerId> + 'a {
        self.workers.iter().filter_map(move |(id, w)| {
            let open = match w.phase {
                Phase::Starting { .. } | Phase::Ready { .. } => true,
                Phase::Draining { .. } => !w.config.stop_disconnect,
                Phase::Spawning | Phase::Stopping { .. } => false,
            };
            (w.app == app && w.config.ipc && open).then_some(*id)
        })
    }

    /// `clusterd send APP[:SLOT] JSON`: the message goes to the slot's worker, or to every
    /// worker of the app whose channel is open.
    pub(super) fn send_command(
        &mut self,
        app: &str,
        slot: Option<usize>,
        message: &serde_json::Value,
    ) -> Result<Option<Reply>, Reply> {
        let state = self
            .apps
            .get(app)
            .ok_or_else(|| error(ErrorKind::BadRequest, &format!("no app {app:?}")))?;
        if !state.latest().ipc {
            return Err(error(
                ErrorKind::BadRequest,
                &format!("{app} has no message channel (set ipc = true)"),
            ));
        }
        let targets: Vec<WorkerId> = match slot {
            None => self.listeners(app).collect(),
            Some(index) => {
                let Some(slot) = state.slots.get(index) else {
                    return Err(error(
                        ErrorKind::BadRequest,
                        &format!("{app} has no slot {index} (it has {})", state.slots.len()),
                    ));
                };
                let id = slot.worker();
                self.listeners(app).filter(|w| Some(*w) == id).collect()
            }
        };
        let text: Arc<str> = Arc::from(message.to_string());
        let sent = targets.len();
        for worker in targets {
            self.push(Action::Deliver {
                worker,
                text: Arc::clone(&text),
            });
        }
        let whom = match slot {
            Some(index) => format!("{app}[{index}]"),
            None => format!("{sent} workers of {app}"),
        };
        if sent == 0 {
            return Err(error(
                ErrorKind::BadRequest,
                &format!("{whom}: no worker with an open channel"),
            ));
        }
        Ok(Some(Reply::Done {
            message: format!("sent to {whom}"),
        }))
    }
}
