//! The metadata repository port: where jobs are recorded.
//!
//! Creating a job and making it deliverable happen in one transaction, so an accepted
//! job can never be lost between the database and the queue.

mod bulk;
mod group_commit;
mod keys;
mod outbox;
mod postgres;
mod sqlite;
mod webhooks;
mod writer;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::domain::{BucketName, ObjectKey};
use crate::lifecycle::{Job, JobId, JobStatus, NewJob, Settlement};

pub use bulk::{
    Batch, BatchCounts, BatchCreated, BatchState, BatchStore, EndNotice, InvalidRow, NewBatch, ReportRow, Steer,
    Steered,
};
pub use keys::KeyStore;
pub use outbox::{Attempted, DueDelivery, Subject, WebhookOutbox, message_id};
pub use postgres::{PgDb, PgRepository};
pub use sqlite::{Durability, SqliteDb, SqliteRepository};
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

/// A column of job `id`'s row, parsed as its type: rows hold only values that parsed when
/// the job was created, so one that no longer does is a corrupt row.
fn parsed<T>(
    id: i64,
    column: &str,
    value: String,
    parse: impl FnOnce(&str) -> Result<T, crate::domain::InvalidValue>,
) -> Result<T, RepoError> {
    parse(&value).map_err(|e| RepoError::Corrupt { id, reason: format!("{column}: {e}") })
}

impl RepoError {
    /// Whether the database could not be reached or is not accepting work yet (down,
    /// restarting, shutting down), as opposed to refusing the request.
    pub fn is_unavailable(&self) -> bool {
        let sql = match self {
            Self::Database(e) => e,
            Self::Migration(sqlx::migrate::MigrateError::Execute(e)) => e,
            _ => return false,
        };
        match sql {
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
            // Class 57: operator intervention (admin or crash shutdown, cannot connect now).
            sqlx::Error::Database(e) => e.code().is_some_and(|code| code.starts_with("57")),
            _ => false,
        }
    }
}

/// Which jobs to list, newest first.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub status: Option<JobStatus>,
    /// Only jobs created by this API key.
    pub owner: Option<String>,
    /// Only jobs of this batch.
    pub batch: Option<i64>,
    /// Only jobs with an id below this one (the previous page's last id).
    pub before: Option<JobId>,
    pub limit: u32,
}

impl ListFilter {
    /// The `WHERE` conditions of this filter and the `LIMIT`, with only the conditions it
    /// sets, each a plain comparison: an `? IS NULL OR …` form would keep the planner from
    /// reading by `files_status_idx`/`files_owner_idx` and from starting at the cursor, so a
    /// deep or status-filtered page would read every newer row. Values are numbered in the
    /// order of [`ListFilter::bind`]; `placeholder(n)` names the n-th (from 1).
    pub fn sql(&self, placeholder: fn(usize) -> String) -> String {
        let mut conditions = Vec::new();
        let mut next = 0;
        let mut value = || {
            next += 1;
            placeholder(next)
        };
        if self.owner.is_some() {
            conditions.push(format!("owner_key = {}", value()));
        }
        if self.status.is_some() {
            conditions.push(format!("status = {}", value()));
        }
        if self.batch.is_some() {
            conditions.push(format!("batch_id = {}", value()));
        }
        if self.before.is_some() {
            conditions.push(format!("id < {}", value()));
        }
        let filter = if conditions.is_empty() { String::new() } else { format!("WHERE {}", conditions.join(" AND ")) };
        format!("{filter} ORDER BY id DESC LIMIT {}", value())
    }

    /// Bind this filter's values to `query`, in the order [`ListFilter::sql`] numbers them.
    pub fn bind<'q, DB>(
        &self,
        mut query: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>,
    ) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
    where
        DB: sqlx::Database,
        String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    {
        if let Some(owner) = &self.owner {
            query = query.bind(owner.clone());
        }
        if let Some(status) = self.status {
            query = query.bind(status.as_str().to_owned());
        }
        if let Some(batch) = self.batch {
            query = query.bind(batch);
        }
        if let Some(before) = self.before {
            query = query.bind(before.0);
        }
        query.bind(i64::from(self.limit))
    }
}

/// A worker's hold on a job while it works on it.
///
/// `owner` is a fencing token: unique per claim, so two workers can never share one, and
/// every write a holder makes (renew, settle, release) is conditional on it. Expiry is
/// judged by the database's clock: a claim or renewal holds the job until the database's
/// `now` plus `length`, whatever the worker's clock says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub owner: String,
    pub length: std::time::Duration,
}

impl Lease {
    /// A lease for one claim of a delivery: the delivery's token plus a random part, so a
    /// message read twice (after a rebalance) still yields two different owners.
    pub fn for_claim(delivery_token: &str, length: std::time::Duration) -> Self {
        Self { owner: format!("{delivery_token}#{:016x}", rand::random::<u64>()), length }
    }

    /// The lease length in whole milliseconds, as the databases store it.
    pub fn millis(&self) -> i64 {
        millis(self.length)
    }
}

/// A length of time in whole milliseconds, as the databases take it (huge lengths are
/// capped far from overflow when added to a time).
pub(crate) fn millis(length: std::time::Duration) -> i64 {
    i64::try_from(length.as_millis()).unwrap_or(i64::MAX / 4)
}

/// A size or count as the databases keep it: a signed 64-bit integer (no real size
/// reaches the cap).
pub(crate) fn to_db(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A size or count read back (a negative value, which fileflow never writes, reads as 0).
pub(crate) fn from_db(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// What one reconciliation sweep looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sweep {
    /// How long overdue (or since last announced) a job must be.
    pub grace: std::time::Duration,
    /// Most jobs announced again by one sweep.
    pub limit: u32,
    /// Whether overdue `pending` jobs are announced again: not while the queue still holds
    /// a backlog, which may well carry their messages (jobs whose lease lapsed always are).
    pub pending: bool,
}

/// What one reconciliation sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// `pending` jobs past their due time (plus the grace period) that were announced again.
    pub pending: u64,
    /// `processing` jobs whose lease had lapsed that were announced again.
    pub expired: u64,
}

impl Reconciled {
    pub fn total(&self) -> u64 {
        self.pending + self.expired
    }
}

/// What asking to retry a job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requeue {
    Requeued(Box<Job>),
    NotFailed(JobStatus),
    NotFound,
}

/// How long an `Idempotency-Key` is remembered.
pub const IDEMPOTENCY_WINDOW: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// A client's `Idempotency-Key` for a create: whose it is (the API key, `""` while the API
/// is open), the key, and the digest of the request it came with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    pub owner: String,
    pub key: String,
    pub request_sha256: String,
}

/// What a create under an idempotency key did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// A new job.
    New(Box<Job>),
    /// The key was used before, with the same request: its job.
    Replayed(Box<Job>),
    /// The key was used before with another request.
    KeyReused,
}

/// What looking an idempotency key up found, inside the create's transaction.
pub(crate) enum KeyUse {
    /// Not used before: this job was created under it.
    Fresh(Box<Job>),
    /// Used before for job `id`, with the same request or another.
    Used { same_request: bool, id: JobId },
}

impl KeyUse {
    /// The answer to the caller; `current` reads a job already created under the key.
    pub(crate) async fn answer<F, Fut>(self, current: F) -> Result<Created, RepoError>
    where
        F: FnOnce(JobId) -> Fut,
        Fut: std::future::Future<Output = Result<Option<Job>, RepoError>>,
    {
        Ok(match self {
            Self::Fresh(job) => Created::New(job),
            Self::Used { same_request: false, .. } => Created::KeyReused,
            Self::Used { same_request: true, id } => match current(id).await? {
                Some(job) => Created::Replayed(Box::new(job)),
                None => {
                    return Err(RepoError::Corrupt {
                        id: id.0,
                        reason: "an idempotency key names a missing job".into(),
                    });
                }
            },
        })
    }
}

/// What asking to cancel a job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancel {
    /// The job was waiting (or waiting for a retry): it is `cancelled` now.
    Cancelled(Box<Job>),
    /// A worker is transferring it: it was asked to stop, and records `cancelled` when it has.
    Requested(Box<Job>),
    /// The job had already finished with this status.
    Finished(JobStatus),
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
    /// The job waits for a scheduled retry, due at this time: a message that came early
    /// (a redelivered original, a duplicate) must not skip the backoff.
    NotDue {
        at: DateTime<Utc>,
    },
    /// The job is due but cannot start yet: another job is writing its bucket and key (one
    /// job at a time writes an object), or another claim held its row a moment ago. Try
    /// again at this time.
    Waiting {
        at: DateTime<Utc>,
    },
    /// The job is already completed, failed or cancelled: nothing to do.
    Finished(JobStatus),
    NotFound,
}

/// How long a delivered job of a paused batch waits before it is asked for again (most of a
/// paused batch's jobs are held back before delivery; see [`BatchStore::steer`]).
pub const PAUSED_RECHECK: chrono::TimeDelta = chrono::TimeDelta::seconds(2);

/// How long a due job whose object another job is writing waits before it is asked for again.
pub const KEY_BUSY_PAUSE: chrono::TimeDelta = chrono::TimeDelta::seconds(1);

impl Claim {
    /// Why a conditional claim matched nothing, from the job as it is now (`None`: no
    /// such job) and the database's `now`.
    pub fn refused(current: Option<ClaimState>, now: DateTime<Utc>) -> Self {
        let Some(current) = current else { return Self::NotFound };
        match current.status {
            status @ (JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled) => Self::Finished(status),
            JobStatus::Pending if current.paused => Self::Waiting { at: now + PAUSED_RECHECK },
            JobStatus::Pending => match current.next_attempt_at {
                Some(at) if at > now => Self::NotDue { at },
                _ => Self::Waiting { at: now + KEY_BUSY_PAUSE },
            },
            JobStatus::Processing => Self::Busy { until: current.lease_expires_at.unwrap_or(now) },
        }
    }
}

/// What a refused claim is explained by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimState {
    pub status: JobStatus,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The job's batch is paused: it is not claimed until the batch is resumed.
    pub paused: bool,
}

/// What a cancel's conditional update means: the job it changed (cancelled or asked to
/// stop), or, when it changed none, why not, from the job as `current` reads it now.
pub(crate) async fn cancel_answer<F, Fut>(changed: Option<Job>, current: F) -> Result<Cancel, RepoError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Option<Job>, RepoError>>,
{
    Ok(match changed {
        Some(job) if job.status == JobStatus::Cancelled => Cancel::Cancelled(Box::new(job)),
        Some(job) => Cancel::Requested(Box::new(job)),
        None => current().await?.map_or(Cancel::NotFound, |job| Cancel::Finished(job.status)),
    })
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

    /// Record several jobs and queue them in one write: all of them or none. The jobs
    /// come back in the order given.
    async fn create_all(&self, jobs: &[NewJob], now: DateTime<Utc>) -> Result<Vec<Job>, RepoError>;

    /// [`create`](Self::create) under an idempotency key, atomically: the first request
    /// with the key creates the job, a later one with the same request gets that job back
    /// (also when the two race), one with another request is refused. Keys older than
    /// [`IDEMPOTENCY_WINDOW`] are forgotten.
    async fn create_once(&self, job: &NewJob, key: &IdempotencyKey, now: DateTime<Utc>) -> Result<Created, RepoError>;

    /// The job an idempotency key created with this very request, if it did (within the
    /// window): a retry of it is answered without creating anything.
    async fn replay_of(&self, key: &IdempotencyKey, now: DateTime<Utc>) -> Result<Option<Job>, RepoError>;

    /// Forget idempotency keys recorded before `before`, at most `limit` of them; returns how many.
    async fn forget_idempotency_keys(&self, before: DateTime<Utc>, limit: u32) -> Result<u64, RepoError>;

    /// Delete finished jobs (completed, failed, cancelled) last changed before `before`,
    /// oldest first, at most `limit` of them, with what hangs off them (checkpoints,
    /// idempotency keys, webhook deliveries); a job whose webhook is still to be delivered
    /// stays until it is. Returns how many. The stored objects stay.
    async fn forget_finished(&self, before: DateTime<Utc>, limit: u32) -> Result<u64, RepoError>;

    async fn get(&self, id: JobId) -> Result<Option<Job>, RepoError>;

    /// The job that last stored `bucket`/`key` from an origin that named the file's
    /// version (what `if_exists: if_changed` asks the origin about), if one is recorded.
    async fn last_stored(&self, bucket: &BucketName, key: &ObjectKey) -> Result<Option<Job>, RepoError>;

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Job>, RepoError>;

    /// How many jobs created by API key `owner` are not finished yet (pending or processing).
    async fn unfinished_of(&self, owner: &str) -> Result<u64, RepoError>;

    /// Take a due `pending` job, or one whose lease has lapsed, into `processing`.
    async fn claim(&self, id: JobId, lease: &Lease) -> Result<Claim, RepoError> {
        let mut claims = self.claim_many(&[(id, lease.clone())]).await?;
        Ok(claims.pop().unwrap_or(Claim::NotFound))
    }

    /// [`claim`](Self::claim) for several jobs at once, one answer per request, in order,
    /// all decided by one statement (so none is taken unless all answers come back). When
    /// one job is asked for twice, at most one of its leases wins.
    async fn claim_many(&self, requests: &[(JobId, Lease)]) -> Result<Vec<Claim>, RepoError>;

    /// Extend a held lease to the database's `now` plus its length; `false` when the lease
    /// was lost to another claim.
    async fn renew(&self, id: JobId, lease: &Lease) -> Result<bool, RepoError>;

    /// Whether `owner` still holds the job with at least `margin` of its lease left, by the
    /// database's clock. Checked just before a stored object becomes visible (fencing).
    async fn holds(&self, id: JobId, owner: &str, margin: std::time::Duration) -> Result<bool, RepoError>;

    /// Make sure every job that should be moving will be delivered: announce again the
    /// `pending` jobs overdue by more than the sweep's grace period (when it says so) and
    /// the `processing` jobs whose lease lapsed, at most its limit of them. One sweep at a
    /// time across processes.
    async fn reconcile(&self, sweep: &Sweep) -> Result<Reconciled, RepoError>;

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

    /// Cancel a job: a `pending` one at once (its queued delivery is dropped or ignored), a
    /// `processing` one by asking its worker to stop.
    async fn cancel(&self, id: JobId, now: DateTime<Utc>) -> Result<Cancel, RepoError>;

    /// Record how far `owner`'s transfer of the job has come (about once a second), and
    /// answer whether a caller asked to cancel it; `None` when `owner` no longer holds it.
    async fn report_progress(
        &self,
        id: JobId,
        owner: &str,
        done: u64,
        total: Option<u64>,
    ) -> Result<Option<bool>, RepoError>;

    /// The checkpoint a transfer of the job saved, if one is kept (see [`JobRepository::save_checkpoint`]).
    async fn checkpoint(&self, id: JobId) -> Result<Option<String>, RepoError>;

    /// Keep `checkpoint` (where `owner`'s transfer of the job stands: `done` bytes of a file
    /// of `total` in the store for good) in place of the one before, if `owner` still holds
    /// the job; `false` if not. The job's progress shows at least `done` of `total`.
    async fn save_checkpoint(
        &self,
        id: JobId,
        owner: &str,
        done: u64,
        total: Option<u64>,
        checkpoint: &str,
    ) -> Result<bool, RepoError>;

    /// Forget the job's checkpoint: its transfer will start from the beginning.
    async fn clear_checkpoint(&self, id: JobId) -> Result<(), RepoError>;

    /// Move a `failed` job back to `pending` with a fresh retry budget, and queue it, atomically.
    async fn requeue_failed(&self, id: JobId, now: DateTime<Utc>) -> Result<Requeue, RepoError>;

    /// Whether the store answers.
    async fn ping(&self) -> Result<(), RepoError>;

    /// Job announcements waiting for the outbox relay (`None`: no outbox, the queue is in
    /// the database).
    async fn outbox_depth(&self) -> Result<Option<u64>, RepoError>;
}
