//! The supervisor: one task on a single-threaded runtime that owns all state and reacts to
//! events — child exits from the reaper, signals, sd_notify messages, control requests and its
//! own timers. Each event is handled by a small method; after every event, [`Supervisor::tick`]
//! carries out what has come due (respawns, readiness deadlines, stop timeouts, rollouts).
//!
//! Layout: [`state`] holds the data (apps, slots, workers), [`backoff`] the crash delays,
//! [`rollout`] the rolling reload, [`reconfigure`] the manifest re-read, [`commands`] the
//! control requests and [`status`] the snapshot they read.

mod backoff;
mod commands;
mod reconfigure;
mod rollout;
mod state;
mod status;

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

use clusterd_manifest::{Manifest, Readiness, RestartPolicy};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};

use crate::control::server::ControlServer;
use crate::metrics::{Metrics, MetricsServer};
use crate::notify::{Notification, NotifySocket};
use crate::output::{self, Stream};
use crate::reaper::{Exit, Reaper};
use crate::signals::{Signals, SupervisorSignal};
use crate::sockets::Sockets;
use crate::spawn::{self, SpawnError, SpawnSpec};
use state::{App, Phase, Slot, Worker};

/// The longest extension of a deadline a worker may ask for with `EXTEND_TIMEOUT_USEC`.
const MAX_EXTEND: Duration = Duration::from_secs(24 * 3600);

/// Everything the supervisor owns while it runs.
pub struct Supervisor {
    manifest: Manifest,
    sockets: Sockets,
    apps: BTreeMap<String, App>,
    /// Every worker process (group) still alive, by pid.
    workers: HashMap<Pid, Worker>,
    notify_path: PathBuf,
    /// clusterd's environment without [`clusterd_manifest::RESERVED_ENV`].
    base_env: BTreeMap<String, String>,
    dev_null: OwnedFd,
    /// Set once shutdown has begun.
    shutting_down: bool,
    started: Instant,
    /// `reload --wait` clients.
    reload_waiters: Vec<commands::ReloadWaiter>,
    /// The last CPU sample of each worker group: when, and its CPU seconds then.
    cpu_samples: HashMap<Pid, (Instant, f64)>,
    /// Counters and histograms for the metrics endpoint.
    metrics: Metrics,
    /// The tasks forwarding workers' output.
    output_tasks: JoinSet<()>,
}

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
) -> anyhow::Result<()> {
    // Install the SIGCHLD listener and the other signal handlers before the first fork.
    let mut reaper = Reaper::new()?;
    let mut signals = Signals::new()?;
    let mut supervisor = Supervisor::new(manifest, sockets, notify.path().to_path_buf())?;
    loop {
        supervisor.tick(Instant::now());
        if supervisor.finished() {
            break;
        }
        let deadline = supervisor
            .next_deadline()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            exits = reaper.next() => {
                for exit in exits {
                    supervisor.on_exit(exit);
                }
            }
            Some(signal) = signals.recv() => supervisor.on_signal(signal),
            notification = notify.recv() => supervisor.on_notify(notification),
            Some(request) = control.recv() => supervisor.on_control(request),
            Some(scrape) = async { match metrics_server.as_mut() { Some(m) => m.recv().await, None => None } } => {
                let status = supervisor.status();
                let _ = scrape.send(supervisor.metrics.encode(&status));
            }
            _ = sleep_until(deadline) => {}
        }
    }
    supervisor.sockets.remove_files();
    // Every worker process is gone; what they wrote last may still be in the pipes (or held
    // open by a process that left its group: hence the bound).
    let mut output = std::mem::take(&mut supervisor.output_tasks);
    let drained = async { while output.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(Duration::from_secs(2), drained).await;
    tracing::info!("all workers stopped; exiting");
    Ok(())
}

impl Supervisor {
    fn new(manifest: Manifest, sockets: Sockets, notify_path: PathBuf) -> anyhow::Result<Self> {
        let now = Instant::now();
        let apps = manifest
            .apps
            .iter()
            .map(|(name, config)| (name.clone(), App::new(config.clone(), now)))
            .collect();
        let base_env = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| !clusterd_manifest::RESERVED_ENV.contains(&k.as_str()))
            .collect();
        let dev_null = std::fs::File::open("/dev/null")?.into();
        Ok(Supervisor {
            manifest,
            sockets,
            apps,
            workers: HashMap::new(),
            notify_path,
            base_env,
            dev_null,
            shutting_down: false,
            started: now,
            reload_waiters: Vec::new(),
            cpu_samples: HashMap::new(),
            metrics: Metrics::default(),
            output_tasks: JoinSet::new(),
        })
    }

    /// True when shutdown has begun and every worker is gone.
    fn finished(&self) -> bool {
        self.shutting_down && self.workers.is_empty()
    }

    // ----- events -----

    fn on_signal(&mut self, signal: SupervisorSignal) {
        match signal {
            SupervisorSignal::Stop(sig) if !self.shutting_down => self.begin_shutdown(sig.as_str()),
            SupervisorSignal::Stop(sig) => self.force_shutdown(sig.as_str()),
            SupervisorSignal::Reload => self.request_reload(None),
            SupervisorSignal::Reread => self.reread_manifest(),
            SupervisorSignal::ScaleBy(delta) => self.scale_single_app(delta),
        }
    }

    /// A reaped process: a worker, or a process adopted as child subreaper.
    fn on_exit(&mut self, exit: Exit) {
        let now = Instant::now();
        let Some(worker) = self.workers.get_mut(&exit.pid) else {
            tracing::debug!("reaped adopted process {} ({})", exit.pid, exit.status);
            return;
        };
        worker.exited = Some(exit.status);
        let uptime = now - worker.started;
        let label = worker.label();
        let (app_name, slot_index, generation) =
            (worker.app.clone(), worker.slot, worker.generation);
        let kill_reason = match worker.phase {
            Phase::Stopping { killed: true, .. } => Some("killed"),
            _ => None,
        };
        let was_starting = worker.phase == Phase::Starting;

        let role = self
            .apps
            .get(&app_name)
            .and_then(|app| app.slots.get(slot_index))
            .map(|slot| {
                if slot.current == Some(exit.pid) {
                    Role::Current
                } else if slot.candidate == Some(exit.pid) {
                    Role::Candidate
                } else {
                    Role::Retired
                }
            })
            .unwrap_or(Role::Retired);
        match role {
            Role::Current => {
                self.on_unexpected_exit(&app_name, slot_index, exit, uptime, &label, kill_reason)
            }
            Role::Candidate => {
                let slot =
                    &mut self.apps.get_mut(&app_name).expect("checked above").slots[slot_index];
                slot.candidate = None;
                slot.last_exit = Some(format!("{} after {}", exit.status, human(uptime)));
                let when = if was_starting {
                    "before ready"
                } else {
                    "before it replaced the old worker"
                };
                let reason = format!(
                    "slot {slot_index} generation {generation} exited with {} {when}",
                    exit.status
                );
                tracing::warn!(
                    "{label} pid {} (generation {generation}) exited with {} {when}",
                    exit.pid,
                    exit.status
                );
                self.abort_rollout(&app_name, reason);
            }
            Role::Retired => {
                tracing::info!(
                    "{label} pid {} (generation {generation}) stopped: {} after {}",
                    exit.pid,
                    exit.status,
                    human(uptime)
                );
            }
        }
        self.drain_or_forget(exit.pid, now);
    }

    /// The serving worker of a slot died: record it, and schedule its replacement by policy.
    fn on_unexpected_exit(
        &mut self,
        app_name: &str,
        slot_index: usize,
        exit: Exit,
        uptime: Duration,
        label: &str,
        kill_reason: Option<&str>,
    ) {
        let now = Instant::now();
        let shutting_down = self.shutting_down;
        let app = self
            .apps
            .get_mut(app_name)
            .expect("a current worker's app exists");
        let restart = match app.config.restart {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !exit.status.success(),
            RestartPolicy::Never => false,
        } && !shutting_down;
        let backoff = app.config.backoff;
        let slot = &mut app.slots[slot_index];
        slot.current = None;
        let how = match kill_reason {
            Some(reason) => format!("{} ({reason})", exit.status),
            None => exit.status.to_string(),
        };
        slot.last_exit = Some(format!("{how} after {}", human(uptime)));
        if !restart {
            tracing::warn!(
                "{label} pid {} exited with {how} after {}; not restarting",
                exit.pid,
                human(uptime)
            );
            return;
        }
        slot.crash_streak = backoff::next_streak(&backoff, slot.crash_streak, uptime);
        slot.restarts += 1;
        self.metrics.record_restart(app_name);
        let delay = backoff::delay(&backoff, slot.crash_streak);
        slot.respawn_at = Some(now + delay);
        let flapping = if slot.crash_streak >= backoff::FLAPPING_STREAK {
            format!(" (flapping: {} crashes in a row)", slot.crash_streak)
        } else {
            String::new()
        };
        tracing::warn!(
            "{label} pid {} exited with {how} after {}; restarting in {}{flapping}",
            exit.pid,
            human(uptime),
            human(delay)
        );
    }

    /// After a worker's process exited: if other members of its process group live on, ask
    /// them to stop too (SIGKILL after the stop timeout); otherwise forget the worker.
    fn drain_or_forget(&mut self, pid: Pid, now: Instant) {
        if !group_alive(pid) {
            self.workers.remove(&pid);
            return;
        }
        if let Some(worker) = self.workers.get(&pid)
            && !matches!(worker.phase, Phase::Stopping { .. })
        {
            tracing::info!(
                "{} pid {pid} left processes in its group; stopping them",
                worker.label()
            );
            self.stop_worker(pid, now);
        }
    }

    fn on_notify(&mut self, notification: Notification) {
        let now = Instant::now();
        let Some(pid) = self.worker_of(notification.pid) else {
            tracing::debug!(
                "ignored a notification from pid {}, not a worker",
                notification.pid
            );
            return;
        };
        let Some(worker) = self.workers.get_mut(&pid) else {
            return;
        };
        let mut triggered = false;
        for (key, value) in &notification.assignments {
            match key.as_str() {
                "READY" if value == "1" && worker.phase == Phase::Starting => {
                    worker.phase = Phase::Ready { since: now };
                    self.metrics
                        .record_ready(&worker.app, (now - worker.started).as_secs_f64());
                    tracing::info!(
                        "{} pid {pid} (generation {}) ready after {}",
                        worker.label(),
                        worker.generation,
                        human(now - worker.started)
                    );
                }
                "STATUS" => worker.status_text = Some(value.clone()),
                "WATCHDOG" if value == "1" => worker.last_heartbeat = now,
                "WATCHDOG" if value == "trigger" => {
                    tracing::warn!(
                        "{} pid {pid} triggered its watchdog; killing it",
                        worker.label()
                    );
                    triggered = true;
                }
                "EXTEND_TIMEOUT_USEC" => {
                    // Capped, so that no value a worker sends can overflow the clock.
                    if let Ok(usec) = value.parse::<u64>() {
                        let until = now + Duration::from_micros(usec).min(MAX_EXTEND);
                        match &mut worker.phase {
                            Phase::Starting => {
                                worker.ready_deadline = worker.ready_deadline.max(until)
                            }
                            Phase::Stopping {
                                deadline,
                                killed: false,
                            } => *deadline = (*deadline).max(until),
                            _ => {}
                        }
                    }
                }
                "STOPPING" if value == "1" => {
                    tracing::info!("{} pid {pid} says it is stopping", worker.label());
                }
                _ => {}
            }
        }
        // Dropping the passed fds acknowledges a `clusterd notify` barrier.
        drop(notification.fds);
        if triggered {
            self.kill_worker(pid, now);
        }
    }

    /// The worker a notification sender belongs to: the worker itself, a process in its
    /// process group (a shell wrapper's child, `clusterd notify`), or a descendant.
    fn worker_of(&self, sender: Pid) -> Option<Pid> {
        if self.workers.contains_key(&sender) {
            return Some(sender);
        }
        if let Ok(group) = nix::unistd::getpgid(Some(sender))
            && self.workers.contains_key(&group)
        {
            return Some(group);
        }
        let mut pid = sender;
        for _ in 0..32 {
            pid = parent_of(pid)?;
            if self.workers.contains_key(&pid) {
                return Some(pid);
            }
        }
        None
    }

    // ----- timers -----

    /// Carries out everything that has come due at `now`.
    fn tick(&mut self, now: Instant) {
        self.check_workers(now);
        self.respawn_due(now);
        let names: Vec<String> = self.apps.keys().cloned().collect();
        for name in names {
            self.advance_rollout(&name, now);
        }
        self.settle_waiters();
    }

    /// Readiness by delay, readiness and watchdog deadlines, stop timeouts, drained groups.
    fn check_workers(&mut self, now: Instant) {
        let mut kill = Vec::new();
        let mut forget = Vec::new();
        let mut late = Vec::new();
        for (pid, worker) in &mut self.workers {
            let app = self.apps.get(&worker.app);
            if worker.exited.is_some() && !group_alive(*pid) {
                forget.push(*pid);
                continue;
            }
            match worker.phase {
                Phase::Starting => {
                    if let Some(Readiness::Delay(delay)) = app.map(|a| a.config.ready)
                        && now >= worker.started + delay
                    {
                        worker.phase = Phase::Ready { since: now };
                        self.metrics
                            .record_ready(&worker.app, (now - worker.started).as_secs_f64());
                        tracing::info!(
                            "{} pid {pid} (generation {}) ready",
                            worker.label(),
                            worker.generation
                        );
                    } else if now >= worker.ready_deadline {
                        late.push(*pid);
                    }
                }
                Phase::Ready { .. } => {
                    if let Some(period) = app.and_then(|a| a.config.watchdog)
                        && now >= worker.last_heartbeat + period
                    {
                        tracing::warn!(
                            "{} pid {pid}: no watchdog heartbeat for {}; killing it",
                            worker.label(),
                            human(now - worker.last_heartbeat)
                        );
                        kill.push(*pid);
                    }
                }
                Phase::Stopping {
                    deadline,
                    killed: false,
                } if now >= deadline => {
                    tracing::warn!(
                        "{} pid {pid} still running {} after its stop signal; sending SIGKILL",
                        worker.label(),
                        human(worker.stop_timeout)
                    );
                    kill.push(*pid);
                }
                Phase::Stopping { .. } => {}
            }
        }
        for pid in forget {
            self.workers.remove(&pid);
        }
        for pid in late {
            self.on_not_ready(pid, now);
        }
        for pid in kill {
            self.kill_worker(pid, now);
        }
    }

    /// A worker missed its `ready_timeout`: a rollout's candidate aborts the rollout; any other
    /// worker is killed and replaced like a crash.
    fn on_not_ready(&mut self, pid: Pid, now: Instant) {
        let Some(worker) = self.workers.get(&pid) else {
            return;
        };
        let (app_name, slot, generation, label) = (
            worker.app.clone(),
            worker.slot,
            worker.generation,
            worker.label(),
        );
        let timeout = self
            .apps
            .get(&app_name)
            .map_or(Duration::ZERO, |a| a.config.ready_timeout);
        tracing::warn!(
            "{label} pid {pid} (generation {generation}) not ready within {}; killing it",
            human(timeout)
        );
        let is_candidate = self
            .apps
            .get(&app_name)
            .and_then(|a| a.slots.get(slot))
            .is_some_and(|s| s.candidate == Some(pid));
        self.kill_worker(pid, now);
        if is_candidate {
            if let Some(s) = self
                .apps
                .get_mut(&app_name)
                .and_then(|a| a.slots.get_mut(slot))
            {
                s.candidate = None;
            }
            self.abort_rollout(
                &app_name,
                format!(
                    "slot {slot} generation {generation} was not ready within {}",
                    human(timeout)
                ),
            );
        }
    }

    /// Starts workers in slots that are due and allowed to.
    fn respawn_due(&mut self, now: Instant) {
        if self.shutting_down {
            return;
        }
        let mut due = Vec::new();
        for (name, app) in &self.apps {
            for (index, slot) in app.slots.iter().enumerate() {
                if slot.current.is_none()
                    && slot.candidate.is_none()
                    && slot.failed.is_none()
                    && slot.respawn_at.is_some_and(|at| at <= now)
                {
                    due.push((name.clone(), index, slot.generation));
                }
            }
        }
        for (name, index, generation) in due {
            let result = self.spawn_worker(&name, index, generation, now);
            let slot = &mut self.apps.get_mut(&name).expect("listed above").slots[index];
            slot.respawn_at = None;
            match result {
                Ok(pid) => slot.current = Some(pid),
                Err(error) => self.on_spawn_failure(&name, index, error, now),
            }
        }
    }

    /// A command that cannot be executed fails the slot once (no crash storm); a transient
    /// failure (fork) is retried with the backoff.
    fn on_spawn_failure(&mut self, name: &str, index: usize, error: SpawnError, now: Instant) {
        let app = self.apps.get_mut(name).expect("spawned from it");
        let backoff = app.config.backoff;
        let slot = &mut app.slots[index];
        match error {
            SpawnError::Os { .. } => {
                slot.crash_streak = slot.crash_streak.saturating_add(1);
                let delay = backoff::delay(&backoff, slot.crash_streak.max(2));
                tracing::error!("{name}[{index}]: {error}; retrying in {}", human(delay));
                slot.respawn_at = Some(now + delay);
            }
            error => {
                tracing::error!(
                    "{name}[{index}]: {error}; the slot stays down until the next reload or restart"
                );
                slot.failed = Some(error.to_string());
            }
        }
    }

    /// The earliest moment at which [`Self::tick`] has something to do.
    fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |at: Instant| next = Some(next.map_or(at, |n: Instant| n.min(at)));
        for worker in self.workers.values() {
            let app = self.apps.get(&worker.app);
            match worker.phase {
                Phase::Starting => {
                    consider(worker.ready_deadline);
                    if let Some(Readiness::Delay(delay)) = app.map(|a| a.config.ready) {
                        consider(worker.started + delay);
                    }
                }
                Phase::Ready { since } => {
                    if let Some(period) = app.and_then(|a| a.config.watchdog) {
                        consider(worker.last_heartbeat + period);
                    }
                    if let Some(bake) = app
                        .filter(|a| a.rollout.is_some())
                        .map(|a| a.config.reload.bake)
                    {
                        consider(since + bake);
                    }
                }
                Phase::Stopping {
                    deadline,
                    killed: false,
                } => consider(deadline),
                Phase::Stopping { .. } => {}
            }
        }
        for app in self.apps.values() {
            for slot in &app.slots {
                if let Some(at) = slot.respawn_at
                    && slot.failed.is_none()
                {
                    consider(at);
                }
            }
        }
        next
    }

    // ----- actions -----

    /// Forks and execs a worker for `slot` of `app_name`.
    fn spawn_worker(
        &mut self,
        app_name: &str,
        slot: usize,
        generation: u64,
        now: Instant,
    ) -> Result<Pid, SpawnError> {
        let app = self.apps.get(app_name).expect("spawning for a known app");
        let config = &app.config;
        let program = spawn::resolve_program(
            &config.command[0],
            &config.cwd,
            config
                .env
                .get("PATH")
                .map(|p| p.as_ref())
                .or(self.base_env.get("PATH").map(|p| p.as_ref())),
        )
        .ok_or_else(|| SpawnError::NotFound {
            program: config.command[0].clone(),
        })?;

        let mut env = self.base_env.clone();
        env.extend(config.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let mut listen_fds = Vec::with_capacity(config.sockets.len());
        for name in &config.sockets {
            if let Some(socket) = self.sockets.get(name) {
                listen_fds.push(socket.raw_fd());
            }
        }
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
        env.insert("CLUSTERD_APP".into(), app_name.to_owned());
        env.insert("CLUSTERD_WORKER_ID".into(), slot.to_string());
        env.insert("CLUSTERD_GENERATION".into(), generation.to_string());
        if let Some(segment) = &config.kv_segment {
            env.insert("CLUSTERD_KV_SEGMENT".into(), segment.clone());
        }
        if let Ok(exe) = std::env::current_exe() {
            env.insert("CLUSTERD_EXE".into(), exe.display().to_string());
        }
        let env: Vec<(String, String)> = env.into_iter().collect();

        let label = format!("{app_name}[{slot}]");
        let stdout = output::forward(label.clone(), Stream::Stdout, &mut self.output_tasks)
            .map_err(|cause| SpawnError::Os {
                what: "pipe2",
                cause,
            })?;
        let stderr = output::forward(label.clone(), Stream::Stderr, &mut self.output_tasks)
            .map_err(|cause| SpawnError::Os {
                what: "pipe2",
                cause,
            })?;
        let pid = spawn::spawn(&SpawnSpec {
            program: &program,
            argv: &config.command,
            env: &env,
            cwd: &config.cwd,
            listen_fds: &listen_fds,
            stdio: [&self.dev_null, &stdout, &stderr],
            cgroup_procs: None,
        })?;
        let phase = match config.ready {
            Readiness::Immediate => {
                self.metrics.record_ready(app_name, 0.0);
                Phase::Ready { since: now }
            }
            _ => Phase::Starting,
        };
        tracing::info!(
            "{label} started pid {pid} (generation {generation}): {}",
            program.display()
        );
        self.workers.insert(
            pid,
            Worker {
                app: app_name.to_owned(),
                slot,
                generation,
                started: now,
                phase,
                ready_deadline: now + config.ready_timeout,
                last_heartbeat: now,
                status_text: None,
                stop_signal: config.stop_signal,
                stop_timeout: config.stop_timeout,
                exited: None,
            },
        );
        Ok(pid)
    }

    /// Asks a worker's process group to stop with its stop signal; SIGKILL follows after its
    /// stop timeout.
    fn stop_worker(&mut self, pid: Pid, now: Instant) {
        let Some(worker) = self.workers.get_mut(&pid) else {
            return;
        };
        if matches!(worker.phase, Phase::Stopping { .. }) {
            return;
        }
        let _ = killpg(pid, worker.stop_signal);
        worker.phase = Phase::Stopping {
            deadline: now + worker.stop_timeout,
            killed: false,
        };
    }

    /// Sends SIGKILL to a worker's process group.
    fn kill_worker(&mut self, pid: Pid, now: Instant) {
        let Some(worker) = self.workers.get_mut(&pid) else {
            return;
        };
        let _ = killpg(pid, Signal::SIGKILL);
        worker.phase = Phase::Stopping {
            deadline: now,
            killed: true,
        };
    }

    /// Stops every worker gracefully; clusterd exits once all are gone.
    fn begin_shutdown(&mut self, why: &str) {
        let now = Instant::now();
        tracing::info!(
            "{why}: stopping {} workers (again to kill them at once)",
            self.workers.len()
        );
        self.shutting_down = true;
        for app in self.apps.values_mut() {
            app.rollout = None;
            for slot in &mut app.slots {
                slot.current = None;
                slot.candidate = None;
                slot.respawn_at = None;
            }
        }
        let pids: Vec<Pid> = self.workers.keys().copied().collect();
        for pid in pids {
            self.stop_worker(pid, now);
        }
    }

    /// A second stop signal: SIGKILL to everything left.
    fn force_shutdown(&mut self, why: &str) {
        let now = Instant::now();
        tracing::warn!("{why} again: killing {} workers", self.workers.len());
        let pids: Vec<Pid> = self.workers.keys().copied().collect();
        for pid in pids {
            self.kill_worker(pid, now);
        }
    }

    /// SIGTTIN/SIGTTOU: one worker more or fewer for the manifest's only app.
    fn scale_single_app(&mut self, delta: i64) {
        if self.apps.len() != 1 {
            tracing::warn!(
                "scaling by signal needs a manifest with exactly one app; use `clusterd scale APP N`"
            );
            return;
        }
        let Some((name, app)) = self.apps.iter().next() else {
            return;
        };
        let target = (app.slots.len() as i64 + delta).max(0) as usize;
        let name = name.clone();
        self.scale(&name, target);
    }

    /// Sets the number of slots of an app: new slots start now, removed ones (the highest)
    /// stop gracefully.
    fn scale(&mut self, name: &str, target: usize) {
        let now = Instant::now();
        let Some(app) = self.apps.get_mut(name) else {
            return;
        };
        let before = app.slots.len();
        if target == before {
            return;
        }
        tracing::info!("scaling {name} from {before} to {target} workers");
        app.config.workers = target;
        let generation = app
            .slots
            .iter()
            .map(|s| s.generation)
            .max()
            .unwrap_or(app.generation);
        let mut to_stop = Vec::new();
        if target > before {
            app.slots
                .extend((before..target).map(|_| Slot::new(generation, now)));
        } else {
            for slot in app.slots.drain(target..) {
                to_stop.extend(slot.current);
                to_stop.extend(slot.candidate);
            }
            if let Some(rollout) = &mut app.rollout {
                rollout.forget_slots_from(target);
            }
        }
        for pid in to_stop {
            self.stop_worker(pid, now);
        }
    }
}

/// What a reaped worker was to its slot.
enum Role {
    /// The slot's serving worker: its exit was unexpected.
    Current,
    /// A rollout's new worker, not yet promoted.
    Candidate,
    /// Already replaced or told to stop.
    Retired,
}

/// True while any process of the group `pgid` exists.
fn group_alive(pgid: Pid) -> bool {
    match killpg(pgid, None) {
        Ok(()) => true,
        Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    }
}

/// The parent of `pid`, from `/proc/<pid>/stat`.
fn parent_of(pid: Pid) -> Option<Pid> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: parse after it.
    let after = &stat[stat.rfind(')')? + 2..];
    let ppid: i32 = after.split(' ').nth(1)?.parse().ok()?;
    (ppid > 1).then(|| Pid::from_raw(ppid))
}

/// A duration for logs: `850ms`, `2.3s`, `4m10s`.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}
