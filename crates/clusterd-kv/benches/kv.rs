//! bench/kv: measures the shared-memory cluster map on a real three-master Redis cluster
//! started on loopback ports in a temp dir, and prints tables.
//!
//! - `takeover`: time from `kill -9` of the tend owner (and from a graceful `close()`) until
//!   another process holds the tend lock, from the kernel-stamped CLOCK_MONOTONIC times in
//!   the segment header (`owner_since_us`), over `KV_BENCH_TRIALS` trials (default 20).
//! - `topology`: topology commands per second the cluster serves (Redis `INFO
//!   commandstats`) with 8 client processes, with the shared map and without.
//! - `latency`: sequential GET latency through our client (owner, follower, no shared memory)
//!   against the `redis` crate's own cluster client, and the cost of one map lookup.
//!
//! Run it through `bench/kv/run.sh`, or `cargo bench -p clusterd-kv --bench kv -- [SECTION]`.
//! Every process it starts is killed on exit; everything is bounded in time.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use clusterd_kv::{KvClient, KvOptions, Role, monotonic_micros, tend_owners};
use common::{Agent, PREFIX, wait_until};
use redis::AsyncCommands;
use redis_cluster_fixture::RedisCluster;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted = |name: &str| args.is_empty() || args.iter().any(|a| a == name);
    let cluster = RedisCluster::start(3).expect("start a Redis cluster (needs redis-server)");
    println!(
        "Redis cluster: 3 masters on {} (redis-server {}), {} CPUs",
        cluster.seeds(),
        redis_version(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if wanted("takeover") {
        takeover(&cluster);
    }
    if wanted("topology") {
        topology(&cluster);
    }
    if wanted("latency") {
        latency(&cluster);
    }
}

fn redis_version() -> String {
    std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| {
            s.split_whitespace()
                .find(|w| w.starts_with("v="))
                .map(|w| w[2..].to_string())
        })
        .unwrap_or_else(|| "?".into())
}

/// Median and 95th percentile of `samples` (sorted in place).
fn median_p95(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.95))
}

fn takeover(cluster: &RedisCluster) {
    let trials: usize = std::env::var("KV_BENCH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().expect("temp dir");
    // A long tend interval: a takeover must not depend on any poll.
    let extra = ["--interval-ms", "30000"];
    let mut agents: Vec<Agent> = (0..4)
        .map(|_| Agent::spawn(&cluster.seeds(), dir.path(), &extra))
        .collect();
    let mut killed = Vec::new();
    let mut closed = Vec::new();
    for trial in 0..2 * trials {
        let graceful = trial % 2 == 1;
        let before = owner_info(dir.path());
        let owner = agents
            .iter()
            .position(|a| Some(a.pid as i32) == before.owner_pid)
            .expect("the owner is one of the agents");
        let started = monotonic_micros();
        if graceful {
            assert_eq!(agents[owner].cmd("close"), "closed");
        } else {
            agents[owner].kill9();
        }
        wait_until("another agent takes over", Duration::from_secs(10), || {
            let now = owner_info(dir.path());
            now.owner_epoch > before.owner_epoch && now.owner_pid.is_some()
        });
        let after = owner_info(dir.path());
        let micros = after.owner_since_us.saturating_sub(started) as f64;
        if graceful {
            closed.push(micros);
            agents[owner].exit();
        } else {
            killed.push(micros);
        }
        agents.remove(owner);
        agents.push(Agent::spawn(&cluster.seeds(), dir.path(), &extra));
    }
    let (km, kp) = median_p95(&mut killed);
    let (cm, cp) = median_p95(&mut closed);
    println!();
    println!("## Tend-lock takeover (4 processes, {trials} trials each)");
    println!();
    println!("| event | median | p95 | Aerospike shm default |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| owner killed (`kill -9`) | {} | {} | 30 s (`shm_takeover_threshold_sec`) |",
        us(km),
        us(kp)
    );
    println!("| owner `close()` | {} | {} | 30 s |", us(cm), us(cp));
    println!();
    println!("Measured from just before the kill/close to the new owner's lock acquisition, as");
    println!("stamped in the segment header (CLOCK_MONOTONIC); a `kill -9` includes the kernel");
    println!("tearing the process down.");
}

fn owner_info(dir: &Path) -> clusterd_kv::OwnerInfo {
    let mut owners = tend_owners(dir, PREFIX).expect("read segments");
    assert_eq!(owners.len(), 1, "{owners:?}");
    owners.remove(0)
}

fn us(micros: f64) -> String {
    if micros >= 1000.0 {
        format!("{:.2} ms", micros / 1000.0)
    } else {
        format!("{micros:.0} µs")
    }
}

fn topology(cluster: &RedisCluster) {
    const PROCESSES: usize = 8;
    const INTERVAL_MS: u64 = 100;
    const WINDOW: Duration = Duration::from_secs(5);
    println!();
    println!(
        "## Topology commands on the cluster ({PROCESSES} processes, tend interval {INTERVAL_MS} ms)"
    );
    println!();
    println!("| mode | processes reading the topology | topology commands/s (server side) |");
    println!("| --- | ---: | ---: |");
    for (mode, local) in [("shared memory", false), ("no shared memory", true)] {
        let dir = tempfile::tempdir().expect("temp dir");
        let interval = INTERVAL_MS.to_string();
        let mut extra = vec!["--interval-ms", interval.as_str(), "--stale-after", "20"];
        if local {
            extra.push("--local");
        }
        let mut agents: Vec<Agent> = (0..PROCESSES)
            .map(|_| Agent::spawn(&cluster.seeds(), dir.path(), &extra))
            .collect();
        cluster.reset_stats().expect("reset stats");
        let start = Instant::now();
        let deadline = start + WINDOW;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let calls = cluster.total_command_calls("cluster|shards").unwrap()
            + cluster.total_command_calls("cluster|slots").unwrap();
        let rate = calls as f64 / start.elapsed().as_secs_f64();
        let tending = agents
            .iter_mut()
            .map(|a| a.stat("topology_commands"))
            .filter(|&sent| sent > 0)
            .count();
        println!("| {mode} | {tending} | {rate:.1} |");
    }
    println!();
    println!(
        "One tend round is one `CLUSTER SHARDS`; the ideal is 1000/{INTERVAL_MS} per tending process."
    );
}

fn latency(cluster: &RedisCluster) {
    const KEYS: usize = 1000;
    const ROUNDS: usize = 5;
    const PER_ROUND: usize = 4000;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    runtime.block_on(async {
        let options = KvOptions::from_seed_list(&cluster.seeds())
            .segment_dir(dir.path())
            .segment_prefix(PREFIX);
        let owner = KvClient::connect(options.clone()).await.expect("owner");
        let follower = KvClient::connect(options.clone()).await.expect("follower");
        let local = KvClient::connect(options.shared_memory(false))
            .await
            .expect("local");
        assert_eq!(
            (owner.role(), follower.role(), local.role()),
            (Role::Owner, Role::Follower, Role::Local)
        );
        let baseline = redis::cluster::ClusterClient::new(
            cluster
                .addrs()
                .iter()
                .map(|a| format!("redis://{a}"))
                .collect::<Vec<_>>(),
        )
        .expect("cluster client")
        .get_async_connection()
        .await
        .expect("cluster connection");
        for i in 0..KEYS {
            owner
                .set(format!("bench:{i}"), format!("value-{i}"))
                .await
                .expect("set");
        }
        let mut samples: [Vec<f64>; 4] = Default::default();
        let names = [
            "redis crate ClusterClient (baseline)",
            "KvClient, tend owner",
            "KvClient, follower (shared map)",
            "KvClient, no shared memory",
        ];
        for round in 0..=ROUNDS {
            for (which, out) in samples.iter_mut().enumerate() {
                let mut conn = baseline.clone();
                for n in 0..PER_ROUND {
                    let key = format!("bench:{}", (n * 7 + round) % KEYS);
                    let t = Instant::now();
                    let value: Option<Vec<u8>> = match which {
                        0 => conn.get(&key).await.expect("baseline get"),
                        1 => owner.get(&key).await.expect("get"),
                        2 => follower.get(&key).await.expect("get"),
                        _ => local.get(&key).await.expect("get"),
                    };
                    let elapsed = t.elapsed().as_secs_f64() * 1e6;
                    assert!(value.is_some());
                    if round > 0 {
                        out.push(elapsed); // round 0 warms up connections and caches
                    }
                }
            }
        }
        let (base_median, _) = median_p95(&mut samples[0].clone());
        println!();
        println!(
            "## GET latency, sequential, {} GETs per client over {ROUNDS} interleaved rounds",
            ROUNDS * PER_ROUND
        );
        println!();
        println!("| client | median | p95 | median vs baseline |");
        println!("| --- | ---: | ---: | ---: |");
        for (name, s) in names.iter().zip(samples.iter_mut()) {
            let (median, p95) = median_p95(s);
            println!(
                "| {name} | {median:.1} µs | {p95:.1} µs | {:.3} |",
                median / base_median
            );
        }
        let keys: Vec<String> = (0..KEYS).map(|i| format!("bench:{i}")).collect();
        let lookups = 1_000_000;
        let t = Instant::now();
        let mut routed = 0usize;
        for n in 0..lookups {
            routed += follower.route(&keys[n % KEYS]).map_or(0, |a| a.len());
        }
        let per = t.elapsed().as_secs_f64() * 1e9 / lookups as f64;
        assert!(routed > 0);
        println!();
        println!(
            "One map lookup through the follower (generation check + slot + node): {per:.0} ns"
        );
        for client in [owner, follower, local] {
            client.close().await.expect("close");
        }
    });
}
