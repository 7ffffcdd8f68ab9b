//! The built `kv-http` binary against a real Redis cluster: real processes, real sockets,
//! real signals. Each test starts its own three-master cluster and its own workers (with
//! their segment in a temp dir), talks HTTP/1.1 to them, and kills whatever it started.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use redis_cluster_fixture::RedisCluster;

/// Every wait in these tests gives up after this long.
const DEADLINE: Duration = Duration::from_secs(20);
const PREFIX: &str = "kvhttp-test";

/// A running `kv-http` worker, killed and reaped on drop.
struct Worker {
    child: Child,
    stderr: mpsc::Receiver<String>,
    addr: String,
}

impl Worker {
    /// Starts a worker on its own loopback port and waits until it has connected to the KV
    /// cluster.
    fn spawn(seeds: &str, segment_dir: &Path, extra_env: &[(&str, &str)]) -> Worker {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kv-http"));
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy().into_owned();
            if key.starts_with("LISTEN_")
                || key.starts_with("CLUSTERD_")
                || key.starts_with("KV_")
                || key.starts_with("WATCHDOG_")
                || key == "NOTIFY_SOCKET"
            {
                cmd.env_remove(key);
            }
        }
        cmd.env("REDIS_CLUSTER", seeds)
            .env("KV_HTTP_ADDR", "127.0.0.1:0")
            .env("CLUSTERD_KV_DIR", segment_dir)
            .env("CLUSTERD_KV_SEGMENT", PREFIX)
            .envs(extra_env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn kv-http");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[kv-http] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut worker = Worker {
            child,
            stderr: rx,
            addr: String::new(),
        };
        let line = worker.log_line("listening on ");
        worker.addr = line.rsplit(' ').next().expect("address").to_owned();
        worker.log_line("kv client connected");
        worker
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits")
    }

    /// The next stderr line containing `needle`.
    fn log_line(&self, needle: &str) -> String {
        let start = Instant::now();
        loop {
            let left = DEADLINE.saturating_sub(start.elapsed());
            match self.stderr.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(err) => panic!("no log line with {needle:?} in time: {err}"),
            }
        }
    }

    fn sigterm(&self) {
        // SAFETY: signalling the child this test started and has not reaped.
        assert_eq!(unsafe { libc::kill(self.pid(), libc::SIGTERM) }, 0);
    }

    fn wait(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(start.elapsed() < DEADLINE, "kv-http did not exit in time");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        http(&self.addr, method, path, body)
    }

    fn stats(&self) -> serde_json::Value {
        let (status, body) = self.request("GET", "/_kv/stats", "");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("stats JSON")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One HTTP/1.1 request on a fresh connection; returns the status and the body.
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: kv\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad response {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn records_round_trip_with_the_documented_status_codes() {
    let cluster = RedisCluster::start(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let worker = Worker::spawn(&cluster.seeds(), dir.path(), &[]);

    let record = r#"{"name":"ada","langs":["rust"]}"#;
    let (status, body) = worker.request("POST", "/user:1", record);
    assert_eq!((status, body.trim()), (201, r#"{"stored":"user:1"}"#));
    assert_eq!(
        worker.request("GET", "/user:1", ""),
        (200, record.to_owned())
    );
    // The record really is in Redis, on the node that serves its slot.
    let node = cluster
        .slot_owner(0, cluster.keyslot("user:1").unwrap())
        .unwrap();
    assert_eq!(cluster.cli(node, &["GET", "user:1"]).unwrap(), record);

    let (status, body) = worker.request("GET", "/nobody", "");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no record"), "{body}");
    let (status, body) = worker.request("POST", "/user:2", "{not json");
    assert_eq!(status, 400);
    assert!(body.contains("invalid JSON"), "{body}");
    assert_eq!(
        worker.request("GET", "/user:2", "").0,
        404,
        "nothing stored"
    );
    assert_eq!(worker.request("PUT", "/user:1", record).0, 405);
    assert_eq!(worker.request("GET", "/_kv/reserved", "").0, 400);
    let stats = worker.stats();
    assert_eq!(stats["role"], "owner");
    assert_eq!(stats["pid"], worker.pid());
    assert!(stats["commands"].as_u64().unwrap() >= 4);
}

#[test]
fn workers_share_one_map_and_hand_over_when_stopped() {
    let cluster = RedisCluster::start(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut workers: Vec<Worker> = (0..3)
        .map(|_| {
            Worker::spawn(
                &cluster.seeds(),
                dir.path(),
                &[("KV_TEND_INTERVAL_MS", "30000")],
            )
        })
        .collect();
    let roles: Vec<String> = workers
        .iter()
        .map(|w| w.stats()["role"].as_str().unwrap().to_owned())
        .collect();
    let owner = roles.iter().position(|r| r == "owner").expect("an owner");
    assert_eq!(
        roles.iter().filter(|r| *r == "follower").count(),
        2,
        "{roles:?}"
    );

    for (i, w) in workers.iter().enumerate() {
        assert_eq!(
            w.request("POST", &format!("/rec{i}"), &format!("{{\"i\":{i}}}"))
                .0,
            201
        );
    }
    for w in &workers {
        for i in 0..3 {
            assert_eq!(
                w.request("GET", &format!("/rec{i}"), ""),
                (200, format!("{{\"i\":{i}}}"))
            );
        }
        assert_eq!(w.stats()["moved"], 0);
    }

    // Stopping the owner closes its client, and another worker takes over at once (the tend
    // interval is 30 s: no poll is involved).
    workers[owner].sigterm();
    assert!(workers[owner].wait().success());
    workers[owner].log_line("kv client closed (was owner)");
    let survivors: Vec<usize> = (0..3).filter(|&i| i != owner).collect();
    wait_until("a survivor becomes the owner", || {
        survivors
            .iter()
            .any(|&i| workers[i].stats()["role"] == "owner")
    });
    for &i in &survivors {
        assert_eq!(workers[i].request("GET", "/rec0", "").0, 200);
    }
    for &i in &survivors {
        workers[i].sigterm();
        assert!(workers[i].wait().success());
    }
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(
        left.is_empty(),
        "the last worker out removes the segment: {left:?}"
    );
}

#[test]
fn kv_failures_become_5xx_with_a_message() {
    let cluster = RedisCluster::start(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let worker = Worker::spawn(&cluster.seeds(), dir.path(), &[]);
    assert_eq!(worker.request("POST", "/k", "1").0, 201);
    drop(cluster); // the KV store goes away
    let (status, body) = worker.request("GET", "/k", "");
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("KV store"), "{body}");
    let (status, _) = worker.request("POST", "/k", "2");
    assert_eq!(status, 502);
}
