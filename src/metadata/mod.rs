//! The metadata repository port: where jobs are recorded.
//!
//! Creating a job and making it deliverable happen in one transaction, so an accepted
//! job can never be lost between the database and the queue.

mod group_commit;
mod postgres;
mod sqlite;
mod writer;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::lifecycle::{Job, JobId, JobStatus, NewJob, Settlement};

pub use postgres::{PgDb, PgRepository};
pub use sqlite::{SqliteDb, SqliteRepository};
pub(crate) use sqlite::{from_millis, to_millis};

/// A failure of the metadata store itself (not of a job).
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt job row {id}: {reason}")]
    Corrupt { id: i64, reason: String },
}

/// Which jobs to list, newest first.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub status: Option<JobStatus>,
    /// Only jobs with an id below this one (the previous page's last id).
    pub before: Option<JobId>,
    pub limit: u32,
}

/// A worker's hold on a job while it works on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub owner: String,
    pub expires_at: DateTime<Utc>,
}

/// What asking to retry a job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requeue {
    Requeued(Box<Job>),
    NotFailed(JobStatus),
    NotFound,
}

/// Whether a worker may start on a job it was handed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The job is now `processing` under the given lease.
    Claimed(Box<Job>),
    /// Another worker holds a live lease until this time.
    Busy {
        until: DateTime<Utc>,
    },
    /// The job is already completed or failed: nothing to do.
    Finished(JobStatus),
    NotFound,
}

impl Claim {
    /// Why a conditional claim matched nothing, from the job's status and lease as they
    /// are now (`None`: no such job).
    pub fn refused(current: Option<(JobStatus, Option<DateTime<Utc>>)>, now: DateTime<Utc>) -> Self {
        match current {
            None => Self::NotFound,
            Some((status @ (JobStatus::Completed | JobStatus::Failed), _)) => Self::Finished(status),
            // A pending job that could not be claimed was claimed by another worker a moment ago.
            Some((JobStatus::Processing | JobStatus::Pending, until)) => Self::Busy { until: until.unwrap_or(now) },
        }
    }
}

impl Requeue {
    /// Why a job could not be re-queued, from the job as it is now.
    pub fn refused(current: Option<Job>) -> Self {
        current.map_or(Self::NotFound, |job| Self::NotFailed(job.status))
    }
}

#[async_trait]
pub trait JobRepository: Send + Sync + 'static {
    /// Record a new `pending` job and queue it for delivery, atomically.
    async fn create(&self, job: &NewJob, now: DateTime<Utc>) -> Result<Job, RepoError>;

    async fn get(&self, id: JobId) -> Result<Option<Job>, RepoError>;

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Job>, RepoError>;

    /// Take a `pending` job, or one whose lease has lapsed, into `processing`.
    async fn claim(&self, id: JobId, lease: &Lease, now: DateTime<Utc>) -> Result<Claim, RepoError> {
        let mut claims = self.claim_many(&[(id, lease.clone())], now).await?;
        Ok(claims.pop().unwrap_or(Claim::NotFound))
    }

    /// [`claim`](Self::claim) for several jobs at once, one answer per request, in order.
    /// When one job is asked for twice, at most one of its leases wins.
    async fn claim_many(&self, requests: &[(JobId, Lease)], now: DateTime<Utc>) -> Result<Vec<Claim>, RepoError>;

    /// Extend a held lease; `false` when the lease was lost to another worker.
    async fn renew(&self, id: JobId, lease: &Lease) -> Result<bool, RepoError>;

    /// Persist an attempt's outcome; `false` when the lease was lost meanwhile.
    async fn settle(
        &self,
        id: JobId,
        owner: &str,
        settlement: &Settlement,
        now: DateTime<Utc>,
    ) -> Result<bool, RepoError>;

    /// Hand a `processing` job back as `pending` without counting an attempt (shutdown).
    async fn release(&self, id: JobId, owner: &str, now: DateTime<Utc>) -> Result<bool, RepoError>;

    /// Move a `failed` job back to `pending` with a fresh retry budget, and queue it, atomically.
    async fn requeue_failed(&self, id: JobId, now: DateTime<Utc>) -> Result<Requeue, RepoError>;

    /// Whether the store answers.
    async fn ping(&self) -> Result<(), RepoError>;
}
