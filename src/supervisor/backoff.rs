//! Crash backoff: how long a slot waits before replacing a worker that exited unexpectedly.
//! The first crash after a stable run is replaced at once; each further crash in a row doubles
//! the delay from `backoff_initial` up to `backoff_max`. A worker that stays up for
//! `backoff_reset` ends the streak.

use std::time::Duration;

use clusterd_manifest::Backoff;

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

/// The crash streak after an unexpected exit of a worker that ran for `uptime`.
pub fn next_streak(backoff: &Backoff, streak: u32, uptime: Duration) -> u32 {
    if uptime >= backoff.reset_after {
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

    #[test]
    fn a_stable_run_resets_the_streak() {
        assert_eq!(next_streak(&B, 5, Duration::from_secs(1)), 6);
        assert_eq!(next_streak(&B, 5, Duration::from_secs(10)), 1);
        assert_eq!(next_streak(&B, u32::MAX, Duration::ZERO), u32::MAX);
    }
}
