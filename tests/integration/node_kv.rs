//! examples/node-kv (Node workers on the clusterd-kv Node binding) under clusterd against a
//! real Redis cluster: the routes, exactly one tend owner among four workers (per the kernel's
//! lock table and the addon's stats), only the owner sending topology commands (per the Redis
//! servers' own counters), a `kill -9` of the owner handing the lock over while requests keep
//! succeeding, and no segment left after clusterd stops.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use redis_cluster_fixture::RedisCluster;

use crate::kv::http;
use crate::util::{Clusterd, alive, clusterd_bin, wait_until};

const SECOND: Duration = Duration::from_secs(1);
const PREFIX: &str = "nodekvit";
const WORKERS: usize = 4;

/// The addon built with this profile, beside the clusterd binary.
fn addon() -> PathBuf {
    let path = clusterd_bin().with_file_name("libclusterd_kv_node.so");
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (`cargo build --workspace`)",
        path.display()
    );
    path
}

/// clusterd running examples/node-kv/server.js as 4 workers, all ready. `REDIS_CLUSTER` and
/// `CLUSTERD_KV_DIR` come from clusterd's environment, as the example's README has it.
fn start(cluster: &RedisCluster, segments: &Path, tend_interval_ms: u32) -> Clusterd {
    let server = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/node-kv/server.js");
    let manifest = format!(
        r#"
[supervisor]
stop_timeout = "10s"
log_format = "json"

[sockets.http]
listen = "127.0.0.1:0"

[apps.kv]
command = ["node", "{server}"]
log_format = "text"
workers = {WORKERS}
sockets = ["http"]
ready = "notify"
ready_timeout = "30s"
kv_segment = "{PREFIX}"
env = {{ KV_TEND_INTERVAL_MS = "{tend_interval_ms}" }}
"#,
        server = server.display(),
    );
    let seeds = cluster.seeds();
    let clusterd = Clusterd::start_with(&manifest, |cmd| {
        cmd.env("REDIS_CLUSTER", &seeds)
            .env("CLUSTERD_KV_DIR", segments)
            .env("CLUSTERD_KV_NODE_ADDON", addon());
    });
    clusterd.wait_ready("kv", WORKERS as u64, 60 * SECOND);
    clusterd
}

/// The tend owner according to the kernel's lock table on the segment's lock file.
fn lock_holder(segments: &Path) -> Option<i32> {
    crate::kv::lock_holder_of(segments, PREFIX)
}

/// `/_kv/stats` of every worker, by pid: asks until each of `WORKERS` pids has answered.
fn all_stats(addr: SocketAddr) -> BTreeMap<i64, serde_json::Value> {
    let mut seen = BTreeMap::new();
    for _ in 0..2000 {
        let (status, body) = http(addr, "GET", "/_kv/stats", "");
        assert_eq!(status, 200, "{body}");
        let stats: serde_json::Value = serde_json::from_str(&body).expect("stats JSON");
        seen.insert(stats["pid"].as_i64().expect("pid"), stats);
        if seen.len() == WORKERS {
            return seen;
        }
    }
    panic!("not every worker answered: {seen:?}");
}

/// `CLUSTER SHARDS` + `CLUSTER SLOTS` calls the Redis servers have counted, summed.
fn topology_calls(cluster: &RedisCluster) -> u64 {
    (0..cluster.len())
        .map(|node| {
            let info = cluster.cli(node, &["INFO", "commandstats"]).expect("INFO");
            info.lines()
                .filter(|l| {
                    l.starts_with("cmdstat_cluster|shards:")
                        || l.starts_with("cmdstat_cluster|slots:")
                })
                .filter_map(|l| {
                    l.split("calls=")
                        .nth(1)?
                        .split(',')
                        .next()?
                        .parse::<u64>()
                        .ok()
                })
                .sum::<u64>()
        })
        .sum()
}

#[test]
fn node_kv_one_owner_tends_for_four_workers_and_a_stop_leaves_no_segment() {
    let cluster = RedisCluster::start(3).expect("redis cluster");
    let segments = tempfile::tempdir().expect("temp dir");
    // A 100 ms tend interval: the owner reads the topology ten times a second.
    let mut clusterd = start(&cluster, segments.path(), 100);
    let addr = clusterd.socket_addr("http");

    // The routes and status codes of examples/kv-http.
    assert_eq!(
        http(addr, "POST", "/user:1", r#"{"name":"ada"}"#),
        (201, "{\"stored\":\"user:1\"}\n".to_owned())
    );
    assert_eq!(
        http(addr, "GET", "/user:1", ""),
        (200, r#"{"name":"ada"}"#.to_owned())
    );
    assert_eq!(http(addr, "GET", "/user:2", "").0, 404);
    assert_eq!(http(addr, "POST", "/user:2", "{oops").0, 400);
    assert_eq!(http(addr, "POST", "/user:2", &"[".repeat(1 << 21)).0, 413);
    assert_eq!(http(addr, "PUT", "/user:1", "{}").0, 405);
    assert_eq!(http(addr, "GET", "/_kv/other", "").0, 400);
    assert_eq!(http(addr, "GET", "/", "").0, 200);

    let owner = lock_holder(segments.path()).expect("a tend owner");
    let before = all_stats(addr);
    let calls_before = topology_calls(&cluster);
    // A window, with requests, that lasts until the owner has tended three times (however
    // long a loaded machine takes).
    let topology = |s: &serde_json::Value| s["topology_commands"].as_u64().expect("count");
    let owned = i64::from(owner);
    let (mut calls_after, mut after) = (0, BTreeMap::new());
    let mut requests = 0;
    assert!(
        wait_until(30 * SECOND, || {
            assert_eq!(
                http(addr, "GET", "/user:1", "").0,
                200,
                "request {requests}"
            );
            requests += 1;
            calls_after = topology_calls(&cluster);
            after = all_stats(addr);
            after
                .get(&owned)
                .is_some_and(|s| topology(s) >= topology(&before[&owned]) + 3)
        }),
        "the owner did not tend three times"
    );

    // Exactly one owner, the lock holder, and every worker names it.
    for stats in before.values().chain(after.values()) {
        assert_eq!(stats["owner_pid"], owner, "{stats}");
        let expected = if stats["pid"] == owner {
            "owner"
        } else {
            "follower"
        };
        assert_eq!(stats["role"], expected, "{stats}");
    }
    // Followers never sent a topology command, so everything the servers counted in the
    // window came from the owner.
    for (pid, stats) in &after {
        if *pid != i64::from(owner) {
            assert_eq!(topology(stats), 0, "a follower read the topology: {stats}");
        }
    }
    let owner_sent = topology(&after[&owned]) - topology(&before[&owned]);
    let servers_counted = calls_after - calls_before;
    // (+1: a command counted by the owner just before the first snapshot may reach the
    // servers just after it.)
    assert!(
        servers_counted >= 1 && servers_counted <= owner_sent + 1,
        "servers counted {servers_counted} topology commands, the owner sent {owner_sent}"
    );

    assert!(clusterd.stop().success());
    assert_eq!(
        clusterd
            .events("stopped")
            .iter()
            .filter(|e| e["status"] == "status 0")
            .count(),
        WORKERS,
        "{}",
        clusterd.output()
    );
    assert_eq!(
        clusterd.count("KV client closed"),
        WORKERS,
        "{}",
        clusterd.output()
    );
    let left: Vec<_> = std::fs::read_dir(segments.path())
        .expect("read dir")
        .collect();
    assert!(left.is_empty(), "segment or lock file left: {left:?}");
}

#[test]
fn node_kv_a_killed_owner_hands_the_lock_over_and_requests_keep_succeeding() {
    let cluster = RedisCluster::start(3).expect("redis cluster");
    let segments = tempfile::tempdir().expect("temp dir");
    // A 30 s tend interval: no poll can be what notices the owner's death.
    let mut clusterd = start(&cluster, segments.path(), 30_000);
    let addr = clusterd.socket_addr("http");
    assert_eq!(http(addr, "POST", "/k", "[1,2,3]").0, 201);
    let first = lock_holder(segments.path()).expect("a tend owner");

    kill(Pid::from_raw(first), Signal::SIGKILL).expect("kill the owner");
    let mut next = None;
    assert!(wait_until(5 * SECOND, || {
        next = lock_holder(segments.path());
        next.is_some_and(|pid| pid != first)
    }));
    let next = next.expect("new owner");
    assert!(alive(Pid::from_raw(next)));
    for i in 0..20 {
        assert_eq!(
            http(addr, "GET", "/k", ""),
            (200, "[1,2,3]".to_owned()),
            "request {i} after the kill"
        );
    }
    // clusterd replaces the dead worker; the newcomer follows the new owner.
    assert!(
        wait_until(60 * SECOND, || clusterd.events("ready").len() > WORKERS),
        "{}",
        clusterd.output()
    );
    let stats = all_stats(addr);
    assert!(!stats.contains_key(&i64::from(first)));
    let owners: Vec<_> = stats.values().filter(|s| s["role"] == "owner").collect();
    assert_eq!(owners.len(), 1, "{stats:?}");
    assert_eq!(owners[0]["pid"], next);
    assert_eq!(owners[0]["takeovers"], 1);
    assert!(stats.values().all(|s| s["owner_pid"] == next), "{stats:?}");
    assert_eq!(http(addr, "POST", "/k2", "true").0, 201);

    assert!(clusterd.stop().success());
    assert!(
        clusterd_kv::tend_owners(segments.path(), PREFIX)
            .expect("read segments")
            .is_empty()
    );
}
