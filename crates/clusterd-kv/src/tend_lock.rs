//! The tend lock: an exclusive `flock` on the lock file beside a segment. Whoever holds it is
//! the segment's one tend owner. The kernel drops it when the holder's last descriptor of the
//! file closes — on `close()`, and on any death including `kill -9` — and wakes a process
//! blocked on it at once, so takeover needs no heartbeat threshold, no pid checks and no
//! polling.
//!
//! `flock` locks belong to an open file description: each client opens the lock file itself
//! (never inheriting the descriptor across fork; std opens with `O_CLOEXEC`), so two clients
//! in one process, or a parent and a forked child, compete like separate processes.

use std::fs::File;
use std::io;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, Result};
use crate::segment::open_private;

/// A held tend lock; dropping it releases the lock.
pub struct TendLock {
    _lock: Flock<File>,
}

/// Opens (creating) the tend-lock file at `path` as a new open file description.
pub fn open(path: &Path) -> Result<File> {
    open_private(path, "opening tend-lock file")
}

/// Takes the lock if it is free; gives the file back if another holder has it.
pub fn try_acquire(file: File, path: &Path) -> Result<Result<TendLock, File>> {
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Ok(TendLock { _lock: lock })),
        Err((file, Errno::EWOULDBLOCK)) => Ok(Err(file)),
        Err((_, e)) => Err(Error::io(path, "locking tend-lock file", e.into())),
    }
}

/// Blocks until the lock is ours (the kernel wakes us when the holder releases it or dies).
pub fn acquire_blocking(mut file: File) -> io::Result<TendLock> {
    loop {
        match Flock::lock(file, FlockArg::LockExclusive) {
            Ok(lock) => return Ok(TendLock { _lock: lock }),
            Err((f, Errno::EINTR)) => file = f,
            Err((_, e)) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn one_holder_at_a_time_and_release_wakes_a_blocked_waiter() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let Ok(held) = try_acquire(open(&path).unwrap(), &path).unwrap() else {
            panic!("the lock should be free");
        };
        let Err(file) = try_acquire(open(&path).unwrap(), &path).unwrap() else {
            panic!("the lock should be taken");
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let lock = acquire_blocking(file);
            tx.send((Instant::now(), lock.is_ok())).unwrap();
            lock
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "waiter must block"
        );
        let released = Instant::now();
        drop(held);
        let (woke, ok) = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("waiter woken");
        assert!(ok);
        assert!(woke.duration_since(released) < Duration::from_secs(1));
    }
}
