//! The driver: the one place where the supervisor touches the OS. A single task on a
//! single-threaded runtime `select!`s over child exits (the reaper), signals, sd_notify
//! datagrams, control requests, metrics scrapes and the core's next deadline; it turns each
//! into an [`Event`] for the [`Core`] and carries out the [`Action`]s that come back (fork and
//! exec, signals to process groups, replies, log lines, metrics). Nothing polls: with nothing
//! due, the loop sleeps until the next event.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clusterd_manifest::Manifest;
use clusterd_proto::{ErrorKind, LogStream, Reply, Request, SocketStatus, Status};
use nix::sys::signal::{Signal, kill};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinSet;

use clusterd_core::host::{HostMessage, HostNotifier};
use clusterd_core::status::{CpuSampler, Measured};
use clusterd_core::{
    Action, Core, Event, Observation, Pid, ReplyTo, SpawnFailure, SupervisorSignal, WorkerId,
};

use super::handover::{self, Handover};
use crate::containment::{self, Containment};
use crate::control::server::{ControlRequest, ControlServer};
use crate::intercept::{self, Intercepts, Trap};
use crate::ipc::{self, Channels};
use crate::logs::{self, Forwarder, Source};
use crate::manager::{self, Manager};
use crate::metrics::{Metrics, MetricsServer, Query};
use crate::notify::{Notification, NotifySocket};
use crate::os;
use crate::output;
use crate::procstat;
use crate::reaper::{self, Exit, Reaper};
use crate::signals::Signals;
use crate::sockets::Sockets;
use crate::spawn::{self, SpawnError, SpawnSpec};
use crate::steering::{self, Steering};

/// How long, at exit, the workers' last output may take to drain.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);
/// How long the exit waits for the connections that still write a final reply.
const REPLY_FLUSH: Duration = Duration::from_secs(1);

/// How long, at exit, processes that escaped their worker's process group have between
/// SIGTERM and SIGKILL.
const ORPHAN_GRACE: Duration = Duration::from_secs(2);

/// What a booted supervisor runs with (see `crate::boot`).
pub struct Parts {
    /// The manifest in effect.
    pub manifest: Manifest,
    /// The listening sockets.
    pub sockets: Sockets,
    /// The notify socket.
    pub notify: NotifySocket,
    /// The control socket.
    pub control: ControlServer,
    /// The metrics listener.
    pub metrics: Option<MetricsServer>,
    /// What holds the workers.
    pub containment: Containment,
    /// The background process of `start --detach` (handed over as is).
    pub detached: bool,
    /// The state a previous clusterd of this pid handed over: then the workers are its own
    /// children already.
    pub resumed: Option<Box<Handover>>,
}

/// Runs the supervisor until a shutdown has stopped every worker.
///
/// The caller has bound the sockets, the notify socket and the control socket (or adopted
/// them from the hand-over); signals are handled here. Returns when every worker has exited.
pub async fn run(parts: Parts, manager: Option<Manager>) -> anyhow::Result<()> {
    let Parts {
        manifest,
        sockets,
        notify,
        mut control,
        metrics: mut metrics_server,
        containment,
        detached,
        resumed,
    } = parts;
    // Install the SIGCHLD listener and the other signal handlers before the first fork.
    let mut reaper = Reaper::new()?;
    let mut signals = Signals::new()?;
    let mut driver = Driver::new(manifest, sockets, notify.path().to_path_buf(), containment)?;
    driver.manager = manager;
    driver.detached = detached;
    let mut core = match resumed {
        Some(handover) => driver.resume(*handover)?,
        None => Core::new(&driver.manifest, Instant::now()),
    };
    let first = core.tick(Instant::now());
    driver.perform(&mut core, first);
    // After an upgrade: exits while the exec ran (their SIGCHLD went to the old image).
    let exits = reaper::reap_all();
    driver.on_exits(&mut core, exits);
    driver.tell_manager(&core);
    while !core.finished() {
        driver.metrics.record_wakeup();
        let deadline = core
            .next_deadline()
            .into_iter()
            .chain(driver.manager.as_ref().and_then(Manager::watchdog_due))
            .chain(driver.checking.as_ref().map(|c| c.check.deadline))
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            exits = reaper.next() => driver.on_exits(&mut core, exits),
            Some(signal) = signals.recv() => {
                if signal == SupervisorSignal::Reread {
                    driver.host.reload_seen();
                }
                if signal == SupervisorSignal::Upgrade {
                    driver.pending_upgrade = Some(UpgradeRequest { binary: None, reply: None });
                }
                driver.feed(&mut core, Event::Signal(signal));
            }
            notification = notify.recv() => driver.on_notify(&mut core, notification),
            Some(request) = control.recv() => driver.on_control(&mut core, request),
            Some(worker) = driver.intercepts.listening() => {
                driver.feed(&mut core, Event::Listening(worker));
            }
            Some(message) = driver.channels.recv() => {
                let ipc::Message { worker, text, ready } = message;
                driver.feed(&mut core, Event::Message { worker, text, ready });
            }
            Some(query) = async { match metrics_server.as_mut() { Some(m) => m.recv().await, None => None } } => {
                driver.on_query(&core, query);
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                let actions = core.tick(Instant::now());
                driver.perform(&mut core, actions);
                driver.check_lingering(&mut core);
                driver.check_overdue(Instant::now());
            }
        }
        driver.tell_manager(&core);
        let parts = Handed {
            notify: &notify,
            control: &control,
            metrics: metrics_server.as_ref(),
        };
        if let Some(request) = driver.pending_upgrade.take() {
            driver.start_upgrade(&mut core, request, &parts);
        }
        if let Some((check, status)) = driver.checked.take() {
            driver.upgrade(&mut core, check, status, &parts).await;
        }
    }
    driver.sockets.remove_files();
    stop_adopted_orphans();
    driver.containment.remove_all();
    // Every worker process is gone; what they wrote last may still be in the pipes (or held
    // open by a process that left its group: hence the bound).
    let mut output = std::mem::take(&mut driver.output_tasks);
    let drained = async { while output.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(OUTPUT_DRAIN, drained).await;
    let replies = std::mem::take(&mut driver.last_replies);
    let written = async {
        for reply in &replies {
            reply.closed().await;
        }
    };
    let _ = tokio::time::timeout(REPLY_FLUSH, written).await;
    tracing::info!("all workers stopped; exiting");
    Ok(())
}

/// An upgrade whose new binary is being checked (`handover-check` runs).
struct Checking {
    request: UpgradeRequest,
    check: handover::Check,
}

/// An upgrade asked for by a client (and where its answer goes) or by SIGURG.
struct UpgradeRequest {
    /// The new binary; clusterd's own when `None`.
    binary: Option<PathBuf>,
    /// The client.
    reply: Option<UnboundedSender<Reply>>,
}

/// What the loop owns that an upgrade hands over.
struct Handed<'a> {
    notify: &'a NotifySocket,
    control: &'a ControlServer,
    metrics: Option<&'a MetricsServer>,
}

/// A duplicate of the read ends of a worker's output pipes, for an upgrade.
struct KeptOutput {
    label: String,
    stdout: OwnedFd,
    stderr: OwnedFd,
}

/// What the driver holds: the OS resources and the views' own state.
struct Driver {
    manifest: Manifest,
    sockets: Sockets,
    notify_path: PathBuf,
    /// clusterd's environment without [`clusterd_manifest::RESERVED_ENV`].
    base_env: BTreeMap<String, String>,
    /// clusterd's own executable, captured once at start (`CLUSTERD_EXE`).
    exe: Option<String>,
    dev_null: OwnedFd,
    started: Instant,
    metrics: Metrics,
    /// The tasks forwarding workers' output.
    output_tasks: JoinSet<()>,
    /// Control clients still owed a reply.
    replies: HashMap<ReplyTo, UnboundedSender<Reply>>,
    /// Final replies sent while shutting down, kept until their connection has written them
    /// (the channel closes): `clusterd stop` hears "stopping" even when no worker was left to
    /// wait for.
    last_replies: Vec<UnboundedSender<Reply>>,
    next_reply: u64,
    /// CPU percentages for `clusterd status` (scrapes do not use them).
    status_cpu: CpuSampler,
    /// What holds each worker and its descendants (cgroups or process groups).
    containment: Containment,
    /// Each worker's name in the containment (its cgroup), from spawn until forgotten.
    contained: HashMap<WorkerId, String>,
    /// The trapped `bind`/`listen` calls of intercepted workers.
    intercepts: Intercepts,
    /// Sockets whose workers each listen on a socket of their own, steered (apps with `drain`).
    steered: BTreeSet<String>,
    /// The per-worker sockets of `steered` and the program that picks among them.
    steering: Steering,
    /// clusterd's own manager (`NOTIFY_SOCKET` of clusterd), if it has one.
    manager: Option<Manager>,
    /// What the manager has been told.
    host: HostNotifier,
    /// The workers' output pipes, for an upgrade.
    outputs: HashMap<WorkerId, KeptOutput>,
    /// Upgrades in place so far, and when the last one was.
    upgrades: u32,
    upgraded_at: Option<Instant>,
    /// An upgrade to carry out once the current event is handled.
    pending_upgrade: Option<UpgradeRequest>,
    /// The upgrade whose binary is being checked, while the loop goes on.
    checking: Option<Checking>,
    /// Its check has exited (reaped by the reaper): the upgrade goes on after this event.
    checked: Option<(Checking, clusterd_core::ExitStatus)>,
    /// Workers' message channels (`ipc`).
    channels: Channels,
    /// The background process of `start --detach`.
    detached: bool,
}

impl Driver {
    fn new(
        manifest: Manifest,
        sockets: Sockets,
        notify_path: PathBuf,
        containment: Containment,
    ) -> anyhow::Result<Self> {
        let base_env = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| !clusterd_manifest::RESERVED_ENV.contains(&k.as_str()))
            .collect();
        let steered = steering::steered(&manifest);
        logs::hub().set_apps(manifest.apps.keys());
        Ok(Driver {
            manifest,
            sockets,
            notify_path,
            base_env,
            exe: std::env::current_exe()
                .ok()
                .map(|p| p.display().to_string()),
            dev_null: std::fs::File::open("/dev/null")?.into(),
            started: Instant::now(),
            metrics: Metrics::default(),
            output_tasks: JoinSet::new(),
            replies: HashMap::new(),
            last_replies: Vec::new(),
            next_reply: 0,
            status_cpu: CpuSampler::default(),
            containment,
            contained: HashMap::new(),
            intercepts: Intercepts::default(),
            steered,
            steering: Steering::default(),
            manager: None,
            host: HostNotifier::default(),
            outputs: HashMap::new(),
            upgrades: 0,
            upgraded_at: None,
            pending_upgrade: None,
            checking: None,
            checked: None,
            channels: Channels::default(),
            detached: false,
        })
    }

    /// Takes over from the clusterd that exec'd this one: its state, containment names and
    /// output pipes (forwarded again from here), and unblocks the signals it blocked.
    fn resume(&mut self, handover: Handover) -> anyhow::Result<Core> {
        let now = Instant::now();
        let from = handover.version.clone();
        let (core, state) = handover.into_state();
        self.started = state.started;
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
            let destination = logs::destination(&worker.config.log, &worker.app);
            let out = |stream| Forwarder::new(source.clone(), stream, destination);
            output::resume(out(LogStream::Stdout), stdout, &mut self.output_tasks)?;
            output::resume(out(LogStream::Stderr), stderr, &mut self.output_tasks)?;
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
        crate::signals::block_handled(false)?;
        tracing::info!(
            "upgraded in place from clusterd {from} to {}: {} workers kept",
            handover::VERSION,
            core.groups().len()
        );
        Ok(core)
    }

    /// `clusterd upgrade` / SIGURG: starts `handover-check` on the binary with this
    /// clusterd's state; the loop goes on while it runs ([`Driver::upgrade`] follows once the
    /// reaper has seen it exit). On any failure nothing changes, and the client hears why.
    fn start_upgrade(&mut self, core: &mut Core, request: UpgradeRequest, parts: &Handed<'_>) {
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
        let (handover, _) = self.handover(std::mem::take(core), parts, self.channels.peek());
        let encoded = handover.encode(Instant::now());
        *core = handover.into_state().0;
        let check = encoded
            .and_then(|bytes| handover::memfd(&bytes))
            .and_then(|state| handover::start_check(&binary, &state));
        match check {
            Ok(check) => self.checking = Some(Checking { request, check }),
            Err(error) => refuse(&request, error.to_string()),
        }
    }

    /// A `handover-check` that did not answer in time is killed, and the upgrade refused.
    fn check_overdue(&mut self, now: Instant) {
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
    async fn upgrade(
        &mut self,
        core: &mut Core,
        Checking { request, check }: Checking,
        status: clusterd_core::ExitStatus,
        parts: &Handed<'_>,
    ) {
        let binary = check.binary.clone();
        let line = match check.finish(status) {
            Ok(line) => line,
            Err(error) => return refuse(&request, error.to_string()),
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
        let (handover, mut all) = self.handover(std::mem::take(core), parts, states);
        let encoded = handover.encode(Instant::now());
        *core = handover.into_state().0;
        let error = match encoded.and_then(|bytes| handover::memfd(&bytes)) {
            Err(error) => std::io::Error::other(error.to_string()),
            Ok(state) => {
                output::flush(Duration::from_secs(1));
                all.push(state.as_raw_fd());
                let error = match handover::set_inherit(&all, true)
                    .and_then(|()| crate::signals::block_handled(true))
                {
                    Ok(()) => handover::exec(&binary, &state),
                    Err(error) => error,
                };
                // Still here: the exec failed. Undo, and go on as before.
                let _ = crate::signals::block_handled(false);
                let _ = handover::set_inherit(&all, false);
                error
            }
        };
        for (state, fd) in channels {
            if let Err(error) = self.channels.resume(state, fd) {
                tracing::error!("upgrade: cannot serve a message channel again: {error}");
            }
        }
        tracing::error!(
            "upgrade: cannot exec {}: {error}; nothing changed",
            binary.display()
        );
    }

    /// The hand-over of everything (taking `core`), and the descriptors it names.
    fn handover(
        &self,
        core: Core,
        parts: &Handed<'_>,
        channels: Vec<ipc::Suspended>,
    ) -> (Handover, Vec<std::os::fd::RawFd>) {
        let mut fds = Vec::new();
        let sockets: Vec<handover::HandedSocket> = self
            .sockets
            .parts()
            .map(|(name, fd, address, unix_path)| {
                fds.push(fd);
                handover::HandedSocket {
                    name: name.clone(),
                    fd,
                    address: address.clone(),
                    unix_path: unix_path.cloned(),
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
            log_lines: logs::hub().handover(),
            started: self.started,
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
        );
        (handover, fds)
    }

    /// Tells clusterd's manager what changed since the last event, and sends its watchdog
    /// heartbeat when due (the loop wakes for it: proof that the loop itself runs).
    fn tell_manager(&mut self, core: &Core) {
        let Some(manager) = &mut self.manager else {
            return;
        };
        manager.watchdog(Instant::now());
        for message in self.host.update(core) {
            match message {
                HostMessage::Ready => manager.send("READY=1"),
                HostMessage::Reloading => manager.send(&format!(
                    "RELOADING=1\nMONOTONIC_USEC={}",
                    manager::monotonic_usec()
                )),
                HostMessage::Stopping => manager.send("STOPPING=1"),
                HostMessage::Status(line) => manager.send(&format!("STATUS={line}")),
            }
        }
    }

    /// Feeds one event and carries out what follows.
    fn feed(&mut self, core: &mut Core, event: Event) {
        let actions = core.on(Instant::now(), event);
        self.perform(core, actions);
    }

    /// Carries out actions, feeding back the events they produce (spawn results, re-read
    /// manifests) before anything else can happen.
    fn perform(&mut self, core: &mut Core, actions: Vec<Action>) {
        let mut queue = VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            let followup = match action {
                Action::Spawn {
                    worker,
                    app,
                    slot,
                    generation,
                    config,
                } => {
                    let key = format!("{app}.{slot}.{}", worker.0);
                    let result = self
                        .spawn(worker, &app, slot, generation, &config, &key)
                        .map(|(pid, kept)| {
                            self.outputs.insert(worker, kept);
                            pid
                        })
                        .map_err(|error| SpawnFailure {
                            transient: error.is_transient(),
                            message: error.to_string(),
                        });
                    if let Ok(pid) = &result {
                        if let Err(why) = self.containment.check_joined(&key, os::pid(*pid)) {
                            tracing::warn!(
                                "{app}[{slot}] is contained by its process group only: {why}"
                            );
                        }
                        self.contained.insert(worker, key);
                    } else {
                        self.containment.remove_worker(&key);
                    }
                    Some(Event::Spawned { worker, result })
                }
                Action::Signal {
                    worker,
                    pid,
                    signal,
                } => {
                    // Errors (gone already) are ignored: the exit is on its way.
                    let key = self.key(worker);
                    if signal == clusterd_manifest::Signal::SIGKILL {
                        self.containment.kill(key, os::pid(pid));
                    } else {
                        self.containment
                            .signal(key, os::pid(pid), os::signal(signal));
                    }
                    None
                }
                Action::Forget { worker } => {
                    self.outputs.remove(&worker);
                    if let Some(key) = self.contained.remove(&worker) {
                        self.containment.remove_worker(&key);
                    }
                    self.intercepts.forget(worker);
                    self.steering.forget(worker);
                    self.channels.close(worker);
                    None
                }
                Action::Deliver { worker, text } => {
                    if !self.channels.send(worker, text) {
                        self.metrics.record_message_dropped();
                    }
                    None
                }
                Action::Disconnect { worker } => {
                    self.channels.close(worker);
                    None
                }
                Action::Reply { to, reply } => {
                    let last = !matches!(reply, Reply::Progress { .. });
                    if let Some(sender) = self.replies.get(&to) {
                        let _ = sender.send(reply);
                    }
                    if last
                        && let Some(sender) = self.replies.remove(&to)
                        && core.shutting_down()
                    {
                        // The loop may end before the connection's task has written it.
                        self.last_replies.push(sender);
                    }
                    None
                }
                Action::Log { level, message } => {
                    log(level, &message);
                    None
                }
                Action::Observe(observation) => {
                    self.observe(observation);
                    None
                }
                Action::Reread => self.reread().map(|m| Event::Reconfigure(Box::new(m))),
                Action::Steer { worker, serving } => {
                    self.steering.set_serving(worker, serving);
                    None
                }
                Action::MeasureMemory(workers) => {
                    let pids: Vec<Pid> = workers.iter().map(|(_, pid)| *pid).collect();
                    let usage = procstat::group_usage(&pids);
                    // Where its cgroup has the memory controller, all that a worker and
                    // everything it started use (`memory.current`); else its group's RSS.
                    let measured = workers
                        .into_iter()
                        .filter_map(|(id, pid)| {
                            let cgroup = self.containment.memory_current(self.key(id));
                            Some((id, cgroup.or(usage.get(&pid).map(|u| u.rss_bytes))?))
                        })
                        .collect();
                    Some(Event::Memory(measured))
                }
            };
            if let Some(event) = followup {
                queue.extend(core.on(Instant::now(), event));
            }
        }
    }

    fn on_exits(&mut self, core: &mut Core, exits: Vec<Exit>) {
        for exit in exits {
            // The upgrade's `handover-check`: its answer, not a worker's exit.
            if self
                .checking
                .as_ref()
                .is_some_and(|c| c.check.pid == exit.pid)
                && let Some(checking) = self.checking.take()
            {
                self.checked = Some((checking, exit.status));
                continue;
            }
            let group_empty = core
                .worker_by_pid(exit.pid)
                .is_none_or(|id| self.containment.is_empty(self.key(id), os::pid(exit.pid)));
            self.feed(
                core,
                Event::Exited {
                    pid: exit.pid,
                    status: exit.status,
                    group_empty,
                },
            );
        }
        self.check_lingering(core);
    }

    /// Reports the groups of exited workers that have emptied.
    fn check_lingering(&mut self, core: &mut Core) {
        let empty: Vec<WorkerId> = core
            .lingering()
            .filter(|(id, pid)| self.containment.is_empty(self.key(*id), os::pid(*pid)))
            .map(|(id, _)| id)
            .collect();
        for id in empty {
            self.feed(core, Event::GroupEmpty(id));
        }
    }

    fn on_notify(&mut self, core: &mut Core, notification: Notification) {
        match sender_worker(core, os::core_pid(notification.pid)) {
            Some(worker) => self.feed(
                core,
                Event::Notify {
                    worker,
                    assignments: notification.assignments,
                },
            ),
            None => tracing::debug!(
                "ignored a notification from pid {}, not a worker",
                notification.pid
            ),
        }
        // Dropping the passed fds (after handling) acknowledges a `clusterd notify` barrier.
        drop(notification.fds);
    }

    fn on_control(&mut self, core: &mut Core, ControlRequest { request, reply }: ControlRequest) {
        if let Request::Status {} = request {
            let status = self.status(core, true);
            let _ = reply.send(Reply::Status(Box::new(status)));
            return;
        }
        if let Request::Upgrade { binary } = request {
            self.pending_upgrade = Some(UpgradeRequest {
                binary: binary.map(PathBuf::from),
                reply: Some(reply),
            });
            return;
        }
        self.next_reply += 1;
        let to = ReplyTo(self.next_reply);
        self.replies.insert(to, reply);
        self.feed(core, Event::Control { request, reply: to });
    }

    fn on_query(&mut self, core: &Core, query: Query) {
        match query {
            Query::Metrics(answer) => {
                let status = self.status(core, false);
                let _ = answer.send(self.metrics.encode(&status));
            }
            Query::Ready(answer) => {
                let _ = answer.send(core.readiness());
            }
            Query::Health(answer) => {
                let _ = answer.send(());
            }
        }
    }

    /// A snapshot for status (`with_cpu_percent`) or for a scrape.
    fn status(&mut self, core: &Core, with_cpu_percent: bool) -> Status {
        let now = Instant::now();
        let groups = core.groups();
        let pids: Vec<Pid> = groups.iter().map(|(pid, _)| *pid).collect();
        let usage = procstat::group_usage(&pids);
        let cpu_percent = if with_cpu_percent {
            let started: HashMap<Pid, Instant> = groups.into_iter().collect();
            self.status_cpu
                .sample(now, &usage, |pid| started.get(&pid).copied().unwrap_or(now))
        } else {
            HashMap::new()
        };
        let measured = Measured {
            usage: &usage,
            cpu_percent: &cpu_percent,
        };
        let mut apps = core.app_statuses(now, &measured);
        for worker in apps.iter_mut().flat_map(|app| app.workers.iter_mut()) {
            let id = worker
                .pid
                .and_then(|pid| core.worker_by_pid(Pid::from_raw(pid as i32)));
            if let Some(id) = id {
                worker.messages_dropped = self.channels.dropped(id);
            }
        }
        Status {
            pid: std::process::id(),
            manifest: self.manifest.path.display().to_string(),
            uptime_ms: u64::try_from((now - self.started).as_millis()).unwrap_or(u64::MAX),
            rss_bytes: procstat::self_rss(),
            stopping: core.shutting_down(),
            sockets: self
                .sockets
                .iter()
                .map(|(name, s)| SocketStatus {
                    name: name.clone(),
                    address: s.address.clone(),
                })
                .collect(),
            apps,
            containment: self.containment.describe(),
            output_dropped: output::dropped_lines(),
            ready: core.readiness().is_ok(),
            not_ready: core.readiness().err(),
            version: handover::VERSION.to_owned(),
            upgrades: self.upgrades,
            upgraded_ms: self
                .upgraded_at
                .map(|at| u64::try_from((now - at).as_millis()).unwrap_or(u64::MAX)),
        }
    }

    /// A worker's name in the containment ("" for one that never ran: nothing to address).
    fn key(&self, worker: WorkerId) -> &str {
        self.contained.get(&worker).map_or("", String::as_str)
    }

    fn observe(&self, observation: Observation) {
        match observation {
            Observation::Ready { app, seconds } => self.metrics.record_ready(&app, seconds),
            Observation::Restart { app } => self.metrics.record_restart(&app),
            Observation::Reload { app, completed } => self.metrics.record_reload(&app, completed),
            Observation::Message { app } => self.metrics.record_message(&app),
        }
    }

    /// SIGHUP: re-reads the manifest and binds its new sockets (all or nothing). `None` when
    /// either fails: then nothing changed.
    fn reread(&mut self) -> Option<Manifest> {
        let manifest = match clusterd_manifest::load(&self.manifest.path) {
            Ok(manifest) => manifest,
            Err(error) => {
                tracing::error!("manifest re-read rejected, nothing changed:\n{error}");
                return None;
            }
        };
        let changed = match self
            .sockets
            .bind_new(&manifest.sockets, &self.manifest.sockets)
        {
            Ok(changed) => changed,
            Err(error) => {
                tracing::error!("manifest re-read rejected, nothing changed: {error}");
                return None;
            }
        };
        for name in &changed {
            tracing::warn!(
                "socket {name}: a changed address takes effect only after a restart of clusterd"
            );
        }
        logs::hub().set_apps(manifest.apps.keys());
        self.manifest = manifest.clone();
        Some(manifest)
    }

    /// Forks and execs a worker (trapping its `bind`/`listen` when its app is intercepted).
    fn spawn(
        &mut self,
        worker: WorkerId,
        app: &str,
        slot: usize,
        generation: u64,
        config: &clusterd_manifest::AppConfig,
        key: &str,
    ) -> Result<(Pid, KeptOutput), SpawnError> {
        let program = spawn::find_program(config, self.base_env.get("PATH").map(|p| p.as_ref()))
            .ok_or_else(|| SpawnError::NotFound {
                program: config.command[0].clone(),
            })?;
        let mut env = self.base_env.clone();
        // `{slot}` in a value is the worker's slot (PM2's increment_var: `PORT = "91{slot}"`).
        let slot_text = slot.to_string();
        env.extend(
            config
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.replace("{slot}", &slot_text))),
        );
        // An intercepted worker finds at fd 3.. the very sockets its binds are answered with:
        // a listening socket of its own where the address is steered, never the holder.
        let held = match config.intercept {
            true => Some(
                self.held(worker, &config.sockets)
                    .map_err(|cause| SpawnError::Os {
                        what: "socket",
                        cause,
                    })?,
            ),
            false => None,
        };
        let listen_fds: Vec<_> = match &held {
            Some(held) => held.iter().map(intercept::Held::raw_fd).collect(),
            None => config
                .sockets
                .iter()
                .filter_map(|name| Some(self.sockets.get(name)?.raw_fd()))
                .collect(),
        };
        if !listen_fds.is_empty() {
            env.insert("LISTEN_FDS".into(), listen_fds.len().to_string());
            env.insert("LISTEN_FDNAMES".into(), config.sockets.join(":"));
        }
        env.insert(
            "NOTIFY_SOCKET".into(),
            self.notify_path.display().to_string(),
        );
        if let Some(period) = config.watchdog {
            env.insert("WATCHDOG_USEC".into(), period.as_micros().to_string());
        }
        env.insert("CLUSTERD_APP".into(), app.to_owned());
        env.insert("CLUSTERD_WORKER_ID".into(), slot.to_string());
        env.insert("CLUSTERD_GENERATION".into(), generation.to_string());
        if let Some(segment) = &config.kv_segment {
            env.insert("CLUSTERD_KV_SEGMENT".into(), segment.clone());
        }
        if let Some(exe) = &self.exe {
            env.insert("CLUSTERD_EXE".into(), exe.clone());
        }
        let channel = match config.ipc {
            true => Some(ipc::pair().map_err(|cause| SpawnError::Os {
                what: "socketpair",
                cause,
            })?),
            false => None,
        };
        if channel.is_some() {
            let fd = spawn::ipc_fd_number(listen_fds.len()).to_string();
            env.insert("CLUSTERD_IPC_FD".into(), fd.clone());
            env.insert("NODE_CHANNEL_FD".into(), fd);
            env.insert("NODE_CHANNEL_SERIALIZATION_MODE".into(), "json".into());
        }
        let env: Vec<(String, String)> = env.into_iter().collect();

        let label = format!("{app}[{slot}]");
        let pipe_error = |cause| SpawnError::Os {
            what: "pipe2",
            cause,
        };
        // The forwarding tasks learn the pid once the fork has returned it.
        let source = Source::worker(app, slot, generation);
        let destination = logs::destination(&config.log, app);
        let stdout = Forwarder::new(source.clone(), LogStream::Stdout, destination);
        let (stdout, kept_stdout) =
            output::forward(stdout, &mut self.output_tasks).map_err(pipe_error)?;
        let stderr = Forwarder::new(source.clone(), LogStream::Stderr, destination);
        let (stderr, kept_stderr) =
            output::forward(stderr, &mut self.output_tasks).map_err(pipe_error)?;
        // Without its own cgroup the worker is still contained by its process group.
        let cgroup_procs = self
            .containment
            .prepare_worker(key)
            .unwrap_or_else(|error| {
                tracing::warn!("{error}; {label} runs in its process group only");
                None
            });
        let trap = match config.intercept {
            true => Some(Trap::new(listen_fds.len()).map_err(|cause| SpawnError::Os {
                what: "socketpair",
                cause,
            })?),
            false => None,
        };
        let pid = spawn::spawn(&SpawnSpec {
            program: &program,
            argv: &config.command,
            env: &env,
            cwd: &config.cwd,
            listen_fds: &listen_fds,
            stdio: [&self.dev_null, &stdout, &stderr],
            cgroup_procs: cgroup_procs.as_ref(),
            trap: trap.as_ref(),
            ipc: channel.as_ref().map(|(_, theirs)| theirs),
        })
        .inspect(|pid| source.set_pid(pid.as_raw().unsigned_abs()))?;
        if let Some((mine, _)) = channel
            && let Err(error) = self.channels.watch(worker, label.clone(), mine)
        {
            tracing::error!("{label} pid {pid}: cannot serve its message channel: {error}");
        }
        if let (Some(trap), Some(held)) = (trap, held) {
            // The child sent the fd before it exec'd. Without it, its trapped calls fail with
            // ENOSYS once `trap` is dropped: the worker sees an error, clusterd goes on.
            let watched = trap.receive().and_then(|notify_fd| {
                self.intercepts
                    .watch(worker, label.clone(), notify_fd, held)
            });
            if let Err(error) = watched {
                tracing::error!("{label} pid {pid}: cannot answer its bind()/listen(): {error}");
            }
        }
        let kept = KeptOutput {
            label,
            stdout: kept_stdout,
            stderr: kept_stderr,
        };
        Ok((os::core_pid(pid), kept))
    }
}

impl Driver {
    /// The sockets an intercepted worker's binds are answered with: a listening socket of its
    /// own for steered sockets (apps with `drain`), else the shared held socket.
    fn held(
        &mut self,
        worker: WorkerId,
        names: &[String],
    ) -> std::io::Result<Vec<intercept::Held>> {
        let mut held = Vec::new();
        for name in names {
            let (Some(socket), Some(config)) =
                (self.sockets.get(name), self.manifest.sockets.get(name))
            else {
                continue;
            };
            let fd = match socket.local_addr().filter(|_| self.steered.contains(name)) {
                Some(address) => self.steering.socket_for(name, worker, address, config)?,
                None => socket.try_clone_fd()?,
            };
            // Binds match the address bound (a manifest's port 0 is a real port by now).
            let listen = match socket.local_addr() {
                Some(address) => clusterd_manifest::Listen::Tcp(address),
                None => config.listen.clone(),
            };
            held.push(intercept::Held::new(name, &listen, fd)?);
        }
        Ok(held)
    }
}

/// The worker a notification sender belongs to: the worker itself, a process in its process
/// group (a shell wrapper's child, `clusterd notify`), or a descendant.
fn sender_worker(core: &Core, sender: Pid) -> Option<WorkerId> {
    if let Some(worker) = core.worker_by_pid(sender) {
        return Some(worker);
    }
    if let Ok(group) = nix::unistd::getpgid(Some(os::pid(sender)))
        && let Some(worker) = core.worker_by_pid(os::core_pid(group))
    {
        return Some(worker);
    }
    let mut pid = sender;
    for _ in 0..32 {
        pid = os::core_pid(procstat::parent_of(os::pid(pid))?);
        if let Some(worker) = core.worker_by_pid(pid) {
            return Some(worker);
        }
    }
    None
}

/// Refuses an upgrade: says why in the log and to the client that asked.
fn refuse(request: &UpgradeRequest, message: String) {
    tracing::error!("upgrade refused: {message}");
    if let Some(reply) = &request.reply {
        let _ = reply.send(Reply::Error {
            kind: ErrorKind::BadRequest,
            message,
        });
    }
}

/// At exit, with every worker gone: what escaped its worker's containment and was re-parented
/// to clusterd (a `setsid` daemon, without cgroups) is asked to stop, then killed.
fn stop_adopted_orphans() {
    let orphans = containment::adopted_orphans(&[]);
    if orphans.is_empty() {
        return;
    }
    tracing::warn!(
        "stopping {} processes that left their worker's process group: {orphans:?}",
        orphans.len()
    );
    for pid in &orphans {
        let _ = kill(*pid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + ORPHAN_GRACE;
    while Instant::now() < deadline {
        reaper::reap_all();
        if orphans.iter().all(|pid| kill(*pid, None).is_err()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for pid in &orphans {
        let _ = kill(*pid, Signal::SIGKILL);
    }
    std::thread::sleep(Duration::from_millis(20));
    reaper::reap_all();
}

fn log(level: clusterd_core::Level, message: &str) {
    use clusterd_core::Level;
    match level {
        Level::Error => tracing::error!("{message}"),
        Level::Warn => tracing::warn!("{message}"),
        Level::Info => tracing::info!("{message}"),
        Level::Debug => tracing::debug!("{message}"),
    }
}
