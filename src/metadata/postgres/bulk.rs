//! The PostgreSQL [`BatchStore`]: batches beside the jobs, written in the same
//! transactions as the jobs they count.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::PgRow;

use super::{NewJobAt, PgRepository, insert_on};
use crate::lifecycle::NewJob;
use crate::metadata::bulk::{EndNotice, REPORT_COLUMNS, end_event, held_owner, report_row};
use crate::metadata::group_commit::MAX_BATCH;
use crate::metadata::{
    Batch, BatchCounts, BatchCreated, BatchStore, InvalidRow, NewBatch, RepoError, ReportRow, Steer, Steered, from_db,
    to_db,
};

const BATCH_COLUMNS: &str = "id, owner_key, state, paused, request, rows_read, read_error, total, pending, \
    processing, completed, failed, cancelled, invalid, bytes_done, report_written_at, report_error, ended_at, \
    created_at, updated_at";

fn batch_from_row(row: &PgRow) -> Result<Batch, RepoError> {
    let id: i64 = row.try_get("id")?;
    let count = |column: &str| row.try_get::<i64, _>(column).map(from_db);
    Ok(Batch {
        id,
        owner: row.try_get("owner_key")?,
        state: row.try_get::<String, _>("state")?.parse().map_err(|reason| RepoError::Corrupt { id, reason })?,
        paused: row.try_get("paused")?,
        request: row.try_get("request")?,
        rows_read: count("rows_read")?,
        read_error: row.try_get("read_error")?,
        total: count("total")?,
        counts: BatchCounts {
            pending: count("pending")?,
            processing: count("processing")?,
            completed: count("completed")?,
            failed: count("failed")?,
            cancelled: count("cancelled")?,
            invalid: count("invalid")?,
        },
        bytes_done: count("bytes_done")?,
        report_written: row.try_get::<Option<DateTime<Utc>>, _>("report_written_at")?.is_some(),
        report_error: row.try_get("report_error")?,
        ended_at: row.try_get("ended_at")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// Jobs of a cancelled batch cancelled in one transaction, at most.
const CANCEL_CHUNK: i64 = 5_000;

impl PgRepository {
    /// Cancel a cancelled batch's waiting jobs (`ending` asks its running ones to stop), a
    /// chunk per transaction, passing over rows another transaction holds (a claim or a
    /// completion, which also updates the batch's counts): the next call comes back for
    /// them. One transaction over every row deadlocked with those (the bench's 1M-row
    /// cancel answered 500 in 3 runs of 3): it held the batch's row and waited for a job's,
    /// while the claim held the job's and waited for the batch's.
    async fn cancel_waiting(&self, id: i64, now: DateTime<Utc>) -> Result<(), RepoError> {
        // In id order from where the last chunk ended, so no chunk reads the rows done before.
        let mut after = 0i64;
        loop {
            let (done, last): (i64, Option<i64>) = sqlx::query_as(
                "WITH picked AS (SELECT id FROM files WHERE batch_id = $1 AND id > $4 AND status = 'pending' \
                   ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED), \
                 done AS (UPDATE files SET status = 'cancelled', next_attempt_at = NULL, updated_at = $2 \
                   FROM picked WHERE files.id = picked.id RETURNING files.id) \
                 SELECT count(*), max(id) FROM done",
            )
            .bind(id)
            .bind(now)
            .bind(CANCEL_CHUNK)
            .bind(after)
            .fetch_one(&self.db.pool)
            .await?;
            match last {
                Some(last) if done == CANCEL_CHUNK => after = last,
                _ => return Ok(()),
            }
        }
    }
}

async fn read_batch<'c>(c: impl sqlx::PgExecutor<'c>, id: i64) -> Result<Option<Batch>, RepoError> {
    let row =
        sqlx::query(&format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = $1")).bind(id).fetch_optional(c).await?;
    row.as_ref().map(batch_from_row).transpose()
}

fn lease_end(now: DateTime<Utc>, lease: Duration) -> DateTime<Utc> {
    now + chrono::TimeDelta::from_std(lease).unwrap_or(chrono::TimeDelta::MAX)
}

#[async_trait]
impl BatchStore for PgRepository {
    async fn create_batch(&self, batch: &NewBatch, now: DateTime<Utc>) -> Result<BatchCreated, RepoError> {
        let mut tx = self.db.pool.begin().await?;
        if let Some((key, digest)) = &batch.idempotency {
            // Two requests with one key wait for each other here, not on the unique index.
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext(COALESCE($1, '') || '/' || $2))")
                .bind(&batch.owner)
                .bind(key)
                .execute(&mut *tx)
                .await?;
            let used: Option<(i64, Option<String>)> = sqlx::query_as(
                "SELECT id, request_sha256 FROM batches \
                 WHERE COALESCE(owner_key, '') = COALESCE($1, '') AND idempotency_key = $2",
            )
            .bind(&batch.owner)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some((id, used_digest)) = used {
                if used_digest.as_deref() != Some(digest.as_str()) {
                    return Ok(BatchCreated::KeyReused);
                }
                let found = read_batch(&mut *tx, id).await?;
                return Ok(found.map_or(BatchCreated::KeyReused, |b| BatchCreated::Replayed(Box::new(b))));
            }
        }
        let row = sqlx::query(&format!(
            "INSERT INTO batches (owner_key, request, idempotency_key, request_sha256, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $5) RETURNING {BATCH_COLUMNS}"
        ))
        .bind(&batch.owner)
        .bind(&batch.request)
        .bind(batch.idempotency.as_ref().map(|(key, _)| key))
        .bind(batch.idempotency.as_ref().map(|(_, digest)| digest))
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let created = batch_from_row(&row)?;
        tx.commit().await?;
        Ok(BatchCreated::New(Box::new(created)))
    }

    async fn batch(&self, id: i64) -> Result<Option<Batch>, RepoError> {
        read_batch(&self.db.pool, id).await
    }

    async fn batches(&self, owner: Option<&str>, before: Option<i64>, limit: u32) -> Result<Vec<Batch>, RepoError> {
        let owner_filter = if owner.is_some() { "owner_key = $1" } else { "$1::text IS NULL" };
        let rows = sqlx::query(&format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE {owner_filter} AND id < $2 ORDER BY id DESC LIMIT $3"
        ))
        .bind(owner)
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter().map(batch_from_row).collect()
    }

    async fn take_reading(
        &self,
        reader: &str,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<Option<Batch>, RepoError> {
        let row = sqlx::query(&format!(
            "UPDATE batches SET reader = $1, reader_until = $3 WHERE id = ( \
             SELECT id FROM batches WHERE state = 'reading' AND ended_at IS NULL AND NOT paused \
             AND (reader_until IS NULL OR reader_until <= $2) ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) \
             RETURNING {BATCH_COLUMNS}"
        ))
        .bind(reader)
        .bind(now)
        .bind(lease_end(now, lease))
        .fetch_optional(&self.db.pool)
        .await?;
        row.as_ref().map(batch_from_row).transpose()
    }

    async fn release_reading(&self, reader: &str) -> Result<u64, RepoError> {
        let done = sqlx::query("UPDATE batches SET reader = NULL, reader_until = NULL WHERE reader = $1")
            .bind(reader)
            .execute(&self.db.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn append_rows(
        &self,
        id: i64,
        reader: &str,
        rows_read: u64,
        jobs: &[NewJob],
        invalid: &[InvalidRow],
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<Option<Batch>, RepoError> {
        let mut tx = self.db.pool.begin().await?;
        let batch: Vec<NewJobAt> =
            jobs.iter().map(|job| (job.clone(), now, format!("{:032x}", rand::random::<u128>()))).collect();
        for chunk in batch.chunks(MAX_BATCH * 16) {
            insert_on(&mut *tx, chunk).await?;
        }
        if !invalid.is_empty() {
            sqlx::query(
                "INSERT INTO batch_invalid_rows (batch_id, row, file_url, reason) \
                 SELECT $1, r, u, e FROM unnest($2::bigint[], $3::text[], $4::text[]) AS v (r, u, e) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .bind(invalid.iter().map(|r| to_db(r.row)).collect::<Vec<_>>())
            .bind(invalid.iter().map(|r| r.file_url.clone()).collect::<Vec<_>>())
            .bind(invalid.iter().map(|r| r.reason.clone()).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
        // The batch's row last, so it is held only until the commit: every change of one
        // of its jobs' status updates its counts (a trigger) and waits for it. Taken first,
        // it held the workers back for the whole insert (about 230 jobs/s while reading,
        // where they do 550 otherwise). A reader that lost the batch meanwhile rolls back.
        let held = sqlx::query(
            "UPDATE batches SET rows_read = $3, reader_until = $4, updated_at = $5, \
             total = total + $6 + $7, pending = pending + $6, invalid = invalid + $7 \
             WHERE id = $1 AND reader = $2 AND state = 'reading'",
        )
        .bind(id)
        .bind(reader)
        .bind(to_db(rows_read))
        .bind(lease_end(now, lease))
        .bind(now)
        .bind(to_db(jobs.len() as u64))
        .bind(to_db(invalid.len() as u64))
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !held {
            return Ok(None);
        }
        let batch = read_batch(&mut *tx, id).await?;
        tx.commit().await?;
        self.db.outboxed.notify_waiters();
        Ok(batch)
    }

    async fn finish_reading(
        &self,
        id: i64,
        reader: &str,
        error: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<bool, RepoError> {
        let done = sqlx::query(
            "UPDATE batches SET state = 'running', reader = NULL, reader_until = NULL, read_error = $3, \
             updated_at = $4 WHERE id = $1 AND reader = $2 AND state = 'reading'",
        )
        .bind(id)
        .bind(reader)
        .bind(error)
        .bind(now)
        .execute(&self.db.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn steer(&self, id: i64, steer: Steer, now: DateTime<Utc>) -> Result<Option<Steered>, RepoError> {
        let mut tx = self.db.pool.begin().await?;
        let (set, condition) = match steer {
            Steer::Cancel => (
                "state = 'cancelled', paused = FALSE, reader = NULL, reader_until = NULL",
                "state IN ('reading', 'running')",
            ),
            Steer::Pause => ("paused = TRUE", "state IN ('reading', 'running') AND NOT paused"),
            Steer::Resume => ("paused = FALSE", "state IN ('reading', 'running') AND paused"),
        };
        let changed = sqlx::query(&format!("UPDATE batches SET {set}, updated_at = $2 WHERE id = $1 AND {condition}"))
            .bind(id)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        let held = held_owner(id);
        if changed {
            match steer {
                Steer::Cancel => {
                    // The jobs themselves are cancelled by the batch runner (`ending`),
                    // in chunks of their own; from now on no claim takes a waiting one.
                    // Announcements of cancelled jobs have nothing left to say.
                    sqlx::query("DELETE FROM outbox WHERE owner = $1").bind(&held).execute(&mut *tx).await?;
                }
                Steer::Pause => {
                    // Filed under an owner that never gets a turn: the relay leaves them.
                    sqlx::query(
                        "UPDATE outbox SET owner = $2 WHERE job_id IN \
                         (SELECT id FROM files WHERE batch_id = $1 AND status = 'pending')",
                    )
                    .bind(id)
                    .bind(&held)
                    .execute(&mut *tx)
                    .await?;
                }
                Steer::Resume => {
                    sqlx::query(
                        "UPDATE outbox SET owner = COALESCE(f.owner_key, '') FROM files f \
                         WHERE f.id = outbox.job_id AND outbox.owner = $1",
                    )
                    .bind(&held)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        let batch = read_batch(&mut *tx, id).await?;
        tx.commit().await?;
        if changed && steer == Steer::Resume {
            self.db.outboxed.notify_waiters();
        }
        Ok(batch.map(|batch| Steered { changed, batch }))
    }

    async fn ending(&self, now: DateTime<Utc>) -> Result<Vec<Batch>, RepoError> {
        // Cancelled batches' waiting jobs (also those a process that died left behind).
        let cancelling: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT id, pending FROM batches WHERE state = 'cancelled' AND ended_at IS NULL \
             AND (pending > 0 OR processing > 0) ORDER BY id",
        )
        .fetch_all(&self.db.pool)
        .await?;
        for (id, pending) in cancelling {
            if pending > 0 {
                self.cancel_waiting(id, now).await?;
            }
            // Running ones asked to stop, also where none waits (a few rows: the workers'
            // places at most, found through the processing jobs).
            sqlx::query(
                "UPDATE files SET cancel_requested_at = $2 WHERE id IN (SELECT id FROM files \
                 WHERE status = 'processing' AND batch_id = $1 AND cancel_requested_at IS NULL \
                 FOR UPDATE SKIP LOCKED)",
            )
            .bind(id)
            .bind(now)
            .execute(&self.db.pool)
            .await?;
        }
        sqlx::query(
            "UPDATE batches SET state = 'completed', paused = FALSE, updated_at = $1 \
             WHERE state = 'running' AND ended_at IS NULL AND pending = 0 AND processing = 0",
        )
        .bind(now)
        .execute(&self.db.pool)
        .await?;
        let rows = sqlx::query(&format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE ended_at IS NULL \
             AND (state = 'completed' OR (state = 'cancelled' AND processing = 0 AND pending = 0)) ORDER BY id"
        ))
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter().map(batch_from_row).collect()
    }

    async fn close(
        &self,
        id: i64,
        report_error: Option<&str>,
        notice: Option<EndNotice>,
        now: DateTime<Utc>,
    ) -> Result<bool, RepoError> {
        let mut tx = self.db.pool.begin().await?;
        // Of two processes closing the batch at once, the second waits here for the first
        // to commit, then finds it ended and closes nothing.
        let row = sqlx::query(&format!(
            "UPDATE batches SET ended_at = $3, report_error = $2, \
             report_written_at = CASE WHEN $2::text IS NULL THEN $3 END, updated_at = $3 \
             WHERE id = $1 AND ended_at IS NULL RETURNING {BATCH_COLUMNS}"
        ))
        .bind(id)
        .bind(report_error)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(false) };
        if let Some(notice) = notice {
            let closed = batch_from_row(&row)?;
            sqlx::query(
                "INSERT INTO webhook_deliveries (batch_id, event, url, payload, next_attempt_at) \
                 VALUES ($1, $2, $3, $4, now()) ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .bind(end_event(&closed))
            .bind(notice.url)
            .bind((notice.render)(&closed))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn report_jobs(&self, id: i64, after_id: i64, limit: u32) -> Result<Vec<(i64, ReportRow)>, RepoError> {
        let rows = sqlx::query(&format!(
            "SELECT {REPORT_COLUMNS} FROM files WHERE batch_id = $1 AND id > $2 ORDER BY id LIMIT $3"
        ))
        .bind(id)
        .bind(after_id)
        .bind(i64::from(limit))
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter().map(report_row).collect()
    }

    async fn invalid_rows(&self, id: i64, after_row: u64, limit: u32) -> Result<Vec<InvalidRow>, RepoError> {
        let rows = sqlx::query(
            "SELECT row, file_url, reason FROM batch_invalid_rows WHERE batch_id = $1 AND row > $2 \
             ORDER BY row LIMIT $3",
        )
        .bind(id)
        .bind(to_db(after_row))
        .bind(i64::from(limit))
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(InvalidRow {
                    row: from_db(row.try_get("row")?),
                    file_url: row.try_get("file_url")?,
                    reason: row.try_get("reason")?,
                })
            })
            .collect()
    }
}
