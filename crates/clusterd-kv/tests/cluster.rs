//! Real processes against a real Redis cluster: several `clusterd-kv agent` processes share
//! one segment in a temp dir, and the tests check who tends, who routes where, and what
//! happens when the owner closes, dies, hangs, or the cluster reshards.

mod common;

use std::path::Path;
use std::time::Duration;

use clusterd_kv::{key_slot, monotonic_micros, tend_owners};
use common::{Agent, PREFIX, the_owner, wait_until};
use nix::sys::signal::Signal;
use redis_cluster_fixture::RedisCluster;

const WAIT: Duration = Duration::from_secs(10);

fn agents(cluster: &RedisCluster, dir: &Path, n: usize, extra: &[&str]) -> Vec<Agent> {
    (0..n)
        .map(|_| Agent::spawn(&cluster.seeds(), dir, extra))
        .collect()
}

fn topology_calls(cluster: &RedisCluster) -> u64 {
    cluster.total_command_calls("cluster|shards").unwrap()
        + cluster.total_command_calls("cluster|slots").unwrap()
}

#[test]
fn one_owner_everyone_routes_and_only_the_owner_reads_the_topology() {
    let cluster = RedisCluster::start(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A generous stale threshold: a starved owner on a busy machine must not make the
    // followers read the topology themselves.
    let extra = ["--interval-ms", "100", "--stale-after", "50"];
    let mut agents = agents(&cluster, dir.path(), 4, &extra);
    let owner = the_owner(&mut agents);

    // The kernel agrees on who holds the lock.
    let owners = tend_owners(dir.path(), PREFIX).unwrap();
    assert_eq!(owners.len(), 1, "{owners:?}");
    assert!(owners[0].lock_held);
    assert_eq!(owners[0].owner_pid, Some(agents[owner].pid as i32));
    assert_eq!(owners[0].lock_pid, Some(agents[owner].pid as i32));

    // Everybody routes correctly: each writes its own keys and reads everybody's.
    for (i, agent) in agents.iter_mut().enumerate() {
        assert_eq!(agent.cmd(&format!("fill a{i}- 300")), "ok 300");
    }
    for agent in agents.iter_mut() {
        for i in 0..4 {
            assert_eq!(agent.cmd(&format!("check a{i}- 300")), "ok 300");
        }
    }
    // The keys really live where the cluster says their slot is (a wrong node would have
    // answered MOVED), and every agent's map agrees with the cluster.
    for k in 0..30 {
        let key = format!("a0-{k}");
        let slot = cluster.keyslot(&key).unwrap();
        assert_eq!(slot, key_slot(key.as_bytes()));
        let node = cluster.slot_owner(0, slot).unwrap();
        assert_eq!(cluster.cli(node, &["GET", &key]).unwrap(), format!("v{k}"));
        let addr = cluster.addrs()[node].clone();
        for agent in agents.iter_mut() {
            assert_eq!(agent.cmd(&format!("route {key}")), format!("route {addr}"));
        }
    }
    for agent in agents.iter_mut() {
        assert_eq!(agent.stat("moved"), 0, "a stable map needs no redirection");
    }

    // Only the owner sends topology commands; the servers count exactly its commands. The
    // owner goes on tending while the counters are read, so each reading of the servers'
    // count is bracketed by two of the owner's: it lies between what the owner sent inside
    // and outside the brackets (give or take the one command in flight at each edge),
    // however long the machine makes each reading take.
    let outer_start = agents[owner].stat("topology_commands");
    cluster.reset_stats().unwrap();
    let inner_start = agents[owner].stat("topology_commands");
    wait_until("the owner tended 8 more rounds", WAIT, || {
        agents[owner].stat("topology_commands") >= inner_start + 8
    });
    let inner_end = agents[owner].stat("topology_commands");
    let served = topology_calls(&cluster);
    let outer_end = agents[owner].stat("topology_commands");
    let (least, most) = (inner_end - inner_start, outer_end - outer_start);
    assert!(
        served + 1 >= least && served <= most + 1,
        "servers saw {served} topology commands, the owner sent between {least} and {most}"
    );
    // An unchanged topology is not republished, so followers copied the map exactly once.
    assert_eq!(agents[owner].stat("generation"), 1);
    assert_eq!(agents[owner].stat("publishes"), 1);
    for (i, agent) in agents.iter_mut().enumerate() {
        if i != owner {
            assert_eq!(
                agent.stat("topology_commands"),
                0,
                "follower {i} read the topology"
            );
            assert_eq!(agent.role(), "follower");
            assert_eq!(agent.stat("snapshot_copies"), 1);
        }
    }
    for agent in agents.iter_mut() {
        agent.exit();
    }
    assert!(tend_owners(dir.path(), PREFIX).unwrap().is_empty());
}

#[test]
fn without_shared_memory_every_process_reads_the_topology() {
    let cluster = RedisCluster::start(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut agents = agents(
        &cluster,
        dir.path(),
        3,
        &["--interval-ms", "100", "--local"],
    );
    for agent in agents.iter_mut() {
        assert_eq!(agent.role(), "local");
        assert_eq!(agent.cmd("fill l- 50"), "ok 50");
    }
    for agent in agents.iter_mut() {
        wait_until("a local client tends", WAIT, || {
            agent.stat("topology_commands") >= 3
        });
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no segment"
    );
}

#[test]
fn graceful_close_hands_over_at_once_and_the_last_one_out_removes_the_segment() {
    let cluster = RedisCluster::start(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A long tend interval: nothing here may depend on a periodic poll.
    let mut agents = agents(&cluster, dir.path(), 3, &["--interval-ms", "30000"]);
    let owner = the_owner(&mut agents);
    let segment = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_none())
        .expect("segment file");
    assert!(clusterd_kv::lock_path(&segment).exists());

    let closed_at = monotonic_micros();
    assert_eq!(agents[owner].cmd("close"), "closed");
    assert_eq!(agents[owner].role(), "closed");
    let mut next = None;
    wait_until("a follower takes over", WAIT, || {
        let found = tend_owners(dir.path(), PREFIX).unwrap()[0].owner_pid;
        next = found;
        found.is_some()
    });
    let info = &tend_owners(dir.path(), PREFIX).unwrap()[0];
    assert_eq!(info.owner_epoch, 2);
    assert_ne!(next, Some(agents[owner].pid as i32));
    eprintln!(
        "takeover after graceful close: {} us",
        info.owner_since_us.saturating_sub(closed_at)
    );
    let new_owner = agents
        .iter()
        .position(|a| Some(a.pid as i32) == next)
        .expect("the new owner is one of ours");
    assert_eq!(agents[new_owner].role(), "owner");
    assert_eq!(agents[new_owner].cmd("fill g- 20"), "ok 20");
    assert!(
        agents[owner].cmd("get g-1").starts_with("error "),
        "closed client refuses"
    );

    // Close the rest while the processes stay alive: close alone must release everything.
    for (i, agent) in agents.iter_mut().enumerate() {
        if i != owner {
            assert_eq!(agent.cmd("close"), "closed");
        }
    }
    assert!(!segment.exists(), "the last client out removes the segment");
    assert!(!clusterd_kv::lock_path(&segment).exists());
    assert!(tend_owners(dir.path(), PREFIX).unwrap().is_empty());
    for agent in agents.iter_mut() {
        agent.exit();
    }
}

#[test]
fn kill_9_of_the_owner_hands_over_and_routing_goes_on() {
    let cluster = RedisCluster::start(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut agents = agents(&cluster, dir.path(), 3, &["--interval-ms", "30000"]);
    let owner = the_owner(&mut agents);
    let survivor = (owner + 1) % 3;
    assert_eq!(agents[survivor].cmd("fill k- 100"), "ok 100");

    let killed_at = monotonic_micros();
    agents[owner].kill9();
    let mut agents: Vec<Agent> = agents
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i != owner)
        .map(|(_, a)| a)
        .collect();
    wait_until("a survivor holds the lock", WAIT, || {
        tend_owners(dir.path(), PREFIX).unwrap()[0]
            .owner_pid
            .is_some()
    });
    let info = &tend_owners(dir.path(), PREFIX).unwrap()[0];
    eprintln!(
        "takeover after kill -9: {} us",
        info.owner_since_us.saturating_sub(killed_at)
    );
    let new_owner = the_owner(&mut agents);
    assert_eq!(info.lock_pid, Some(agents[new_owner].pid as i32));
    assert_eq!(info.owner_epoch, 2);
    let before = agents[new_owner].stat("topology_commands");
    assert!(before >= 1, "the new owner read the topology on takeover");
    for agent in agents.iter_mut() {
        assert_eq!(agent.cmd("check k- 100"), "ok 100");
        assert_eq!(agent.cmd("fill after- 20"), "ok 20");
    }
}

#[test]
fn after_resharding_one_moved_refreshes_the_map_for_every_process() {
    let cluster = RedisCluster::start(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // No periodic tend during the test: only the refresh request can update the owner.
    let mut agents = agents(&cluster, dir.path(), 4, &["--interval-ms", "60000"]);
    let owner = the_owner(&mut agents);
    let followers: Vec<usize> = (0..4).filter(|&i| i != owner).collect();
    let tag = "{reshard}";
    let slot = cluster.keyslot(tag.trim_matches(['{', '}'])).unwrap();
    assert_eq!(agents[owner].cmd(&format!("fill {tag}k 50")), "ok 50");
    let from = cluster.slot_owner(0, slot).unwrap();
    let to = (from + 1) % 3;
    let new_addr = cluster.addrs()[to].clone();
    let generation = agents[owner].stat("generation");

    cluster.move_slot(slot, to).unwrap();

    // The first follower to touch the slot gets one MOVED and asks the owner to refresh.
    let first = followers[0];
    assert_eq!(agents[first].cmd(&format!("check {tag}k 50")), "ok 50");
    assert_eq!(
        agents[first].stat("moved"),
        1,
        "later keys of the slot go direct"
    );
    assert!(agents[first].stat("refresh_requests") >= 1);
    wait_until("the owner publishes the new map", WAIT, || {
        agents[owner].stat("generation") > generation
    });
    // Every process now routes the slot to the new node without any redirection.
    for (i, agent) in agents.iter_mut().enumerate() {
        assert_eq!(
            agent.cmd(&format!("route {tag}k1")),
            format!("route {new_addr}")
        );
        assert_eq!(agent.cmd(&format!("check {tag}k 50")), "ok 50");
        if i != first {
            assert_eq!(agent.stat("moved"), 0, "agent {i} needed a redirection");
        }
    }
    for &i in &followers {
        assert_eq!(agents[i].stat("topology_commands"), 0);
    }
}

#[test]
fn ask_during_a_migration_is_followed() {
    let cluster = RedisCluster::start(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut agents = agents(&cluster, dir.path(), 2, &["--interval-ms", "60000"]);
    let owner = the_owner(&mut agents);
    let follower = 1 - owner;
    let slot = cluster.keyslot("ask").unwrap();
    let to = (cluster.slot_owner(0, slot).unwrap() + 1) % 3;
    let from = cluster.start_migration(slot, to).unwrap();

    // A new key of a migrating slot belongs to the importing node: the source says ASK.
    assert_eq!(agents[follower].cmd("set {ask}new fresh"), "ok");
    assert!(agents[follower].stat("ask") >= 1);
    assert_eq!(
        cluster
            .cli(to, &["CLUSTER", "COUNTKEYSINSLOT", &slot.to_string()])
            .unwrap(),
        "1",
        "the key was stored on the importing node"
    );
    assert_eq!(agents[follower].cmd("get {ask}new"), "value fresh");

    cluster.finish_migration(slot, from, to).unwrap();
    assert_eq!(agents[follower].cmd("get {ask}new"), "value fresh");
    assert_eq!(agents[owner].cmd("get {ask}new"), "value fresh");
}

#[test]
fn followers_of_a_hung_owner_refresh_on_their_own() {
    let cluster = RedisCluster::start(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut agents = agents(
        &cluster,
        dir.path(),
        3,
        &["--interval-ms", "100", "--stale-after", "3"],
    );
    let owner = the_owner(&mut agents);
    let followers: Vec<usize> = (0..3).filter(|&i| i != owner).collect();
    assert_eq!(agents[followers[0]].cmd("fill {hung}k 20"), "ok 20");
    let slot = cluster.keyslot("hung").unwrap();
    let to = (cluster.slot_owner(0, slot).unwrap() + 1) % 3;
    let new_addr = cluster.addrs()[to].clone();

    agents[owner].signal(Signal::SIGSTOP);
    cluster.move_slot(slot, to).unwrap();
    for &i in &followers {
        let agent = &mut agents[i];
        wait_until("a follower refreshes by itself", WAIT, || {
            agent.stat("self_refreshes") >= 1
                && agent.cmd("route {hung}k0") == format!("route {new_addr}")
        });
        assert_eq!(agent.cmd("check {hung}k 20"), "ok 20");
        assert_eq!(agent.role(), "follower", "a hung owner keeps the lock");
    }
    let info = &tend_owners(dir.path(), PREFIX).unwrap()[0];
    assert_eq!(info.owner_pid, Some(agents[owner].pid as i32));
    assert!(
        info.heartbeat_age.unwrap() >= Duration::from_secs(1),
        "{info:?}"
    );

    // Once the owner runs again, followers go back to its map.
    agents[owner].signal(Signal::SIGCONT);
    let owner_rounds = agents[owner].stat("refreshes");
    wait_until("the owner tends again", WAIT, || {
        agents[owner].stat("refreshes") >= owner_rounds + 3
    });
    let quiet: Vec<u64> = followers
        .iter()
        .map(|&i| agents[i].stat("self_refreshes"))
        .collect();
    let owner_rounds = agents[owner].stat("refreshes");
    wait_until("the owner tends 8 more rounds", WAIT, || {
        agents[owner].stat("refreshes") >= owner_rounds + 8
    });
    for (k, &i) in followers.iter().enumerate() {
        let extra = agents[i].stat("self_refreshes") - quiet[k];
        assert!(
            extra <= 1,
            "follower {i} kept refreshing by itself ({extra} more)"
        );
    }
}

#[test]
fn a_segment_left_by_crashed_processes_is_replaced() {
    let cluster = RedisCluster::start(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut first = agents(&cluster, dir.path(), 2, &["--interval-ms", "60000"]);
    for agent in first.iter_mut() {
        agent.kill9();
    }
    let stale = tend_owners(dir.path(), PREFIX).unwrap();
    assert_eq!(stale.len(), 1, "killed processes cannot clean up");
    assert!(!stale[0].lock_held);
    assert_eq!(stale[0].owner_pid, None, "a dead owner is not reported");

    let mut next = Agent::spawn(&cluster.seeds(), dir.path(), &["--interval-ms", "60000"]);
    assert_eq!(next.role(), "owner");
    assert_eq!(
        next.stat("owner_epoch"),
        1,
        "a fresh segment, not the stale one"
    );
    assert_eq!(next.cmd("fill s- 10"), "ok 10");
    next.exit();
    assert!(tend_owners(dir.path(), PREFIX).unwrap().is_empty());
}

/// Receives datagrams on `socket` until one satisfies `want` (or panics after `WAIT`).
fn receive_until(socket: &std::os::unix::net::UnixDatagram, want: impl Fn(&str) -> bool) -> String {
    socket.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 512];
    loop {
        let n = socket.recv(&mut buf).expect("a datagram in time");
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if want(&text) {
            return text;
        }
    }
}

#[test]
fn the_owner_tells_notify_socket_when_it_owns_tends_and_releases() {
    let cluster = RedisCluster::start(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    let env = [(clusterd_kv::ENV_NOTIFY_SOCKET, socket_path.as_os_str())];
    let segment_dir = dir.path().join("shm");
    std::fs::create_dir(&segment_dir).unwrap();
    let mut agent = Agent::spawn_with_env(
        &cluster.seeds(),
        &segment_dir,
        &["--interval-ms", "100"],
        &env,
    );
    assert_eq!(agent.role(), "owner");
    let first = receive_until(&notify, |t| t.contains("X_CLUSTERD_KV_TEND="));
    assert!(
        first.starts_with("X_CLUSTERD_KV_TEND=owner\nX_CLUSTERD_KV_SEGMENT=kvtest-"),
        "{first:?}"
    );
    // The heartbeat: once per tend round, so more follow.
    for _ in 0..3 {
        receive_until(&notify, |t| t.starts_with("X_CLUSTERD_KV_TEND=owner\n"));
    }
    assert_eq!(agent.cmd("close"), "closed");
    receive_until(&notify, |t| t.starts_with("X_CLUSTERD_KV_TEND=released\n"));
    agent.exit();
}
