//! A supervisor driven in-process, as a library user would: `daemon::run(parts, signals,
//! shutdown)` on a tokio runtime of this test, with the test's own signal channel and shutdown
//! future, on two real `hello` workers.
//!
//! Its own test binary without libtest's harness (`harness = false`): `run` must be the only
//! owner of `waitpid` in its process (its reaper reaps every child), so this process starts no
//! other children and runs no other tests beside it. clusterd is a binary crate, so the daemon's
//! modules are compiled into this test by path; what the test does not use is dead here (and
//! cargo compiles their unit-test modules, which do not run, with `cfg(test)`).

#[path = "../src/daemon/mod.rs"]
#[allow(dead_code, unused_imports)]
mod daemon;
#[path = "../src/error.rs"]
#[allow(dead_code, unused_imports)]
mod error;
#[path = "common/http.rs"]
mod http;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clusterd_core::SupervisorSignal;
use clusterd_proto::{Envelope, Reply, Request, Status, WorkerRole, WorkerState};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use daemon::containment::Containment;
use daemon::control::ControlServer;
use daemon::logs::Logs;
use daemon::notify::NotifySocket;
use daemon::rundir::RunDir;
use daemon::sockets::Sockets;

const NAME: &str = "a_supervisor_driven_in_process_reloads_replaces_and_stops";

/// The longest any one condition may take to come true (a loaded machine included).
const WAIT: Duration = Duration::from_secs(60);

const MANIFEST: &str = r#"
[sockets.http]
listen = "127.0.0.1:0"

[apps.web]
command = ["{hello}"]
workers = 2
sockets = ["http"]
ready = "notify"
ready_timeout = "30s"
"#;

/// Runs the one test, speaking enough of libtest's language for cargo and `scripts/test`:
/// `--list`, `--ignored`, a name filter (`--exact`), and the `test ...` and `test result:`
/// lines.
fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The test is not `#[ignore]`d: asked for ignored tests only, there is none.
    let ignored_only = args.iter().any(|a| a == "--ignored");
    if args.iter().any(|a| a == "--list") {
        if !ignored_only {
            println!("{NAME}: test");
        }
        return ExitCode::SUCCESS;
    }
    let exact = args.iter().any(|a| a == "--exact");
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let chosen = filters.is_empty()
        || filters.iter().any(|f| {
            if exact {
                NAME == *f
            } else {
                NAME.contains(f.as_str())
            }
        });
    if ignored_only || !chosen {
        println!("\nrunning 0 tests\n");
        println!("test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 1 filtered out");
        return ExitCode::SUCCESS;
    }
    println!("\nrunning 1 test");
    // clusterd's own lines (its events) on stderr, for a failure to be read.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .init();
    let started = Instant::now();
    // A panic is printed by the default hook; the workers of a failed run die with the
    // process (their parent thread's death signal).
    let passed =
        std::panic::catch_unwind(a_supervisor_driven_in_process_reloads_replaces_and_stops).is_ok();
    let seconds = started.elapsed().as_secs_f64();
    let (word, counts) = match passed {
        true => ("ok", "1 passed; 0 failed"),
        false => ("FAILED", "0 passed; 1 failed"),
    };
    println!("test {NAME} ... {word}\n");
    println!(
        "test result: {word}. {counts}; 0 ignored; 0 measured; 0 filtered out; finished in {seconds:.2}s\n"
    );
    match passed {
        true => ExitCode::SUCCESS,
        false => ExitCode::from(101),
    }
}

fn a_supervisor_driven_in_process_reloads_replaces_and_stops() {
    let hello = PathBuf::from(env!("CARGO_BIN_EXE_clusterd")).with_file_name("hello");
    assert!(
        hello.exists(),
        "{} is missing: build the workspace first (`cargo build --workspace`)",
        hello.display()
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("clusterd.toml");
    let text = MANIFEST.replace("{hello}", &hello.display().to_string());
    std::fs::write(&path, text).expect("write the manifest");
    let manifest = clusterd_manifest::load(&path).expect("a valid manifest");
    let run_dir = RunDir::for_manifest(&manifest, None);
    run_dir.create().expect("run dir");
    let control_path = run_dir.control_socket();

    let (signal_tx, signal_rx) = tokio::sync::mpsc::unbounded_channel::<SupervisorSignal>();
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let (addr_tx, addr_rx) = mpsc::channel::<SocketAddr>();
    let (done_tx, done_rx) = mpsc::channel::<anyhow::Result<()>>();
    // The supervisor's thread: its own single-threaded runtime, as boot makes one. The test
    // talks to it from this thread as clients do (TCP, the control socket) and through the
    // two channels.
    let supervisor = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let local = tokio::task::LocalSet::new();
        // The supervisor's own output, a value of its own: its workers' lines and its events
        // go to the test's stdout, as a foreground clusterd's do.
        let app_logs: Vec<(&str, &clusterd_manifest::LogConfig)> = manifest
            .apps
            .iter()
            .map(|(name, app)| (name.as_str(), &app.log))
            .collect();
        let logs = Logs::new(&manifest.supervisor.log, &app_logs, None).expect("logs");
        drop(app_logs);
        let _tracing = tracing::subscriber::set_default(logs.subscriber());
        let output = logs.clone();
        let result = local.block_on(&runtime, async move {
            let control = ControlServer::bind(&run_dir.control_socket(), output.clone())?;
            let sockets = Sockets::bind_all(&manifest.sockets, BTreeMap::new(), &BTreeSet::new())?;
            let addr = sockets
                .get("http")
                .and_then(|s| s.local_addr())
                .expect("a TCP address");
            let notify = NotifySocket::bind(&run_dir.notify_socket())?;
            let parts = daemon::Parts {
                manifest,
                sockets,
                notify,
                control,
                metrics: None,
                // Nothing process-wide: no cgroup move, no subreaper.
                containment: Containment::ProcessGroups {
                    why: "in-process test".into(),
                },
                manager: None,
                // Not clusterd's binary: no `CLUSTERD_EXE`, no upgrade in place.
                exe: None,
                detached: false,
                resumed: None,
                logs: output,
            };
            addr_tx.send(addr).expect("the test waits for the address");
            let shutdown = async {
                let _ = shutdown_rx.await;
            };
            daemon::run(parts, signal_rx, shutdown).await
        });
        logs.close();
        let _ = done_tx.send(result);
    });
    let addr = match addr_rx.recv_timeout(WAIT) {
        Ok(addr) => addr,
        Err(_) => panic!(
            "the supervisor did not start: {:?}",
            done_rx.try_recv().map(|r| r.map_err(|e| format!("{e:#}")))
        ),
    };

    // Two ready workers of generation 1, serving requests.
    let first = wait_for(&control_path, "2 ready workers", |s| serving(s, 1));
    let mut seen: BTreeSet<u32> = first.iter().copied().collect();
    for _ in 0..10 {
        let pid = whoami(addr).expect("a request served");
        assert!(
            first.contains(&pid),
            "served by {pid}, not one of {first:?}"
        );
    }

    // A reload sent as a signal: a rollout to generation 2, with no request failing meanwhile.
    signal_tx
        .send(SupervisorSignal::Reload)
        .expect("the supervisor reads its signals");
    let mut served = 0;
    let second = wait_for(&control_path, "a completed rollout to generation 2", |s| {
        whoami(addr).expect("a request served during the rollout");
        served += 1;
        let app = &s.apps[0];
        let done =
            app.reloading.is_none() && app.last_reload.as_ref().is_some_and(|r| r.generation == 2);
        done.then(|| serving(s, 2)).flatten()
    });
    assert!(served > 0);
    assert!(
        second.iter().all(|pid| !first.contains(pid)),
        "{first:?} → {second:?}"
    );
    seen.extend(&second);

    // A worker killed from outside is replaced in its slot.
    let victim = second[0];
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).expect("kill a worker");
    let third = wait_for(&control_path, "the killed worker replaced", |s| {
        serving(s, 2).filter(|pids| !pids.contains(&victim))
    });
    assert!(
        third.contains(&second[1]),
        "the other worker kept: {third:?}"
    );
    seen.extend(&third);
    let pid = whoami(addr).expect("a request served after the replacement");
    assert!(third.contains(&pid));

    // A graceful stop through the shutdown future: `run` returns Ok once every worker is gone.
    shutdown_tx
        .send(())
        .expect("the supervisor waits for shutdown");
    let result = done_rx
        .recv_timeout(WAIT)
        .expect("run returned after the shutdown");
    if let Err(error) = result {
        panic!("run failed: {error:#}");
    }
    supervisor.join().expect("the supervisor's thread");
    for pid in &seen {
        // Reaped by `run` (not a zombie): the pid is free.
        assert_eq!(
            kill(Pid::from_raw(*pid as i32), None),
            Err(nix::errno::Errno::ESRCH),
            "worker {pid} outlived run"
        );
    }
    assert_eq!(children(), Vec::<i32>::new(), "children left behind");
    let refused = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .expect_err("the port is closed once run has returned");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(!control_path.exists(), "the control socket is removed");
}

/// The pids of the two serving, ready workers of generation `generation`, if that is all
/// there is (no candidate, no retiring worker).
fn serving(status: &Status, generation: u64) -> Option<Vec<u32>> {
    let app = status.apps.iter().find(|a| a.name == "web")?;
    let pids: Vec<u32> = app
        .workers
        .iter()
        .filter(|w| {
            w.state == WorkerState::Ready
                && w.role == WorkerRole::Serving
                && w.generation == generation
        })
        .filter_map(|w| w.pid)
        .collect();
    (pids.len() == 2 && app.workers.len() == 2).then_some(pids)
}

/// Asks status until `condition` gives a value (at most [`WAIT`]); the pause between asks
/// grows from 10 ms to 200 ms, as in the integration harness.
fn wait_for<T>(socket: &Path, what: &str, mut condition: impl FnMut(&Status) -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    let mut pause = Duration::from_millis(10);
    loop {
        let status = status(socket);
        if let Some(value) = condition(&status) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; status: {status:#?}"
        );
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// One status request on the control socket.
fn status(socket: &Path) -> Status {
    let mut stream = UnixStream::connect(socket).expect("connect to the control socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
        .write_all(&clusterd_proto::encode_line(&Envelope::new(
            Request::Status {},
        )))
        .expect("send a status request");
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .expect("a status reply");
    match serde_json::from_str(&line).expect("a reply") {
        Reply::Status(status) => *status,
        other => panic!("not a status: {other:?}"),
    }
}

/// `GET /whoami` from hello: the pid of the worker that answered.
fn whoami(addr: SocketAddr) -> std::io::Result<u32> {
    let response = http::http_get(addr, "/whoami")?;
    if response.status != 200 {
        return Err(std::io::Error::other(format!(
            "not 200: {}",
            response.status
        )));
    }
    let body = &response.body;
    let json: serde_json::Value = serde_json::from_str(body).map_err(std::io::Error::other)?;
    json["pid"]
        .as_u64()
        .map(|pid| pid as u32)
        .ok_or_else(|| std::io::Error::other(format!("no pid in {body:?}")))
}

/// The children of this process still in `/proc` (a zombie included).
fn children() -> Vec<i32> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1));
        if ppid == Some(me.as_str()) {
            found.push(pid);
        }
    }
    found
}
