//! The status table: fits 80 columns, readable without colour.

use std::fmt::Write;

use clusterd_proto::{ReloadResult, Status, WorkerRole, WorkerState, WorkerStatus};

/// A tend owner not heard from for this long is shown as silent (owners tend every second by
/// default; the KV client's followers start tending themselves after a few missed rounds).
const STALE_TEND_MS: u64 = 5_000;

/// Renders a status snapshot as text.
pub fn status_table(status: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "clusterd {}pid {}  up {}  rss {}{}",
        if status.version.is_empty() {
            String::new()
        } else {
            format!("{}  ", status.version)
        },
        status.pid,
        duration(status.uptime_ms),
        bytes(status.rss_bytes),
        if status.stopping { "  STOPPING" } else { "" }
    );
    if let Some(ms) = status.upgraded_ms {
        let _ = writeln!(
            out,
            "upgraded in place {} ago ({} upgrades)",
            duration(ms),
            status.upgrades
        );
    }
    if !status.containment.is_empty() {
        let _ = writeln!(out, "contained by {}", truncate(&status.containment, 67));
    }
    if status.output_dropped > 0 {
        let _ = writeln!(
            out,
            "{} output lines dropped (stdout/stderr not read)",
            status.output_dropped
        );
    }
    if let Some(metrics) = &status.metrics {
        let _ = writeln!(out, "metrics on http://{metrics}/metrics");
    }
    for socket in &status.sockets {
        let notes: Vec<String> = [
            socket.inherited.then(|| "inherited".to_owned()),
            socket.balance.clone(),
            socket
                .app
                .as_ref()
                .map(|app| format!("bound on demand for {app}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        let _ = if notes.is_empty() {
            writeln!(out, "socket {} {}", socket.name, socket.address)
        } else {
            let notes = notes.join(", ");
            writeln!(out, "socket {} {} ({notes})", socket.name, socket.address)
        };
    }
    for app in &status.apps {
        let _ = write!(
            out,
            "\n{}: {}/{} ready",
            app.name,
            app.ready,
            app.desired.saturating_sub(app.done)
        );
        if app.done > 0 {
            let _ = write!(out, ", {} done", app.done);
        }
        if app.running != app.ready {
            let _ = write!(out, ", {} running", app.running);
        }
        if let Some(r) = &app.reloading {
            let _ = write!(
                out,
                ", reloading to generation {} ({}/{})",
                r.generation, r.done, r.total
            );
        }
        if let Some(pid) = app.tend_owner {
            let _ = write!(out, ", KV tend owner pid {pid}");
            if let Some(ms) = app.tend_heard_ms.filter(|ms| *ms >= STALE_TEND_MS) {
                let _ = write!(out, " (silent {})", duration(ms));
            }
        }
        let _ = writeln!(out);
        if let Some(last) = &app.last_reload {
            match last.outcome {
                ReloadResult::Completed => {
                    let _ = writeln!(
                        out,
                        "last reload: completed, generation {}",
                        last.generation
                    );
                }
                ReloadResult::Aborted => {
                    let reason = last.reason.as_deref().unwrap_or("");
                    const PREFIX: &str = "last reload: ABORTED: ";
                    let _ = writeln!(out, "{PREFIX}{}", truncate(reason, 80 - PREFIX.len()));
                }
            }
        }
        let _ = writeln!(
            out,
            "{:<4} {:>7} {:<9} {:>3} {:>7} {:>4} {:>5} {:>8}  INFO",
            "SLOT", "PID", "STATE", "GEN", "UPTIME", "RST", "CPU%", "MEM"
        );
        for worker in &app.workers {
            let _ = writeln!(out, "{}", worker_row(worker));
        }
    }
    out
}

fn worker_row(w: &WorkerStatus) -> String {
    let state = match (w.state, w.role) {
        (WorkerState::Starting, WorkerRole::Candidate) => "new",
        (WorkerState::Ready, WorkerRole::Candidate) => "new-ready",
        (WorkerState::Starting, _) => "starting",
        (WorkerState::Ready, _) => "ready",
        (WorkerState::Stopping, _) => "stopping",
        (WorkerState::Backoff, _) => "backoff",
        (WorkerState::Failed, _) => "FAILED",
        (WorkerState::Exited, _) if w.done && w.exit_code == Some(0) => "done",
        (WorkerState::Exited, _) => "exited",
    };
    let mut info = Vec::new();
    if w.tend_owner {
        info.push("tend".to_owned());
    }
    if w.crash_streak >= 3 && w.role == WorkerRole::Serving {
        info.push("flapping".to_owned());
    }
    if let Some(text) = &w.status_text {
        info.push(text.clone());
    } else if let Some(exit) = &w.last_exit
        && (w.pid.is_none() || w.restarts > 0)
    {
        info.push(format!("last: {exit}"));
    } else if let Some(why) = &w.restart_reason {
        info.push(format!("restarted: {why}"));
    }
    let row = format!(
        "{:<4} {:>7} {:<9} {:>3} {:>7} {:>4} {:>5} {:>8}  ",
        w.slot,
        w.pid.map_or("-".into(), |p| p.to_string()),
        state,
        w.generation,
        w.uptime_ms.map_or("-".into(), duration),
        w.restarts,
        w.cpu_percent.map_or("-".into(), |c| format!("{c:.1}")),
        w.rss_bytes.map_or("-".into(), bytes),
    );
    let room = 80usize.saturating_sub(row.len() + 1);
    format!("{row}{}", truncate(&info.join(", "), room))
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// `850ms`, `42s`, `3m12s`, `5h03m`, `2d04h`.
pub(crate) fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0 => format!("{ms}ms"),
        1..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// `512K`, `4.1M`, `1.2G`.
pub(crate) fn bytes(b: u64) -> String {
    const K: f64 = 1024.0;
    let b = b as f64;
    if b < K * K {
        format!("{:.0}K", b / K)
    } else if b < K * K * K {
        format!("{:.1}M", b / K / K)
    } else {
        format!("{:.1}G", b / K / K / K)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clusterd_proto::{AppStatus, SocketStatus};

    #[test]
    fn every_line_fits_80_columns() {
        let worker = WorkerStatus {
            slot: 12,
            pid: Some(4_194_303),
            state: WorkerState::Ready,
            role: WorkerRole::Serving,
            generation: 123,
            uptime_ms: Some(90_000_000),
            ready_ms: Some(20),
            restarts: 9999,
            crash_streak: 4,
            last_exit: Some("signal SIGKILL after 12.5s".into()),
            done: false,
            exit_code: None,
            cpu_percent: Some(199.9),
            cpu_seconds: Some(1.0),
            rss_bytes: Some(3 * 1024 * 1024 * 1024),
            status_text: Some(
                "serving a great many requests from a great many clients today".into(),
            ),
            restart_reason: Some("memory: 310 MiB > max_memory 300 MiB".into()),
            tend_owner: true,
            messages_received: 7,
            messages_dropped: 0,
            last_messages: vec!["\"ready\"".into()],
        };
        let status = Status {
            pid: 1,
            manifest: "m.toml".into(),
            uptime_ms: 1000,
            rss_bytes: 4_000_000,
            stopping: false,
            metrics: Some("127.0.0.1:9100".into()),
            sockets: vec![SocketStatus {
                name: "http".into(),
                address: "127.0.0.1:8000".into(),
                app: None,
                balance: Some("round-robin".into()),
                inherited: false,
            }],
            apps: vec![AppStatus {
                name: "web".into(),
                desired: 1,
                running: 1,
                ready: 1,
                done: 0,
                reloading: None,
                last_reload: Some(clusterd_proto::AppReload {
                    app: "web".into(),
                    outcome: ReloadResult::Aborted,
                    generation: 5,
                    reason: Some(
                        "slot 2 generation 5 exited with status 1 before ready, and more words"
                            .into(),
                    ),
                }),
                tend_owner: Some(4_194_303),
                tend_heard_ms: Some(1_200),
                workers: vec![worker],
            }],
            containment: "process groups (test)".into(),
            output_dropped: 0,
            ready: false,
            not_ready: None,
            version: "10.20.30".into(),
            upgrades: 3,
            upgraded_ms: Some(999_000_000),
        };
        let table = status_table(&status);
        for line in table.lines() {
            assert!(
                line.chars().count() <= 80,
                "{} columns: {line}",
                line.chars().count()
            );
        }
        assert!(table.contains("  tend, flapping, servin…"), "{table}");
        assert!(table.contains("ABORTED: slot 2 generation 5"));

        // A finished one-shot: "done", and not wanted by readiness.
        let mut app = status.apps[0].clone();
        app.name = "migrate".into();
        app.done = 1;
        app.ready = 0;
        app.running = 0;
        app.last_reload = None;
        app.tend_owner = None;
        let worker = &mut app.workers[0];
        (worker.pid, worker.state, worker.done, worker.exit_code) =
            (None, WorkerState::Exited, true, Some(0));
        (worker.status_text, worker.tend_owner, worker.crash_streak) = (None, false, 0);
        (worker.uptime_ms, worker.cpu_percent, worker.rss_bytes) = (None, None, None);
        worker.restarts = 0;
        worker.last_exit = Some("status 0 after 12ms".into());
        let table = status_table(&Status {
            apps: vec![app],
            ..status
        });
        assert!(table.contains("migrate: 0/0 ready, 1 done"), "{table}");
        assert!(table.contains(" done "), "{table}");
        assert!(table.contains("last: status 0"), "{table}");
    }

    #[test]
    fn durations_and_sizes_read_well() {
        assert_eq!(duration(850), "850ms");
        assert_eq!(duration(192_000), "3m12s");
        assert_eq!(duration(2 * 86_400_000 + 4 * 3_600_000), "2d04h");
        assert_eq!(bytes(4_300_000), "4.1M");
    }
}
