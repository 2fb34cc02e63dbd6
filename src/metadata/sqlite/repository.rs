//! The SQLite [`JobRepository`](crate::metadata::JobRepository).

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::FutureExt as _;
use sqlx::{Connection as _, Row};
use tokio::sync::mpsc;

use super::batches::{
    COLUMNS, Completion, NewJobAt, claim_jobs, insert_on, job_from_row, record_completions, write_new_jobs,
};
use super::{SqliteDb, to_millis};
use crate::domain::{BucketName, ObjectKey};
use crate::lifecycle::{Job, JobId, NewJob, Settlement};
use crate::metadata::cancel_answer;
use crate::metadata::group_commit::{MAX_BATCH, Pending, group_commit, through};
use crate::metadata::{
    Cancel, Claim, Created, IDEMPOTENCY_WINDOW, IdempotencyKey, JobRepository, KeyUse, Lease, ListFilter, Reconciled,
    RepoError, Requeue, Sweep, from_db, millis, to_db,
};

/// An unfinished job that should be moving and has no queue row (?1 now, ?2 the grace
/// period in milliseconds, ?3 whether overdue `pending` jobs count).
const STUCK: &str = "status IN ('pending', 'processing') AND updated_at < ?1 - ?2 \
     AND ((status = 'pending' AND ?3) OR (status = 'processing' AND lease_expires_at <= ?1)) \
     AND NOT EXISTS (SELECT 1 FROM queue q WHERE q.job_id = files.id)";

/// Most finished jobs one retention statement deletes.
const DELETE_CHUNK: u64 = 100;

/// The SQLite implementation of [`JobRepository`].
#[derive(Clone, Debug)]
pub struct SqliteRepository {
    pub(super) db: SqliteDb,
    /// New jobs on their way to the task that writes them.
    creates: mpsc::Sender<Pending<NewJobAt, Result<Job, RepoError>>>,
    /// Completed jobs on their way to the task that records them.
    completions: mpsc::Sender<Pending<Completion, Result<bool, RepoError>>>,
}

impl SqliteRepository {
    /// A repository over `db`. Starts the tasks that write new jobs and completions, so it
    /// must be called inside a Tokio runtime; they end when the last clone is dropped.
    pub fn new(db: SqliteDb) -> Self {
        let for_creates = db.clone();
        let creates = group_commit(MAX_BATCH, move |batch| write_new_jobs(for_creates.clone(), batch));
        let for_completions = db.clone();
        let completions = group_commit(MAX_BATCH, move |batch| record_completions(for_completions.clone(), batch));
        Self { db, creates, completions }
    }
}

#[async_trait]
impl JobRepository for SqliteRepository {
    async fn create(&self, job: &NewJob, now: DateTime<Utc>) -> Result<Job, RepoError> {
        through(&self.creates, (job.clone(), now)).await.ok_or(sqlx::Error::PoolClosed)?
    }

    async fn create_all(&self, jobs: &[NewJob], now: DateTime<Utc>) -> Result<Vec<Job>, RepoError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let batch: Vec<NewJobAt> = jobs.iter().map(|job| (job.clone(), now)).collect();
        let created = self
            .db
            .write(move |c| {
                Box::pin(async move {
                    let mut tx = c.begin().await?;
                    let mut created = Vec::with_capacity(batch.len());
                    for chunk in batch.chunks(MAX_BATCH) {
                        created.extend(insert_on(&mut tx, chunk).await?);
                    }
                    tx.commit().await?;
                    Ok::<_, RepoError>(created)
                })
            })
            .await?;
        self.db.queued.notify_waiters();
        Ok(created)
    }

    async fn create_once(&self, job: &NewJob, key: &IdempotencyKey, now: DateTime<Utc>) -> Result<Created, RepoError> {
        let (job, key) = (job.clone(), key.clone());
        let forgotten_before = to_millis(now) - millis(IDEMPOTENCY_WINDOW);
        // One transaction on the one write connection: no other create can come between
        // looking the key up and recording it.
        let outcome = self
            .db
            .write(move |c| {
                Box::pin(async move {
                    let mut tx = c.begin().await?;
                    sqlx::query("DELETE FROM idempotency_keys WHERE owner = ?1 AND key = ?2 AND created_at < ?3")
                        .bind(&key.owner)
                        .bind(&key.key)
                        .bind(forgotten_before)
                        .execute(&mut *tx)
                        .await?;
                    let used: Option<(String, i64)> = sqlx::query_as(
                        "SELECT request_sha256, job_id FROM idempotency_keys WHERE owner = ?1 AND key = ?2",
                    )
                    .bind(&key.owner)
                    .bind(&key.key)
                    .fetch_optional(&mut *tx)
                    .await?;
                    let outcome = match used {
                        Some((digest, id)) => {
                            KeyUse::Used { same_request: digest == key.request_sha256, id: JobId(id) }
                        }
                        None => {
                            let created = insert_on(&mut tx, &[(job, now)]).await?.pop().expect("one job inserted");
                            sqlx::query(
                                "INSERT INTO idempotency_keys (owner, key, request_sha256, job_id, created_at) \
                                 VALUES (?1, ?2, ?3, ?4, ?5)",
                            )
                            .bind(&key.owner)
                            .bind(&key.key)
                            .bind(&key.request_sha256)
                            .bind(created.id.0)
                            .bind(to_millis(now))
                            .execute(&mut *tx)
                            .await?;
                            KeyUse::Fresh(Box::new(created))
                        }
                    };
                    tx.commit().await?;
                    Ok::<_, RepoError>(outcome)
                })
            })
            .await?;
        if matches!(outcome, KeyUse::Fresh(_)) {
            self.db.queued.notify_waiters();
        }
        outcome.answer(|id| self.get(id)).await
    }

    async fn replay_of(&self, key: &IdempotencyKey, now: DateTime<Utc>) -> Result<Option<Job>, RepoError> {
        let id: Option<i64> = sqlx::query_scalar(
            "SELECT job_id FROM idempotency_keys WHERE owner = ?1 AND key = ?2 AND request_sha256 = ?3 \
             AND created_at >= ?4",
        )
        .bind(&key.owner)
        .bind(&key.key)
        .bind(&key.request_sha256)
        .bind(to_millis(now) - millis(IDEMPOTENCY_WINDOW))
        .fetch_optional(&self.db.reads)
        .await?;
        match id {
            Some(id) => self.get(JobId(id)).await,
            None => Ok(None),
        }
    }

    async fn forget_idempotency_keys(&self, before: DateTime<Utc>, limit: u32) -> Result<u64, RepoError> {
        let done = self
            .db
            .write(move |c| {
                sqlx::query(
                    "DELETE FROM idempotency_keys WHERE rowid IN \
                     (SELECT rowid FROM idempotency_keys WHERE created_at < ?1 LIMIT ?2)",
                )
                .bind(to_millis(before))
                .bind(i64::from(limit))
                .execute(c)
                .boxed()
            })
            .await?;
        Ok(done.rows_affected())
    }

    async fn forget_finished(&self, before: DateTime<Utc>, limit: u32) -> Result<u64, RepoError> {
        // In statements of at most DELETE_CHUNK jobs: each holds the one write connection
        // only briefly, so the writes queued meanwhile (accepts) go between them. Deleting
        // 1,000 jobs with their cascades in one statement held it for about 100 ms.
        let mut deleted = 0;
        while deleted < u64::from(limit) {
            let chunk = (u64::from(limit) - deleted).min(DELETE_CHUNK);
            let done = self
                .db
                .write(move |c| {
                    sqlx::query(
                        // Without statistics SQLite would rather read files_status_idx and sort.
                        "DELETE FROM files WHERE id IN \
                         (SELECT id FROM files INDEXED BY files_finished_updated_idx \
                          WHERE status IN ('completed', 'failed', 'cancelled') AND updated_at < ?1 \
                          AND NOT EXISTS (SELECT 1 FROM webhook_deliveries w WHERE w.job_id = files.id \
                                          AND w.delivered_at IS NULL AND w.given_up_at IS NULL) \
                          ORDER BY updated_at LIMIT ?2)",
                    )
                    .bind(to_millis(before))
                    .bind(chunk as i64)
                    .execute(c)
                    .boxed()
                })
                .await?
                .rows_affected();
            deleted += done;
            if done < chunk {
                break;
            }
        }
        Ok(deleted)
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>, RepoError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM files WHERE id = ?1"))
            .bind(id.0)
            .fetch_optional(&self.db.reads)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn last_stored(&self, bucket: &BucketName, key: &ObjectKey) -> Result<Option<Job>, RepoError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM files WHERE bucket_name = ?1 AND object_name = ?2 AND status = 'completed' \
             AND (origin_etag IS NOT NULL OR origin_last_modified IS NOT NULL) ORDER BY id DESC LIMIT 1"
        );
        let row = sqlx::query(&sql).bind(bucket.as_str()).bind(key.as_str()).fetch_optional(&self.db.reads).await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Job>, RepoError> {
        let sql = format!("SELECT {COLUMNS} FROM files {}", filter.sql(|n| format!("?{n}")));
        let rows = filter.bind(sqlx::query(&sql)).fetch_all(&self.db.reads).await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn unfinished_of(&self, owner: &str) -> Result<u64, RepoError> {
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM files WHERE owner_key = ?1 AND status IN ('pending', 'processing')",
        )
        .bind(owner)
        .fetch_one(&self.db.reads)
        .await?;
        Ok(from_db(count))
    }

    async fn claim_many(&self, requests: &[(JobId, Lease)]) -> Result<Vec<Claim>, RepoError> {
        let mut claims = Vec::with_capacity(requests.len());
        for chunk in requests.chunks(MAX_BATCH) {
            claims.extend(claim_jobs(&self.db, chunk).await?);
        }
        Ok(claims)
    }

    async fn renew(&self, id: JobId, lease: &Lease) -> Result<bool, RepoError> {
        let (owner, length) = (lease.owner.clone(), lease.millis());
        let done = self
            .db
            .write(move |c| {
                sqlx::query(
                    "UPDATE files SET lease_expires_at = ?3 \
                     WHERE id = ?1 AND status = 'processing' AND lease_owner = ?2",
                )
                .bind(id.0)
                .bind(owner)
                .bind(to_millis(Utc::now()).saturating_add(length))
                .execute(c)
                .boxed()
            })
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn holds(&self, id: JobId, owner: &str, margin: Duration) -> Result<bool, RepoError> {
        let margin = super::millis(margin);
        let held: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM files WHERE id = ?1 AND status = 'processing' AND lease_owner = ?2 \
             AND lease_expires_at > ?3)",
        )
        .bind(id.0)
        .bind(owner)
        .bind(to_millis(Utc::now()).saturating_add(margin))
        .fetch_one(&self.db.reads)
        .await?;
        Ok(held)
    }

    async fn reconcile(&self, sweep: &Sweep) -> Result<Reconciled, RepoError> {
        // The queue lives in this database and is written with the jobs, so nothing is
        // lost between the two; this sweep is the check that keeps it so: an unfinished job
        // without a queue row (which no write of fileflow's leaves) gets one back.
        let grace = super::millis(sweep.grace);
        let (limit, pending) = (sweep.limit, sweep.pending);
        // Looked for on a read connection first: the sweep almost always finds nothing,
        // and reading every unfinished job on the write connection held up the writes
        // queued behind it (11 ms a sweep with 15,000 jobs pending).
        let stuck: bool = sqlx::query_scalar(&format!("SELECT EXISTS (SELECT 1 FROM files WHERE {STUCK})"))
            .bind(to_millis(Utc::now()))
            .bind(grace)
            .bind(pending)
            .fetch_one(&self.db.reads)
            .await?;
        if !stuck {
            return Ok(Reconciled::default());
        }
        let rows = self
            .db
            .write(move |c| {
                let now = to_millis(Utc::now());
                let sql = format!(
                    "INSERT INTO queue (job_id, attempt, due_at, owner, priority) \
                     SELECT id, retry_count + 1, MAX(COALESCE(next_attempt_at, 0), ?1), COALESCE(owner_key, ''), \
                     priority FROM files \
                     WHERE {STUCK} ORDER BY id LIMIT ?4 \
                     RETURNING job_id, (SELECT status FROM files f WHERE f.id = job_id) AS status"
                );
                Box::pin(async move {
                    sqlx::query(&sql).bind(now).bind(grace).bind(pending).bind(i64::from(limit)).fetch_all(c).await
                })
            })
            .await?;
        let mut swept = Reconciled::default();
        for row in &rows {
            match row.try_get::<String, _>("status")?.as_str() {
                "pending" => swept.pending += 1,
                _ => swept.expired += 1,
            }
        }
        if swept.total() > 0 {
            self.db.queued.notify_waiters();
        }
        Ok(swept)
    }

    async fn settle(
        &self,
        id: JobId,
        owner: &str,
        settlement: &Settlement,
        now: DateTime<Utc>,
    ) -> Result<bool, RepoError> {
        let (now_ms, owner) = (to_millis(now), owner.to_owned());
        let done = match settlement {
            // The most common write of all, so completions share statements.
            Settlement::Completed(stored) => {
                let completion = (id, owner, stored.clone(), now);
                return through(&self.completions, completion).await.ok_or(sqlx::Error::PoolClosed)?;
            }
            Settlement::RetryScheduled { retry_count, last_error, due_at } => {
                let (retry_count, last_error, due_at) =
                    (i64::from(*retry_count), last_error.clone(), to_millis(*due_at));
                self.db
                    .write(move |c| {
                        sqlx::query(
                            "UPDATE files SET status = 'pending', retry_count = ?3, last_error = ?4, \
                             next_attempt_at = ?5, lease_owner = NULL, lease_expires_at = NULL, updated_at = ?6 \
                             WHERE id = ?1 AND status = 'processing' AND lease_owner = ?2",
                        )
                        .bind(id.0)
                        .bind(owner)
                        .bind(retry_count)
                        .bind(last_error)
                        .bind(due_at)
                        .bind(now_ms)
                        .execute(c)
                        .boxed()
                    })
                    .await?
            }
            Settlement::Failed { last_error, .. } => {
                let last_error = last_error.clone();
                self.db
                    .write(move |c| {
                        sqlx::query(
                            "UPDATE files SET status = 'failed', last_error = ?3, lease_owner = NULL, \
                             lease_expires_at = NULL, next_attempt_at = NULL, updated_at = ?4 \
                             WHERE id = ?1 AND status = 'processing' AND lease_owner = ?2",
                        )
                        .bind(id.0)
                        .bind(owner)
                        .bind(last_error)
                        .bind(now_ms)
                        .execute(c)
                        .boxed()
                    })
                    .await?
            }
            Settlement::Cancelled => {
                self.db
                    .write(move |c| {
                        sqlx::query(
                            "UPDATE files SET status = 'cancelled', lease_owner = NULL, lease_expires_at = NULL, \
                             next_attempt_at = NULL, updated_at = ?3 \
                             WHERE id = ?1 AND status = 'processing' AND lease_owner = ?2",
                        )
                        .bind(id.0)
                        .bind(owner)
                        .bind(now_ms)
                        .execute(c)
                        .boxed()
                    })
                    .await?
            }
        };
        Ok(done.rows_affected() == 1)
    }

    async fn cancel(&self, id: JobId, now: DateTime<Utc>) -> Result<Cancel, RepoError> {
        let now_ms = to_millis(now);
        // SET expressions all see the row as it was: a waiting job is cancelled at once (the
        // trigger drops its queue row), a running one is asked to stop.
        let sql = format!(
            "UPDATE files SET \
             status = CASE status WHEN 'pending' THEN 'cancelled' ELSE status END, \
             cancel_requested_at = CASE status WHEN 'processing' THEN ?2 ELSE cancel_requested_at END, \
             next_attempt_at = CASE status WHEN 'pending' THEN NULL ELSE next_attempt_at END, \
             updated_at = ?2 \
             WHERE id = ?1 AND status IN ('pending', 'processing') RETURNING {COLUMNS}"
        );
        let row = self
            .db
            .write(move |c| Box::pin(async move { sqlx::query(&sql).bind(id.0).bind(now_ms).fetch_optional(c).await }))
            .await?;
        cancel_answer(row.as_ref().map(job_from_row).transpose()?, || self.get(id)).await
    }

    async fn report_progress(
        &self,
        id: JobId,
        owner: &str,
        done: u64,
        total: Option<u64>,
    ) -> Result<Option<bool>, RepoError> {
        let owner = owner.to_owned();
        let answer: Option<bool> = self
            .db
            .write(move |c| {
                sqlx::query_scalar(
                    "UPDATE files SET bytes_done = ?3, bytes_total = ?4 \
                     WHERE id = ?1 AND status = 'processing' AND lease_owner = ?2 \
                     RETURNING cancel_requested_at IS NOT NULL",
                )
                .bind(id.0)
                .bind(owner)
                .bind(to_db(done))
                .bind(total.map(to_db))
                .fetch_optional(c)
                .boxed()
            })
            .await?;
        Ok(answer)
    }

    async fn checkpoint(&self, id: JobId) -> Result<Option<String>, RepoError> {
        let body = sqlx::query_scalar("SELECT body FROM checkpoints WHERE job_id = ?1")
            .bind(id.0)
            .fetch_optional(&self.db.reads)
            .await?;
        Ok(body)
    }

    async fn save_checkpoint(
        &self,
        id: JobId,
        owner: &str,
        done: u64,
        total: Option<u64>,
        checkpoint: &str,
    ) -> Result<bool, RepoError> {
        let (owner, checkpoint) = (owner.to_owned(), checkpoint.to_owned());
        self.db
            .write(move |c| {
                async move {
                    let held = sqlx::query(
                        "UPDATE files SET bytes_done = MAX(COALESCE(bytes_done, 0), ?3), \
                         bytes_total = COALESCE(?4, bytes_total) \
                         WHERE id = ?1 AND status = 'processing' AND lease_owner = ?2",
                    )
                    .bind(id.0)
                    .bind(owner)
                    .bind(to_db(done))
                    .bind(total.map(to_db))
                    .execute(&mut *c)
                    .await?
                    .rows_affected()
                        == 1;
                    if held {
                        sqlx::query(
                            "INSERT INTO checkpoints (job_id, body, saved_at) VALUES (?1, ?2, ?3) \
                             ON CONFLICT (job_id) DO UPDATE SET body = excluded.body, saved_at = excluded.saved_at",
                        )
                        .bind(id.0)
                        .bind(checkpoint)
                        .bind(to_millis(Utc::now()))
                        .execute(&mut *c)
                        .await?;
                    }
                    Ok(held)
                }
                .boxed()
            })
            .await
    }

    async fn clear_checkpoint(&self, id: JobId) -> Result<(), RepoError> {
        self.db
            .write(move |c| sqlx::query("DELETE FROM checkpoints WHERE job_id = ?1").bind(id.0).execute(c).boxed())
            .await?;
        Ok(())
    }

    async fn release(&self, id: JobId, owner: &str, now: DateTime<Utc>) -> Result<bool, RepoError> {
        let owner = owner.to_owned();
        let done = self
            .db
            .write(move |c| {
                sqlx::query(
                    "UPDATE files SET status = 'pending', lease_owner = NULL, lease_expires_at = NULL, updated_at = ?3 \
                     WHERE id = ?1 AND status = 'processing' AND lease_owner = ?2",
                )
                .bind(id.0)
                .bind(owner)
                .bind(to_millis(now))
                .execute(c)
                .boxed()
            })
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn requeue_failed(&self, id: JobId, now: DateTime<Utc>) -> Result<Requeue, RepoError> {
        let now_ms = to_millis(now);
        let requeued = self
            .db
            .write(move |c| {
                Box::pin(async move {
                    let mut tx = c.begin().await?;
                    let row = sqlx::query(&format!(
                        "UPDATE files SET status = 'pending', retry_count = 0, next_attempt_at = NULL, cancel_requested_at = NULL, \
                         updated_at = ?2 \
                         WHERE id = ?1 AND status = 'failed' RETURNING {COLUMNS}"
                    ))
                    .bind(id.0)
                    .bind(now_ms)
                    .fetch_optional(&mut *tx)
                    .await?;
                    let Some(row) = row else { return Ok(None) };
                    let job = job_from_row(&row)?;
                    sqlx::query(
                        "INSERT INTO queue (job_id, attempt, due_at, owner, priority) \
                         SELECT id, 1, ?2, COALESCE(owner_key, ''), priority FROM files WHERE id = ?1 \
                         ON CONFLICT (job_id) DO UPDATE SET attempt = 1, due_at = ?2, locked_by = NULL, \
                         locked_until = NULL",
                    )
                    .bind(id.0)
                    .bind(now_ms)
                    .execute(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    Ok::<_, RepoError>(Some(job))
                })
            })
            .await?;
        let Some(job) = requeued else {
            return Ok(Requeue::refused(self.get(id).await?));
        };
        self.db.queued.notify_waiters();
        Ok(Requeue::Requeued(Box::new(job)))
    }

    async fn ping(&self) -> Result<(), RepoError> {
        sqlx::query("SELECT 1").execute(&self.db.reads).await?;
        Ok(())
    }

    async fn outbox_depth(&self) -> Result<Option<u64>, RepoError> {
        Ok(None)
    }
}
