//! The reconciler: the database is the source of truth and the queue only a hint. Every
//! process that runs the API sweeps now and then (one at a time across replicas) for jobs
//! that should be moving and are not, and announces them again: a `pending` job overdue by
//! more than the grace period (its message was lost by the broker, or dropped by a worker
//! that failed), a `processing` job whose lease lapsed (its worker died). Duplicates are
//! harmless: a claim is conditional, and a finished job's message is acknowledged.
//!
//! So no job waits longer than its lease + the sweep interval + the grace period, whatever
//! the broker lost.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metadata::JobRepository;

/// Most jobs announced again per sweep, so one sweep stays a bounded piece of work.
pub const SWEEP_LIMIT: u32 = 1000;

#[derive(Debug, Clone, Copy)]
pub struct ReconcileSettings {
    pub interval: Duration,
    pub grace: Duration,
}

/// Sweep every `interval` until `stop`; failures are logged and tried again next time.
pub async fn run(repo: Arc<dyn JobRepository>, settings: ReconcileSettings, stop: CancellationToken) {
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match repo.reconcile(settings.grace, SWEEP_LIMIT).await {
            Ok(swept) if swept.total() > 0 => tracing::warn!(
                pending = swept.pending,
                expired_leases = swept.expired,
                "reconciler announced stuck jobs again"
            ),
            Ok(_) => tracing::debug!("reconciler found nothing stuck"),
            Err(e) => tracing::warn!(error = %e, "reconciler sweep failed; will try again"),
        }
    }
}
