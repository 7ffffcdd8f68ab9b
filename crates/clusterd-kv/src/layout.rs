//! The byte layout of a shared-memory segment and typed views onto a mapping of it.
//!
//! ```text
//! offset 0         Header (128 bytes, #[repr(C)], atomics only)
//! offset 128       node table: max_nodes x NodeEntry (128 bytes each, "host:port" NUL-padded)
//! then             slot table: 16384 x AtomicU16 (node index per slot, NO_NODE if unassigned)
//! ```
//!
//! Everything in the segment is an atomic, so every process may read any word at any time
//! without undefined behaviour; consistency of the node and slot tables as a whole is the
//! seqlock's job ([`crate::seqlock`]). `max_nodes` is chosen by the process that creates the
//! segment and recorded in the header; attachers take the geometry from there.

use std::mem::size_of;
use std::sync::atomic::{AtomicI32, AtomicU16, AtomicU32, AtomicU64};

/// `b"CLDKVMAP"`: the first word of every segment.
pub const MAGIC: u64 = u64::from_le_bytes(*b"CLDKVMAP");
/// Bumped whenever the layout below changes; a segment of another version is never used.
pub const LAYOUT_VERSION: u32 = 1;
/// Number of hash slots in a Redis cluster.
pub const SLOT_COUNT: usize = 16384;
/// Bytes reserved for one node's `host:port` in the node table.
pub const NODE_ADDR_MAX: usize = 128;
/// Slot-table value of a slot no node serves.
#[cfg(feature = "client")]
pub const NO_NODE: u16 = u16::MAX;
/// Largest accepted `max_nodes` (node indices are `u16`, and `NO_NODE` is reserved).
pub const MAX_NODES_LIMIT: u32 = 4096;

/// `Header::state`: nobody tends the map (never had an owner, or the owner closed).
#[cfg(feature = "client")]
pub const STATE_NO_OWNER: u32 = 0;
/// `Header::state`: an owner holds the tend lock and refreshes the map.
pub const STATE_TENDING: u32 = 1;

/// The segment header. Fields marked "seqlock" are written only inside a publish.
#[repr(C)]
pub struct Header {
    /// [`MAGIC`], stored last when the segment is initialized.
    pub magic: AtomicU64,
    /// [`LAYOUT_VERSION`].
    pub version: AtomicU32,
    /// Entries in the node table.
    pub max_nodes: AtomicU32,
    /// Hash of the cluster's identity (seeds + namespace); see [`crate::identity`].
    pub cluster_hash: AtomicU64,
    /// Incremented by each process that takes the tend lock.
    pub owner_epoch: AtomicU64,
    /// CLOCK_MONOTONIC microseconds at which the current owner took the lock.
    pub owner_since_us: AtomicU64,
    /// CLOCK_MONOTONIC milliseconds of the owner's last tend round.
    pub heartbeat_ms: AtomicU64,
    /// CLOCK_MONOTONIC microseconds of the last publish.
    pub published_us: AtomicU64,
    /// Sequence counter of the seqlock: odd while a publish is in progress.
    pub seq: AtomicU64,
    /// Pid of the owner, for display only (pids are reused and namespaced; the lock is the
    /// truth).
    pub owner_pid: AtomicI32,
    /// [`STATE_NO_OWNER`] or [`STATE_TENDING`].
    pub state: AtomicU32,
    /// Bumped (and futex-woken) by followers that want the owner to refresh now.
    pub refresh_requests: AtomicU32,
    /// Map generation, bumped by each publish (seqlock); 0 = nothing published yet. Also a
    /// futex word: attachers wait on it for the first map.
    pub generation: AtomicU32,
    /// Number of valid node-table entries (seqlock).
    pub node_count: AtomicU32,
    reserved: [AtomicU32; 11],
}

/// One node-table entry: `host:port` in UTF-8, NUL-padded, read and written as words.
#[repr(C)]
pub struct NodeEntry {
    /// The address bytes, little-endian packed.
    #[cfg_attr(not(feature = "client"), allow(dead_code))] // only the client reads the map
    pub words: [AtomicU64; NODE_ADDR_MAX / 8],
}

const _: () = assert!(size_of::<Header>() == 128);
const _: () = assert!(size_of::<NodeEntry>() == NODE_ADDR_MAX);

/// Offset of the node table.
const NODES_OFFSET: usize = size_of::<Header>();

/// Total size in bytes of a segment with `max_nodes` node entries.
pub fn segment_size(max_nodes: u32) -> usize {
    NODES_OFFSET + max_nodes as usize * size_of::<NodeEntry>() + SLOT_COUNT * size_of::<AtomicU16>()
}

/// Typed references into a mapped segment.
#[derive(Clone, Copy)]
pub struct View<'a> {
    /// The header.
    pub header: &'a Header,
    /// The node table (`max_nodes` entries).
    #[cfg_attr(not(feature = "client"), allow(dead_code))] // only the client reads the map
    pub nodes: &'a [NodeEntry],
    /// The slot table.
    #[cfg_attr(not(feature = "client"), allow(dead_code))] // only the client reads the map
    pub slots: &'a [AtomicU16],
}

impl<'a> View<'a> {
    /// Builds a view over `len` mapped bytes at `base` holding `max_nodes` node entries.
    ///
    /// # Safety
    /// `base` must be page-aligned, valid for reads (and writes, if the view is written
    /// through) of `len` bytes for `'a`, and `len` must be at least
    /// `segment_size(max_nodes)`. The memory may be shared with other processes: it is only
    /// ever accessed through atomics.
    pub unsafe fn new(base: *const u8, len: usize, max_nodes: u32) -> View<'a> {
        assert!(
            len >= segment_size(max_nodes),
            "mapping too small for the layout"
        );
        let n = max_nodes as usize;
        // SAFETY: guaranteed by the caller; alignment holds because the base is page-aligned
        // and every offset is a multiple of 8.
        unsafe {
            View {
                header: &*(base as *const Header),
                nodes: std::slice::from_raw_parts(base.add(NODES_OFFSET) as *const NodeEntry, n),
                slots: std::slice::from_raw_parts(
                    base.add(NODES_OFFSET + n * size_of::<NodeEntry>()) as *const AtomicU16,
                    SLOT_COUNT,
                ),
            }
        }
    }
}
