//! clusterd's typed events ([`Notice`]) rendered last: the text a person reads (today's
//! wording, which users grep), and for `log_format = "json"` the fields a log shipper filters
//! on — `event`, `app`, `slot`, `pid`, `generation` where they apply, and the event's own —
//! built from the event itself.

use clusterd_core::event::binds_itself_hint;
use clusterd_core::state::human;
use clusterd_core::{Exit, Level, Notice, What};
use serde_json::{Map, Value, json};

/// The level as `tracing` prints it.
pub fn level_name(level: Level) -> &'static str {
    match level {
        Level::Error => "ERROR",
        Level::Warn => "WARN",
        Level::Info => "INFO",
        Level::Debug => "DEBUG",
    }
}

/// The event's text (without time or level).
pub fn text(notice: &Notice) -> String {
    let app = notice.app.as_deref().unwrap_or_default();
    let label = match notice.slot {
        Some(slot) => format!("{app}[{slot}]"),
        None => app.to_owned(),
    };
    let pid = match notice.pid {
        Some(pid) => format!("pid {pid}"),
        None => "(not started)".to_owned(),
    };
    let generation = notice.generation.unwrap_or_default();
    match &notice.what {
        What::Started { command } => {
            format!("{label} started {pid} (generation {generation}): {command}")
        }
        What::Ready { after } => {
            format!(
                "{label} {pid} (generation {generation}) ready after {}",
                human(*after)
            )
        }
        What::Restarting {
            exit,
            delay,
            streak,
            flapping,
        } => {
            let why = if *streak == 0 {
                " (killed from outside after serving: no crash)".to_owned()
            } else if *flapping {
                format!(" (flapping: {streak} crashes in a row)")
            } else {
                String::new()
            };
            format!(
                "{label} {pid} exited with {} after {}; restarting in {}{why}",
                how(exit),
                human(exit.uptime),
                human(*delay)
            )
        }
        What::Exited { exit, done } => {
            let what = if *done {
                "done"
            } else {
                "not restarting (restart policy)"
            };
            format!(
                "{label} {pid} exited with {} after {}; {what}",
                how(exit),
                human(exit.uptime)
            )
        }
        What::Stopped { exit } => format!(
            "{label} {pid} (generation {generation}) stopped: {} after {}",
            how(exit),
            human(exit.uptime)
        ),
        What::RolloutStarted { workers } => {
            format!("reload of {app}: rolling {workers} workers to generation {generation}")
        }
        What::RolloutDone { workers } => {
            format!("reload of {app} complete: {workers} workers on generation {generation}")
        }
        What::Aborted { reason, kept } => {
            let kept: Vec<String> = kept
                .iter()
                .enumerate()
                .map(|(slot, g)| format!("{slot}:g{g}"))
                .collect();
            format!(
                "reload of {app} aborted: {reason}; old workers keep serving (slot:generation {})",
                kept.join(" ")
            )
        }
        What::Stopping { why, workers } => {
            format!("{why}: stopping {workers} workers (again to kill them at once)")
        }
        What::CandidateExited { exit, after_ready } => {
            let raw = notice.pid.map(|p| p.to_string()).unwrap_or_default();
            let when = if *after_ready {
                "after ready, before it replaced the old worker"
            } else {
                "before ready"
            };
            format!(
                "{label} {raw} (generation {generation}) exited with {} {when}",
                exit.status
            )
        }
        What::Failed { exit, reason } => {
            format!("{label} {pid} exited with {}; {reason}", how(exit))
        }
        What::SpawnFailed {
            message,
            retry_in: Some(delay),
        } => format!("{label}: {message}; retrying in {}", human(*delay)),
        What::SpawnFailed {
            message,
            retry_in: None,
        } => format!("{label}: {message}; the slot stays down until the next reload or restart"),
        What::Leftovers => format!("{label} {pid} left processes in its group; stopping them"),
        What::NotReady { timeout } => format!(
            "{label} {pid} (generation {generation}) not ready within {}; killing it",
            human(*timeout)
        ),
        What::WatchdogMissed { period } => format!(
            "{label} {pid}: no watchdog heartbeat for {}; killing it",
            human(*period)
        ),
        What::WatchdogTriggered => format!("{label} {pid} triggered its watchdog; killing it"),
        What::StopTimeout { timeout } => format!(
            "{label} {pid} still running {} after its stop signal; sending SIGKILL",
            human(*timeout)
        ),
        What::OverMemory { bytes, limit } => format!(
            "{label} {pid}: memory: {} MiB > max_memory {} MiB; restarting it",
            bytes >> 20,
            limit >> 20
        ),
        What::KvTending => format!("{label} tends the KV cluster map"),
        What::KvStale { stale } => format!(
            "{label} {pid} holds the KV tend lock but has not tended for {}; restarting it",
            human(*stale)
        ),
        What::Scaled { from, to } => format!("scaling {app} from {from} to {to} workers"),
        What::ReloadQueued => {
            format!("reload of {app} requested during a rollout; another one will follow it")
        }
        What::WatchReload { path, count: 1 } => format!("{app}: {path} changed; reloading"),
        What::WatchReload { path, count } => {
            format!("{app}: {path} and {} more changed; reloading", count - 1)
        }
        What::Reconfigured { changes } if changes.is_empty() => {
            "manifest re-read: no changes".to_owned()
        }
        What::Reconfigured { changes } => format!("manifest re-read: {}", changes.join(", ")),
        What::Killing { why, workers } => format!("{why} again: killing {workers} workers"),
        What::Reaped { status } => {
            let raw = notice.pid.map(|p| p.to_string()).unwrap_or_default();
            format!("reaped adopted process {raw} ({status})")
        }
        What::BindsItself { address } => format!("{label}: {}", binds_itself_hint(address)),
        What::ScaleRefused { .. } => "scaling by signal needs a manifest with exactly one app; \
                                      use `clusterd scale APP N`"
            .to_owned(),
        What::RerunDone { .. } => {
            format!("{label} {pid} (generation {generation}) exited with status 0: done")
        }
        What::ReloadAfterAbort => {
            "running the reload requested during the aborted rollout".to_owned()
        }
        What::SaysStopping => format!("{label} {pid} says it is stopping"),
        What::PortBound {
            socket,
            address,
            steered,
        } => format!(
            "{label} {pid} binds {address}: socket {socket} bound for {app} on demand{}",
            if *steered {
                " (steered: each worker listens on a socket of its own)"
            } else {
                ""
            }
        ),
        What::PortRefused { address, reason } => {
            format!("{label} {pid} cannot bind {address}: {reason}")
        }
    }
}

/// How a worker ended: `status 1`, `signal SIGKILL (killed: watchdog)`.
fn how(exit: &Exit) -> String {
    match exit.killed {
        Some(killed) => format!("{} (killed: {killed})", exit.status),
        None => exit.status.to_string(),
    }
}

/// The event's own fields, for JSON.
fn fields(what: &What) -> Map<String, Value> {
    let exit_fields = |exit: &Exit| {
        json!({
            "status": exit.status.to_string(),
            "killed": exit.killed,
            "uptime_ms": exit.uptime.as_millis() as u64,
        })
    };
    let value = match what {
        What::Started { command } => json!({ "command": command }),
        What::Ready { after } => json!({ "ready_after_ms": after.as_millis() as u64 }),
        What::Restarting {
            exit,
            delay,
            streak,
            flapping,
        } => {
            let mut value = exit_fields(exit);
            value["delay_ms"] = json!(delay.as_millis() as u64);
            value["crash_streak"] = json!(streak);
            value["flapping"] = json!(flapping);
            value
        }
        What::Exited { exit, done } => {
            let mut value = exit_fields(exit);
            value["done"] = json!(done);
            value
        }
        What::Stopped { exit } => exit_fields(exit),
        What::RolloutStarted { workers } | What::RolloutDone { workers } => {
            json!({ "workers": workers })
        }
        What::Aborted { reason, kept } => json!({ "reason": reason, "kept_generations": kept }),
        What::Stopping { why, workers } | What::Killing { why, workers } => {
            json!({ "why": why, "workers": workers })
        }
        What::CandidateExited { exit, after_ready } => {
            let mut value = exit_fields(exit);
            value["after_ready"] = json!(after_ready);
            value
        }
        What::Failed { exit, reason } => {
            let mut value = exit_fields(exit);
            value["reason"] = json!(reason);
            value
        }
        What::SpawnFailed { message, retry_in } => json!({
            "reason": message,
            "retry_in_ms": retry_in.map(|d| d.as_millis() as u64),
        }),
        What::Leftovers
        | What::WatchdogTriggered
        | What::KvTending
        | What::ReloadQueued
        | What::ReloadAfterAbort
        | What::SaysStopping => json!({}),
        What::Reaped { status } => json!({ "status": status.to_string() }),
        What::BindsItself { address } => json!({ "address": address }),
        What::ScaleRefused { apps } => json!({ "apps": apps }),
        What::RerunDone { uptime } => json!({ "uptime_ms": uptime.as_millis() as u64 }),
        What::NotReady { timeout } | What::StopTimeout { timeout } => {
            json!({ "timeout_ms": timeout.as_millis() as u64 })
        }
        What::WatchdogMissed { period } => json!({ "period_ms": period.as_millis() as u64 }),
        What::OverMemory { bytes, limit } => json!({ "bytes": bytes, "limit_bytes": limit }),
        What::KvStale { stale } => json!({ "stale_ms": stale.as_millis() as u64 }),
        What::Scaled { from, to } => json!({ "from": from, "to": to }),
        What::Reconfigured { changes } => json!({ "changes": changes }),
        What::WatchReload { path, count } => json!({ "path": path, "count": count }),
        What::PortBound {
            socket,
            address,
            steered,
        } => json!({ "socket": socket, "address": address, "steered": steered }),
        What::PortRefused { address, reason } => json!({ "address": address, "reason": reason }),
    };
    match value {
        Value::Object(mut map) => {
            map.retain(|_, v| !v.is_null());
            map
        }
        _ => Map::new(),
    }
}

/// The event's fields, kept with its line ([`super::Record::fields`]): `event`, the worker's
/// `app`, `slot`, `pid` and `generation` where they apply, and the event's own.
pub fn all_fields(notice: &Notice) -> Map<String, Value> {
    let mut line = Map::new();
    line.insert("event".into(), json!(notice.what.name()));
    if let Some(app) = &notice.app {
        line.insert("app".into(), json!(app));
    }
    let ids = [
        ("slot", notice.slot.map(|s| json!(s))),
        ("pid", notice.pid.map(|p| json!(p.as_raw()))),
        ("generation", notice.generation.map(|g| json!(g))),
    ];
    for (key, value) in ids {
        if let Some(value) = value {
            line.insert(key.into(), value);
        }
    }
    for (key, value) in fields(&notice.what) {
        line.entry(key).or_insert(value);
    }
    line
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use clusterd_core::{ExitStatus, Pid};
    use clusterd_proto::LogStream;

    use super::*;
    use crate::daemon::logs::Source;
    use crate::daemon::logs::format::json;
    use crate::daemon::logs::ring::Record;

    fn notice(what: What) -> Notice {
        Notice {
            level: Level::Warn,
            app: Some("web".into()),
            slot: Some(1),
            pid: Some(Pid::from_raw(4242)),
            generation: Some(3),
            what,
        }
    }

    #[test]
    fn the_text_keeps_the_wording_users_grep() {
        let crash = notice(What::Restarting {
            exit: Exit {
                status: ExitStatus::Code(1),
                killed: None,
                uptime: Duration::from_millis(1500),
            },
            delay: Duration::from_millis(200),
            streak: 1,
            flapping: false,
        });
        assert_eq!(
            text(&crash),
            "web[1] pid 4242 exited with status 1 after 1.5s; restarting in 200ms"
        );
        let started = notice(What::Started {
            command: "node app.js".into(),
        });
        assert_eq!(
            text(&started),
            "web[1] started pid 4242 (generation 3): node app.js"
        );
    }

    #[test]
    fn json_carries_the_event_its_worker_and_its_own_fields() {
        let crash = notice(What::Restarting {
            exit: Exit {
                status: ExitStatus::Code(1),
                killed: Some("watchdog"),
                uptime: Duration::from_millis(1500),
            },
            delay: Duration::from_millis(200),
            streak: 2,
            flapping: false,
        });
        let message = format!("WARN {}", text(&crash));
        let record = Record {
            seq: 1,
            time: UNIX_EPOCH + Duration::from_millis(1_795_000_000_123),
            source: Source::events(),
            stream: LogStream::Log,
            message: message.as_bytes().into(),
            fields: Some(Box::new(all_fields(&crash))),
        };
        let line = json(&record);
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(value["event"], "restarting");
        assert_eq!(value["app"], "web");
        assert_eq!(value["slot"], 1);
        assert_eq!(value["pid"], 4242);
        assert_eq!(value["generation"], 3);
        assert_eq!(value["level"], "WARN");
        assert_eq!(value["stream"], "log");
        assert_eq!(value["status"], "status 1");
        assert_eq!(value["killed"], "watchdog");
        assert_eq!(value["delay_ms"], 200);
        assert_eq!(value["crash_streak"], 2);
        assert!(
            value["message"]
                .as_str()
                .unwrap()
                .starts_with("web[1] pid 4242 exited")
        );
        assert_eq!(line.last(), Some(&b'\n'));
    }

    /// Renders `notice` both ways: its text, and its JSON line as a value.
    fn both(notice: &Notice) -> (String, serde_json::Value) {
        let record = Record {
            seq: 1,
            time: UNIX_EPOCH,
            source: Source::events(),
            stream: LogStream::Log,
            message: text(notice).into_bytes().into(),
            fields: Some(Box::new(all_fields(notice))),
        };
        let value = serde_json::from_slice(&json(&record)).expect("JSON");
        (text(notice), value)
    }

    #[test]
    fn the_events_that_were_free_text_keep_their_wording_and_carry_fields() {
        let bare = |level, pid: Option<i32>, what| Notice {
            level,
            app: None,
            slot: None,
            pid: pid.map(Pid::from_raw),
            generation: None,
            what,
        };
        let reaped = bare(
            Level::Debug,
            Some(77),
            What::Reaped {
                status: ExitStatus::Code(3),
            },
        );
        let (line, value) = both(&reaped);
        assert_eq!(line, "reaped adopted process 77 (status 3)");
        assert_eq!(value["event"], "reaped");
        assert_eq!(
            (value["pid"].clone(), value["status"].clone()),
            (json!(77), json!("status 3"))
        );
        assert_eq!(value["app"], "clusterd", "no worker app: the line's own");

        let (line, value) = both(&notice(What::BindsItself {
            address: "127.0.0.1:8001".into(),
        }));
        assert_eq!(
            line,
            "web[1]: exited at once, before it was ready: if the app binds 127.0.0.1:8001 \
             itself (EADDRINUSE: clusterd holds it), set intercept = true or take fd 3"
        );
        assert_eq!(value["event"], "binds_itself");
        assert_eq!(value["address"], "127.0.0.1:8001");
        assert_eq!(
            (value["app"].clone(), value["slot"].clone()),
            (json!("web"), json!(1))
        );

        let (line, value) = both(&bare(Level::Warn, None, What::ScaleRefused { apps: 2 }));
        assert_eq!(
            line,
            "scaling by signal needs a manifest with exactly one app; use `clusterd scale APP N`"
        );
        assert_eq!(
            (value["event"].clone(), value["apps"].clone()),
            (json!("scale_refused"), json!(2))
        );

        let (line, value) = both(&notice(What::RerunDone {
            uptime: Duration::from_millis(1500),
        }));
        assert_eq!(
            line,
            "web[1] pid 4242 (generation 3) exited with status 0: done"
        );
        assert_eq!(value["event"], "rerun_done");
        assert_eq!(value["uptime_ms"], 1500);
        assert_eq!(
            (value["pid"].clone(), value["generation"].clone()),
            (json!(4242), json!(3))
        );

        let mut again = notice(What::ReloadAfterAbort);
        (again.slot, again.pid, again.generation) = (None, None, None);
        let (line, value) = both(&again);
        assert_eq!(
            line,
            "running the reload requested during the aborted rollout"
        );
        assert_eq!(
            (value["event"].clone(), value["app"].clone()),
            (json!("reload_after_abort"), json!("web"))
        );

        let (line, value) = both(&notice(What::SaysStopping));
        assert_eq!(line, "web[1] pid 4242 says it is stopping");
        assert_eq!(value["event"], "says_stopping");
        assert_eq!(value["pid"], 4242);
    }
}
