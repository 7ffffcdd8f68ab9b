//! `clusterd upgrade` in the loop: checking the new binary (`handover-check`), handing the
//! state and descriptors over and exec'ing it, and, on the new side, adopting them.

use super::*;
use crate::error::Chain;
use clusterd_core::time::Offset;

/// An upgrade whose new binary is being checked (`handover-check` runs).
pub(super) struct Checking {
    pub(super) request: UpgradeRequest,
    pub(super) check: handover::Check,
}

/// An upgrade asked for by a client (and where its answer goes) or by SIGURG.
pub(super) struct UpgradeRequest {
    /// The new binary; clusterd's own when `None`.
    pub(super) binary: Option<PathBuf>,
    /// The client.
    pub(super) reply: Option<UnboundedSender<Reply>>,
}

/// What the loop owns that an upgrade hands over.
pub(super) struct Handed<'a> {
    pub(super) notify: &'a NotifySocket,
    pub(super) control: &'a ControlServer,
    pub(super) metrics: Option<&'a MetricsServer>,
}

impl Driver {
    /// Takes over from the clusterd that exec'd this one: its state, containment names and
    /// output pipes (forwarded again from here), and unblocks the signals it blocked.
    pub(super) fn resume(&mut self, handover: Handover) -> anyhow::Result<Core> {
        let now = Instant::now();
        let from = handover.version.clone();
        let (core, state, anchor) = handover.into_state()?;
        self.started = state.started.from(anchor).unwrap_or(now);
        self.upgrades = state.upgrades;
        self.upgraded_at = Some(now);
        self.contained = state.contained.into_iter().collect();
        for output in state.outputs {
            let stdout = handover::adopt(output.stdout)?;
            let stderr = handover::adopt(output.stderr)?;
            let keep = |fd: &OwnedFd| fd.try_clone();
            let kept = KeptOutput {
                label: output.label.clone(),
                stdout: keep(&stdout)?,
                stderr: keep(&stderr)?,
            };
            let Some(worker) = core.worker(output.worker) else {
                continue;
            };
            let source = Source::worker(&worker.app, worker.slot, worker.generation);
            if let Some(pid) = worker.pid {
                source.set_pid(pid.as_raw().unsigned_abs());
            }
            let destination = self.logs.destination(&worker.config.log, &worker.app);
            let out = |stream| self.logs.forwarder(source.clone(), stream, &destination);
            pipes::resume(out(LogStream::Stdout), stdout, &mut self.output_tasks)?;
            pipes::resume(out(LogStream::Stderr), stderr, &mut self.output_tasks)?;
            self.outputs.insert(output.worker, kept);
        }
        for handed in state.intercepts {
            let notify = handover::adopt(handed.notify)?;
            let mut held = Vec::new();
            for h in handed.held {
                held.push(intercept::Held::new(
                    &h.name,
                    &h.listen,
                    handover::adopt(h.fd)?,
                )?);
            }
            self.intercepts
                .watch(handed.worker, handed.label, notify, held)?;
        }
        for group in state.steering {
            let fds = group.members.iter().map(|(_, fd, _)| handover::adopt(*fd));
            let fds = fds.collect::<std::io::Result<Vec<_>>>()?;
            self.steering.resume(group, fds)?;
        }
        for channel in state.channels {
            let fd = handover::adopt(channel.fd)?;
            self.channels.resume(channel, fd)?;
        }
        self.metrics.restore(state.counters);
        crate::daemon::signals::block_handled(false)?;
        tracing::info!(
            event = "upgraded",
            "upgraded in place from clusterd {from} to {}: {} workers kept",
            handover::VERSION,
            core.groups().len()
        );
        Ok(core)
    }

    /// `clusterd upgrade` / SIGURG: starts `handover-check` on the binary with this
    /// clusterd's state; the loop goes on while it runs ([`Driver::upgrade`] follows once the
    /// reaper has seen it exit). On any failure nothing changes, and the client hears why.
    pub(super) fn start_upgrade(
        &mut self,
        core: &mut Core,
        request: UpgradeRequest,
        parts: &Handed<'_>,
    ) {
        if self.checking.is_some() || self.checked.is_some() {
            return refuse(&request, "an upgrade is under way already".into());
        }
        if core.shutting_down() {
            return refuse(&request, "clusterd is shutting down".into());
        }
        let Some(binary) = request
            .binary
            .clone()
            .or_else(|| self.exe.clone().map(PathBuf::from))
        else {
            return refuse(
                &request,
                "cannot tell which binary clusterd runs: give --binary".into(),
            );
        };
        // What the check reads: this very state, as it is now.
        let encoded = self
            .handover(core, Instant::now(), parts, self.channels.peek())
            .and_then(|(handover, _)| handover.encode());
        let check = encoded
            .and_then(|bytes| handover::memfd(&bytes))
            .and_then(|state| handover::start_check(&binary, &state));
        match check {
            Ok(check) => self.checking = Some(Checking { request, check }),
            Err(error) => refuse(&request, Chain(&error).to_string()),
        }
    }

    /// A `handover-check` that did not answer in time is killed, and the upgrade refused.
    pub(super) fn check_overdue(&mut self, now: Instant) {
        if self
            .checking
            .as_ref()
            .is_some_and(|c| now >= c.check.deadline)
            && let Some(Checking { request, check }) = self.checking.take()
        {
            refuse(&request, check.give_up().to_string());
        }
    }

    /// The check has exited with `status`: if it can take over, execs the binary with the
    /// state and the descriptors (see `handover`). On any failure nothing changes.
    pub(super) async fn upgrade(
        &mut self,
        core: &mut Core,
        Checking { request, check }: Checking,
        status: clusterd_core::ExitStatus,
        parts: &Handed<'_>,
    ) {
        let binary = check.binary.clone();
        let line = match check.finish(status) {
            Ok(line) => line,
            Err(error) => return refuse(&request, Chain(&error).to_string()),
        };
        if core.shutting_down() {
            return refuse(&request, "clusterd is shutting down".into());
        }
        let version = handover::field(&line, "version").unwrap_or("?").to_owned();
        tracing::info!(
            "upgrade: {} (clusterd {version}) can read the state; replacing clusterd {} pid {}",
            binary.display(),
            handover::VERSION,
            std::process::id()
        );
        if let Some(reply) = &request.reply {
            let _ = reply.send(Reply::Done {
                message: format!("upgrading to clusterd {version} ({})", binary.display()),
            });
            // Until the connection's task has written it (it ends with the final reply).
            let _ = tokio::time::timeout(Duration::from_secs(1), reply.closed()).await;
        }
        // The message channels stop where they are; what they hold crosses too.
        let channels = self.channels.suspend().await;
        let states = channels.iter().map(|(state, _)| state.clone()).collect();
        let (encoded, mut all) = match self.handover(core, Instant::now(), parts, states) {
            Ok((handover, all)) => (handover.encode(), all),
            Err(error) => (Err(error), Vec::new()),
        };
        let error = match encoded.and_then(|bytes| handover::memfd(&bytes)) {
            Err(error) => std::io::Error::other(Chain(&error).to_string()),
            Ok(state) => {
                self.logs.flush(Duration::from_secs(1));
                all.push(state.as_raw_fd());
                let error = match handover::set_inherit(&all, true)
                    .and_then(|()| crate::daemon::signals::block_handled(true))
                {
                    Ok(()) => handover::exec(&binary, &state),
                    Err(error) => error,
                };
                // Still here: the exec failed. Undo, and go on as before.
                let _ = crate::daemon::signals::block_handled(false);
                let _ = handover::set_inherit(&all, false);
                error
            }
        };
        for (state, fd) in channels {
            if let Err(error) = self.channels.resume(state, fd) {
                tracing::error!(
                    event = "upgrade_channel_failed",
                    "upgrade: cannot serve a message channel again: {error}"
                );
            }
        }
        tracing::error!(
            event = "upgrade_exec_failed",
            "upgrade: cannot exec {}: {error}; nothing changed",
            binary.display()
        );
    }

    /// The hand-over of everything as it is at `now`, and the descriptors it names.
    pub(super) fn handover(
        &self,
        core: &Core,
        now: Instant,
        parts: &Handed<'_>,
        channels: Vec<ipc::Suspended>,
    ) -> Result<(Handover, Vec<std::os::fd::RawFd>), handover::HandoverError> {
        let mut fds = Vec::new();
        let sockets: Vec<handover::HandedSocket> = self
            .sockets
            .parts()
            .map(|(name, fd, address, unix_path, on_demand)| {
                fds.push(fd);
                handover::HandedSocket {
                    name: name.clone(),
                    fd,
                    address: address.clone(),
                    unix_path: unix_path.cloned(),
                    on_demand: on_demand.cloned(),
                }
            })
            .collect();
        let (control_fd, control_path) = parts.control.handover_parts();
        fds.extend([control_fd, parts.notify.raw_fd()]);
        let metrics = parts.metrics.map(MetricsServer::raw_fd);
        fds.extend(metrics);
        let outputs = self
            .outputs
            .iter()
            .map(|(worker, kept)| {
                fds.extend([kept.stdout.as_raw_fd(), kept.stderr.as_raw_fd()]);
                handover::HandedOutput {
                    worker: *worker,
                    label: kept.label.clone(),
                    stdout: kept.stdout.as_raw_fd(),
                    stderr: kept.stderr.as_raw_fd(),
                }
            })
            .collect();
        let intercepts = self.intercepts.handover();
        for handed in &intercepts {
            fds.push(handed.notify);
            fds.extend(handed.held.iter().map(|h| h.fd));
        }
        let steering = self.steering.handover();
        for group in &steering {
            fds.extend(group.members.iter().map(|(_, fd, _)| *fd));
        }
        fds.extend(channels.iter().map(|c| c.fd));
        let driver = handover::DriverState {
            intercepts,
            steering,
            channels,
            counters: self.metrics.counters(),
            log_lines: self.logs.hub().handover(),
            started: Offset::between(now, self.started),
            upgrades: self.upgrades + 1,
            contained: self
                .contained
                .iter()
                .map(|(w, k)| (*w, k.clone()))
                .collect(),
            outputs,
        };
        let run_dir = self
            .notify_path
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default();
        let handover = Handover::new(
            core,
            now,
            self.manifest.clone(),
            run_dir,
            sockets,
            handover::HandedPath {
                fd: control_fd,
                path: control_path.to_path_buf(),
            },
            handover::HandedPath {
                fd: parts.notify.raw_fd(),
                path: self.notify_path.clone(),
            },
            metrics,
            self.detached,
            driver,
        )?;
        Ok((handover, fds))
    }
}

/// Refuses an upgrade: says why in the log and to the client that asked.
pub(super) fn refuse(request: &UpgradeRequest, message: String) {
    tracing::error!(event = "upgrade_refused", "upgrade refused: {message}");
    if let Some(reply) = &request.reply {
        let _ = reply.send(Reply::Error {
            kind: ErrorKind::BadRequest,
            message,
        });
    }
}
