//! A real Redis cluster for tests and benches (dev-only).
//!
//! [`RedisCluster::start`] runs N `redis-server` processes in cluster mode on free loopback ports
//! inside a fresh temp dir, joins them with `redis-cli --cluster create`, waits until every node
//! reports `cluster_state:ok` and agrees on the slot map, and kills the servers (by pid) when
//! dropped. The servers get `PR_SET_PDEATHSIG`, so a test process that is killed outright does
//! not leave them behind either (keep the fixture on the thread that started it).
//!
//! Admin operations (slot moves, command statistics) go through the real `redis-cli`, so the
//! fixture needs nothing beyond the Debian packages `redis-server` and `redis-tools`.
#![warn(missing_docs)]

use std::collections::hash_map::RandomState;
use std::fs;
use std::hash::BuildHasher;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Number of hash slots in a Redis cluster.
pub const SLOTS: u16 = 16384;

/// Lowest client port handed out; cluster-bus ports are client port + 10000, and both stay
/// below Linux's default ephemeral range (32768..) so outgoing connections never take them.
const PORT_LOW: u16 = 12000;
/// One past the highest client port handed out.
const PORT_HIGH: u16 = 22000;
/// Offset of the cluster-bus port from the client port (fixed by Redis).
const BUS_OFFSET: u16 = 10000;
/// How long any one step (a server start, `--cluster create`, convergence) may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one `redis-cli` invocation may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(10);

/// A running Redis cluster of masters on 127.0.0.1; stopped when dropped.
pub struct RedisCluster {
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
}

/// One `redis-server` process of the cluster.
struct Node {
    port: u16,
    id: String,
    child: Child,
}

impl RedisCluster {
    /// Starts `masters` (at least 3, Redis's minimum) cluster-mode servers with no replicas,
    /// creates the cluster and waits until it is healthy and every node agrees on the slots.
    pub fn start(masters: usize) -> io::Result<Self> {
        if masters < 3 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a Redis cluster needs at least 3 masters, got {masters}"),
            ));
        }
        let dir = tempfile::Builder::new()
            .prefix("redis-cluster-")
            .tempdir()?;
        let mut cluster = RedisCluster {
            dir,
            nodes: Vec::new(),
        };
        cluster.spawn_nodes(masters)?;
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for addr in cluster.addrs() {
            create.arg(addr);
        }
        create.args(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = run(&mut create, cluster.dir.path(), STEP_TIMEOUT)?;
        if !out.contains("[OK] All 16384 slots covered") {
            return Err(io::Error::other(format!(
                "redis-cli --cluster create failed:\n{out}"
            )));
        }
        cluster.wait_converged()?;
        Ok(cluster)
    }

    /// `host:port` of every node, in node order.
    pub fn addrs(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect()
    }

    /// The seed list as `REDIS_CLUSTER` expects it: comma-separated `host:port`s.
    pub fn seeds(&self) -> String {
        self.addrs().join(",")
    }

    /// The client port of node `node`.
    pub fn port(&self, node: usize) -> u16 {
        self.nodes[node].port
    }

    /// The cluster node id of node `node`.
    pub fn node_id(&self, node: usize) -> &str {
        &self.nodes[node].id
    }

    /// Pids of the `redis-server` processes.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|n| n.child.id()).collect()
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: a cluster has at least 3 nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Runs `redis-cli -p PORT args...` against node `node` and returns its raw output
    /// (trailing newline removed); an error reply becomes an `Err`.
    pub fn cli(&self, node: usize, args: &[&str]) -> io::Result<String> {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-h", "127.0.0.1", "-p", &self.nodes[node].port.to_string()])
            .args(args);
        let out = run(&mut cmd, self.dir.path(), CLI_TIMEOUT)?;
        let out = out.trim_end_matches('\n').to_string();
        if is_error_reply(&out) {
            return Err(io::Error::other(format!(
                "redis-cli -p {} {}: {out}",
                self.nodes[node].port,
                args.join(" ")
            )));
        }
        Ok(out)
    }

    /// The slot of `key`, as the server computes it (`CLUSTER KEYSLOT`).
    pub fn keyslot(&self, key: &str) -> io::Result<u16> {
        parse_num(&self.cli(0, &["CLUSTER", "KEYSLOT", key])?)
    }

    /// Index of the node that owns `slot`, as node `viewer` sees it.
    pub fn slot_owner(&self, viewer: usize, slot: u16) -> io::Result<usize> {
        let map = self.slot_map(viewer)?;
        let port = map[slot as usize].ok_or_else(|| {
            io::Error::other(format!("slot {slot} is unassigned in node {viewer}'s view"))
        })?;
        self.index_of_port(port)
    }

    /// The slot -> owner port table as node `viewer` sees it (from `CLUSTER NODES`).
    pub fn slot_map(&self, viewer: usize) -> io::Result<Vec<Option<u16>>> {
        parse_cluster_nodes(&self.cli(viewer, &["CLUSTER", "NODES"])?)
    }

    /// Starts migrating `slot` to node `to` (`IMPORTING` on the target, `MIGRATING` on the
    /// source) without moving keys: until [`finish_migration`](Self::finish_migration), the
    /// source answers `ASK` for keys of the slot it no longer holds.
    pub fn start_migration(&self, slot: u16, to: usize) -> io::Result<usize> {
        let from = self.slot_owner(0, slot)?;
        if from == to {
            return Ok(from);
        }
        let slot_s = slot.to_string();
        self.cli(
            to,
            &[
                "CLUSTER",
                "SETSLOT",
                &slot_s,
                "IMPORTING",
                self.node_id(from),
            ],
        )?;
        self.cli(
            from,
            &["CLUSTER", "SETSLOT", &slot_s, "MIGRATING", self.node_id(to)],
        )?;
        Ok(from)
    }

    /// Moves the keys of `slot` from node `from` to node `to` with `MIGRATE` and assigns the
    /// slot to `to` on every node (target first, then source, then the others).
    pub fn finish_migration(&self, slot: u16, from: usize, to: usize) -> io::Result<()> {
        let slot_s = slot.to_string();
        let to_port = self.nodes[to].port.to_string();
        if from != to {
            loop {
                let keys = self.cli(from, &["CLUSTER", "GETKEYSINSLOT", &slot_s, "100"])?;
                let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
                if keys.is_empty() {
                    break;
                }
                let mut args = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"];
                args.extend(keys);
                self.cli(from, &args)?;
            }
        }
        let mut order = vec![to, from];
        order.extend((0..self.nodes.len()).filter(|&i| i != to && i != from));
        order.dedup();
        for node in order {
            self.cli(
                node,
                &["CLUSTER", "SETSLOT", &slot_s, "NODE", self.node_id(to)],
            )?;
        }
        self.wait_converged()
    }

    /// Moves `slot` (and its keys) to node `to`; a no-op when `to` already owns it.
    pub fn move_slot(&self, slot: u16, to: usize) -> io::Result<()> {
        let from = self.start_migration(slot, to)?;
        self.finish_migration(slot, from, to)
    }

    /// How many times node `node` ran `command` since the last [`reset_stats`](Self::reset_stats),
    /// from `INFO commandstats`; `command` is written as Redis lists it, e.g. `cluster|shards`.
    pub fn command_calls(&self, node: usize, command: &str) -> io::Result<u64> {
        let info = self.cli(node, &["INFO", "commandstats"])?;
        parse_command_calls(&info, command)
    }

    /// Sum of [`command_calls`](Self::command_calls) over all nodes.
    pub fn total_command_calls(&self, command: &str) -> io::Result<u64> {
        (0..self.nodes.len()).try_fold(0, |sum, n| Ok(sum + self.command_calls(n, command)?))
    }

    /// Resets the command statistics of every node (`CONFIG RESETSTAT`).
    pub fn reset_stats(&self) -> io::Result<()> {
        for node in 0..self.nodes.len() {
            self.cli(node, &["CONFIG", "RESETSTAT"])?;
        }
        Ok(())
    }

    /// Waits until every node reports `cluster_state:ok`, knows every other node, and all
    /// nodes agree on the owner of every slot.
    pub fn wait_converged(&self) -> io::Result<()> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let last = match self.converged() {
                Ok(true) => return Ok(()),
                Ok(false) => "nodes disagree or cluster_state is not ok".to_string(),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("Redis cluster did not converge: {last}"),
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn converged(&self) -> io::Result<bool> {
        let n = self.nodes.len();
        let mut first: Option<Vec<Option<u16>>> = None;
        for node in 0..n {
            let info = self.cli(node, &["CLUSTER", "INFO"])?;
            let known = format!("cluster_known_nodes:{n}");
            if !info.contains("cluster_state:ok") || !info.lines().any(|l| l.trim() == known) {
                return Ok(false);
            }
            let map = self.slot_map(node)?;
            if map.iter().any(Option::is_none) {
                return Ok(false);
            }
            match &first {
                None => first = Some(map),
                Some(f) if *f != map => return Ok(false),
                Some(_) => {}
            }
        }
        Ok(true)
    }

    fn index_of_port(&self, port: u16) -> io::Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.port == port)
            .ok_or_else(|| io::Error::other(format!("port {port} is not a node of this cluster")))
    }

    fn spawn_nodes(&mut self, masters: usize) -> io::Result<()> {
        let mut last_err = None;
        for _ in 0..20 {
            let base = pick_ports(masters);
            match self.try_spawn(base, masters) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    self.stop_all();
                    if e.kind() == io::ErrorKind::NotFound {
                        return Err(e);
                    }
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("could not start redis-server")))
    }

    fn try_spawn(&mut self, base: u16, masters: usize) -> io::Result<()> {
        for i in 0..masters {
            let port = base + i as u16;
            for p in [port, port + BUS_OFFSET] {
                TcpListener::bind(("127.0.0.1", p))?;
            }
        }
        for i in 0..masters {
            let port = base + i as u16;
            let dir = self.dir.path();
            let log = dir.join(format!("redis-{port}.log"));
            let mut cmd = Command::new("redis-server");
            cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .arg("--cluster-config-file")
                .arg(dir.join(format!("nodes-{port}.conf")))
                .arg("--dir")
                .arg(dir)
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--logfile")
                .arg(&log)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            die_with_parent(&mut cmd);
            let child = cmd.spawn().map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "starting redis-server (apt-get install redis-server redis-tools): {e}"
                    ),
                )
            })?;
            self.nodes.push(Node {
                port,
                id: String::new(),
                child,
            });
            self.wait_listening(i, &log)?;
            let id = self.cli(i, &["CLUSTER", "MYID"])?;
            self.nodes[i].id = id;
        }
        Ok(())
    }

    fn wait_listening(&mut self, node: usize, log: &Path) -> io::Result<()> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        let port = self.nodes[node].port;
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.nodes[node].child.try_wait()? {
                let log = fs::read_to_string(log).unwrap_or_default();
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("redis-server on port {port} exited ({status}):\n{log}"),
                ));
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("redis-server on port {port} did not listen in time"),
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn stop_all(&mut self) {
        for mut node in self.nodes.drain(..) {
            // Killing by the pid we spawned; the server may already be gone.
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
    }

    /// The temp dir holding the servers' config, data and logs.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Arranges for `cmd`'s process to get SIGKILL when the thread that spawned it exits.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls prctl, which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A random base port such that `masters` consecutive client ports fit in the range.
fn pick_ports(masters: usize) -> u16 {
    let span = u64::from(PORT_HIGH - PORT_LOW) - masters as u64;
    let r = RandomState::new().hash_one((std::process::id(), Instant::now()));
    PORT_LOW + (r % span) as u16
}

/// Runs `cmd` with stdout and stderr captured into one string, killing it after `timeout`.
fn run(cmd: &mut Command, dir: &Path, timeout: Duration) -> io::Result<String> {
    let out_path = tempfile::Builder::new().prefix("cli-").tempfile_in(dir)?;
    let out = out_path.reopen()?;
    let err = out.try_clone()?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("running {cmd:?}: {e}")))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{cmd:?} did not finish within {timeout:?}"),
            ));
        }
        thread::sleep(Duration::from_millis(2));
    };
    let text = fs::read_to_string(out_path.path())?;
    if !status.success() {
        return Err(io::Error::other(format!(
            "{cmd:?} failed ({status}):\n{text}"
        )));
    }
    Ok(text)
}

/// True when redis-cli printed an error reply (it exits 0 for those when not on a tty).
fn is_error_reply(out: &str) -> bool {
    const CODES: &[&str] = &[
        "ERR ",
        "WRONGTYPE ",
        "MOVED ",
        "ASK ",
        "CLUSTERDOWN ",
        "TRYAGAIN ",
        "NOAUTH ",
        "BUSYKEY ",
        "IOERR ",
        "LOADING ",
        "Could not connect",
    ];
    CODES.iter().any(|c| out.starts_with(c))
}

fn parse_num<T: std::str::FromStr>(s: &str) -> io::Result<T> {
    s.trim()
        .parse()
        .map_err(|_| io::Error::other(format!("expected a number from redis-cli, got {s:?}")))
}

/// Parses `CLUSTER NODES` into a slot -> owner client port table.
fn parse_cluster_nodes(text: &str) -> io::Result<Vec<Option<u16>>> {
    let mut map = vec![None; SLOTS as usize];
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            continue;
        }
        let addr = fields[1].split(['@', ',']).next().unwrap_or_default();
        let port: u16 = match addr.rsplit_once(':') {
            Some((_, p)) => parse_num(p)?,
            None => continue,
        };
        for range in &fields[8..] {
            if range.starts_with('[') {
                continue; // a migration marker, not an owned slot
            }
            let (lo, hi) = match range.split_once('-') {
                Some((lo, hi)) => (parse_num::<u16>(lo)?, parse_num::<u16>(hi)?),
                None => {
                    let s = parse_num::<u16>(range)?;
                    (s, s)
                }
            };
            for slot in lo..=hi {
                map[slot as usize] = Some(port);
            }
        }
    }
    Ok(map)
}

/// Finds `cmdstat_{command}:calls=N` in `INFO commandstats` output (0 when absent).
fn parse_command_calls(info: &str, command: &str) -> io::Result<u64> {
    let prefix = format!("cmdstat_{command}:calls=");
    for line in info.lines() {
        if let Some(rest) = line.trim().strip_prefix(&prefix) {
            return parse_num(rest.split(',').next().unwrap_or_default());
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cluster_nodes() {
        let text = "a 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-2 5 [6->-b]\n\
                    b 127.0.0.1:7001@17001,host master - 0 0 2 connected 3-4 6\n";
        let map = parse_cluster_nodes(text).unwrap();
        assert_eq!(
            &map[..7],
            &[
                Some(7000),
                Some(7000),
                Some(7000),
                Some(7001),
                Some(7001),
                Some(7000),
                Some(7001)
            ]
        );
        assert_eq!(map[7], None);
    }

    #[test]
    fn parses_command_calls() {
        let info = "# Commandstats\r\ncmdstat_cluster|shards:calls=12,usec=5\r\ncmdstat_get:calls=3,usec=1\r\n";
        assert_eq!(parse_command_calls(info, "cluster|shards").unwrap(), 12);
        assert_eq!(parse_command_calls(info, "get").unwrap(), 3);
        assert_eq!(parse_command_calls(info, "cluster|slots").unwrap(), 0);
    }

    #[test]
    fn cluster_starts_routes_and_moves_slots() {
        let cluster = RedisCluster::start(3).unwrap();
        assert_eq!(cluster.len(), 3);
        assert_eq!(cluster.keyslot("foo").unwrap(), 12182);
        let owner = cluster.slot_owner(0, 12182).unwrap();
        cluster.cli(owner, &["SET", "foo", "bar"]).unwrap();
        let to = (owner + 1) % 3;
        cluster.move_slot(12182, to).unwrap();
        for viewer in 0..3 {
            assert_eq!(cluster.slot_owner(viewer, 12182).unwrap(), to);
        }
        assert_eq!(cluster.cli(to, &["GET", "foo"]).unwrap(), "bar");
        cluster.reset_stats().unwrap();
        cluster.cli(to, &["GET", "foo"]).unwrap();
        assert_eq!(cluster.command_calls(to, "get").unwrap(), 1);
        let pids = cluster.pids();
        drop(cluster);
        for pid in pids {
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists()
                    || fs::read_to_string(format!("/proc/{pid}/stat"))
                        .map(|s| s.contains(") Z "))
                        .unwrap_or(true),
                "redis-server {pid} survived the fixture"
            );
        }
    }
}
