//! kv-http under clusterd against a real Redis cluster: the workers share one tend segment,
//! `clusterd status` names the tend owner, a killed owner is replaced at once (no poll: the
//! tend interval is 30 s), a rolling reload moves ownership to the new generation, and a
//! graceful stop closes every worker's KV client and removes the segment.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use redis_cluster_fixture::RedisCluster;

use crate::util::{Clusterd, alive, example_bin, http_get, wait_until};

const SECOND: Duration = Duration::from_secs(1);
const PREFIX: &str = "kvit";

fn start(cluster: &RedisCluster, segments: &Path, workers: usize) -> Clusterd {
    start_with(cluster, segments, workers, 30_000, "")
}

/// [`start`] with a tend interval and extra lines for the app's table.
fn start_with(
    cluster: &RedisCluster,
    segments: &Path,
    workers: usize,
    tend_interval_ms: u64,
    extra: &str,
) -> Clusterd {
    let manifest = format!(
        r#"
[supervisor]
stop_timeout = "10s"
log_format = "json"

[sockets.http]
listen = "127.0.0.1:0"

[apps.kv]
command = ["{kv_http}"]
log_format = "text"
workers = {workers}
sockets = ["http"]
ready = "notify"
ready_timeout = "20s"
kv_segment = "{PREFIX}"
env = {{ REDIS_CLUSTER = "{seeds}", KV_TEND_INTERVAL_MS = "{tend_interval_ms}" }}
{extra}
"#,
        kv_http = example_bin("kv-http").display(),
        seeds = cluster.seeds(),
    );
    let clusterd = Clusterd::start_with(&manifest, |cmd| {
        cmd.env("CLUSTERD_KV_DIR", segments);
    });
    clusterd.wait_ready("kv", workers as u64, 30 * SECOND);
    clusterd
}

/// The tend owner as `clusterd status` reports it, checked against the per-worker flags.
fn status_owner(clusterd: &Clusterd) -> Option<i64> {
    let status = clusterd.status();
    let app = &status["apps"][0];
    let owner = app["tend_owner"].as_i64();
    let flagged: Vec<i64> = app["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter(|w| w["tend_owner"] == true)
        .filter_map(|w| w["pid"].as_i64())
        .collect();
    match owner {
        Some(pid) => assert_eq!(flagged, [pid], "status: {status}"),
        None => assert!(flagged.is_empty(), "status: {status}"),
    }
    owner
}

/// The owner according to the kernel's lock table, through the crate's inspection API.
fn lock_holder(segments: &Path) -> Option<i32> {
    lock_holder_of(segments, PREFIX)
}

/// The tend owner of the segments named `prefix` in `segments`, from the kernel's lock table
/// on the segment's lock file (at most one).
pub(crate) fn lock_holder_of(segments: &Path, prefix: &str) -> Option<i32> {
    let owners = clusterd_kv::tend_owners(segments, prefix).expect("read segments");
    assert!(owners.len() <= 1, "{owners:?}");
    owners.first().and_then(|o| o.lock_pid)
}

/// One request on a fresh connection: (status, body).
pub(crate) fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, 5 * SECOND).expect("connect");
    stream.set_read_timeout(Some(10 * SECOND)).expect("timeout");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: kv\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).expect("read");
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad response {raw:?}"));
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

#[test]
fn kv_http_status_names_the_tend_owner_and_a_stop_closes_every_client() {
    let cluster = RedisCluster::start(3).expect("redis cluster");
    let segments = tempfile::tempdir().expect("temp dir");
    let mut clusterd = start(&cluster, segments.path(), 3);
    let addr = clusterd.socket_addr("http");

    let mut owner = None;
    assert!(wait_until(10 * SECOND, || {
        owner = status_owner(&clusterd);
        owner.is_some()
    }));
    let owner = owner.expect("owner");
    assert_eq!(lock_holder(segments.path()), Some(owner as i32));

    assert_eq!(http(addr, "POST", "/user:1", r#"{"name":"ada"}"#).0, 201);
    for _ in 0..20 {
        assert_eq!(
            http(addr, "GET", "/user:1", ""),
            (200, r#"{"name":"ada"}"#.to_owned())
        );
    }
    // Whichever worker answers, it names the same owner.
    for _ in 0..10 {
        let stats = http_get(addr, "/_kv/stats").expect("stats");
        let stats: serde_json::Value = serde_json::from_str(&stats.body).expect("JSON");
        assert_eq!(stats["owner_pid"], owner, "{stats}");
        let expected = if stats["pid"] == owner {
            "owner"
        } else {
            "follower"
        };
        assert_eq!(stats["role"], expected, "{stats}");
    }

    assert!(clusterd.stop().success());
    // Every worker went through its clean exit (drain, close hooks, exit 0), and the last
    // client out removed the segment (workers that died without closing would leave it).
    assert_eq!(
        clusterd
            .events("stopped")
            .iter()
            .filter(|e| e["status"] == "status 0")
            .count(),
        3,
        "{}",
        clusterd.output()
    );
    let left: Vec<_> = std::fs::read_dir(segments.path())
        .expect("read dir")
        .collect();
    assert!(left.is_empty(), "segment or lock file left: {left:?}");
}

#[test]
fn kv_http_a_killed_owner_is_replaced_at_once_and_its_slot_restarted() {
    let cluster = RedisCluster::start(3).expect("redis cluster");
    let segments = tempfile::tempdir().expect("temp dir");
    let mut clusterd = start(&cluster, segments.path(), 3);
    let addr = clusterd.socket_addr("http");
    assert_eq!(http(addr, "POST", "/k", "[1,2,3]").0, 201);
    let mut first = None;
    assert!(wait_until(10 * SECOND, || {
        first = status_owner(&clusterd);
        first.is_some()
    }));
    let first = Pid::from_raw(first.expect("owner") as i32);

    kill(first, Signal::SIGKILL).expect("kill the owner");
    // A follower takes the lock as soon as the kernel releases it; the 30 s tend interval
    // rules out any poll.
    let mut next = None;
    assert!(wait_until(5 * SECOND, || {
        next = lock_holder(segments.path());
        next.is_some_and(|pid| pid != first.as_raw())
    }));
    let next = next.expect("new owner");
    assert!(alive(Pid::from_raw(next)));
    // clusterd replaces the dead worker; the newcomer follows.
    assert!(
        wait_until(30 * SECOND, || clusterd.events("ready").len() >= 4),
        "{}",
        clusterd.output()
    );
    assert!(wait_until(10 * SECOND, || status_owner(&clusterd)
        == Some(i64::from(next))));
    for _ in 0..10 {
        assert_eq!(http(addr, "GET", "/k", ""), (200, "[1,2,3]".to_owned()));
    }
    assert!(clusterd.stop().success());
    assert!(
        clusterd_kv::tend_owners(segments.path(), PREFIX)
            .expect("read segments")
            .is_empty()
    );
}

#[test]
fn kv_http_a_rolling_reload_hands_ownership_to_the_new_generation() {
    let cluster = RedisCluster::start(3).expect("redis cluster");
    let segments = tempfile::tempdir().expect("temp dir");
    let mut clusterd = start(&cluster, segments.path(), 2);
    let addr = clusterd.socket_addr("http");
    assert_eq!(http(addr, "POST", "/r", r#""kept""#).0, 201);

    let output = clusterd.ctl(&["reload"]);
    assert!(
        output.status.success(),
        "reload: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(wait_until(30 * SECOND, || {
        let serving = clusterd.serving("kv");
        serving.len() == 2 && serving.iter().all(|w| w.2 == 2)
    }));
    let serving: Vec<i64> = clusterd
        .serving("kv")
        .iter()
        .map(|w| i64::from(w.1.as_raw()))
        .collect();
    let mut owner = None;
    assert!(wait_until(10 * SECOND, || {
        owner = status_owner(&clusterd);
        owner.is_some_and(|pid| serving.contains(&pid))
    }));
    let info = &clusterd_kv::tend_owners(segments.path(), PREFIX).expect("segments")[0];
    assert!(info.owner_epoch >= 2, "ownership moved: {info:?}");
    assert_eq!(http(addr, "GET", "/r", ""), (200, r#""kept""#.to_owned()));
    assert!(clusterd.stop().success());
}

#[test]
fn kv_http_an_owner_that_stops_tending_is_restarted_by_kv_watchdog() {
    let cluster = RedisCluster::start(3).expect("redis cluster");
    let segments = tempfile::tempdir().expect("temp dir");
    let mut clusterd = start_with(&cluster, segments.path(), 3, 200, "kv_watchdog = \"2s\"");
    let addr = clusterd.socket_addr("http");
    let mut owner = None;
    assert!(wait_until(10 * SECOND, || {
        owner = status_owner(&clusterd);
        owner.is_some()
    }));
    let owner = Pid::from_raw(owner.expect("owner") as i32);

    // A tending owner is left alone well past the watchdog period: status shows it, the
    // same process, 3 s old and heard from within the period.
    let mut status = serde_json::Value::Null;
    let owner_in = |status: &serde_json::Value| {
        status["apps"][0]["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .find(|w| w["pid"] == owner.as_raw())
            .cloned()
    };
    assert!(
        wait_until(20 * SECOND, || {
            status = clusterd.status();
            owner_in(&status)
                .is_some_and(|w| w["uptime_ms"].as_u64() >= Some(3000) && w["role"] == "serving")
        }),
        "the owner did not live 3 s: {status}"
    );
    assert!(
        status["apps"][0]["tend_heard_ms"].as_u64() < Some(2000),
        "{status}"
    );
    assert!(alive(owner));
    assert_eq!(status_owner(&clusterd), Some(i64::from(owner.as_raw())));

    // Stopped, it still holds the lock but no longer tends: clusterd restarts it, and the
    // lock moves to another worker.
    kill(owner, Signal::SIGSTOP).expect("SIGSTOP");
    clusterd.wait_event("kv_stale", 10 * SECOND, |e| e["app"] == "kv");
    let mut next = None;
    assert!(
        wait_until(20 * SECOND, || {
            next = status_owner(&clusterd).filter(|p| *p != i64::from(owner.as_raw()));
            next.is_some() && !alive(owner)
        }),
        "{}",
        clusterd.output()
    );
    assert_eq!(lock_holder(segments.path()), next.map(|p| p as i32));
    assert_eq!(http(addr, "POST", "/user:9", r#"{"name":"ada"}"#).0, 201);
    assert!(clusterd.stop().success());
}
