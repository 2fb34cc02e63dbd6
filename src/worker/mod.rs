//! Workers: take a delivery, claim its job, stream origin → store, record the outcome.
//!
//! [`Worker::run_once`] is one step (receive one message and see it through), so tests
//! can drive a worker without sleeping; [`run_pool`] runs steps concurrently until told
//! to stop.

mod hosts;
mod resume;
mod sniff;
mod verify;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::{FutureExt as _, StreamExt as _};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use url::Url;

use crate::domain::{BucketName, ObjectKey, RequestHeaders};
use crate::fetch::{Fetcher, MinRate, at_least};
use crate::lifecycle::{
    Cause, IfExists, Job, JobError, JobId, RetryPolicy, Settlement, StoredObject, lease_renew_interval, settle,
};
use crate::metadata::{Claim, JobRepository, Lease, RepoError};
use crate::metrics::Metrics;
use crate::queue::{Delivery, Queue, QueueError};
use crate::secrets::HeaderSealer;
use crate::storage::{ByteStream, Fence, ObjectStore, WriteOptions, split_at_parts};
use crate::telemetry::TraceParent;
pub use hosts::Hosts;
use hosts::{NotNow, host_of};

use resume::{Checkpoint, Recorder};
pub use verify::{Digests, Expectations, HashState, Verifier, verified};

/// A fence that also refuses when an object appeared at the key meanwhile (`if_exists: fail`).
struct AbsentFence<'a> {
    inner: &'a dyn Fence,
    store: &'a dyn ObjectStore,
    bucket: &'a BucketName,
    key: &'a ObjectKey,
}

#[async_trait::async_trait]
impl Fence for AbsentFence<'_> {
    async fn check(&self) -> Result<(), JobError> {
        self.inner.check().await?;
        match self.store.head(self.bucket, self.key).await {
            Ok(None) => Ok(()),
            Ok(Some(_)) => Err(object_exists(self.bucket, self.key)),
            Err(e) => Err(JobError::transient(format!("cannot tell whether {}/{} exists: {e}", self.bucket, self.key))
                .because(Cause::Store)),
        }
    }
}

fn object_exists(bucket: &BucketName, key: &ObjectKey) -> JobError {
    JobError::permanent(format!("{bucket}/{key} already exists (if_exists: fail)")).because(Cause::Exists)
}

/// How often a transfer under way records its progress and asks whether its job was cancelled.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// Bytes a transfer has received, and the size its origin declared.
#[derive(Debug, Clone)]
struct Progress(Arc<(AtomicU64, AtomicU64)>);

impl Default for Progress {
    fn default() -> Self {
        Self(Arc::new((AtomicU64::new(0), AtomicU64::new(Self::UNKNOWN))))
    }
}

impl Progress {
    /// No size declared.
    const UNKNOWN: u64 = u64::MAX;

    /// The transfer starts at byte `done` of a file of `total` bytes.
    fn start(&self, done: u64, total: Option<u64>) {
        self.0.0.store(done, Ordering::Relaxed);
        self.0.1.store(total.unwrap_or(Self::UNKNOWN), Ordering::Relaxed);
    }

    fn read(&self) -> (u64, Option<u64>) {
        let total = self.0.1.load(Ordering::Relaxed);
        (self.0.0.load(Ordering::Relaxed), (total != Self::UNKNOWN).then_some(total))
    }

    /// `body`, counted as it goes by.
    fn count(&self, body: ByteStream) -> ByteStream {
        let counter = self.clone();
        body.inspect(move |chunk| {
            if let Ok(chunk) = chunk {
                counter.0.0.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        })
        .boxed()
    }
}

/// `body`, ended with a "cancelled" error as soon as `cancel` fires (also while it waits
/// for the origin).
fn until_cancelled(body: ByteStream, cancel: CancellationToken) -> ByteStream {
    let stopped = cancel.clone();
    let cancelled = futures::stream::once(async move { stopped.is_cancelled() })
        .filter_map(|stopped| async move { stopped.then(|| Err(JobError::cancelled())) });
    body.take_until(cancel.cancelled_owned()).chain(cancelled).boxed()
}

/// How workers behave.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub policy: RetryPolicy,
    /// How long a claim lasts without renewal; a dead worker's job waits this long.
    pub lease: Duration,
    pub max_file_size: u64,
    /// Longest one attempt may take, however the origin trickles.
    pub transfer_timeout: Duration,
    /// The slowest an origin may send, averaged over a window, before the attempt is cut.
    pub min_rate: MinRate,
}

/// What one step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkOutcome {
    Completed(JobId),
    RetryScheduled {
        id: JobId,
        retry_count: u32,
        due_at: DateTime<Utc>,
    },
    Failed {
        id: JobId,
        error: String,
    },
    /// A caller cancelled the job; the transfer stopped and nothing was stored.
    Cancelled(JobId),
    /// The message named a job that needs no work (finished or unknown); it was acknowledged.
    Skipped(JobId),
    /// Another worker holds the job; the message will come back when that lease ends.
    Deferred(JobId),
    /// Shutdown: the job and its message were handed back untouched.
    HandedBack(JobId),
    /// The lease was lost mid-way (this worker stalled); the new holder owns the job.
    LeaseLost(JobId),
}

/// A failure of fileflow's own infrastructure (database, queue), not of a job.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

#[derive(Clone)]
pub struct Worker {
    pub repo: Arc<dyn JobRepository>,
    pub queue: Arc<dyn Queue>,
    pub store: Arc<dyn ObjectStore>,
    pub fetcher: Arc<dyn Fetcher>,
    /// Opens the jobs' encrypted origin headers.
    pub sealer: Arc<HeaderSealer>,
    /// Transfers in flight per origin host, and hosts that asked for a pause.
    pub hosts: Arc<Hosts>,
    pub settings: WorkerSettings,
    pub metrics: Arc<Metrics>,
}

impl Worker {
    /// Receive one message and see it through. `abort` hands the job back unfinished.
    pub async fn run_once(&self, abort: &CancellationToken) -> Result<WorkOutcome, WorkerError> {
        let delivery = self.queue.receive().await?;
        self.handle(delivery, abort).await
    }

    /// Claim the delivery's job and see it through. On an infrastructure error the
    /// delivery is let go of (see [`Queue::abandon`]) before the error is returned.
    pub async fn handle(&self, delivery: Delivery, abort: &CancellationToken) -> Result<WorkOutcome, WorkerError> {
        let (lease, claim) = self.claim_all(std::slice::from_ref(&delivery)).await?.pop().expect("one claim asked");
        self.work(delivery, lease, claim, abort, None).await
    }

    /// Claim the jobs of several deliveries at once (one request to the repository), each
    /// under a lease of its own. If that fails, every delivery is let go of.
    async fn claim_all(&self, deliveries: &[Delivery]) -> Result<Vec<(Lease, Claim)>, WorkerError> {
        let requests: Vec<_> =
            deliveries.iter().map(|d| (d.job_id, Lease::for_claim(&d.token, self.settings.lease))).collect();
        match self.repo.claim_many(&requests).await {
            Ok(claims) => Ok(requests.into_iter().map(|(_, lease)| lease).zip(claims).collect()),
            Err(e) => {
                futures::future::join_all(deliveries.iter().map(|d| self.queue.abandon(d))).await;
                Err(e.into())
            }
        }
    }

    /// See a delivery through once its job's claim is known: claim → attempt → record. In
    /// a pool, the job waits in its `slot` for a free transfer slot, and gives that up as
    /// soon as the transfer ends, for a place among the outcomes being recorded. Whatever
    /// fails on the way, the delivery is acknowledged, handed back or let go of: a worker
    /// never sits on a message.
    async fn work(
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
    async fn claimed(&self, delivery: &Delivery, claim: Claim) -> Result<Claimed, WorkerError> {
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
    async fn attempt_and_record(
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
        let host = Url::parse(&job.file_url).map(|url| host_of(&url)).unwrap_or_default();
        let run = async {
            if job.cancel_requested {
                // Cancelled while it waited for a retry or after its last worker was gone:
                // nothing to transfer, so no host place or transfer slot is taken.
                return Ran::Done(Err(JobError::cancelled()), None, Instant::now());
            }
            let _host = match self.hosts.enter(&host).await {
                Ok(permit) => permit,
                Err(NotNow(until)) => return Ran::NotNow(until),
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
            Ran::NotNow(until) => {
                // Not an attempt: the job goes back to the queue, due when its host may be asked again.
                let due = Utc::now()
                    + chrono::Duration::from_std(until.saturating_duration_since(Instant::now())).unwrap_or_default();
                self.repo.release(id, &lease.owner, Utc::now()).await?;
                self.queue.retry(delivery, delivery.attempt, due).await?;
                tracing::info!(job_id = %id, %host, due_at = %due.to_rfc3339(), "origin host busy or pausing; job deferred");
                return Ok(WorkOutcome::Deferred(id));
            }
        };
        let _recording = match transferring {
            Some(transferring) => Some(transferring.done().await),
            None => None,
        };
        let now = Utc::now();
        let settlement = settle(job.retry_count, outcome, &self.settings.policy, now, rand::random());
        if !self.repo.settle(id, &lease.owner, &settlement, now).await? {
            tracing::warn!(job_id = %id, attempt, "lease lost before the outcome was recorded");
            return Ok(WorkOutcome::LeaseLost(id));
        }
        self.record(delivery, settlement, attempt, started.elapsed()).await
    }

    /// Tell the queue what the recorded outcome means for the delivery.
    async fn record(
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

    /// For `if_exists: skip` and `fail`: what an object already at the key means. Skip
    /// completes with it as it is; fail fails the job; otherwise the transfer goes on.
    async fn existing_object(
        &self,
        job: &Job,
        bucket: &BucketName,
        key: &ObjectKey,
    ) -> Result<Option<StoredObject>, JobError> {
        if job.if_exists == IfExists::Overwrite {
            return Ok(None);
        }
        let existing = self.store.head(bucket, key).await.map_err(|e| {
            JobError::transient(format!("cannot tell whether {bucket}/{key} exists: {e}")).because(Cause::Store)
        })?;
        let Some(existing) = existing else { return Ok(None) };
        match job.if_exists {
            IfExists::Skip => self.same_content(job, bucket, key, existing).await.map(Some),
            _ => Err(object_exists(bucket, key)),
        }
    }

    /// For `if_exists: skip`: the object at the key as the job's outcome, if it matches
    /// every size and digest the job declares. Its size comes from the store; declared
    /// digests are checked by reading the object back (no store keeps SHA-256, and only
    /// some keep an MD5 of the whole object), so a skip is never taken on trust.
    async fn same_content(
        &self,
        job: &Job,
        bucket: &BucketName,
        key: &ObjectKey,
        existing: crate::storage::ObjectInfo,
    ) -> Result<StoredObject, JobError> {
        let other = |what: String| {
            JobError::permanent(format!(
                "an object with other content is at the key {bucket}/{key} (if_exists: skip): {what}"
            ))
            .because(Cause::Exists)
        };
        if let Some(size) = job.expected_size
            && size != existing.size
        {
            return Err(other(format!("its size is {} bytes, the job declares {size}", existing.size)));
        }
        let mut digests = None;
        if job.expected_sha256.is_some() || job.expected_md5.is_some() {
            let stored = self.store.get(bucket, key).await.map_err(|e| {
                JobError::transient(format!("cannot read {bucket}/{key} to compare it: {e}")).because(Cause::Store)
            })?;
            let object = format!("{bucket}/{key}");
            let body = stored.body.map(move |chunk| {
                chunk.map_err(|e| JobError::transient(format!("cannot read {object}: {e}")).because(Cause::Store))
            });
            let (mut body, verifier) =
                verified(body.boxed(), Expectations { max_size: u64::MAX, ..Default::default() }, None);
            while let Some(chunk) = body.next().await {
                chunk?;
            }
            let read = verifier.digests().ok_or_else(|| JobError::transient("the stored object's read ended early"))?;
            for (name, declared, actual) in
                [("sha256", &job.expected_sha256, &read.sha256), ("md5", &job.expected_md5, &read.md5)]
            {
                if let Some(declared) = declared
                    && !declared.eq_ignore_ascii_case(actual)
                {
                    return Err(other(format!("its {name} is {actual}, the job declares {declared}")));
                }
            }
            digests = Some(read);
        }
        Ok(StoredObject {
            etag: existing.etag.or_else(|| existing.version.clone()).unwrap_or_default(),
            size: existing.size,
            sha256: digests.as_ref().map(|d| d.sha256.clone()),
            md5: digests.map(|d| d.md5),
            content_type: None,
            version: existing.version,
        })
    }

    /// About once a second, record the transfer's progress and ask whether a caller
    /// cancelled the job; when one did, fire `cancel` and return (never returns otherwise).
    async fn report_progress(&self, id: JobId, owner: &str, progress: &Progress, cancel: &CancellationToken) {
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
    fn fence_margin(&self) -> Duration {
        lease_renew_interval(self.settings.lease)
    }

    /// Renew the job's lease and the message's lock until the lease is lost (never returns
    /// while it is held).
    async fn hold_lease(&self, id: JobId, lease: &Lease, delivery: &Delivery) {
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

    /// One attempt under `owner`'s lease, and what its end means for a checkpoint saved on
    /// the way: kept for the next attempt after a transient error, forgotten otherwise
    /// (with the partial write it names, unless that became the object).
    async fn transfer(
        &self,
        job: &Job,
        owner: &str,
        fence: &dyn Fence,
        cancel: &CancellationToken,
        progress: &Progress,
    ) -> Result<StoredObject, JobError> {
        let checkpointed = AtomicBool::new(job.bytes_done.is_some_and(|done| done > 0));
        let outcome = self.transfer_once(job, owner, fence, cancel, progress, &checkpointed).await;
        let ended = !matches!(&outcome, Err(e) if e.is_transient());
        if ended && checkpointed.load(Ordering::Relaxed) {
            self.forget_checkpoint(job, outcome.is_err()).await;
        }
        outcome
    }

    /// One attempt: origin → verify → store. Sets `checkpointed` when it may save checkpoints.
    async fn transfer_once(
        &self,
        job: &Job,
        owner: &str,
        fence: &dyn Fence,
        cancel: &CancellationToken,
        progress: &Progress,
        checkpointed: &AtomicBool,
    ) -> Result<StoredObject, JobError> {
        // The row was validated on the way in; a row that no longer parses is corrupt.
        let corrupt =
            |what: &str, e: &dyn std::fmt::Display| JobError::permanent(format!("stored {what} is invalid: {e}"));
        let url = Url::parse(&job.file_url).map_err(|e| corrupt("file_url", &e))?;
        let bucket = BucketName::parse(&job.bucket_name).map_err(|e| corrupt("bucket_name", &e))?;
        let key = ObjectKey::parse(&job.object_name).map_err(|e| corrupt("object_name", &e))?;

        if let Some(done) = self.existing_object(job, &bucket, &key).await? {
            return Ok(done);
        }
        let absent;
        let fence: &dyn Fence = match job.if_exists {
            // Checked again just before the object becomes visible.
            IfExists::Fail => {
                absent = AbsentFence { inner: fence, store: &*self.store, bucket: &bucket, key: &key };
                &absent
            }
            IfExists::Overwrite | IfExists::Skip => fence,
        };
        let headers = match &job.request_headers {
            Some(sealed) => self.sealer.open(sealed).map_err(|e| JobError::permanent(e.to_string()))?,
            None => RequestHeaders::default(),
        };
        // Progress from an earlier attempt: it may have saved a checkpoint to go on from.
        let saved = match job.bytes_done {
            Some(done) if done > 0 => self.saved_checkpoint(job.id).await,
            _ => None,
        };
        let part_size = self.store.resumable_part_size();
        let from = saved.as_ref().and_then(|c| c.range(part_size));
        let fetched = tokio::select! {
            fetched = self.fetcher.fetch(&url, headers.pairs(), from.as_ref()) => fetched?,
            () = cancel.cancelled() => return Err(JobError::cancelled()),
        };
        let resumed = match saved {
            // The fetcher hands back a body past byte 0 only as the proven rest of the file
            // this checkpoint was saved from (see `RangeFrom::continues`).
            Some(checkpoint) if fetched.start > 0 && from.as_ref().is_some_and(|f| f.offset == fetched.start) => {
                Some(checkpoint)
            }
            Some(_) => {
                if from.is_some() {
                    tracing::info!(job_id = %job.id, "the origin cannot send the rest of the same file; starting over");
                }
                self.forget_checkpoint(job, true).await;
                None
            }
            None => None,
        };
        if fetched.start > 0 && resumed.is_none() {
            // Never reached: a body that starts past byte 0 is never stored as a whole object.
            return Err(JobError::transient("origin sent part of the file where the whole was asked for")
                .because(Cause::OriginStatus));
        }
        let max_size =
            job.grant.max_file_size.map_or(self.settings.max_file_size, |m| m.min(self.settings.max_file_size));
        if let Some(length) = fetched.content_length
            && length > max_size
        {
            return Err(JobError::permanent(format!(
                "file too large: origin declares {length} bytes, the limit is {max_size}"
            ))
            .because(Cause::TooLarge));
        }
        // A cancel ends the body with an error, so the store aborts what it has written.
        progress.start(fetched.start, fetched.content_length);
        let body = progress.count(until_cancelled(at_least(fetched.body, self.settings.min_rate), cancel.clone()));
        let (content_type, body) = match &resumed {
            // The start of the file, where its type shows, was read by the first attempt.
            Some(c) => (c.content_type.clone(), body),
            None => sniff::content_type(fetched.content_type, body).await,
        };
        let expect = Expectations {
            max_size,
            declared_length: fetched.content_length,
            sha256: job.expected_sha256.clone(),
            md5: job.expected_md5.clone(),
            size: job.expected_size,
        };
        let options = WriteOptions { content_type: &content_type, may_create_bucket: job.grant.may_create_bucket };
        // Large files from an origin that names its version are stored part by part, with
        // a checkpoint after each, so a cut transfer goes on where it stopped.
        let resumable = match (part_size, &fetched.validator, fetched.content_length) {
            (Some(part), Some(_), Some(length)) => resumed.is_some() || length > part,
            _ => false,
        };
        let (put, verifier) = match (part_size, fetched.validator) {
            (Some(part), Some(validator)) if resumable => {
                checkpointed.store(true, Ordering::Relaxed);
                let body = split_at_parts(body, fetched.start, part);
                let (body, verifier) = verified(body, expect, resumed.as_ref().map(|c| &c.hashes));
                let recorder = Recorder {
                    repo: &*self.repo,
                    id: job.id,
                    owner,
                    validator,
                    total: fetched.content_length,
                    content_type: content_type.clone(),
                    verifier: verifier.clone(),
                    taken: Default::default(),
                    gone: Default::default(),
                };
                let from = resumed.map(|c| c.write);
                let put = self.store.put_resumable(&bucket, &key, options, body, fence, job.id, from, &recorder).await;
                if let Err(e) = &put
                    && recorder.is_gone()
                {
                    tracing::info!(job_id = %job.id, error = %e, "the stored part of the file is gone; the next attempt starts over");
                    self.forget_checkpoint(job, true).await;
                }
                (put.map_err(|e| e.or_because(Cause::Store))?, verifier)
            }
            _ if resumed.is_some() => {
                // A resumed body continues stored parts: it cannot be stored on its own.
                self.forget_checkpoint(job, true).await;
                return Err(JobError::transient("cannot go on with the stored part of the file; starting over")
                    .because(Cause::Store));
            }
            _ => {
                let (body, verifier) = verified(body, expect, None);
                let put = self.store.put(&bucket, &key, options, body, fence).await;
                (put.map_err(|e| e.or_because(Cause::Store))?, verifier)
            }
        };
        let digests = verifier.digests().ok_or_else(|| JobError::transient("store finished before the body ended"))?;
        Ok(StoredObject {
            etag: put.etag.unwrap_or_else(|| digests.md5.clone()),
            size: digests.size,
            sha256: Some(digests.sha256),
            md5: Some(digests.md5),
            content_type: Some(content_type),
            version: put.version,
        })
    }

    /// The job's saved checkpoint, if it has one that reads.
    async fn saved_checkpoint(&self, id: JobId) -> Option<Checkpoint> {
        let body = match self.repo.checkpoint(id).await {
            Ok(body) => body?,
            Err(e) => {
                tracing::warn!(job_id = %id, error = %e, "cannot read the transfer's checkpoint; starting over");
                return None;
            }
        };
        serde_json::from_str(&body)
            .inspect_err(|e| tracing::warn!(job_id = %id, error = %e, "unreadable checkpoint; starting over"))
            .ok()
    }

    /// Forget the job's checkpoint, so a next attempt starts over; with `discard`, also
    /// remove the partial write it names (not when that write became the object).
    async fn forget_checkpoint(&self, job: &Job, discard: bool) {
        let id = job.id;
        let Some(checkpoint) = self.saved_checkpoint(id).await else { return };
        let (Ok(bucket), Ok(key)) = (BucketName::parse(&job.bucket_name), ObjectKey::parse(&job.object_name)) else {
            return;
        };
        if discard && let Err(e) = self.store.discard(&bucket, &key, &checkpoint.write).await {
            tracing::warn!(job_id = %id, error = %e, "cannot remove a partial write");
        }
        if let Err(e) = self.repo.clear_checkpoint(id).await {
            tracing::warn!(job_id = %id, error = %e, "cannot forget the transfer's checkpoint");
        }
    }
}

/// How an attempt's run ended.
enum Ran {
    Done(Result<StoredObject, JobError>, Option<Transferring>, Instant),
    /// The pool is stopping: hand the job back.
    Stopped,
    /// The origin host is busy or asked for a pause: come back then.
    NotNow(Instant),
}

/// What a claim left to do.
enum Claimed {
    Job(Box<Job>),
    Done(WorkOutcome),
}

/// The fence a worker puts in front of the store: the object becomes visible only while
/// the worker still holds the job's lease, with at least `margin` left.
struct LeaseFence<'a> {
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

/// A job's place in a pool: admitted (claimed, perhaps ahead of a free transfer slot),
/// then transferring, then recording its outcome.
struct Slot {
    admitted: OwnedSemaphorePermit,
    transfers: Arc<Semaphore>,
    recording: Arc<Semaphore>,
    stop: CancellationToken,
}

impl Slot {
    /// Wait for a transfer slot; `None` if the pool is told to stop first.
    async fn start(self) -> Option<Transferring> {
        let transfer = tokio::select! {
            biased;
            () = self.stop.cancelled() => return None,
            permit = self.transfers.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        Some(Transferring { admitted: self.admitted, transfer, recording: self.recording })
    }
}

/// A job whose transfer runs in one of the pool's slots.
struct Transferring {
    admitted: OwnedSemaphorePermit,
    transfer: OwnedSemaphorePermit,
    recording: Arc<Semaphore>,
}

impl Transferring {
    /// The transfer has ended: take a place among the outcomes being recorded, then free
    /// the transfer slot (and the job's admission) for the next job. Waits while as many
    /// outcomes as the pool has slots are still being written, so a slow database holds
    /// transfers back.
    async fn done(self) -> OwnedSemaphorePermit {
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

/// Put the trace id of a `traceparent` on the job's span (the request that created the job
/// logged the same one).
fn record_trace(span: &tracing::Span, trace: Option<&TraceParent>) {
    if let Some(trace) = trace {
        span.record("trace_id", trace.trace_id.as_str());
    }
}

/// Wait a second before trying again after an infrastructure error; `true` if told to stop meanwhile.
async fn back_off(stop: &CancellationToken) -> bool {
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(Duration::from_secs(1)) => false,
    }
}

fn log_panic(joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined {
        tracing::error!(error = %e, "worker task panicked");
    }
}
