//! PostgreSQL metadata repository: the distributed mode. New jobs are announced through
//! the `outbox` table, which the relay publishes to the queue.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgPoolOptions, PgRow};
use sqlx::{PgPool, Postgres, Row, Transaction};
use tokio::sync::{Notify, mpsc};

use super::group_commit::{MAX_BATCH, Pending, all_or_each, group_commit, through};
use super::{Claim, JobRepository, Lease, ListFilter, RepoError, Requeue};
use crate::domain::RequestHeaders;
use crate::lifecycle::{Job, JobId, JobStatus, NewJob, Settlement};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// An open PostgreSQL pool, shared by the repository and the outbox relay.
#[derive(Clone, Debug)]
pub struct PgDb {
    pub pool: PgPool,
    /// Woken when this process writes to the outbox, so the relay publishes at once.
    pub outboxed: Arc<Notify>,
}

impl PgDb {
    pub async fn connect(url: &str) -> Result<Self, RepoError> {
        let pool =
            PgPoolOptions::new().max_connections(16).acquire_timeout(Duration::from_secs(10)).connect(url).await?;
        Ok(Self { pool, outboxed: Arc::new(Notify::new()) })
    }

    pub async fn migrate(&self) -> Result<(), RepoError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }
}

type NewJobAt = (NewJob, DateTime<Utc>);

#[derive(Clone, Debug)]
pub struct PgRepository {
    db: PgDb,
    /// New jobs on their way to the task that writes them.
    creates: mpsc::Sender<Pending<NewJobAt, Result<Job, RepoError>>>,
}

impl PgRepository {
    /// A repository over `db`. Starts the task that writes new jobs, so it must be called
    /// inside a Tokio runtime; the task ends when the last clone is dropped.
    pub fn new(db: PgDb) -> Self {
        let for_creates = db.clone();
        let creates = group_commit(MAX_BATCH, move |batch| write_new_jobs(for_creates.clone(), batch));
        Self { db, creates }
    }

    async fn enqueue(tx: &mut Transaction<'_, Postgres>, id: JobId) -> Result<(), RepoError> {
        sqlx::query("INSERT INTO outbox (job_id, attempt) VALUES ($1, 1)").bind(id.0).execute(&mut **tx).await?;
        Ok(())
    }

    /// Claim one job: see [`JobRepository::claim`].
    async fn claim_one(&self, id: JobId, lease: &Lease, now: DateTime<Utc>) -> Result<Claim, RepoError> {
        let claimed = sqlx::query(&format!(
            "UPDATE files SET status = 'processing', lease_owner = $2, lease_expires_at = $3, next_attempt_at = NULL, \
             updated_at = $4 WHERE id = $1 AND (status = 'pending' OR (status = 'processing' AND lease_expires_at <= $4)) \
             RETURNING {COLUMNS}"
        ))
        .bind(id.0)
        .bind(&lease.owner)
        .bind(lease.expires_at)
        .bind(now)
        .fetch_optional(&self.db.pool)
        .await?;
        if let Some(row) = claimed {
            return Ok(Claim::Claimed(Box::new(job_from_row(&row)?)));
        }
        let current = sqlx::query("SELECT status, lease_expires_at FROM files WHERE id = $1")
            .bind(id.0)
            .fetch_optional(&self.db.pool)
            .await?;
        let current = match current {
            Some(row) => {
                let status: String = row.try_get("status")?;
                let status = status.parse::<JobStatus>().map_err(|reason| RepoError::Corrupt { id: id.0, reason })?;
                Some((status, row.try_get::<Option<DateTime<Utc>>, _>("lease_expires_at")?))
            }
            None => None,
        };
        Ok(Claim::refused(current, now))
    }
}

/// Write new jobs, many to a statement, and wake the outbox relay.
async fn write_new_jobs(db: PgDb, batch: Vec<NewJobAt>) -> Vec<Result<Job, RepoError>> {
    let answers = all_or_each(&batch, |jobs| insert_jobs(&db, jobs)).await;
    if answers.iter().any(Result::is_ok) {
        db.outboxed.notify_waiters();
    }
    answers
}

/// Insert `batch` (at least one job) and an outbox row for each in one statement, so
/// they commit together in one round trip; returns the jobs in the order given.
async fn insert_jobs(db: &PgDb, batch: &[NewJobAt]) -> Result<Vec<Job>, RepoError> {
    let rows = sqlx::query(&format!(
        "WITH created AS ( \
             INSERT INTO files (file_url, bucket_name, object_name, expected_sha256, expected_md5, request_headers, \
             created_at, updated_at) \
             SELECT u, b, k, s, m, h, t, t \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::timestamptz[]) \
             WITH ORDINALITY AS v (u, b, k, s, m, h, t, n) ORDER BY n \
             RETURNING {COLUMNS}), \
         queued AS (INSERT INTO outbox (job_id, attempt) SELECT id, 1 FROM created ORDER BY id) \
         SELECT * FROM created"
    ))
    .bind(batch.iter().map(|(job, _)| job.source.as_str()).collect::<Vec<_>>())
    .bind(batch.iter().map(|(job, _)| job.bucket.as_str()).collect::<Vec<_>>())
    .bind(batch.iter().map(|(job, _)| job.key.as_str()).collect::<Vec<_>>())
    .bind(batch.iter().map(|(job, _)| job.expected_sha256.as_ref().map(|s| s.as_str())).collect::<Vec<_>>())
    .bind(batch.iter().map(|(job, _)| job.expected_md5.as_ref().map(|s| s.as_str())).collect::<Vec<_>>())
    .bind(batch.iter().map(|(job, _)| (!job.headers.is_empty()).then(|| job.headers.to_json())).collect::<Vec<_>>())
    .bind(batch.iter().map(|(_, now)| *now).collect::<Vec<_>>())
    .fetch_all(&db.pool)
    .await?;
    let mut jobs = rows.iter().map(job_from_row).collect::<Result<Vec<_>, _>>()?;
    // RETURNING gives no order, but ids are handed out in the order rows are inserted.
    jobs.sort_unstable_by_key(|job| job.id.0);
    Ok(jobs)
}

const COLUMNS: &str = "id, file_url, bucket_name, object_name, status, retry_count, last_error, etag, size, \
    sha256, md5, content_type, expected_sha256, expected_md5, request_headers, created_at, updated_at, next_attempt_at";

fn job_from_row(row: &PgRow) -> Result<Job, RepoError> {
    let id: i64 = row.try_get("id")?;
    let corrupt = |reason: String| RepoError::Corrupt { id, reason };
    let status: String = row.try_get("status")?;
    let retry_count: i32 = row.try_get("retry_count")?;
    let size: Option<i64> = row.try_get("size")?;
    let headers: Option<String> = row.try_get("request_headers")?;
    Ok(Job {
        id: JobId(id),
        file_url: row.try_get("file_url")?,
        bucket_name: row.try_get("bucket_name")?,
        object_name: row.try_get("object_name")?,
        status: status.parse().map_err(corrupt)?,
        retry_count: u32::try_from(retry_count).map_err(|_| corrupt("negative retry_count".into()))?,
        last_error: row.try_get("last_error")?,
        etag: row.try_get("etag")?,
        size: size.map(u64::try_from).transpose().map_err(|_| corrupt("negative size".into()))?,
        sha256: row.try_get("sha256")?,
        md5: row.try_get("md5")?,
        content_type: row.try_get("content_type")?,
        expected_sha256: row.try_get("expected_sha256")?,
        expected_md5: row.try_get("expected_md5")?,
        request_headers: match headers {
            Some(text) => RequestHeaders::from_json(&text).map_err(|e| corrupt(e.0))?,
            None => RequestHeaders::default(),
        },
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
    })
}

#[async_trait]
impl JobRepository for PgRepository {
    async fn create(&self, job: &NewJob, now: DateTime<Utc>) -> Result<Job, RepoError> {
        through(&self.creates, (job.clone(), now)).await.ok_or(sqlx::Error::PoolClosed)?
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>, RepoError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM files WHERE id = $1"))
            .bind(id.0)
            .fetch_optional(&self.db.pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Job>, RepoError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM files WHERE ($1::text IS NULL OR status = $1) AND ($2::bigint IS NULL OR id < $2) \
             ORDER BY id DESC LIMIT $3"
        ))
        .bind(filter.status.map(JobStatus::as_str))
        .bind(filter.before.map(|id| id.0))
        .bind(i64::from(filter.limit))
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn claim_many(&self, requests: &[(JobId, Lease)], now: DateTime<Utc>) -> Result<Vec<Claim>, RepoError> {
        // One statement each, side by side on the pool: a batch update of rows that other
        // workers may be claiming too could deadlock.
        futures::future::try_join_all(requests.iter().map(|(id, lease)| self.claim_one(*id, lease, now))).await
    }

    async fn renew(&self, id: JobId, lease: &Lease) -> Result<bool, RepoError> {
        let done = sqlx::query(
            "UPDATE files SET lease_expires_at = $3 WHERE id = $1 AND status = 'processing' AND lease_owner = $2",
        )
        .bind(id.0)
        .bind(&lease.owner)
        .bind(lease.expires_at)
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
        let query = match settlement {
            Settlement::Completed(stored) => sqlx::query(
                "UPDATE files SET status = 'completed', etag = $3, size = $4, sha256 = $5, md5 = $6, content_type = $7, \
                 last_error = NULL, lease_owner = NULL, lease_expires_at = NULL, next_attempt_at = NULL, updated_at = $8 \
                 WHERE id = $1 AND status = 'processing' AND lease_owner = $2",
            )
            .bind(id.0)
            .bind(owner)
            .bind(&stored.etag)
            .bind(i64::try_from(stored.size).unwrap_or(i64::MAX))
            .bind(&stored.sha256)
            .bind(&stored.md5)
            .bind(&stored.content_type)
            .bind(now),
            Settlement::RetryScheduled { retry_count, last_error, due_at } => sqlx::query(
                "UPDATE files SET status = 'pending', retry_count = $3, last_error = $4, next_attempt_at = $5, \
                 lease_owner = NULL, lease_expires_at = NULL, updated_at = $6 \
                 WHERE id = $1 AND status = 'processing' AND lease_owner = $2",
            )
            .bind(id.0)
            .bind(owner)
            .bind(i32::try_from(*retry_count).unwrap_or(i32::MAX))
            .bind(last_error)
            .bind(*due_at)
            .bind(now),
            Settlement::Failed { last_error } => sqlx::query(
                "UPDATE files SET status = 'failed', last_error = $3, lease_owner = NULL, lease_expires_at = NULL, \
                 next_attempt_at = NULL, updated_at = $4 \
                 WHERE id = $1 AND status = 'processing' AND lease_owner = $2",
            )
            .bind(id.0)
            .bind(owner)
            .bind(last_error)
            .bind(now),
        };
        Ok(query.execute(&self.db.pool).await?.rows_affected() == 1)
    }

    async fn release(&self, id: JobId, owner: &str, now: DateTime<Utc>) -> Result<bool, RepoError> {
        let done = sqlx::query(
            "UPDATE files SET status = 'pending', lease_owner = NULL, lease_expires_at = NULL, updated_at = $3 \
             WHERE id = $1 AND status = 'processing' AND lease_owner = $2",
        )
        .bind(id.0)
        .bind(owner)
        .bind(now)
        .execute(&self.db.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn requeue_failed(&self, id: JobId, now: DateTime<Utc>) -> Result<Requeue, RepoError> {
        let mut tx = self.db.pool.begin().await?;
        let row = sqlx::query(&format!(
            "UPDATE files SET status = 'pending', retry_count = 0, next_attempt_at = NULL, updated_at = $2 \
             WHERE id = $1 AND status = 'failed' RETURNING {COLUMNS}"
        ))
        .bind(id.0)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            drop(tx);
            return Ok(Requeue::refused(self.get(id).await?));
        };
        let job = job_from_row(&row)?;
        Self::enqueue(&mut tx, id).await?;
        tx.commit().await?;
        self.db.outboxed.notify_waiters();
        Ok(Requeue::Requeued(Box::new(job)))
    }

    async fn ping(&self) -> Result<(), RepoError> {
        sqlx::query("SELECT 1").execute(&self.db.pool).await?;
        Ok(())
    }
}
