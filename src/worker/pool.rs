//! The pool: many jobs at once, claimed ahead of free transfer slots, each in a task.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::Worker;

/// A job's place in a pool: admitted (claimed, perhaps ahead of a free transfer slot),
/// then transferring, then recording its outcome.
pub(super) struct Slot {
    admitted: OwnedSemaphorePermit,
    transfers: Arc<Semaphore>,
    recording: Arc<Semaphore>,
    stop: CancellationToken,
}

impl Slot {
    /// Wait for a transfer slot; `None` if the pool is told to stop first.
    pub(super) async fn start(self) -> Option<Transferring> {
        let transfer = tokio::select! {
            biased;
            () = self.stop.cancelled() => return None,
            permit = self.transfers.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        Some(Transferring { admitted: self.admitted, transfer, recording: self.recording })
    }

    /// Keep this place until `until` (at most [`HOLD`]), or until the pool stops, for a job
    /// sent back because its host is busy: freed at once, the pool would claim the next job
    /// at once, and while one host's jobs fill the queue that is likely another of them,
    /// sent back in turn (a loop of claims and deferrals).
    pub(super) async fn hold(self, until: std::time::Instant) {
        let wait = until.saturating_duration_since(std::time::Instant::now()).min(HOLD);
        tokio::select! {
            () = self.stop.cancelled() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Longest a place is held for a job sent back (see [`Slot::hold`]).
const HOLD: Duration = Duration::from_secs(1);

/// A job whose transfer runs in one of the pool's slots.
pub(super) struct Transferring {
    admitted: OwnedSemaphorePermit,
    transfer: OwnedSemaphorePermit,
    recording: Arc<Semaphore>,
}

impl Transferring {
    /// The transfer has ended: take a place among the outcomes being recorded, then free
    /// the transfer slot (and the job's admission) for the next job. Waits while as many
    /// outcomes as the pool has slots are still being written, so a slow database holds
    /// transfers back.
    pub(super) async fn done(self) -> OwnedSemaphorePermit {
        let recording = self.recording.acquire_owned().await.expect("the semaphore is never closed");
        drop((self.transfer, self.admitted));
        recording
    }
}

/// Run up to `concurrency` transfers at a time until `stop` is cancelled; transfers under
/// way then run to their end unless `abort` is cancelled too, in which case they are
/// handed back, as are jobs still waiting for a slot.
///
/// One loop takes deliveries and claims their jobs together (a single write each for the
/// embedded queue and SQLite, however many jobs), then runs each job in a task of its own.
/// It keeps up to `concurrency` jobs claimed ahead of the transfers, so a slot that frees
/// starts its next job at once instead of waiting for the queue and the database; and a
/// job's outcome is recorded while the next transfer already runs in its slot. Bookkeeping
/// thus does not stand between transfers.
pub async fn run_pool(worker: Worker, concurrency: usize, stop: CancellationToken, abort: CancellationToken) {
    let concurrency = concurrency.max(1);
    let admitted = Arc::new(Semaphore::new(2 * concurrency));
    let transfers = Arc::new(Semaphore::new(concurrency));
    let recording = Arc::new(Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        while let Some(joined) = tasks.try_join_next() {
            log_panic(joined);
        }
        let first = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            permit = admitted.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let free = 1 + admitted.available_permits();
        let taken = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            deliveries = worker.queue.receive_many(free) => deliveries,
        };
        let claimed = match taken {
            Ok(deliveries) => worker.claim_all(&deliveries).await.map(|claims| deliveries.into_iter().zip(claims)),
            Err(e) => Err(e.into()),
        };
        let claimed = match claimed {
            Ok(claimed) => claimed,
            Err(e) => {
                // The deliveries were let go of; the jobs' records bring them back.
                tracing::error!(error = %e, "taking jobs failed; backing off");
                if back_off(&stop).await {
                    break;
                }
                continue;
            }
        };
        let mut first = Some(first);
        for (delivery, (lease, claim)) in claimed {
            // Only this loop takes admissions, so the ones counted free are still free.
            let permit = first.take().map_or_else(|| admitted.clone().try_acquire_owned(), Ok).expect("a free place");
            let slot = Slot {
                admitted: permit,
                transfers: transfers.clone(),
                recording: recording.clone(),
                stop: stop.clone(),
            };
            let (worker, stop, abort) = (worker.clone(), stop.clone(), abort.clone());
            tasks.spawn(async move {
                let held = delivery.clone();
                let step = AssertUnwindSafe(worker.work(delivery, lease, claim, &abort, Some(slot))).catch_unwind();
                match step.await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        // The delivery was let go of; the job's record brings it back.
                        tracing::error!(error = %e, "worker step failed; backing off");
                        back_off(&stop).await;
                    }
                    Err(panic) => {
                        // A bug, not a fault of the job: let go of the delivery all the same.
                        let what = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
                        tracing::error!(job_id = %held.job_id, panic = ?what, "worker step panicked; delivery let go of");
                        worker.queue.abandon(&held).await;
                    }
                }
            });
        }
    }
    while let Some(joined) = tasks.join_next().await {
        log_panic(joined);
    }
}

/// Wait a second before trying again after an infrastructure error; `true` if told to stop meanwhile.
pub(super) async fn back_off(stop: &CancellationToken) -> bool {
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(Duration::from_secs(1)) => false,
    }
}

pub(super) fn log_panic(joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined {
        tracing::error!(error = %e, "worker task panicked");
    }
}
