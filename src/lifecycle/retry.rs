use std::time::Duration;

use super::{Cause, ErrorKind, JobError};

/// Retries an origin's 429 or 503 gets (when retries are on at all, and unless
/// `max_retries` is higher): the host asked to slow down, the job did not fail, so it is
/// not given up after the few retries a failing transfer gets. With the default backoff
/// (1 s doubling, capped at 5 min) that is about 20 minutes of asking.
pub const THROTTLED_RETRIES: u32 = 10;

/// How many times and how patiently a job is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (the seed's 3: at most 4 attempts).
    pub max_retries: u32,
    /// The first backoff; each later one doubles.
    pub base_delay: Duration,
    /// No backoff, nor an honoured `Retry-After`, is longer than this.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { max_retries: 3, base_delay: Duration::from_secs(1), max_delay: Duration::from_secs(300) }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Try again after `delay`; `retry_count` is the job's count including this retry.
    Retry { retry_count: u32, delay: Duration },
    /// Stop: the error is permanent or the budget is spent.
    GiveUp,
}

impl RetryPolicy {
    /// Decide after a failed attempt, given how many retries the job already had.
    ///
    /// `jitter` is a number in `[0, 1)` supplied by the caller (random in production,
    /// fixed in tests); the backoff is drawn from `[delay/2, delay)` ("equal jitter"), so
    /// retries of many jobs that failed together spread out but never come too soon.
    pub fn decide(&self, retries_so_far: u32, error: &JobError, jitter: f64) -> Decision {
        let budget = match error.cause {
            Cause::Throttled if self.max_retries > 0 => self.max_retries.max(THROTTLED_RETRIES),
            _ => self.max_retries,
        };
        if error.kind != ErrorKind::Transient || retries_so_far >= budget {
            return Decision::GiveUp;
        }
        let exponential = self
            .base_delay
            .checked_mul(2u32.saturating_pow(retries_so_far))
            .unwrap_or(self.max_delay)
            .min(self.max_delay);
        let jitter = jitter.clamp(0.0, 1.0);
        let backoff = exponential.mul_f64(0.5 + jitter / 2.0);
        let delay = match error.retry_after {
            Some(asked) => asked.max(backoff).min(self.max_delay),
            None => backoff,
        };
        Decision::Retry { retry_count: retries_so_far + 1, delay }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy { max_retries: 3, base_delay: Duration::from_secs(1), max_delay: Duration::from_secs(60) }
    }

    #[test]
    fn a_throttled_job_is_given_more_retries_than_a_failing_one() {
        let throttled = JobError::transient("HTTP 429").because(Cause::Throttled);
        let failing = JobError::transient("connection reset");
        assert_eq!(policy().decide(3, &failing, 0.0), Decision::GiveUp);
        assert!(matches!(policy().decide(3, &throttled, 0.0), Decision::Retry { retry_count: 4, .. }));
        assert!(matches!(policy().decide(9, &throttled, 0.0), Decision::Retry { retry_count: 10, .. }));
        assert_eq!(policy().decide(10, &throttled, 0.0), Decision::GiveUp, "not for ever");
        let none = RetryPolicy { max_retries: 0, ..policy() };
        assert_eq!(none.decide(0, &throttled, 0.0), Decision::GiveUp, "no retries means none");
    }

    #[test]
    fn transient_errors_back_off_exponentially_within_the_jitter_band() {
        let err = JobError::transient("HTTP 503");
        let expected = [(0, 1), (1, 2), (2, 4)];
        for (retries, full_secs) in expected {
            let full = Duration::from_secs(full_secs);
            let low = policy().decide(retries, &err, 0.0);
            let high = policy().decide(retries, &err, 0.999_999);
            assert_eq!(low, Decision::Retry { retry_count: retries + 1, delay: full / 2 });
            match high {
                Decision::Retry { delay, .. } => {
                    assert!(delay < full && delay > full.mul_f64(0.99))
                }
                other => panic!("expected retry, got {other:?}"),
            }
        }
    }

    #[test]
    fn gives_up_when_the_budget_is_spent() {
        let err = JobError::transient("reset");
        assert!(matches!(policy().decide(2, &err, 0.5), Decision::Retry { retry_count: 3, .. }));
        assert_eq!(policy().decide(3, &err, 0.5), Decision::GiveUp);
        let none = RetryPolicy { max_retries: 0, ..policy() };
        assert_eq!(none.decide(0, &err, 0.5), Decision::GiveUp);
    }

    #[test]
    fn permanent_errors_are_never_retried() {
        assert_eq!(policy().decide(0, &JobError::permanent("HTTP 404"), 0.5), Decision::GiveUp);
    }

    #[test]
    fn backoff_is_capped() {
        let many = RetryPolicy { max_retries: 100, ..policy() };
        let err = JobError::transient("HTTP 500");
        for retries in [10, 31, 32, 60, 99] {
            match many.decide(retries, &err, 0.999) {
                Decision::Retry { delay, .. } => assert!(delay <= Duration::from_secs(60)),
                other => panic!("expected retry, got {other:?}"),
            }
        }
    }

    #[test]
    fn retry_after_is_honoured_up_to_the_cap() {
        let asked = |secs| JobError::transient("HTTP 429").with_retry_after(Some(Duration::from_secs(secs)));
        assert_eq!(
            policy().decide(0, &asked(30), 0.0),
            Decision::Retry { retry_count: 1, delay: Duration::from_secs(30) }
        );
        assert_eq!(
            policy().decide(0, &asked(3600), 0.0),
            Decision::Retry { retry_count: 1, delay: Duration::from_secs(60) }
        );
        // A Retry-After shorter than the backoff does not make the retry come sooner.
        assert_eq!(
            policy().decide(2, &asked(0), 0.0),
            Decision::Retry { retry_count: 3, delay: Duration::from_secs(2) }
        );
    }
}
