//! The dashboard's state, kept on the client: the last status snapshot, a short history of
//! CPU and memory per worker slot and per app, the selected row, the followed app's last log
//! lines, and what a key asks for. Pure: no terminal, no socket, the time passed in.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use clusterd_proto::{AppStatus, LogLine, Request, Status, WorkerRole, WorkerStatus};
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

/// Samples of CPU and memory kept per slot and per app (one a second: the last minute).
pub const HISTORY: usize = 60;

/// Log lines of the followed app kept on the client.
pub const LOG_LINES: usize = 500;

/// What a history is kept for: an app (`slot: None`, its workers summed) or one of its slots
/// (the slot's serving worker, across its restarts).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    /// The app.
    pub app: String,
    /// The slot; `None` for the app as a whole.
    pub slot: Option<usize>,
}

/// CPU (tenths of a percent of one core) and resident memory (KiB), oldest first.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct History {
    /// CPU samples, in tenths of a percent of one core.
    pub cpu: VecDeque<u64>,
    /// Resident memory samples, in KiB.
    pub mem: VecDeque<u64>,
}

impl History {
    fn push(&mut self, cpu_percent: f64, rss_bytes: u64) {
        for (samples, value) in [
            (&mut self.cpu, (cpu_percent * 10.0).round() as u64),
            (&mut self.mem, rss_bytes / 1024),
        ] {
            if samples.len() == HISTORY {
                samples.pop_front();
            }
            samples.push_back(value);
        }
    }
}

/// One line of the table: an app, or one of its worker processes (or empty slots).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    /// Index into the status's apps.
    pub app: usize,
    /// Index into the app's workers; `None` for the app's own line.
    pub worker: Option<usize>,
}

/// What a key press asks the dashboard to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Leave, restoring the terminal.
    Quit,
    /// Send a control request; the text says what it is, for the footer.
    Send(Request, String),
}

/// The dashboard's state.
#[derive(Debug, Default)]
pub struct Model {
    /// The last status the supervisor answered.
    pub status: Option<Status>,
    /// Why the last status request failed (the supervisor went away); `None` while connected.
    pub disconnected: Option<String>,
    /// CPU and memory history by app and slot.
    pub histories: HashMap<Key, History>,
    /// CPU use per pid over the last interval, percent of one core (from `cpu_seconds`).
    pub cpu: HashMap<u32, f64>,
    /// Each pid's CPU seconds when last seen, to compute [`Model::cpu`].
    cpu_seen: HashMap<u32, (f64, Instant)>,
    /// The table's lines, from the last status.
    pub rows: Vec<Row>,
    /// The selected line, an index into `rows`.
    pub selected: usize,
    /// The followed app's last lines (all belong to `log_app`).
    pub logs: VecDeque<LogLine>,
    /// The app whose lines `logs` holds.
    pub log_app: Option<String>,
    /// The outcome of the last request sent from a key, for the footer.
    pub message: Option<String>,
}

impl Model {
    /// Takes a new status snapshot at `now`: updates CPU rates, histories, rows, and keeps
    /// the selection on the same worker (or its slot, or its app) where it can.
    pub fn on_status(&mut self, status: Status, now: Instant) {
        let selected = self.selected_identity();
        self.disconnected = None;
        let mut cpu = HashMap::new();
        let mut seen = HashMap::new();
        for worker in status.apps.iter().flat_map(|a| &a.workers) {
            let (Some(pid), Some(seconds)) = (worker.pid, worker.cpu_seconds) else {
                continue;
            };
            if let Some((before, at)) = self.cpu_seen.get(&pid) {
                let wall = now.saturating_duration_since(*at).as_secs_f64();
                if wall > 0.0 {
                    cpu.insert(pid, ((seconds - before) / wall * 100.0).max(0.0));
                }
            }
            seen.insert(pid, (seconds, now));
        }
        self.cpu = cpu;
        self.cpu_seen = seen;
        let mut live = Vec::new();
        for app in &status.apps {
            let (mut app_cpu, mut app_mem) = (0.0, 0);
            for worker in app.workers.iter().filter(|w| w.pid.is_some()) {
                let (c, m) = (
                    self.cpu_of(worker).unwrap_or(0.0),
                    worker.rss_bytes.unwrap_or(0),
                );
                app_cpu += c;
                app_mem += m;
                if worker.role == WorkerRole::Serving {
                    let key = Key {
                        app: app.name.clone(),
                        slot: Some(worker.slot),
                    };
                    self.histories.entry(key.clone()).or_default().push(c, m);
                    live.push(key);
                }
            }
            let key = Key {
                app: app.name.clone(),
                slot: None,
            };
            self.histories
                .entry(key.clone())
                .or_default()
                .push(app_cpu, app_mem);
            live.push(key);
        }
        self.histories.retain(|key, _| live.contains(key));
        self.rows = status
            .apps
            .iter()
            .enumerate()
            .flat_map(|(a, app)| {
                std::iter::once(Row {
                    app: a,
                    worker: None,
                })
                .chain((0..app.workers.len()).map(move |w| Row {
                    app: a,
                    worker: Some(w),
                }))
            })
            .collect();
        self.status = Some(status);
        self.selected = self.find(selected).unwrap_or(self.selected);
        self.selected = self.selected.min(self.rows.len().saturating_sub(1));
    }

    /// The supervisor did not answer: shown as disconnected, the last snapshot kept.
    pub fn on_disconnected(&mut self, reason: String) {
        self.disconnected = Some(reason);
    }

    /// A line of output; kept when it belongs to the followed app (at most [`LOG_LINES`]).
    pub fn on_log(&mut self, line: LogLine) {
        if self.log_app.as_deref() != Some(line.app.as_str()) {
            return;
        }
        if self.logs.len() == LOG_LINES {
            self.logs.pop_front();
        }
        self.logs.push_back(line);
    }

    /// Starts following `app`'s lines: the old app's are dropped.
    pub fn follow(&mut self, app: Option<String>) {
        if self.log_app != app {
            self.logs.clear();
            self.log_app = app;
        }
    }

    /// A worker's CPU over the last interval, percent of one core.
    pub fn cpu_of(&self, worker: &WorkerStatus) -> Option<f64> {
        self.cpu.get(&worker.pid?).copied()
    }

    /// The selected app and worker, if any.
    pub fn selection(&self) -> Option<(&AppStatus, Option<&WorkerStatus>)> {
        let row = self.rows.get(self.selected)?;
        let app = self.status.as_ref()?.apps.get(row.app)?;
        Some((app, row.worker.and_then(|w| app.workers.get(w))))
    }

    /// The app of the selected line: the one whose logs are followed.
    pub fn selected_app(&self) -> Option<String> {
        self.selection().map(|(app, _)| app.name.clone())
    }

    /// What the selection is: app, slot and pid.
    fn selected_identity(&self) -> Option<(String, Option<usize>, Option<u32>)> {
        let (app, worker) = self.selection()?;
        Some((
            app.name.clone(),
            worker.map(|w| w.slot),
            worker.and_then(|w| w.pid),
        ))
    }

    /// The row of the same worker (by pid), else the slot's serving worker, else the app.
    fn find(&self, identity: Option<(String, Option<usize>, Option<u32>)>) -> Option<usize> {
        let (name, slot, pid) = identity?;
        let apps = &self.status.as_ref()?.apps;
        let matches = |row: &Row, exact: bool| {
            let app = &apps[row.app];
            if app.name != name {
                return false;
            }
            match (row.worker.map(|w| &app.workers[w]), slot) {
                (None, None) => true,
                (Some(w), Some(slot)) if w.slot == slot => {
                    if exact {
                        pid.is_some() && w.pid == pid
                    } else {
                        w.role == WorkerRole::Serving
                    }
                }
                _ => false,
            }
        };
        self.rows
            .iter()
            .position(|r| matches(r, true))
            .or_else(|| self.rows.iter().position(|r| matches(r, false)))
            .or_else(|| {
                self.rows
                    .iter()
                    .position(|r| r.worker.is_none() && apps[r.app].name == name)
            })
    }

    /// A key press: moves the selection, or says what to do.
    pub fn on_key(&mut self, key: KeyEvent) -> Option<Command> {
        if key.kind != KeyEventKind::Press {
            return None;
        }
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        match key.code {
            KeyCode::Char('c') if ctrl => Some(Command::Quit),
            KeyCode::Char('q') | KeyCode::Esc => Some(Command::Quit),
            KeyCode::Up | KeyCode::Char('k') => {
                self.selected = self.selected.saturating_sub(1);
                None
            }
            KeyCode::Down | KeyCode::Char('j') => {
                self.selected = (self.selected + 1).min(self.rows.len().saturating_sub(1));
                None
            }
            KeyCode::Home | KeyCode::Char('g') => {
                self.selected = 0;
                None
            }
            KeyCode::End | KeyCode::Char('G') => {
                self.selected = self.rows.len().saturating_sub(1);
                None
            }
            KeyCode::Char('r') => {
                let app = self.selected_app()?;
                Some(Command::Send(
                    Request::Reload {
                        app: Some(app.clone()),
                        wait: false,
                    },
                    format!("reload {app}"),
                ))
            }
            KeyCode::Char('R' | 'x') => {
                let (app, worker) = self.selection()?;
                let (app, slot) = (app.name.clone(), worker.map(|w| w.slot));
                let what = match slot {
                    Some(slot) => format!("restart {app}:{slot}"),
                    None => format!("restart {app}"),
                };
                Some(Command::Send(Request::Restart { app, slot }, what))
            }
            KeyCode::Char(c @ ('+' | '-')) => {
                let row = *self.rows.get(self.selected)?;
                let app = self.status.as_mut()?.apps.get_mut(row.app)?;
                let workers = if c == '+' {
                    app.desired + 1
                } else if app.desired > 1 {
                    app.desired - 1
                } else {
                    self.message = Some(format!(
                        "{} keeps 1 worker (`clusterd scale` to 0)",
                        app.name
                    ));
                    return None;
                };
                // Shown at once, and a second key press counts from it; the next status says
                // what the supervisor made of it.
                app.desired = workers;
                let name = app.name.clone();
                Some(Command::Send(
                    Request::Scale {
                        app: name.clone(),
                        workers,
                    },
                    format!("scale {name} to {workers}"),
                ))
            }
            _ => None,
        }
    }
}
