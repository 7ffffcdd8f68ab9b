//! Which worker tends an app's KV cluster map: apps that declare `kv_segment` share a
//! shared-memory segment (see the `clusterd-kv` crate), and status shows the pid holding its
//! tend lock — read from the kernel's lock table, not from what a process claims.

use std::path::PathBuf;

/// The pid holding the tend lock of the segment(s) named `prefix`, if any is held.
pub fn owner_pid(prefix: &str) -> Option<i32> {
    let dir = std::env::var_os(clusterd_kv::ENV_SEGMENT_DIR)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(clusterd_kv::DEFAULT_DIR));
    clusterd_kv::tend_owners(&dir, prefix)
        .ok()?
        .into_iter()
        .find_map(|owner| {
            owner
                .lock_pid
                .or(owner.owner_pid)
                .filter(|_| owner.lock_held)
        })
}
