//! The batch store port: batches (a manifest read into jobs), their counters, the rows of
//! their manifest that were not jobs, and what their report is made of.
//!
//! A batch's counters are kept by the statements that change its jobs (the reader's
//! insert adds to `total` and `pending`, a trigger on each job's status moves the rest),
//! so reading them never counts jobs.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::RepoError;
use crate::lifecycle::NewJob;

/// Where a batch is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchState {
    /// The manifest is being read; its jobs already run.
    Reading,
    /// Every row has been read; jobs run.
    Running,
    /// Every job has ended.
    Completed,
    /// A caller cancelled it: its waiting jobs were cancelled.
    Cancelled,
}

impl BatchState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reading => "reading",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether the batch can still change course (be paused, resumed, cancelled).
    pub fn is_open(self) -> bool {
        matches!(self, Self::Reading | Self::Running)
    }
}

impl FromStr for BatchState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [Self::Reading, Self::Running, Self::Completed, Self::Cancelled]
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| format!("unknown batch state {s:?}"))
    }
}

impl fmt::Display for BatchState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How many of a batch's rows are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct BatchCounts {
    pub pending: u64,
    pub processing: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// Manifest rows that could not become jobs.
    pub invalid: u64,
}

/// A batch as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub id: i64,
    /// The API key that created it (`None`: the open API).
    pub owner: Option<String>,
    pub state: BatchState,
    pub paused: bool,
    /// The request, as JSON: where the manifest is, what its rows default to, the report.
    pub request: String,
    /// Manifest rows read so far (jobs and invalid rows).
    pub rows_read: u64,
    /// Why reading the manifest stopped early, if it did.
    pub read_error: Option<String>,
    /// Rows read: jobs plus invalid rows.
    pub total: u64,
    pub counts: BatchCounts,
    /// Bytes of the completed jobs.
    pub bytes_done: u64,
    pub report_written: bool,
    pub report_error: Option<String>,
    /// When it ended (and its report, if asked for, was written).
    pub ended_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A batch to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewBatch {
    pub owner: Option<String>,
    pub request: String,
    /// The client's `Idempotency-Key` and the digest of its request.
    pub idempotency: Option<(String, String)>,
}

/// What creating a batch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchCreated {
    New(Box<Batch>),
    /// The idempotency key was used before with the same request: that batch.
    Replayed(Box<Batch>),
    /// The idempotency key was used before with another request.
    KeyReused,
}

/// A manifest row that did not become a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRow {
    /// The row's number in the manifest, from 1 (a CSV's header is not a row).
    pub row: u64,
    pub file_url: Option<String>,
    pub reason: String,
}

/// A caller's change of a batch's course.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steer {
    /// Cancel its waiting jobs (running ones are asked to stop) and read no more rows.
    Cancel,
    /// Hold its waiting jobs (none is claimed) and its reading.
    Pause,
    /// Let them go again.
    Resume,
}

/// What steering a batch did: whether it changed, and the batch as it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Steered {
    pub changed: bool,
    pub batch: Batch,
}

/// One row of a batch's report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportRow {
    pub row: u64,
    pub file_url: String,
    pub bucket_name: String,
    pub object_name: String,
    pub status: String,
    pub size: Option<u64>,
    pub sha256: Option<String>,
    pub etag: Option<String>,
    pub last_error: Option<String>,
}

/// The columns of one report row, as both databases store them (one query text per
/// database, one reading of its rows, as `keys::key_from_row` does for keys).
pub(super) const REPORT_COLUMNS: &str =
    "id, batch_row, file_url, bucket_name, object_name, status, size, sha256, etag, last_error";

/// A report row from a row of [`REPORT_COLUMNS`], with the job's id (the next page's cursor).
pub(super) fn report_row<R: sqlx::Row>(row: &R) -> Result<(i64, ReportRow), RepoError>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    Ok((
        row.try_get("id")?,
        ReportRow {
            row: super::from_db(row.try_get::<Option<i64>, _>("batch_row")?.unwrap_or(0)),
            file_url: row.try_get("file_url")?,
            bucket_name: row.try_get("bucket_name")?,
            object_name: row.try_get("object_name")?,
            status: row.try_get("status")?,
            size: row.try_get::<Option<i64>, _>("size")?.map(super::from_db),
            sha256: row.try_get("sha256")?,
            etag: row.try_get("etag")?,
            last_error: row.try_get("last_error")?,
        },
    ))
}

/// A batch's end, to announce to its `notify_url` through the webhook outbox.
pub struct EndNotice {
    pub url: String,
    /// The body's `data`, made from the batch as closed (inside the closing transaction).
    pub render: Box<dyn FnOnce(&Batch) -> String + Send>,
}

impl fmt::Debug for EndNotice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndNotice").field("url", &self.url).finish_non_exhaustive()
    }
}

/// The event a batch's end is announced as: `batch.completed` or `batch.cancelled`, as a
/// job's is `upload.<status>`.
pub(super) fn end_event(batch: &Batch) -> String {
    format!("batch.{}", batch.state)
}

/// The owner a paused batch's held deliveries are filed under (no turn is ever given to it).
pub(crate) fn held_owner(batch: i64) -> String {
    format!("\u{1}paused:{batch}")
}

#[async_trait]
pub trait BatchStore: Send + Sync + 'static {
    /// Record a new batch in `reading`, under its idempotency key if it has one.
    async fn create_batch(&self, batch: &NewBatch, now: DateTime<Utc>) -> Result<BatchCreated, RepoError>;

    async fn batch(&self, id: i64) -> Result<Option<Batch>, RepoError>;

    /// Batches newest first, `owner`'s only when given, below id `before` when given.
    async fn batches(&self, owner: Option<&str>, before: Option<i64>, limit: u32) -> Result<Vec<Batch>, RepoError>;

    /// Take a batch whose manifest is to be read (not paused, no live reader) for `reader`,
    /// for `lease`: the oldest.
    async fn take_reading(&self, reader: &str, lease: Duration, now: DateTime<Utc>)
    -> Result<Option<Batch>, RepoError>;

    /// Let go of every batch `reader` holds (it is stopping): another reader, or this
    /// process once restarted, takes them up at once from the rows recorded.
    async fn release_reading(&self, reader: &str) -> Result<u64, RepoError>;

    /// Record rows read, in one transaction: the jobs (queued as any job is), the invalid
    /// rows, the counters, and how far the manifest has been read (`rows_read`), renewing
    /// `reader`'s lease. `None` when `reader` no longer holds the batch (nothing written).
    #[allow(clippy::too_many_arguments)]
    async fn append_rows(
        &self,
        id: i64,
        reader: &str,
        rows_read: u64,
        jobs: &[NewJob],
        invalid: &[InvalidRow],
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<Option<Batch>, RepoError>;

    /// Every row has been read (or reading stopped for `error`): `reading` → `running`.
    async fn finish_reading(
        &self,
        id: i64,
        reader: &str,
        error: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<bool, RepoError>;

    /// Cancel, pause or resume a batch that is still open. Pausing files the deliveries of
    /// its waiting jobs away from the queue's turns (embedded queue, outbox); resuming
    /// files them back. `None`: no such batch.
    async fn steer(&self, id: i64, steer: Steer, now: DateTime<Utc>) -> Result<Option<Steered>, RepoError>;

    /// Batches whose every job has ended and that have not been closed yet: a `running`
    /// one with no waiting or running job becomes `completed` here; a `cancelled` one
    /// has its waiting jobs cancelled and its running ones asked to stop here, and counts
    /// once none of its jobs waits or runs.
    async fn ending(&self, now: DateTime<Utc>) -> Result<Vec<Batch>, RepoError>;

    /// Close an ended batch: its report is written (or failed with `report_error`). With a
    /// `notice`, the same transaction enqueues its webhook delivery (at most one per batch):
    /// only the call that closes the batch does, so two processes closing it at once, or a
    /// crash before the close, still make one. Answers whether this call closed it.
    async fn close(
        &self,
        id: i64,
        report_error: Option<&str>,
        notice: Option<EndNotice>,
        now: DateTime<Utc>,
    ) -> Result<bool, RepoError>;

    /// The batch's jobs for its report, by id from after `after_id`, with their ids.
    async fn report_jobs(&self, id: i64, after_id: i64, limit: u32) -> Result<Vec<(i64, ReportRow)>, RepoError>;

    /// The batch's invalid rows, by row from after `after_row`.
    async fn invalid_rows(&self, id: i64, after_row: u64, limit: u32) -> Result<Vec<InvalidRow>, RepoError>;
}
