//! Worker messaging, the core's half (`ipc`): what a message from a worker means (readiness
//! for `ready = "message"`, a broadcast to the app's other workers with `ipc_broadcast`), and
//! `clusterd send`. The channels themselves are `crate::ipc`'s, in the driver.

use std::sync::Arc;
use std::time::Instant;

use clusterd_proto::{ErrorKind, Reply};

use super::core::Core;
use super::event::{Action, Observation};
use super::state::{Phase, WorkerId};

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
            .ok_or_else(|| Reply::error(ErrorKind::BadRequest, &format!("no app {app:?}")))?;
        if !state.latest().ipc {
            return Err(Reply::error(
                ErrorKind::BadRequest,
                &format!("{app} has no message channel (set ipc = true)"),
            ));
        }
        let targets: Vec<WorkerId> = match slot {
            None => self.listeners(app).collect(),
            Some(index) => {
                let Some(slot) = state.slots.get(index) else {
                    return Err(Reply::error(
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
            return Err(Reply::error(
                ErrorKind::BadRequest,
                &format!("{whom}: no worker with an open channel"),
            ));
        }
        Ok(Some(Reply::Done {
            message: format!("sent to {whom}"),
        }))
    }
}

/// What a line on a worker's channel (`ipc`) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line {
    /// Not JSON (or blank): dropped.
    Malformed,
    /// One of Node's own `{"cmd":"NODE_..."}`; `handle` for `NODE_HANDLE`, which needs an ACK.
    Internal {
        /// It is a `NODE_HANDLE`.
        handle: bool,
    },
    /// A message for the supervisor.
    Message {
        /// It is a readiness signal.
        ready: bool,
    },
}

/// Classifies one line (without its newline).
pub fn classify(line: &[u8]) -> Line {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(line) else {
        return Line::Malformed;
    };
    if let Some(cmd) = value.get("cmd").and_then(serde_json::Value::as_str)
        && cmd.starts_with("NODE_")
    {
        return Line::Internal {
            handle: cmd == "NODE_HANDLE",
        };
    }
    let ready = value.as_str() == Some("ready")
        || value.get("type").and_then(serde_json::Value::as_str) == Some("ready");
    Line::Message { ready }
}

/// Parses an sd_notify datagram's newline-separated `KEY=value` assignments; lines without `=` are ignored.
pub fn parse_notify(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}
