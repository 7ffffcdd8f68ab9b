//! clusterd-kv: a Redis Cluster client whose cluster map (which node serves each of the
//! 16384 hash slots) is tended by **one process per host** and shared with the host's other
//! processes through shared memory — the model of the Aerospike clients' shared-memory mode,
//! with the failure modes fixed.
//!
//! ```no_run
//! # #[cfg(feature = "client")]
//! # async fn demo() -> clusterd_kv::Result<()> {
//! use clusterd_kv::{KvClient, KvOptions};
//! let kv = KvClient::connect(KvOptions::from_seed_list("127.0.0.1:7000")).await?;
//! kv.set("user:1", r#"{"name":"ada"}"#).await?;
//! assert!(kv.get("user:1").await?.is_some());
//! println!("{} {:?}", kv.role(), kv.stats());
//! kv.close().await?; // another process takes over tending at once
//! # Ok(()) }
//! ```
//!
//! # Theory of operation
//!
//! Every process keeps its own connections (one multiplexed `redis` connection per node) and
//! routes each command by the key's slot through its **local snapshot** of the map; a
//! `MOVED` is followed, patched into the snapshot and reported to the owner, an `ASK` is
//! followed with `ASKING`. Only the map is shared:
//!
//! - **Segment**: a file `{dir}/{prefix}-{cluster_hash:016x}` (dir `/dev/shm`, prefix
//!   `clusterd-kv`, or `$CLUSTERD_KV_DIR` / `$CLUSTERD_KV_SEGMENT`), mode 0600, mapped
//!   shared. A `#[repr(C)]` header of atomics (magic, layout version, cluster hash, owner
//!   epoch/pid/since, heartbeat, seqlock, generation, state, refresh-request word), a node
//!   table and a 16384-entry slot table. A segment whose magic, version or cluster hash does
//!   not match is never used.
//! - **Membership**: each attached process holds `flock(LOCK_SH)` on the segment; the sole
//!   opener (it gets `LOCK_EX|LOCK_NB`) initializes a new file or removes a stale one, and
//!   the last process out (ditto on close) unlinks it. Openers re-check the inode after
//!   locking, so a racing unlink cannot split a cluster over two segments.
//! - **Tend lock**: `flock(LOCK_EX)` on `{segment}.lock`. The holder is the owner: it reads
//!   `CLUSTER SHARDS` (or `CLUSTER SLOTS`) every tend interval and on request, and
//!   publishes changes under a seqlock. Followers re-copy only when the generation changes;
//!   a changed map costs one copy, an unchanged one a single atomic load.
//! - **Takeover**: each follower parks a thread in a blocking `flock(LOCK_EX)`. The kernel
//!   releases the owner's lock when it closes *or dies* (`kill -9` included) and wakes a
//!   waiter immediately: no heartbeat threshold (Aerospike waits 30 s), no `kill(pid, 0)`
//!   probing fooled by pid reuse or pid namespaces, no spinlock a dead process can leave
//!   held. A thread that wins the lock after its client closed drops it at once.
//! - **Refresh requests**: a follower that gets `MOVED` bumps the header's refresh-request
//!   word and futex-wakes it; the owner's watcher thread turns that into an immediate tend,
//!   so one redirection refreshes the map for the whole host.
//! - **Telling the supervisor**: under a supervisor (`NOTIFY_SOCKET` set), the owner says so
//!   in a datagram, `X_CLUSTERD_KV_TEND=owner` plus `X_CLUSTERD_KV_SEGMENT=<file name>`,
//!   when it takes the lock and after every tend round, and `X_CLUSTERD_KV_TEND=released`
//!   when it lets go; one unconnected, non-blocking datagram each, errors ignored. The
//!   kernel tells the supervisor the sender's pid, so clusterd never reads `/dev/shm`.
//! - **Hung owner**: the owner stamps a heartbeat each round. A stopped or wedged owner keeps
//!   its lock, so followers that see the heartbeat older than `stale_after_intervals` tend
//!   intervals (at least 1 s) read the topology themselves (without publishing) until it recovers.
//! - **Fork first, connect after**: locks and mappings belong to open file descriptions,
//!   which a forked child shares. Connect in the process that will use the client (clusterd
//!   spawns workers with fork+exec, and the files are opened close-on-exec, so workers are
//!   fine); a child forked without exec from a tend owner would keep the lock alive after the
//!   owner's death.
//! - **Without shared memory** ([`KvOptions::shared_memory`]`(false)`) every client tends its
//!   own map, for comparison.
//!
//! Choices that differ from the design sketch, and why:
//! - *Blocking waiter thread rather than polling the lock every ~100 ms*: takeover after a
//!   `kill -9` is as fast as the kernel can release the lock (bench/kv measures it) instead
//!   of up to a poll period, and an idle follower costs one sleeping thread and no wake-ups.
//!   Because the kernel does the waking, clusterd needs to do nothing on a worker's death.
//! - *A stale segment is replaced, not just refused*: a process that finds itself the only
//!   one on an existing file knows nobody uses it, so a leftover of a crashed run, an older
//!   layout or a hash collision is removed rather than blocking startup. A mismatching
//!   segment that *is* in use is refused ([`Error::ForeignSegment`]).
//! - *No file is ever truncated once it has content*, so a tool that maps segments
//!   read-only ([`tend_owners`]) can never take a SIGBUS from a well-behaved client. (clusterd
//!   itself no longer reads segments: the owner tells it over `NOTIFY_SOCKET`.)
//! - *Files are opened `O_NOFOLLOW` and must belong to our uid*: `/dev/shm` is world
//!   writable, and a planted file or symlink must not become our map.
//! - A named segment rather than a memfd: clusterd can find and report it by prefix without
//!   holding it, and the membership protocol gives the memfd's "freed with the last process"
//!   property.
//!
//! # Without the `client` feature
//!
//! Only [`tend_owners`] and the naming helpers remain, with no dependency beyond `libc` and
//! `nix`, for tools and tests that inspect segments from outside.
//!
//! # Layout
//!
//! - `layout`: the segment's bytes; `mapping`: mapping and validating a segment file;
//!   `identity`: cluster hash and file names; `owners`: [`tend_owners`]; `sys`: clock and
//!   futex.
//! - Client only: `segment` (membership protocol), `seqlock` (publish/copy), `tend_lock`,
//!   `tend` (owner/follower loops), `tend_notify` (the datagrams to the supervisor), `topology` (`CLUSTER SHARDS`/`SLOTS`), `pool`
//!   (connections), `slot` (CRC16 key slots), `map`, `options`, `stats`, `client`
//!   ([`KvClient`]), `error`.
#![warn(missing_docs)]

mod identity;
mod layout;
mod mapping;
mod owners;
mod sys;

#[cfg(feature = "client")]
mod client;
#[cfg(feature = "client")]
mod error;
#[cfg(feature = "client")]
mod map;
#[cfg(feature = "client")]
mod options;
#[cfg(feature = "client")]
mod pool;
#[cfg(feature = "client")]
mod segment;
#[cfg(feature = "client")]
mod seqlock;
#[cfg(feature = "client")]
mod slot;
#[cfg(feature = "client")]
mod stats;
#[cfg(feature = "client")]
mod tend;
#[cfg(feature = "client")]
mod tend_lock;
#[cfg(feature = "client")]
mod tend_notify;
#[cfg(feature = "client")]
mod topology;

pub use identity::{
    DEFAULT_DIR, DEFAULT_PREFIX, ENV_SEGMENT_DIR, ENV_SEGMENT_PREFIX, cluster_hash, lock_path,
    segment_file_name,
};
pub use owners::{OwnerInfo, tend_owners};
pub use sys::monotonic_micros;

#[cfg(feature = "client")]
pub use client::KvClient;
#[cfg(feature = "client")]
pub use error::{Error, Result};
#[cfg(feature = "client")]
pub use map::ClusterMap;
#[cfg(feature = "client")]
pub use options::KvOptions;
#[cfg(feature = "client")]
pub use slot::key_slot;
#[cfg(feature = "client")]
pub use stats::{Role, Stats};
#[cfg(feature = "client")]
pub use tend_notify::{ENV_NOTIFY_SOCKET, KEY_SEGMENT, KEY_TEND};
