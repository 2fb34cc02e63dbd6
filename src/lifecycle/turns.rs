//! Whose job goes next: waiting jobs are taken in turns across their owners (the API keys
//! that created them), each owner's share in proportion to its weight, and within an owner
//! in the order it was given (priority, then age).
//!
//! Stride scheduling: every owner has a `pass`; taking one of its jobs advances the pass
//! by 1/weight, and the next job is always the one with the lowest pass after it. A shared
//! `clock` (the pass of the last job taken) is where an owner that comes back from an idle
//! spell starts, so it gets its share from then on, not a burst that "catches up". Both
//! queues (the embedded one and the Kafka relay's outbox) keep the passes and the clock in
//! their database and ask this module which of the candidates to take.

/// One waiting job an owner could hand out next.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate<T> {
    /// The owner (an API key's id; `""` for jobs of the open API).
    pub owner: String,
    /// The owner's weight (at least 1).
    pub weight: u32,
    /// The owner's pass before this round.
    pub pass: f64,
    pub job: T,
}

/// What one round took.
#[derive(Debug, Clone, PartialEq)]
pub struct Turns<T> {
    /// The jobs taken, in the order they should run.
    pub taken: Vec<T>,
    /// Each owner that had jobs taken, with its new pass.
    pub passes: Vec<(String, f64)>,
    /// The new clock.
    pub clock: f64,
}

/// Take up to `max` of `candidates` in turns. The candidates of one owner must come in
/// the owner's own order (highest priority, then oldest, first); owners may interleave.
pub fn take_turns<T>(clock: f64, candidates: Vec<Candidate<T>>, max: usize) -> Turns<T> {
    // Each candidate's finish tag: its owner's start (never behind the clock) plus its
    // place in the owner's order over the weight.
    let mut seen: Vec<(String, f64, f64)> = Vec::new(); // owner, start, stride
    let mut tagged: Vec<(f64, usize, T)> = Vec::with_capacity(candidates.len());
    let mut places: Vec<u32> = Vec::new();
    for candidate in candidates {
        let at = match seen.iter().position(|(owner, ..)| *owner == candidate.owner) {
            Some(at) => at,
            None => {
                let stride = 1.0 / f64::from(candidate.weight.max(1));
                seen.push((candidate.owner, candidate.pass.max(clock), stride));
                places.push(0);
                seen.len() - 1
            }
        };
        places[at] += 1;
        let (_, start, stride) = &seen[at];
        tagged.push((start + f64::from(places[at]) * stride, at, candidate.job));
    }
    // Ties go to the owner seen first, then to the owner's own order (a stable sort).
    tagged.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    tagged.truncate(max);
    let mut counts = vec![0u32; seen.len()];
    let mut new_clock = clock;
    let taken = tagged
        .into_iter()
        .map(|(tag, at, job)| {
            counts[at] += 1;
            new_clock = new_clock.max(tag);
            job
        })
        .collect();
    let passes = seen
        .into_iter()
        .zip(counts)
        .filter(|(_, n)| *n > 0)
        .map(|((owner, start, stride), n)| (owner, start + f64::from(n) * stride))
        .collect();
    Turns { taken, passes, clock: new_clock }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jobs(owner: &str, weight: u32, pass: f64, n: usize) -> Vec<Candidate<String>> {
        (1..=n).map(|i| Candidate { owner: owner.into(), weight, pass, job: format!("{owner}{i}") }).collect()
    }

    #[test]
    fn owners_take_turns_whatever_their_backlog() {
        let mut candidates = jobs("a", 1, 0.0, 100);
        candidates.extend(jobs("b", 1, 0.0, 2));
        let turns = take_turns(0.0, candidates, 4);
        assert_eq!(turns.taken, ["a1", "b1", "a2", "b2"]);
        assert_eq!(turns.passes, [("a".to_owned(), 2.0), ("b".to_owned(), 2.0)]);
        assert_eq!(turns.clock, 2.0);
    }

    #[test]
    fn weights_share_in_proportion() {
        let mut candidates = jobs("heavy", 3, 0.0, 30);
        candidates.extend(jobs("light", 1, 0.0, 30));
        let turns = take_turns(0.0, candidates, 20);
        let heavy = turns.taken.iter().filter(|j| j.starts_with("heavy")).count();
        assert_eq!((heavy, 20 - heavy), (15, 5));
    }

    #[test]
    fn an_owner_back_from_idle_starts_at_the_clock() {
        // `b` was idle while `a` ran 1,000 jobs: b's old pass is far behind the clock.
        let mut candidates = jobs("a", 1, 1000.0, 10);
        candidates.extend(jobs("b", 1, 3.0, 10));
        let turns = take_turns(1000.0, candidates, 4);
        assert_eq!(turns.taken, ["a1", "b1", "a2", "b2"], "no burst for b");
    }

    #[test]
    fn an_owner_behind_goes_first_until_even() {
        let mut candidates = jobs("a", 1, 5.0, 10);
        candidates.extend(jobs("b", 1, 3.0, 10));
        let turns = take_turns(3.0, candidates, 4);
        assert_eq!(turns.taken, ["b1", "b2", "a1", "b3"]);
    }

    #[test]
    fn fewer_candidates_than_asked_takes_them_all() {
        let turns = take_turns(0.0, jobs("a", 1, 0.0, 2), 10);
        assert_eq!(turns.taken.len(), 2);
        assert!(take_turns::<String>(7.0, Vec::new(), 10).taken.is_empty());
        assert_eq!(take_turns::<String>(7.0, Vec::new(), 10).clock, 7.0);
    }
}
