//! Transition tests of the core, without processes: a small simulator plays the driver
//! (it hands out fake pids for spawns and records signals and replies), and each test drives
//! the core through events and the passing of time. The last test drives random event
//! sequences and checks the invariants after every step.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::process::Pid;
use clusterd_manifest::Signal;
use clusterd_proto::{ReloadResult, Reply, Request};

use super::core::Core;
use super::event::{Action, Event, Notice, ReplyTo, SpawnFailure, What};
use super::state::{Phase, ReloadOutcome, SlotState, WorkerId};
use crate::process::ExitStatus;
use crate::process::SupervisorSignal;

const MS: Duration = Duration::from_millis(1);

/// The driver's part, simulated.
struct Sim {
    core: Core,
    now: Instant,
    next_pid: i32,
    /// Signals sent, in order.
    signals: Vec<(Pid, Signal)>,
    /// Replies sent, in order.
    replies: Vec<(ReplyTo, Reply)>,
    /// Typed events, in order.
    events: Vec<Notice>,
    /// How many spawns were asked for.
    spawns: usize,
    /// What the next spawns answer (`None`: a new pid).
    spawn_failures: Vec<SpawnFailure>,
    rereads: usize,
    /// Steering changes, in order.
    steered: Vec<(WorkerId, bool)>,
    /// For each steering change, how many signals had been sent before it.
    steered_after: Vec<usize>,
    /// Resident memory the driver would measure, by pid (0 when absent).
    memory: std::collections::HashMap<Pid, u64>,
    /// Messages delivered on workers' channels, in order.
    delivered: Vec<(WorkerId, String)>,
    /// Channels closed (`stop_signal = "disconnect"`), in order.
    disconnected: Vec<WorkerId>,
    /// Each slot's worker and whether it was ready, after the last step.
    occupants: Occupants,
    /// An operator's restart is under way: a slot may lose its ready worker at once.
    restarting: bool,
}

type Occupants = std::collections::BTreeMap<(String, usize), (WorkerId, bool)>;

fn manifest(text: &str) -> clusterd_manifest::Manifest {
    clusterd_manifest::parse(text, Path::new("/srv/app/clusterd.toml")).expect("valid manifest")
}

impl Sim {
    fn new(text: &str) -> Sim {
        let now = Instant::now();
        let mut sim = Sim {
            core: Core::new(&manifest(text), now),
            now,
            next_pid: 100,
            signals: Vec::new(),
            replies: Vec::new(),
            events: Vec::new(),
            spawns: 0,
            spawn_failures: Vec::new(),
            rereads: 0,
            memory: std::collections::HashMap::new(),
            steered: Vec::new(),
            steered_after: Vec::new(),
            delivered: Vec::new(),
            disconnected: Vec::new(),
            occupants: Occupants::new(),
            restarting: false,
        };
        let actions = sim.core.tick(now);
        sim.perform(actions);
        sim
    }

    fn perform(&mut self, actions: Vec<Action>) {
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Spawn { worker, .. } => {
                    self.spawns += 1;
                    let result = if self.spawn_failures.is_empty() {
                        self.next_pid += 1;
                        Ok(Pid::from_raw(self.next_pid))
                    } else {
                        Err(self.spawn_failures.remove(0))
                    };
                    let more = self.core.on(self.now, Event::Spawned { worker, result });
                    queue.extend(more);
                }
                Action::Signal { pid, signal, .. } => self.signals.push((pid, signal)),
                Action::Reply { to, reply } => self.replies.push((to, reply)),
                Action::Event(notice) => self.events.push(notice),
                Action::Reread => self.rereads += 1,
                Action::MeasureMemory(workers) => {
                    let measured = workers
                        .into_iter()
                        .map(|(id, pid)| (id, self.memory.get(&pid).copied().unwrap_or(0)))
                        .collect();
                    queue.extend(self.core.on(self.now, Event::Memory(measured)));
                }
                Action::Steer { worker, serving } => {
                    self.steered.push((worker, serving));
                    self.steered_after.push(self.signals.len());
                }
                Action::Deliver { worker, text } => self.delivered.push((worker, text.to_string())),
                Action::Disconnect { worker } => self.disconnected.push(worker),
                Action::Forget { .. } | Action::Observe(_) => {}
            }
        }
        self.check_invariants();
        self.check_replacements();
    }

    /// Each slot's worker, and whether it is ready.
    fn occupants(&self) -> Occupants {
        let mut out = Occupants::new();
        for (name, app) in &self.core.apps {
            for (index, slot) in app.slots.iter().enumerate() {
                if let Some(id) = slot.worker() {
                    let ready = self.core.workers.get(&id).is_some_and(|w| w.is_ready());
                    out.insert((name.clone(), index), (id, ready));
                }
            }
        }
        out
    }

    /// A slot whose ready worker was retired (by a rollout) in favour of another worker holds
    /// a ready one: a rollout stops an old worker only once its replacement is ready, so the
    /// promised serving workers are there throughout. Only an operator's restart of the slot
    /// replaces a ready worker at once.
    fn check_replacements(&mut self) {
        let now = self.occupants();
        if !self.restarting {
            for (key, (new, _)) in &now {
                let Some((old, true)) = self.occupants.get(key).copied() else {
                    continue;
                };
                if old == *new {
                    continue;
                }
                let retired = self.core.workers.get(&old).is_some_and(|w| {
                    matches!(
                        w.phase,
                        Phase::Stopping {
                            why: super::state::StopReason::Retired,
                            ..
                        } | Phase::Draining {
                            why: super::state::StopReason::Retired,
                            ..
                        }
                    )
                });
                let ready = self.core.workers.get(new).is_some_and(|w| w.is_ready());
                assert!(
                    !retired || ready,
                    "{key:?}: a ready worker was retired for one that is not ready"
                );
            }
        }
        self.occupants = now;
    }

    fn on(&mut self, event: Event) {
        let actions = self.core.on(self.now, event);
        self.perform(actions);
    }

    /// Lets `d` pass, waking at every deadline on the way, as the driver's loop does.
    /// Returns how many times the loop woke.
    fn advance(&mut self, d: Duration) -> usize {
        let end = self.now + d;
        let mut wakes = 0;
        while let Some(at) = self.core.next_deadline().filter(|at| *at <= end) {
            self.now = at;
            wakes += 1;
            assert!(wakes < 10_000, "the loop would spin");
            let actions = self.core.tick(at);
            self.perform(actions);
        }
        self.now = end;
        let actions = self.core.tick(end);
        self.perform(actions);
        wakes
    }

    fn exit(&mut self, pid: Pid, status: ExitStatus) {
        self.on(Event::Exited {
            pid,
            status,
            group_empty: true,
        });
    }

    fn killed(&mut self, pid: Pid) {
        self.exit(pid, ExitStatus::Signal(Signal::SIGKILL));
    }

    fn notify(&mut self, pid: Pid, text: &str) {
        let worker = self.core.worker_by_pid(pid).expect("a worker");
        let assignments = crate::messages::parse_notify(text);
        self.on(Event::Notify {
            worker,
            assignments,
        });
    }

    /// A line on a worker's channel, classified as the driver's reader does.
    fn message(&mut self, pid: Pid, text: &str) {
        let worker = self.core.worker_by_pid(pid).expect("a worker");
        let crate::messages::Line::Message { ready } = crate::messages::classify(text.as_bytes())
        else {
            panic!("not a message for the supervisor: {text}");
        };
        self.on(Event::Message {
            worker,
            text: text.into(),
            ready,
        });
    }

    fn signal(&mut self, signal: SupervisorSignal) {
        self.on(Event::Signal(signal));
    }

    fn control(&mut self, request: Request, reply: u64) {
        self.restarting = matches!(request, Request::Restart { slot: Some(_), .. });
        self.on(Event::Control {
            request,
            reply: ReplyTo(reply),
        });
        self.restarting = false;
    }

    /// The pid of the worker serving `slot` of `app`.
    fn pid(&self, app: &str, slot: usize) -> Option<Pid> {
        let id = self.core.apps[app].slots[slot].worker()?;
        self.core.workers[&id].pid
    }

    fn serving(&self, app: &str) -> Vec<Pid> {
        (0..self.core.apps[app].slots.len())
            .filter_map(|s| self.pid(app, s))
            .collect()
    }

    fn ready(&self, app: &str) -> usize {
        self.core.apps[app]
            .slots
            .iter()
            .filter_map(|s| self.core.workers.get(&s.worker()?))
            .filter(|w| w.is_ready())
            .count()
    }

    fn candidate(&self, app: &str, slot: usize) -> Option<Pid> {
        let id = self.core.apps[app].rollout.as_ref()?.candidate(slot)?;
        self.core.workers[&id].pid
    }

    fn phase(&self, pid: Pid) -> Phase {
        self.core.workers[&self.core.worker_by_pid(pid).expect("worker")].phase
    }

    fn slot_state(&self, app: &str, slot: usize) -> SlotState {
        self.core.apps[app].slots[slot].state.clone()
    }

    fn last_reload(&self, app: &str) -> Option<ReloadOutcome> {
        self.core.apps[app].last_reload.clone()
    }

    fn sent(&self, pid: Pid, signal: Signal) -> bool {
        self.signals.contains(&(pid, signal))
    }

    /// Every old worker told to stop exits now.
    fn stopped_ones_exit(&mut self) {
        let stopping: Vec<Pid> = self
            .core
            .workers
            .values()
            .filter(|w| matches!(w.phase, Phase::Stopping { exited: false, .. }))
            .filter_map(|w| w.pid)
            .collect();
        for pid in stopping {
            self.exit(pid, ExitStatus::Signal(Signal::SIGTERM));
        }
    }

    fn check_invariants(&self) {
        let core = &self.core;
        if let Some(at) = core.next_deadline() {
            assert!(
                at > self.now,
                "a deadline in the past after an event or tick"
            );
        }
        let mut pids = std::collections::HashSet::new();
        for worker in core.workers.values() {
            if let Some(pid) = worker.pid
                && worker.is_running()
            {
                assert!(pids.insert(pid), "pid {pid} in two workers");
            }
        }
        for (name, app) in &core.apps {
            for (index, slot) in app.slots.iter().enumerate() {
                if let SlotState::Occupied(id) = slot.state {
                    let worker = core.workers.get(&id).expect("a slot's worker is recorded");
                    assert_eq!((worker.app.as_str(), worker.slot), (name.as_str(), index));
                    assert!(
                        !matches!(worker.phase, Phase::Stopping { exited: true, .. }),
                        "a slot holds an exited worker"
                    );
                }
            }
            assert!(app.configs.contains_key(&app.generation));
            for slot in 0..app.slots.len() {
                if let Some(candidate) = app.rollout.as_ref().and_then(|r| r.candidate(slot)) {
                    assert!(
                        app.slots.iter().all(|s| s.worker() != Some(candidate)),
                        "{name}[{slot}]: a candidate also serves a slot"
                    );
                }
            }
        }
        let mut held = std::collections::HashSet::new();
        for app in core.apps.values() {
            for id in app.slots.iter().filter_map(|s| s.worker()) {
                assert!(held.insert(id), "{id} serves two slots");
            }
        }
        // Every stop ends in an exit or a kill: a stopping worker either has its SIGKILL
        // deadline ahead, or was sent SIGKILL.
        for worker in core.workers.values() {
            if let (
                Some(pid),
                Phase::Stopping {
                    kill_at: None,
                    exited: false,
                    ..
                },
            ) = (worker.pid, worker.phase)
            {
                assert!(
                    self.sent(pid, Signal::SIGKILL),
                    "{} stopping with no kill deadline and no SIGKILL",
                    worker.label()
                );
            }
        }
    }
}

const WEB3: &str = r#"
[apps.web]
command = ["srv"]
workers = 3
ready = "notify"
[apps.web.reload]
bake = "0s"
"#;

fn ready_all(sim: &mut Sim, app: &str) {
    for pid in sim.serving(app) {
        if matches!(sim.phase(pid), Phase::Starting { .. }) {
            sim.notify(pid, "READY=1");
        }
    }
}

/// Runs a rollout of `app` to its end: each candidate says READY, each old worker exits.
fn roll(sim: &mut Sim, app: &str) {
    for _ in 0..100 {
        if sim.core.apps[app].rollout.is_none() {
            return;
        }
        let slots = sim.core.apps[app].slots.len();
        for slot in 0..slots {
            if let Some(pid) = sim.candidate(app, slot)
                && matches!(sim.phase(pid), Phase::Starting { .. })
            {
                sim.notify(pid, "READY=1");
            }
        }
        sim.advance(10 * MS);
        sim.stopped_ones_exit();
    }
    panic!("the rollout did not end");
}

#[test]
fn start_spawns_every_slot_and_notify_makes_them_ready() {
    let mut sim = Sim::new(WEB3);
    assert_eq!(sim.serving("web").len(), 3);
    assert_eq!(sim.ready("web"), 0);
    ready_all(&mut sim, "web");
    assert_eq!(sim.ready("web"), 3);
    assert_eq!(
        sim.core.next_deadline(),
        None,
        "nothing is due: the loop sleeps"
    );
}

#[test]
fn immediate_readiness_is_ready_at_once() {
    let sim = Sim::new("[apps.a]\ncommand = [\"x\"]\nworkers = 2\n");
    assert_eq!(sim.ready("a"), 2);
}

#[test]
fn an_app_with_sockets_defaults_to_a_one_second_delay() {
    let mut sim = Sim::new(
        "[sockets.http]\nlisten = \"127.0.0.1:0\"\n[apps.a]\ncommand = [\"x\"]\nsockets = [\"http\"]\n",
    );
    assert_eq!(sim.ready("a"), 0);
    sim.advance(999 * MS);
    assert_eq!(sim.ready("a"), 0);
    sim.advance(MS);
    assert_eq!(sim.ready("a"), 1);
}

#[test]
fn a_worker_not_ready_in_time_is_killed_and_replaced_as_a_crash() {
    let mut sim = Sim::new(
        "[apps.a]\ncommand = [\"x\"]\nready = \"notify\"\nready_timeout = \"2s\"\nworkers = 1\n",
    );
    let pid = sim.pid("a", 0).unwrap();
    sim.advance(2000 * MS);
    assert!(sim.sent(pid, Signal::SIGKILL));
    sim.killed(pid);
    // Killed by clusterd for a failure: a crash (streak 1), replaced at once.
    assert_eq!(sim.core.apps["a"].slots[0].crash_streak, 1);
    assert_ne!(sim.pid("a", 0), Some(pid));
    assert!(sim.pid("a", 0).is_some());
}

#[test]
fn a_crash_loop_backs_off_and_the_loop_sleeps_in_between() {
    let mut sim = Sim::new("[apps.a]\ncommand = [\"x\"]\nready = \"notify\"\nworkers = 1\n");
    let mut delays = Vec::new();
    for _ in 0..6 {
        let pid = sim.pid("a", 0).expect("a worker");
        sim.exit(pid, ExitStatus::Code(1));
        match sim.slot_state("a", 0) {
            SlotState::Backoff { until } => {
                delays.push((until - sim.now).as_millis());
                let wakes = sim.advance(until - sim.now);
                assert_eq!(wakes, 1, "one wake-up per respawn");
            }
            SlotState::Occupied(_) => delays.push(0),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(delays, [0, 100, 200, 400, 800, 1600]);
    assert!(sim.spawns <= 7);
}

#[test]
fn outside_kills_of_ready_workers_are_replaced_at_once_every_time() {
    let mut sim = Sim::new(WEB3);
    ready_all(&mut sim, "web");
    for round in 0..20 {
        let slot = round % 3;
        let pid = sim.pid("web", slot).unwrap();
        sim.killed(pid);
        let replacement = sim.pid("web", slot).expect("replaced at once");
        assert_ne!(replacement, pid);
        assert_eq!(sim.core.apps["web"].slots[slot].crash_streak, 0);
        sim.notify(replacement, "READY=1");
        sim.advance(300 * MS);
    }
    assert_eq!(sim.ready("web"), 3);
}

#[test]
fn a_kill_before_ready_still_counts_as_a_crash() {
    let mut sim = Sim::new(WEB3);
    let pid = sim.pid("web", 0).unwrap();
    sim.killed(pid);
    let second = sim.pid("web", 0).expect("first crash: at once");
    sim.killed(second);
    assert!(matches!(
        sim.slot_state("web", 0),
        SlotState::Backoff { .. }
    ));
    assert_eq!(sim.core.apps["web"].slots[0].crash_streak, 2);
}

#[test]
fn a_ready_worker_that_exits_with_an_error_is_a_crash() {
    let mut sim = Sim::new(WEB3);
    ready_all(&mut sim, "web");
    for streak in 1..=3 {
        let pid = sim.pid("web", 0).unwrap_or_else(|| {
            let until = match sim.slot_state("web", 0) {
                SlotState::Backoff { until } => until,
                other => panic!("{other:?}"),
            };
            sim.advance(until - sim.now);
            sim.pid("web", 0).unwrap()
        });
        sim.notify(pid, "READY=1");
        sim.exit(pid, ExitStatus::Code(3));
        assert_eq!(sim.core.apps["web"].slots[0].crash_streak, streak);
    }
}

#[test]
fn a_missed_watchdog_kills_and_counts_as_a_crash() {
    let mut sim = Sim::new(
        "[apps.a]\ncommand = [\"x\"]\nready = \"notify\"\nwatchdog = \"1s\"\nworkers = 1\n",
    );
    let pid = sim.pid("a", 0).unwrap();
    sim.notify(pid, "READY=1");
    sim.advance(900 * MS);
    sim.notify(pid, "WATCHDOG=1");
    sim.advance(900 * MS);
    assert!(
        !sim.sent(pid, Signal::SIGKILL),
        "the heartbeat moved the deadline"
    );
    sim.advance(100 * MS);
    assert!(sim.sent(pid, Signal::SIGKILL));
    sim.killed(pid);
    assert_eq!(sim.core.apps["a"].slots[0].crash_streak, 1);
    assert!(
        sim.core.apps["a"].slots[0]
            .last_exit
            .as_deref()
            .unwrap()
            .contains("watchdog")
    );
}

#[test]
fn watchdog_trigger_kills_at_once() {
    let mut sim = Sim::new(WEB3);
    let pid = sim.pid("web", 1).unwrap();
    sim.notify(pid, "READY=1\nWATCHDOG=trigger");
    assert!(sim.sent(pid, Signal::SIGKILL));
}

#[test]
fn extend_timeout_moves_the_ready_deadline_and_is_capped() {
    let mut sim = Sim::new(
        "[apps.a]\ncommand = [\"x\"]\nready = \"notify\"\nready_timeout = \"1s\"\nworkers = 1\n",
    );
    let pid = sim.pid("a", 0).unwrap();
    sim.notify(pid, "EXTEND_TIMEOUT_USEC=5000000");
    sim.advance(4 * 1000 * MS);
    assert!(!sim.sent(pid, Signal::SIGKILL));
    sim.notify(pid, &format!("EXTEND_TIMEOUT_USEC={}", u64::MAX));
    let deadline = sim.core.next_deadline().unwrap();
    assert!(deadline - sim.now <= Duration::from_secs(24 * 3600));
}

#[test]
fn an_intercepted_worker_is_ready_when_it_listens_and_a_reload_waits_for_it() {
    let mut sim = Sim::new(
        "[sockets.http]\nlisten = \"127.0.0.1:8000\"\n\n[apps.web]\ncommand = [\"x\"]\n\
         sockets = [\"http\"]\nintercept = true\n\n[apps.web.reload]\nbake = \"0s\"\n",
    );
    let pid = sim.pid("web", 0).unwrap();
    // No delay, no READY=1: only the trapped listen() counts.
    sim.advance(Duration::from_secs(5));
    assert!(matches!(sim.phase(pid), Phase::Starting { .. }));
    let worker = sim.core.worker_by_pid(pid).unwrap();
    sim.on(Event::Listening(worker));
    assert!(matches!(sim.phase(pid), Phase::Ready { .. }));
    // A second listen (another socket, or a child process) changes nothing.
    sim.on(Event::Listening(worker));
    assert!(matches!(sim.phase(pid), Phase::Ready { .. }));

    sim.signal(SupervisorSignal::Reload);
    let candidate = sim.candidate("web", 0).expect("a candidate");
    sim.advance(Duration::from_secs(5));
    assert!(!sim.sent(pid, Signal::SIGTERM), "the old worker serves on");
    let worker = sim.core.worker_by_pid(candidate).unwrap();
    sim.on(Event::Listening(worker));
    assert_eq!(
        sim.pid("web", 0),
        Some(candidate),
        "promoted once it listens"
    );
    // Drained for the default second, then told to stop.
    sim.advance(Duration::from_secs(1));
    assert!(sim.sent(pid, Signal::SIGTERM));
}

#[test]
fn listen_or_delay_is_ready_at_whichever_comes_first() {
    // The default of an app intercepted by default (`workers > 1`, no sockets), written out.
    let mut sim = Sim::new(
        "[apps.web]\ncommand = [\"x\"]\nworkers = 2\nintercept = true\nready = \"listen\"\n\
         ready_delay = \"1s\"\n",
    );
    let (server, consumer) = (sim.pid("web", 0).unwrap(), sim.pid("web", 1).unwrap());
    sim.advance(100 * MS);
    let worker = sim.core.worker_by_pid(server).unwrap();
    sim.on(Event::Listening(worker));
    assert!(
        matches!(sim.phase(server), Phase::Ready { .. }),
        "it listened"
    );
    assert!(matches!(sim.phase(consumer), Phase::Starting { .. }));
    sim.advance(899 * MS);
    assert!(matches!(sim.phase(consumer), Phase::Starting { .. }));
    sim.advance(MS);
    assert!(
        matches!(sim.phase(consumer), Phase::Ready { .. }),
        "a worker that never listens is ready after ready_delay"
    );
    // On a reload the one that listened drains (steered out first); the one that never
    // listened has nothing to drain: its stop signal comes at once.
    sim.signal(SupervisorSignal::Reload);
    for slot in 0..2 {
        let candidate = sim.candidate("web", slot).expect("a candidate");
        let worker = sim.core.worker_by_pid(candidate).unwrap();
        sim.on(Event::Listening(worker));
        sim.advance(Duration::from_secs(1));
    }
    assert!(
        sim.steered
            .contains(&(sim.core.worker_by_pid(server).unwrap(), false)),
        "the server is steered out"
    );
    let consumer_id = sim.core.worker_by_pid(consumer).unwrap();
    assert!(!sim.steered.contains(&(consumer_id, false)));
    assert!(sim.sent(consumer, Signal::SIGTERM));
}

#[test]
fn a_worker_that_fails_at_once_beside_a_held_socket_is_told_to_intercept() {
    let text = "[sockets.http]\nlisten = \"127.0.0.1:8001\"\n\n[apps.web]\ncommand = [\"x\"]\n\
                sockets = [\"http\"]\n";
    let mut sim = Sim::new(text);
    for _ in 0..3 {
        let pid = sim.pid("web", 0).unwrap_or_else(|| {
            let SlotState::Backoff { until } = sim.slot_state("web", 0) else {
                panic!("not in backoff")
            };
            sim.advance(until - sim.now);
            sim.pid("web", 0).unwrap()
        });
        sim.advance(30 * MS);
        sim.exit(pid, ExitStatus::Code(1));
    }
    let hint = "if the app binds 127.0.0.1:8001 itself (EADDRINUSE: clusterd holds it), set \
                intercept = true or take fd 3";
    let told: Vec<&Notice> = sim
        .events
        .iter()
        .filter(|n| matches!(&n.what, What::BindsItself { .. }))
        .collect();
    assert_eq!(told.len(), 1, "once, not at every crash: {told:?}");
    assert!(matches!(&told[0].what, What::BindsItself { address } if address == "127.0.0.1:8001"));
    assert_eq!(
        (told[0].app.as_deref(), told[0].slot),
        (Some("web"), Some(0))
    );
    assert_eq!(told[0].level, crate::event::Level::Warn);
    let last = sim.core.apps["web"].slots[0].last_exit.clone().unwrap();
    assert!(last.contains(hint), "{last}");

    // Intercepted apps, and workers that served first, are not told.
    let mut sim = Sim::new(&format!("{text}intercept = true\n"));
    let pid = sim.pid("web", 0).unwrap();
    sim.exit(pid, ExitStatus::Code(1));
    assert!(
        !sim.events
            .iter()
            .any(|n| matches!(n.what, What::BindsItself { .. }))
    );
}

#[test]
fn a_rolling_reload_replaces_one_slot_at_a_time() {
    let mut sim = Sim::new(WEB3);
    ready_all(&mut sim, "web");
    let old = sim.serving("web");
    sim.signal(SupervisorSignal::Reload);
    // Slot 0's candidate runs beside the old worker; the others have none yet.
    let c0 = sim.candidate("web", 0).expect("a candidate for slot 0");
    assert_eq!(sim.candidate("web", 1), None);
    assert_eq!(sim.serving("web"), old);
    sim.notify(c0, "READY=1");
    assert_eq!(sim.pid("web", 0), Some(c0), "promoted");
    assert!(sim.sent(old[0], Signal::SIGTERM));
    assert!(!sim.sent(old[1], Signal::SIGTERM));
    // With surge 1, the next candidate starts while the old worker drains.
    assert!(sim.candidate("web", 1).is_some());
    assert_eq!(sim.candidate("web", 2), None);
    roll(&mut sim, "web");
    assert_eq!(
        sim.last_reload("web"),
        Some(ReloadOutcome::Completed { generation: 2 })
    );
    for pid in old {
        assert!(sim.sent(pid, Signal::SIGTERM));
    }
    assert!(sim.core.apps["web"].slots.iter().all(|s| s.generation == 2));
}

#[test]
fn bake_keeps_the_old_worker_until_the_new_one_has_stayed_up() {
    let mut sim = Sim::new(&WEB3.replace("bake = \"0s\"", "bake = \"2s\""));
    ready_all(&mut sim, "web");
    let old0 = sim.pid("web", 0).unwrap();
    sim.signal(SupervisorSignal::Reload);
    let c0 = sim.candidate("web", 0).unwrap();
    sim.notify(c0, "READY=1");
    sim.advance(1999 * MS);
    assert_eq!(sim.pid("web", 0), Some(old0));
    let wakes = sim.advance(MS);
    assert_eq!(wakes, 1, "one wake-up, at the end of the bake");
    assert_eq!(sim.pid("web", 0), Some(c0));
}

/// An event's name, slot, pid and generation.
type Told = (&'static str, Option<usize>, Option<Pid>, Option<u64>);

/// The events the core emitted about `app`.
fn events_of(sim: &Sim, app: &str) -> Vec<Told> {
    sim.events
        .iter()
        .filter(|n| n.app.as_deref() == Some(app))
        .map(|n| (n.what.name(), n.slot, n.pid, n.generation))
        .collect()
}

#[test]
fn a_start_a_crash_a_reload_and_a_stop_are_typed_events() {
    let mut sim = Sim::new(
        "[apps.a]\ncommand = [\"x\", \"y\"]\nready = \"notify\"\nworkers = 1\n[apps.a.reload]\nbake = \"0s\"\n",
    );
    let first = sim.pid("a", 0).unwrap();
    assert_eq!(
        events_of(&sim, "a"),
        [("started", Some(0), Some(first), Some(1))]
    );
    assert!(matches!(&sim.events[0].what, What::Started { command } if command == "x y"));
    sim.notify(first, "READY=1");
    assert_eq!(
        events_of(&sim, "a")[1],
        ("ready", Some(0), Some(first), Some(1))
    );
    sim.events.clear();

    // A crash: restarting, with its exit and streak.
    sim.exit(first, ExitStatus::Code(3));
    let crash = &sim.events[0];
    assert_eq!(crash.what.name(), "restarting");
    assert_eq!(
        (crash.slot, crash.pid, crash.generation),
        (Some(0), Some(first), Some(1))
    );
    assert!(matches!(
        &crash.what,
        What::Restarting { exit, streak: 1, flapping: false, .. }
            if exit.status == ExitStatus::Code(3) && exit.killed.is_none()
    ));
    sim.advance(Duration::from_secs(60));
    let second = sim.pid("a", 0).unwrap();
    sim.notify(second, "READY=1");
    sim.events.clear();

    // A reload: started, the candidate's start and ready, the old one stopped, done.
    sim.signal(SupervisorSignal::Reload);
    roll(&mut sim, "a");
    let third = sim.pid("a", 0).unwrap();
    let names: Vec<_> = events_of(&sim, "a");
    assert_eq!(
        names.first(),
        Some(&("rollout_started", None, None, Some(2)))
    );
    assert!(names.contains(&("started", Some(0), Some(third), Some(2))));
    assert!(names.contains(&("ready", Some(0), Some(third), Some(2))));
    assert!(names.contains(&("stopped", Some(0), Some(second), Some(1))));
    assert_eq!(names.last(), Some(&("rollout_done", None, None, Some(2))));
    sim.events.clear();

    // A stop: stopping (no app), then the worker's exit.
    sim.signal(SupervisorSignal::Stop(Signal::SIGTERM));
    assert!(matches!(
        &sim.events[0].what,
        What::Stopping { workers: 1, .. }
    ));
    assert_eq!(sim.events[0].app, None);
    sim.stopped_ones_exit();
    assert_eq!(
        events_of(&sim, "a"),
        [("stopped", Some(0), Some(third), Some(2))]
    );
}

#[test]
fn an_aborted_rollout_is_an_event_with_its_reason_and_the_kept_generations() {
    let mut sim = Sim::new(WEB3);
    ready_all(&mut sim, "web");
    sim.signal(SupervisorSignal::Reload);
    let c0 = sim.candidate("web", 0).unwrap();
    sim.exit(c0, ExitStatus::Code(1));
    let aborted = sim
        .events
        .iter()
        .find(|n| n.what.name() == "aborted")
        .expect("an aborted event");
    assert_eq!(aborted.generation, Some(2));
    assert!(matches!(&aborted.what, What::Aborted { reason, kept }
        if reason.contains("before ready") && kept == &[1, 1, 1]));
}

#[test]
fn a_candidate_that_exits_before_ready_aborts_and_old_workers_keep_serving() {
    let mut sim = Sim::new(WEB3);
    ready_all(&mut sim, "web");
    let old = sim.serving("web");
    sim.signal(SupervisorSignal::Reload);
    let c0 = sim.candidate("web", 0).unwrap();
    sim.exit(c0, ExitStatus::Code(1));
    match sim.last_reload("web") {
        Some(ReloadOutcome::Aborted { reason, .. }) => assert!(reason.contains("before ready")),
        other => panic!("{other:?}"),
    }
    assert_eq!(sim.serving("web"), old);
    assert!(old.iter().all(|p| !sim.sent(*p, Signal::SIGTERM)));
    assert!(sim.core.apps["web"].rollout.is_none());
}

#[test]
fn a_candidate_that_crashes_after_ready_during_its_bake_aborts() {
    // gunicorn: READY=1 from the master, then the worker's import fails 0.4 s later.
    let mut sim = Sim::new(&WEB3.replace("bake = \"0s\"", "bake = \"1s\""));
    ready_all(&mut sim, "web");
    let old = sim.serving("web");
    sim.signal(SupervisorSignal::Reload);
    let c0 = sim.candidate("web", 0).unwrap();
    sim.notify(c0, "READY=1");
    sim.advance(400 * MS);
    sim.exit(c0, ExitStatus::Code(0));
    assert!(matches!(
        sim.last_reload("web"),
        Some(ReloadOutcome::Aborted { .. })
    ));
    assert_eq!(sim.serving("web"), old);
    assert_eq!(sim.ready("web"), 3);
}

#[test]
fn a_promoted_worker_that_dies_before_the_rollout_ends_aborts_it_and_rolls_its_slot_back() {
    let mut sim = Sim::new(WEB3);
    ready_all(&mut sim, "web");
    let old = sim.serving("web");
    sim.control(
        Request::Reload {
            app: None,
            wait: true,
        },
        7,
    );
    let c0 = sim.candidate("web", 0).unwrap();
    sim.notify(c0, "READY=1");
    sim.exit(old[0], ExitStatus::Code(0));
    assert_eq!(sim.pid("web", 0), Some(c0));
    assert_eq!(sim.core.apps["web"].slots[0].generation, 2);
    // The new version dies after it replaced slot 0.
    sim.exit(c0, ExitStatus::Code(1));
    match sim.last_reload("web") {
        Some(ReloadOutcome::Aborted { reason, .. }) => {
            assert!(reason.contains("after it replaced"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // Slot 0 goes back to generation 1 (and is respawned with its configuration); slot 1's
    // candidate is stopped, slots 1 and 2 keep their old workers.
    assert_eq!(sim.core.apps["web"].slots[0].generation, 1);
    assert_eq!(&sim.serving("web")[1..], &old[1..]);
    let respawned = sim.pid("web", 0).unwrap();
    let worker = &sim.core.workers[&sim.core.worker_by_pid(respawned).unwrap()];
    assert_eq!(worker.generation, 1);
    // reload --wait hears it.
    let (_, reply) = sim.replies.last().unwrap();
    match reply {
        Reply::Reloaded { outcomes } => assert_eq!(outcomes[0].outcome, ReloadResult::Aborted),
        other => panic!("{other:?}"),
    }
}

#[test]
fn reload_wait_hears_progress_then_completion() {
    let mut sim = Sim::new(WEB3);
    ready_all(&mut sim, "web");
    sim.control(
        Request::Reload {
            app: Some("web".into()),
            wait: true,
        },
        3,
    );
    roll(&mut sim, "web");
    let mine: Vec<&Reply> = sim
        .replies
        .iter()
        .filter(|(to, _)| *to == ReplyTo(3))
        .map(|(_, r)| r)
        .collect();
    assert_eq!(
        mine.len(),
        4,
        "three progress lines and the outcome: {mine:?}"
    );
    match mine.last().unwrap() {
        Reply::Reloaded { outcomes } => {
            assert_eq!(outcomes[0].outcome, ReloadResult::Completed);
            assert_eq!(outcomes[0].generation, 2);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_candidate_that_cannot_start_aborts() {
    let mut sim = Sim::new(WEB3);
    ready_all(&mut sim, "web");
    sim.spawn_failures.push(SpawnFailure {
        message: "cannot execute /srv/app/srv: Permission denied".into(),
        transient: false,
    });
    sim.signal(SupervisorSignal::Reload);
    match sim.last_reload("web") {
        Some(ReloadOutcome::Aborted { reason, .. }) => assert!(reason.contains("could not start")),
        other => panic!("{other:?}"),
    }
    assert_eq!(sim.ready("web"), 3);
}

#[test]
fn a_candidate_not_ready_in_time_aborts() {
    let mut sim = Sim::new(&WEB3.replace("workers = 3", "workers = 3\nready_timeout = \"5s\""));
    ready_all(&mut sim, "web");
    sim.signal(SupervisorSignal::Reload);
    let c0 = sim.candidate("web", 0).unwrap();
    sim.advance(5000 * MS);
    assert!(sim.sent(c0, Signal::SIGKILL));
    match sim.last_reload("web") {
        Some(ReloadOutcome::Aborted { reason, .. }) => assert!(reason.contains("not ready")),
        other => panic!("{other:?}"),
    }
    assert_eq!(sim.ready("web"), 3);
}

#[test]
fn reloads_during_a_rollout_coalesce_into_one_more() {
    let mut sim = Sim::new(WEB3);
    ready_all(&mut sim, "web");
    sim.signal(SupervisorSignal::Reload);
    sim.signal(SupervisorSignal::Reload);
    sim.signal(SupervisorSignal::Reload);
    roll(&mut sim, "web");
    assert_eq!(sim.core.apps["web"].generation, 3, "two rollouts, not four");
    assert_eq!(
        sim.last_reload("web"),
        Some(ReloadOutcome::Completed { generation: 3 })
    );
}

#[test]
fn watched_files_changing_roll_the_app_and_coalesce_during_a_rollout() {
    let mut sim = Sim::new(WEB3);
    ready_all(&mut sim, "web");
    let changed = |sim: &mut Sim, count| {
        sim.on(Event::FilesChanged {
            app: "web".into(),
            path: "src/app.js".into(),
            count,
        })
    };
    changed(&mut sim, 1);
    let named: Vec<&str> = events_of(&sim, "web").iter().map(|e| e.0).collect();
    assert!(
        named.ends_with(&["watch_reload", "rollout_started", "started"]),
        "{named:?}"
    );
    assert!(sim.events.iter().any(|n| matches!(
        &n.what,
        What::WatchReload { path, count: 1 } if path == "src/app.js"
    )));
    // Changes during the rollout: one more rollout after it, however many.
    changed(&mut sim, 500);
    changed(&mut sim, 3);
    roll(&mut sim, "web");
    assert_eq!(
        sim.core.apps["web"].generation, 3,
        "two rollouts, not three"
    );
    assert_eq!(
        sim.last_reload("web"),
        Some(ReloadOutcome::Completed { generation: 3 })
    );
    // A SIGHUP that only adds a watch rolls nothing and says what changed.
    let watched = WEB3.replace("ready = \"notify\"", "ready = \"notify\"\nwatch = true");
    sim.on(Event::Reconfigure(Box::new(manifest(&watched))));
    assert_eq!(sim.core.apps["web"].generation, 3);
    assert!(sim.events.iter().any(|n| matches!(
        &n.what,
        What::Reconfigured { changes } if changes == &["web: watch changed"]
    )));
    // An app that is gone, or a shutdown, starts nothing.
    sim.on(Event::FilesChanged {
        app: "gone".into(),
        path: "x".into(),
        count: 1,
    });
    assert_eq!(sim.core.apps["web"].generation, 3);
    sim.signal(SupervisorSignal::Stop(Signal::SIGTERM));
    changed(&mut sim, 1);
    assert_eq!(sim.core.apps["web"].generation, 3);
}

#[test]
fn scaling_down_during_a_rollout_forgets_the_removed_slots() {
    let mut sim = Sim::new(&WEB3.replace("bake = \"0s\"", "bake = \"0s\"\nsurge = 3"));
    ready_all(&mut sim, "web");
    sim.signal(SupervisorSignal::Reload);
    let c2 = sim.candidate("web", 2).unwrap();
    sim.control(
        Request::Scale {
            app: "web".into(),
            workers: 1,
        },
        1,
    );
    assert!(
        sim.sent(c2, Signal::SIGTERM),
        "the removed slot's candidate stops"
    );
    assert_eq!(sim.core.apps["web"].slots.len(), 1);
    roll(&mut sim, "web");
    assert_eq!(
        sim.last_reload("web"),
        Some(ReloadOutcome::Completed { generation: 2 })
    );
}

#[test]
fn scaling_up_starts_new_slots_at_once() {
    let mut sim = Sim::new(WEB3);
    sim.control(
        Request::Scale {
            app: "web".into(),
            workers: 5,
        },
        1,
    );
    assert_eq!(sim.serving("web").len(), 5);
    sim.signal(SupervisorSignal::ScaleBy(-1));
    assert_eq!(sim.core.apps["web"].slots.len(), 4);
}

#[test]
fn restarting_a_slot_during_a_rollout_keeps_the_rollout_going() {
    let mut sim = Sim::new(WEB3);
    ready_all(&mut sim, "web");
    sim.signal(SupervisorSignal::Reload);
    let old2 = sim.pid("web", 2).unwrap();
    sim.control(
        Request::Restart {
            app: "web".into(),
            slot: Some(2),
        },
        1,
    );
    assert!(sim.sent(old2, Signal::SIGTERM));
    assert_ne!(sim.pid("web", 2), Some(old2));
    sim.exit(old2, ExitStatus::Code(0));
    ready_all(&mut sim, "web");
    roll(&mut sim, "web");
    assert_eq!(
        sim.last_reload("web"),
        Some(ReloadOutcome::Completed { generation: 2 })
    );
}

#[test]
fn sighup_with_a_new_command_during_a_rollout_rolls_it_out_next() {
    let mut sim = Sim::new(WEB3);
    ready_all(&mut sim, "web");
    sim.signal(SupervisorSignal::Reload);
    sim.signal(SupervisorSignal::Reread);
    assert_eq!(sim.rereads, 1, "the driver is asked to re-read");
    let changed = manifest(&WEB3.replace("[\"srv\"]", "[\"srv2\"]"));
    sim.on(Event::Reconfigure(Box::new(changed)));
    roll(&mut sim, "web");
    assert_eq!(sim.core.apps["web"].generation, 3);
    for slot in 0..3 {
        let pid = sim.pid("web", slot).unwrap();
        let worker = &sim.core.workers[&sim.core.worker_by_pid(pid).unwrap()];
        assert_eq!(worker.config.command, ["srv2"]);
    }
}

#[test]
fn sighup_adds_and_removes_apps() {
    let mut sim = Sim::new(WEB3);
    let old = sim.serving("web");
    let next = manifest("[apps.jobs]\ncommand = [\"q\"]\nworkers = 2\n");
    sim.on(Event::Reconfigure(Box::new(next)));
    assert!(!sim.core.apps.contains_key("web"));
    for pid in old {
        assert!(sim.sent(pid, Signal::SIGTERM));
    }
    assert_eq!(sim.serving("jobs").len(), 2);
}

#[test]
fn shutdown_during_a_rollout_stops_everything_and_answers_waiters() {
    let mut sim = Sim::new(WEB3);
    ready_all(&mut sim, "web");
    sim.control(
        Request::Reload {
            app: None,
            wait: true,
        },
        9,
    );
    let c0 = sim.candidate("web", 0).unwrap();
    sim.signal(SupervisorSignal::Stop(Signal::SIGTERM));
    assert!(sim.sent(c0, Signal::SIGTERM));
    match &sim.replies.last().unwrap().1 {
        Reply::Reloaded { outcomes } => assert_eq!(outcomes[0].outcome, ReloadResult::Aborted),
        other => panic!("{other:?}"),
    }
    assert!(!sim.core.finished());
    sim.stopped_ones_exit();
    assert!(sim.core.finished());
    assert_eq!(sim.spawns, 4, "nothing respawns during shutdown");
}

#[test]
fn a_second_stop_signal_kills_at_once() {
    let mut sim = Sim::new(WEB3);
    let pids = sim.serving("web");
    sim.signal(SupervisorSignal::Stop(Signal::SIGTERM));
    sim.signal(SupervisorSignal::Stop(Signal::SIGINT));
    for pid in pids {
        assert!(sim.sent(pid, Signal::SIGTERM) && sim.sent(pid, Signal::SIGKILL));
    }
}

#[test]
fn a_worker_that_ignores_its_stop_signal_is_killed_after_the_stop_timeout() {
    let mut sim = Sim::new("[apps.a]\ncommand = [\"x\"]\nstop_timeout = \"3s\"\n");
    let pid = sim.pid("a", 0).unwrap();
    sim.signal(SupervisorSignal::Stop(Signal::SIGTERM));
    sim.advance(2999 * MS);
    assert!(!sim.sent(pid, Signal::SIGKILL));
    sim.advance(MS);
    assert!(sim.sent(pid, Signal::SIGKILL));
    sim.killed(pid);
    assert!(sim.core.finished());
}

#[test]
fn a_worker_whose_children_live_on_is_kept_until_its_group_is_empty() {
    let mut sim = Sim::new(WEB3);
    let pid = sim.pid("web", 0).unwrap();
    sim.on(Event::Exited {
        pid,
        status: ExitStatus::Code(1),
        group_empty: false,
    });
    // The slot is replaced; the leftovers are told to stop, then remembered until gone.
    assert_ne!(sim.pid("web", 0), Some(pid));
    assert!(sim.sent(pid, Signal::SIGTERM));
    let lingering: Vec<_> = sim.core.lingering().collect();
    assert_eq!(lingering.len(), 1);
    sim.on(Event::GroupEmpty(lingering[0].0));
    assert_eq!(sim.core.lingering().count(), 0);
    assert_eq!(sim.core.workers.len(), 3);
}

#[test]
fn a_program_that_cannot_run_fails_its_slot_until_a_restart() {
    let mut sim = Sim::new(WEB3);
    let pid = sim.pid("web", 0).unwrap();
    sim.spawn_failures.push(SpawnFailure {
        message: "cannot find program \"srv\" in PATH".into(),
        transient: false,
    });
    sim.exit(pid, ExitStatus::Code(1));
    assert!(matches!(sim.slot_state("web", 0), SlotState::Failed { .. }));
    let failed: Vec<_> = sim
        .events
        .iter()
        .filter(|n| n.what.name() == "spawn_failed")
        .collect();
    assert_eq!(failed.len(), 1, "one event: {:?}", sim.events);
    assert_eq!(
        (failed[0].app.as_deref(), failed[0].slot),
        (Some("web"), Some(0))
    );
    assert!(
        matches!(&failed[0].what, What::SpawnFailed { retry_in: None, message }
        if message.contains("srv"))
    );
    sim.advance(Duration::from_secs(60));
    assert_eq!(sim.pid("web", 0), None, "no crash storm");
    sim.control(
        Request::Restart {
            app: "web".into(),
            slot: Some(0),
        },
        1,
    );
    assert!(sim.pid("web", 0).is_some());
}

#[test]
fn a_transient_spawn_failure_is_retried() {
    let mut sim = Sim::new(WEB3);
    let pid = sim.pid("web", 0).unwrap();
    sim.spawn_failures.push(SpawnFailure {
        message: "pipe2 failed: Too many open files".into(),
        transient: true,
    });
    sim.exit(pid, ExitStatus::Code(1));
    assert!(matches!(
        sim.slot_state("web", 0),
        SlotState::Backoff { .. }
    ));
    assert!(sim.events.iter().any(|n| matches!(
        n.what,
        What::SpawnFailed {
            retry_in: Some(_),
            ..
        }
    ) && n.slot == Some(0)));
    sim.advance(Duration::from_secs(1));
    assert!(sim.pid("web", 0).is_some());
}

#[test]
fn restart_policies() {
    let mut sim = Sim::new(
        "[apps.once]\ncommand = [\"x\"]\nrestart = \"never\"\n[apps.fail]\ncommand = [\"x\"]\nrestart = \"on-failure\"\n",
    );
    let once = sim.pid("once", 0).unwrap();
    sim.exit(once, ExitStatus::Code(1));
    assert_eq!(sim.slot_state("once", 0), SlotState::Done { code: Some(1) });
    let fail = sim.pid("fail", 0).unwrap();
    sim.exit(fail, ExitStatus::Code(0));
    assert_eq!(sim.slot_state("fail", 0), SlotState::Done { code: Some(0) });
    sim.control(
        Request::Restart {
            app: "fail".into(),
            slot: Some(0),
        },
        1,
    );
    let again = sim.pid("fail", 0).unwrap();
    sim.exit(again, ExitStatus::Code(2));
    assert!(sim.pid("fail", 0).is_some(), "a failure restarts");
}

#[test]
fn a_rollout_of_delay_workers_wakes_only_at_its_deadlines() {
    // The defect this guards against: deadlines in the past made the loop spin for the
    // whole rollout. Here every wake-up must move the rollout on.
    let mut sim = Sim::new(
        "[apps.a]\ncommand = [\"x\"]\nworkers = 2\nready = \"delay\"\nready_delay = \"3s\"\n",
    );
    sim.advance(Duration::from_secs(3));
    sim.signal(SupervisorSignal::Reload);
    let mut wakes = 0;
    for _ in 0..20 {
        wakes += sim.advance(Duration::from_secs(1));
        sim.stopped_ones_exit();
    }
    assert_eq!(
        sim.last_reload("a"),
        Some(ReloadOutcome::Completed { generation: 2 })
    );
    // Per slot: ready after the delay, then baked (1 s default): two wake-ups.
    assert!(wakes <= 4, "{wakes} wake-ups");
}

#[test]
fn stopping_notifications_are_debug_lines_only() {
    let mut sim = Sim::new(WEB3);
    let pid = sim.pid("web", 0).unwrap();
    let before = sim.events.len();
    for _ in 0..100 {
        sim.notify(pid, "STOPPING=1");
    }
    let told = &sim.events[before..];
    assert_eq!(told.len(), 100);
    assert!(told.iter().all(|n| n.level == crate::event::Level::Debug
        && n.what == What::SaysStopping
        && n.pid == Some(pid)
        && n.slot == Some(0)));
}

#[test]
fn a_reaped_process_that_is_no_workers_is_a_debug_event_with_its_pid_and_status() {
    let mut sim = Sim::new(WEB3);
    let stranger = Pid::from_raw(99_999);
    sim.exit(stranger, ExitStatus::Code(7));
    let last = sim.events.last().expect("an event");
    assert_eq!(last.level, crate::event::Level::Debug);
    assert_eq!((last.app.as_deref(), last.pid), (None, Some(stranger)));
    assert_eq!(
        last.what,
        What::Reaped {
            status: ExitStatus::Code(7)
        }
    );
}

#[test]
fn scaling_by_signal_with_two_apps_is_refused_by_an_event() {
    let mut sim = Sim::new(ONE_SHOT);
    let before = sim.core.apps["web"].slots.len();
    sim.signal(SupervisorSignal::ScaleBy(1));
    assert_eq!(sim.core.apps["web"].slots.len(), before);
    let last = sim.events.last().expect("an event");
    assert_eq!(last.level, crate::event::Level::Warn);
    assert_eq!(last.what, What::ScaleRefused { apps: 2 });
    assert_eq!(last.app, None);
}

#[test]
fn the_reload_asked_for_during_an_aborted_rollout_is_an_event_before_it_runs() {
    let mut sim = Sim::new(WEB3);
    ready_all(&mut sim, "web");
    sim.signal(SupervisorSignal::Reload);
    sim.signal(SupervisorSignal::Reload);
    let c0 = sim.candidate("web", 0).unwrap();
    sim.exit(c0, ExitStatus::Code(1));
    let names: Vec<&str> = events_of(&sim, "web").iter().map(|t| t.0).collect();
    let aborted = names
        .iter()
        .rposition(|n| *n == "aborted")
        .expect("aborted");
    assert_eq!(names[aborted + 1], "reload_after_abort", "{names:?}");
    assert_eq!(names[aborted + 2], "rollout_started", "{names:?}");
    assert_eq!(sim.core.apps["web"].generation, 3);
}

#[test]
fn the_tend_owner_is_who_says_so_until_it_releases_or_dies() {
    let mut sim = Sim::new(&WEB3.replace("workers = 3", "workers = 3\nkv_segment = \"kv\""));
    let (a, b) = (sim.pid("web", 0).unwrap(), sim.pid("web", 1).unwrap());
    let owner = |sim: &Sim| sim.core.apps["web"].tend.map(|t| t.worker);
    sim.notify(a, "X_CLUSTERD_KV_TEND=owner");
    assert_eq!(owner(&sim), sim.core.worker_by_pid(a));
    sim.notify(b, "X_CLUSTERD_KV_TEND=released");
    assert_eq!(
        owner(&sim),
        sim.core.worker_by_pid(a),
        "only the owner releases"
    );
    sim.killed(a);
    assert_eq!(owner(&sim), None);
    sim.notify(b, "X_CLUSTERD_KV_TEND=owner");
    sim.notify(b, "X_CLUSTERD_KV_TEND=released");
    assert_eq!(owner(&sim), None);
}

#[test]
fn a_silent_tend_owner_is_restarted_with_kv_watchdog() {
    let mut sim = Sim::new(&WEB3.replace(
        "workers = 3",
        "workers = 3\nkv_segment = \"kv\"\nkv_watchdog = \"3s\"",
    ));
    ready_all(&mut sim, "web");
    let owner = sim.pid("web", 1).unwrap();
    for _ in 0..5 {
        sim.notify(owner, "X_CLUSTERD_KV_TEND=owner");
        sim.advance(Duration::from_secs(1));
    }
    assert!(
        !sim.sent(owner, Signal::SIGTERM),
        "a tending owner is left alone"
    );
    sim.notify(owner, "X_CLUSTERD_KV_TEND=owner");
    // It stops tending (SIGSTOP, a wedged event loop): 3 s later it is restarted.
    sim.advance(Duration::from_millis(2999));
    assert!(!sim.sent(owner, Signal::SIGTERM));
    let wakes = sim.advance(MS);
    assert_eq!(wakes, 1);
    assert!(sim.sent(owner, Signal::SIGTERM));
    assert_ne!(
        sim.pid("web", 1),
        Some(owner),
        "its replacement starts at once"
    );
    assert!(sim.core.apps["web"].tend.is_none());
}

#[test]
fn restart_limit_fails_a_slot_that_keeps_dying_until_a_restart() {
    let mut sim = Sim::new(
        "[apps.a]\ncommand = [\"x\"]\nbackoff_initial = \"10ms\"\nrestart_limit = { burst = 3, interval = \"10s\" }\n",
    );
    for _ in 0..3 {
        let pid = sim.pid("a", 0).expect("restarted");
        sim.exit(pid, ExitStatus::Code(1));
        sim.advance(Duration::from_secs(1));
    }
    let pid = sim.pid("a", 0).expect("three restarts are allowed");
    sim.exit(pid, ExitStatus::Code(1));
    match sim.slot_state("a", 0) {
        SlotState::Failed { reason } => assert!(reason.contains("restart_limit"), "{reason}"),
        other => panic!("{other:?}"),
    }
    sim.advance(Duration::from_secs(60));
    assert_eq!(sim.pid("a", 0), None);
    sim.control(
        Request::Restart {
            app: "a".into(),
            slot: Some(0),
        },
        1,
    );
    assert!(sim.pid("a", 0).is_some(), "clusterd restart revives it");
}

#[test]
fn restarts_spread_over_more_than_the_interval_are_within_the_limit() {
    let mut sim = Sim::new(
        "[apps.a]\ncommand = [\"x\"]\nbackoff_reset = \"1s\"\nrestart_limit = { burst = 2, interval = \"5s\" }\n",
    );
    for _ in 0..10 {
        let pid = sim.pid("a", 0).expect("restarted");
        sim.exit(pid, ExitStatus::Code(1));
        sim.advance(Duration::from_secs(3));
    }
    assert!(sim.pid("a", 0).is_some());
}

#[test]
fn a_worker_over_max_memory_is_replaced_gracefully() {
    let mut sim = Sim::new("[apps.a]\ncommand = [\"x\"]\nworkers = 2\nmax_memory = \"300M\"\n");
    let (fat, thin) = (sim.pid("a", 0).unwrap(), sim.pid("a", 1).unwrap());
    sim.memory.insert(fat, 310 << 20);
    sim.memory.insert(thin, 100 << 20);
    let wakes = sim.advance(super::core::MEMORY_INTERVAL);
    assert_eq!(wakes, 1, "one sample per interval");
    assert!(sim.sent(fat, Signal::SIGTERM), "stopped gracefully");
    assert!(!sim.sent(thin, Signal::SIGTERM));
    let replacement = sim.pid("a", 0).expect("its replacement starts at once");
    assert_ne!(replacement, fat);
    let reason = sim.core.apps["a"].slots[0].last_restart.clone().unwrap();
    assert!(reason.starts_with("memory: 310 MiB"), "{reason}");
    // Its exit is expected: no crash.
    sim.exit(fat, ExitStatus::Signal(Signal::SIGTERM));
    assert_eq!(sim.core.apps["a"].slots[0].crash_streak, 0);
}

#[test]
fn memory_is_sampled_only_when_an_app_sets_max_memory() {
    let mut sim = Sim::new(WEB3);
    ready_all(&mut sim, "web");
    assert_eq!(sim.core.next_deadline(), None);
}

const INTERCEPTED: &str = r#"
[sockets.http]
listen = "127.0.0.1:0"
[apps.web]
command = ["node", "child.js"]
workers = 2
sockets = ["http"]
intercept = true
drain = "2s"
[apps.web.reload]
bake = "0s"
"#;

#[test]
fn a_retiring_worker_is_steered_away_and_drains_before_its_stop_signal() {
    let mut sim = Sim::new(INTERCEPTED);
    let old = sim.pid("web", 0).unwrap();
    let old_id = sim.core.worker_by_pid(old).unwrap();
    sim.on(Event::Listening(old_id));
    assert_eq!(
        sim.steered.last(),
        Some(&(old_id, true)),
        "ready: steered in"
    );
    let other = sim.core.worker_by_pid(sim.pid("web", 1).unwrap()).unwrap();
    sim.on(Event::Listening(other));
    sim.signal(SupervisorSignal::Reload);
    let candidate = sim.candidate("web", 0).unwrap();
    let candidate_id = sim.core.worker_by_pid(candidate).unwrap();
    sim.on(Event::Listening(candidate_id));
    // Promoted: the old worker gets no new connections, and no signal yet.
    assert_eq!(sim.steered.last(), Some(&(old_id, false)));
    assert!(!sim.sent(old, Signal::SIGTERM));
    sim.advance(Duration::from_millis(1999));
    assert!(!sim.sent(old, Signal::SIGTERM));
    sim.advance(MS);
    assert!(sim.sent(old, Signal::SIGTERM), "signalled once drained");
    sim.exit(old, ExitStatus::Signal(Signal::SIGTERM));
    assert!(sim.candidate("web", 1).is_some(), "the rollout goes on");
}

#[test]
fn shutdown_does_not_drain() {
    let mut sim = Sim::new(INTERCEPTED);
    let pids = sim.serving("web");
    sim.signal(SupervisorSignal::Stop(Signal::SIGTERM));
    assert!(pids.iter().all(|p| sim.sent(*p, Signal::SIGTERM)));
}

const SELF_DRAINING: &str = r#"
[sockets.http]
listen = "127.0.0.1:0"
[apps.web]
command = ["hello"]
workers = 2
sockets = ["http"]
[apps.web.reload]
bake = "0s"
[apps.jobs]
command = ["jobs"]
"#;

#[test]
fn a_self_draining_worker_is_steered_out_right_before_its_stop_signal() {
    let mut sim = Sim::new(SELF_DRAINING);
    let old = sim.pid("web", 0).unwrap();
    let old_id = sim.core.worker_by_pid(old).unwrap();
    sim.advance(Duration::from_secs(1));
    assert!(sim.steered.contains(&(old_id, true)), "ready: steered in");
    // An app without sockets has nothing to steer.
    assert_eq!(sim.steered.len(), 2, "{:?}", sim.steered);
    sim.signal(SupervisorSignal::Reload);
    let candidate = sim.candidate("web", 0).unwrap();
    assert!(!sim.sent(old, Signal::SIGTERM));
    sim.advance(Duration::from_secs(1));
    let candidate_id = sim.core.worker_by_pid(candidate).unwrap();
    assert!(sim.steered.contains(&(candidate_id, true)));
    // Promoted: steered out and signalled in the same step, no drain delay, steer first.
    assert!(sim.sent(old, Signal::SIGTERM), "no drain delay");
    let out = sim.steered.iter().position(|s| *s == (old_id, false));
    let out = out.expect("steered out");
    let term = sim
        .signals
        .iter()
        .position(|s| *s == (old, Signal::SIGTERM))
        .unwrap();
    assert!(
        sim.steered_after[out] <= term,
        "steered out before its signal"
    );
    // Shutdown: everything stops, nothing is steered.
    let steers = sim.steered.len();
    sim.signal(SupervisorSignal::Stop(Signal::SIGTERM));
    assert!(sim.steered[steers..].iter().all(|(_, serving)| *serving));
}

#[test]
fn an_intercepted_app_without_sockets_is_steered_for_the_ports_it_may_bind_on_demand() {
    // Its sockets are bound on demand, which only the daemon knows of: the core steers its
    // workers in when ready as it would those of an app with declared sockets (steered out:
    // by its drain, once it listened — `Worker::listened`).
    let mut sim = Sim::new(
        "[apps.web]\ncommand = [\"node\", \"child.js\"]\nworkers = 2\nintercept = true\n\
         ready = \"immediate\"\n",
    );
    sim.advance(Duration::from_secs(1));
    let old_id = sim.core.worker_by_pid(sim.pid("web", 0).unwrap()).unwrap();
    let other = sim.core.worker_by_pid(sim.pid("web", 1).unwrap()).unwrap();
    assert!(sim.steered.contains(&(old_id, true)), "{:?}", sim.steered);
    assert!(sim.steered.contains(&(other, true)), "{:?}", sim.steered);
}

#[test]
fn a_disconnected_worker_is_steered_out_when_its_channel_closes() {
    let mut sim = Sim::new(
        "[sockets.http]\nlisten = \"127.0.0.1:0\"\n[apps.web]\ncommand = [\"node\", \"w.js\"]\n\
         workers = 2\nsockets = [\"http\"]\nstop_signal = \"disconnect\"\nstop_timeout = \"2s\"\n",
    );
    sim.advance(Duration::from_secs(1));
    let a = sim.pid("web", 0).unwrap();
    let ida = sim.core.worker_by_pid(a).unwrap();
    assert!(sim.steered.contains(&(ida, true)));
    sim.control(
        Request::Restart {
            app: "web".into(),
            slot: Some(0),
        },
        1,
    );
    assert_eq!(sim.disconnected, vec![ida]);
    assert_eq!(sim.steered.last(), Some(&(ida, false)));
    sim.advance(Duration::from_secs(2));
    assert!(sim.sent(a, Signal::SIGTERM));
    let outs = sim.steered.iter().filter(|s| **s == (ida, false)).count();
    assert_eq!(outs, 1, "steered out once: {:?}", sim.steered);
}

#[test]
fn a_signal_command_reaches_running_workers() {
    let mut sim = Sim::new(WEB3);
    sim.control(
        Request::Signal {
            app: "web".into(),
            signal: "HUP".into(),
        },
        4,
    );
    let pids = sim.serving("web");
    assert!(pids.iter().all(|p| sim.sent(*p, Signal::SIGHUP)));
    sim.control(
        Request::Signal {
            app: "nope".into(),
            signal: "HUP".into(),
        },
        5,
    );
    assert!(matches!(
        sim.replies.last(),
        Some((ReplyTo(5), Reply::Error { .. }))
    ));
}

mod host {
    //! What clusterd tells its own manager (sd_notify) and orchestrators (`/readyz`).

    use super::*;
    use crate::host::{HostMessage, HostNotifier};

    fn status(messages: &[HostMessage]) -> Option<&str> {
        messages.iter().find_map(|m| match m {
            HostMessage::Status(line) => Some(line.as_str()),
            _ => None,
        })
    }

    #[test]
    fn ready_is_sent_once_every_app_has_its_ready_workers_and_status_only_on_change() {
        let mut sim = Sim::new(&format!(
            "{WEB3}\n[apps.kv]\ncommand = [\"kv\"]\nworkers = 1\n"
        ));
        let mut host = HostNotifier::default();
        let first = host.update(&sim.core);
        assert!(!first.contains(&HostMessage::Ready), "{first:?}");
        // The kv worker is ready at once (immediate); web is not.
        assert_eq!(status(&first), Some("kv 1/1 ready, web 0/3 ready"));
        let pids = sim.serving("web");
        sim.notify(pids[0], "READY=1");
        let some = host.update(&sim.core);
        assert!(!some.contains(&HostMessage::Ready), "{some:?}");
        assert!(
            sim.core
                .readiness()
                .unwrap_err()
                .contains("web: 1/3 workers ready")
        );
        assert!(
            host.update(&sim.core).is_empty(),
            "nothing changed: nothing sent"
        );
        ready_all(&mut sim, "web");
        let all = host.update(&sim.core);
        assert_eq!(
            all,
            vec![
                HostMessage::Ready,
                HostMessage::Status("kv 1/1 ready, web 3/3 ready".into())
            ]
        );
        assert_eq!(sim.core.readiness(), Ok(()));
        // A crash later is STATUS only: READY=1 means "started", once.
        sim.killed(pids[1]);
        let crash = host.update(&sim.core);
        assert!(!crash.contains(&HostMessage::Ready));
        assert!(sim.core.readiness().is_err());
    }

    #[test]
    fn a_rollout_is_reloading_until_it_ends_and_a_sighup_that_changes_nothing_is_both() {
        let mut sim = Sim::new(WEB3);
        let mut host = HostNotifier::default();
        ready_all(&mut sim, "web");
        assert!(host.update(&sim.core).contains(&HostMessage::Ready));

        sim.signal(SupervisorSignal::Reload);
        let start = host.update(&sim.core);
        assert_eq!(start[0], HostMessage::Reloading);
        assert_eq!(status(&start), Some("web 3/3 ready (reload g2 0/3)"));
        roll(&mut sim, "web");
        let end = host.update(&sim.core);
        assert_eq!(end[0], HostMessage::Ready, "{end:?}");

        // SIGHUP (Type=notify-reload): RELOADING=1 then READY=1 even with nothing to do.
        host.reload_seen();
        assert_eq!(
            host.update(&sim.core),
            vec![HostMessage::Reloading, HostMessage::Ready]
        );
    }

    #[test]
    fn shutdown_says_stopping_once() {
        let mut sim = Sim::new(WEB3);
        let mut host = HostNotifier::default();
        ready_all(&mut sim, "web");
        host.update(&sim.core);
        sim.signal(SupervisorSignal::Stop(Signal::SIGTERM));
        let messages = host.update(&sim.core);
        assert_eq!(messages[0], HostMessage::Stopping);
        assert_eq!(status(&messages), Some("stopping: web 0/3 ready"));
        assert_eq!(
            sim.core.readiness(),
            Err("clusterd is shutting down".to_owned())
        );
        sim.stopped_ones_exit();
        assert!(!host.update(&sim.core).contains(&HostMessage::Stopping));
    }

    #[test]
    fn not_ready_while_an_aborted_rollout_stops_its_new_workers() {
        let mut sim = Sim::new(&WEB3.replace("bake = \"0s\"", "bake = \"0s\"\nsurge = 2"));
        ready_all(&mut sim, "web");
        sim.signal(SupervisorSignal::Reload);
        let (c0, c1) = (
            sim.candidate("web", 0).unwrap(),
            sim.candidate("web", 1).unwrap(),
        );
        sim.exit(c0, ExitStatus::Code(1));
        // c1 is told to stop; until it is gone the host is not ready.
        assert!(sim.sent(c1, Signal::SIGTERM));
        let reason = sim.core.readiness().unwrap_err();
        assert!(reason.contains("web: a rollout is aborting"), "{reason}");
        sim.exit(c1, ExitStatus::Signal(Signal::SIGTERM));
        assert_eq!(sim.core.readiness(), Ok(()));
    }
}

mod handover {
    //! The core crosses an upgrade's exec as JSON: every slot, generation, restart count,
    //! rollout and deadline comes back.

    use super::*;

    fn round_trip(sim: &mut Sim) {
        let core = std::mem::take(&mut sim.core);
        let deadline = core.next_deadline();
        let bytes = serde_json::to_vec(&core.snapshot(sim.now).expect("snapshot")).expect("encode");
        // The reader anchors at its own clock (as `clusterd handover-resume` does, shifted by
        // the time the exec took).
        let later = Instant::now();
        let snapshot: crate::Snapshot = serde_json::from_slice(&bytes).expect("decode");
        let core = snapshot.restore(later).expect("restore");
        // Deadlines keep their distance from the moment of writing.
        let (a, b) = (deadline.unwrap(), core.next_deadline().unwrap());
        assert_eq!(
            a.saturating_duration_since(sim.now),
            b.saturating_duration_since(later)
        );
        sim.core = core;
        // The simulator's clock goes on from the decoded instants.
        sim.now = later;
    }

    #[test]
    fn a_rollout_in_progress_crosses_and_completes() {
        let mut sim = Sim::new(&WEB3.replace("bake = \"0s\"", "bake = \"5s\""));
        ready_all(&mut sim, "web");
        let old = sim.serving("web");
        sim.killed(old[2]);
        sim.advance(10 * MS);
        ready_all(&mut sim, "web");
        sim.signal(SupervisorSignal::Reload);
        let candidate = sim.candidate("web", 0).unwrap();
        sim.notify(candidate, "READY=1");
        round_trip(&mut sim);
        assert_eq!(sim.core.apps["web"].slots[2].restarts, 1);
        assert_eq!(sim.core.apps["web"].generation, 2);
        assert_eq!(sim.candidate("web", 0), Some(candidate));
        assert!(sim.core.worker_by_pid(candidate).is_some());
        // Its bake (5 s) goes on from where it was, then the rollout ends as usual.
        sim.advance(4 * SECOND_);
        assert_eq!(
            sim.pid("web", 0),
            Some(old[0]),
            "promoted before its bake ended"
        );
        sim.advance(2 * SECOND_);
        assert_eq!(sim.pid("web", 0), Some(candidate));
        sim.stopped_ones_exit();
        for _ in 0..4 {
            for slot in 0..3 {
                if let Some(pid) = sim.candidate("web", slot)
                    && matches!(sim.phase(pid), Phase::Starting { .. })
                {
                    sim.notify(pid, "READY=1");
                }
            }
            sim.advance(6 * SECOND_);
            sim.stopped_ones_exit();
        }
        assert_eq!(
            sim.last_reload("web"),
            Some(ReloadOutcome::Completed { generation: 2 })
        );
    }

    const SECOND_: Duration = Duration::from_secs(1);
}

mod random {
    //! Random sequences of every event the core accepts, against the invariants: those
    //! `Sim::perform` checks after every step (no deadline in the past, no pid in two workers,
    //! no worker in two slots nor both serving and a candidate, every worker whose stop
    //! timed out was sent SIGKILL), and, here: a rollout stops an old worker only once its
    //! slot's new one is ready, a rollout is never reported completed while one of its new
    //! workers is not running, and after a shutdown every worker is gone (killed if it ignores
    //! its stop signal).

    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    /// The manifest: an intercepted app with drain, ipc and a memory limit; a KV app with a
    /// watchdog, kv_watchdog, restart_limit and `stop_signal = "disconnect"`; a one-shot.
    const BASE: &str = r#"
[sockets.http]
listen = "127.0.0.1:0"
[apps.web]
command = ["srv"]
workers = 3
sockets = ["http"]
intercept = true
drain = "300ms"
ipc = true
ipc_broadcast = true
ready_timeout = "5s"
stop_timeout = "2s"
max_memory = "100M"
[apps.web.reload]
bake = "500ms"
[apps.kv]
command = ["kv"]
workers = 2
ready = "notify"
watchdog = "3s"
kv_segment = "kv"
kv_watchdog = "2s"
restart = "on-failure"
restart_limit = { burst = 3, interval = "5s" }
ipc = true
stop_signal = "disconnect"
stop_timeout = "1s"
[apps.kv.reload]
bake = "300ms"
surge = 2
[apps.once]
command = ["migrate"]
restart = "never"
"#;

    /// What a SIGHUP re-read finds: the same, a new command and worker count, an app added
    /// and one removed, other settings changed.
    fn variant(n: usize) -> clusterd_manifest::Manifest {
        let text = match n % 4 {
            0 => BASE.to_owned(),
            1 => BASE
                .replace("command = [\"srv\"]", "command = [\"srv\", \"--v2\"]")
                .replace("workers = 2", "workers = 3"),
            2 => {
                BASE.replace(
                    "[apps.once]\ncommand = [\"migrate\"]\nrestart = \"never\"\n",
                    "",
                ) + "[apps.extra]\ncommand = [\"x\"]\n"
            }
            _ => BASE
                .replace("bake = \"500ms\"", "bake = \"200ms\"\nbake_each = true")
                .replace("ready_timeout = \"5s\"", "ready_timeout = \"3s\""),
        };
        manifest(&text)
    }

    #[derive(Debug, Clone)]
    enum Step {
        Wait(u64),
        Exit(usize, u8),
        Linger(usize),
        Ready(usize),
        Listen(usize),
        Message(usize, bool),
        Notify(usize, u8),
        Memory(usize),
        SpawnFails(bool),
        Reload(Option<u8>),
        Reread(usize),
        Scale(u8, usize),
        ScaleBy(bool),
        Restart(u8, Option<usize>),
        SignalApp(u8),
        Send(u8, Option<usize>),
        Stop(bool),
        Upgrade,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (1u64..3000).prop_map(Step::Wait),
            3 => (0usize..16, 0u8..4).prop_map(|(i, how)| Step::Exit(i, how)),
            1 => (0usize..16).prop_map(Step::Linger),
            4 => (0usize..16).prop_map(Step::Ready),
            2 => (0usize..16).prop_map(Step::Listen),
            2 => (0usize..16, any::<bool>()).prop_map(|(i, ready)| Step::Message(i, ready)),
            3 => (0usize..16, 0u8..7).prop_map(|(i, what)| Step::Notify(i, what)),
            1 => (0usize..16).prop_map(Step::Memory),
            1 => any::<bool>().prop_map(Step::SpawnFails),
            2 => proptest::option::of(0u8..3).prop_map(Step::Reload),
            1 => (0usize..4).prop_map(Step::Reread),
            1 => (0u8..3, 0usize..5).prop_map(|(a, n)| Step::Scale(a, n)),
            1 => any::<bool>().prop_map(Step::ScaleBy),
            1 => (0u8..3, proptest::option::of(0usize..4)).prop_map(|(a, s)| Step::Restart(a, s)),
            1 => (0u8..3).prop_map(Step::SignalApp),
            1 => (0u8..3, proptest::option::of(0usize..4)).prop_map(|(a, s)| Step::Send(a, s)),
            1 => any::<bool>().prop_map(Step::Stop),
            1 => Just(Step::Upgrade),
        ]
    }

    fn app(n: u8) -> String {
        ["web", "kv", "once"][n as usize % 3].to_owned()
    }

    /// The pids of running workers, in a stable order.
    fn running(sim: &Sim) -> Vec<Pid> {
        sim.core
            .workers
            .values()
            .filter(|w| w.is_running())
            .filter_map(|w| w.pid)
            .collect()
    }

    fn pick(sim: &Sim, i: usize) -> Option<Pid> {
        let pids = running(sim);
        (!pids.is_empty()).then(|| pids[i % pids.len()])
    }

    fn play(sim: &mut Sim, step: &Step) {
        match *step {
            Step::Wait(ms) => {
                sim.advance(Duration::from_millis(ms));
            }
            Step::Exit(i, how) => {
                if let Some(pid) = pick(sim, i) {
                    let status = match how {
                        0 => ExitStatus::Code(0),
                        1 => ExitStatus::Code(1),
                        2 => ExitStatus::Signal(Signal::SIGKILL),
                        _ => ExitStatus::Signal(Signal::SIGSEGV),
                    };
                    sim.exit(pid, status);
                }
            }
            Step::Linger(i) => {
                if let Some(pid) = pick(sim, i) {
                    sim.on(Event::Exited {
                        pid,
                        status: ExitStatus::Code(0),
                        group_empty: false,
                    });
                }
                let lingering: Vec<WorkerId> = sim.core.lingering().map(|(id, _)| id).collect();
                if let Some(id) = lingering.first() {
                    sim.on(Event::GroupEmpty(*id));
                }
            }
            Step::Ready(i) => {
                if let Some(pid) = pick(sim, i) {
                    sim.notify(pid, "READY=1");
                }
            }
            Step::Listen(i) => {
                if let Some(pid) = pick(sim, i) {
                    let worker = sim.core.worker_by_pid(pid).expect("a worker");
                    sim.on(Event::Listening(worker));
                }
            }
            Step::Message(i, ready) => {
                if let Some(pid) = pick(sim, i) {
                    sim.message(pid, if ready { "\"ready\"" } else { "{\"n\":1}" });
                }
            }
            Step::Notify(i, what) => {
                if let Some(pid) = pick(sim, i) {
                    let text = match what {
                        0 => "STATUS=busy",
                        1 => "WATCHDOG=1",
                        2 => "WATCHDOG=trigger",
                        3 => "EXTEND_TIMEOUT_USEC=2000000",
                        4 => "STOPPING=1",
                        5 => "X_CLUSTERD_KV_TEND=owner",
                        _ => "X_CLUSTERD_KV_TEND=released",
                    };
                    sim.notify(pid, text);
                }
            }
            Step::Memory(i) => {
                // Over web's max_memory from its next sample on (every 2 s).
                if let Some(pid) = pick(sim, i) {
                    sim.memory.insert(pid, 1 << 30);
                }
            }
            Step::SpawnFails(transient) => sim.spawn_failures.push(SpawnFailure {
                message: "cannot start".into(),
                transient,
            }),
            Step::Reload(None) => sim.signal(SupervisorSignal::Reload),
            Step::Reload(Some(a)) => sim.control(
                Request::Reload {
                    app: Some(app(a)),
                    wait: true,
                },
                3,
            ),
            Step::Reread(n) => {
                sim.signal(SupervisorSignal::Reread);
                sim.on(Event::Reconfigure(Box::new(variant(n))));
            }
            Step::Scale(a, workers) => sim.control(
                Request::Scale {
                    app: app(a),
                    workers,
                },
                1,
            ),
            Step::ScaleBy(up) => sim.signal(SupervisorSignal::ScaleBy(if up { 1 } else { -1 })),
            Step::Restart(a, slot) => sim.control(Request::Restart { app: app(a), slot }, 2),
            Step::SignalApp(a) => sim.control(
                Request::Signal {
                    app: app(a),
                    signal: "HUP".into(),
                },
                4,
            ),
            Step::Send(a, slot) => sim.control(
                Request::Send {
                    app: app(a),
                    slot,
                    message: "{\"hi\":true}".into(),
                },
                5,
            ),
            Step::Stop(by_control) => {
                if by_control {
                    sim.control(Request::Stop {}, 6);
                } else {
                    sim.signal(SupervisorSignal::Stop(Signal::SIGTERM));
                }
            }
            Step::Upgrade => sim.signal(SupervisorSignal::Upgrade),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn invariants_hold_under_random_events(steps in proptest::collection::vec(step(), 1..80)) {
            let mut sim = Sim::new(BASE);
            for step in steps {
                let before_reload: BTreeMap<String, Option<u64>> = sim
                    .core
                    .apps
                    .iter()
                    .map(|(name, a)| (name.clone(), a.last_reload.as_ref().map(|o| o.generation())))
                    .collect();
                play(&mut sim, &step);
                if sim.core.shutting_down() {
                    for app in sim.core.apps.values() {
                        prop_assert!(app.slots.iter().all(|s| s.state == SlotState::Stopped));
                    }
                }
                for (name, app) in &sim.core.apps {
                    if let Some(ReloadOutcome::Completed { generation }) = app.last_reload
                        && before_reload.get(name).copied().flatten() != Some(generation)
                    {
                        // Just completed: every slot that should run does, on that generation
                        // (or a newer one, if the rollout that followed it is under way).
                        for slot in &app.slots {
                            // Not running by intent, or failed to start or waiting to start
                            // that generation again (an operator's restart of the slot during
                            // the rollout can end so).
                            if matches!(slot.state, SlotState::Done { .. } | SlotState::Failed { .. })
                                || matches!(slot.state, SlotState::Backoff { .. }) && slot.generation >= generation
                            {
                                continue;
                            }
                            let worker = slot.worker().and_then(|id| sim.core.workers.get(&id));
                            prop_assert!(worker.is_some_and(|w| w.generation >= generation && w.is_running()),
                                "{} completed while a slot does not run generation {}: {:?} {:?}",
                                name, generation, slot.state, worker.map(|w| (w.generation, w.phase)));
                        }
                    }
                }
            }
            // Whatever happened, a shutdown ends: workers that ignore their stop signal are
            // killed after their stop timeout, and it is over once every worker is gone.
            sim.signal(SupervisorSignal::Stop(Signal::SIGTERM));
            sim.advance(Duration::from_secs(10));
            for worker in sim.core.workers.values() {
                if let (Some(pid), Phase::Stopping { exited: false, .. }) = (worker.pid, worker.phase) {
                    prop_assert!(sim.sent(pid, Signal::SIGKILL), "{} was never killed", worker.label());
                }
            }
            let alive: Vec<Pid> = sim.core.workers.values()
                .filter(|w| w.is_running())
                .filter_map(|w| w.pid)
                .collect();
            for pid in alive {
                sim.killed(pid);
            }
            let lingering: Vec<WorkerId> = sim.core.lingering().map(|(id, _)| id).collect();
            for id in lingering {
                sim.on(Event::GroupEmpty(id));
            }
            prop_assert!(sim.core.finished());
        }
    }
}

// ----- worker messaging (ipc) -----

const IPC3: &str = "[apps.web]\ncommand = [\"node\", \"w.js\"]\nworkers = 3\nready = \"message\"\n\
                    ipc_broadcast = true\n[apps.web.reload]\nbake = \"0s\"\n";

#[test]
fn a_ready_message_makes_a_worker_ready_and_gates_a_rollout() {
    let mut sim = Sim::new(IPC3);
    let first = sim.pid("web", 0).unwrap();
    sim.message(first, r#"{"type":"status"}"#);
    sim.advance(Duration::from_secs(5));
    assert_eq!(
        sim.ready("web"),
        0,
        "only a ready message makes a worker ready"
    );
    for slot in 0..3 {
        let pid = sim.pid("web", slot).unwrap();
        let text = if slot == 0 {
            "\"ready\""
        } else {
            r#"{"type":"ready"}"#
        };
        sim.message(pid, text);
    }
    assert_eq!(sim.ready("web"), 3);
    sim.signal(SupervisorSignal::Reload);
    let candidate = sim.candidate("web", 0).expect("a candidate");
    sim.advance(Duration::from_secs(10));
    assert_eq!(
        sim.pid("web", 0),
        Some(first),
        "the old worker serves until the new one says ready"
    );
    assert!(!sim.sent(first, Signal::SIGTERM));
    sim.message(candidate, "\"ready\"");
    sim.advance(Duration::from_millis(1));
    assert_eq!(sim.pid("web", 0), Some(candidate));
    assert!(sim.sent(first, Signal::SIGTERM));
}

#[test]
fn with_ipc_broadcast_a_message_goes_to_the_apps_other_workers_only() {
    let mut sim = Sim::new(&IPC3.replace("ready = \"message\"", "ready = \"immediate\""));
    let pids: Vec<Pid> = (0..3).map(|slot| sim.pid("web", slot).unwrap()).collect();
    let ids: Vec<WorkerId> = pids
        .iter()
        .map(|p| sim.core.worker_by_pid(*p).unwrap())
        .collect();
    sim.message(pids[0], r#"{"type":"status","pid":1}"#);
    let mut to: Vec<WorkerId> = sim.delivered.iter().map(|(w, _)| *w).collect();
    to.sort();
    assert_eq!(to, vec![ids[1], ids[2]]);
    assert!(
        sim.delivered
            .iter()
            .all(|(_, t)| t == r#"{"type":"status","pid":1}"#)
    );
    // Readiness is the supervisor's: not forwarded.
    sim.delivered.clear();
    sim.message(pids[1], "\"ready\"");
    assert!(sim.delivered.is_empty());
    // Counted, and the last five kept for status.
    for n in 0..7 {
        sim.message(pids[2], &format!("{n}"));
    }
    let inbox = &sim.core.workers[&ids[2]].inbox;
    assert_eq!(inbox.received, 7);
    assert_eq!(inbox.recent, ["2", "3", "4", "5", "6"]);
    // Without ipc_broadcast, nothing is forwarded.
    let mut quiet = Sim::new(
        &IPC3
            .replace("ipc_broadcast = true\n", "")
            .replace("\"message\"", "\"immediate\""),
    );
    let pid = quiet.pid("web", 0).unwrap();
    quiet.message(pid, "{}");
    assert!(quiet.delivered.is_empty());
}

#[test]
fn send_reaches_one_slot_or_every_worker_and_needs_ipc() {
    let mut sim = Sim::new(&IPC3.replace("ready = \"message\"", "ready = \"immediate\""));
    let message = serde_json::json!({"hello": 1});
    let send = |slot| Request::Send {
        app: "web".into(),
        slot,
        message: message.clone(),
    };
    sim.control(send(None), 1);
    assert_eq!(sim.delivered.len(), 3);
    assert!(sim.delivered.iter().all(|(_, t)| t == r#"{"hello":1}"#));
    sim.delivered.clear();
    sim.control(send(Some(2)), 2);
    let slot2 = sim.core.worker_by_pid(sim.pid("web", 2).unwrap()).unwrap();
    assert_eq!(sim.delivered, vec![(slot2, r#"{"hello":1}"#.to_owned())]);
    sim.control(send(Some(7)), 3);
    assert!(matches!(
        sim.replies.last(),
        Some((ReplyTo(3), Reply::Error { .. }))
    ));
    let mut plain = Sim::new("[apps.web]\ncommand = [\"x\"]\n");
    plain.control(send(None), 4);
    assert!(
        matches!(plain.replies.last(), Some((ReplyTo(4), Reply::Error { message, .. })) if message.contains("ipc = true"))
    );
}

#[test]
fn stop_signal_disconnect_closes_the_channel_then_signals_after_the_grace() {
    let mut sim = Sim::new(
        "[apps.web]\ncommand = [\"node\", \"w.js\"]\nworkers = 2\nstop_signal = \"disconnect\"\n\
         stop_timeout = \"2s\"\n",
    );
    let (a, b) = (sim.pid("web", 0).unwrap(), sim.pid("web", 1).unwrap());
    let (ida, idb) = (
        sim.core.worker_by_pid(a).unwrap(),
        sim.core.worker_by_pid(b).unwrap(),
    );
    sim.control(
        Request::Restart {
            app: "web".into(),
            slot: Some(0),
        },
        1,
    );
    assert_eq!(sim.disconnected, vec![ida]);
    assert!(!sim.sent(a, Signal::SIGTERM), "disconnect first");
    // A retiring worker whose channel is closed gets no broadcast.
    sim.control(
        Request::Send {
            app: "web".into(),
            slot: None,
            message: serde_json::json!(1),
        },
        2,
    );
    assert!(sim.delivered.iter().all(|(w, _)| *w != ida));
    sim.advance(Duration::from_millis(1999));
    assert!(!sim.sent(a, Signal::SIGTERM));
    sim.advance(Duration::from_millis(1));
    assert!(
        sim.sent(a, Signal::SIGTERM),
        "the real stop signal after the grace"
    );
    sim.advance(Duration::from_secs(2));
    assert!(sim.sent(a, Signal::SIGKILL));
    sim.killed(a);
    // A worker that leaves when its channel closes (as Node's cluster workers do) is never
    // signalled.
    sim.signal(SupervisorSignal::Stop(Signal::SIGTERM));
    assert!(sim.disconnected.contains(&idb));
    let replacement = sim.pid("web", 0).or_else(|| {
        let (_, w) = sim.core.workers.iter().find(|(_, w)| w.pid != Some(b))?;
        w.pid
    });
    for pid in [Some(b), replacement].into_iter().flatten() {
        sim.exit(pid, ExitStatus::Code(0));
    }
    assert!(!sim.sent(b, Signal::SIGTERM));
    assert!(sim.core.finished());
}

// ----- one-shot tasks: readiness that knows intent -----

const ONE_SHOT: &str = r#"
[apps.web]
command = ["srv"]
workers = 2
ready = "notify"
[apps.web.reload]
bake = "0s"
[apps.migrate]
command = ["sh", "-c", "echo migrated; exit 0"]
restart = "on-failure"
"#;

fn statuses(sim: &Sim) -> Vec<clusterd_proto::AppStatus> {
    let none = std::collections::HashMap::new();
    let measured = super::status::Measured {
        usage: &none,
        cpu_percent: &std::collections::HashMap::new(),
    };
    sim.core.app_statuses(sim.now, &measured)
}

#[test]
fn a_one_shot_that_finished_is_not_missing_and_status_says_done() {
    use crate::host::{HostMessage, HostNotifier};
    let mut sim = Sim::new(ONE_SHOT);
    let mut host = HostNotifier::default();
    ready_all(&mut sim, "web");
    // Running (ready at once): ready like any worker.
    assert_eq!(sim.core.readiness(), Ok(()));
    let migrate = sim.pid("migrate", 0).unwrap();
    sim.exit(migrate, ExitStatus::Code(0));
    assert_eq!(
        sim.slot_state("migrate", 0),
        SlotState::Done { code: Some(0) }
    );
    assert_eq!(sim.core.readiness(), Ok(()));
    assert!(host.update(&sim.core).contains(&HostMessage::Ready));
    assert_eq!(
        sim.core.summary(),
        "migrate 0/0 ready (1 done), web 2/2 ready"
    );
    let apps = statuses(&sim);
    let app = apps.iter().find(|a| a.name == "migrate").unwrap();
    assert_eq!((app.desired, app.ready, app.done), (1, 0, 1));
    let slot = &app.workers[0];
    assert_eq!(slot.state, clusterd_proto::WorkerState::Exited);
    assert!(slot.done);
    assert_eq!(slot.exit_code, Some(0));
    assert_eq!(sim.spawns, 3, "not restarted");

    // A restart of the slot runs it again.
    sim.control(
        Request::Restart {
            app: "migrate".into(),
            slot: Some(0),
        },
        1,
    );
    assert!(sim.pid("migrate", 0).is_some());
    assert!(!statuses(&sim)[0].workers[0].done);
}

#[test]
fn a_one_shot_that_fails_is_retried_and_missing_until_it_succeeds() {
    let mut sim = Sim::new(ONE_SHOT);
    ready_all(&mut sim, "web");
    let migrate = sim.pid("migrate", 0).unwrap();
    sim.exit(migrate, ExitStatus::Code(1));
    // on-failure: retried, and missing meanwhile.
    assert!(sim.pid("migrate", 0).is_some(), "first failure: at once");
    let again = sim.pid("migrate", 0).unwrap();
    sim.exit(again, ExitStatus::Code(1));
    assert!(matches!(
        sim.slot_state("migrate", 0),
        SlotState::Backoff { .. }
    ));
    let reason = sim.core.readiness().unwrap_err();
    assert_eq!(reason, "migrate: 0/1 workers ready");
    sim.advance(Duration::from_secs(1));
    let third = sim.pid("migrate", 0).unwrap();
    sim.exit(third, ExitStatus::Code(0));
    assert_eq!(sim.core.readiness(), Ok(()));
}

#[test]
fn restart_never_is_done_whatever_the_exit_but_a_failed_slot_is_missing() {
    let mut sim = Sim::new(
        "[apps.once]\ncommand = [\"x\"]\nrestart = \"never\"\n\
         [apps.web]\ncommand = [\"x\"]\nworkers = 2\nrestart_limit = { burst = 1, interval = \"10s\" }\n",
    );
    let once = sim.pid("once", 0).unwrap();
    sim.exit(once, ExitStatus::Signal(Signal::SIGSEGV));
    assert_eq!(sim.slot_state("once", 0), SlotState::Done { code: None });
    assert_eq!(sim.core.readiness(), Ok(()));
    let status = &statuses(&sim)[0].workers[0];
    assert!(status.done);
    assert_eq!(status.exit_code, None);
    // restart_limit: the slot fails; it should be up, so it is missing, and named.
    for _ in 0..2 {
        let pid = sim.pid("web", 1).unwrap();
        sim.exit(pid, ExitStatus::Code(1));
        sim.advance(Duration::from_secs(1));
    }
    assert!(matches!(sim.slot_state("web", 1), SlotState::Failed { .. }));
    assert_eq!(
        sim.core.readiness(),
        Err("web: 1/2 workers ready (slot 1 failed)".into())
    );
}

#[test]
fn a_reload_reruns_a_finished_one_shot_and_its_exit_0_completes_its_step() {
    let mut sim = Sim::new(ONE_SHOT);
    ready_all(&mut sim, "web");
    let migrate = sim.pid("migrate", 0).unwrap();
    sim.exit(migrate, ExitStatus::Code(0));
    sim.signal(SupervisorSignal::Reload);
    let rerun = sim.candidate("migrate", 0).expect("run again");
    // Ready at once (immediate); it finishes within its bake: no abort.
    sim.advance(10 * MS);
    sim.exit(rerun, ExitStatus::Code(0));
    assert_eq!(
        sim.last_reload("migrate"),
        Some(ReloadOutcome::Completed { generation: 2 })
    );
    let done = sim
        .events
        .iter()
        .find(|n| matches!(n.what, What::RerunDone { .. }))
        .expect("rerun_done");
    assert_eq!(
        (done.app.as_deref(), done.slot, done.pid, done.generation),
        (Some("migrate"), Some(0), Some(rerun), Some(2))
    );
    assert_eq!(done.what, What::RerunDone { uptime: 10 * MS });
    assert_eq!(
        sim.slot_state("migrate", 0),
        SlotState::Done { code: Some(0) }
    );
    assert_eq!(sim.core.apps["migrate"].slots[0].generation, 2);
    roll(&mut sim, "web");
    assert_eq!(sim.core.readiness(), Ok(()));

    // A run that outlives its bake is promoted, and its exit 0 still completes it.
    sim.signal(SupervisorSignal::Reload);
    roll(&mut sim, "web");
    let long = sim.candidate("migrate", 0).unwrap();
    sim.advance(Duration::from_secs(2));
    assert_eq!(sim.pid("migrate", 0), Some(long), "promoted after its bake");
    sim.exit(long, ExitStatus::Code(0));
    sim.advance(Duration::from_secs(2));
    assert_eq!(
        sim.last_reload("migrate"),
        Some(ReloadOutcome::Completed { generation: 3 })
    );

    // A run that fails aborts the rollout; the slot stays done on its generation.
    sim.signal(SupervisorSignal::Reload);
    let bad = sim.candidate("migrate", 0).unwrap();
    sim.exit(bad, ExitStatus::Code(3));
    assert!(matches!(
        sim.last_reload("migrate"),
        Some(ReloadOutcome::Aborted { generation: 4, .. })
    ));
    assert_eq!(
        sim.slot_state("migrate", 0),
        SlotState::Done { code: Some(0) }
    );
    assert_eq!(sim.core.apps["migrate"].slots[0].generation, 3);
}

// ----- rollout pace: a baked canary, then readiness speed -----

fn web(workers: usize, reload: &str) -> String {
    format!(
        "[apps.web]\ncommand = [\"srv\"]\nworkers = {workers}\nready = \"notify\"\n\
         [apps.web.reload]\n{reload}\n"
    )
}

/// Every candidate that is starting says READY=1; returns how many did.
fn ready_candidates(sim: &mut Sim, app: &str) -> usize {
    let starting: Vec<Pid> = (0..sim.core.apps[app].slots.len())
        .filter_map(|slot| sim.candidate(app, slot))
        .filter(|pid| matches!(sim.phase(*pid), Phase::Starting { .. }))
        .collect();
    for pid in &starting {
        sim.notify(*pid, "READY=1");
    }
    starting.len()
}

fn candidates(sim: &Sim, app: &str) -> usize {
    (0..sim.core.apps[app].slots.len())
        .filter(|s| sim.candidate(app, *s).is_some())
        .count()
}

#[test]
fn the_canary_bakes_then_batches_double_at_readiness_speed_and_the_last_one_bakes() {
    let mut sim = Sim::new(&web(8, "bake = \"1s\""));
    ready_all(&mut sim, "web");
    sim.signal(SupervisorSignal::Reload);
    // The canary: one candidate (surge 1), promoted only after its bake.
    assert_eq!(candidates(&sim, "web"), 1);
    ready_candidates(&mut sim, "web");
    sim.advance(999 * MS);
    assert_eq!(candidates(&sim, "web"), 1, "still baking");
    sim.advance(MS);
    // Then batches as large as what was promoted so far: 1, 2, 4 — each promoted once ready.
    let mut batches = Vec::new();
    while candidates(&sim, "web") > 0 {
        batches.push(candidates(&sim, "web"));
        assert_eq!(ready_candidates(&mut sim, "web"), *batches.last().unwrap());
        assert_eq!(sim.ready("web"), 8, "every slot keeps a ready worker");
    }
    assert_eq!(batches, [1, 2, 4]);
    sim.stopped_ones_exit();
    // Complete only once the last promoted worker has been ready for the bake.
    sim.advance(999 * MS);
    assert!(sim.core.apps["web"].rollout.is_some());
    sim.advance(MS);
    assert_eq!(
        sim.last_reload("web"),
        Some(ReloadOutcome::Completed { generation: 2 })
    );
}

#[test]
fn a_crash_in_the_canary_aborts_and_every_old_worker_keeps_serving() {
    let mut sim = Sim::new(&web(4, "bake = \"1s\"\nsurge = 2"));
    ready_all(&mut sim, "web");
    let old = sim.serving("web");
    sim.signal(SupervisorSignal::Reload);
    assert_eq!(candidates(&sim, "web"), 2, "the canary is `surge` workers");
    ready_candidates(&mut sim, "web");
    sim.advance(500 * MS);
    let c1 = sim.candidate("web", 1).unwrap();
    sim.exit(c1, ExitStatus::Code(1));
    assert!(matches!(
        sim.last_reload("web"),
        Some(ReloadOutcome::Aborted { .. })
    ));
    assert_eq!(sim.serving("web"), old);
    assert!(old.iter().all(|p| !sim.sent(*p, Signal::SIGTERM)));
}

#[test]
fn a_crash_in_a_later_batch_or_before_the_last_bake_aborts_and_rolls_back() {
    // Before ready, in the second batch.
    let mut sim = Sim::new(&web(6, "bake = \"1s\""));
    ready_all(&mut sim, "web");
    let old = sim.serving("web");
    sim.signal(SupervisorSignal::Reload);
    ready_candidates(&mut sim, "web");
    sim.advance(Duration::from_secs(1));
    ready_candidates(&mut sim, "web"); // slot 1, promoted at once
    assert_eq!(candidates(&sim, "web"), 2, "slots 2 and 3");
    let c3 = sim.candidate("web", 3).unwrap();
    sim.exit(c3, ExitStatus::Code(1));
    match sim.last_reload("web") {
        Some(ReloadOutcome::Aborted { reason, .. }) => assert!(reason.contains("slot 3")),
        other => panic!("{other:?}"),
    }
    // Promoted slots keep their live new workers; the others their old ones.
    assert_eq!(&sim.serving("web")[2..], &old[2..]);
    let promoted = sim.pid("web", 1).unwrap();
    assert!(!old.contains(&promoted));
    assert_eq!(candidates(&sim, "web"), 0);
    // Unbaked and no longer watched: when that new worker ends, its slot goes back.
    sim.exit(promoted, ExitStatus::Code(1));
    let respawned = sim.pid("web", 1).unwrap();
    assert_eq!(
        sim.core.workers[&sim.core.worker_by_pid(respawned).unwrap()].generation,
        1
    );

    // After every slot is promoted, during the final bake: the slot goes back.
    let mut sim = Sim::new(&web(3, "bake = \"1s\""));
    ready_all(&mut sim, "web");
    sim.signal(SupervisorSignal::Reload);
    ready_candidates(&mut sim, "web");
    sim.advance(Duration::from_secs(1));
    while candidates(&sim, "web") > 0 {
        ready_candidates(&mut sim, "web");
    }
    sim.stopped_ones_exit();
    sim.advance(500 * MS);
    let last = sim.pid("web", 2).unwrap();
    sim.exit(last, ExitStatus::Code(1));
    match sim.last_reload("web") {
        Some(ReloadOutcome::Aborted { reason, .. }) => {
            assert!(reason.contains("after it replaced"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(sim.core.apps["web"].slots[2].generation, 1);
    let respawned = sim.pid("web", 2).unwrap();
    let worker = &sim.core.workers[&sim.core.worker_by_pid(respawned).unwrap()];
    assert_eq!(worker.generation, 1);
}

#[test]
fn bake_each_bakes_every_slot_surge_at_a_time() {
    let mut sim = Sim::new(&web(3, "bake = \"1s\"\nbake_each = true"));
    ready_all(&mut sim, "web");
    sim.signal(SupervisorSignal::Reload);
    for slot in 0..3 {
        assert_eq!(candidates(&sim, "web"), 1);
        let old = sim.pid("web", slot).unwrap();
        ready_candidates(&mut sim, "web");
        sim.advance(999 * MS);
        assert_eq!(sim.pid("web", slot), Some(old), "slot {slot} bakes");
        sim.advance(MS);
        assert_ne!(sim.pid("web", slot), Some(old));
        sim.stopped_ones_exit();
    }
    assert_eq!(
        sim.last_reload("web"),
        Some(ReloadOutcome::Completed { generation: 2 })
    );
}
