//! Publishing a [`ClusterMap`] into a segment and copying it out again, under a seqlock:
//! the one writer (the tend-lock holder) never waits for readers, and a reader never sees a
//! torn map.
//!
//! Writer: make `seq` odd, release fence, store the tables, bump `generation`, make `seq`
//! even with a release store. Reader: acquire-load `seq` (retry while odd), copy the tables
//! with relaxed atomic loads (plain reads of memory another process writes would be a data
//! race, i.e. undefined behaviour), acquire fence, re-load `seq`; equal means the copy is one
//! whole map. A reader retries a bounded number of times and otherwise reports
//! [`ReadError::Contended`], so its caller keeps the snapshot it has. A writer that died
//! mid-publish leaves `seq` odd; the next writer simply moves on to the next odd value.
//!
//! Readers compare [`generation`] with their snapshot's first: an unchanged map costs one
//! atomic load and no copy.

use std::sync::atomic::{Ordering, fence};

use crate::error::{Error, Result};
use crate::layout::{NODE_ADDR_MAX, NodeEntry, View};
use crate::map::ClusterMap;
use crate::sys::{futex_wake_all, monotonic_micros};

/// Copy attempts before a reader gives up for now.
const READ_ATTEMPTS: usize = 200;
/// Attempts that spin before the reader starts yielding its CPU to the writer.
const SPIN_ATTEMPTS: usize = 16;

/// Why no map could be copied out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// No map has been published yet.
    NothingPublished,
    /// Every attempt overlapped a publish.
    Contended,
    /// A consistent copy was not a valid map (the writer is broken or not ours).
    Corrupt(String),
}

/// The generation of the published map (0 before the first publish).
pub fn generation(view: View<'_>) -> u32 {
    view.header.generation.load(Ordering::Acquire)
}

/// Publishes `map` and returns its generation. The caller must hold the tend lock: the
/// seqlock has exactly one writer.
pub fn publish(view: View<'_>, map: &ClusterMap) -> Result<u32> {
    let nodes = map.nodes();
    if nodes.len() > view.nodes.len() {
        return Err(Error::MapTooLarge {
            reason: format!(
                "{} nodes, the segment holds {} (option max_nodes)",
                nodes.len(),
                view.nodes.len()
            ),
        });
    }
    if let Some(addr) = nodes
        .iter()
        .find(|a| a.len() > NODE_ADDR_MAX || a.contains('\0'))
    {
        return Err(Error::MapTooLarge {
            reason: format!(
                "node address {addr:?} is longer than {NODE_ADDR_MAX} bytes or contains NUL"
            ),
        });
    }
    let h = view.header;
    let seq = h.seq.load(Ordering::Relaxed);
    let odd = if seq % 2 == 0 { seq + 1 } else { seq + 2 };
    h.seq.store(odd, Ordering::Relaxed);
    fence(Ordering::Release);
    h.node_count.store(nodes.len() as u32, Ordering::Relaxed);
    for (entry, addr) in view.nodes.iter().zip(nodes) {
        store_addr(entry, addr);
    }
    for (cell, &node) in view.slots.iter().zip(map.slots()) {
        cell.store(node, Ordering::Relaxed);
    }
    let generation = match h.generation.load(Ordering::Relaxed).wrapping_add(1) {
        0 => 1,
        g => g,
    };
    h.generation.store(generation, Ordering::Relaxed);
    h.published_us.store(monotonic_micros(), Ordering::Relaxed);
    h.seq.store(odd + 1, Ordering::Release);
    futex_wake_all(&h.generation);
    Ok(generation)
}

/// Copies the published map out, with its generation.
pub fn read(view: View<'_>) -> Result<(u32, ClusterMap), ReadError> {
    let h = view.header;
    let mut words = vec![[0u64; NODE_ADDR_MAX / 8]; view.nodes.len()];
    let mut slots = vec![0u16; view.slots.len()];
    for attempt in 0..READ_ATTEMPTS {
        if attempt >= SPIN_ATTEMPTS {
            std::thread::yield_now();
        } else if attempt > 0 {
            std::hint::spin_loop();
        }
        let before = h.seq.load(Ordering::Acquire);
        if before % 2 == 1 {
            continue;
        }
        let generation = h.generation.load(Ordering::Relaxed);
        if generation == 0 {
            return Err(ReadError::NothingPublished);
        }
        let count = h.node_count.load(Ordering::Relaxed) as usize;
        let copied = count.min(view.nodes.len());
        for (dst, entry) in words.iter_mut().zip(&view.nodes[..copied]) {
            for (d, w) in dst.iter_mut().zip(&entry.words) {
                *d = w.load(Ordering::Relaxed);
            }
        }
        for (dst, cell) in slots.iter_mut().zip(view.slots) {
            *dst = cell.load(Ordering::Relaxed);
        }
        fence(Ordering::Acquire);
        if h.seq.load(Ordering::Relaxed) != before {
            continue;
        }
        if count > view.nodes.len() {
            return Err(ReadError::Corrupt(format!(
                "node count {count} exceeds the table's {}",
                view.nodes.len()
            )));
        }
        let nodes = words[..count]
            .iter()
            .map(decode_addr)
            .collect::<Result<Vec<_>, _>>()?;
        return ClusterMap::from_parts(nodes, slots)
            .map(|map| (generation, map))
            .ok_or_else(|| {
                ReadError::Corrupt("a slot names a node that is not in the table".into())
            });
    }
    Err(ReadError::Contended)
}

fn store_addr(entry: &NodeEntry, addr: &str) {
    let mut bytes = [0u8; NODE_ADDR_MAX];
    bytes[..addr.len()].copy_from_slice(addr.as_bytes());
    for (word, chunk) in entry.words.iter().zip(bytes.chunks_exact(8)) {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        word.store(u64::from_le_bytes(w), Ordering::Relaxed);
    }
}

fn decode_addr(words: &[u64; NODE_ADDR_MAX / 8]) -> Result<String, ReadError> {
    let mut bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    if let Some(end) = bytes.iter().position(|&b| b == 0) {
        bytes.truncate(end);
    }
    String::from_utf8(bytes).map_err(|_| ReadError::Corrupt("node address is not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{NO_NODE, SLOT_COUNT};
    use crate::segment::attach;
    use std::path::Path;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64};
    use std::time::{Duration, Instant};

    #[test]
    fn publish_then_read_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rt-0000000000000001");
        let (writer, a) = attach(&path, 1, 4).unwrap();
        let (reader, b) = attach(&path, 1, 4).unwrap();
        assert_eq!(read(reader.view()), Err(ReadError::NothingPublished));
        let long = format!("{}:6379", "h".repeat(NODE_ADDR_MAX - 5));
        let map = ClusterMap::from_ranges([(0, 99, "127.0.0.1:7000"), (100, 16383, long.as_str())]);
        assert_eq!(publish(writer.view(), &map).unwrap(), 1);
        assert_eq!(generation(reader.view()), 1);
        let (generation_read, copy) = read(reader.view()).unwrap();
        assert_eq!(generation_read, 1);
        assert_eq!(copy, map);
        let smaller = ClusterMap::from_ranges([(0, 16383, "127.0.0.1:7001")]);
        assert_eq!(publish(writer.view(), &smaller).unwrap(), 2);
        assert_eq!(read(reader.view()).unwrap().1, smaller);
        a.detach().unwrap();
        b.detach().unwrap();
    }

    #[test]
    fn maps_that_do_not_fit_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (m, a) = attach(&dir.path().join("fit-0000000000000001"), 1, 2).unwrap();
        let three = ClusterMap::from_ranges([(0, 0, "a:1"), (1, 1, "b:1"), (2, 2, "c:1")]);
        assert!(matches!(
            publish(m.view(), &three),
            Err(Error::MapTooLarge { .. })
        ));
        let too_long = "x".repeat(NODE_ADDR_MAX + 1);
        let map = ClusterMap::from_ranges([(0, 0, too_long.as_str())]);
        assert!(matches!(
            publish(m.view(), &map),
            Err(Error::MapTooLarge { .. })
        ));
        assert_eq!(generation(m.view()), 0, "nothing was published");
        a.detach().unwrap();
    }

    #[test]
    fn a_writer_that_died_mid_publish_does_not_wedge_the_seqlock() {
        let dir = tempfile::tempdir().unwrap();
        let (m, a) = attach(&dir.path().join("odd-0000000000000001"), 1, 2).unwrap();
        m.view().header.seq.store(7, Ordering::Relaxed); // odd: a publish never finished
        m.view().header.generation.store(3, Ordering::Relaxed);
        assert_eq!(read(m.view()), Err(ReadError::Contended));
        let map = ClusterMap::from_ranges([(0, 16383, "a:1")]);
        assert_eq!(publish(m.view(), &map).unwrap(), 4);
        assert_eq!(read(m.view()).unwrap().1, map);
        a.detach().unwrap();
    }

    /// A map whose first node's name carries a checksum of everything else, so a reader can
    /// tell a whole map from a mix of two.
    fn checked_map(round: u64, max_nodes: usize) -> ClusterMap {
        let count = 2 + (round as usize % (max_nodes - 1));
        let mut rng = round.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut nodes: Vec<String> = (1..count)
            .map(|i| format!("10.0.{round}.{i}:{}", next() % 65536))
            .collect();
        let slots: Vec<u16> = (0..SLOT_COUNT)
            .map(|_| 1 + (next() % (count as u64 - 1)) as u16)
            .collect();
        nodes.insert(0, format!("{:016x}:0", checksum(&nodes, &slots)));
        ClusterMap::from_parts(nodes, slots).unwrap()
    }

    fn checksum(other_nodes: &[String], slots: &[u16]) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let bytes = other_nodes
            .iter()
            .flat_map(|n| n.bytes().chain([0]))
            .chain(slots.iter().flat_map(|s| s.to_le_bytes()));
        for b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }

    fn verify(map: &ClusterMap) -> Result<(), String> {
        let (first, rest) = map.nodes().split_first().ok_or("no nodes")?;
        let claimed = first.strip_suffix(":0").ok_or("no checksum node")?;
        let actual = format!("{:016x}", checksum(rest, map.slots()));
        if claimed != actual {
            return Err(format!("torn map: claims {claimed}, is {actual}"));
        }
        if map.slots().iter().any(|&s| s == 0 || s == NO_NODE) {
            return Err("slot points at the checksum node".into());
        }
        Ok(())
    }

    /// Republishes as fast as it can while three readers (each with its own mapping, as
    /// another process would have) copy and verify, until the writer has published `min_maps`
    /// and every reader has made `min_reads` clean copies. Counts, not a time window, decide
    /// when it ends, so a loaded machine makes it slower, not flaky; the deadline only guards
    /// against a hang.
    fn stress(path: &Path, min_maps: u64, min_reads: u64) -> (u64, Vec<(u64, u64)>) {
        let max_nodes = 16;
        let (writer, wa) = attach(path, 5, max_nodes).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let progress: Arc<Vec<AtomicU64>> = Arc::new((0..3).map(|_| AtomicU64::new(0)).collect());
        let readers: Vec<_> = (0..3)
            .map(|index| {
                let (path, stop, progress) = (path.to_path_buf(), stop.clone(), progress.clone());
                std::thread::spawn(move || {
                    let (mapping, member) = attach(&path, 5, max_nodes).unwrap();
                    let (mut clean, mut changes, mut last_gen) = (0u64, 0u64, 0u32);
                    while !stop.load(Ordering::Relaxed) {
                        match read(mapping.view()) {
                            Ok((generation, map)) => {
                                verify(&map).unwrap();
                                clean += 1;
                                progress[index].store(clean, Ordering::Relaxed);
                                if generation != last_gen {
                                    changes += 1;
                                    last_gen = generation;
                                }
                            }
                            Err(ReadError::Corrupt(e)) => panic!("corrupt read: {e}"),
                            Err(_) => {}
                        }
                    }
                    drop(mapping);
                    member.detach().unwrap();
                    (clean, changes)
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut published = 0u64;
        while published < min_maps
            || progress
                .iter()
                .any(|p| p.load(Ordering::Relaxed) < min_reads)
        {
            assert!(Instant::now() < deadline, "no progress in 120 s: hung?");
            let map = checked_map(published, max_nodes as usize);
            publish(writer.view(), &map).unwrap();
            published += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let results = readers.into_iter().map(|r| r.join().unwrap()).collect();
        drop(writer);
        wa.detach().unwrap();
        (published, results)
    }

    #[test]
    fn readers_never_see_a_torn_map_while_the_writer_republishes() {
        let dir = tempfile::tempdir().unwrap();
        let (published, readers) = stress(&dir.path().join("stress-0000000000000005"), 1000, 10);
        assert!(published >= 1000);
        for (clean, changes) in readers {
            assert!(clean >= 10, "a reader got only {clean} clean copies");
            assert!(changes > 1, "a reader saw only {changes} generations");
        }
    }

    #[test]
    fn checksum_catches_a_mixed_map() {
        let a = checked_map(1, 16);
        let b = checked_map(2, 16);
        let mut slots = a.slots().to_vec();
        slots[8000..].copy_from_slice(&b.slots()[8000..]);
        let nodes_count = a.nodes().len().max(b.nodes().len());
        let mut nodes = a.nodes().to_vec();
        nodes.resize(nodes_count, "pad:1".into());
        let mixed = ClusterMap::from_parts(nodes, slots).unwrap();
        assert!(verify(&a).is_ok() && verify(&b).is_ok());
        assert!(verify(&mixed).is_err());
    }
}
