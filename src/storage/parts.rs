//! How a multipart write cuts a file into parts, by the store's rules: at most so many
//! parts per upload (S3 and GCS 10,000, Azure 50,000 blocks), none but the last below
//! 5 MiB, and on some stores (Cloudflare R2) every part but the last of one size.
//!
//! A file whose length is known is cut into equal parts, as small as the store's count
//! allows and at least 5 MiB: up to 48.8 GiB on S3 that is 5 MiB. A file whose length is
//! unknown until it ends (no `Content-Length`) starts with small parts and doubles their
//! size every tenth of the store's count, so a small file costs small buffers and the
//! largest file allowed still fits (ten tiers of 1,000 parts from 5 MiB hold 4.88 TiB on S3).
//! Where parts must be equal, a file of unknown length gets the part that would hold the
//! largest file allowed.

/// The smallest part but the last (S3's; the other stores take it too).
pub const MIN_PART: u64 = 5 * 1024 * 1024;
/// Part sizes a file of unknown length goes through: each the double of the one before.
const TIERS: u64 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartPlan {
    /// The most parts the store takes per upload.
    pub max_parts: u64,
    /// Whether every part but the last must be of one size.
    pub equal: bool,
    /// The largest file a write must take (`--max-file-size`).
    pub max_file_size: u64,
}

impl PartPlan {
    /// The part size for a file of `length` bytes, known before it is written.
    pub fn for_length(&self, length: u64) -> u64 {
        MIN_PART.max(length.div_ceil(self.max_parts))
    }

    /// The size of part `index` (from 0) of a file of `length` bytes, known or not.
    pub fn part(&self, length: Option<u64>, index: u64) -> u64 {
        match length {
            Some(length) => self.for_length(length),
            None => self.unknown_length(index),
        }
    }

    /// The size of the first part (every part's, when the length is known).
    pub fn first(&self, length: Option<u64>) -> u64 {
        self.part(length, 0)
    }

    /// The size of part `index` (from 0) of a file whose length is unknown.
    pub fn unknown_length(&self, index: u64) -> u64 {
        if self.equal {
            return self.for_length(self.max_file_size);
        }
        let tier = (self.max_parts / TIERS).max(1);
        // The tiers hold tier × base × (2^TIERS − 1) bytes in all.
        let base = MIN_PART.max(self.max_file_size.div_ceil(tier * ((1 << TIERS) - 1)));
        base << (index / tier).min(TIERS - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const TIB: u64 = 1 << 40;

    fn plan(max_file_size: u64) -> PartPlan {
        PartPlan { max_parts: 10_000, equal: false, max_file_size }
    }

    /// Bytes the store's count of parts holds for a file of unknown length.
    fn capacity(plan: &PartPlan) -> u64 {
        (0..plan.max_parts).map(|i| plan.unknown_length(i)).sum()
    }

    #[test]
    fn a_known_length_is_cut_into_equal_parts_within_the_count_and_never_below_5_mib() {
        let plan = plan(5 * TIB);
        assert_eq!(plan.for_length(1), MIN_PART);
        assert_eq!(plan.for_length(10_000 * MIN_PART), MIN_PART);
        assert_eq!(plan.for_length(10_000 * MIN_PART + 1), MIN_PART + 1);
        for length in [GIB, 100 * GIB, TIB, 5 * TIB] {
            let part = plan.for_length(length);
            assert!(part >= MIN_PART);
            assert!(length.div_ceil(part) <= 10_000, "{length} bytes in parts of {part}");
        }
    }

    #[test]
    fn an_unknown_length_starts_small_and_grows_so_the_largest_file_fits() {
        for max in [5 * GIB, 100 * GIB, 5 * TIB, 50 * TIB] {
            let plan = plan(max);
            assert!(capacity(&plan) >= max, "{max}: {}", capacity(&plan));
            assert!((1..plan.max_parts).all(|i| plan.unknown_length(i) >= plan.unknown_length(i - 1)));
        }
        // Up to 4.88 TiB allowed the first thousand parts are the smallest S3 takes.
        let default = plan(4 * TIB);
        assert_eq!(default.unknown_length(0), MIN_PART);
        assert_eq!(default.unknown_length(999), MIN_PART);
        assert_eq!(default.unknown_length(1_000), 2 * MIN_PART);
        assert_eq!(default.unknown_length(9_999), 512 * MIN_PART);
        // Azure's 50,000 blocks: tiers of 5,000.
        let azure = PartPlan { max_parts: 50_000, ..default };
        assert_eq!(azure.unknown_length(4_999), MIN_PART);
        assert!(capacity(&azure) >= 5 * TIB);
    }

    #[test]
    fn a_store_that_wants_equal_parts_gets_one_size_that_holds_the_largest_file() {
        let plan = PartPlan { equal: true, ..plan(5 * TIB) };
        let part = plan.unknown_length(0);
        assert!((0..plan.max_parts).all(|i| plan.unknown_length(i) == part));
        assert!(part * plan.max_parts >= 5 * TIB);
        assert_eq!(PartPlan { equal: true, ..plan }.for_length(GIB), MIN_PART);
    }
}
