//! SQLite metadata repository: the embedded default. The embedded queue lives in the
//! same database file (see `queue::embedded`).

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use tokio::sync::Notify;

use super::{Claim, JobRepository, Lease, ListFilter, RepoError, Requeue};
use crate::domain::RequestHeaders;
use crate::lifecycle::{Job, JobId, JobStatus, NewJob, Settlement};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// An open SQLite database, shared by the repository and the embedded queue.
#[derive(Clone, Debug)]
pub struct SqliteDb {
    pub pool: SqlitePool,
    /// Woken whenever a queue row becomes deliverable, so idle workers start at once.
    pub queued: Arc<Notify>,
}

impl SqliteDb {
    /// Open (creating if needed) the database at `url` (`sqlite://path`).
    pub async fn connect(url: &str) -> Result<Self, RepoError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL + NORMAL is durable against process crashes; a power loss may lose the
            // last transactions but never corrupts the database.
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new().max_connections(8).connect_with(options).await?;
        Ok(Self { pool, queued: Arc::new(Notify::new()) })
    }

    /// The default database inside a data directory.
    pub fn default_url(data_dir: &Path) -> String {
        format!("sqlite://{}", data_dir.join("fileflow.db").display())
    }

    pub async fn migrate(&self) -> Result<(), RepoError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }
}

pub(crate) fn to_millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub(crate) fn from_millis(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// The SQLite implementation of [`JobRepository`].
#[derive(Clone, Debug)]
pub struct SqliteRepository {
    db: SqliteDb,
}

impl SqliteRepository {
    pub fn new(db: SqliteDb) -> Self {
        Self { db }
    }
}

const COLUMNS: &str = "id, file_url, bucket_name, object_name, status, retry_count, last_error, \
    etag, size, sha256, md5, content_type, expected_sha256, expected_md5, request_headers, \
    created_at, updated_at, next_attempt_at";

fn job_from_row(row: &SqliteRow) -> Result<Job, RepoError> {
    let id: i64 = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    let status = status.parse::<JobStatus>().map_err(|reason| RepoError::Corrupt { id, reason })?;
    let corrupt = |reason: &str| RepoError::Corrupt { id, reason: reason.to_owned() };
    let retry_count: i64 = row.try_get("retry_count")?;
    let size: Option<i64> = row.try_get("size")?;
    Ok(Job {
        id: JobId(id),
        file_url: row.try_get("file_url")?,
        bucket_name: row.try_get("bucket_name")?,
        object_name: row.try_get("object_name")?,
        status,
        retry_count: u32::try_from(retry_count).map_err(|_| corrupt("negative retry_count"))?,
        last_error: row.try_get("last_error")?,
        etag: row.try_get("etag")?,
        size: size.map(u64::try_from).transpose().map_err(|_| corrupt("negative size"))?,
        sha256: row.try_get("sha256")?,
        md5: row.try_get("md5")?,
        content_type: row.try_get("content_type")?,
        expected_sha256: row.try_get("expected_sha256")?,
        expected_md5: row.try_get("expected_md5")?,
        request_headers: match row.try_get::<Option<String>, _>("request_headers")? {
            Some(text) => RequestHeaders::from_json(&text).map_err(|e| corrupt(&e.0))?,
            None => RequestHeaders::default(),
        },
        created_at: from_millis(row.try_get("created_at")?),
        updated_at: from_millis(row.try_get("updated_at")?),
        next_attempt_at: row.try_get::<Option<i64>, _>("next_attempt_at")?.map(from_millis),
    })
}

#[async_trait]
impl JobRepository for SqliteRepository {
    async fn create(&self, job: &NewJob, now: DateTime<Utc>) -> Result<Job, RepoError> {
        let now_ms = to_millis(now);
        let mut tx = self.db.pool.begin().await?;
        let row = sqlx::query(&format!(
            "INSERT INTO files (file_url, bucket_name, object_name, expected_sha256, expected_md5, \
             request_headers, status, retry_count, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?7, 'pending', 0, ?6, ?6) RETURNING {COLUMNS}"
        ))
        .bind(job.source.as_str())
        .bind(job.bucket.as_str())
        .bind(job.key.as_str())
        .bind(job.expected_sha256.as_ref().map(|s| s.as_str()))
        .bind(job.expected_md5.as_ref().map(|s| s.as_str()))
        .bind(now_ms)
        .bind((!job.headers.is_empty()).then(|| job.headers.to_json()))
        .fetch_one(&mut *tx)
        .await?;
        let created = job_from_row(&row)?;
        sqlx::query("INSERT INTO queue (job_id, attempt, due_at) VALUES (?1, 1, ?2)")
            .bind(created.id.0)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.db.queued.notify_waiters();
        Ok(created)
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>, RepoError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM files WHERE id = ?1"))
            .bind(id.0)
            .fetch_optional(&self.db.pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Job>, RepoError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM files \
             WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR id < ?2) \
             ORDER BY id DESC LIMIT ?3"
        ))
        .bind(filter.status.map(JobStatus::as_str))
        .bind(filter.before.map(|id| id.0))
        .bind(i64::from(filter.limit))
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn claim(&self, id: JobId, lease: &Lease, now: DateTime<Utc>) -> Result<Claim, RepoError> {
        let now_ms = to_millis(now);
        let claimed = sqlx::query(&format!(
            "UPDATE files SET status = 'processing', lease_owner = ?2, lease_expires_at = ?3, \
             next_attempt_at = NULL, updated_at = ?4 \
             WHERE id = ?1 AND (status = 'pending' OR (status = 'processing' AND lease_expires_at <= ?4)) \
             RETURNING {COLUMNS}"
        ))
        .bind(id.0)
        .bind(&lease.owner)
        .bind(to_millis(lease.expires_at))
        .bind(now_ms)
        .fetch_optional(&self.db.pool)
        .await?;
        if let Some(row) = claimed {
            return Ok(Claim::Claimed(Box::new(job_from_row(&row)?)));
        }
        let current = sqlx::query("SELECT status, lease_expires_at FROM files WHERE id = ?1")
            .bind(id.0)
            .fetch_optional(&self.db.pool)
            .await?;
        let current = match current {
            Some(row) => {
                let status: String = row.try_get("status")?;
                let status = status.parse::<JobStatus>().map_err(|reason| RepoError::Corrupt { id: id.0, reason })?;
                Some((status, row.try_get::<Option<i64>, _>("lease_expires_at")?.map(from_millis)))
            }
            None => None,
        };
        Ok(Claim::refused(current, now))
    }

    async fn renew(&self, id: JobId, lease: &Lease) -> Result<bool, RepoError> {
        let done = sqlx::query(
            "UPDATE files SET lease_expires_at = ?3 \
             WHERE id = ?1 AND status = 'processing' AND lease_owner = ?2",
        )
        .bind(id.0)
        .bind(&lease.owner)
        .bind(to_millis(lease.expires_at))
        .execute(&self.db.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn settle(
        &self,
        id: JobId,
        owner: &str,
        settlement: &Settlement,
        now: DateTime<Utc>,
    ) -> Result<bool, RepoError> {
        let now_ms = to_millis(now);
        let query = match settlement {
            Settlement::Completed(stored) => sqlx::query(
                "UPDATE files SET status = 'completed', etag = ?3, size = ?4, sha256 = ?5, md5 = ?6, \
                 content_type = ?7, last_error = NULL, lease_owner = NULL, lease_expires_at = NULL, \
                 next_attempt_at = NULL, updated_at = ?8 \
                 WHERE id = ?1 AND status = 'processing' AND lease_owner = ?2",
            )
            .bind(id.0)
            .bind(owner)
            .bind(&stored.etag)
            .bind(i64::try_from(stored.size).unwrap_or(i64::MAX))
            .bind(&stored.sha256)
            .bind(&stored.md5)
            .bind(&stored.content_type)
            .bind(now_ms),
            Settlement::RetryScheduled { retry_count, last_error, due_at } => sqlx::query(
                "UPDATE files SET status = 'pending', retry_count = ?3, last_error = ?4, \
                 next_attempt_at = ?5, lease_owner = NULL, lease_expires_at = NULL, updated_at = ?6 \
                 WHERE id = ?1 AND status = 'processing' AND lease_owner = ?2",
            )
            .bind(id.0)
            .bind(owner)
            .bind(i64::from(*retry_count))
            .bind(last_error)
            .bind(to_millis(*due_at))
            .bind(now_ms),
            Settlement::Failed { last_error } => sqlx::query(
                "UPDATE files SET status = 'failed', last_error = ?3, lease_owner = NULL, \
                 lease_expires_at = NULL, next_attempt_at = NULL, updated_at = ?4 \
                 WHERE id = ?1 AND status = 'processing' AND lease_owner = ?2",
            )
            .bind(id.0)
            .bind(owner)
            .bind(last_error)
            .bind(now_ms),
        };
        let done = query.execute(&self.db.pool).await?;
        Ok(done.rows_affected() == 1)
    }

    async fn release(&self, id: JobId, owner: &str, now: DateTime<Utc>) -> Result<bool, RepoError> {
        let done = sqlx::query(
            "UPDATE files SET status = 'pending', lease_owner = NULL, lease_expires_at = NULL, updated_at = ?3 \
             WHERE id = ?1 AND status = 'processing' AND lease_owner = ?2",
        )
        .bind(id.0)
        .bind(owner)
        .bind(to_millis(now))
        .execute(&self.db.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn requeue_failed(&self, id: JobId, now: DateTime<Utc>) -> Result<Requeue, RepoError> {
        let now_ms = to_millis(now);
        let mut tx = self.db.pool.begin().await?;
        let row = sqlx::query(&format!(
            "UPDATE files SET status = 'pending', retry_count = 0, next_attempt_at = NULL, updated_at = ?2 \
             WHERE id = ?1 AND status = 'failed' RETURNING {COLUMNS}"
        ))
        .bind(id.0)
        .bind(now_ms)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            drop(tx);
            return Ok(Requeue::refused(self.get(id).await?));
        };
        let job = job_from_row(&row)?;
        sqlx::query(
            "INSERT INTO queue (job_id, attempt, due_at) VALUES (?1, 1, ?2) \
             ON CONFLICT (job_id) DO UPDATE SET attempt = 1, due_at = ?2, locked_by = NULL, locked_until = NULL",
        )
        .bind(id.0)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.db.queued.notify_waiters();
        Ok(Requeue::Requeued(Box::new(job)))
    }

    async fn ping(&self) -> Result<(), RepoError> {
        sqlx::query("SELECT 1").execute(&self.db.pool).await?;
        Ok(())
    }
}
