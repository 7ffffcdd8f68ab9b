//! Thin wrappers over the Linux facilities the segment protocol needs and no crate in the
//! tree wraps for shared memory: the monotonic clock the header's timestamps use, and
//! process-shared futex wait/wake on words of the segment.

#[cfg(feature = "client")]
use std::sync::atomic::AtomicU32;
#[cfg(feature = "client")]
use std::time::Duration;

use nix::time::{ClockId, clock_gettime};

/// CLOCK_MONOTONIC in microseconds: the clock of the segment header's timestamps
/// (`owner_since_us`, `published_us`; `heartbeat_ms` is the same clock in milliseconds).
/// Processes on one host (one time namespace) share it.
pub fn monotonic_micros() -> u64 {
    // CLOCK_MONOTONIC cannot fail on Linux; a zero reading only makes a heartbeat look old.
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0)
}

#[cfg(feature = "client")]
/// Blocks while `word` holds `expected`, until woken by [`futex_wake_all`] from any process
/// mapping the same memory, or `timeout` passes. Spurious returns are possible: callers
/// re-check their condition.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a valid, aligned u32 for the duration of the call; FUTEX_WAIT (not
    // PRIVATE) keys the wait on the underlying page, so other processes' wakes reach it.
    // The result is ignored: EAGAIN (value changed), EINTR and ETIMEDOUT all mean "re-check".
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

#[cfg(feature = "client")]
/// Wakes every process and thread blocked in [`futex_wait`] on `word`.
pub fn futex_wake_all(word: &AtomicU32) {
    // SAFETY: `word` is a valid, aligned u32; FUTEX_WAKE does not touch other memory.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

#[cfg(all(test, feature = "client"))]
mod futex_tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::Instant;

    #[test]
    fn wait_returns_at_once_when_value_differs() {
        let word = AtomicU32::new(5);
        let start = Instant::now();
        futex_wait(&word, 4, Duration::from_secs(5));
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn wake_releases_a_waiter_long_before_its_timeout() {
        let word = Arc::new(AtomicU32::new(0));
        let tid = Arc::new(std::sync::atomic::AtomicI32::new(0));
        let waiter = {
            let (word, tid) = (word.clone(), tid.clone());
            std::thread::spawn(move || {
                tid.store(nix::unistd::gettid().as_raw(), Ordering::Release);
                let start = Instant::now();
                while word.load(Ordering::Acquire) == 0 {
                    futex_wait(&word, 0, Duration::from_secs(20));
                }
                start.elapsed()
            })
        };
        // Wait until the waiter is asleep in the kernel, so the wake is what ends its wait.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let t = tid.load(Ordering::Acquire);
            let stat = std::fs::read_to_string(format!("/proc/self/task/{t}/stat"));
            if t != 0
                && stat.is_ok_and(|s| {
                    s.rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('S')
                })
            {
                break;
            }
            assert!(Instant::now() < deadline, "waiter never slept");
            std::thread::yield_now();
        }
        word.store(1, Ordering::Release);
        futex_wake_all(&word);
        let waited = waiter.join().unwrap();
        assert!(waited < Duration::from_secs(5), "waited {waited:?}");
    }

    #[test]
    fn wait_times_out() {
        let word = AtomicU32::new(0);
        let start = Instant::now();
        futex_wait(&word, 0, Duration::from_millis(20));
        assert!(start.elapsed() >= Duration::from_millis(15));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn clock_is_monotonic() {
        let a = super::monotonic_micros();
        let b = super::monotonic_micros();
        assert!(a > 0 && b >= a);
    }
}
