//! The memory budget of a worker process's transfers (`--max-memory`): each transfer
//! reserves what its buffers can hold at most before its body is read, so many slots
//! cost nothing while they wait on the network, and a process at full load stays within
//! the budget whatever the mix of small and large files.
//!
//! What a transfer reserves: [`PER_TRANSFER`] for its connection, hashers and bookkeeping,
//! plus the store's write buffer ([`ObjectStore::write_buffer`](crate::storage::ObjectStore::write_buffer))
//! or the file's length when that is smaller. Ranges fetched at once take one piece each
//! more, and only when the budget has room for them now (a segmented transfer never waits
//! for memory it can do without).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Reserved for every transfer besides its body's buffers: the origin connection's read
/// buffers, the hashers, the progress and checkpoint bookkeeping.
pub const PER_TRANSFER: u64 = 256 * 1024;
/// The budget is counted in these.
const UNIT: u64 = 64 * 1024;

/// What a worker process's transfers may hold in memory at once.
pub struct Memory {
    units: Arc<Semaphore>,
    total: u32,
}

/// Memory held for a transfer until dropped.
#[must_use = "the memory is given back when this is dropped"]
pub struct Reserved {
    _units: Option<OwnedSemaphorePermit>,
}

impl Memory {
    /// A budget of `bytes` (at least one unit).
    pub fn new(bytes: u64) -> Self {
        let total = u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX / 2).clamp(1, u32::MAX / 2);
        Self { units: Arc::new(Semaphore::new(total as usize)), total }
    }

    /// Units for `bytes`, never more than the whole budget (so a transfer larger than
    /// the budget waits for all of it instead of for ever).
    fn units_for(&self, bytes: u64) -> u32 {
        u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX).clamp(1, self.total)
    }

    /// Reserve `bytes`, waiting while the budget is spent.
    pub async fn reserve(&self, bytes: u64) -> Reserved {
        let units = self.units_for(bytes);
        let units = self.units.clone().acquire_many_owned(units).await.expect("the semaphore is never closed");
        Reserved { _units: Some(units) }
    }

    /// Reserve `bytes` only if the budget has room for them now.
    pub fn try_reserve(&self, bytes: u64) -> Option<Reserved> {
        let units = u32::try_from(bytes.div_ceil(UNIT)).ok()?;
        if units == 0 {
            return Some(Reserved { _units: None });
        }
        self.units.clone().try_acquire_many_owned(units).ok().map(|units| Reserved { _units: Some(units) })
    }

    /// Bytes reserved now.
    pub fn in_use(&self) -> u64 {
        u64::from(self.total).saturating_sub(self.units.available_permits() as u64) * UNIT
    }

    /// The whole budget, in bytes.
    pub fn total(&self) -> u64 {
        u64::from(self.total) * UNIT
    }
}

/// What a transfer of a body of `length` bytes (unknown: `None`) into a store whose writes
/// buffer at most `write_buffer` bytes reserves.
pub fn for_transfer(length: Option<u64>, write_buffer: u64) -> u64 {
    PER_TRANSFER + length.map_or(write_buffer, |l| l.min(write_buffer))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[tokio::test]
    async fn transfers_wait_while_the_budget_is_spent_and_go_on_when_it_is_given_back() {
        let memory = Memory::new(64 * MIB);
        let big = memory.reserve(for_transfer(None, 40 * MIB)).await;
        assert!(memory.in_use() > 40 * MIB);
        // A small file takes only what it needs: many fit beside the big one.
        let small: Vec<_> =
            futures::future::join_all((0..50).map(|_| memory.reserve(for_transfer(Some(16 * 1024), 40 * MIB)))).await;
        assert!(memory.in_use() < 64 * MIB);
        let waiting = memory.reserve(for_transfer(None, 40 * MIB));
        assert!(tokio::time::timeout(Duration::from_millis(50), waiting).await.is_err(), "over the budget, it waits");
        drop(big);
        let second =
            tokio::time::timeout(Duration::from_millis(50), memory.reserve(for_transfer(None, 40 * MIB))).await;
        assert!(second.is_ok(), "the big one's memory was given back");
        drop(small);
    }

    #[tokio::test]
    async fn a_transfer_larger_than_the_budget_takes_all_of_it_instead_of_waiting_for_ever() {
        let memory = Memory::new(8 * MIB);
        let all = tokio::time::timeout(Duration::from_millis(50), memory.reserve(100 * MIB)).await.unwrap();
        assert_eq!(memory.in_use(), memory.total());
        drop(all);
        assert_eq!(memory.in_use(), 0);
    }

    #[tokio::test]
    async fn extra_memory_is_taken_only_when_there_is_room_now() {
        let memory = Memory::new(40 * MIB);
        let _held = memory.reserve(10 * MIB).await;
        assert!(memory.try_reserve(31 * MIB).is_none(), "30 MiB free");
        let extra = memory.try_reserve(24 * MIB).expect("room for 24 MiB");
        assert!(memory.try_reserve(8 * MIB).is_none());
        drop(extra);
        assert!(memory.try_reserve(8 * MIB).is_some());
        assert!(memory.try_reserve(0).is_some());
    }
}
