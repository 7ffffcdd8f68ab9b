//! Unmodified servers (`intercept = true`): apps that bind their own port, run as several
//! workers on clusterd's held socket with no code change.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

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
fn distinct_bodies(
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
fn restarts(clusterd: &Clusterd, app: &str) -> u64 {
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
    clusterd.wait_for_lines("ready after", 2, 20 * SECOND);
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

/// The tutorial's `child.js`, byte for byte (CI has `../shared` beside the clone).
fn child_js() -> Option<Vec<u8>> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/mission-examples/child.js"
    );
    match std::fs::read(path) {
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
const CHILD_JS_PORT: u16 = 8001;

/// Starts `clusterd run ARGS...` in a new temp dir holding `files` (written byte for byte,
/// executable),
/// with its run dir where [`Clusterd::ctl`] looks for it (a manifest naming only `run_dir`).
fn start_run(args: &[&str], files: &[(&str, &[u8])]) -> Clusterd {
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
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(usize, Vec<String>)>>,
}

impl Load {
    fn with_clients(addr: SocketAddr, clients: usize) -> Load {
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
    fn finish(self) -> (usize, Vec<String>) {
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
    clusterd.wait_for_lines("ready after", 2, 20 * SECOND);
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
[sockets.http]
listen = "127.0.0.1:{port}"

[apps.slow]
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
    let ready = clusterd.wait_for_line("(generation 1) ready after", 20 * SECOND);
    assert!(ready.ends_with("s") && !ready.ends_with("ms"), "{ready}");

    let started = std::time::Instant::now();
    let output = clusterd.ctl(&["reload", "--wait"]);
    assert!(output.status.success());
    assert!(
        started.elapsed() >= SECOND,
        "the reload did not wait for the listen: {:?}",
        started.elapsed()
    );
    let ready = clusterd.wait_for_line("(generation 2) ready after", SECOND);
    assert!(ready.ends_with("s") && !ready.ends_with("ms"), "{ready}");
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
const GO_SERVER: &str = r#"package main

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

#[test]
fn a_static_go_binary_binding_its_own_port_runs_as_three_workers() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("main.go"), GO_SERVER).expect("write main.go");
    let built = Command::new("go")
        .args(["build", "-o", "server", "main.go"])
        .current_dir(dir.path())
        .env("CGO_ENABLED", "0")
        .env("GO111MODULE", "off")
        .output();
    let built = match built {
        Err(error) => {
            crate::util::require(&format!("cannot run `go` ({error}); CI installs golang-go"));
            return;
        }
        Ok(built) => built,
    };
    assert!(
        built.status.success(),
        "go build: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let server = std::fs::read(dir.path().join("server")).expect("the built server");
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
    clusterd.wait_for_lines("ready after", 3, 30 * SECOND);
    let pids = distinct_bodies(listen.parse().expect("addr"), 3, |b| b.trim().to_owned());
    assert_eq!(pids.len(), 3, "{pids:?}");
    assert!(clusterd.stop().success());
}
