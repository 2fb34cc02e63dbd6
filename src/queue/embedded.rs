//! The embedded queue: rows in the `queue` table of the SQLite database.
//!
//! A receive locks a due row for a while (the lock is the delivery); a worker that dies
//! leaves its lock to lapse, and the row is delivered again.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::FutureExt as _;
use sqlx::{Connection as _, Row};

use super::{Delivery, Queue, QueueError};
use crate::lifecycle::{Candidate, JobId, take_turns};
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

    /// Hand back at once the jobs and deliveries held by consumers that are gone (a
    /// process of this database that was killed), instead of waiting out their leases.
    /// A consumer is gone when nobody holds the lock on its file in `owners`
    /// ([`ConsumerLock`]); returns how many jobs were handed back.
    pub async fn recover_dead_consumers(&self, owners: &Path) -> Result<u64, QueueError> {
        let holders: Vec<String> = sqlx::query_scalar(
            "SELECT lease_owner FROM files WHERE status = 'processing' AND lease_owner IS NOT NULL \
             UNION SELECT locked_by FROM queue WHERE locked_by IS NOT NULL",
        )
        .fetch_all(&self.db.reads)
        .await?;
        let mut dead: Vec<String> = holders
            .iter()
            .filter_map(|owner| owner.split_once(':').map(|(consumer, _)| consumer.to_owned()))
            .filter(|consumer| *consumer != self.consumer && !ConsumerLock::is_held(owners, consumer))
            .collect();
        dead.sort_unstable();
        dead.dedup();
        let mut recovered = 0;
        for consumer in dead {
            let prefix = format!("{consumer}:");
            let now = to_millis(Utc::now());
            let jobs = self
                .db
                .write(move |c| {
                    Box::pin(async move {
                        let mut tx = c.begin().await?;
                        let jobs = sqlx::query(
                            "UPDATE files SET status = 'pending', lease_owner = NULL, lease_expires_at = NULL, \
                             updated_at = ?2 WHERE status = 'processing' AND substr(lease_owner, 1, length(?1)) = ?1",
                        )
                        .bind(&prefix)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                        sqlx::query(
                            "UPDATE queue SET locked_by = NULL, locked_until = NULL \
                             WHERE substr(locked_by, 1, length(?1)) = ?1",
                        )
                        .bind(&prefix)
                        .execute(&mut *tx)
                        .await?;
                        tx.commit().await?;
                        Ok::<_, sqlx::Error>(jobs)
                    })
                })
                .await?;
            tracing::info!(consumer, jobs, "handed back the jobs of a process that is gone");
            ConsumerLock::forget(owners, &consumer);
            recovered += jobs;
        }
        if recovered > 0 {
            self.db.queued.notify_waiters();
        }
        Ok(recovered)
    }

    fn lock_until(&self, now: DateTime<Utc>) -> i64 {
        to_millis(now) + i64::try_from(self.lock_for.as_millis()).unwrap_or(i64::MAX / 2)
    }

    /// Lock up to `max` due rows, taken in turns across their owners ([`take_turns`]);
    /// each delivery gets its own lock token. One transaction on the writer: the owners'
    /// next jobs (an index probe each, `queue_turn_idx`), the choice, the locks and the
    /// owners' new passes.
    async fn try_receive(&self, now: DateTime<Utc>, max: usize) -> Result<Vec<Delivery>, QueueError> {
        let prefix = format!("{}:{:016x}:", self.consumer, rand::random::<u64>());
        let (until, now, max) = (self.lock_until(now), to_millis(now), max.max(1));
        let deliveries = self
            .db
            .write(move |c| {
                Box::pin(async move {
                    let mut tx = c.begin().await?;
                    let clock: f64 = sqlx::query_scalar("SELECT now FROM queue_clock WHERE id = 1")
                        .fetch_optional(&mut *tx)
                        .await?
                        .unwrap_or(0.0);
                    let rows = sqlx::query(
                        "SELECT t.owner, t.pass, COALESCE(k.weight, 1) AS weight, q.job_id, q.priority, q.due_at \
                         FROM queue_turns t LEFT JOIN api_keys k ON k.id = t.owner \
                         JOIN queue q ON q.job_id IN ( \
                             SELECT job_id FROM queue WHERE owner = t.owner AND due_at <= ?1 \
                             AND (locked_until IS NULL OR locked_until <= ?1) \
                             ORDER BY priority DESC, due_at, job_id LIMIT ?2)",
                    )
                    .bind(now)
                    .bind(i64::try_from(max).unwrap_or(i64::MAX))
                    .fetch_all(&mut *tx)
                    .await?;
                    let mut candidates = rows
                        .iter()
                        .map(|row| {
                            Ok((
                                (row.try_get::<String, _>("owner")?, -row.try_get::<i64, _>("priority")?),
                                (row.try_get::<i64, _>("due_at")?, row.try_get::<i64, _>("job_id")?),
                                Candidate {
                                    owner: row.try_get("owner")?,
                                    weight: u32::try_from(row.try_get::<i64, _>("weight")?).unwrap_or(1),
                                    pass: row.try_get("pass")?,
                                    job: row.try_get::<i64, _>("job_id")?,
                                },
                            ))
                        })
                        .collect::<Result<Vec<_>, sqlx::Error>>()?;
                    // Each owner's candidates in its own order: priority, then age.
                    candidates.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
                    let turns = take_turns(clock, candidates.into_iter().map(|(.., c)| c).collect(), max);
                    if turns.taken.is_empty() {
                        return Ok(Vec::new());
                    }
                    let ids = turns.taken.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
                    let locked = sqlx::query(&format!(
                        "UPDATE queue SET locked_by = ?1 || job_id, locked_until = ?2 WHERE job_id IN ({ids}) \
                         RETURNING job_id, attempt, locked_by"
                    ))
                    .bind(&prefix)
                    .bind(until)
                    .fetch_all(&mut *tx)
                    .await?;
                    for (owner, pass) in &turns.passes {
                        sqlx::query("UPDATE queue_turns SET pass = ?2 WHERE owner = ?1")
                            .bind(owner)
                            .bind(pass)
                            .execute(&mut *tx)
                            .await?;
                    }
                    sqlx::query("UPDATE queue_clock SET now = ?1 WHERE id = 1")
                        .bind(turns.clock)
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    // Hand them out in the order of the turns.
                    let mut deliveries = locked
                        .iter()
                        .map(|row| {
                            let attempt: i64 = row.try_get("attempt")?;
                            Ok(Delivery {
                                job_id: JobId(row.try_get("job_id")?),
                                attempt: u32::try_from(attempt).unwrap_or(1),
                                token: row.try_get("locked_by")?,
                                traceparent: None,
                            })
                        })
                        .collect::<Result<Vec<_>, sqlx::Error>>()?;
                    deliveries.sort_by_key(|d| turns.taken.iter().position(|&id| id == d.job_id.0));
                    Ok::<_, sqlx::Error>(deliveries)
                })
            })
            .await?;
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

/// Marks a consumer (a worker process of the embedded stack) as alive for as long as the
/// process runs: an exclusive lock on `<owners>/<consumer>.lock`, which the operating
/// system drops when the process ends, however it ends.
pub struct ConsumerLock {
    _file: std::fs::File,
}

impl ConsumerLock {
    /// Take the lock for `consumer`.
    pub fn take(owners: &Path, consumer: &str) -> std::io::Result<Self> {
        crate::files::create_dir(owners, crate::files::FileMode::PRIVATE)?;
        let path = owners.join(format!("{consumer}.lock"));
        let file = std::fs::File::create(&path)?;
        crate::files::make_private(&path)?;
        file.try_lock().map_err(std::io::Error::other)?;
        Ok(Self { _file: file })
    }

    /// Whether a live process holds `consumer`'s lock.
    fn is_held(owners: &Path, consumer: &str) -> bool {
        let Ok(file) = std::fs::File::open(owners.join(format!("{consumer}.lock"))) else { return false };
        match file.try_lock() {
            Ok(()) => false,
            Err(std::fs::TryLockError::WouldBlock) => true,
            // Cannot tell: treat it as alive, its leases will lapse.
            Err(std::fs::TryLockError::Error(_)) => true,
        }
    }

    fn forget(owners: &Path, consumer: &str) {
        let _ = std::fs::remove_file(owners.join(format!("{consumer}.lock")));
    }
}

#[async_trait]
impl Queue for EmbeddedQueue {
    async fn depth(&self) -> Option<u64> {
        let depth: Result<i64, _> = sqlx::query_scalar("SELECT count(*) FROM queue").fetch_one(&self.db.reads).await;
        depth.ok().and_then(|d| u64::try_from(d).ok())
    }

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
        // Rare: a job's final outcome already removes its row (see `finished`);
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

    async fn finished(&self, _delivery: &Delivery, _failure: Option<&str>) -> Result<(), QueueError> {
        // Nothing left to do: this queue's trigger files_final_outcome_dequeues deleted the
        // row in the write that recorded the outcome (one write less per job).
        Ok(())
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

    async fn defer(&self, delivery: &Delivery, until: DateTime<Utc>) -> Result<(), QueueError> {
        self.retry(delivery, delivery.attempt, until).await
    }

    async fn abandon(&self, delivery: &Delivery) {
        // Unlock the row so the job's record decides at once; if even that fails, the lock
        // lapses after the lease length.
        if let Err(e) = self.release(delivery).await {
            tracing::warn!(job_id = %delivery.job_id, error = %e, "cannot unlock a delivery; its lock will lapse");
        }
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
