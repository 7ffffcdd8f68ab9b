//! A cluster's identity on this host: the stable hash of its seed list (and namespace) and
//! the file names derived from it, so two clusters never share a segment.
//!
//! The hash is FNV-1a 64 over the sorted, de-duplicated seeds: stable across processes,
//! builds and Rust versions (std's `DefaultHasher` is not), and independent of the order in
//! which a worker was given its seeds. Workers given different seed *sets* for the same
//! cluster get different segments; that costs one extra tender, never a wrong map.

use std::path::{Path, PathBuf};

/// Environment variable that sets the segment name prefix (clusterd sets it from an app's
/// `kv_segment` manifest key).
pub const ENV_SEGMENT_PREFIX: &str = "CLUSTERD_KV_SEGMENT";
/// Environment variable that sets the directory of named segments.
pub const ENV_SEGMENT_DIR: &str = "CLUSTERD_KV_DIR";
/// The prefix used when [`ENV_SEGMENT_PREFIX`] is not set.
pub const DEFAULT_PREFIX: &str = "clusterd-kv";
/// The segment directory used when [`ENV_SEGMENT_DIR`] is not set.
pub const DEFAULT_DIR: &str = "/dev/shm";
/// Suffix of the tend-lock file beside a segment.
pub const LOCK_SUFFIX: &str = ".lock";
/// Longest accepted prefix, in bytes.
const PREFIX_MAX: usize = 200;

/// The stable identity hash of a cluster given its seed addresses and an optional namespace.
pub fn cluster_hash<S: AsRef<str>>(seeds: &[S], namespace: Option<&str>) -> u64 {
    let mut sorted: Vec<&str> = seeds.iter().map(|s| s.as_ref().trim()).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut h = Fnv::new();
    for seed in sorted {
        h.write(seed.as_bytes());
        h.write(b"\n");
    }
    if let Some(ns) = namespace {
        h.write(b"\0namespace=");
        h.write(ns.as_bytes());
    }
    h.0
}

/// The file name of the segment of cluster `hash` under `prefix`: `{prefix}-{hash:016x}`.
pub fn segment_file_name(prefix: &str, hash: u64) -> String {
    format!("{prefix}-{hash:016x}")
}

/// The tend-lock file that belongs to the segment at `segment`: `{segment}.lock`.
pub fn lock_path(segment: &Path) -> PathBuf {
    let mut name = segment.as_os_str().to_owned();
    name.push(LOCK_SUFFIX);
    PathBuf::from(name)
}

/// If `file_name` is a segment of `prefix`, the cluster hash it names.
pub fn parse_segment_file_name(prefix: &str, file_name: &str) -> Option<u64> {
    let hex = file_name.strip_prefix(prefix)?.strip_prefix('-')?;
    if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Why `prefix` cannot name a segment, if it cannot.
pub fn prefix_problem(prefix: &str) -> Option<&'static str> {
    if prefix.is_empty() {
        Some("must not be empty")
    } else if prefix.len() > PREFIX_MAX {
        Some("must be at most 200 bytes")
    } else if prefix.contains(['/', '\0']) || prefix == "." || prefix == ".." {
        Some("must be a plain file name (no '/' or NUL)")
    } else {
        None
    }
}

/// FNV-1a, 64-bit.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_and_order_independent() {
        let a = cluster_hash(&["127.0.0.1:7000", "127.0.0.1:7001"], None);
        let b = cluster_hash(
            &["127.0.0.1:7001", " 127.0.0.1:7000", "127.0.0.1:7001"],
            None,
        );
        assert_eq!(a, b);
        // Pinned: the hash names files shared by processes of different builds.
        assert_eq!(a, 0xc22f_7f0f_871c_4140, "{a:#018x}");
    }

    #[test]
    fn hash_separates_clusters_and_namespaces() {
        let a = cluster_hash(&["127.0.0.1:7000"], None);
        assert_ne!(a, cluster_hash(&["127.0.0.1:7001"], None));
        assert_ne!(a, cluster_hash(&["127.0.0.1:7000"], Some("blue")));
        assert_ne!(
            cluster_hash(&["127.0.0.1:7000"], Some("blue")),
            cluster_hash(&["127.0.0.1:7000"], Some("green"))
        );
    }

    #[test]
    fn names_round_trip() {
        let name = segment_file_name("app", 0xdead_beef);
        assert_eq!(name, "app-00000000deadbeef");
        assert_eq!(parse_segment_file_name("app", &name), Some(0xdead_beef));
        assert_eq!(
            parse_segment_file_name("app", "app-00000000deadbeef.lock"),
            None
        );
        assert_eq!(parse_segment_file_name("ap", &name), None);
        assert_eq!(parse_segment_file_name("app", "app-xyz"), None);
        assert_eq!(
            lock_path(Path::new("/d/app-00000000deadbeef")),
            Path::new("/d/app-00000000deadbeef.lock")
        );
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(prefix_problem("clusterd-kv").is_none());
        assert!(prefix_problem("").is_some());
        assert!(prefix_problem("a/b").is_some());
        assert!(prefix_problem("..").is_some());
        assert!(prefix_problem(&"x".repeat(201)).is_some());
    }
}
