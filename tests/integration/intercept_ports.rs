//! Ports found by themselves: several workers and no declared socket (`clusterd run --workers 2
//! -- node child.js`, or a manifest with just `command` and `workers`) are intercepted by
//! default, and the port the app binds is bound by clusterd on the first worker's request and
//! shared, as Node's cluster primary does.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::intercept::{
    CHILD_JS_PORT, GO_SERVER, Load, child_js, distinct_bodies, free_port, go_build, restarts,
    start_run,
};
use crate::util::{Clusterd, app_in, wait_until};

const SECOND: Duration = Duration::from_secs(1);

/// The sockets status shows: (name, address, the app it was bound for on demand).
fn sockets(clusterd: &Clusterd) -> Vec<(String, String, Option<String>)> {
    clusterd.status()["sockets"]
        .as_array()
        .expect("sockets")
        .iter()
        .map(|s| {
            (
                s["name"].as_str().expect("name").to_owned(),
                s["address"].as_str().expect("address").to_owned(),
                s["app"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

/// Reloads under `clients` connections per second, `times` times; asserts that no request
/// failed.
fn reload_under_load(clusterd: &Clusterd, addr: SocketAddr, times: usize) {
    let load = Load::with_clients(addr, 4);
    for _ in 0..times {
        let output = clusterd.ctl(&["reload", "--wait"]);
        assert!(
            output.status.success(),
            "{}\nclusterd's output:\n{}",
            String::from_utf8_lossy(&output.stdout),
            clusterd.output()
        );
    }
    let (answered, failures) = load.finish();
    assert!(answered > 0);
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the reloads: {failures:?}",
        failures.len(),
        answered + failures.len()
    );
}

/// Whether something listens on `addr` (a fresh bind of it fails).
fn taken(addr: SocketAddr) -> bool {
    TcpListener::bind(addr).is_err()
}

#[test]
fn clusterd_run_serves_the_tutorials_child_js_on_its_own_port_through_reloads_and_an_upgrade() {
    let Some(script) = child_js() else { return };
    let addr: SocketAddr = format!("127.0.0.1:{CHILD_JS_PORT}").parse().expect("addr");
    // child.js hard-codes its port and reads no argument or variable to change it.
    if TcpListener::bind(("0.0.0.0", CHILD_JS_PORT)).is_err() {
        crate::util::skip(&format!(
            "port {CHILD_JS_PORT} (hard-coded in child.js) is taken on this machine"
        ));
        return;
    }
    let mut clusterd = start_run(
        &["--workers", "2", "--", "node", "child.js"],
        &[("child.js", &script)],
    );
    clusterd.wait_ready("node", 2, 30 * SECOND);
    let port = format!("port-{CHILD_JS_PORT}");
    let listed = sockets(&clusterd);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].0, port);
    assert_eq!(
        listed[0].1,
        format!("[::]:{CHILD_JS_PORT}"),
        "Node binds ::"
    );
    assert_eq!(listed[0].2.as_deref(), Some("node"));
    let pids = distinct_bodies(addr, 2, |body| body.trim().to_owned());
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert_eq!(restarts(&clusterd, "node"), 0);

    // The port outlives every worker: reloads under load fail no request.
    reload_under_load(&clusterd, addr, 2);
    // It crosses an upgrade (the workers and their sockets are kept), and serves on after.
    let upgrade = clusterd.ctl(&["upgrade"]);
    assert!(
        upgrade.status.success(),
        "{}{}",
        String::from_utf8_lossy(&upgrade.stdout),
        String::from_utf8_lossy(&upgrade.stderr)
    );
    assert_eq!(sockets(&clusterd), listed);
    reload_under_load(&clusterd, addr, 1);
    let pids = distinct_bodies(addr, 2, |body| body.trim().to_owned());
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert_eq!(restarts(&clusterd, "node"), 0);
    assert!(clusterd.stop().success());
    assert!(!taken(addr), "released at stop");
}

#[test]
fn a_static_go_server_binding_its_own_port_runs_as_two_workers_without_listen() {
    let Some(server) = go_build(GO_SERVER) else {
        return;
    };
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let mut clusterd = start_run(
        &["--workers", "2", "--", "./server", &port.to_string()],
        &[("server", &server)],
    );
    clusterd.wait_ready("server", 2, 30 * SECOND);
    let pids = distinct_bodies(addr, 2, |body| body.trim().to_owned());
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert_eq!(sockets(&clusterd)[0].0, format!("port-{port}"));
    reload_under_load(&clusterd, addr, 2);
    assert_eq!(restarts(&clusterd, "server"), 0);
    assert!(clusterd.stop().success());
}

#[test]
fn a_manifest_with_just_command_and_workers_serves_python_and_a_sighup_removing_it_frees_the_port()
{
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let manifest = format!(
        r#"
[supervisor]
log_format = "json"

[apps.py]
command = ["python3", "-m", "http.server", "--directory", "{{dir}}/www", "{port}"]
workers = 2
"#
    );
    let mut clusterd = Clusterd::start_with_files(&manifest, &[("www/index.html", "hello\n")]);
    clusterd.wait_ready("py", 2, 30 * SECOND);
    let bound = clusterd.wait_event("port_bound", 10 * SECOND, |e| e["app"] == "py");
    assert_eq!(bound["socket"], format!("port-{port}"));
    assert_eq!(sockets(&clusterd)[0].2.as_deref(), Some("py"));
    // Both workers serve (http.server logs each request on stderr).
    let served = |slot| {
        worker_said(&clusterd, "py", slot)
            .iter()
            .any(|l| l.contains("GET /index.html"))
    };
    assert!(
        wait_until(20 * SECOND, || {
            let _ = crate::util::http_get(addr, "/index.html");
            served(0) && served(1)
        }),
        "not both workers served:\n{}",
        clusterd.output()
    );
    reload_under_load(&clusterd, addr, 1);
    assert_eq!(restarts(&clusterd, "py"), 0);

    // SIGHUP without the app: its workers stop and clusterd closes the port.
    clusterd.rewrite_manifest(
        "[supervisor]\nlog_format = \"json\"\n\n[apps.other]\ncommand = [\"sleep\", \"3600\"]\n",
    );
    clusterd.signal(Signal::SIGHUP);
    assert!(
        clusterd.status_until(20 * SECOND, |s| {
            app_in(s, "py").is_none() && s["sockets"].as_array().is_some_and(|a| a.is_empty())
        }),
        "{:#}",
        clusterd.status()
    );
    assert!(wait_until(10 * SECOND, || !taken(addr)), "port {port} kept");
    assert!(clusterd.stop().success());
}

/// The README's shortest path, `clusterd run -w auto -- COMMAND`, for a server that binds its
/// own port: one worker per CPU, all serving that port (one bound by clusterd when there are
/// several), none restarted.
#[test]
fn clusterd_run_w_auto_runs_a_worker_per_cpu_on_the_port_the_app_binds() {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let port_arg = port.to_string();
    let mut clusterd = start_run(
        &[
            "-w",
            "auto",
            "--",
            "python3",
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port_arg,
        ],
        &[("index.html", b"hello\n")],
    );
    clusterd.wait_ready("python3", cpus, 30 * SECOND);
    // http.server logs each request on stderr: `python3[SLOT]! ... "GET /index.html ...`.
    let served = |slot| {
        let prefix = format!("python3[{slot}]");
        clusterd
            .output()
            .lines()
            .any(|l| l.contains(&prefix) && l.contains("GET /index.html"))
    };
    assert!(
        wait_until(30 * SECOND, || {
            let _ = crate::util::http_get(addr, "/index.html");
            (0..cpus).all(served)
        }),
        "not every one of the {cpus} workers served:\n{}",
        clusterd.output()
    );
    assert_eq!(restarts(&clusterd, "python3"), 0);
    // `clusterd status` from the same directory, with no manifest there, finds it.
    let status = std::process::Command::new(crate::util::clusterd_bin())
        .args(["status", "--json"])
        .current_dir(clusterd.dir.path())
        .output()
        .expect("clusterd status");
    assert!(status.status.success(), "{status:?}");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("JSON");
    assert_eq!(app_in(&status, "python3").expect("the app")["ready"], cpus);
    assert!(clusterd.stop().success());
    assert!(wait_until(10 * SECOND, || !taken(addr)), "port {port} kept");
}

/// Binds `HOST PORT [V6ONLY]` with the worker's own `bind()`, then answers `hi` to every
/// connection; prints `bound PORT` or `refused ERRNO` (and then only sleeps).
const BINDER: &str = r#"import errno, select, socket, sys, time
family = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
s = socket.socket(family)
if len(sys.argv) > 3:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(sys.argv[3]))
try:
    s.bind((sys.argv[1], int(sys.argv[2])))
except OSError as e:
    print('refused', errno.errorcode[e.errno], flush=True)
    time.sleep(3600)
s.listen()
print('bound', s.getsockname()[1], flush=True)
while True:
    select.select([s], [], [])
    try:
        c, _ = s.accept()
    except BlockingIOError:
        continue
    c.sendall(b'hi')
    c.close()
"#;

/// What worker `app[slot]` wrote (the messages of its JSON output lines).
fn worker_said(clusterd: &Clusterd, app: &str, slot: u64) -> Vec<String> {
    clusterd
        .output()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
        .filter(|v| v["app"] == app && v["slot"] == slot && v.get("stream").is_some())
        .filter(|v| v["stream"] == "stdout" || v["stream"] == "stderr")
        .filter_map(|v| v["message"].as_str().map(str::to_owned))
        .collect()
}

/// Whether `addr` answers `hi`.
fn says_hi(addr: &str) -> bool {
    use std::io::Read;
    let mut answer = String::new();
    TcpStream::connect(addr)
        .and_then(|mut s| s.read_to_string(&mut answer))
        .is_ok()
        && answer == "hi"
}

#[test]
fn ports_bound_on_demand_wildcards_conflicts_and_errors() {
    let [shared, held, v6only, dual, v4] = [(); 5].map(|_| free_port());
    let holder = TcpListener::bind(("127.0.0.1", held)).expect("hold a port");
    let app = |name: &str, args: &str| {
        format!(
            "[apps.{name}]\ncommand = [\"python3\", \"{{dir}}/binder.py\", {args}]\nworkers = 2\n"
        )
    };
    let manifest = [
        "[supervisor]\nlog_format = \"json\"\n".to_owned(),
        app("a", &format!("\"0.0.0.0\", \"{shared}\"")),
        app("b", &format!("\"0.0.0.0\", \"{shared}\"")),
        app("held", &format!("\"127.0.0.1\", \"{held}\"")),
        app("v6only", &format!("\"::\", \"{v6only}\", \"1\"")),
        app("dual", &format!("\"::\", \"{dual}\", \"0\"")),
        app("v4", &format!("\"0.0.0.0\", \"{v4}\"")),
        app("zero", "\"127.0.0.1\", \"0\""),
        // A worker that never listens (a queue consumer) is ready all the same.
        "[apps.queue]\ncommand = [\"sleep\", \"3600\"]\nworkers = 2\n".to_owned(),
    ]
    .join("\n");
    let mut clusterd = Clusterd::start_with_files(&manifest, &[("binder.py", BINDER)]);
    for name in ["a", "b", "held", "v6only", "dual", "v4", "zero", "queue"] {
        clusterd.wait_ready(name, 2, 30 * SECOND);
    }
    // Every worker has bound (or been refused) by now.
    for name in ["a", "b", "held", "v6only", "dual", "v4", "zero"] {
        for slot in 0..2 {
            let said = |l: &String| l.starts_with("bound ") || l.starts_with("refused ");
            assert!(
                wait_until(20 * SECOND, || worker_said(&clusterd, name, slot)
                    .iter()
                    .any(said)),
                "{name}[{slot}] neither bound nor was refused:\n{}",
                clusterd.output()
            );
        }
    }
    let listed = sockets(&clusterd);
    let owner = |address: &str| {
        listed
            .iter()
            .find(|(_, a, _)| a == address)
            .and_then(|(_, _, app)| app.clone())
    };
    // Two apps on one port: the first to bind it gets it, the other's binds fail.
    let first = owner(&format!("0.0.0.0:{shared}"))
        .unwrap_or_else(|| panic!("no socket for port {shared}: {listed:?}"));
    let second = if first == "a" { "b" } else { "a" };
    for slot in 0..2 {
        let bound = format!("bound {shared}");
        assert!(worker_said(&clusterd, &first, slot).contains(&bound));
        let refused = "refused EADDRINUSE".to_owned();
        assert!(worker_said(&clusterd, second, slot).contains(&refused));
    }
    let refused = clusterd.wait_event("port_refused", SECOND, |e| e["app"] == second);
    assert!(
        refused["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("bound for app {first}")),
        "{refused}"
    );
    // A port another process holds: EADDRINUSE, and the log names who holds it.
    assert!(worker_said(&clusterd, "held", 0).contains(&"refused EADDRINUSE".to_owned()));
    let refused = clusterd.wait_event("port_refused", SECOND, |e| e["app"] == "held");
    let me = format!("pid {} (", std::process::id());
    assert!(
        refused["reason"].as_str().unwrap().contains(&me),
        "{refused}"
    );
    drop(holder);
    // `::` with IPV6_V6ONLY: IPv6 only; without: IPv4 too; `0.0.0.0`: IPv4.
    assert_eq!(owner(&format!("[::]:{v6only}")).as_deref(), Some("v6only"));
    assert!(says_hi(&format!("[::1]:{v6only}")));
    assert!(
        !says_hi(&format!("127.0.0.1:{v6only}")),
        "v6only reached over IPv4"
    );
    assert_eq!(owner(&format!("[::]:{dual}")).as_deref(), Some("dual"));
    assert!(says_hi(&format!("127.0.0.1:{dual}")) && says_hi(&format!("[::1]:{dual}")));
    assert_eq!(owner(&format!("0.0.0.0:{v4}")).as_deref(), Some("v4"));
    assert!(says_hi(&format!("127.0.0.1:{v4}")));
    // Port 0 stays the worker's own: nothing is bound for it.
    assert!(
        listed
            .iter()
            .all(|(_, _, app)| app.as_deref() != Some("zero"))
    );
    assert_eq!(listed.len(), 4, "{listed:?}");
    for name in ["a", "b", "held", "v6only", "dual", "v4", "zero", "queue"] {
        assert_eq!(restarts(&clusterd, name), 0, "{name}");
    }
    assert!(clusterd.stop().success());
}
