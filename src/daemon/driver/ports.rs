//! Ports found by themselves: an intercepted worker's `bind()` of a TCP address that no
//! socket declares is answered as Node's cluster primary answers its workers. The first such
//! bind of an app makes clusterd bind the address itself (the defaults of `[sockets.*]`,
//! `IPV6_V6ONLY` as the worker set it), name it `port-PORT`, say so (`port_bound`) and show it
//! in status; that bind and every later one of the app's workers get the same socket, or
//! under `drain` a steered socket of the worker's own on it. The socket is held like a
//! declared one: it outlives every worker (a reload keeps its accept queue), crosses
//! `clusterd upgrade`, and is closed when its app is removed by SIGHUP or clusterd exits.
//!
//! A port another app holds (bound on demand or declared) is refused with `EADDRINUSE`, and
//! every failure to bind (`EADDRINUSE` from another process, `EACCES` below 1024) is the
//! worker's `bind()`'s errno, logged (`port_refused`) with who holds the port.

use std::net::SocketAddr;

use clusterd_core::state::Phase;
use clusterd_core::{Level, Notice, What};
use clusterd_manifest::{Listen, SocketConfig};

use super::*;
use crate::daemon::intercept::Unmatched;
use crate::daemon::sockets;

impl Driver {
    /// Answers a worker's `bind()` that matched none of its app's sockets.
    pub(super) fn on_unmatched(&mut self, core: &Core, request: Unmatched) {
        let answer = self.port_for(core, &request);
        self.intercepts.answer_unmatched(&request, answer);
    }

    /// The socket for `request`'s worker (bound now if its app has none on that address
    /// yet), or the errno its `bind()` fails with.
    fn port_for(&mut self, core: &Core, request: &Unmatched) -> Result<intercept::Held, i32> {
        let Some(worker) = core.worker(request.worker) else {
            return Err(libc::EADDRNOTAVAIL);
        };
        let (app, slot, address) = (worker.app.as_str(), worker.slot, request.address);
        let notice = |level, what| Notice {
            level,
            app: Some(app.to_owned()),
            slot: Some(slot),
            pid: worker.pid,
            generation: Some(worker.generation),
            what,
        };
        let name = match self.on_demand_socket(app, address, request.v6only) {
            Ok(Some(name)) => name,
            Ok(None) => {
                // Steered as a declared socket of the app would be (its `balance`, where the
                // host can); a v6-only bind keeps the shared socket (steered sockets are
                // dual-stack).
                let steered = worker.config.balance.is_steered()
                    && !request.v6only
                    && steering::available(worker.config.drain.is_some());
                match self
                    .sockets
                    .bind_on_demand(app, address, request.v6only, steered)
                {
                    Ok(name) => {
                        if steered {
                            self.steered.insert(name.clone());
                        }
                        self.logs.event(&notice(
                            Level::Info,
                            What::PortBound {
                                socket: name.clone(),
                                address: address.to_string(),
                                steered,
                            },
                        ));
                        name
                    }
                    Err(error) => {
                        self.logs.event(&notice(
                            Level::Warn,
                            What::PortRefused {
                                address: address.to_string(),
                                reason: Chain(&error.cause).to_string(),
                            },
                        ));
                        return Err(error.errno);
                    }
                }
            }
            Err(holder) => {
                self.logs.event(&notice(
                    Level::Warn,
                    What::PortRefused {
                        address: address.to_string(),
                        reason: format!("address in use: the port is {holder}"),
                    },
                ));
                return Err(libc::EADDRINUSE);
            }
        };
        let errno = |error: std::io::Error| error.raw_os_error().unwrap_or(libc::EADDRNOTAVAIL);
        let Some(socket) = self.sockets.get(&name) else {
            return Err(libc::EADDRNOTAVAIL);
        };
        let local = socket.local_addr().unwrap_or(address);
        let fd = if self.steered.contains(&name) {
            let config = SocketConfig::with_defaults(Listen::Tcp(local));
            let policy = steering::Policy {
                balance: worker.config.balance,
                slots: worker.config.workers,
            };
            let fd = self
                .steering
                .socket_for(&name, (request.worker, slot), local, &config, policy)
                .map_err(|error| {
                    tracing::warn!(
                        event = "steering_failed",
                        app,
                        slot,
                        "socket {name}: no steered socket for {app}[{slot}]: {error}"
                    );
                    errno(error)
                })?;
            // Its `listen()` will not make it ready again: it serves on this socket at once.
            if matches!(worker.phase, Phase::Ready { .. }) {
                self.steering.set_serving(request.worker, true);
            }
            fd
        } else {
            socket.try_clone_fd().map_err(errno)?
        };
        intercept::Held::new(&name, &Listen::Tcp(local), fd).map_err(errno)
    }

    /// The socket of `app` bound on demand that a bind of `address` gets (`Ok(None)`: none
    /// yet), or `Err` naming whose the port is: another app's, or a declared socket.
    fn on_demand_socket(
        &self,
        app: &str,
        address: SocketAddr,
        v6only: bool,
    ) -> Result<Option<String>, String> {
        for (name, socket) in self.sockets.iter() {
            let Some(local) = socket.local_addr() else {
                continue;
            };
            if !sockets::overlaps(local, socket.only_v6(), address, v6only) {
                continue;
            }
            return match &socket.on_demand {
                Some(bound) if bound.app == app => Ok(Some(name.clone())),
                Some(bound) => Err(format!("socket {name}, bound for app {}", bound.app)),
                None => Err(format!("socket {name} of the manifest")),
            };
        }
        Ok(None)
    }

    /// After a re-read: closes the sockets bound on demand for apps the manifest no longer
    /// has.
    pub(super) fn release_ports(&mut self) {
        let apps = &self.manifest.apps;
        for name in self.sockets.release_on_demand(|app| apps.contains_key(app)) {
            self.steered.remove(&name);
            self.steering.close(&name);
            tracing::info!("socket {name} closed: its app was removed");
        }
    }
}
