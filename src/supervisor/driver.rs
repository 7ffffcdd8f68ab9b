//! The driver: the one place where the supervisor touches the OS. A single task on a
//! single-threaded runtime `select!`s over child exits (the reaper), signals, sd_notify
//! datagrams, control requests, metrics scrapes and the core's next deadline; it turns each
//! into an [`Event`] for the [`Core`] and carries out the [`Action`]s that come back (fork and
//! exec, signals to process groups, replies, log lines, metrics). Nothing polls: with nothing
//! due, the loop sleeps until the next event.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clusterd_manifest::Manifest;
use clusterd_proto::{Reply, Request, SocketStatus, Status};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinSet;
use tracing::Level;

use super::core::Core;
use super::event::{Action, Event, Observation, ReplyTo, SpawnFailure};
use super::state::WorkerId;
use super::status::{CpuSampler, Measured};
use crate::containment::{self, Containment};
use crate::control::server::{ControlRequest, ControlServer};
use crate::intercept::{self, Intercepts, Trap};
use crate::ipc::{self, Channels};
use crate::metrics::{Metrics, MetricsServer, Scrape};
use crate::notify::{Notification, NotifySocket};
use crate::output::{self, Stream};
use crate::procstat;
use crate::reaper::{self, Exit, Reaper};
use crate::signals::Signals;
use crate::sockets::Sockets;
use crate::spawn::{self, SpawnError, SpawnSpec};
use crate::steering::{self, Steering};

/// How long, at exit, the workers' last output may take to drain.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// How long, at exit, processes that escaped their worker's process group have between
/// SIGTERM and SIGKILL.
const ORPHAN_GRACE: Duration = Duration::from_secs(2);

/// Runs the supervisor until a shutdown has stopped every worker.
///
/// The caller has bound the sockets, the notify socket and the control socket; signals are
/// handled here. Returns when every worker has exited.
pub async fn run(
    manifest: Manifest,
    sockets: Sockets,
    notify: NotifySocket,
    mut control: ControlServer,
    mut metrics_server: Option<MetricsServer>,
    containment: Containment,
) -> anyhow::Result<()> {
    // Install the SIGCHLD listener and the other signal handlers before the first fork.
    let mut reaper = Reaper::new()?;
    let mut signals = Signals::new()?;
    let mut core = Core::new(&manifest, Instant::now());
    let mut driver = Driver::new(manifest, sockets, notify.path().to_path_buf(), containment)?;
    let first = core.tick(Instant::now());
    driver.perform(&mut core, first);
    while !core.finished() {
        driver.metrics.record_wakeup();
        let deadline = core
            .next_deadline()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            exits = reaper.next() => driver.on_exits(&mut core, exits),
            Some(signal) = signals.recv() => driver.feed(&mut core, Event::Signal(signal)),
            notification = notify.recv() => driver.on_notify(&mut core, notification),
            Some(request) = control.recv() => driver.on_control(&mut core, request),
            Some(worker) = driver.intercepts.listening() => {
                driver.feed(&mut core, Event::Listening(worker));
            }
            Some(message) = driver.channels.recv() => {
                let ipc::Message { worker, text, ready } = message;
                driver.feed(&mut core, Event::Message { worker, text, ready });
            }
            Some(scrape) = async { match metrics_server.as_mut() { Some(m) => m.recv().await, None => None } } => {
                driver.on_scrape(&core, scrape);
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                let actions = core.tick(Instant::now());
                driver.perform(&mut core, actions);
                driver.check_lingering(&mut core);
            }
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
    /// clusterd's own executable, captured once at start (`CLUSTERD_EXE`).
    exe: Option<String>,
    dev_null: OwnedFd,
    started: Instant,
    metrics: Metrics,
    /// The tasks forwarding workers' output.
    output_tasks: JoinSet<()>,
    /// Control clients still owed a reply.
    replies: HashMap<ReplyTo, UnboundedSender<Reply>>,
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
    /// Workers' message channels (`ipc`).
    channels: Channels,
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
            next_reply: 0,
            status_cpu: CpuSampler::default(),
            containment,
            contained: HashMap::new(),
            intercepts: Intercepts::default(),
            steered,
            steering: Steering::default(),
            channels: Channels::default(),
        })
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
                        .map_err(|error| SpawnFailure {
                            transient: error.is_transient(),
                            message: error.to_string(),
                        });
                    if result.is_ok() {
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
                    if signal == Signal::SIGKILL {
                        self.containment.kill(key, pid);
                    } else {
                        self.containment.signal(key, pid, signal);
                    }
                    None
                }
                Action::Forget { worker } => {
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
                    if last {
                        self.replies.remove(&to);
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
                    let measured = workers
                        .into_iter()
                        .filter_map(|(id, pid)| Some((id, usage.get(&pid)?.rss_bytes)))
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
            let group_empty = core
                .worker_by_pid(exit.pid)
                .is_none_or(|id| self.containment.is_empty(self.key(id), exit.pid));
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
            .filter(|(id, pid)| self.containment.is_empty(self.key(*id), *pid))
            .map(|(id, _)| id)
            .collect();
        for id in empty {
            self.feed(core, Event::GroupEmpty(id));
        }
    }

    fn on_notify(&mut self, core: &mut Core, notification: Notification) {
        match sender_worker(core, notification.pid) {
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
        self.next_reply += 1;
        let to = ReplyTo(self.next_reply);
        self.replies.insert(to, reply);
        self.feed(core, Event::Control { request, reply: to });
    }

    fn on_scrape(&mut self, core: &Core, scrape: Scrape) {
        let status = self.status(core, false);
        let _ = scrape.send(self.metrics.encode(&status));
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
    ) -> Result<Pid, SpawnError> {
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
        let listen_fds: Vec<_> = config
            .sockets
            .iter()
            .filter_map(|name| Some(self.sockets.get(name)?.raw_fd()))
            .collect();
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
        let stdout = output::forward(label.clone(), Stream::Stdout, &mut self.output_tasks)
            .map_err(pipe_error)?;
        let stderr = output::forward(label.clone(), Stream::Stderr, &mut self.output_tasks)
            .map_err(pipe_error)?;
        // Without its own cgroup the worker is still contained by its process group.
        let cgroup_procs = self
            .containment
            .prepare_worker(key)
            .unwrap_or_else(|error| {
                tracing::warn!("{error}; {label} runs in its process group only");
                None
            });
        let trap = match config.intercept {
            true => Some(Trap::new().map_err(|cause| SpawnError::Os {
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
        })?;
        if let Some((mine, _)) = channel
            && let Err(error) = self.channels.watch(worker, label.clone(), mine)
        {
            tracing::error!("{label} pid {pid}: cannot serve its message channel: {error}");
        }
        if let Some(trap) = trap {
            // The child sent the fd before it exec'd. Without it, its trapped calls fail with
            // ENOSYS once `trap` is dropped: the worker sees an error, clusterd goes on.
            let watched = trap.receive().and_then(|notify_fd| {
                let held = self.held(worker, &config.sockets)?;
                self.intercepts
                    .watch(worker, label.clone(), notify_fd, held)
            });
            if let Err(error) = watched {
                tracing::error!("{label} pid {pid}: cannot answer its bind()/listen(): {error}");
            }
        }
        Ok(pid)
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
            held.push(intercept::Held::new(name, &config.listen, fd)?);
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
    if let Ok(group) = nix::unistd::getpgid(Some(sender))
        && let Some(worker) = core.worker_by_pid(group)
    {
        return Some(worker);
    }
    let mut pid = sender;
    for _ in 0..32 {
        pid = procstat::parent_of(pid)?;
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

fn log(level: Level, message: &str) {
    match level {
        Level::ERROR => tracing::error!("{message}"),
        Level::WARN => tracing::warn!("{message}"),
        Level::INFO => tracing::info!("{message}"),
        Level::DEBUG => tracing::debug!("{message}"),
        Level::TRACE => tracing::trace!("{message}"),
    }
}
