//! When a group member should give up on its membership and join again. A broker that
//! restarted without its state (its groups, its topics) can leave a member in the group
//! with nothing assigned, or waiting on a join the coordinator never answers (librdkafka
//! waits max.poll.interval.ms for it, an hour and more here), while the topics have
//! partitions nobody reads. Nothing in the protocol wakes such a member up, so it watches
//! itself: assigned nothing for `patience` while the topics have partitions, it joins
//! again as a new member, which makes the coordinator hand out every partition anew.
//!
//! A join under way may rightly wait on another member (a frozen one, or one that died
//! and whose session has yet to expire): the member then waits [`JOINING_FACTOR`] times
//! its patience before it gives up on the join.
//!
//! More members than partitions also leaves some with nothing, and rightly: the patience
//! doubles after each fruitless rejoin (up to a cap), so such a member does not keep the
//! group rebalancing; it starts over once it is given partitions.

use std::time::{Duration, Instant};

/// How many times its patience a member waits on a join under way.
pub(super) const JOINING_FACTOR: u32 = 4;

/// Tracks how long the member has had nothing assigned and decides when to rejoin.
#[derive(Debug)]
pub(super) struct Starvation {
    first: Duration,
    most: Duration,
    patience: Duration,
    /// Since when the member has had nothing assigned (`None`: it has partitions).
    since: Option<Instant>,
    /// The count of assignments and revokes at the last look.
    rebalances: u64,
}

impl Starvation {
    /// Rejoin after `first` with nothing assigned, then after twice as long, up to `most`.
    pub(super) fn new(first: Duration, most: Duration, now: Instant) -> Self {
        Self { first, most, patience: first, since: Some(now), rebalances: 0 }
    }

    /// `rebalances` assignments and revokes so far: one since the last look means the
    /// group is at work (partitions given, perhaps taken back before a look saw them), so
    /// a member with nothing counts its time from `now`.
    pub(super) fn rebalanced(&mut self, rebalances: u64, now: Instant) {
        if std::mem::replace(&mut self.rebalances, rebalances) != rebalances && self.since.is_some() {
            self.since = Some(now);
        }
    }

    /// Note how many partitions the member holds at `now`, and whether it is `settled`
    /// (joined, or not joining) rather than in the middle of a join; true when it has held
    /// none for longer than its patience (the caller checks the topics have partitions,
    /// then rejoins and calls [`Starvation::rejoined`]).
    pub(super) fn observe(&mut self, assigned: usize, settled: bool, now: Instant) -> bool {
        if assigned > 0 {
            self.since = None;
            self.patience = self.first;
            return false;
        }
        let since = *self.since.get_or_insert(now);
        let patience = if settled { self.patience } else { self.patience * JOINING_FACTOR };
        now.duration_since(since) >= patience
    }

    /// The member joined again at `now`: wait longer before the next time.
    pub(super) fn rejoined(&mut self, now: Instant) {
        self.since = Some(now);
        self.patience = (self.patience * 2).min(self.most);
    }

    /// The topics had no partitions at `now`: nothing to be assigned, nothing to fix yet.
    pub(super) fn nothing_to_assign(&mut self, now: Instant) {
        self.since = Some(now);
    }

    /// How long the member has had nothing assigned at `now`.
    pub(super) fn starved_for(&self, now: Instant) -> Duration {
        self.since.map_or(Duration::ZERO, |since| now.duration_since(since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_member_with_partitions_never_rejoins() {
        let t0 = Instant::now();
        let mut starvation = Starvation::new(10 * S, 300 * S, t0);
        for i in 0..100 {
            assert!(!starvation.observe(4, true, t0 + i * S));
        }
        assert_eq!(starvation.starved_for(t0 + 100 * S), Duration::ZERO);
    }

    #[test]
    fn a_starved_member_rejoins_after_its_patience_which_then_doubles() {
        let t0 = Instant::now();
        let mut starvation = Starvation::new(10 * S, 25 * S, t0);
        assert!(!starvation.observe(0, true, t0 + 9 * S));
        assert!(starvation.observe(0, true, t0 + 10 * S));
        starvation.rejoined(t0 + 10 * S);
        assert!(!starvation.observe(0, true, t0 + 29 * S));
        assert!(starvation.observe(0, true, t0 + 30 * S));
        starvation.rejoined(t0 + 30 * S);
        // Capped at 25 s.
        assert!(!starvation.observe(0, true, t0 + 54 * S));
        assert!(starvation.observe(0, true, t0 + 55 * S));
    }

    #[test]
    fn partitions_reset_the_patience_and_the_clock() {
        let t0 = Instant::now();
        let mut starvation = Starvation::new(10 * S, 300 * S, t0);
        assert!(starvation.observe(0, true, t0 + 10 * S));
        starvation.rejoined(t0 + 10 * S);
        assert!(!starvation.observe(2, true, t0 + 12 * S));
        // Revoked again later: the clock starts at the first empty look, patience is back to 10 s.
        assert!(!starvation.observe(0, true, t0 + 40 * S));
        assert!(!starvation.observe(0, true, t0 + 49 * S));
        assert!(starvation.observe(0, true, t0 + 50 * S));
    }

    #[test]
    fn no_partitions_to_assign_restarts_the_clock() {
        let t0 = Instant::now();
        let mut starvation = Starvation::new(10 * S, 300 * S, t0);
        assert!(starvation.observe(0, true, t0 + 10 * S));
        starvation.nothing_to_assign(t0 + 10 * S);
        assert!(!starvation.observe(0, true, t0 + 19 * S));
        assert!(starvation.observe(0, true, t0 + 20 * S));
    }

    #[test]
    fn a_rebalance_between_two_looks_restarts_the_clock() {
        let t0 = Instant::now();
        let mut starvation = Starvation::new(10 * S, 300 * S, t0);
        starvation.rebalanced(0, t0 + 9 * S);
        assert!(!starvation.observe(0, true, t0 + 9 * S));
        // Assigned and revoked between two looks.
        starvation.rebalanced(2, t0 + 10 * S);
        assert!(!starvation.observe(0, true, t0 + 10 * S));
        starvation.rebalanced(2, t0 + 19 * S);
        assert!(!starvation.observe(0, true, t0 + 19 * S));
        starvation.rebalanced(2, t0 + 20 * S);
        assert!(starvation.observe(0, true, t0 + 20 * S));
    }

    #[test]
    fn a_join_under_way_is_given_longer() {
        let t0 = Instant::now();
        let mut starvation = Starvation::new(10 * S, 300 * S, t0);
        assert!(!starvation.observe(0, false, t0 + 39 * S));
        assert!(starvation.observe(0, false, t0 + 40 * S));
        // It settles with nothing after all: the ordinary patience applies.
        starvation.nothing_to_assign(t0 + 40 * S);
        assert!(starvation.observe(0, true, t0 + 50 * S));
    }
}
