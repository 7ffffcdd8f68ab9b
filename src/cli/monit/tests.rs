//! The model and the drawing without a terminal: status snapshots in, cells out
//! (ratatui's `TestBackend`), keys in, requests out.

use std::time::{Duration, Instant};

use clusterd_proto::{
    AppReload, AppStatus, LogLine, LogStream, ReloadResult, Request, RolloutStatus, Status,
    WorkerRole, WorkerState, WorkerStatus,
};
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::model::{Command, HISTORY, Key, LOG_LINES, Model};
use super::{FRAME, Redraw, view};

fn worker(slot: usize, pid: u32, cpu_seconds: f64, rss: u64) -> WorkerStatus {
    WorkerStatus {
        slot,
        pid: Some(pid),
        state: WorkerState::Ready,
        role: WorkerRole::Serving,
        generation: 1,
        uptime_ms: Some(5_000),
        ready_ms: Some(20),
        restarts: 0,
        crash_streak: 0,
        last_exit: None,
        done: false,
        exit_code: None,
        cpu_percent: None,
        cpu_seconds: Some(cpu_seconds),
        rss_bytes: Some(rss),
        status_text: None,
        restart_reason: None,
        tend_owner: false,
        messages_received: 0,
        messages_dropped: 0,
        last_messages: Vec::new(),
    }
}

fn app(name: &str, workers: Vec<WorkerStatus>) -> AppStatus {
    AppStatus {
        name: name.into(),
        desired: workers.len(),
        running: workers.len(),
        ready: workers.len(),
        done: 0,
        reloading: None,
        last_reload: None,
        tend_owner: None,
        tend_heard_ms: None,
        workers,
    }
}

fn status(apps: Vec<AppStatus>) -> Status {
    Status {
        pid: 4242,
        manifest: "/srv/supervisor.toml".into(),
        uptime_ms: 65_000,
        rss_bytes: 3 << 20,
        stopping: false,
        sockets: Vec::new(),
        metrics: None,
        apps,
        containment: String::new(),
        output_dropped: 0,
        ready: true,
        not_ready: None,
        version: "0.1.0".into(),
        upgrades: 0,
        upgraded_ms: None,
    }
}

/// Two apps: web with two workers, api with one.
fn two_apps(cpu: f64) -> Status {
    status(vec![
        app(
            "web",
            vec![
                worker(0, 5150, cpu, 40 << 20),
                worker(1, 5151, cpu / 2.0, 20 << 20),
            ],
        ),
        app("api", vec![worker(0, 6160, 0.0, 10 << 20)]),
    ])
}

fn key(code: KeyCode) -> KeyEvent {
    KeyEvent::new(code, KeyModifiers::NONE)
}

/// The screen as lines of text.
fn render(model: &Model, width: u16, height: u16) -> Vec<String> {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).expect("terminal");
    terminal
        .draw(|frame| view::draw(frame, model))
        .expect("draw");
    let buffer = terminal.backend().buffer();
    (0..buffer.area.height)
        .map(|y| {
            (0..buffer.area.width)
                .map(|x| buffer[(x, y)].symbol())
                .collect::<String>()
        })
        .collect()
}

fn line_with<'a>(screen: &'a [String], needle: &str) -> &'a str {
    screen
        .iter()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{}", screen.join("\n")))
}

#[test]
fn cpu_is_the_rate_of_cpu_seconds_between_two_snapshots() {
    let mut model = Model::default();
    let t0 = Instant::now();
    model.on_status(two_apps(1.0), t0);
    assert!(model.cpu.is_empty(), "no rate from one sample");
    model.on_status(two_apps(1.5), t0 + Duration::from_secs(1));
    assert_eq!(model.cpu[&5150], 50.0);
    assert_eq!(model.cpu[&5151], 25.0);
    let web = &model.histories[&Key {
        app: "web".into(),
        slot: None,
    }];
    // Tenths of a percent: 0 (no rate yet), then 50% + 25%.
    assert_eq!(web.cpu, [0, 750]);
    assert_eq!(web.mem.back(), Some(&(60 << 10)));
    // A new pid in the slot (a restart) starts from no rate, the slot's history goes on.
    let mut restarted = two_apps(2.0);
    restarted.apps[0].workers[0].pid = Some(5152);
    model.on_status(restarted, t0 + Duration::from_secs(2));
    assert!(!model.cpu.contains_key(&5152));
    let slot0 = &model.histories[&Key {
        app: "web".into(),
        slot: Some(0),
    }];
    assert_eq!(slot0.cpu.len(), 3);
}

#[test]
fn histories_are_bounded_and_forget_what_is_gone() {
    let mut model = Model::default();
    let t0 = Instant::now();
    for i in 0..HISTORY + 10 {
        model.on_status(two_apps(i as f64), t0 + Duration::from_secs(i as u64));
    }
    assert!(model.histories.values().all(|h| h.cpu.len() == HISTORY));
    model.on_status(
        status(vec![app("api", vec![worker(0, 6160, 0.0, 1 << 20)])]),
        t0 + Duration::from_secs(100),
    );
    assert_eq!(model.histories.len(), 2, "api and api[0] only");
}

#[test]
fn the_selection_stays_on_its_worker_across_snapshots_and_restarts() {
    let mut model = Model::default();
    let now = Instant::now();
    model.on_status(two_apps(0.0), now);
    // Rows: web, web[0], web[1], api, api[0].
    assert_eq!(model.rows.len(), 5);
    model.on_key(key(KeyCode::Down));
    model.on_key(key(KeyCode::Char('j')));
    assert_eq!(model.selection().unwrap().1.unwrap().pid, Some(5151));
    // A candidate appears in slot 0, before web[1]: the selection follows pid 5151.
    let mut rolling = two_apps(0.0);
    let mut candidate = worker(0, 7000, 0.0, 1);
    candidate.role = WorkerRole::Candidate;
    candidate.generation = 2;
    rolling.apps[0].workers.insert(1, candidate);
    model.on_status(rolling, now);
    assert_eq!(model.selection().unwrap().1.unwrap().pid, Some(5151));
    // Slot 1 restarted: the selection stays on the slot.
    let mut restarted = two_apps(0.0);
    restarted.apps[0].workers[1].pid = Some(5199);
    model.on_status(restarted, now);
    let (selected, worker) = model.selection().unwrap();
    assert_eq!(
        (selected.name.as_str(), worker.unwrap().pid),
        ("web", Some(5199))
    );
    // The app went away: the selection stays in range.
    model.on_key(key(KeyCode::End));
    model.on_status(status(vec![app("web", vec![])]), now);
    assert_eq!(model.selected, 0);
    assert_eq!(model.selected_app().as_deref(), Some("web"));
}

#[test]
fn keys_ask_for_reload_restart_and_scale_of_the_selection() {
    let mut model = Model::default();
    model.on_status(two_apps(0.0), Instant::now());
    let request = |command: Option<Command>| match command {
        Some(Command::Send(request, _)) => request,
        other => panic!("expected a request, got {other:?}"),
    };
    assert_eq!(
        request(model.on_key(key(KeyCode::Char('r')))),
        Request::Reload {
            app: Some("web".into()),
            wait: false
        }
    );
    assert_eq!(
        request(model.on_key(key(KeyCode::Char('x')))),
        Request::Restart {
            app: "web".into(),
            slot: None
        }
    );
    model.on_key(key(KeyCode::Down));
    model.on_key(key(KeyCode::Down));
    assert_eq!(
        request(model.on_key(key(KeyCode::Char('R')))),
        Request::Restart {
            app: "web".into(),
            slot: Some(1)
        }
    );
    // Two presses before the next status count from each other.
    for workers in [3, 4] {
        assert_eq!(
            request(model.on_key(key(KeyCode::Char('+')))),
            Request::Scale {
                app: "web".into(),
                workers
            }
        );
    }
    model.on_key(key(KeyCode::Char('k')));
    model.on_key(key(KeyCode::Char('k')));
    model.on_key(key(KeyCode::Up));
    assert_eq!(model.selected, 0);
    // api keeps its last worker.
    model.on_key(key(KeyCode::Char('G')));
    assert_eq!(model.on_key(key(KeyCode::Char('-'))), None);
    assert!(model.message.as_deref().unwrap().contains("api keeps 1"));
    for quit in [
        key(KeyCode::Char('q')),
        key(KeyCode::Esc),
        KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL),
    ] {
        assert_eq!(model.on_key(quit), Some(Command::Quit));
    }
    // Nothing to act on before the first status.
    let mut empty = Model::default();
    assert_eq!(empty.on_key(key(KeyCode::Char('r'))), None);
    assert_eq!(empty.on_key(key(KeyCode::Char('+'))), None);
    assert_eq!(empty.on_key(key(KeyCode::Down)), None);
}

fn log(app: &str, message: &str) -> LogLine {
    LogLine {
        time: "2026-11-21T10:00:00.123Z".into(),
        app: app.into(),
        slot: Some(1),
        pid: Some(5151),
        generation: Some(1),
        stream: LogStream::Stdout,
        level: None,
        message: message.into(),
        base64: false,
        fields: Default::default(),
    }
}

#[test]
fn log_lines_are_kept_for_the_followed_app_only_and_bounded() {
    let mut model = Model::default();
    model.follow(Some("web".into()));
    model.on_log(log("api", "not followed"));
    for i in 0..LOG_LINES + 5 {
        model.on_log(log("web", &format!("line {i}")));
    }
    assert_eq!(model.logs.len(), LOG_LINES);
    assert_eq!(model.logs.front().unwrap().message, "line 5");
    model.follow(Some("web".into()));
    assert_eq!(model.logs.len(), LOG_LINES, "same app: kept");
    model.follow(Some("api".into()));
    assert!(model.logs.is_empty());
}

#[test]
fn a_snapshot_draws_every_worker_with_its_numbers_and_the_followed_logs() {
    let mut model = Model::default();
    let t0 = Instant::now();
    let mut first = two_apps(1.0);
    first.apps[0].workers[1].restarts = 2;
    first.apps[0].workers[1].last_exit = Some("signal SIGKILL after 3s".into());
    model.on_status(first.clone(), t0);
    let mut second = two_apps(1.5);
    second.apps[0].workers[1].restarts = 2;
    second.apps[0].workers[1].last_exit = Some("signal SIGKILL after 3s".into());
    second.apps[0].reloading = Some(RolloutStatus {
        generation: 2,
        done: 1,
        total: 2,
    });
    second.apps[1].last_reload = Some(AppReload {
        app: "api".into(),
        outcome: ReloadResult::Completed,
        generation: 1,
        reason: None,
    });
    model.on_status(second, t0 + Duration::from_secs(1));
    model.follow(model.selected_app());
    model.on_log(log("web", "GET / 200"));
    let screen = render(&model, 120, 40);
    let text = screen.join("\n");
    assert!(screen[0].starts_with("clusterd monit  pid 4242  up 1m05s  rss 3.0M"));
    let web0 = line_with(&screen, "web[0]");
    for cell in ["5150", "ready", "50.0", "40.0M"] {
        assert!(web0.contains(cell), "{cell:?} missing from {web0:?}");
    }
    let web1 = line_with(&screen, "web[1]");
    for cell in ["5151", "25.0", "20.0M", "exit: signal SIGKILL after 3s"] {
        assert!(web1.contains(cell), "{cell:?} missing from {web1:?}");
    }
    assert!(line_with(&screen, "6160").contains("api[0]"));
    assert!(line_with(&screen, "2/2 ready").contains("reloading to gen 2 (1/2)"));
    assert!(text.contains("last reload: gen 1 completed"));
    // The selected line (web) has its charts and its logs.
    assert!(text.contains("CPU web 75.0%"), "{text}");
    assert!(text.contains("MEM web 60.0M"));
    assert!(line_with(&screen, "GET / 200").contains("10:00:00 web[1] "));
    assert!(text.contains("logs of web"));
    assert!(screen[39].contains("r reload"));
    // The CPU history of web[0] is drawn: a low bar (no rate yet), then half a core.
    assert!(web0.contains("▁▄"), "{web0:?}");
}

#[test]
fn a_supervisor_gone_is_shown_disconnected_with_its_last_snapshot() {
    let mut model = Model::default();
    let screen = render(&model, 80, 20);
    assert!(screen[0].contains("connecting..."));
    model.on_status(two_apps(0.0), Instant::now());
    model.on_disconnected("cannot connect to clusterd (is it running?)".into());
    let screen = render(&model, 120, 40);
    assert!(screen[0].contains("disconnected, retrying: cannot connect"));
    assert!(screen.join("\n").contains("(last seen)"));
    assert!(line_with(&screen, "web[0]").contains("5150"));
    model.on_status(two_apps(0.0), Instant::now());
    assert!(!render(&model, 120, 40)[0].contains("disconnected"));
}

#[test]
fn narrow_and_tiny_terminals_and_escape_sequences_draw_without_harm() {
    let mut model = Model::default();
    let t0 = Instant::now();
    let mut many = two_apps(0.0);
    many.apps[0].workers[0].last_exit = Some("x".repeat(300));
    many.apps[0].workers[0].status_text = Some("é".repeat(100));
    model.on_status(many.clone(), t0);
    model.on_status(many, t0 + Duration::from_secs(1));
    model.follow(Some("web".into()));
    model.on_log(log("web", &"wide ✓ line ".repeat(50)));
    model.on_log(log("web", "\u{1b}[2J\u{1b}]0;title\u{7}\tclear\r"));
    model.on_disconnected("gone".repeat(40));
    for (width, height) in [(40, 10), (20, 5), (80, 3), (3, 40), (1, 1), (0, 0)] {
        let screen = render(&model, width, height);
        assert_eq!(screen.len(), height as usize);
    }
    let screen = render(&model, 120, 40);
    let text = screen.join("\n");
    assert!(
        !text.contains(|c: char| c.is_control() && c != '\n'),
        "{text:?}"
    );
    assert!(text.contains("�[2J�]0;title� clear�"), "{text}");
    let screen = render(&model, 40, 10);
    assert!(screen[0].starts_with("clusterd monit"));
    assert!(screen.join("\n").contains("web"));
}

#[test]
fn redraws_follow_changes_at_most_once_a_frame() {
    let mut redraw = Redraw::default();
    let t0 = Instant::now();
    assert!(!redraw.now(t0), "nothing changed");
    assert_eq!(redraw.wait(t0), None, "nothing to draw: wait for a message");
    redraw.changed();
    assert!(redraw.now(t0));
    // A burst of changes (log lines) right after a redraw waits for the frame's end.
    let soon = t0 + Duration::from_millis(10);
    for _ in 0..100 {
        redraw.changed();
        assert!(!redraw.now(soon));
    }
    assert_eq!(redraw.wait(soon), Some(FRAME - Duration::from_millis(10)));
    assert!(redraw.now(t0 + FRAME));
    assert!(!redraw.now(t0 + FRAME * 2), "drawn: nothing more to draw");
    assert!(
        FRAME >= Duration::from_millis(250),
        "at most 4 redraws a second"
    );
}
