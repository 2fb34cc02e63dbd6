//! One attempt at a claimed job: wait for a host place and a transfer slot, transfer under
//! the job's lease (renewed meanwhile, progress and cancels polled), then record the outcome.

use std::time::{Duration, Instant};

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::hosts::{NotNow, host_of};
use super::pool::{Slot, Transferring};
use super::progress::Progress;
use super::{WorkOutcome, Worker, WorkerError};
use crate::lifecycle::{Cause, Job, JobError, JobId, Settlement, StoredObject, lease_renew_interval, settle};
use crate::metadata::{Claim, JobRepository, Lease};
use crate::queue::Delivery;
use crate::storage::Fence;
use crate::telemetry::TraceParent;

/// How often a transfer under way records its progress and asks whether its job was cancelled.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// How an attempt's run ended.
// One per attempt, moved once: the outcome's size costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub(super) enum Ran {
    Done(Result<StoredObject, JobError>, Option<Transferring>, Instant),
    Stopped,
    /// The host is busy or asked for a pause: come back then. The job's place in the
    /// pool comes along, to be held a moment (see [`Slot::hold`]).
    NotNow(Instant, Option<Slot>),
}

/// What a claim left to do.
pub(super) enum Claimed {
    Job(Box<Job>),
    Done(WorkOutcome),
}

/// The fence a worker puts in front of the store: the object becomes visible only while
/// the worker still holds the job's lease, with at least `margin` left.
pub(super) struct LeaseFence<'a> {
    repo: &'a dyn JobRepository,
    id: JobId,
    owner: &'a str,
    margin: Duration,
}

#[async_trait::async_trait]
impl Fence for LeaseFence<'_> {
    async fn check(&self) -> Result<(), JobError> {
        match self.repo.holds(self.id, self.owner, self.margin).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                Err(JobError::transient("the job's lease was lost or nearly over before the object was stored"))
            }
            Err(e) => Err(JobError::transient(format!("cannot check the job's lease: {e}"))),
        }
    }
}

/// Put the trace id of a `traceparent` on the job's span (the request that created the job
/// logged the same one).
fn record_trace(span: &tracing::Span, trace: Option<&TraceParent>) {
    if let Some(trace) = trace {
        span.record("trace_id", trace.trace_id.as_str());
    }
}

impl Worker {
    /// See a delivery through once its job's claim is known: claim → attempt → record. In
    /// a pool, the job waits in its `slot` for a free transfer slot, and gives that up as
    /// soon as the transfer ends, for a place among the outcomes being recorded. Whatever
    /// fails on the way, the delivery is acknowledged, handed back or let go of: a worker
    /// never sits on a message.
    pub(super) async fn work(
        &self,
        delivery: Delivery,
        lease: Lease,
        claim: Claim,
        abort: &CancellationToken,
        slot: Option<Slot>,
    ) -> Result<WorkOutcome, WorkerError> {
        // Every line logged on the job's behalf (fetch, store, bookkeeping) names it.
        let span = tracing::info_span!("job", job_id = %delivery.job_id, trace_id = tracing::field::Empty);
        record_trace(&span, delivery.traceparent.as_deref().and_then(TraceParent::parse).as_ref());
        async move {
            let outcome = match self.claimed(&delivery, claim).await {
                Ok(Claimed::Job(job)) => {
                    let parent = job.traceparent.as_deref().and_then(TraceParent::parse);
                    record_trace(&tracing::Span::current(), parent.as_ref());
                    // The attempt, exported as a child of the request that created the job.
                    let transfer = tracing::info_span!("transfer", job_id = %job.id, attempt = job.retry_count + 1,
                        trace_id = tracing::field::Empty, otel.kind = "consumer", outcome = tracing::field::Empty,
                        otel.status_code = tracing::field::Empty, otel.status_description = tracing::field::Empty);
                    crate::telemetry::join(&transfer, parent.as_ref());
                    self.attempt_and_record(&delivery, &lease, *job, abort, slot).instrument(transfer).await
                }
                Ok(Claimed::Done(outcome)) => Ok(outcome),
                Err(e) => Err(e),
            };
            match outcome {
                Ok(WorkOutcome::LeaseLost(id)) => {
                    self.queue.abandon(&delivery).await;
                    Ok(WorkOutcome::LeaseLost(id))
                }
                Ok(outcome) => Ok(outcome),
                Err(e) => {
                    self.queue.abandon(&delivery).await;
                    Err(e)
                }
            }
        }
        .instrument(span)
        .await
    }

    /// What a claim means for the delivery: a job to work on, or an outcome already.
    pub(super) async fn claimed(&self, delivery: &Delivery, claim: Claim) -> Result<Claimed, WorkerError> {
        let id = delivery.job_id;
        let outcome = match claim {
            Claim::Claimed(job) => return Ok(Claimed::Job(job)),
            Claim::Busy { until } => {
                self.queue.defer(delivery, until).await?;
                WorkOutcome::Deferred(id)
            }
            Claim::Waiting { at } => {
                tracing::debug!(job_id = %id, "another job is writing the same object; delivery deferred");
                self.queue.retry(delivery, delivery.attempt, at).await?;
                WorkOutcome::Deferred(id)
            }
            Claim::NotDue { at } => {
                // Deliver it again when due (not only left to the reconciler): this may be
                // the retry's own message, released a moment early by a clock that differs
                // from the database's. Any other copy then finds the job taken and goes.
                tracing::info!(job_id = %id, due_at = %at.to_rfc3339(), "delivery came before the retry is due; deferred");
                self.queue.retry(delivery, delivery.attempt, at).await?;
                WorkOutcome::Deferred(id)
            }
            Claim::Finished(status) => {
                tracing::info!(job_id = %id, %status, "duplicate delivery of a finished job ignored");
                self.queue.ack(delivery).await?;
                WorkOutcome::Skipped(id)
            }
            Claim::NotFound => {
                tracing::warn!(job_id = %id, "delivery names an unknown job; dead-lettered");
                self.queue.dead_letter(delivery, "no such job").await?;
                WorkOutcome::Skipped(id)
            }
        };
        Ok(Claimed::Done(outcome))
    }

    /// Run one attempt at a claimed job under its lease, then record what it came to.
    pub(super) async fn attempt_and_record(
        &self,
        delivery: &Delivery,
        lease: &Lease,
        job: Job,
        abort: &CancellationToken,
        slot: Option<Slot>,
    ) -> Result<WorkOutcome, WorkerError> {
        let id = job.id;
        let attempt = job.retry_count + 1;
        // In a pool the job may have been claimed ahead of a free transfer slot: it waits
        // for one under its lease, and goes back to the queue if the pool stops meanwhile.
        // A job also waits for a place among its origin host's transfers (without holding a
        // transfer slot), or goes back to the queue while the host is busy or asked for a pause.
        let host = host_of(job.file_url.as_url());
        let run = async {
            if job.cancel_requested {
                // Cancelled while it waited for a retry or after its last worker was gone:
                // nothing to transfer, so no host place or transfer slot is taken.
                return Ran::Done(Err(JobError::cancelled()), None, Instant::now());
            }
            let _host = match self.hosts.enter(&host, job.grant.owner.as_deref().unwrap_or_default()).await {
                Ok(permit) => permit,
                Err(NotNow(until)) => return Ran::NotNow(until, slot),
            };
            let transferring = match slot {
                Some(slot) => match slot.start().await {
                    Some(transferring) => Some(transferring),
                    None => return Ran::Stopped,
                },
                None => None,
            };
            let started = Instant::now();
            let _in_flight = self.metrics.transfer();
            tracing::info!(job_id = %id, attempt, bucket = %job.bucket_name, key = %job.object_name, "job started");
            let fence = LeaseFence { repo: &*self.repo, id, owner: &lease.owner, margin: self.fence_margin() };
            let cancel = CancellationToken::new();
            let progress = Progress::default();
            let transfer = tokio::time::timeout(
                self.settings.transfer_timeout,
                self.transfer(&job, &lease.owner, &fence, &cancel, &progress),
            );
            let mut transfer = std::pin::pin!(transfer);
            let outcome = tokio::select! {
                outcome = &mut transfer => outcome,
                () = self.report_progress(id, &lease.owner, &progress, &cancel) => transfer.await,
            };
            let outcome = outcome.unwrap_or_else(|_| {
                Err(JobError::transient(format!(
                    "transfer did not finish within {}",
                    humantime::format_duration(self.settings.transfer_timeout)
                ))
                .because(Cause::Timeout))
            });
            match &outcome {
                Ok(_) => self.hosts.succeeded(&host),
                Err(e) if e.cause == Cause::Throttled => {
                    self.hosts.throttled(&host);
                    self.metrics.origin_throttled.inc();
                }
                Err(_) => {}
            }
            if let Err(JobError { retry_after: Some(pause), .. }) = &outcome {
                // The origin asked for a pause: its host's other jobs wait for it too.
                self.hosts.block(&host, Instant::now() + (*pause).min(self.settings.policy.max_delay));
            }
            Ran::Done(outcome, transferring, started)
        };
        let ran = tokio::select! {
            ran = run => ran,
            () = self.hold_lease(id, lease, delivery) => {
                tracing::warn!(job_id = %id, attempt, "lease lost; abandoning this attempt");
                return Ok(WorkOutcome::LeaseLost(id));
            }
            () = abort.cancelled() => Ran::Stopped,
        };
        let (outcome, transferring, started) = match ran {
            Ran::Done(outcome, transferring, started) => (outcome, transferring, started),
            Ran::Stopped => {
                self.repo.release(id, &lease.owner, Utc::now()).await?;
                self.queue.release(delivery).await?;
                tracing::info!(job_id = %id, attempt, "job handed back at shutdown");
                return Ok(WorkOutcome::HandedBack(id));
            }
            Ran::NotNow(until, admission) => {
                // Not an attempt: the job goes back to the queue, due when its host may be asked again.
                let due = Utc::now()
                    + chrono::Duration::from_std(until.saturating_duration_since(Instant::now())).unwrap_or_default();
                self.repo.release(id, &lease.owner, Utc::now()).await?;
                self.queue.retry(delivery, delivery.attempt, due).await?;
                tracing::debug!(job_id = %id, %host, due_at = %due.to_rfc3339(), "origin host busy or pausing; job deferred");
                if let Some(admission) = admission {
                    admission.hold(until).await;
                }
                return Ok(WorkOutcome::Deferred(id));
            }
        };
        let _recording = match transferring {
            Some(transferring) => Some(transferring.done().await),
            None => None,
        };
        let now = Utc::now();
        let transient = matches!(&outcome, Err(e) if e.is_transient());
        let settlement = settle(job.retry_count, outcome, &self.settings.policy, now, rand::random());
        if transient && matches!(settlement, Settlement::Failed { .. }) {
            // A transient error ended the job (its retries are spent): the checkpoint a next
            // attempt would have gone on from is dropped, with its partial write.
            self.forget_checkpoint(&job, true).await;
        }
        if !self.repo.settle(id, &lease.owner, &settlement, now).await? {
            tracing::warn!(job_id = %id, attempt, "lease lost before the outcome was recorded");
            return Ok(WorkOutcome::LeaseLost(id));
        }
        self.record(delivery, settlement, attempt, started.elapsed()).await
    }

    /// Tell the queue what the recorded outcome means for the delivery.
    pub(super) async fn record(
        &self,
        delivery: &Delivery,
        settlement: Settlement,
        attempt: u32,
        elapsed: Duration,
    ) -> Result<WorkOutcome, WorkerError> {
        let (id, elapsed_ms) = (delivery.job_id, elapsed.as_millis() as u64);
        self.metrics.outcome(&settlement, elapsed);
        let transfer = tracing::Span::current();
        transfer.record("outcome", settlement.name());
        if let Settlement::Failed { last_error, .. } | Settlement::RetryScheduled { last_error, .. } = &settlement {
            transfer.record("otel.status_code", "ERROR");
            transfer.record("otel.status_description", last_error.as_str());
        }
        Ok(match settlement {
            Settlement::Completed(stored) => {
                self.queue.finished(delivery, None).await?;
                tracing::info!(job_id = %id, attempt, outcome = "completed", size = stored.size,
                    etag = %stored.etag, elapsed_ms, "job completed");
                WorkOutcome::Completed(id)
            }
            Settlement::RetryScheduled { retry_count, last_error, due_at } => {
                self.queue.retry(delivery, retry_count + 1, due_at).await?;
                tracing::warn!(job_id = %id, attempt, outcome = "retry", error = %last_error,
                    due_at = %due_at.to_rfc3339(), elapsed_ms, "job attempt failed; retry scheduled");
                WorkOutcome::RetryScheduled { id, retry_count, due_at }
            }
            Settlement::Cancelled => {
                self.queue.finished(delivery, None).await?;
                tracing::info!(job_id = %id, attempt, outcome = "cancelled", elapsed_ms, "job cancelled");
                WorkOutcome::Cancelled(id)
            }
            Settlement::Failed { last_error, .. } => {
                self.queue.finished(delivery, Some(&last_error)).await?;
                tracing::error!(job_id = %id, attempt, outcome = "failed", error = %last_error,
                    elapsed_ms, "job failed");
                WorkOutcome::Failed { id, error: last_error }
            }
        })
    }

    /// About once a second, record the transfer's progress and ask whether a caller
    /// cancelled the job; when one did, fire `cancel` and return (never returns otherwise).
    pub(super) async fn report_progress(
        &self,
        id: JobId,
        owner: &str,
        progress: &Progress,
        cancel: &CancellationToken,
    ) {
        let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
        tick.tick().await;
        loop {
            tick.tick().await;
            let (done, total) = progress.read();
            match self.repo.report_progress(id, owner, done, total).await {
                Ok(Some(true)) => {
                    tracing::info!(job_id = %id, "cancel requested; stopping the transfer");
                    cancel.cancel();
                    return;
                }
                // Still running, or the lease is gone (the lease keeper notices that).
                Ok(_) => {}
                Err(e) => tracing::warn!(job_id = %id, error = %e, "cannot record the transfer's progress"),
            }
        }
    }

    /// How much of its lease a worker must still hold, by the database's clock, when it
    /// makes a stored object visible: one renewal interval.
    pub(super) fn fence_margin(&self) -> Duration {
        lease_renew_interval(self.settings.lease)
    }

    /// Renew the job's lease and the message's lock until the lease is lost (never returns
    /// while it is held).
    pub(super) async fn hold_lease(&self, id: JobId, lease: &Lease, delivery: &Delivery) {
        let mut tick = tokio::time::interval(lease_renew_interval(self.settings.lease));
        tick.tick().await;
        loop {
            tick.tick().await;
            match self.repo.renew(id, lease).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => tracing::warn!(job_id = %id, error = %e, "could not renew lease"),
            }
            if let Err(e) = self.queue.keep_alive(delivery).await {
                tracing::warn!(job_id = %id, error = %e, "could not keep the delivery alive");
            }
        }
    }
}
