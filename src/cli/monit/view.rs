//! The dashboard's drawing: a [`Model`] in, a frame of cells out (tested on ratatui's
//! `TestBackend`). Any size draws, down to nothing: ratatui's layouts and widgets clip.

use clusterd_proto::{AppStatus, LogStream, ReloadResult, WorkerRole, WorkerState, WorkerStatus};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Sparkline, Table, TableState};

use super::model::{History, Key, Model};
use crate::cli::render::{bytes, duration};

/// Bars of the inline histories, lowest to highest.
const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// Samples in the table's inline histories.
const INLINE: usize = 12;

/// Draws the whole dashboard.
pub fn draw(frame: &mut Frame, model: &Model) {
    let area = frame.area();
    let rows = u16::try_from(model.rows.len()).unwrap_or(u16::MAX);
    // The table takes what its lines need, up to 3/5 of what the charts and the two text
    // lines leave; the logs take the rest.
    let table_height = rows
        .saturating_add(3)
        .min((area.height.saturating_sub(7) * 3 / 5).max(3));
    let [header, table, charts, logs, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(table_height),
        Constraint::Length(5),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(area);
    draw_header(frame, model, header);
    draw_table(frame, model, table);
    draw_charts(frame, model, charts);
    draw_logs(frame, model, logs);
    let help = "↑↓/jk select  r reload  R/x restart  +/- scale  q quit";
    let footer_text = match &model.message {
        Some(message) => Line::from(vec![
            Span::styled(message.clone(), Style::new().add_modifier(Modifier::BOLD)),
            Span::raw("   "),
            Span::styled(help, Style::new().fg(Color::DarkGray)),
        ]),
        None => Line::styled(help, Style::new().fg(Color::DarkGray)),
    };
    frame.render_widget(Paragraph::new(footer_text), footer);
}

fn draw_header(frame: &mut Frame, model: &Model, area: Rect) {
    let mut spans = vec![Span::styled(
        "clusterd monit",
        Style::new().add_modifier(Modifier::BOLD),
    )];
    if let Some(status) = &model.status {
        spans.push(Span::raw(format!(
            "  pid {}  up {}  rss {}  {}",
            status.pid,
            duration(status.uptime_ms),
            bytes(status.rss_bytes),
            status.manifest
        )));
        if status.stopping {
            spans.push(Span::styled("  STOPPING", Style::new().fg(Color::Yellow)));
        }
    }
    if let Some(reason) = &model.disconnected {
        spans.push(Span::styled(
            format!("  disconnected, retrying: {reason}"),
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        ));
    } else if model.status.is_none() {
        spans.push(Span::raw("  connecting..."));
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}

fn draw_table(frame: &mut Frame, model: &Model, area: Rect) {
    let Some(status) = &model.status else {
        return;
    };
    let header = Row::new([
        "NAME", "PID", "STATE", "GEN", "CPU%", "CPU", "MEM", "MEM", "RST", "INFO",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD));
    let rows = model.rows.iter().map(|row| {
        let app = &status.apps[row.app];
        match row.worker {
            None => app_row(model, app),
            Some(w) => worker_row(model, app, &app.workers[w]),
        }
    });
    let widths = [
        Constraint::Length(14),
        Constraint::Length(7),
        Constraint::Length(9),
        Constraint::Length(4),
        Constraint::Length(6),
        Constraint::Length(INLINE as u16),
        Constraint::Length(8),
        Constraint::Length(INLINE as u16),
        Constraint::Length(4),
        Constraint::Min(10),
    ];
    let stale = if model.disconnected.is_some() {
        " (last seen)"
    } else {
        ""
    };
    let table = Table::new(rows, widths)
        .header(header)
        .block(
            Block::new()
                .borders(Borders::ALL)
                .title(format!("apps and workers{stale}")),
        )
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    let mut state = TableState::new().with_selected(Some(model.selected));
    frame.render_stateful_widget(table, area, &mut state);
}

fn app_row<'a>(model: &Model, app: &'a AppStatus) -> Row<'a> {
    let history = model.histories.get(&Key {
        app: app.name.clone(),
        slot: None,
    });
    let generation = app
        .workers
        .iter()
        .filter(|w| w.role == WorkerRole::Serving)
        .map(|w| w.generation)
        .max();
    let info = match (&app.reloading, &app.last_reload) {
        (Some(r), _) => format!("reloading to gen {} ({}/{})", r.generation, r.done, r.total),
        (None, Some(last)) => match last.outcome {
            ReloadResult::Completed => format!("last reload: gen {} completed", last.generation),
            ReloadResult::Aborted => format!(
                "last reload: gen {} ABORTED: {}",
                last.generation,
                printable(last.reason.as_deref().unwrap_or(""))
            ),
        },
        (None, None) => String::new(),
    };
    let restarts: u32 = app.workers.iter().map(|w| w.restarts).sum();
    let ready = app.desired.saturating_sub(app.done);
    let style = if app.ready >= ready {
        Style::new().fg(Color::Green)
    } else {
        Style::new().fg(Color::Yellow)
    };
    Row::new([
        Cell::new(app.name.clone()).style(Style::new().add_modifier(Modifier::BOLD)),
        Cell::new(""),
        Cell::new(format!("{}/{} ready", app.ready, ready)).style(style),
        Cell::new(generation.map(|g| g.to_string()).unwrap_or_default()),
        Cell::new(
            history
                .and_then(|h| h.cpu.back())
                .map_or(String::new(), |c| tenths(*c)),
        ),
        Cell::new(history.map_or(String::new(), |h| inline(&h.cpu, 1000))),
        Cell::new(
            history
                .and_then(|h| h.mem.back())
                .map_or(String::new(), |kib| bytes(kib * 1024)),
        ),
        Cell::new(history.map_or(String::new(), |h| inline(&h.mem, 0))),
        Cell::new(restarts.to_string()),
        Cell::new(info),
    ])
}

fn worker_row<'a>(model: &Model, app: &AppStatus, worker: &'a WorkerStatus) -> Row<'a> {
    let history = (worker.role == WorkerRole::Serving)
        .then(|| {
            model.histories.get(&Key {
                app: app.name.clone(),
                slot: Some(worker.slot),
            })
        })
        .flatten();
    let role = match worker.role {
        WorkerRole::Serving => "",
        WorkerRole::Candidate => " new",
        WorkerRole::Retiring => " old",
    };
    let info = worker
        .status_text
        .as_deref()
        .map(printable)
        .or_else(|| {
            worker
                .last_exit
                .as_deref()
                .map(|e| format!("exit: {}", printable(e)))
        })
        .unwrap_or_default();
    Row::new([
        Cell::new(format!(" {}[{}]{role}", app.name, worker.slot)),
        Cell::new(worker.pid.map(|p| p.to_string()).unwrap_or_default()),
        Cell::new(state_name(worker.state)).style(state_style(worker.state)),
        Cell::new(worker.generation.to_string()),
        Cell::new(
            model
                .cpu_of(worker)
                .map_or(String::new(), |c| format!("{c:.1}")),
        ),
        Cell::new(history.map_or(String::new(), |h| inline(&h.cpu, 1000))),
        Cell::new(worker.rss_bytes.map(bytes).unwrap_or_default()),
        Cell::new(history.map_or(String::new(), |h| inline(&h.mem, 0))),
        Cell::new(worker.restarts.to_string()),
        Cell::new(info),
    ])
}

fn draw_charts(frame: &mut Frame, model: &Model, area: Rect) {
    let Some((app, worker)) = model.selection() else {
        return;
    };
    let key = Key {
        app: app.name.clone(),
        slot: worker.map(|w| w.slot),
    };
    let name = match worker {
        Some(w) => format!("{}[{}]", app.name, w.slot),
        None => app.name.clone(),
    };
    let empty = History::default();
    let history = model.histories.get(&key).unwrap_or(&empty);
    let [cpu_area, mem_area] =
        Layout::horizontal([Constraint::Ratio(1, 2), Constraint::Ratio(1, 2)]).areas(area);
    for (area, samples, title, max) in [
        (
            cpu_area,
            &history.cpu,
            format!(
                "CPU {name} {}%",
                history.cpu.back().map_or("-".into(), |c| tenths(*c))
            ),
            // A full chart is one core (more when the app uses more).
            history.cpu.iter().copied().max().unwrap_or(0).max(1000),
        ),
        (
            mem_area,
            &history.mem,
            format!(
                "MEM {name} {}",
                history
                    .mem
                    .back()
                    .map_or("-".into(), |kib| bytes(kib * 1024))
            ),
            history.mem.iter().copied().max().unwrap_or(0).max(1),
        ),
    ] {
        // The newest samples that fit, right-aligned to the chart's edge.
        let width = area.width.saturating_sub(2) as usize;
        let skip = samples.len().saturating_sub(width);
        let data: Vec<u64> = samples.iter().skip(skip).copied().collect();
        frame.render_widget(
            Sparkline::default()
                .block(Block::new().borders(Borders::ALL).title(title))
                .data(&data)
                .max(max)
                .style(Style::new().fg(Color::Cyan)),
            area,
        );
    }
}

fn draw_logs(frame: &mut Frame, model: &Model, area: Rect) {
    let title = match &model.log_app {
        Some(app) => format!("logs of {app}"),
        None => "logs".to_owned(),
    };
    let height = area.height.saturating_sub(2) as usize;
    let skip = model.logs.len().saturating_sub(height);
    let lines: Vec<Line> = model
        .logs
        .iter()
        .skip(skip)
        .map(|line| {
            // `2026-11-21T10:00:00.123Z` → `10:00:00`.
            let time = line.time.get(11..19).unwrap_or(&line.time);
            let who = match line.slot {
                Some(slot) => format!("{}[{slot}]", line.app),
                None => line.app.clone(),
            };
            let text = if line.base64 {
                format!("({} bytes, not UTF-8)", line.message.len() * 3 / 4)
            } else {
                printable(&line.message)
            };
            let style = match line.stream {
                LogStream::Stdout => Style::new(),
                LogStream::Stderr => Style::new().fg(Color::Red),
                LogStream::Log => Style::new().fg(Color::DarkGray),
            };
            Line::from(vec![
                Span::styled(format!("{time} {who} "), Style::new().fg(Color::DarkGray)),
                Span::styled(text, style),
            ])
        })
        .collect();
    frame.render_widget(
        Paragraph::new(lines).block(Block::new().borders(Borders::ALL).title(title)),
        area,
    );
}

fn state_name(state: WorkerState) -> &'static str {
    match state {
        WorkerState::Starting => "starting",
        WorkerState::Ready => "ready",
        WorkerState::Stopping => "stopping",
        WorkerState::Backoff => "backoff",
        WorkerState::Failed => "failed",
        WorkerState::Exited => "exited",
    }
}

fn state_style(state: WorkerState) -> Style {
    match state {
        WorkerState::Ready => Style::new().fg(Color::Green),
        WorkerState::Starting | WorkerState::Stopping | WorkerState::Backoff => {
            Style::new().fg(Color::Yellow)
        }
        WorkerState::Failed => Style::new().fg(Color::Red),
        WorkerState::Exited => Style::new().fg(Color::DarkGray),
    }
}

/// Text from workers as it may be drawn: a tab as a space, other control characters (an
/// escape sequence would reach the terminal as it is) as `�`.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\t' => ' ',
            c if c.is_control() => '\u{FFFD}',
            c => c,
        })
        .collect()
}

/// Tenths as a decimal: `123` → `12.3`.
fn tenths(value: u64) -> String {
    format!("{}.{}", value / 10, value % 10)
}

/// The last [`INLINE`] samples as bars, scaled to at least `floor` (or to their maximum).
fn inline(samples: &std::collections::VecDeque<u64>, floor: u64) -> String {
    let skip = samples.len().saturating_sub(INLINE);
    let max = samples
        .iter()
        .skip(skip)
        .copied()
        .max()
        .unwrap_or(0)
        .max(floor)
        .max(1);
    samples
        .iter()
        .skip(skip)
        .map(|v| BARS[((v * (BARS.len() as u64 - 1)) / max) as usize])
        .collect()
}
