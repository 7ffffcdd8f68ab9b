//! Crash backoff: how long a slot waits before replacing a worker that exited unexpectedly.
//!
//! Backoff is for crash loops, not for a worker that served and was then killed from outside.
//! - A worker that was **ready** and was then killed by a signal someone else sent (SIGKILL
//!   from the OOM killer or an operator, SIGTERM, SIGINT, SIGHUP) is not part of a crash loop:
//!   the streak is cleared and it is replaced at once, however often that happens.
//! - Any other unexpected end (an exit status, a crash signal such as SIGSEGV, a death before
//!   ready, a kill by clusterd's own watchdog or ready timeout) is a crash. The first crash
//!   after a stable run is replaced at once; each further crash in a row doubles the delay
//!   from `backoff_initial` up to `backoff_max`. A worker that stays up for `backoff_reset`
//!   ends the streak.

use std::time::Duration;

use clusterd_manifest::Backoff;
use clusterd_manifest::Signal;

use crate::process::ExitStatus;

/// How a worker that exited unexpectedly had lived and ended.
#[derive(Debug, Clone, Copy)]
pub struct End {
    /// From spawn to exit.
    pub uptime: Duration,
    /// Whether it had become ready.
    pub was_ready: bool,
    /// How it ended.
    pub status: ExitStatus,
    /// Whether clusterd itself killed it for a failure (watchdog, ready timeout).
    pub failed_check: bool,
}

impl End {
    /// A ready worker killed by a signal clusterd did not send for a failure.
    pub fn killed_from_outside(&self) -> bool {
        self.was_ready
            && !self.failed_check
            && matches!(
                self.status,
                ExitStatus::Signal(
                    Signal::SIGKILL | Signal::SIGTERM | Signal::SIGINT | Signal::SIGHUP
                )
            )
    }
}

/// The delay before the respawn that follows crash number `streak` (1-based) of a streak.
pub fn delay(backoff: &Backoff, streak: u32) -> Duration {
    match streak {
        0 | 1 => Duration::ZERO,
        n => {
            let factor = 1u32.checked_shl(n - 2).unwrap_or(u32::MAX);
            backoff.initial.saturating_mul(factor).min(backoff.max)
        }
    }
}

/// The crash streak after an unexpected end: 0 when it was no crash (the replacement starts
/// at once), 1 for a first crash after a stable run, one more for a crash in a row.
pub fn next_streak(backoff: &Backoff, streak: u32, end: &End) -> u32 {
    if end.killed_from_outside() {
        0
    } else if end.uptime >= backoff.reset_after {
        1
    } else {
        streak.saturating_add(1)
    }
}

/// A slot crashing this often in a row is reported as flapping.
pub const FLAPPING_STREAK: u32 = 3;

#[cfg(test)]
mod tests {
    use super::*;

    const B: Backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(2),
        reset_after: Duration::from_secs(10),
    };

    #[test]
    fn first_crash_is_immediate_then_doubles_up_to_the_cap() {
        let delays: Vec<_> = (1..=8).map(|n| delay(&B, n).as_millis()).collect();
        assert_eq!(delays, [0, 100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(delay(&B, u32::MAX), B.max);
    }

    fn end(secs: u64, was_ready: bool, status: ExitStatus) -> End {
        End {
            uptime: Duration::from_secs(secs),
            was_ready,
            status,
            failed_check: false,
        }
    }

    #[test]
    fn a_stable_run_resets_the_streak() {
        let crash = ExitStatus::Code(1);
        assert_eq!(next_streak(&B, 5, &end(1, true, crash)), 6);
        assert_eq!(next_streak(&B, 5, &end(10, true, crash)), 1);
        assert_eq!(next_streak(&B, u32::MAX, &end(0, false, crash)), u32::MAX);
    }

    #[test]
    fn an_outside_kill_of_a_ready_worker_is_no_crash() {
        let kill = ExitStatus::Signal(Signal::SIGKILL);
        assert_eq!(next_streak(&B, 5, &end(0, true, kill)), 0);
        assert_eq!(
            delay(&B, next_streak(&B, 5, &end(0, true, kill))),
            Duration::ZERO
        );
        // Before ready, or by clusterd's own watchdog, it is.
        assert_eq!(next_streak(&B, 5, &end(0, false, kill)), 6);
        let watchdog = End {
            failed_check: true,
            ..end(0, true, kill)
        };
        assert_eq!(next_streak(&B, 5, &watchdog), 6);
        // A crash signal is a crash.
        let segv = ExitStatus::Signal(Signal::SIGSEGV);
        assert_eq!(next_streak(&B, 5, &end(0, true, segv)), 6);
    }
}
