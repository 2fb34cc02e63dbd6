//! The embedded queue: rows in the `queue` table of the SQLite database.
//!
//! A receive locks a due row for a while (the lock is the delivery); a worker that dies
//! leaves its lock to lapse, and the row is delivered again.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::FutureExt as _;
use sqlx::Row;

use super::{Delivery, Queue, QueueError};
use crate::lifecycle::JobId;
use crate::metadata::{SqliteDb, from_millis, to_millis};

/// How long an idle receiver sleeps before looking again when nothing is due and no
/// wake-up came (a job written by another process, say).
const IDLE_POLL: Duration = Duration::from_millis(500);

#[derive(Clone, Debug)]
pub struct EmbeddedQueue {
    db: SqliteDb,
    /// How long a delivery stays locked unless kept alive.
    lock_for: Duration,
    consumer: String,
}

impl EmbeddedQueue {
    pub fn new(db: SqliteDb, lock_for: Duration, consumer: impl Into<String>) -> Self {
        Self { db, lock_for, consumer: consumer.into() }
    }

    fn lock_until(&self, now: DateTime<Utc>) -> i64 {
        to_millis(now) + i64::try_from(self.lock_for.as_millis()).unwrap_or(i64::MAX / 2)
    }

    /// Lock up to `max` due rows in one statement; each delivery gets its own lock token.
    async fn try_receive(&self, now: DateTime<Utc>, max: usize) -> Result<Vec<Delivery>, QueueError> {
        let prefix = format!("{}:{:016x}:", self.consumer, rand::random::<u64>());
        let (until, now, max) = (self.lock_until(now), to_millis(now), i64::try_from(max.max(1)).unwrap_or(i64::MAX));
        let rows = self
            .db
            .write(move |c| {
                sqlx::query(
                    "UPDATE queue SET locked_by = ?1 || job_id, locked_until = ?2 \
                     WHERE job_id IN (SELECT job_id FROM queue \
                                      WHERE due_at <= ?3 AND (locked_until IS NULL OR locked_until <= ?3) \
                                      ORDER BY due_at, job_id LIMIT ?4) \
                     RETURNING job_id, attempt, locked_by",
                )
                .bind(prefix)
                .bind(until)
                .bind(now)
                .bind(max)
                .fetch_all(c)
                .boxed()
            })
            .await?;
        let mut deliveries = rows
            .iter()
            .map(|row| {
                let attempt: i64 = row.try_get("attempt")?;
                Ok(Delivery {
                    job_id: JobId(row.try_get("job_id")?),
                    attempt: u32::try_from(attempt).unwrap_or(1),
                    token: row.try_get("locked_by")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        // RETURNING promises no order; hand them out in the order of the jobs.
        deliveries.sort_by_key(|d| d.job_id.0);
        Ok(deliveries)
    }

    /// When the next row becomes deliverable (due, or its lock lapses), if any.
    async fn next_ready_at(&self) -> Result<Option<DateTime<Utc>>, QueueError> {
        let next: Option<i64> = sqlx::query_scalar("SELECT MIN(MAX(due_at, COALESCE(locked_until, 0))) FROM queue")
            .fetch_one(&self.db.reads)
            .await?;
        Ok(next.map(from_millis))
    }
}

#[async_trait]
impl Queue for EmbeddedQueue {
    async fn receive_many(&self, max: usize) -> Result<Vec<Delivery>, QueueError> {
        loop {
            // Register for wake-ups before looking, so a job queued in between is not missed.
            let woken = self.db.queued.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();

            let now = Utc::now();
            let deliveries = self.try_receive(now, max).await?;
            if !deliveries.is_empty() {
                return Ok(deliveries);
            }
            let wait = match self.next_ready_at().await? {
                Some(at) => (at - now).to_std().unwrap_or(Duration::ZERO).min(IDLE_POLL),
                None => IDLE_POLL,
            };
            tokio::select! {
                () = &mut woken => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), QueueError> {
        // Rare: a job's final outcome already removes its row (see final_outcome_dequeues);
        // this is for deliveries of finished or unknown jobs.
        let (job_id, token) = (delivery.job_id.0, delivery.token.clone());
        self.db
            .write(move |c| {
                sqlx::query("DELETE FROM queue WHERE job_id = ?1 AND locked_by = ?2")
                    .bind(job_id)
                    .bind(token)
                    .execute(c)
                    .boxed()
            })
            .await?;
        Ok(())
    }

    fn final_outcome_dequeues(&self) -> bool {
        // The trigger files_final_outcome_dequeues deletes the row with the outcome.
        true
    }

    async fn retry(&self, delivery: &Delivery, attempt: u32, due_at: DateTime<Utc>) -> Result<(), QueueError> {
        let (job_id, token) = (delivery.job_id.0, delivery.token.clone());
        self.db
            .write(move |c| {
                sqlx::query(
                    "UPDATE queue SET attempt = ?3, due_at = ?4, locked_by = NULL, locked_until = NULL \
                     WHERE job_id = ?1 AND locked_by = ?2",
                )
                .bind(job_id)
                .bind(token)
                .bind(i64::from(attempt))
                .bind(to_millis(due_at))
                .execute(c)
                .boxed()
            })
            .await?;
        self.db.queued.notify_waiters();
        Ok(())
    }

    async fn dead_letter(&self, delivery: &Delivery, _reason: &str) -> Result<(), QueueError> {
        // The job row records the reason; the embedded queue keeps no dead letters.
        self.ack(delivery).await
    }

    async fn release(&self, delivery: &Delivery) -> Result<(), QueueError> {
        let (job_id, token) = (delivery.job_id.0, delivery.token.clone());
        self.db
            .write(move |c| {
                sqlx::query(
                    "UPDATE queue SET locked_by = NULL, locked_until = NULL WHERE job_id = ?1 AND locked_by = ?2",
                )
                .bind(job_id)
                .bind(token)
                .execute(c)
                .boxed()
            })
            .await?;
        self.db.queued.notify_waiters();
        Ok(())
    }

    async fn keep_alive(&self, delivery: &Delivery) -> Result<(), QueueError> {
        let (job_id, token, until) = (delivery.job_id.0, delivery.token.clone(), self.lock_until(Utc::now()));
        self.db
            .write(move |c| {
                sqlx::query("UPDATE queue SET locked_until = ?3 WHERE job_id = ?1 AND locked_by = ?2")
                    .bind(job_id)
                    .bind(token)
                    .bind(until)
                    .execute(c)
                    .boxed()
            })
            .await?;
        Ok(())
    }
}
