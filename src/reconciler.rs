//! The reconciler: the database is the source of truth and the queue only a hint. Every
//! process that runs the API sweeps now and then (one at a time across replicas) for jobs
//! that should be moving and are not, and announces them again: a `pending` job overdue by
//! more than the grace period (its message was lost by the broker, or dropped by a worker
//! that failed), a `processing` job whose lease lapsed (its worker died). Duplicates are
//! harmless: a claim is conditional, and a finished job's message is acknowledged.
//!
//! Overdue `pending` jobs are announced again only once the queue holds no backlog (Kafka:
//! the workers' group has consumed the jobs topic to its end), so jobs queued behind a
//! long backlog are not announced again and again. So, once the queue has caught up, no job
//! waits longer than its lease + the sweep interval + the grace period, whatever the
//! broker lost; a job whose worker died is announced again whatever the backlog.
//!
//! A backlog that has not moved for a whole grace period is not being worked on, and is
//! no reason to wait: a broker that lost its state can report messages nobody will ever
//! be given (Tansu, after a restart, counted 5 messages in partitions whose fetches
//! answered nothing, for good). Overdue jobs are then announced as if the queue had
//! caught up; at worst, a job is announced once more than needed.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metadata::{IDEMPOTENCY_WINDOW, JobRepository, Sweep};
use crate::metrics::{Kind, Metrics};
use crate::queue::Backlog;

/// Most jobs announced again per sweep, so one sweep stays a bounded piece of work.
pub const SWEEP_LIMIT: u32 = 1000;

#[derive(Debug, Clone, Copy)]
pub struct ReconcileSettings {
    pub interval: Duration,
    pub grace: Duration,
    /// Finished jobs older than this are deleted (`None`: kept for good).
    pub retention: Option<Duration>,
}

/// Sweep every `interval` until `stop`; failures are logged and tried again next time.
/// `backlog` tells whether the queue has caught up (`None`: a queue inside the database).
pub async fn run(
    repo: Arc<dyn JobRepository>,
    backlog: Option<Arc<dyn Backlog>>,
    settings: ReconcileSettings,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Since when overdue `pending` jobs have been held back (the queue not caught up, or
    // not known to be), and when that was last said.
    let mut held_back: Option<(std::time::Instant, std::time::Instant)> = None;
    let mut unmoved = Unmoved::default();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let started = std::time::Instant::now();
        let pending = match &backlog {
            None => true,
            Some(backlog) => {
                let lag = backlog.lag().await;
                if let Ok(lag) = &lag {
                    metrics.consumer_lag.set(i64::try_from(*lag).unwrap_or(i64::MAX));
                }
                let stalled = unmoved.observe(lag.as_ref().ok().copied(), std::time::Instant::now(), settings.grace);
                let announce = matches!(lag, Ok(0)) || stalled;
                note_held_back(&mut held_back, announce, &lag);
                announce
            }
        };
        let sweep = Sweep { grace: settings.grace, limit: SWEEP_LIMIT, pending };
        match repo.reconcile(&sweep).await {
            Ok(swept) if swept.total() > 0 => {
                metrics.reannounced.get_or_create(&Kind { kind: "pending" }).inc_by(swept.pending);
                metrics.reannounced.get_or_create(&Kind { kind: "expired_lease" }).inc_by(swept.expired);
                tracing::warn!(
                    pending = swept.pending,
                    expired_leases = swept.expired,
                    "reconciler announced stuck jobs again"
                )
            }
            Ok(_) => tracing::debug!("reconciler found nothing stuck"),
            Err(e) => tracing::warn!(error = %e, "reconciler sweep failed; will try again"),
        }
        // Idempotency keys are kept for a day; the sweep clears older ones, a bounded batch at a time.
        let before = chrono::Utc::now() - chrono::Duration::from_std(IDEMPOTENCY_WINDOW).expect("a day fits");
        if let Err(e) = repo.forget_idempotency_keys(before, SWEEP_LIMIT).await {
            tracing::warn!(error = %e, "cannot clear old idempotency keys; will try again");
        }
        // Retention: finished jobs past their age go, a bounded batch per sweep.
        if let Some(age) = settings.retention.and_then(|age| chrono::Duration::from_std(age).ok()) {
            match repo.forget_finished(chrono::Utc::now() - age, SWEEP_LIMIT).await {
                Ok(0) => {}
                Ok(deleted) => tracing::info!(deleted, "deleted finished jobs past the retention age"),
                Err(e) => tracing::warn!(error = %e, "cannot delete old finished jobs; will try again"),
            }
        }
        metrics.sweep_duration.observe(started.elapsed().as_secs_f64());
    }
}

/// How long the queue's backlog has stood still: the same number of messages not consumed,
/// reading after reading.
#[derive(Debug, Default)]
struct Unmoved {
    /// The backlog, and since when it has been the same.
    since: Option<(u64, std::time::Instant)>,
    /// Whether this standstill was logged already.
    said: bool,
}

impl Unmoved {
    /// Note the backlog read at `now` (`None`: it could not be read); true when there is
    /// one and it has not moved for `patience`.
    fn observe(&mut self, lag: Option<u64>, now: std::time::Instant, patience: Duration) -> bool {
        let Some(lag) = lag.filter(|lag| *lag > 0) else {
            *self = Self::default();
            return false;
        };
        let since = match self.since {
            Some((before, since)) if before == lag => since,
            _ => {
                *self = Self { since: Some((lag, now)), said: false };
                now
            }
        };
        let stalled = now.duration_since(since) >= patience;
        if stalled && !std::mem::replace(&mut self.said, true) {
            tracing::warn!(
                lag,
                unmoved_ms = now.duration_since(since).as_millis() as u64,
                "the queue's backlog has not moved for a grace period: announcing overdue pending jobs anyway"
            );
        }
        stalled
    }
}

/// Held back this long, the reconciler says so (and again as often), with the lag or the
/// error: overdue jobs wait on the queue, and whoever reads the log should know why.
const HELD_BACK_REPORT: Duration = Duration::from_secs(30);

fn note_held_back(
    held_back: &mut Option<(std::time::Instant, std::time::Instant)>,
    caught_up: bool,
    lag: &Result<u64, crate::queue::QueueError>,
) {
    let now = std::time::Instant::now();
    if caught_up {
        if let Some((since, _)) = held_back.take()
            && now.duration_since(since) >= HELD_BACK_REPORT
        {
            tracing::info!(held_back_ms = now.duration_since(since).as_millis() as u64, "the queue has caught up");
        }
        return;
    }
    let (since, said) = held_back.get_or_insert((now, now));
    if now.duration_since(*said) < HELD_BACK_REPORT {
        if let Err(e) = lag {
            tracing::debug!(error = %e, "cannot tell whether the queue has caught up");
        }
        return;
    }
    *said = now;
    let held_back_ms = now.duration_since(*since).as_millis() as u64;
    match lag {
        Ok(lag) => tracing::warn!(lag, held_back_ms, "overdue pending jobs held back: the queue has not caught up"),
        Err(e) => {
            tracing::warn!(error = %e, held_back_ms, "overdue pending jobs held back: cannot tell whether the queue has caught up")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_backlog_that_stands_still_for_a_grace_period_is_not_waited_on() {
        let t0 = std::time::Instant::now();
        let mut unmoved = Unmoved::default();
        assert!(!unmoved.observe(Some(5), t0, 3 * S));
        assert!(!unmoved.observe(Some(5), t0 + 2 * S, 3 * S));
        assert!(unmoved.observe(Some(5), t0 + 3 * S, 3 * S));
        assert!(unmoved.observe(Some(5), t0 + 4 * S, 3 * S));
    }

    #[test]
    fn a_backlog_that_moves_is_waited_on() {
        let t0 = std::time::Instant::now();
        let mut unmoved = Unmoved::default();
        for (i, lag) in [9, 8, 8, 7, 9, 6, 5, 4].into_iter().enumerate() {
            let at = t0 + u32::try_from(i).unwrap() * 2 * S;
            assert!(!unmoved.observe(Some(lag), at, 3 * S), "lag {lag} read at {i}");
        }
    }

    #[test]
    fn no_backlog_or_no_reading_starts_the_clock_again() {
        let t0 = std::time::Instant::now();
        let mut unmoved = Unmoved::default();
        assert!(!unmoved.observe(Some(5), t0, 3 * S));
        assert!(!unmoved.observe(None, t0 + 2 * S, 3 * S));
        assert!(!unmoved.observe(Some(5), t0 + 3 * S, 3 * S));
        assert!(!unmoved.observe(Some(0), t0 + 5 * S, 3 * S));
        assert!(!unmoved.observe(Some(5), t0 + 6 * S, 3 * S));
        assert!(unmoved.observe(Some(5), t0 + 9 * S, 3 * S));
    }
}
