//! In-order offset bookkeeping: an offset may be stored only when it and every offset
//! before it on the partition are done, or a crash would skip unfinished messages.

use std::collections::BTreeMap;

#[derive(Debug, Default)]
pub struct PartitionOffsets {
    /// Offsets handed out and not yet stored; `true` once done.
    inflight: BTreeMap<i64, bool>,
}

impl PartitionOffsets {
    pub fn track(&mut self, offset: i64) {
        self.inflight.insert(offset, false);
    }

    /// Mark `offset` done; returns the offset to store when the done prefix grew.
    pub fn complete(&mut self, offset: i64) -> Option<i64> {
        match self.inflight.get_mut(&offset) {
            Some(done) => *done = true,
            None => return None,
        }
        let mut stored = None;
        while let Some(entry) = self.inflight.first_entry() {
            if !*entry.get() {
                break;
            }
            stored = Some(*entry.key());
            entry.remove();
        }
        stored
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_only_the_contiguous_done_prefix() {
        let mut p = PartitionOffsets::default();
        for o in [10, 11, 12, 13] {
            p.track(o);
        }
        assert_eq!(p.complete(12), None, "10 and 11 are still running");
        assert_eq!(p.complete(10), Some(10));
        assert_eq!(p.complete(11), Some(12), "11 completes the run up to 12");
        assert_eq!(p.complete(13), Some(13));
        assert_eq!(p.complete(13), None, "already stored");
        assert_eq!(p.complete(99), None, "never tracked (e.g. from before a rebalance)");
    }
}
