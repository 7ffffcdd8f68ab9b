//! A shared memory mapping of a segment file, and validation of its header: the part of
//! segment handling that also serves read-only inspection (`clusterd status`).

use std::fs::{File, OpenOptions};
use std::io;
use std::num::NonZeroUsize;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::Ordering;

use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

use crate::layout::{LAYOUT_VERSION, MAGIC, MAX_NODES_LIMIT, View, segment_size};

/// A shared mapping of a whole segment file; unmapped on drop.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    max_nodes: u32,
}

// SAFETY: the mapping is plain shared memory accessed only through atomics (see `View`).
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `file`, read-write when `writable`.
    pub fn map(file: &File, len: usize, writable: bool) -> io::Result<Self> {
        let nz = NonZeroUsize::new(len).ok_or_else(|| io::Error::other("empty segment"))?;
        let prot = if writable {
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE
        } else {
            ProtFlags::PROT_READ
        };
        // SAFETY: a fresh shared mapping of a file we hold open; no existing memory is
        // affected. Its contents are only ever accessed through atomics.
        let ptr = unsafe { mmap(None, nz, prot, MapFlags::MAP_SHARED, file, 0)? };
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
            max_nodes: 0,
        })
    }

    /// Typed access to the segment (only the header until the mapping is validated).
    pub fn view(&self) -> View<'_> {
        // SAFETY: `ptr` is a page-aligned mapping of `len` bytes that lives as long as
        // `self`; `max_nodes` was validated against `len` when the mapping was built.
        unsafe { View::new(self.ptr.as_ptr(), self.len, self.max_nodes) }
    }

    /// Reads the header and accepts the mapping as a segment of `cluster_hash` (any cluster
    /// when `None`); `Ok(None)` if it is not initialized yet, `Err(reason)` if it belongs to
    /// something else.
    pub fn validate(mut self, cluster_hash: Option<u64>) -> Result<Option<Self>, String> {
        if self.len < segment_size(0) {
            return Ok(None);
        }
        // SAFETY: the mapping holds at least a header; a zero-node view reads only that
        // and the slot table, which `segment_size(0)` covers.
        let header = unsafe { View::new(self.ptr.as_ptr(), self.len, 0) }.header;
        let magic = header.magic.load(Ordering::Acquire);
        if magic == 0 {
            return Ok(None);
        }
        if magic != MAGIC {
            return Err(format!("bad magic {magic:#018x}"));
        }
        let version = header.version.load(Ordering::Relaxed);
        if version != LAYOUT_VERSION {
            return Err(format!(
                "layout version {version}, expected {LAYOUT_VERSION}"
            ));
        }
        let hash = header.cluster_hash.load(Ordering::Relaxed);
        if let Some(want) = cluster_hash.filter(|&want| want != hash) {
            return Err(format!("cluster hash {hash:016x}, expected {want:016x}"));
        }
        let max_nodes = header.max_nodes.load(Ordering::Relaxed);
        if max_nodes == 0 || max_nodes > MAX_NODES_LIMIT || segment_size(max_nodes) != self.len {
            return Err(format!(
                "size {} does not match max_nodes {max_nodes}",
                self.len
            ));
        }
        self.max_nodes = max_nodes;
        Ok(Some(self))
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped; no reference into it outlives `self`
        // because every `View` borrows from `self`.
        unsafe {
            let _ = munmap(self.ptr.cast(), self.len);
        }
    }
}

/// Maps the segment at `path` read-only, without joining it; `Ok(None)` if it is not an
/// initialized segment of this layout.
pub fn inspect(path: &Path) -> io::Result<Option<Mapping>> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let len = file.metadata()?.len() as usize;
    if len < segment_size(0) {
        return Ok(None);
    }
    let mapping = Mapping::map(&file, len, false)?;
    Ok(mapping.validate(None).ok().flatten())
}
