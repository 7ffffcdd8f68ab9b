//! Unmodified servers (`intercept = true`): apps that bind their own port, run as several
//! workers on clusterd's held socket with no code change.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use crate::util::{Clusterd, http_get, wait_until};

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
    // http.server answers with its own pid nowhere, but both workers log their requests.
    assert!(
        wait_until(20 * SECOND, || {
            let _ = http_get(addr, "/index.html");
            clusterd.count("py[0] 127.0.0.1") > 0 && clusterd.count("py[1] 127.0.0.1") > 0
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
            eprintln!("SKIPPED: {path} is not there ({error}): the tutorial's child.js is needed");
            None
        }
    }
}

/// The port child.js hard-codes; the test fails (it cannot rewrite the file) when it is taken.
const CHILD_JS_PORT: u16 = 8001;

#[test]
fn the_tutorials_child_js_runs_unmodified_as_two_workers() {
    let Some(script) = child_js() else { return };
    assert!(
        TcpListener::bind(("127.0.0.1", CHILD_JS_PORT)).is_ok(),
        "port {CHILD_JS_PORT} (hard-coded in child.js) is taken on this machine: free it to run \
         this test"
    );
    let mut clusterd = Clusterd::start_with(
        &format!(
            r#"
[sockets.http]
listen = "127.0.0.1:{CHILD_JS_PORT}"

[apps.node]
command = ["node", "child.js"]
workers = 2
sockets = ["http"]
intercept = true
"#
        ),
        |command| {
            let dir = command.get_current_dir().expect("the temp dir");
            std::fs::write(dir.join("child.js"), &script).expect("copy child.js");
        },
    );
    let addr: SocketAddr = format!("127.0.0.1:{CHILD_JS_PORT}").parse().expect("addr");
    clusterd.wait_for_lines("ready after", 2, 20 * SECOND);
    let pids = distinct_bodies(addr, 2, |body| body.trim().to_owned());
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert_eq!(restarts(&clusterd, "node"), 0);
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
