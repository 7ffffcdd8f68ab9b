//! clusterd under a manager and an orchestrator: sd_notify to its own `NOTIFY_SOCKET`
//! (READY, RELOADING, STATUS, STOPPING, WATCHDOG), socket activation with fds systemd named
//! after the unit, `/healthz`, `/readyz` and `clusterd status --check`.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::util::{Clusterd, env_var, http_get, wait_until};

const SECOND: Duration = Duration::from_secs(1);

/// A datagram receiver standing in for systemd's notify socket.
struct Manager {
    path: PathBuf,
    messages: Arc<Mutex<Vec<(Instant, String)>>>,
    _dir: tempfile::TempDir,
}

impl Manager {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind notify receiver");
        let messages = Arc::new(Mutex::new(Vec::new()));
        let sink = messages.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.lock().expect("messages").push((Instant::now(), text));
            }
        });
        Manager {
            path,
            messages,
            _dir: dir,
        }
    }

    fn all(&self) -> Vec<(Instant, String)> {
        self.messages.lock().expect("messages").clone()
    }

    /// Waits for a message for which `matches` holds; returns it.
    fn wait(&self, what: &str, matches: impl Fn(&str) -> bool) -> (Instant, String) {
        let mut found = None;
        let ok = wait_until(20 * SECOND, || {
            found = self.all().into_iter().find(|(_, m)| matches(m));
            found.is_some()
        });
        assert!(ok, "no {what} message; got {:?}", self.texts());
        found.expect("found")
    }

    fn texts(&self) -> Vec<String> {
        self.all().into_iter().map(|(_, m)| m).collect()
    }
}

/// An app whose workers say READY=1 only once the file `{dir}/open` exists; from generation
/// 2 on, slot 0 exits with an error and the others ignore SIGTERM and never get ready (so a
/// rollout with surge 2 aborts and its other new worker takes `stop_timeout` to stop).
const GATED: &str = r#"#!/bin/sh
if [ "$CLUSTERD_GENERATION" -ge 2 ]; then
  if [ "$CLUSTERD_WORKER_ID" = 0 ]; then sleep 0.3; exit 1; fi
  trap '' TERM
  while :; do sleep 0.1; done
fi
while [ ! -e "{dir}/open" ]; do sleep 0.05; done
"$CLUSTERD_EXE" notify READY=1
exec sleep 1000
"#;

fn gated_manifest(extra: &str) -> String {
    format!(
        r#"
[supervisor]
stop_timeout = "3s"

[sockets.http]
listen = "127.0.0.1:1"

[apps.web]
command = ["{{hello}}"]
workers = 2
sockets = ["http"]
ready = "notify"

[apps.gate]
command = ["{{dir}}/gate.sh"]
workers = 2
ready = "notify"
[apps.gate.reload]
surge = 2
bake = "0s"
{extra}
"#
    )
}

/// Starts clusterd as systemd would: the listening socket at fd 3 named `name`,
/// `LISTEN_PID` = clusterd, and `NOTIFY_SOCKET`/`WATCHDOG_USEC` from the "manager".
fn start_activated(
    manifest: &str,
    name: &str,
    listener: &std::net::TcpListener,
    manager: &Manager,
    watchdog_usec: u64,
) -> Clusterd {
    let fd = listener.as_raw_fd();
    let (name, notify) = (name.to_owned(), manager.path.clone());
    let files = [("gate.sh", GATED)];
    // SAFETY: the closure runs in the child between fork and exec and makes only async-signal-safe
    // calls (dup2, fcntl) on a descriptor number copied in before the fork.
    Clusterd::start_activated_with_files(manifest, &files, move |command| unsafe {
        command
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", name)
            .env("NOTIFY_SOCKET", notify)
            .env("WATCHDOG_USEC", watchdog_usec.to_string());
        command.pre_exec(move || {
            let placed = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if placed < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    })
}

#[test]
fn the_manager_hears_ready_after_the_workers_then_status_reloading_watchdog_and_stopping() {
    let manager = Manager::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut clusterd = start_activated(&gated_manifest(""), "http", &listener, &manager, 600_000);
    clusterd.socket_addr("http");

    // The hello workers get ready; the gated ones cannot: no READY=1 yet.
    manager.wait("STATUS with web ready", |m| m.contains("web 2/2 ready"));
    assert!(
        !manager.texts().iter().any(|m| m == "READY=1"),
        "READY=1 before every worker was ready: {:?}",
        manager.texts()
    );
    std::fs::write(clusterd.dir.path().join("open"), "").expect("open the gate");
    let (ready_at, _) = manager.wait("READY=1", |m| m == "READY=1");
    let status = clusterd.status();
    assert!(
        status["apps"]
            .as_array()
            .expect("apps")
            .iter()
            .all(|a| a["ready"] == a["desired"]),
        "{status}"
    );
    manager.wait("STATUS all ready", |m| {
        m == "STATUS=gate 2/2 ready, web 2/2 ready"
    });

    // Workers talk to clusterd's own notify socket, never to its manager's.
    let worker = clusterd.first_pid("web[0]");
    let theirs = env_var(worker, "NOTIFY_SOCKET").expect("worker NOTIFY_SOCKET");
    assert_ne!(PathBuf::from(&theirs), manager.path);
    assert!(theirs.ends_with("notify.sock"), "{theirs}");
    assert_eq!(env_var(worker, "WATCHDOG_USEC"), None);

    // WATCHDOG=1 from the loop every half WATCHDOG_USEC (300 ms).
    let since = Instant::now();
    assert!(wait_until(10 * SECOND, || {
        manager
            .all()
            .iter()
            .filter(|(t, m)| *t > since && m == "WATCHDOG=1")
            .count()
            >= 5
    }));
    let beats: Vec<Instant> = manager
        .all()
        .into_iter()
        .filter(|(t, m)| *t > since && m == "WATCHDOG=1")
        .map(|(t, _)| t)
        .collect();
    let mean = (beats[beats.len() - 1] - beats[0]) / (beats.len() as u32 - 1);
    assert!(
        mean >= Duration::from_millis(250) && mean <= Duration::from_millis(450),
        "watchdog every {mean:?}, expected about 300ms"
    );

    // SIGHUP (Type=notify-reload): RELOADING=1 with MONOTONIC_USEC, then READY=1 again.
    clusterd.signal(Signal::SIGHUP);
    let (reloading_at, reloading) = manager.wait("RELOADING=1", |m| m.starts_with("RELOADING=1"));
    assert!(reloading.contains("\nMONOTONIC_USEC="), "{reloading:?}");
    assert!(reloading_at > ready_at);
    assert!(wait_until(10 * SECOND, || {
        manager
            .all()
            .iter()
            .any(|(t, m)| *t >= reloading_at && m == "READY=1")
    }));

    assert!(clusterd.stop().success());
    manager.wait("STOPPING=1", |m| m == "STOPPING=1");
    assert!(
        manager
            .texts()
            .iter()
            .any(|m| m.starts_with("STATUS=stopping: "))
    );
}

#[test]
fn socket_activated_fds_named_after_the_unit_say_how_to_name_them() {
    let manager = Manager::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let manifest = gated_manifest("").replace("127.0.0.1:1", &addr.to_string());
    let mut clusterd = start_activated(&manifest, "clusterd.socket", &listener, &manager, 0);
    let status = clusterd.wait_exit(10 * SECOND);
    assert!(!status.success());
    let output = clusterd.output();
    assert!(
        output.contains("fds named \"clusterd.socket\"")
            && output.contains("FileDescriptorName=http"),
        "{output}"
    );
    assert!(!output.contains("Address already in use"), "{output}");
}

#[test]
fn readyz_and_status_check_follow_the_workers_and_an_aborting_rollout() {
    let manager = Manager::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let manifest = gated_manifest("[metrics]\nlisten = \"127.0.0.1:0\"\n");
    let mut clusterd = start_activated(&manifest, "http", &listener, &manager, 0);
    let metrics = clusterd.metrics_addr();

    assert_eq!(http_get(metrics, "/healthz").expect("healthz").status, 200);
    let not_yet = http_get(metrics, "/readyz").expect("readyz");
    assert_eq!(not_yet.status, 503);
    assert!(
        not_yet.body.contains("gate: 0/2 workers ready"),
        "{}",
        not_yet.body
    );
    let check = clusterd.ctl(&["status", "--check"]);
    assert_eq!(check.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&check.stdout).contains("not ready: "));

    std::fs::write(clusterd.dir.path().join("open"), "").expect("open the gate");
    assert!(wait_until(20 * SECOND, || {
        http_get(metrics, "/readyz").is_ok_and(|r| r.status == 200)
    }));
    assert_eq!(clusterd.ctl(&["status", "--check"]).status.code(), Some(0));

    // Generation 2 of gate: slot 0 fails, which aborts the rollout while slot 1's new worker
    // ignores its SIGTERM for stop_timeout (3 s): not ready meanwhile.
    assert!(clusterd.ctl(&["reload", "gate"]).status.success());
    assert!(
        wait_until(10 * SECOND, || {
            http_get(metrics, "/readyz")
                .is_ok_and(|r| r.status == 503 && r.body.contains("gate: a rollout is aborting"))
        }),
        "{}",
        clusterd.output()
    );
    assert_eq!(clusterd.ctl(&["status", "--check"]).status.code(), Some(1));
    assert!(wait_until(20 * SECOND, || {
        http_get(metrics, "/readyz").is_ok_and(|r| r.status == 200)
    }));
    assert!(clusterd.stop().success());
}

/// Four hello workers and a ticker that prints a numbered line every 50 ms.
const UPGRADE_MANIFEST: &str = r#"
[supervisor]
stop_timeout = "5s"

[sockets.http]
listen = "127.0.0.1:0"

[apps.web]
command = ["{hello}"]
workers = 4
sockets = ["http"]
ready = "notify"

[apps.tick]
command = ["sh", "-c", "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.05; done"]
workers = 1
"#;

/// Keep-alive HTTP/1.1 GETs on one connection (reconnecting only when the server says
/// `Connection: close`); any error counts as a failed request.
fn keep_alive_get(
    stream: &mut Option<std::io::BufReader<std::net::TcpStream>>,
    addr: std::net::SocketAddr,
) -> std::io::Result<u16> {
    use std::io::{BufRead, Read, Write};
    if stream.is_none() {
        let s = std::net::TcpStream::connect_timeout(&addr, 5 * SECOND)?;
        s.set_read_timeout(Some(10 * SECOND))?;
        *stream = Some(std::io::BufReader::new(s));
    }
    let reader = stream.as_mut().expect("connected");
    write!(reader.get_mut(), "GET / HTTP/1.1\r\nHost: test\r\n\r\n")?;
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::Error::other("closed before a response"));
    }
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let (mut length, mut close) = (0usize, false);
    loop {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let header = header.trim_end().to_ascii_lowercase();
        if header.is_empty() {
            break;
        }
        if let Some(v) = header.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if header == "connection: close" {
            close = true;
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    if close {
        *stream = None;
    }
    Ok(status)
}

#[test]
fn upgrade_under_load_keeps_every_pid_and_fails_no_request() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let mut clusterd = Clusterd::start(UPGRADE_MANIFEST);
    let addr = clusterd.socket_addr("http");
    clusterd.wait_ready("web", 4, 20 * SECOND);
    clusterd.wait_ready("tick", 1, 20 * SECOND);
    let before = clusterd.status();
    let workers = |status: &serde_json::Value| -> Vec<u64> {
        let mut pids: Vec<u64> = status["apps"]
            .as_array()
            .expect("apps")
            .iter()
            .flat_map(|a| a["workers"].as_array().expect("workers").clone())
            .filter_map(|w| w["pid"].as_u64())
            .collect();
        pids.sort();
        pids
    };
    assert_eq!(workers(&before).len(), 5);

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let fresh = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match http_get(addr, "/") {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    let kept = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            let mut stream = None;
            while !stop.load(Ordering::Relaxed) {
                match keep_alive_get(&mut stream, addr) {
                    Ok(200) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    assert!(wait_until(10 * SECOND, || ok.load(Ordering::Relaxed) > 100));

    let upgrade = clusterd.ctl(&["upgrade"]);
    let said = String::from_utf8_lossy(&upgrade.stdout).into_owned();
    assert!(
        upgrade.status.success(),
        "{said}{}\n{}",
        String::from_utf8_lossy(&upgrade.stderr),
        clusterd.output()
    );
    assert!(said.contains("5 workers kept"), "{said}");
    let served_at_upgrade = ok.load(Ordering::Relaxed);
    assert!(wait_until(10 * SECOND, || {
        ok.load(Ordering::Relaxed) > served_at_upgrade + 100
    }));
    stop.store(true, Ordering::Relaxed);
    fresh.join().expect("fresh client");
    kept.join().expect("keep-alive client");
    assert_eq!(failed.load(Ordering::Relaxed), 0, "failed requests");

    let after = clusterd.status();
    assert_eq!(after["pid"], before["pid"]);
    assert_eq!(after["pid"].as_u64(), Some(clusterd.pid().as_raw() as u64));
    assert_eq!(workers(&after), workers(&before), "a worker was replaced");
    assert_eq!(after["upgrades"], 1);
    assert!(after["upgraded_ms"].as_u64().is_some());
    assert!(after["version"].as_str().is_some_and(|v| !v.is_empty()));

    // The workers' output is still forwarded, by the new clusterd.
    let line = clusterd.wait_for_line("upgraded in place from clusterd", 10 * SECOND);
    let ticks = clusterd.count("tick[0] tick ");
    assert!(
        wait_until(10 * SECOND, || clusterd.count("tick[0] tick ") > ticks + 3),
        "{line}"
    );

    // And it works: a rolling reload, then a clean shutdown.
    let reload = clusterd.ctl(&["reload", "--wait", "web"]);
    assert!(
        reload.status.success(),
        "{}",
        String::from_utf8_lossy(&reload.stdout)
    );
    assert!(clusterd.stop().success());
}

#[test]
fn an_upgrade_to_a_binary_that_cannot_read_the_state_changes_nothing() {
    let mut clusterd = Clusterd::start(UPGRADE_MANIFEST);
    clusterd.wait_ready("web", 4, 20 * SECOND);
    clusterd.wait_ready("tick", 1, 20 * SECOND);
    let before = clusterd.status();
    let serving_before: std::collections::HashMap<&str, _> = ["web", "tick"]
        .into_iter()
        .map(|app| (app, clusterd.serving(app)))
        .collect();
    let not_executable = clusterd.manifest.display().to_string();
    for (binary, why) in [
        ("/bin/true", "cannot read this clusterd's state"),
        (not_executable.as_str(), "not executable"),
        ("/nonexistent/clusterd", "No such file"),
    ] {
        let upgrade = clusterd.ctl(&["upgrade", "--binary", binary]);
        let stderr = String::from_utf8_lossy(&upgrade.stderr).into_owned();
        assert!(!upgrade.status.success(), "{binary}: {stderr}");
        assert!(
            stderr.contains(why) && stderr.contains("nothing changed"),
            "{stderr}"
        );
    }
    let after = clusterd.status();
    assert_eq!(after["upgrades"], 0);
    assert_eq!(after["pid"], before["pid"]);
    for app in ["web", "tick"] {
        let pids = |s: Vec<(u64, nix::unistd::Pid, u64, String)>| -> Vec<_> {
            s.into_iter().map(|(slot, pid, _, _)| (slot, pid)).collect()
        };
        assert_eq!(
            pids(clusterd.serving(app)),
            pids(serving_before[app].clone())
        );
    }
    assert!(clusterd.stop().success());
}

#[test]
fn a_clusterd_that_cannot_read_the_state_handed_to_it_starts_nothing_and_fails() {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    std::fs::write(
        &state,
        r#"{"format":1,"version":"0.0.1","monotonic_ns":1,"core":42}"#,
    )
    .expect("write state");
    let output = std::process::Command::new(crate::util::clusterd_bin())
        .args(["handover-resume", "0"])
        .stdin(std::fs::File::open(&state).expect("open state"))
        .output()
        .expect("run clusterd");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot take over from the previous clusterd; starting no worker")
            && stderr.contains("cannot read the state of clusterd 0.0.1"),
        "{stderr}"
    );
    assert!(!stderr.contains("started pid"), "{stderr}");
}
