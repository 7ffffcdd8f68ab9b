//! Unmodified servers (`intercept = true`): apps that bind their own port, run as several
//! workers on clusterd's held socket with no code change.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::util::{Clusterd, clusterd_bin, http_get, wait_until};

const SECOND: Duration = Duration::from_secs(1);

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Asks `addr` over fresh connections until `n` different bodies (per-process answers) were
/// seen; returns them.
pub(crate) fn distinct_bodies(
    addr: SocketAddr,
    n: usize,
    extract: impl Fn(&str) -> String,
) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let answered = wait_until(20 * SECOND, || {
        if let Ok(response) = http_get(addr, "/") {
            assert_eq!(response.status, 200, "{}", response.body);
            seen.insert(extract(&response.body));
        }
        seen.len() >= n
    });
    assert!(answered, "only {seen:?} answered");
    seen
}

/// The restarts of every worker of `app`, from `clusterd status`.
pub(crate) fn restarts(clusterd: &Clusterd, app: &str) -> u64 {
    let status = clusterd.status();
    status["apps"]
        .as_array()
        .expect("apps")
        .iter()
        .find(|a| a["name"] == app)
        .expect("app")["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w["restarts"].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn an_unmodified_python_http_server_runs_as_two_workers() {
    let port = free_port();
    let mut clusterd = Clusterd::start_with_files(
        &format!(
            r#"
[sockets.http]
listen = "127.0.0.1:{port}"

[apps.py]
command = ["python3", "-m", "http.server", "--directory", "{{dir}}/www", "{port}"]
workers = 2
sockets = ["http"]
intercept = true
"#
        ),
        &[("www/index.html", "hello\n")],
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    clusterd.wait_ready("py", 2, 20 * SECOND);
    assert_eq!(clusterd.count("answered with socket http"), 2);
    // http.server answers with its own pid nowhere, but both workers log their requests (on
    // stderr: `py[N]!`).
    assert!(
        wait_until(20 * SECOND, || {
            let _ = http_get(addr, "/index.html");
            clusterd.count("py[0]! 127.0.0.1") > 0 && clusterd.count("py[1]! 127.0.0.1") > 0
        }),
        "not both workers served:\n{}",
        clusterd.output()
    );
    assert_eq!(restarts(&clusterd, "py"), 0);
    assert!(clusterd.stop().success());
}

/// The tutorial's `child.js`, byte for byte (CI has `../shared` beside the clone; a checkout
/// elsewhere names the file with `CLUSTERD_TUTORIAL_CHILD_JS`).
pub(crate) fn child_js() -> Option<Vec<u8>> {
    let path = std::env::var("CLUSTERD_TUTORIAL_CHILD_JS").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/mission-examples/child.js"
        )
        .to_owned()
    });
    match std::fs::read(&path) {
        Ok(bytes) => Some(bytes),
        Err(error) => {
            crate::util::require(&format!(
                "{path} is not there ({error}): the tutorial's child.js is needed"
            ));
            None
        }
    }
}

/// The port child.js hard-codes; the test fails (it cannot rewrite the file) when it is taken.
pub(crate) const CHILD_JS_PORT: u16 = 8001;

/// Starts `clusterd run ARGS...` in a new temp dir holding `files` (written byte for byte,
/// executable),
/// with its run dir where [`Clusterd::ctl`] looks for it (a manifest naming only `run_dir`).
pub(crate) fn start_run(args: &[&str], files: &[(&str, &[u8])]) -> Clusterd {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let files: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|(name, bytes)| (name.to_string(), bytes.to_vec()))
        .collect();
    Clusterd::start_with(
        "[supervisor]\nrun_dir = \".clusterd/run\"\n[apps.unused]\ncommand = [\"true\"]\n",
        move |command| {
            let dir = command.get_current_dir().expect("the temp dir").to_owned();
            for (name, bytes) in &files {
                let path = dir.join(name);
                std::fs::write(&path, bytes).expect("write file");
                let mode = std::os::unix::fs::PermissionsExt::from_mode(0o755);
                std::fs::set_permissions(&path, mode).expect("chmod");
            }
            let mut run = Command::new(clusterd_bin());
            run.arg("run")
                .arg("--run-dir")
                .arg(dir.join(".clusterd/run"))
                .args(&args)
                .current_dir(&dir)
                .env_remove("XDG_RUNTIME_DIR")
                .env("CLUSTERD_LOG", "debug")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            *command = run;
        },
    )
}

/// Client threads sending `GET /` over fresh connections (`Connection: close`) until
/// stopped; count failures.
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(usize, Vec<String>)>>,
}

impl Load {
    pub(crate) fn with_clients(addr: SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..clients)
            .map(|_| {
                let flag = stop.clone();
                std::thread::spawn(move || {
                    let (mut ok, mut failures) = (0, Vec::new());
                    while !flag.load(Ordering::Relaxed) {
                        match http_get(addr, "/") {
                            Ok(r) if r.status == 200 => ok += 1,
                            Ok(r) => failures.push(format!("status {}", r.status)),
                            Err(e) => failures.push(e.to_string()),
                        }
                    }
                    (ok, failures)
                })
            })
            .collect();
        Load { stop, threads }
    }

    /// Stops the clients; (requests answered, failures).
    pub(crate) fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut ok, mut failures) = (0, Vec::new());
        for thread in self.threads {
            let (n, f) = thread.join().expect("load thread");
            ok += n;
            failures.extend(f);
        }
        (ok, failures)
    }
}

#[test]
fn the_tutorials_child_js_runs_unmodified_as_two_workers_and_reloads_without_errors() {
    let Some(script) = child_js() else { return };
    assert!(
        TcpListener::bind(("127.0.0.1", CHILD_JS_PORT)).is_ok(),
        "port {CHILD_JS_PORT} (hard-coded in child.js) is taken on this machine: free it to run \
         this test"
    );
    let listen = format!("127.0.0.1:{CHILD_JS_PORT}");
    let mut clusterd = start_run(
        &[
            "--workers",
            "2",
            "--listen",
            &listen,
            "--",
            "node",
            "child.js",
        ],
        &[("child.js", &script)],
    );
    let addr: SocketAddr = listen.parse().expect("addr");
    clusterd.wait_ready("node", 2, 20 * SECOND);
    let pids = distinct_bodies(addr, 2, |body| body.trim().to_owned());
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert_eq!(restarts(&clusterd, "node"), 0);

    let load = Load::with_clients(addr, 4);
    for _ in 0..2 {
        let output = clusterd.ctl(&["reload", "--wait"]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
    let (answered, failures) = load.finish();
    assert!(answered > 0);
    // child.js exits at once on SIGTERM; each worker has a listening socket of its own, and a
    // retiring one is first taken out of the steering (`drain`): it gets no new connection,
    // answers what it has, and only then gets its SIGTERM. No request fails.
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the reloads: {failures:?}",
        failures.len(),
        answered + failures.len()
    );
    assert!(clusterd.output().contains("steered"));
    // The workers' own output reaches clusterd's, prefixed.
    assert!(
        clusterd.count("] Started instance") >= 2,
        "{}",
        clusterd.output()
    );
    assert_eq!(restarts(&clusterd, "node"), 0);
    assert!(clusterd.stop().success());
}

#[test]
fn ready_listen_waits_for_listen_and_a_reload_waits_for_it() {
    let port = free_port();
    // Binds at once, listens a second later.
    let mut clusterd = Clusterd::start_with_files(
        &format!(
            r#"
[supervisor]
log_format = "json"

[sockets.http]
listen = "127.0.0.1:{port}"

[apps.slow]
log_format = "text"
command = ["python3", "{{dir}}/slow.py", "{port}"]
sockets = ["http"]
intercept = true
ready = "listen"

[apps.slow.reload]
bake = "0s"
"#
        ),
        &[(
            "slow.py",
            "import sys, time, http.server as h\n\
             s = h.HTTPServer(('', int(sys.argv[1])), h.SimpleHTTPRequestHandler, False)\n\
             s.server_bind()\n\
             print('bound', flush=True)\n\
             time.sleep(1)\n\
             s.server_activate()\n\
             s.serve_forever()\n",
        )],
    );
    clusterd.wait_for_line("slow[0] bound", 20 * SECOND);
    let (_, _, _, state) = clusterd.serving("slow")[0].clone();
    assert_eq!(state, "starting", "bound but not listening yet");
    let ready = clusterd.wait_event("ready", 20 * SECOND, |e| e["generation"] == 1);
    assert!(ready["ready_after_ms"].as_u64() >= Some(1000), "{ready}");

    let started = std::time::Instant::now();
    let output = clusterd.ctl(&["reload", "--wait"]);
    assert!(output.status.success());
    assert!(
        started.elapsed() >= SECOND,
        "the reload did not wait for the listen: {:?}",
        started.elapsed()
    );
    let ready = clusterd.wait_event("ready", SECOND, |e| e["generation"] == 2);
    assert!(ready["ready_after_ms"].as_u64() >= Some(1000), "{ready}");
    assert!(clusterd.stop().success());
}

#[test]
fn socket_options_are_set_on_the_held_listener() {
    let mut clusterd = Clusterd::start_with_files(
        r#"
[sockets.http]
listen = "127.0.0.1:0"
tcp_nodelay = true
keepalive = "75s"
reuseport = true

[apps.probe]
command = ["python3", "{dir}/probe.py"]
sockets = ["http"]
restart = "never"
"#,
        &[(
            "probe.py",
            "import socket\n\
             s = socket.socket(fileno=3)\n\
             T, S = socket.IPPROTO_TCP, socket.SOL_SOCKET\n\
             print('options', s.getsockopt(T, socket.TCP_NODELAY) != 0,\n\
                   s.getsockopt(S, socket.SO_KEEPALIVE) != 0,\n\
                   s.getsockopt(T, socket.TCP_KEEPIDLE),\n\
                   s.getsockopt(S, socket.SO_REUSEPORT) != 0, flush=True)\n",
        )],
    );
    let line = clusterd.wait_for_line("options ", 20 * SECOND);
    assert!(line.ends_with("options True True 75 True"), "{line}");
    assert!(clusterd.stop().success());
}

/// A Go server that binds its own port: `http.ListenAndServe(":PORT")`.
pub(crate) const GO_SERVER: &str = r#"package main

import (
	"fmt"
	"net/http"
	"os"
)

func main() {
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%d\n", os.Getpid())
	})
	if err := http.ListenAndServe(":"+os.Args[1], nil); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
"#;

/// `source` built as a static Go binary; `None` (the test is skipped, and says so) where `go`
/// cannot run outside CI.
pub(crate) fn go_build(source: &str) -> Option<Vec<u8>> {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("main.go"), source).expect("write main.go");
    let built = Command::new("go")
        .args(["build", "-o", "server", "main.go"])
        .current_dir(dir.path())
        .env("CGO_ENABLED", "0")
        .env("GO111MODULE", "off")
        .output();
    let built = match built {
        Err(error) => {
            crate::util::require(&format!("cannot run `go` ({error}); CI installs golang-go"));
            return None;
        }
        Ok(built) => built,
    };
    assert!(
        built.status.success(),
        "go build: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    Some(std::fs::read(dir.path().join("server")).expect("the built server"))
}

#[test]
fn a_static_go_binary_binding_its_own_port_runs_as_three_workers() {
    let Some(server) = go_build(GO_SERVER) else {
        return;
    };
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let mut clusterd = start_run(
        &[
            "--workers",
            "3",
            "--listen",
            &listen,
            "--",
            "./server",
            &port,
        ],
        &[("server", &server)],
    );
    clusterd.wait_ready("server", 3, 30 * SECOND);
    let pids = distinct_bodies(listen.parse().expect("addr"), 3, |b| b.trim().to_owned());
    assert_eq!(pids.len(), 3, "{pids:?}");
    assert!(clusterd.stop().success());
}

/// The inodes of the TCP sockets in state LISTEN (`/proc/net/tcp`, `tcp6`).
fn listening_inodes() -> BTreeSet<String> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .flat_map(|path| {
            let table = std::fs::read_to_string(path).unwrap_or_default();
            table
                .lines()
                .skip(1)
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    (fields.get(3) == Some(&"0A")).then(|| fields.get(9).map(|i| i.to_string()))?
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The inode of the socket at fd 3 of `pid` (`/proc/PID/fd/3` is `socket:[INODE]`).
fn fd3_inode(pid: &str) -> String {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/3")).expect("fd 3 of the worker");
    let link = link.to_string_lossy();
    link.strip_prefix("socket:[")
        .and_then(|l| l.strip_suffix(']'))
        .unwrap_or_else(|| panic!("fd 3 of {pid} is {link}, not a socket"))
        .to_owned()
}

/// The address of socket `http`, after checking in status that it is `steered` (its balance
/// not `shared`) or not.
fn steered_addr(clusterd: &Clusterd, steered: bool) -> SocketAddr {
    let address = clusterd.socket_addr("http");
    let status = clusterd.status();
    let balance = status["sockets"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "http"))
        .map(|s| s["balance"].clone())
        .unwrap_or_default();
    assert_eq!(balance != "shared", steered, "balance {balance}");
    address
}

/// The pids of `app`'s workers once `n` serve and are ready.
fn ready_pids(clusterd: &Clusterd, app: &str, n: usize) -> BTreeSet<String> {
    let mut pids = BTreeSet::new();
    let ready = wait_until(30 * SECOND, || {
        let serving = clusterd.serving(app);
        pids = serving.iter().map(|w| w.1.to_string()).collect();
        serving.len() == n && serving.iter().all(|w| w.3 == "ready")
    });
    assert!(ready, "not {n} ready workers:\n{}", clusterd.output());
    pids
}

/// An app whose workers take the socket at fd 3 (`LISTEN_FDS`), intercepted: it serves from
/// `n` distinct pids with 0 restarts, each worker's fd 3 a listening socket (its own when the
/// address is `steered`, else the one shared socket); it reloads under load with 0 failed
/// requests; a worker killed with SIGKILL is replaced and the app serves from `n` pids again.
/// `pid_of` reads the pid from a response body.
fn takes_fd3_through_reload_and_kill(
    mut clusterd: Clusterd,
    app: &str,
    n: usize,
    steered: bool,
    pid_of: impl Fn(&str) -> String + Copy,
) {
    let addr = steered_addr(&clusterd, steered);
    let pids = ready_pids(&clusterd, app, n);
    assert_eq!(distinct_bodies(addr, n, pid_of), pids);
    assert_eq!(restarts(&clusterd, app), 0, "{}", clusterd.output());
    let listening = listening_inodes();
    let inodes: BTreeSet<String> = pids.iter().map(|pid| fd3_inode(pid)).collect();
    assert!(
        inodes.is_subset(&listening),
        "fd 3 is not listening in every worker: {inodes:?}"
    );
    assert_eq!(inodes.len(), if steered { n } else { 1 }, "{inodes:?}");

    let load = Load::with_clients(addr, 4);
    let output = clusterd.ctl(&["reload", "--wait"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let (answered, failures) = load.finish();
    assert!(answered > 0);
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the reload: {failures:?}",
        failures.len(),
        answered + failures.len()
    );
    let reloaded = ready_pids(&clusterd, app, n);
    assert!(reloaded.is_disjoint(&pids), "{pids:?} -> {reloaded:?}");
    assert_eq!(distinct_bodies(addr, n, pid_of), reloaded);

    let victim: Pid = Pid::from_raw(reloaded.first().expect("a pid").parse().expect("pid"));
    nix::sys::signal::kill(victim, Signal::SIGKILL).expect("kill -9 a worker");
    let replaced = wait_until(30 * SECOND, || {
        let serving = clusterd.serving(app);
        serving.len() == n
            && serving.iter().all(|w| w.3 == "ready")
            && serving.iter().all(|w| w.1 != victim)
    });
    assert!(replaced, "not replaced:\n{}", clusterd.output());
    let after = ready_pids(&clusterd, app, n);
    assert_eq!(distinct_bodies(addr, n, pid_of), after);
    assert_eq!(restarts(&clusterd, app), 1);
    assert!(clusterd.stop().success());
}

/// The default, round robin, takes turns: 10 new connections per worker of `app`'s `n` go 10
/// to each (where clusterd may load its eBPF program: `clusterd status` says what the host
/// does, and without the turns this skips).
fn takes_turns(clusterd: &Clusterd, app: &str, n: usize) {
    let addr = steered_addr(clusterd, true);
    let pids = ready_pids(clusterd, app, n);
    let shown = clusterd.status()["sockets"][0]["balance"].clone();
    assert!(
        shown == "round-robin" || clusterd.output().contains("steering_fallback"),
        "{shown}: {}",
        clusterd.output()
    );
    if shown == "random" {
        crate::util::require(&format!(
            "round robin's eBPF program: {}",
            clusterd.output()
        ));
        return;
    }
    let mut per_pid: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..10 * n {
        let response = http_get(addr, "/").expect("an answer");
        *per_pid.entry(hello_pid(&response.body)).or_default() += 1;
    }
    assert_eq!(per_pid.keys().cloned().collect::<BTreeSet<_>>(), pids);
    assert!(
        per_pid.values().all(|count| *count == 10),
        "not in turn: {per_pid:?}"
    );
}

/// The bundled `hello` (fd 3 when `LISTEN_FDS` is set, else it binds), intercepted.
fn intercepted_hello(extra: &str) -> Clusterd {
    Clusterd::start(&hello_manifest(
        4,
        &format!("intercept = true\n{extra}\n{NO_BAKE}"),
    ))
}

/// A manifest of `workers` hello workers (app `web`) on a loopback socket (`http`, port 0),
/// with `extra` lines at the end of the app's table.
fn hello_manifest(workers: usize, extra: &str) -> String {
    format!(
        r#"
[supervisor]
stop_timeout = "5s"

[sockets.http]
listen = "127.0.0.1:0"

[apps.web]
command = ["{{hello}}"]
workers = {workers}
sockets = ["http"]
{extra}
"#
    )
}

/// `extra` for [`hello_manifest`]: reloads without a bake.
const NO_BAKE: &str = "\n[apps.web.reload]\nbake = \"0s\"";

/// The pid in hello's `hello from web[0] pid 123 generation 1`.
fn hello_pid(body: &str) -> String {
    body.split_whitespace()
        .skip_while(|w| *w != "pid")
        .nth(1)
        .unwrap_or(body)
        .to_owned()
}

#[test]
fn hello_intercepted_takes_its_own_steered_socket_at_fd_3() {
    takes_fd3_through_reload_and_kill(intercepted_hello(""), "web", 4, true, hello_pid);
}

#[test]
fn hello_on_fd_3_with_drain_takes_its_own_steered_socket_without_intercept() {
    let clusterd = Clusterd::start(&hello_manifest(4, &format!("drain = \"1s\"\n{NO_BAKE}")));
    takes_turns(&clusterd, "web", 4);
    takes_fd3_through_reload_and_kill(clusterd, "web", 4, true, hello_pid);
}

#[test]
fn hello_intercepted_with_balance_shared_takes_the_shared_socket_at_fd_3() {
    let clusterd = intercepted_hello("balance = \"shared\"");
    takes_fd3_through_reload_and_kill(clusterd, "web", 4, false, hello_pid);
}

/// The default for a multi-worker app on a TCP socket: each worker its own steered socket at
/// fd 3, without `drain` — hello drains itself on SIGTERM, steered out right before it.
#[test]
fn hello_on_fd_3_takes_its_own_steered_socket_by_default_and_reloads_without_drain() {
    let clusterd = Clusterd::start(&hello_manifest(4, NO_BAKE));
    takes_turns(&clusterd, "web", 4);
    takes_fd3_through_reload_and_kill(clusterd, "web", 4, true, hello_pid);
}

/// `balance = "least-queued"`: while one worker is stopped (SIGSTOP: it accepts nothing), new
/// connections go past it to the other as soon as one waits on its socket, where round robin
/// would give it every other one; once it runs again, it answers the one it got.
#[test]
fn least_queued_sends_new_connections_past_a_worker_that_stopped_accepting() {
    use std::io::{Read, Write};
    let mut clusterd = Clusterd::start(&hello_manifest(2, "balance = \"least-queued\""));
    let addr = steered_addr(&clusterd, true);
    let pids = ready_pids(&clusterd, "web", 2);
    let shown = clusterd.status()["sockets"][0]["balance"].clone();
    if shown != "least-queued" {
        assert!(clusterd.output().contains("steering_fallback"), "{shown}");
        crate::util::require(&format!(
            "least-queued's lookup program: {}",
            clusterd.output()
        ));
        return;
    }
    let stopped = pids.first().expect("a pid").clone();
    let pid = Pid::from_raw(stopped.parse().expect("pid"));
    nix::sys::signal::kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
    // One request at a time: the running worker answers at once; a request that gets no
    // answer within 2 s waits on the stopped worker's socket.
    let answer = |stream: &mut std::net::TcpStream, within: Duration| {
        stream.set_read_timeout(Some(within)).unwrap();
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        let body = response.split("\r\n\r\n").nth(1).map(hello_pid);
        body.filter(|_| !response.is_empty())
    };
    let mut waiting = Vec::new();
    for _ in 0..10 {
        let mut stream = std::net::TcpStream::connect(addr).expect("connect");
        let request = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
        stream.write_all(request).expect("request");
        match answer(&mut stream, Duration::from_secs(2)) {
            Some(from) => assert_ne!(from, stopped, "a stopped worker answered"),
            None => waiting.push(stream),
        }
    }
    // The turns give it one while its queue is as short as the other's (empty), then none.
    assert_eq!(
        waiting.len(),
        1,
        "the stopped worker got {} of 10",
        waiting.len()
    );
    nix::sys::signal::kill(pid, Signal::SIGCONT).expect("SIGCONT");
    for mut stream in waiting {
        let from = answer(&mut stream, Duration::from_secs(10));
        assert_eq!(from.as_deref(), Some(stopped.as_str()));
    }
    // The lookup program is clusterd's for as long as it runs: its link goes with it.
    let links = bpf_links(clusterd.pid());
    assert_eq!(links.len(), 1, "clusterd holds one lookup link: {links:?}");
    assert!(bpf_link_exists(links[0]));
    assert!(clusterd.stop().success());
    assert!(
        wait_until(5 * SECOND, || links.iter().all(|id| !bpf_link_exists(*id))),
        "a lookup link outlived clusterd: {links:?}"
    );
}

/// The ids of the BPF links `pid` holds (`link_id` in its descriptors' fdinfo).
fn bpf_links(pid: Pid) -> Vec<u32> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("fdinfo");
    dir.flatten()
        .filter_map(|entry| std::fs::read_to_string(entry.path()).ok())
        .filter_map(|info| {
            let line = info.lines().find(|l| l.starts_with("link_id:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .collect()
}

/// Whether the kernel still has BPF link `id` (`BPF_LINK_GET_FD_BY_ID`).
fn bpf_link_exists(id: u32) -> bool {
    #[repr(C)]
    struct Attr {
        link_id: u32,
        next_id: u32,
        open_flags: u32,
    }
    const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
    let attr = Attr {
        link_id: id,
        next_id: 0,
        open_flags: 0,
    };
    // SAFETY: BPF_LINK_GET_FD_BY_ID with its attribute, of the size given.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_GET_FD_BY_ID,
            &attr as *const Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    if fd < 0 {
        return false;
    }
    // SAFETY: the fd the kernel just returned, ours alone.
    drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) });
    true
}

/// A SIGHUP that asks for `balance = "shared"` rolls the app (its env changed too) under load
/// with no failed request, and its socket stays steered until clusterd restarts: each new
/// worker's fd 3 is its own listening socket.
#[test]
fn a_sighup_to_balance_shared_keeps_the_socket_steered_and_rolls_without_failures() {
    let manifest = |extra: &str| hello_manifest(2, &format!("{extra}\n{NO_BAKE}"));
    let mut clusterd = Clusterd::start(&manifest(""));
    let addr = steered_addr(&clusterd, true);
    let old = ready_pids(&clusterd, "web", 2);
    clusterd.rewrite_manifest(&manifest("balance = \"shared\"\nenv = { VERSION = \"2\" }"));
    let load = Load::with_clients(addr, 4);
    clusterd.signal(Signal::SIGHUP);
    let rolled = wait_until(30 * SECOND, || {
        let serving = clusterd.serving("web");
        serving.len() == 2 && serving.iter().all(|w| w.2 == 2 && w.3 == "ready")
    });
    let (answered, failures) = load.finish();
    assert!(rolled, "not rolled:\n{}", clusterd.output());
    assert!(answered > 0);
    assert!(failures.is_empty(), "{failures:?} of {answered}");
    let new = ready_pids(&clusterd, "web", 2);
    assert!(new.is_disjoint(&old));
    let inodes: BTreeSet<String> = new.iter().map(|pid| fd3_inode(pid)).collect();
    assert_eq!(inodes.len(), 2, "{inodes:?}");
    assert!(inodes.is_subset(&listening_inodes()));
    assert_eq!(distinct_bodies(addr, 2, hello_pid), new);
    assert!(clusterd.stop().success());
}

/// Steered sockets keep the shared queue's promise: with every worker gone (killed, and
/// `restart = "never"`), a connection still waits (the last socket is kept) instead of being
/// refused, and the next worker answers it.
#[test]
fn a_steered_app_with_no_worker_left_queues_connections_for_the_next_one() {
    use std::io::{Read, Write};
    let mut clusterd = Clusterd::start(&hello_manifest(2, "restart = \"never\""));
    let addr = steered_addr(&clusterd, true);
    let pids = ready_pids(&clusterd, "web", 2);
    for pid in &pids {
        let pid = Pid::from_raw(pid.parse().expect("pid"));
        nix::sys::signal::kill(pid, Signal::SIGKILL).expect("kill -9 a worker");
    }
    let gone = wait_until(20 * SECOND, || {
        let status = clusterd.status();
        status["apps"][0]["workers"]
            .as_array()
            .is_some_and(|w| w.iter().all(|w| w["pid"].is_null()))
    });
    assert!(gone, "workers still there:\n{}", clusterd.output());
    let mut client = std::net::TcpStream::connect(addr).expect("queued, not refused");
    client
        .write_all(b"GET / HTTP/1.0\r\n\r\n")
        .expect("request");
    let output = clusterd.ctl(&["restart", "web:0"]);
    assert!(output.status.success(), "{output:?}");
    client.set_read_timeout(Some(30 * SECOND)).expect("timeout");
    let mut answer = String::new();
    client.read_to_string(&mut answer).expect("an answer");
    assert!(answer.contains("hello from web[0]"), "{answer}");
    assert!(clusterd.stop().success());
}

/// A Go server that serves the socket it inherited: `net.FileListener(os.NewFile(3, ...))`. It
/// never calls `listen()` and never says it is ready.
const GO_FD3_SERVER: &str = r#"package main

import (
	"fmt"
	"net"
	"net/http"
	"os"
)

func main() {
	l, err := net.FileListener(os.NewFile(3, os.Getenv("LISTEN_FDNAMES")))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	pid := os.Getpid()
	http.Serve(l, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%d\n", pid)
	}))
}
"#;

#[test]
fn a_go_server_on_net_file_listener_fd_3_is_intercepted_reloaded_and_killed() {
    let Some(server) = go_build(GO_FD3_SERVER) else {
        return;
    };
    let clusterd = Clusterd::start_with(
        r#"
[supervisor]
stop_timeout = "5s"

[sockets.http]
listen = "127.0.0.1:0"

[apps.go]
command = ["{dir}/server"]
workers = 2
sockets = ["http"]
intercept = true

[apps.go.reload]
bake = "0s"
"#,
        move |command| {
            let dir = command.get_current_dir().expect("the temp dir").to_owned();
            let path = dir.join("server");
            std::fs::write(&path, &server).expect("write the server");
            let mode = std::os::unix::fs::PermissionsExt::from_mode(0o755);
            std::fs::set_permissions(&path, mode).expect("chmod");
        },
    );
    takes_fd3_through_reload_and_kill(clusterd, "go", 2, true, |body| body.trim().to_owned());
}

#[test]
fn a_worker_that_inherits_fd_3_and_binds_the_address_gets_the_same_socket() {
    let mut clusterd = Clusterd::start_with_files(
        r#"
[sockets.http]
listen = "127.0.0.1:0"

[apps.both]
command = ["python3", "{dir}/both.py"]
workers = 2
sockets = ["http"]
intercept = true
"#,
        &[(
            "both.py",
            "import os, signal, socket\n\
             inherited = socket.socket(fileno=3)\n\
             listens = inherited.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)\n\
             port = inherited.getsockname()[1]\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n\
             s.bind(('0.0.0.0', port))\n\
             same = os.fstat(s.fileno()).st_ino == os.fstat(3).st_ino\n\
             print('names', os.environ['LISTEN_FDNAMES'], 'listening', listens,\n\
                   'fd3', inherited.getsockname()[0], 'bound', s.getsockname()[0],\n\
                   'same' if same else 'different', 'inode', os.fstat(3).st_ino, flush=True)\n\
             s.listen()\n\
             signal.pause()\n",
        )],
    );
    let lines = clusterd.wait_for_lines("names http", 2, 20 * SECOND);
    let mut inodes = BTreeSet::new();
    for line in &lines {
        let (_, rest) = line.split_once("names http ").expect("the line");
        let (what, inode) = rest.split_once(" inode ").expect("inode");
        assert_eq!(
            what, "listening 1 fd3 127.0.0.1 bound 127.0.0.1 same",
            "{line}"
        );
        inodes.insert(inode.to_owned());
    }
    // Each its own steered socket: the holder is one, and does not listen.
    assert_eq!(inodes.len(), 2, "{lines:?}");
    // Its first look at fd 3 (or its listen() on the socket) is the readiness signal.
    clusterd.wait_ready("both", 2, 20 * SECOND);
    assert_eq!(restarts(&clusterd, "both"), 0);
    assert!(clusterd.stop().success());
}

/// A worker's accepted connection, reported by a Python server handed fd 3: `nodelay <bool>`.
const NODELAY_PROBE: &str = "import socket\n\
     s = socket.socket(fileno=3)\n\
     c, _ = s.accept()\n\
     print('nodelay', c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0, flush=True)\n\
     c.close()\n";

/// What a worker's accepted connection says about `TCP_NODELAY` under `options` (extra lines of
/// `[sockets.http]`).
fn accepted_nodelay(options: &str) -> String {
    let mut clusterd = Clusterd::start_with_files(
        &format!(
            "[sockets.http]\nlisten = \"127.0.0.1:0\"\n{options}\n\
             [apps.probe]\ncommand = [\"python3\", \"{{dir}}/probe.py\"]\nsockets = [\"http\"]\n\
             restart = \"never\"\n"
        ),
        &[("probe.py", NODELAY_PROBE)],
    );
    let addr = clusterd.socket_addr("http");
    let _connection = std::net::TcpStream::connect(addr).expect("connect");
    let line = clusterd.wait_for_line("nodelay ", 20 * SECOND);
    assert!(clusterd.stop().success());
    line
}

#[test]
fn accepted_connections_have_tcp_nodelay_by_default_and_false_turns_it_off() {
    let line = accepted_nodelay("");
    assert!(line.ends_with("nodelay True"), "{line}");
    let line = accepted_nodelay("tcp_nodelay = false");
    assert!(line.ends_with("nodelay False"), "{line}");
}

/// `GET /` from source address `source` (bound before connect), `Connection: close`: the body.
fn get_from(source: std::net::IpAddr, addr: SocketAddr) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect_timeout(&addr.into(), 5 * SECOND)?;
    let mut stream: std::net::TcpStream = socket.into();
    stream.set_read_timeout(Some(10 * SECOND))?;
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    match raw.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
        _ => Err(std::io::Error::other(format!("bad response: {raw:?}"))),
    }
}

/// For each client address 127.0.0.2 to 127.0.0.17, the pids that answered its `rounds`
/// requests.
fn pids_per_client(addr: SocketAddr, rounds: usize) -> Vec<BTreeSet<String>> {
    (2..=17u8)
        .map(|last| {
            let source = std::net::IpAddr::from([127, 0, 0, last]);
            (0..rounds)
                .map(|_| hello_pid(&get_from(source, addr).expect("an answer")))
                .collect()
        })
        .collect()
}

#[test]
fn ip_hash_sends_each_client_address_to_the_same_worker_across_requests_and_a_reload() {
    sticky("intercept = true");
}

#[test]
fn ip_hash_on_fd_3_without_intercept_sends_each_client_address_to_the_same_worker() {
    sticky("drain = \"1s\"");
}

/// Hello under 2 workers with `balance = "ip-hash"` and `steering` (the app's keys that steer
/// its socket): 16 client addresses each always reach one worker, both workers get clients,
/// before and after a rolling reload.
fn sticky(steering: &str) {
    let mut clusterd = Clusterd::start(&hello_manifest(
        2,
        &format!("{steering}\nbalance = \"ip-hash\"\n{NO_BAKE}"),
    ));
    let addr = steered_addr(&clusterd, true);
    for round in ["before", "after"] {
        let pids = ready_pids(&clusterd, "web", 2);
        let reached = pids_per_client(addr, 8);
        assert!(
            reached.iter().all(|p| p.len() == 1),
            "{round} the reload, a client reached several workers: {reached:?}"
        );
        let used: BTreeSet<String> = reached.into_iter().flatten().collect();
        assert_eq!(
            used, pids,
            "{round} the reload, not both workers got clients"
        );
        if round == "before" {
            let output = clusterd.ctl(&["reload", "--wait"]);
            assert!(output.status.success(), "{}", clusterd.output());
        }
    }
    assert_eq!(restarts(&clusterd, "web"), 0);
    assert!(clusterd.stop().success());
}
