//! Reporting who tends each segment, for `clusterd status`, without joining the segments or
//! touching their locks: the header says which pid claims ownership, and `/proc/locks` says
//! whether the tend lock is really held (and by whom), so a crashed owner's stale header is
//! never reported as an owner.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::identity::{lock_path, parse_segment_file_name, prefix_problem};
use crate::layout::STATE_TENDING;
use crate::mapping::inspect;
use crate::sys::monotonic_micros;

/// What one segment's header and tend lock say about its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerInfo {
    /// The segment file.
    pub segment: PathBuf,
    /// The cluster identity hash (also in the file name).
    pub cluster_hash: u64,
    /// Pid of the tend owner: the header's claim, reported only while the tend lock is held.
    pub owner_pid: Option<i32>,
    /// Whether some process holds the tend lock.
    pub lock_held: bool,
    /// Pid holding the tend lock according to the kernel (`/proc/locks`), when it says.
    pub lock_pid: Option<i32>,
    /// How many times ownership has been taken since the segment was created.
    pub owner_epoch: u64,
    /// Generation of the published map (0: none yet).
    pub generation: u32,
    /// Time since the owner's last tend round, while an owner tends.
    pub heartbeat_age: Option<Duration>,
    /// CLOCK_MONOTONIC µs at which the current owner took the lock (see
    /// [`monotonic_micros`](crate::monotonic_micros)).
    pub owner_since_us: u64,
    /// CLOCK_MONOTONIC µs of the last publish.
    pub published_us: u64,
}

/// Finds the segments named `{prefix}-{hash}` in `dir` and reports each one's tend owner.
/// Files that are not initialized segments of this layout are skipped; a missing `dir`
/// yields an empty list.
pub fn tend_owners(dir: &Path, prefix: &str) -> io::Result<Vec<OwnerInfo>> {
    if let Some(problem) = prefix_problem(prefix) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("segment prefix {prefix:?} {problem}"),
        ));
    }
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        if let Some(hash) = name
            .to_str()
            .and_then(|n| parse_segment_file_name(prefix, n))
        {
            found.push((entry.path(), hash));
        }
    }
    found.sort();
    if found.is_empty() {
        return Ok(Vec::new());
    }
    let locks = flock_writers()?;
    let mut owners = Vec::new();
    for (path, cluster_hash) in found {
        let mapping = match inspect(&path) {
            Ok(Some(m)) => m,
            // Vanished since listed, or not (yet) a segment of ours.
            Ok(None) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let h = mapping.view().header;
        let holder = match fs::metadata(lock_path(&path)) {
            Ok(meta) => locks.get(&(meta.dev(), meta.ino())).copied(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let lock_held = holder.is_some();
        let tending = lock_held && h.state.load(Ordering::Acquire) == STATE_TENDING;
        let heartbeat_ms = h.heartbeat_ms.load(Ordering::Relaxed);
        owners.push(OwnerInfo {
            segment: path,
            cluster_hash,
            owner_pid: tending.then(|| h.owner_pid.load(Ordering::Relaxed)),
            lock_held,
            lock_pid: holder.flatten(),
            owner_epoch: h.owner_epoch.load(Ordering::Relaxed),
            generation: h.generation.load(Ordering::Acquire),
            heartbeat_age: tending.then(|| {
                Duration::from_millis((monotonic_micros() / 1000).saturating_sub(heartbeat_ms))
            }),
            owner_since_us: h.owner_since_us.load(Ordering::Relaxed),
            published_us: h.published_us.load(Ordering::Relaxed),
        });
    }
    Ok(owners)
}

/// Exclusive `flock` holders by (device, inode), with the pid the kernel reports (absent when
/// it cannot say, e.g. the holder is in another pid namespace).
fn flock_writers() -> io::Result<HashMap<(u64, u64), Option<i32>>> {
    Ok(parse_proc_locks(&fs::read_to_string("/proc/locks")?))
}

/// Parses `/proc/locks` lines such as `3: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF`;
/// lines with `->` are waiters, not holders, and are skipped.
fn parse_proc_locks(text: &str) -> HashMap<(u64, u64), Option<i32>> {
    let mut held = HashMap::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 6 || fields[1] == "->" || fields[1] != "FLOCK" || fields[3] != "WRITE" {
            continue;
        }
        let pid = fields[4].parse::<i32>().ok().filter(|&p| p > 0);
        let mut id = fields[5].split(':');
        let (Some(major), Some(minor), Some(ino)) = (id.next(), id.next(), id.next()) else {
            continue;
        };
        let (Ok(major), Ok(minor), Ok(ino)) = (
            u32::from_str_radix(major, 16),
            u32::from_str_radix(minor, 16),
            ino.parse::<u64>(),
        ) else {
            continue;
        };
        held.insert((libc::makedev(major, minor), ino), pid);
    }
    held
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_locks() {
        let text = "1: FLOCK  ADVISORY  WRITE 4242 00:1a:77 0 EOF\n\
                    1: -> FLOCK  ADVISORY  WRITE 4343 00:1a:77 0 EOF\n\
                    2: FLOCK  ADVISORY  READ 4444 00:1a:78 0 EOF\n\
                    3: POSIX  ADVISORY  WRITE 4545 fd:01:79 0 EOF\n\
                    4: FLOCK  ADVISORY  WRITE -1 103:02:80 0 EOF\n";
        let held = parse_proc_locks(text);
        assert_eq!(held.len(), 2);
        assert_eq!(held[&(libc::makedev(0, 0x1a), 77)], Some(4242));
        assert_eq!(held[&(libc::makedev(0x103, 2), 80)], None);
    }

    #[test]
    fn bad_prefixes_are_refused() {
        let err = tend_owners(Path::new("/"), "../etc").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[cfg(feature = "client")]
    #[test]
    fn reports_the_lock_holder_only_while_the_lock_is_held() {
        use crate::identity::segment_file_name;
        use crate::segment::attach;
        use crate::tend_lock;

        let dir = tempfile::tempdir().unwrap();
        assert!(
            tend_owners(&dir.path().join("missing"), "p")
                .unwrap()
                .is_empty()
        );
        let path = dir.path().join(segment_file_name("p", 0xabc));
        let (mapping, member) = attach(&path, 0xabc, 4).unwrap();
        std::fs::write(dir.path().join("p-junk"), b"x").unwrap();
        std::fs::write(
            dir.path().join(segment_file_name("p", 0xdef)),
            b"not a segment",
        )
        .unwrap();

        let owners = tend_owners(dir.path(), "p").unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].cluster_hash, 0xabc);
        assert!(!owners[0].lock_held);
        assert_eq!(owners[0].owner_pid, None);

        let lock_file = lock_path(&path);
        let lock = tend_lock::try_acquire(tend_lock::open(&lock_file).unwrap(), &lock_file)
            .unwrap()
            .ok()
            .unwrap();
        let h = mapping.view().header;
        h.owner_pid
            .store(std::process::id() as i32, Ordering::Relaxed);
        h.heartbeat_ms
            .store(monotonic_micros() / 1000, Ordering::Relaxed);
        h.state.store(STATE_TENDING, Ordering::Release);
        let owners = tend_owners(dir.path(), "p").unwrap();
        assert!(owners[0].lock_held);
        assert_eq!(owners[0].owner_pid, Some(std::process::id() as i32));
        assert_eq!(owners[0].lock_pid, Some(std::process::id() as i32));
        assert!(owners[0].heartbeat_age.unwrap() < Duration::from_secs(5));

        // A crashed owner leaves its claim in the header, but the lock is gone.
        drop(lock);
        let owners = tend_owners(dir.path(), "p").unwrap();
        assert!(!owners[0].lock_held);
        assert_eq!(owners[0].owner_pid, None);
        drop(mapping);
        member.detach().unwrap();
    }
}
