//! The driver: the event loop of the supervisor. A single task on a single-threaded runtime
//! `select!`s over child exits (the reaper), signals (from the caller's source), the caller's
//! shutdown future, sd_notify datagrams, control requests, metrics scrapes and the core's
//! next deadline; it turns each into an [`Event`] for the [`Core`] and carries out the
//! [`Action`]s that come back ([`Driver::perform`]: fork and exec through [`launch`],
//! signals to process groups, replies, log lines, metrics). The loop never polls: with
//! nothing due, it sleeps until the next event (at exit, the orphans that escaped their
//! worker get a bounded poll).

mod launch;
mod ports;
mod queries;
mod upgrade;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clusterd_manifest::Manifest;
use clusterd_proto::{ErrorKind, LogStream, Reply, Request, SocketStatus, Status};
use nix::sys::signal::{Signal, kill};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinSet;

use clusterd_core::host::{HostMessage, HostNotifier};
use clusterd_core::status::Measured;
use clusterd_core::{
    Action, Core, Event, Observation, Pid, ReplyTo, SpawnFailure, SupervisorSignal, WorkerId,
};

use self::launch::KeptOutput;
use self::upgrade::{Checking, Handed, UpgradeRequest};
use super::handover::{self, Handover};
use crate::daemon::containment::{self, Containment};
use crate::daemon::control::{ControlRequest, ControlServer};
use crate::daemon::intercept::{self, Intercepts, Trap};
use crate::daemon::ipc::{self, Channels};
use crate::daemon::logs::{Logs, Source, pipes};
use crate::daemon::manager::{self, Manager};
use crate::daemon::metrics::{Metrics, MetricsServer, Query};
use crate::daemon::notify::{Notification, NotifySocket};
use crate::daemon::os;
use crate::daemon::procstat;
use crate::daemon::reaper::{self, Exit, Reaper};
use crate::daemon::signals::SignalSource;
use crate::daemon::sockets::Sockets;
use crate::daemon::spawn::env::WorkerEnv;
use crate::daemon::spawn::{self, SpawnError, SpawnSpec};
use crate::daemon::steering::{self, Steering};
use crate::daemon::watch::Watches;
use crate::error::Chain;

/// How long, at exit, the workers' last output may take to drain.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);
/// How long the exit waits for the connections that still write a final reply.
const REPLY_FLUSH: Duration = Duration::from_secs(1);

/// How long, at exit, processes that escaped their worker's process group have between
/// SIGTERM and SIGKILL.
const ORPHAN_GRACE: Duration = Duration::from_secs(2);

/// What a booted supervisor runs with (see `crate::daemon::boot`): everything [`run`] needs
/// that touches the process as a whole is decided here, by the caller.
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
    /// What holds the workers: a cgroup tree clusterd moved itself into, or process groups
    /// (`Containment::ProcessGroups`, which changes nothing outside the workers).
    pub containment: Containment,
    /// clusterd's own manager (systemd's `NOTIFY_SOCKET`), if it has one.
    pub manager: Option<Manager>,
    /// clusterd's executable: the workers' `CLUSTERD_EXE`, and what an upgrade without
    /// `--binary` execs (without it, such an upgrade is refused).
    pub exe: Option<PathBuf>,
    /// The background process of `start --detach` (handed over as is).
    pub detached: bool,
    /// The state a previous clusterd of this pid handed over: then the workers are its own
    /// children already.
    pub resumed: Option<Box<Handover>>,
    /// Where output goes.
    pub logs: Logs,
}

/// Runs the supervisor until a shutdown has stopped every worker, then returns `Ok`.
///
/// The caller has bound the sockets, the notify socket and the control socket (or adopted
/// them from the hand-over) and made the process-wide settings (descriptor limit, child
/// subreaper, cgroup). `signals` are the signals the supervisor answers (boot: the process's
/// own, [`crate::daemon::signals::Signals`]); `shutdown` completing is a graceful stop, the
/// same as a SIGTERM (none when a stop is under way already). Must run in a `LocalSet` on a
/// current-thread runtime.
///
/// `run` is the only owner of `waitpid` in its process ([`Reaper`]: `waitpid(-1)` on every
/// SIGCHLD): while it runs, the process must have no children of its own, nor start any, but
/// through `run`; they would be reaped as strangers.
pub async fn run(
    parts: Parts,
    mut signals: impl SignalSource,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let Parts {
        mut manifest,
        sockets,
        notify,
        mut control,
        metrics: mut metrics_server,
        containment,
        manager,
        exe,
        detached,
        resumed,
        logs,
    } = parts;
    // Install the SIGCHLD listener before the first fork.
    let mut reaper = Reaper::new()?;
    if resumed.is_none() {
        intercept::resolve_defaults(&mut manifest);
    }
    let mut shutdown = std::pin::pin!(shutdown);
    let mut shutdown_asked = false;
    let mut signals_open = true;
    let mut driver = Driver::new(
        manifest,
        sockets,
        notify.path().to_path_buf(),
        containment,
        logs,
    )?;
    driver.manager = manager;
    driver.metrics_address = metrics_server.as_ref().map(|m| m.address);
    driver.exe = exe.map(|p| p.display().to_string());
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
            signal = signals.recv(), if signals_open => match signal {
                Some(signal) => driver.on_signal(&mut core, signal),
                None => signals_open = false,
            },
            () = &mut shutdown, if !shutdown_asked => {
                shutdown_asked = true;
                // Graceful only: a stop under way already is not made a kill (as a second
                // SIGTERM would).
                if !core.shutting_down() {
                    let stop = SupervisorSignal::Stop(clusterd_manifest::Signal::SIGTERM);
                    driver.on_signal(&mut core, stop);
                }
            }
            notification = notify.recv() => driver.on_notify(&mut core, notification),
            Some(request) = control.recv() => driver.on_control(&mut core, request),
            Some(trapped) = driver.intercepts.next() => match trapped {
                intercept::Trapped::Listening(worker) => {
                    driver.feed(&mut core, Event::Listening(worker));
                }
                intercept::Trapped::Unmatched(request) => driver.on_unmatched(&core, request),
            },
            Some(message) = driver.channels.recv() => {
                let ipc::Message { worker, text, ready } = message;
                driver.feed(&mut core, Event::Message { worker, text, ready });
            }
            Some(event) = driver.watches.recv() => driver.feed(&mut core, event),
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
            // A bind waiting for its socket is answered before the exec.
            for request in driver.intercepts.unmatched_now() {
                driver.on_unmatched(&core, request);
            }
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

/// What the driver holds: the OS resources and the views' own state.
struct Driver {
    manifest: Manifest,
    sockets: Sockets,
    notify_path: PathBuf,
    /// clusterd's environment without [`clusterd_manifest::RESERVED_ENV`].
    base_env: BTreeMap<String, String>,
    /// clusterd's own executable, from the parts (`CLUSTERD_EXE`).
    exe: Option<String>,
    dev_null: OwnedFd,
    started: Instant,
    metrics: std::rc::Rc<Metrics>,
    /// Where the metrics listener is, for status.
    metrics_address: Option<std::net::SocketAddr>,
    /// The tasks forwarding workers' output.
    output_tasks: JoinSet<()>,
    /// Control clients still owed a reply.
    replies: HashMap<ReplyTo, UnboundedSender<Reply>>,
    /// Final replies sent while shutting down, kept until their connection has written them
    /// (the channel closes): `clusterd stop` hears "stopping" even when no worker was left to
    /// wait for.
    last_replies: Vec<UnboundedSender<Reply>>,
    next_reply: u64,
    /// The workers' CPU and memory, measured off the loop for status and scrapes.
    meter: procstat::Meter,
    /// What holds each worker and its descendants (cgroups or process groups).
    containment: Containment,
    /// Each worker's name in the containment (its cgroup), from spawn until forgotten.
    contained: HashMap<WorkerId, String>,
    /// The trapped `bind`/`listen` calls of intercepted workers.
    intercepts: Intercepts,
    /// Sockets whose workers each listen on a socket of their own, steered (those clusterd
    /// only reserves: see `steering::plan`).
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
    /// Where output goes.
    logs: Logs,
    /// The background process of `start --detach`.
    detached: bool,
    /// The apps' `watch`es.
    watches: Watches,
}

impl Driver {
    fn new(
        manifest: Manifest,
        sockets: Sockets,
        notify_path: PathBuf,
        containment: Containment,
        logs: Logs,
    ) -> anyhow::Result<Self> {
        let base_env = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| !clusterd_manifest::RESERVED_ENV.contains(&k.as_str()))
            .collect();
        let steered = steering::reserved(sockets.parts().map(|(name, fd, ..)| (name, fd)));
        logs.hub().set_apps(manifest.apps.keys());
        let watches = Watches::new(&manifest);
        Ok(Driver {
            manifest,
            sockets,
            notify_path,
            base_env,
            exe: None,
            dev_null: std::fs::File::open("/dev/null")?.into(),
            started: Instant::now(),
            metrics: std::rc::Rc::default(),
            metrics_address: None,
            output_tasks: JoinSet::new(),
            replies: HashMap::new(),
            last_replies: Vec::new(),
            next_reply: 0,
            meter: procstat::Meter::new(procstat::FRESH),
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
            logs,
            watches,
        })
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
                            message: Chain(&error).to_string(),
                        });
                    if let Ok(pid) = &result {
                        if let Err(why) = self.containment.check_joined(&key, os::pid(*pid)) {
                            tracing::warn!(
                                event = "cgroup_join_failed",
                                app,
                                slot,
                                pid = pid.as_raw(),
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
                Action::Event(notice) => {
                    self.logs.event(&notice);
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

    fn on_signal(&mut self, core: &mut Core, signal: SupervisorSignal) {
        if signal == SupervisorSignal::Reread {
            self.host.reload_seen();
        }
        if signal == SupervisorSignal::Upgrade {
            self.pending_upgrade = Some(UpgradeRequest {
                binary: None,
                reply: None,
            });
        }
        self.feed(core, Event::Signal(signal));
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
            return self.answer_status(core, reply);
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
        let mut manifest = match clusterd_manifest::load(&self.manifest.path) {
            Ok(manifest) => manifest,
            Err(error) => {
                tracing::error!(
                    event = "reread_rejected",
                    "manifest re-read rejected, nothing changed:\n{}",
                    Chain(&error)
                );
                return None;
            }
        };
        let changed = match self
            .sockets
            .bind_new(&manifest.sockets, &self.manifest.sockets)
        {
            Ok(changed) => changed,
            Err(error) => {
                tracing::error!(
                    event = "reread_rejected",
                    "manifest re-read rejected, nothing changed: {}",
                    Chain(&error)
                );
                return None;
            }
        };
        for name in &changed {
            tracing::warn!(
                event = "socket_change_deferred",
                socket = %name,
                "socket {name}: a changed address takes effect only after a restart of clusterd"
            );
        }
        intercept::resolve_defaults(&mut manifest);
        // A socket stays as it was bound (sockets new here: one shared queue). Said once, when
        // its apps' balance changes across the line or it is new.
        let (before, wanted) = (
            steering::steered(&self.manifest),
            steering::steered(&manifest),
        );
        let tcp = manifest
            .sockets
            .iter()
            .filter(|(_, c)| matches!(c.listen, clusterd_manifest::Listen::Tcp(_)))
            .map(|(name, _)| name);
        let changed = |name: &&String| {
            let new = !self.manifest.sockets.contains_key(*name);
            wanted.contains(*name) != self.steered.contains(*name)
                && (new || before.contains(*name) != wanted.contains(*name))
        };
        for name in tcp.filter(changed) {
            let now = match self.steered.contains(name) {
                true => "a steered socket per worker",
                false => "one shared accept queue",
            };
            tracing::warn!(
                event = "balance_change_deferred",
                "socket {name}: its apps' balance takes effect only after a restart of \
                 clusterd; until then its workers keep {now}"
            );
        }
        self.logs.hub().set_apps(manifest.apps.keys());
        self.watches.update(&manifest);
        self.manifest = manifest.clone();
        self.release_ports();
        Some(manifest)
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

/// At exit, with every worker gone: what escaped its worker's containment and was re-parented
/// to clusterd (a `setsid` daemon, without cgroups) is asked to stop, then killed.
fn stop_adopted_orphans() {
    let orphans = containment::adopted_orphans(&[]);
    if orphans.is_empty() {
        return;
    }
    tracing::warn!(
        event = "escaped_processes_stopped",
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
