//! Job changes as they happen (status, progress), for the API's event streams.
//!
//! On PostgreSQL the database announces every change itself (a trigger's `NOTIFY`), so an
//! API process hears about jobs that workers in other processes move; [`listen`] turns
//! those notifications into [`JobChange`]s. On SQLite the API and the workers of `serve`
//! share a process, and [`Announcing`] wraps the repository to announce each change it
//! writes. Either way, changes reach subscribers through one [`ChangeFeed`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::domain::{BucketName, ObjectKey};
use crate::lifecycle::{Job, JobId, JobStatus, NewJob, Settlement};
use crate::metadata::{
    Cancel, Claim, Created, IdempotencyKey, JobRepository, Lease, ListFilter, Reconciled, RepoError, Requeue, Sweep,
};

/// The PostgreSQL channel the `files` triggers notify.
pub const CHANNEL: &str = "fileflow_jobs";

/// Changes kept for a subscriber that reads slowly; one that falls further behind skips
/// the oldest.
const BACKLOG: usize = 4096;

/// One change of a job, as the event streams send it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct JobChange {
    pub id: String,
    pub status: String,
    pub bytes_done: Option<u64>,
    pub bytes_total: Option<u64>,
    /// The API key that owns the job (who may see it), never sent.
    #[serde(skip_serializing, default)]
    #[schema(ignore)]
    pub owner: Option<String>,
}

/// Where changes are published and subscribed to, in one process.
pub struct ChangeFeed {
    sender: broadcast::Sender<JobChange>,
    /// Cancelled when the process stops: open streams end.
    pub stopped: CancellationToken,
}

impl Default for ChangeFeed {
    fn default() -> Self {
        Self { sender: broadcast::channel(BACKLOG).0, stopped: CancellationToken::new() }
    }
}

impl ChangeFeed {
    pub fn publish(&self, change: JobChange) {
        // No subscriber is not an error: nobody is watching.
        let _ = self.sender.send(change);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<JobChange> {
        self.sender.subscribe()
    }

    fn job(&self, job: &Job) {
        self.publish(JobChange {
            id: job.id.to_string(),
            status: job.status.to_string(),
            bytes_done: job.bytes_done,
            bytes_total: job.bytes_total,
            owner: job.grant.owner.clone(),
        });
    }
}

/// Turn the database's notifications into changes on `feed` until `stop`. The listener
/// connects again by itself after a lost connection (changes made meanwhile are not
/// heard; a watcher still sees a job's state when it asks for it).
pub async fn listen(pool: sqlx::PgPool, feed: Arc<ChangeFeed>, stop: CancellationToken) {
    let mut listener = loop {
        match sqlx::postgres::PgListener::connect_with(&pool).await {
            Ok(mut listener) => match listener.listen(CHANNEL).await {
                Ok(()) => break listener,
                Err(e) => tracing::warn!(error = %e, "cannot listen for job changes; trying again"),
            },
            Err(e) => tracing::warn!(error = %e, "cannot connect to listen for job changes; trying again"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    };
    loop {
        let notification = tokio::select! {
            () = stop.cancelled() => return,
            notification = listener.recv() => notification,
        };
        match notification {
            Ok(notification) => match serde_json::from_str::<JobChange>(notification.payload()) {
                Ok(change) => feed.publish(change),
                Err(e) => tracing::warn!(error = %e, "unreadable job change notification"),
            },
            Err(e) => {
                tracing::warn!(error = %e, "lost the job change listener; connecting again");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}

/// A repository that announces on a [`ChangeFeed`] every change it writes (for a database
/// that cannot announce them itself). Owners of jobs under way are remembered from their
/// claims, so progress and outcomes are scoped like the jobs.
pub struct Announcing {
    inner: Arc<dyn JobRepository>,
    feed: Arc<ChangeFeed>,
    /// The key (owner) of each job this process holds, by job and lease holder.
    owners: Mutex<HashMap<(i64, String), Option<String>>>,
}

impl Announcing {
    pub fn new(inner: Arc<dyn JobRepository>, feed: Arc<ChangeFeed>) -> Self {
        Self { inner, feed, owners: Mutex::default() }
    }

    /// How many jobs' owners are remembered: the jobs this process holds.
    pub fn remembered(&self) -> usize {
        self.owners().len()
    }

    fn owners(&self) -> std::sync::MutexGuard<'_, HashMap<(i64, String), Option<String>>> {
        self.owners.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A change of a job `holder` claimed in this process; `last` forgets its owner.
    fn change(&self, id: JobId, holder: &str, status: JobStatus, progress: Option<(u64, Option<u64>)>, last: bool) {
        let held = (id.0, holder.to_owned());
        let owner = match last {
            true => self.owners().remove(&held),
            false => self.owners().get(&held).cloned(),
        };
        self.feed.publish(JobChange {
            id: id.to_string(),
            status: status.to_string(),
            bytes_done: progress.map(|(done, _)| done),
            bytes_total: progress.and_then(|(_, total)| total),
            owner: owner.flatten(),
        });
    }
}

#[async_trait]
impl JobRepository for Announcing {
    async fn create(&self, job: &NewJob, now: DateTime<Utc>) -> Result<Job, RepoError> {
        let job = self.inner.create(job, now).await?;
        self.feed.job(&job);
        Ok(job)
    }

    async fn create_all(&self, jobs: &[NewJob], now: DateTime<Utc>) -> Result<Vec<Job>, RepoError> {
        let jobs = self.inner.create_all(jobs, now).await?;
        jobs.iter().for_each(|job| self.feed.job(job));
        Ok(jobs)
    }

    async fn create_once(&self, job: &NewJob, key: &IdempotencyKey, now: DateTime<Utc>) -> Result<Created, RepoError> {
        let created = self.inner.create_once(job, key, now).await?;
        if let Created::New(job) = &created {
            self.feed.job(job);
        }
        Ok(created)
    }

    async fn replay_of(&self, key: &IdempotencyKey, now: DateTime<Utc>) -> Result<Option<Job>, RepoError> {
        self.inner.replay_of(key, now).await
    }

    async fn forget_idempotency_keys(&self, before: DateTime<Utc>, limit: u32) -> Result<u64, RepoError> {
        self.inner.forget_idempotency_keys(before, limit).await
    }

    async fn forget_finished(&self, before: DateTime<Utc>, limit: u32) -> Result<u64, RepoError> {
        self.inner.forget_finished(before, limit).await
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>, RepoError> {
        self.inner.get(id).await
    }

    async fn last_stored(&self, bucket: &BucketName, key: &ObjectKey) -> Result<Option<Job>, RepoError> {
        self.inner.last_stored(bucket, key).await
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Job>, RepoError> {
        self.inner.list(filter).await
    }

    async fn unfinished_of(&self, owner: &str) -> Result<u64, RepoError> {
        self.inner.unfinished_of(owner).await
    }

    async fn claim_many(&self, requests: &[(JobId, Lease)]) -> Result<Vec<Claim>, RepoError> {
        let claims = self.inner.claim_many(requests).await?;
        for (claim, (_, lease)) in claims.iter().zip(requests) {
            if let Claim::Claimed(job) = claim {
                self.owners().insert((job.id.0, lease.owner.clone()), job.grant.owner.clone());
                self.feed.job(job);
            }
        }
        Ok(claims)
    }

    async fn renew(&self, id: JobId, lease: &Lease) -> Result<bool, RepoError> {
        let renewed = self.inner.renew(id, lease).await?;
        if !renewed {
            // The lease is lost: this holder will neither settle nor release the job.
            self.owners().remove(&(id.0, lease.owner.clone()));
        }
        Ok(renewed)
    }

    async fn holds(&self, id: JobId, owner: &str, margin: std::time::Duration) -> Result<bool, RepoError> {
        self.inner.holds(id, owner, margin).await
    }

    async fn reconcile(&self, sweep: &Sweep) -> Result<Reconciled, RepoError> {
        self.inner.reconcile(sweep).await
    }

    async fn settle(
        &self,
        id: JobId,
        owner: &str,
        settlement: &Settlement,
        now: DateTime<Utc>,
    ) -> Result<bool, RepoError> {
        let settled = self.inner.settle(id, owner, settlement, now).await;
        if !matches!(settled, Ok(true)) {
            self.owners().remove(&(id.0, owner.to_owned()));
        }
        let settled = settled?;
        if settled {
            let (status, progress) = match settlement {
                Settlement::Completed(stored) => (JobStatus::Completed, Some((stored.size, Some(stored.size)))),
                Settlement::RetryScheduled { .. } => (JobStatus::Pending, None),
                Settlement::Failed { .. } => (JobStatus::Failed, None),
                Settlement::Cancelled => (JobStatus::Cancelled, None),
            };
            self.change(id, owner, status, progress, true);
        }
        Ok(settled)
    }

    async fn release(&self, id: JobId, owner: &str, now: DateTime<Utc>) -> Result<bool, RepoError> {
        let released = self.inner.release(id, owner, now).await;
        if !matches!(released, Ok(true)) {
            self.owners().remove(&(id.0, owner.to_owned()));
        }
        let released = released?;
        if released {
            self.change(id, owner, JobStatus::Pending, None, true);
        }
        Ok(released)
    }

    async fn cancel(&self, id: JobId, now: DateTime<Utc>) -> Result<Cancel, RepoError> {
        let cancel = self.inner.cancel(id, now).await?;
        if let Cancel::Cancelled(job) = &cancel {
            self.feed.job(job);
        }
        Ok(cancel)
    }

    async fn report_progress(
        &self,
        id: JobId,
        owner: &str,
        done: u64,
        total: Option<u64>,
    ) -> Result<Option<bool>, RepoError> {
        let answer = self.inner.report_progress(id, owner, done, total).await?;
        if answer.is_none() {
            self.owners().remove(&(id.0, owner.to_owned()));
        }
        if answer.is_some() {
            self.change(id, owner, JobStatus::Processing, Some((done, total)), false);
        }
        Ok(answer)
    }

    async fn checkpoint(&self, id: JobId) -> Result<Option<String>, RepoError> {
        self.inner.checkpoint(id).await
    }

    async fn save_checkpoint(
        &self,
        id: JobId,
        owner: &str,
        done: u64,
        total: Option<u64>,
        checkpoint: &str,
    ) -> Result<bool, RepoError> {
        self.inner.save_checkpoint(id, owner, done, total, checkpoint).await
    }

    async fn clear_checkpoint(&self, id: JobId) -> Result<(), RepoError> {
        self.inner.clear_checkpoint(id).await
    }

    async fn requeue_failed(&self, id: JobId, now: DateTime<Utc>) -> Result<Requeue, RepoError> {
        let requeued = self.inner.requeue_failed(id, now).await?;
        if let Requeue::Requeued(job) = &requeued {
            self.feed.job(job);
        }
        Ok(requeued)
    }

    async fn ping(&self) -> Result<(), RepoError> {
        self.inner.ping().await
    }

    async fn outbox_depth(&self) -> Result<Option<u64>, RepoError> {
        self.inner.outbox_depth().await
    }
}
