//! How the core's instants are written across `clusterd upgrade`: as signed nanoseconds from
//! an anchor instant the caller gives ([`at`]), so a reader that anchors at the same moment of
//! its own clock gets every deadline back at the same distance. `Instant` has no absolute
//! value, so the anchor is set for the duration of one (de)serialization only, and writing an
//! instant outside of [`at`] is an error, not a guess.

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
pub fn at<R>(anchor: Instant, f: impl FnOnce() -> R) -> R {
    struct Reset(Option<Instant>);
    impl Drop for Reset {
        fn drop(&mut self) {
            ANCHOR.with(|a| a.set(self.0));
        }
    }
    let _reset = Reset(ANCHOR.with(|a| a.replace(Some(anchor))));
    f()
}

/// An [`Instant`] as signed nanoseconds from the anchor.
pub mod instant {
    use super::*;
    use serde::{Deserializer, Serializer};

    const NO_ANCHOR: &str = "an instant outside of a hand-over";

    fn anchor() -> Option<Instant> {
        ANCHOR.with(Cell::get)
    }

    /// Writes `at`.
    pub fn serialize<S: Serializer>(at: &Instant, s: S) -> Result<S::Ok, S::Error> {
        let anchor = anchor().ok_or_else(|| serde::ser::Error::custom(NO_ANCHOR))?;
        let nanos = if *at >= anchor {
            i64::try_from((*at - anchor).as_nanos()).unwrap_or(i64::MAX)
        } else {
            -i64::try_from((anchor - *at).as_nanos()).unwrap_or(i64::MAX)
        };
        s.serialize_i64(nanos)
    }

    /// Reads an instant.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Instant, D::Error> {
        let anchor = anchor().ok_or_else(|| serde::de::Error::custom(NO_ANCHOR))?;
        let nanos = i64::deserialize(d)?;
        let offset = Duration::from_nanos(nanos.unsigned_abs());
        let at = if nanos >= 0 {
            anchor.checked_add(offset)
        } else {
            anchor.checked_sub(offset)
        };
        at.ok_or_else(|| serde::de::Error::custom("an instant out of range"))
    }
}

/// An `Option<Instant>`, as [`instant`] or null.
pub mod opt_instant {
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
pub mod instants {
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
}
