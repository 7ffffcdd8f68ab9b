//! The lifetime of a named segment file: creating or attaching to it safely, mapping it, and
//! detaching (the last process out removes it).
//!
//! Membership protocol (all locks are `flock`s, which the kernel drops when a process dies):
//! - every attached process holds `LOCK_SH` on the segment file;
//! - an opener that gets `LOCK_EX|LOCK_NB` is alone: if the file is new (empty) it
//!   initializes it in place and downgrades to `LOCK_SH`; if the file has content, it is
//!   stale (its processes all died without closing), so it is unlinked and the open retried,
//!   which also clears segments of another layout version or cluster nobody uses;
//! - after taking `LOCK_SH` an opener checks that the path still names the inode it locked
//!   (a racing last-out may have unlinked it) and retries if not, so the processes of a
//!   cluster can never end up on two different segments;
//! - on detach, a process that gets `LOCK_EX|LOCK_NB` is the last one: it unlinks the lock
//!   file, then the segment.
//!
//! A file with content is never truncated, so a reader that maps it (`clusterd status`) can
//! never fault on a shrunk file. Files are opened `O_NOFOLLOW` and must belong to our user
//! (shared directories such as `/dev/shm` are world-writable), and are created mode 0600.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, Result};
use crate::identity::lock_path;
use crate::layout::{LAYOUT_VERSION, MAGIC, segment_size};
use crate::mapping::Mapping;

/// Attempts at attaching before giving up (each retry means another process raced us).
const ATTACH_ATTEMPTS: usize = 100;

/// This process's membership of a segment: a `LOCK_SH` on the segment file.
pub struct Membership {
    path: PathBuf,
    lock: Flock<File>,
}

impl Membership {
    /// The segment file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Leaves the segment; the last process out unlinks the lock file and the segment.
    /// Returns whether this call removed them.
    pub fn detach(self) -> Result<bool> {
        let removed = match self.lock.relock(FlockArg::LockExclusiveNonblock) {
            Ok(()) if same_file(&self.lock, &self.path)? => {
                remove_if_exists(&lock_path(&self.path), "removing tend-lock file")?;
                remove_if_exists(&self.path, "removing segment")?;
                true
            }
            Ok(()) | Err(Errno::EWOULDBLOCK) => false,
            Err(e) => return Err(Error::io(&self.path, "locking segment to detach", e.into())),
        };
        drop(self.lock);
        Ok(removed)
    }
}

/// Attaches to (creating if needed) the segment at `path` for cluster `cluster_hash`. A new
/// segment gets `max_nodes` node entries; an existing one keeps its own geometry.
pub fn attach(path: &Path, cluster_hash: u64, max_nodes: u32) -> Result<(Mapping, Membership)> {
    let mut last = String::from("no attempt made");
    for _ in 0..ATTACH_ATTEMPTS {
        let file = open_segment(path)?;
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(exclusive) => {
                if !same_file(&exclusive, path)? {
                    last = "the file was replaced while opening it".into();
                    continue;
                }
                let len = exclusive
                    .metadata()
                    .map_err(|e| Error::io(path, "reading segment size", e))?
                    .len();
                if len != 0 {
                    // Content but no members: a stale segment. Remove it and start afresh.
                    remove_if_exists(&lock_path(path), "removing stale tend-lock file")?;
                    remove_if_exists(path, "removing stale segment")?;
                    last = "a stale segment was removed".into();
                    continue;
                }
                initialize(&exclusive, path, cluster_hash, max_nodes)?;
                lock_retrying(&exclusive, FlockArg::LockShared)
                    .map_err(|e| Error::io(path, "locking segment shared", e))?;
                exclusive
            }
            Err((file, Errno::EWOULDBLOCK)) => {
                lock_shared(file).map_err(|e| Error::io(path, "locking segment shared", e))?
            }
            Err((_, e)) => return Err(Error::io(path, "locking segment", e.into())),
        };
        if !same_file(&lock, path)? {
            last = "the segment was removed while attaching".into();
            continue;
        }
        let len = lock
            .metadata()
            .map_err(|e| Error::io(path, "reading segment size", e))?
            .len() as usize;
        if len == 0 {
            last = "the segment's creator died before initializing it".into();
            continue;
        }
        let mapping =
            Mapping::map(&lock, len, true).map_err(|e| Error::io(path, "mapping segment", e))?;
        match mapping.validate(Some(cluster_hash)) {
            Ok(Some(mapping)) => {
                let membership = Membership {
                    path: path.to_path_buf(),
                    lock,
                };
                return Ok((mapping, membership));
            }
            Ok(None) => last = "the segment's creator died before initializing it".into(),
            Err(reason) => {
                return Err(Error::ForeignSegment {
                    path: path.to_path_buf(),
                    reason,
                });
            }
        }
    }
    Err(Error::io(
        path,
        "attaching to segment",
        io::Error::other(format!("gave up after {ATTACH_ATTEMPTS} attempts: {last}")),
    ))
}

/// Opens (creating, mode 0600) a segment or lock file, refusing symlinks and files that
/// belong to another user.
pub fn open_private(path: &Path, what: &'static str) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| Error::io(path, what, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, what, e))?;
    let euid = nix::unistd::geteuid().as_raw();
    if !meta.file_type().is_file() || meta.uid() != euid {
        return Err(Error::ForeignSegment {
            path: path.to_path_buf(),
            reason: format!(
                "not a regular file owned by uid {euid} (owner uid {})",
                meta.uid()
            ),
        });
    }
    Ok(file)
}

fn open_segment(path: &Path) -> Result<File> {
    open_private(path, "opening segment")
}

/// Sizes a new (empty) segment and writes its header; the caller holds `LOCK_EX`.
fn initialize(file: &File, path: &Path, cluster_hash: u64, max_nodes: u32) -> Result<()> {
    let len = segment_size(max_nodes);
    file.set_len(len as u64)
        .map_err(|e| Error::io(path, "sizing segment", e))?;
    let mapping =
        Mapping::map(file, len, true).map_err(|e| Error::io(path, "mapping segment", e))?;
    let header = mapping.view().header;
    header.version.store(LAYOUT_VERSION, Ordering::Relaxed);
    header.max_nodes.store(max_nodes, Ordering::Relaxed);
    header.cluster_hash.store(cluster_hash, Ordering::Relaxed);
    header.magic.store(MAGIC, Ordering::Release);
    Ok(())
}

/// Whether `path` still names the inode `file` refers to.
fn same_file(file: &File, path: &Path) -> Result<bool> {
    let open = file
        .metadata()
        .map_err(|e| Error::io(path, "inspecting open segment", e))?;
    match fs::symlink_metadata(path) {
        Ok(now) => Ok(now.dev() == open.dev() && now.ino() == open.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(path, "inspecting segment path", e)),
    }
}

fn remove_if_exists(path: &Path, action: &'static str) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::io(path, action, e)),
        _ => Ok(()),
    }
}

/// Takes a blocking `LOCK_SH` on `file`, retrying on EINTR.
fn lock_shared(mut file: File) -> io::Result<Flock<File>> {
    loop {
        match Flock::lock(file, FlockArg::LockShared) {
            Ok(lock) => return Ok(lock),
            Err((f, Errno::EINTR)) => file = f,
            Err((_, e)) => return Err(e.into()),
        }
    }
}

/// Converts the lock held on `lock` to `arg`, retrying on EINTR.
fn lock_retrying(lock: &Flock<File>, arg: FlockArg) -> io::Result<()> {
    loop {
        match lock.relock(arg) {
            Err(Errno::EINTR) => continue,
            other => return other.map_err(io::Error::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::SLOT_COUNT;
    use crate::mapping::inspect;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::{Arc, Barrier};

    fn seg(dir: &Path) -> PathBuf {
        dir.join("test-0000000000000001")
    }

    #[test]
    fn creates_a_private_initialized_segment() {
        let dir = tempfile::tempdir().unwrap();
        let path = seg(dir.path());
        let (mapping, member) = attach(&path, 1, 8).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len() as usize, segment_size(8));
        let view = mapping.view();
        assert_eq!(view.header.magic.load(Ordering::Relaxed), MAGIC);
        assert_eq!(view.nodes.len(), 8);
        assert_eq!(view.slots.len(), SLOT_COUNT);
        assert_eq!(
            view.header.generation.load(Ordering::Relaxed),
            0,
            "nothing published"
        );
        drop(mapping);
        assert!(member.detach().unwrap(), "sole member removes the segment");
        assert!(!path.exists());
    }

    #[test]
    fn second_member_shares_the_segment_and_geometry() {
        let dir = tempfile::tempdir().unwrap();
        let path = seg(dir.path());
        let (m1, a1) = attach(&path, 1, 8).unwrap();
        let (m2, a2) = attach(&path, 1, 64).unwrap();
        assert_eq!(
            m2.view().nodes.len(),
            8,
            "attacher adopts the creator's max_nodes"
        );
        m1.view()
            .header
            .refresh_requests
            .store(42, Ordering::Relaxed);
        assert_eq!(
            m2.view().header.refresh_requests.load(Ordering::Relaxed),
            42
        );
        assert!(!a1.detach().unwrap(), "not the last one out");
        assert!(path.exists());
        assert!(a2.detach().unwrap());
        assert!(!path.exists());
    }

    #[test]
    fn a_segment_of_another_cluster_in_use_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = seg(dir.path());
        let (_m, _a) = attach(&path, 1, 8).unwrap();
        match attach(&path, 2, 8) {
            Err(Error::ForeignSegment { reason, .. }) => assert!(reason.contains("cluster hash")),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("attached to another cluster's segment"),
        }
    }

    #[test]
    fn a_stale_segment_nobody_uses_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = seg(dir.path());
        // A leftover of another version or cluster, or garbage: nobody holds it.
        fs::write(&path, vec![0xAB; 4096]).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let (mapping, member) = attach(&path, 7, 4).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len() as usize, segment_size(4));
        assert_eq!(
            mapping.view().header.cluster_hash.load(Ordering::Relaxed),
            7
        );
        assert_eq!(mapping.view().header.generation.load(Ordering::Relaxed), 0);
        member.detach().unwrap();
    }

    #[test]
    fn symlinks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = seg(dir.path());
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), &path).unwrap();
        assert!(matches!(attach(&path, 1, 8), Err(Error::Io { .. })));
    }

    #[test]
    fn inspect_reads_without_joining() {
        let dir = tempfile::tempdir().unwrap();
        let path = seg(dir.path());
        assert!(inspect(&path).is_err(), "missing file");
        let (_m, a) = attach(&path, 9, 8).unwrap();
        let seen = inspect(&path).unwrap().expect("valid segment");
        assert_eq!(seen.view().header.cluster_hash.load(Ordering::Relaxed), 9);
        assert!(a.detach().unwrap(), "inspection holds no membership");
        fs::write(&path, b"not a segment").unwrap();
        assert!(inspect(&path).unwrap().is_none());
    }

    /// Many threads attach and detach concurrently (each with its own open file, as separate
    /// processes would). While the members of each round overlap, all of them must be on
    /// one inode, and once everybody has left nothing may remain.
    #[test]
    fn concurrent_attach_and_detach_never_split_the_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let path = Arc::new(seg(dir.path()));
        for _round in 0..20 {
            let threads = 6;
            let barrier = Arc::new(Barrier::new(threads));
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    let (path, barrier) = (path.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        let (mapping, member) = attach(&path, 3, 4).unwrap();
                        let ino = member.lock.metadata().unwrap().ino();
                        mapping
                            .view()
                            .header
                            .refresh_requests
                            .fetch_add(1, Ordering::Relaxed);
                        barrier.wait(); // everyone attached at once
                        let members = mapping
                            .view()
                            .header
                            .refresh_requests
                            .load(Ordering::Relaxed);
                        barrier.wait();
                        drop(mapping);
                        let removed = member.detach().unwrap();
                        (ino, members, removed)
                    })
                })
                .collect();
            let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            let ino = results[0].0;
            assert!(
                results.iter().all(|r| r.0 == ino),
                "members on different inodes"
            );
            assert!(results.iter().all(|r| r.1 == threads as u32), "{results:?}");
            assert_eq!(
                results.iter().filter(|r| r.2).count(),
                1,
                "exactly one last-out"
            );
            assert!(!path.exists());
        }
    }
}
