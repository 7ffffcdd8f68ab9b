//! [`KvOptions`]: how a client finds its cluster and shares (or not) the cluster map, with
//! defaults that suit workers under clusterd.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::identity::{
    DEFAULT_DIR, DEFAULT_PREFIX, ENV_SEGMENT_DIR, ENV_SEGMENT_PREFIX, cluster_hash, prefix_problem,
    segment_file_name,
};
use crate::layout::MAX_NODES_LIMIT;

/// The shortest heartbeat silence after which an owner counts as hung.
const MIN_STALE: Duration = Duration::from_secs(1);

/// Options of [`KvClient::connect`](crate::KvClient::connect).
///
/// ```
/// use std::time::Duration;
/// let options = clusterd_kv::KvOptions::from_seed_list("127.0.0.1:7000,127.0.0.1:7001")
///     .tend_interval(Duration::from_millis(500));
/// assert_eq!(options.seeds(), ["127.0.0.1:7000", "127.0.0.1:7001"]);
/// ```
#[derive(Debug, Clone)]
pub struct KvOptions {
    seeds: Vec<String>,
    namespace: Option<String>,
    shared_memory: bool,
    segment_dir: PathBuf,
    segment_prefix: String,
    tend_interval: Duration,
    max_nodes: u32,
    connect_timeout: Duration,
    command_timeout: Duration,
    stale_after: u32,
}

impl KvOptions {
    /// Options for the cluster reachable through `seeds` (`host:port` each), with defaults:
    /// shared memory on, segment directory `$CLUSTERD_KV_DIR` or `/dev/shm`, segment prefix
    /// `$CLUSTERD_KV_SEGMENT` or `clusterd-kv`, tend interval 1 s, 64 nodes, connect and
    /// command timeouts 1 s, owner considered hung after 3 silent tend intervals.
    pub fn new<I, S>(seeds: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        KvOptions {
            seeds: seeds
                .into_iter()
                .map(|s| s.into().trim().to_string())
                .collect(),
            namespace: None,
            shared_memory: true,
            segment_dir: env(ENV_SEGMENT_DIR)
                .unwrap_or_else(|| DEFAULT_DIR.into())
                .into(),
            segment_prefix: env(ENV_SEGMENT_PREFIX).unwrap_or_else(|| DEFAULT_PREFIX.into()),
            tend_interval: Duration::from_secs(1),
            max_nodes: 64,
            connect_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_secs(1),
            stale_after: 3,
        }
    }

    /// Like [`new`](Self::new), from a comma-separated seed list such as the `REDIS_CLUSTER`
    /// variable's `127.0.0.1:7000,127.0.0.1:7001` (blank entries are ignored).
    pub fn from_seed_list(list: &str) -> Self {
        Self::new(list.split(',').map(str::trim).filter(|s| !s.is_empty()))
    }

    /// Separates segments of clients that use the same seeds but must not share a map.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// `true` (default): share the map through a segment with the host's other clients of
    /// this cluster. `false`: this client tends its own map, like every other client.
    pub fn shared_memory(mut self, on: bool) -> Self {
        self.shared_memory = on;
        self
    }

    /// Directory of the named segment and its lock file.
    pub fn segment_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.segment_dir = dir.into();
        self
    }

    /// Prefix of the segment's file name (`{prefix}-{cluster hash}`).
    pub fn segment_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.segment_prefix = prefix.into();
        self
    }

    /// How often the tend owner (or a client without shared memory) re-reads the topology.
    pub fn tend_interval(mut self, interval: Duration) -> Self {
        self.tend_interval = interval;
        self
    }

    /// Node-table capacity of a segment this client creates (1..=4096).
    pub fn max_nodes(mut self, max_nodes: u32) -> Self {
        self.max_nodes = max_nodes;
        self
    }

    /// Time limit for connecting to a node.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Time limit for one command's reply.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// Tend intervals without an owner heartbeat after which followers consider the owner
    /// hung and refresh the map themselves (at least 2; and never less than 1 s, so a
    /// briefly starved owner does not make every follower read the topology).
    pub fn stale_after_intervals(mut self, intervals: u32) -> Self {
        self.stale_after = intervals;
        self
    }

    /// The seed addresses.
    pub fn seeds(&self) -> &[String] {
        &self.seeds
    }

    /// The tend interval.
    pub fn get_tend_interval(&self) -> Duration {
        self.tend_interval
    }

    /// The segment file this client uses, or `None` without shared memory.
    pub fn segment_path(&self) -> Option<PathBuf> {
        self.shared_memory.then(|| {
            let hash = cluster_hash(&self.seeds, self.namespace.as_deref());
            self.segment_dir
                .join(segment_file_name(&self.segment_prefix, hash))
        })
    }

    /// The cluster identity hash of these seeds and namespace.
    pub fn cluster_hash(&self) -> u64 {
        cluster_hash(&self.seeds, self.namespace.as_deref())
    }

    pub(crate) fn max_nodes_value(&self) -> u32 {
        self.max_nodes
    }

    pub(crate) fn connect_timeout_value(&self) -> Duration {
        self.connect_timeout
    }

    pub(crate) fn command_timeout_value(&self) -> Duration {
        self.command_timeout
    }

    /// How long without a heartbeat before the owner counts as hung.
    pub(crate) fn stale_threshold(&self) -> Duration {
        (self.tend_interval * self.stale_after).max(MIN_STALE)
    }

    /// Checks every option; the first problem found is returned.
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |option, reason: String| Err(Error::InvalidOption { option, reason });
        if self.seeds.is_empty() {
            return bad("seeds", "at least one host:port is needed".into());
        }
        for seed in &self.seeds {
            if crate::pool::split_addr(seed).is_none() {
                return bad("seeds", format!("{seed:?} is not host:port"));
            }
        }
        if self.shared_memory {
            if let Some(problem) = prefix_problem(&self.segment_prefix) {
                return bad(
                    "segment_prefix",
                    format!("{:?} {problem}", self.segment_prefix),
                );
            }
            if self.segment_dir.as_os_str().is_empty() {
                return bad("segment_dir", "must not be empty".into());
            }
        }
        if self.tend_interval < Duration::from_millis(10) {
            return bad(
                "tend_interval",
                format!("{:?} is below the 10ms minimum", self.tend_interval),
            );
        }
        if self.max_nodes == 0 || self.max_nodes > MAX_NODES_LIMIT {
            return bad(
                "max_nodes",
                format!("{} is outside 1..={MAX_NODES_LIMIT}", self.max_nodes),
            );
        }
        if self.connect_timeout.is_zero() || self.command_timeout.is_zero() {
            return bad(
                "timeouts",
                "connect and command timeouts must be positive".into(),
            );
        }
        if self.stale_after < 2 {
            return bad(
                "stale_after_intervals",
                format!("{} is below 2", self.stale_after),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(options: KvOptions) -> String {
        match options.validate() {
            Err(Error::InvalidOption { option, reason }) => format!("{option}: {reason}"),
            other => panic!("expected an invalid option, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        let o = KvOptions::from_seed_list(" 127.0.0.1:7000, ,localhost:7001");
        assert_eq!(o.seeds(), ["127.0.0.1:7000", "localhost:7001"]);
        o.validate().unwrap();
        assert!(o.segment_path().is_some());
        assert!(o.clone().shared_memory(false).segment_path().is_none());
    }

    #[test]
    fn bad_values_are_explained() {
        let o = || KvOptions::new(["127.0.0.1:7000"]);
        assert!(reason(KvOptions::from_seed_list("")).starts_with("seeds"));
        assert!(reason(KvOptions::new(["nohost"])).contains("\"nohost\" is not host:port"));
        assert!(reason(KvOptions::new(["h:99999"])).starts_with("seeds"));
        assert!(reason(o().segment_prefix("a/b")).starts_with("segment_prefix"));
        assert!(reason(o().tend_interval(Duration::from_millis(1))).starts_with("tend_interval"));
        assert!(reason(o().max_nodes(0)).starts_with("max_nodes"));
        assert!(reason(o().max_nodes(5000)).starts_with("max_nodes"));
        assert!(reason(o().command_timeout(Duration::ZERO)).starts_with("timeouts"));
        assert!(reason(o().stale_after_intervals(1)).starts_with("stale_after"));
        // Without shared memory the segment options do not matter.
        o().shared_memory(false)
            .segment_prefix("")
            .validate()
            .unwrap();
    }

    #[test]
    fn the_stale_threshold_has_a_floor() {
        let o = KvOptions::new(["h:1"]).tend_interval(Duration::from_millis(10));
        assert_eq!(o.stale_threshold(), MIN_STALE);
        let o = o
            .tend_interval(Duration::from_secs(2))
            .stale_after_intervals(4);
        assert_eq!(o.stale_threshold(), Duration::from_secs(8));
    }

    #[test]
    fn segment_path_names_the_cluster() {
        let a = KvOptions::new(["127.0.0.1:7000"])
            .segment_dir("/d")
            .segment_prefix("app");
        let b = a.clone().namespace("other");
        let pa = a.segment_path().unwrap();
        assert!(pa.starts_with("/d"));
        assert!(
            pa.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("app-")
        );
        assert_ne!(pa, b.segment_path().unwrap());
    }
}
