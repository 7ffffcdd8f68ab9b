//! A client's role and counters: what it did (commands, redirections, topology reads,
//! publishes) and where its map came from, for status pages, tests and benches.

use std::sync::atomic::{AtomicU64, Ordering};

/// A client's part in tending the cluster map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Holds the tend lock: polls the topology and publishes the map for the host.
    Owner,
    /// Reads the map the owner publishes.
    Follower,
    /// Runs without shared memory: tends its own map.
    Local,
    /// Closed.
    Closed,
}

impl Role {
    /// `"owner"`, `"follower"`, `"local"` or `"closed"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Follower => "follower",
            Role::Local => "local",
            Role::Closed => "closed",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A snapshot of a client's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// The client's role now.
    pub role: Role,
    /// Key commands issued (GET/SET/DEL), not counting redirections.
    pub commands: u64,
    /// `MOVED` replies followed.
    pub moved: u64,
    /// `ASK` replies followed.
    pub ask: u64,
    /// `CLUSTER SHARDS`/`CLUSTER SLOTS` commands this client sent.
    pub topology_commands: u64,
    /// Successful topology reads (as owner, without shared memory, or while degraded).
    pub refreshes: u64,
    /// Maps this client published into the segment.
    pub publishes: u64,
    /// Refreshes this client asked the owner for (after a `MOVED`).
    pub refresh_requests: u64,
    /// Maps copied out of the segment (each one a generation change).
    pub snapshot_copies: u64,
    /// Topology reads a follower did itself because the owner looked hung.
    pub self_refreshes: u64,
    /// Times this client became the tend owner.
    pub takeovers: u64,
    /// The segment's owner epoch (times ownership was taken), 0 without shared memory.
    pub owner_epoch: u64,
    /// The segment's map generation, 0 without shared memory.
    pub map_generation: u32,
    /// Pid of the tend owner as the segment header records it.
    pub owner_pid: Option<i32>,
}

/// The live counters behind [`Stats`].
#[derive(Debug, Default)]
pub struct Counters {
    pub commands: AtomicU64,
    pub moved: AtomicU64,
    pub ask: AtomicU64,
    pub topology_commands: AtomicU64,
    pub refreshes: AtomicU64,
    pub publishes: AtomicU64,
    pub refresh_requests: AtomicU64,
    pub snapshot_copies: AtomicU64,
    pub self_refreshes: AtomicU64,
    pub takeovers: AtomicU64,
}

/// Adds one to a counter.
pub fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    /// The counters' values, with the role and segment facts filled in by the caller.
    pub fn snapshot(&self, role: Role) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            role,
            commands: get(&self.commands),
            moved: get(&self.moved),
            ask: get(&self.ask),
            topology_commands: get(&self.topology_commands),
            refreshes: get(&self.refreshes),
            publishes: get(&self.publishes),
            refresh_requests: get(&self.refresh_requests),
            snapshot_copies: get(&self.snapshot_copies),
            self_refreshes: get(&self.self_refreshes),
            takeovers: get(&self.takeovers),
            owner_epoch: 0,
            map_generation: 0,
            owner_pid: None,
        }
    }
}
