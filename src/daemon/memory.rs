//! Giving memory back after a burst. clusterd runs on glibc's allocator, which keeps what a
//! burst freed (2,000 control connections, 64 scrapes at once) for its next allocations
//! instead of returning it to the system; [`Burst`] counts the connections of one kind and,
//! when the last of a burst of [`BURST`] or more has closed, asks the allocator to return
//! its free pages (`malloc_trim`). See bench/memory for the numbers and the allocators
//! measured.

use std::cell::Cell;
use std::rc::Rc;

/// Connections at once that make a burst worth a trim when they are all gone.
pub const BURST: usize = 16;

/// Open connections of one kind, and the most since the last trim. Lives on the loop's thread.
#[derive(Clone, Default)]
pub struct Burst(Rc<(Cell<usize>, Cell<usize>)>);

/// One open connection of a [`Burst`]; dropping it closes it.
pub struct Open(Burst);

impl Burst {
    /// A connection opened.
    pub fn open(&self) -> Open {
        let (open, peak) = &*self.0;
        open.set(open.get() + 1);
        peak.set(peak.get().max(open.get()));
        Open(self.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        let (open, peak) = &*(self.0).0;
        open.set(open.get() - 1);
        if open.get() == 0 && peak.get() >= BURST {
            peak.set(0);
            trim();
        }
    }
}

/// Returns the allocator's free memory to the system, where the allocator can (glibc).
pub fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes their locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_ends_when_its_last_connection_closes() {
        let burst = Burst::default();
        let open: Vec<Open> = (0..BURST).map(|_| burst.open()).collect();
        assert_eq!((burst.0.0.get(), burst.0.1.get()), (BURST, BURST));
        drop(open);
        // Trimmed: the next burst counts from nothing.
        assert_eq!((burst.0.0.get(), burst.0.1.get()), (0, 0));
        // A connection at a time is no burst: nothing to trim after it.
        drop(burst.open());
        assert_eq!((burst.0.0.get(), burst.0.1.get()), (0, 1));
    }
}
