//! [`ClusterMap`]: the cluster topology as a value — the node addresses and, for each of the
//! 16384 hash slots, the index of the node that serves it.

use crate::layout::{NO_NODE, SLOT_COUNT};

/// Which node serves each hash slot.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterMap {
    nodes: Vec<String>,
    slots: Box<[u16]>,
}

impl ClusterMap {
    /// A map in which no slot is served.
    pub fn empty() -> Self {
        ClusterMap {
            nodes: Vec::new(),
            slots: vec![NO_NODE; SLOT_COUNT].into_boxed_slice(),
        }
    }

    /// Builds a map from `(first_slot, last_slot, "host:port")` ranges (inclusive); slots
    /// above 16383 are ignored. Nodes are numbered in slot order, so the same topology gives
    /// an equal map whatever order a node listed it in (where ranges overlap, the range
    /// starting later wins).
    pub fn from_ranges<'a>(ranges: impl IntoIterator<Item = (u16, u16, &'a str)>) -> Self {
        let mut ranges: Vec<(u16, u16, &str)> = ranges.into_iter().collect();
        ranges.sort_by_key(|&(first, _, _)| first);
        let mut map = ClusterMap::empty();
        for (first, last, addr) in ranges {
            let node = map.node_index(addr);
            for slot in first..=last.min(SLOT_COUNT as u16 - 1) {
                map.slots[slot as usize] = node;
            }
        }
        map.prune();
        map
    }

    /// Builds a map from its raw parts; `None` unless `slots` has 16384 entries, each a valid
    /// index into `nodes` or `u16::MAX` (unserved).
    pub fn from_parts(nodes: Vec<String>, slots: Vec<u16>) -> Option<Self> {
        let valid = slots.len() == SLOT_COUNT
            && slots
                .iter()
                .all(|&n| n == NO_NODE || (n as usize) < nodes.len());
        valid.then(|| ClusterMap {
            nodes,
            slots: slots.into_boxed_slice(),
        })
    }

    /// The `host:port` of the node serving `slot`.
    pub fn node_for_slot(&self, slot: u16) -> Option<&str> {
        let node = *self.slots.get(slot as usize)?;
        self.nodes.get(node as usize).map(String::as_str)
    }

    /// The node addresses, indexed by the slot table.
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// The slot table: node index per slot, `u16::MAX` where no node serves the slot.
    pub fn slots(&self) -> &[u16] {
        &self.slots
    }

    /// Number of slots some node serves.
    pub fn served_slots(&self) -> usize {
        self.slots.iter().filter(|&&n| n != NO_NODE).count()
    }

    /// Records that `addr` now serves `slot` (what a `MOVED` reply says).
    pub fn set_slot(&mut self, slot: u16, addr: &str) {
        if (slot as usize) < SLOT_COUNT {
            let node = self.node_index(addr);
            self.slots[slot as usize] = node;
            self.prune();
        }
    }

    fn node_index(&mut self, addr: &str) -> u16 {
        match self.nodes.iter().position(|n| n == addr) {
            Some(i) => i as u16,
            None => {
                self.nodes.push(addr.to_string());
                (self.nodes.len() - 1) as u16
            }
        }
    }

    /// Drops nodes that serve no slot, renumbering the slot table.
    fn prune(&mut self) {
        let mut used = vec![false; self.nodes.len()];
        for &n in self.slots.iter().filter(|&&n| n != NO_NODE) {
            used[n as usize] = true;
        }
        if used.iter().all(|&u| u) {
            return;
        }
        let mut renumber = vec![NO_NODE; self.nodes.len()];
        let mut kept = Vec::new();
        for (i, node) in self.nodes.drain(..).enumerate() {
            if used[i] {
                renumber[i] = kept.len() as u16;
                kept.push(node);
            }
        }
        self.nodes = kept;
        for n in self.slots.iter_mut().filter(|n| **n != NO_NODE) {
            *n = renumber[*n as usize];
        }
    }
}

impl std::fmt::Debug for ClusterMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterMap")
            .field("nodes", &self.nodes)
            .field("served_slots", &self.served_slots())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_build_a_table() {
        let map = ClusterMap::from_ranges([
            (0, 5460, "a:1"),
            (5461, 10922, "b:2"),
            (10923, 16383, "c:3"),
        ]);
        assert_eq!(map.nodes(), ["a:1", "b:2", "c:3"]);
        assert_eq!(map.node_for_slot(0), Some("a:1"));
        assert_eq!(map.node_for_slot(5461), Some("b:2"));
        assert_eq!(map.node_for_slot(16383), Some("c:3"));
        assert_eq!(map.node_for_slot(16384), None);
        assert_eq!(map.served_slots(), SLOT_COUNT);
    }

    #[test]
    fn equal_topologies_give_equal_maps_whatever_the_order() {
        let a = ClusterMap::from_ranges([(0, 99, "a:1"), (100, 16383, "b:2")]);
        let b = ClusterMap::from_ranges([(100, 16383, "b:2"), (0, 99, "a:1")]);
        assert_eq!(a, b);
        assert_eq!(a.nodes(), ["a:1", "b:2"]);
    }

    #[test]
    fn moved_slots_update_and_prune() {
        let mut map = ClusterMap::from_ranges([(0, 0, "a:1"), (1, 16383, "b:2")]);
        map.set_slot(0, "c:3");
        assert_eq!(map.nodes(), ["b:2", "c:3"]);
        assert_eq!(map.node_for_slot(0), Some("c:3"));
        assert_eq!(map.node_for_slot(1), Some("b:2"));
    }

    #[test]
    fn unserved_slots_have_no_node() {
        let map = ClusterMap::from_ranges([(10, 20, "a:1")]);
        assert_eq!(map.node_for_slot(9), None);
        assert_eq!(map.served_slots(), 11);
        assert_eq!(ClusterMap::empty().node_for_slot(0), None);
    }

    #[test]
    fn from_parts_validates() {
        assert!(ClusterMap::from_parts(vec!["a:1".into()], vec![0; SLOT_COUNT]).is_some());
        assert!(ClusterMap::from_parts(vec!["a:1".into()], vec![1; SLOT_COUNT]).is_none());
        assert!(ClusterMap::from_parts(vec![], vec![NO_NODE; 3]).is_none());
    }
}
