//! How the core's instants are written across `clusterd upgrade`: as signed nanoseconds from
//! an anchor instant, so a reader that anchors at the same moment of its own clock gets every
//! deadline back at the same distance. `Instant` has no absolute value, so the anchor is
//! always given by the caller, and explicitly:
//!
//! - the core as a whole crosses as a [`Snapshot`](crate::Snapshot), taken with
//!   `Core::snapshot(now)` and read back with `Snapshot::restore(anchor)`: `Core` itself has
//!   no `Serialize`, so there is no other way to write it;
//! - any other instant (the daemon's own) crosses as an [`Offset`] it computes from the same
//!   anchor.
//!
//! Inside the crate, serde's derive cannot pass the anchor down to the fields that need it,
//! so `Core::snapshot` and `Snapshot::restore` set it in a thread-local for that one call
//! ([`at`], crate-private like the field helpers below): nothing outside the crate can
//! (de)serialize an instant without an anchor.

use std::cell::Cell;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

thread_local! {
    /// The instant that serialized offsets are relative to, while (de)serializing.
    static ANCHOR: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Runs `f` (a serialization or deserialization of core state) with instants written and read
/// relative to `anchor`.
pub(crate) fn at<R>(anchor: Instant, f: impl FnOnce() -> R) -> R {
    struct Reset(Option<Instant>);
    impl Drop for Reset {
        fn drop(&mut self) {
            ANCHOR.with(|a| a.set(self.0));
        }
    }
    let _reset = Reset(ANCHOR.with(|a| a.replace(Some(anchor))));
    f()
}

/// An instant as signed nanoseconds from an anchor: how the daemon writes an instant of its
/// own beside a [`Snapshot`](crate::Snapshot) taken with the same anchor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Offset(i64);

impl Offset {
    /// `at`, as its distance from `anchor` (saturating at about ±292 years).
    pub fn between(anchor: Instant, at: Instant) -> Offset {
        Offset(if at >= anchor {
            i64::try_from((at - anchor).as_nanos()).unwrap_or(i64::MAX)
        } else {
            -i64::try_from((anchor - at).as_nanos()).unwrap_or(i64::MAX)
        })
    }

    /// The instant at this distance from `anchor` (`None`: out of the clock's range).
    pub fn from(self, anchor: Instant) -> Option<Instant> {
        let offset = Duration::from_nanos(self.0.unsigned_abs());
        if self.0 >= 0 {
            anchor.checked_add(offset)
        } else {
            anchor.checked_sub(offset)
        }
    }
}

/// An [`Instant`] field as signed nanoseconds from the anchor.
pub(crate) mod instant {
    use super::*;
    use serde::{Deserializer, Serializer};

    const NO_ANCHOR: &str = "an instant outside of a snapshot";

    fn anchor() -> Option<Instant> {
        ANCHOR.with(Cell::get)
    }

    /// Writes `at`.
    pub fn serialize<S: Serializer>(at: &Instant, s: S) -> Result<S::Ok, S::Error> {
        let anchor = anchor().ok_or_else(|| serde::ser::Error::custom(NO_ANCHOR))?;
        Offset::between(anchor, *at).serialize(s)
    }

    /// Reads an instant.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Instant, D::Error> {
        let anchor = anchor().ok_or_else(|| serde::de::Error::custom(NO_ANCHOR))?;
        Offset::deserialize(d)?
            .from(anchor)
            .ok_or_else(|| serde::de::Error::custom("an instant out of range"))
    }
}

/// An `Option<Instant>`, as [`instant`] or null.
pub(crate) mod opt_instant {
    use super::*;
    use serde::{Deserializer, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Wrapped(#[serde(with = "super::instant")] Instant);

    /// Writes `at`.
    pub fn serialize<S: Serializer>(at: &Option<Instant>, s: S) -> Result<S::Ok, S::Error> {
        at.map(Wrapped).serialize(s)
    }

    /// Reads an optional instant.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Instant>, D::Error> {
        Ok(Option::<Wrapped>::deserialize(d)?.map(|w| w.0))
    }
}

/// A `VecDeque<Instant>`, each as [`instant`].
pub(crate) mod instants {
    use super::*;
    use serde::{Deserializer, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Wrapped(#[serde(with = "super::instant")] Instant);

    /// Writes the instants.
    pub fn serialize<S: Serializer>(at: &VecDeque<Instant>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(at.iter().copied().map(Wrapped))
    }

    /// Reads the instants.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<VecDeque<Instant>, D::Error> {
        Ok(Vec::<Wrapped>::deserialize(d)?
            .into_iter()
            .map(|w| w.0)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize)]
    struct At(#[serde(with = "instant")] Instant);

    #[test]
    fn an_instant_keeps_its_distance_from_the_anchor_and_needs_one() {
        let now = Instant::now();
        let later = now + Duration::from_secs(3);
        let json = at(now, || serde_json::to_string(&At(later))).expect("encode");
        assert_eq!(json, "3000000000");
        let anchor = now + Duration::from_secs(10);
        let back: At = at(anchor, || serde_json::from_str(&json)).expect("decode");
        assert_eq!(back.0, anchor + Duration::from_secs(3));
        assert!(serde_json::to_string(&At(later)).is_err());
    }

    #[test]
    fn an_offset_is_the_same_distance_either_side_of_its_anchor() {
        let anchor = Instant::now() + Duration::from_secs(100);
        for at in [
            anchor + Duration::from_millis(5),
            anchor - Duration::from_secs(7),
        ] {
            let offset = Offset::between(anchor, at);
            let json = serde_json::to_string(&offset).expect("encode");
            let back: Offset = serde_json::from_str(&json).expect("decode");
            let elsewhere = anchor + Duration::from_secs(1);
            assert_eq!(back.from(elsewhere), Some(at + Duration::from_secs(1)));
        }
        assert_eq!(
            serde_json::to_string(&Offset::between(anchor, anchor - Duration::from_secs(7)))
                .unwrap(),
            "-7000000000"
        );
    }
}
