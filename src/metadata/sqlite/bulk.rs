//! The SQLite [`BatchStore`]: batches beside the jobs, in the same database and the same
//! transactions as the jobs they count.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::FutureExt as _;
use sqlx::sqlite::SqliteRow;
use sqlx::{Connection as _, Row};

use super::batches::insert_on;
use super::repository::SqliteRepository;
use super::{from_millis, to_millis};
use crate::lifecycle::NewJob;
use crate::metadata::bulk::{EndNotice, REPORT_COLUMNS, end_event, held_owner, report_row};
use crate::metadata::group_commit::MAX_BATCH;
use crate::metadata::{
    Batch, BatchCounts, BatchCreated, BatchStore, InvalidRow, NewBatch, RepoError, ReportRow, Steer, Steered, from_db,
    millis, to_db,
};

/// Jobs of a cancelled batch cancelled in one write, at most.
const CANCEL_CHUNK: i64 = 5_000;

const BATCH_COLUMNS: &str = "id, owner_key, state, paused, request, rows_read, read_error, total, pending, \
    processing, completed, failed, cancelled, invalid, bytes_done, report_written_at, report_error, ended_at, \
    created_at, updated_at";

/// How far a held delivery's due time is pushed (and pulled back on resume): far enough
/// that an idle receiver never wakes for it.
const HOLD_MS: i64 = 1 << 50;

fn batch_from_row(row: &SqliteRow) -> Result<Batch, RepoError> {
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
        report_written: row.try_get::<Option<i64>, _>("report_written_at")?.is_some(),
        report_error: row.try_get("report_error")?,
        ended_at: row.try_get::<Option<i64>, _>("ended_at")?.map(from_millis),
        created_at: from_millis(row.try_get("created_at")?),
        updated_at: from_millis(row.try_get("updated_at")?),
    })
}

impl SqliteRepository {
    /// Cancel a cancelled batch's waiting jobs (`ending` asks its running ones to stop), as
    /// a single cancel does (a waiting job's queue row goes with it), a chunk of
    /// [`CANCEL_CHUNK`] per write in id order.
    async fn cancel_waiting(&self, id: i64, now: i64) -> Result<(), RepoError> {
        let mut after = 0i64;
        loop {
            let done: Vec<i64> = self
                .db
                .write(move |c| {
                    Box::pin(async move {
                        sqlx::query_scalar(
                            "UPDATE files SET status = 'cancelled', next_attempt_at = NULL, updated_at = ?2 \
                             WHERE id IN (SELECT id FROM files WHERE batch_id = ?1 AND id > ?3 \
                               AND status = 'pending' ORDER BY id LIMIT ?4) \
                             RETURNING id",
                        )
                        .bind(id)
                        .bind(now)
                        .bind(after)
                        .bind(CANCEL_CHUNK)
                        .fetch_all(c)
                        .await
                    })
                })
                .await?;
            let last = done.iter().max().copied();
            let done = done.len() as i64;
            match last {
                Some(last) if done == CANCEL_CHUNK => after = last,
                _ => return Ok(()),
            }
        }
    }

    async fn read_batch<'c>(c: impl sqlx::SqliteExecutor<'c>, id: i64) -> Result<Option<Batch>, RepoError> {
        let row = sqlx::query(&format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = ?1"))
            .bind(id)
            .fetch_optional(c)
            .await?;
        row.as_ref().map(batch_from_row).transpose()
    }
}

#[async_trait]
impl BatchStore for SqliteRepository {
    async fn create_batch(&self, batch: &NewBatch, now: DateTime<Utc>) -> Result<BatchCreated, RepoError> {
        let batch = batch.clone();
        let now = to_millis(now);
        self.db
            .write(move |c| {
                Box::pin(async move {
                    let mut tx = c.begin().await?;
                    if let Some((key, digest)) = &batch.idempotency {
                        let used: Option<(i64, Option<String>)> = sqlx::query_as(
                            "SELECT id, request_sha256 FROM batches \
                             WHERE COALESCE(owner_key, '') = COALESCE(?1, '') AND idempotency_key = ?2",
                        )
                        .bind(&batch.owner)
                        .bind(key)
                        .fetch_optional(&mut *tx)
                        .await?;
                        if let Some((id, used_digest)) = used {
                            if used_digest.as_deref() != Some(digest.as_str()) {
                                return Ok(BatchCreated::KeyReused);
                            }
                            let found = Self::read_batch(&mut *tx, id).await?;
                            return Ok(found.map_or(BatchCreated::KeyReused, |b| BatchCreated::Replayed(Box::new(b))));
                        }
                    }
                    let row = sqlx::query(&format!(
                        "INSERT INTO batches (owner_key, request, idempotency_key, request_sha256, created_at, \
                         updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?5) RETURNING {BATCH_COLUMNS}"
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
                })
            })
            .await
    }

    async fn batch(&self, id: i64) -> Result<Option<Batch>, RepoError> {
        Self::read_batch(&self.db.reads, id).await
    }

    async fn batches(&self, owner: Option<&str>, before: Option<i64>, limit: u32) -> Result<Vec<Batch>, RepoError> {
        let owner_filter = if owner.is_some() { "owner_key = ?1" } else { "?1 IS NULL" };
        let rows = sqlx::query(&format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE {owner_filter} AND id < ?2 ORDER BY id DESC LIMIT ?3"
        ))
        .bind(owner)
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.db.reads)
        .await?;
        rows.iter().map(batch_from_row).collect()
    }

    async fn take_reading(
        &self,
        reader: &str,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<Option<Batch>, RepoError> {
        let (reader, now, until) = (reader.to_owned(), to_millis(now), to_millis(now) + millis(lease));
        let row = self
            .db
            .write(move |c| {
                Box::pin(async move {
                    sqlx::query(&format!(
                        "UPDATE batches SET reader = ?1, reader_until = ?3 WHERE id = ( \
                         SELECT id FROM batches WHERE state = 'reading' AND ended_at IS NULL AND NOT paused \
                         AND (reader_until IS NULL OR reader_until <= ?2) ORDER BY id LIMIT 1) \
                         RETURNING {BATCH_COLUMNS}"
                    ))
                    .bind(reader)
                    .bind(now)
                    .bind(until)
                    .fetch_optional(c)
                    .await
                })
            })
            .await?;
        row.as_ref().map(batch_from_row).transpose()
    }

    async fn release_reading(&self, reader: &str) -> Result<u64, RepoError> {
        let reader = reader.to_owned();
        let done = self
            .db
            .write(move |c| {
                sqlx::query("UPDATE batches SET reader = NULL, reader_until = NULL WHERE reader = ?1")
                    .bind(reader)
                    .execute(c)
                    .boxed()
            })
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
        let (reader, jobs, invalid) = (reader.to_owned(), jobs.to_vec(), invalid.to_vec());
        let (at, until) = (now, to_millis(now) + millis(lease));
        let appended = self
            .db
            .write(move |c| {
                Box::pin(async move {
                    let mut tx = c.begin().await?;
                    let held = sqlx::query(
                        "UPDATE batches SET rows_read = ?3, reader_until = ?4, updated_at = ?5, \
                         total = total + ?6 + ?7, pending = pending + ?6, invalid = invalid + ?7 \
                         WHERE id = ?1 AND reader = ?2 AND state = 'reading'",
                    )
                    .bind(id)
                    .bind(&reader)
                    .bind(to_db(rows_read))
                    .bind(until)
                    .bind(to_millis(at))
                    .bind(to_db(jobs.len() as u64))
                    .bind(to_db(invalid.len() as u64))
                    .execute(&mut *tx)
                    .await?
                    .rows_affected()
                        == 1;
                    if !held {
                        return Ok(None);
                    }
                    let batch: Vec<_> = jobs.into_iter().map(|job| (job, at)).collect();
                    for chunk in batch.chunks(MAX_BATCH) {
                        insert_on(&mut tx, chunk).await?;
                    }
                    for row in &invalid {
                        sqlx::query(
                            "INSERT OR IGNORE INTO batch_invalid_rows (batch_id, row, file_url, reason) \
                             VALUES (?1, ?2, ?3, ?4)",
                        )
                        .bind(id)
                        .bind(to_db(row.row))
                        .bind(&row.file_url)
                        .bind(&row.reason)
                        .execute(&mut *tx)
                        .await?;
                    }
                    let now = Self::read_batch(&mut *tx, id).await?;
                    tx.commit().await?;
                    Ok::<_, RepoError>(now)
                })
            })
            .await?;
        if appended.is_some() {
            self.db.queued.notify_waiters();
        }
        Ok(appended)
    }

    async fn finish_reading(
        &self,
        id: i64,
        reader: &str,
        error: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<bool, RepoError> {
        let (reader, error, now) = (reader.to_owned(), error.map(str::to_owned), to_millis(now));
        let done = self
            .db
            .write(move |c| {
                sqlx::query(
                    "UPDATE batches SET state = 'running', reader = NULL, reader_until = NULL, read_error = ?3, \
                     updated_at = ?4 WHERE id = ?1 AND reader = ?2 AND state = 'reading'",
                )
                .bind(id)
                .bind(reader)
                .bind(error)
                .bind(now)
                .execute(c)
                .boxed()
            })
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn steer(&self, id: i64, steer: Steer, now: DateTime<Utc>) -> Result<Option<Steered>, RepoError> {
        let now = to_millis(now);
        let held = held_owner(id);
        let steered = self
            .db
            .write(move |c| {
                Box::pin(async move {
                    let mut tx = c.begin().await?;
                    let condition = match steer {
                        Steer::Cancel => "state IN ('reading', 'running')",
                        Steer::Pause => "state IN ('reading', 'running') AND NOT paused",
                        Steer::Resume => "state IN ('reading', 'running') AND paused",
                    };
                    let set = match steer {
                        Steer::Cancel => "state = 'cancelled', paused = 0, reader = NULL, reader_until = NULL",
                        Steer::Pause => "paused = 1",
                        Steer::Resume => "paused = 0",
                    };
                    let changed = sqlx::query(&format!(
                        "UPDATE batches SET {set}, updated_at = ?2 WHERE id = ?1 AND {condition}"
                    ))
                    .bind(id)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected()
                        == 1;
                    if changed {
                        match steer {
                            Steer::Cancel => {
                                // Its jobs are cancelled by the batch runner (`ending`), a
                                // chunk per write, so a large batch does not hold the one
                                // writer for seconds; from now on no claim takes a waiting one.
                            }
                            Steer::Pause => {
                                // Filed under an owner that never gets a turn, and not due:
                                // receivers neither take nor wake for them.
                                sqlx::query(
                                    "UPDATE queue SET owner = ?2, due_at = due_at + ?4 \
                                     WHERE (locked_until IS NULL OR locked_until <= ?3) \
                                     AND job_id IN (SELECT id FROM files WHERE batch_id = ?1 AND status = 'pending')",
                                )
                                .bind(id)
                                .bind(&held)
                                .bind(now)
                                .bind(HOLD_MS)
                                .execute(&mut *tx)
                                .await?;
                            }
                            Steer::Resume => {
                                sqlx::query(
                                    "UPDATE queue SET due_at = due_at - ?2, \
                                     owner = COALESCE((SELECT owner_key FROM files f WHERE f.id = queue.job_id), '') \
                                     WHERE owner = ?1",
                                )
                                .bind(&held)
                                .bind(HOLD_MS)
                                .execute(&mut *tx)
                                .await?;
                            }
                        }
                    }
                    let batch = Self::read_batch(&mut *tx, id).await?;
                    tx.commit().await?;
                    Ok::<_, RepoError>(batch.map(|batch| Steered { changed, batch }))
                })
            })
            .await?;
        if matches!(&steered, Some(s) if s.changed) && steer == Steer::Resume {
            self.db.queued.notify_waiters();
        }
        Ok(steered)
    }

    async fn ending(&self, now: DateTime<Utc>) -> Result<Vec<Batch>, RepoError> {
        let now = to_millis(now);
        let cancelling: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT id, pending FROM batches WHERE state = 'cancelled' AND ended_at IS NULL \
             AND (pending > 0 OR processing > 0) ORDER BY id",
        )
        .fetch_all(&self.db.reads)
        .await?;
        for (id, pending) in cancelling {
            if pending > 0 {
                self.cancel_waiting(id, now).await?;
            }
            // Running ones asked to stop, also where none waits.
            self.db
                .write(move |c| {
                    Box::pin(async move {
                        sqlx::query(
                            "UPDATE files SET cancel_requested_at = ?2 WHERE status = 'processing' \
                             AND batch_id = ?1 AND cancel_requested_at IS NULL",
                        )
                        .bind(id)
                        .bind(now)
                        .execute(c)
                        .await
                    })
                })
                .await?;
        }
        let rows = self
            .db
            .write(move |c| {
                Box::pin(async move {
                    let mut tx = c.begin().await?;
                    sqlx::query(
                        "UPDATE batches SET state = 'completed', paused = 0, updated_at = ?1 \
                         WHERE state = 'running' AND ended_at IS NULL AND pending = 0 AND processing = 0",
                    )
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                    let rows = sqlx::query(&format!(
                        "SELECT {BATCH_COLUMNS} FROM batches WHERE ended_at IS NULL \
                         AND (state = 'completed' OR (state = 'cancelled' AND processing = 0 AND pending = 0)) \
                         ORDER BY id"
                    ))
                    .fetch_all(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    Ok::<_, sqlx::Error>(rows)
                })
            })
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
        let (error, now) = (report_error.map(str::to_owned), to_millis(now));
        self.db
            .write(move |c| {
                Box::pin(async move {
                    let mut tx = c.begin().await?;
                    let row = sqlx::query(&format!(
                        "UPDATE batches SET ended_at = ?3, report_error = ?2, \
                         report_written_at = CASE WHEN ?2 IS NULL THEN ?3 END, updated_at = ?3 \
                         WHERE id = ?1 AND ended_at IS NULL RETURNING {BATCH_COLUMNS}"
                    ))
                    .bind(id)
                    .bind(error)
                    .bind(now)
                    .fetch_optional(&mut *tx)
                    .await?;
                    // Closed by another call already: so was its delivery enqueued.
                    let Some(row) = row else { return Ok(false) };
                    if let Some(notice) = notice {
                        let closed = batch_from_row(&row)?;
                        sqlx::query(
                            "INSERT INTO webhook_deliveries (batch_id, event, url, payload, next_attempt_at, created_at) \
                             VALUES (?1, ?2, ?3, ?4, ?5, ?5) ON CONFLICT DO NOTHING",
                        )
                        .bind(id)
                        .bind(end_event(&closed))
                        .bind(notice.url)
                        .bind((notice.render)(&closed))
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                    }
                    tx.commit().await?;
                    Ok::<_, RepoError>(true)
                })
            })
            .await
    }

    async fn report_jobs(&self, id: i64, after_id: i64, limit: u32) -> Result<Vec<(i64, ReportRow)>, RepoError> {
        let rows = sqlx::query(&format!(
            "SELECT {REPORT_COLUMNS} FROM files WHERE batch_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3"
        ))
        .bind(id)
        .bind(after_id)
        .bind(i64::from(limit))
        .fetch_all(&self.db.reads)
        .await?;
        rows.iter().map(report_row).collect()
    }

    async fn invalid_rows(&self, id: i64, after_row: u64, limit: u32) -> Result<Vec<InvalidRow>, RepoError> {
        let rows = sqlx::query(
            "SELECT row, file_url, reason FROM batch_invalid_rows WHERE batch_id = ?1 AND row > ?2 \
             ORDER BY row LIMIT ?3",
        )
        .bind(id)
        .bind(to_db(after_row))
        .bind(i64::from(limit))
        .fetch_all(&self.db.reads)
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
