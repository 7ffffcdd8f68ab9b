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
    clusterd.wait_for_line("socket http listening on", 10 * SECOND);

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
    let worker = clusterd.started_pids("web[0]")[0];
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
    let line = clusterd.wait_for_line("metrics on http://", 10 * SECOND);
    let metrics: std::net::SocketAddr = line
        .rsplit("http://")
        .next()
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));

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
