//! The outbox relay: publishes the job messages that PostgreSQL transactions wrote to the
//! `outbox` table, and deletes them once the broker has acknowledged them. A crash between
//! a commit and its publish only delays the message; a crash after the publish and before
//! the delete repeats it, which claiming makes harmless.

use std::time::Duration;

use sqlx::Row;
use tokio_util::sync::CancellationToken;

use crate::lifecycle::{Candidate, take_turns};
use crate::metadata::PgDb;
use crate::queue::QueueError;
use crate::queue::kafka::{JobMessage, KafkaPublisher, KafkaSettings, ensure_topics};

/// Most messages published per transaction.
const BATCH: usize = 200;
/// How often the relay makes sure the topics exist.
const TOPIC_CHECK: Duration = Duration::from_secs(5);
/// How often a relay held back by the workers' backlog looks at it again.
const BACKLOG_POLL: Duration = Duration::from_millis(100);
/// How often an idle relay looks for rows written by other processes.
const IDLE_POLL: Duration = Duration::from_millis(200);
/// Longest one batch may take (the database, then every publish, each bounded by the
/// publisher's own timeout): past it the batch is abandoned, its rows unlocked and retried.
const BATCH_TIMEOUT: Duration = Duration::from_secs(90);

pub struct OutboxRelay {
    db: PgDb,
    publisher: KafkaPublisher,
    kafka: KafkaSettings,
    /// Most jobs left unconsumed on the jobs topic; past it, jobs wait in the outbox.
    max_backlog: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("outbox database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("an outbox batch took longer than {0:?}; abandoned")]
    TimedOut(Duration),
}

impl OutboxRelay {
    /// A relay that keeps at most `max_backlog` jobs unconsumed on the jobs topic (`0`: no
    /// bound), so the order the relay chooses is the order workers see.
    pub fn new(db: PgDb, kafka: &KafkaSettings, max_backlog: u64) -> Result<Self, QueueError> {
        Ok(Self { db, publisher: KafkaPublisher::new(kafka)?, kafka: kafka.clone(), max_backlog })
    }

    /// Publish one batch of at most `limit`; returns how many messages went out. The
    /// waiting jobs are taken in turns across their keys (weighted), then by priority,
    /// then by age ([`take_turns`]); the clock row is locked for the choice, so relays of
    /// several API processes take turns with each other too, and rows are locked with SKIP
    /// LOCKED, so they never repeat each other.
    pub async fn run_once(&self, limit: usize) -> Result<usize, RelayError> {
        let limit = limit.clamp(1, BATCH);
        let mut tx = self.db.pool.begin().await?;
        let clock: f64 = sqlx::query_scalar("SELECT now FROM outbox_clock WHERE id = 1 FOR UPDATE")
            .fetch_optional(&mut *tx)
            .await?
            .unwrap_or(0.0);
        let rows = sqlx::query(
            "SELECT t.owner, t.pass, COALESCE(k.weight, 1) AS weight, o.id, o.attempt, \
                    f.id AS job_id, f.file_url, f.bucket_name, f.object_name, f.traceparent \
             FROM outbox_turns t LEFT JOIN api_keys k ON k.id = t.owner \
             CROSS JOIN LATERAL (SELECT id, attempt, job_id, priority FROM outbox WHERE owner = t.owner \
                                 ORDER BY priority DESC, id LIMIT $1 FOR UPDATE SKIP LOCKED) o \
             JOIN files f ON f.id = o.job_id \
             ORDER BY t.owner, o.priority DESC, o.id",
        )
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut candidates = Vec::with_capacity(rows.len());
        for (at, row) in rows.iter().enumerate() {
            candidates.push(Candidate {
                owner: row.try_get("owner")?,
                weight: u32::try_from(row.try_get::<i32, _>("weight")?).unwrap_or(1),
                pass: row.try_get("pass")?,
                job: at,
            });
        }
        let turns = take_turns(clock, candidates, limit);
        let mut ids = Vec::with_capacity(turns.taken.len());
        let mut messages = Vec::with_capacity(turns.taken.len());
        for &at in &turns.taken {
            let row = &rows[at];
            ids.push(row.try_get::<i64, _>("id")?);
            let message = JobMessage {
                id: row.try_get::<i64, _>("job_id")?.to_string(),
                file_url: row.try_get("file_url")?,
                bucket_name: row.try_get("bucket_name")?,
                object_name: row.try_get("object_name")?,
            };
            let attempt = u32::try_from(row.try_get::<i32, _>("attempt")?).unwrap_or(1);
            messages.push((message, attempt, row.try_get::<Option<String>, _>("traceparent")?));
        }
        // Handed to the producer in the order of the turns.
        futures::future::try_join_all(
            messages.iter().map(|(m, attempt, trace)| self.publisher.publish_job(m, *attempt, trace.as_deref())),
        )
        .await?;
        // The jobs were handed to the broker now: the reconciler measures from here.
        sqlx::query(
            "WITH sent AS (DELETE FROM outbox WHERE id = ANY($1) RETURNING job_id) \
             UPDATE files SET announced_at = now() WHERE id IN (SELECT job_id FROM sent)",
        )
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        let (owners, passes): (Vec<String>, Vec<f64>) = turns.passes.into_iter().unzip();
        sqlx::query(
            "UPDATE outbox_turns t SET pass = v.pass FROM unnest($1::text[], $2::float8[]) AS v (owner, pass) \
             WHERE t.owner = v.owner",
        )
        .bind(&owners)
        .bind(&passes)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE outbox_clock SET now = $1 WHERE id = 1").bind(turns.clock).execute(&mut *tx).await?;
        tx.commit().await?;
        tracing::debug!(published = ids.len(), "outbox relayed");
        Ok(ids.len())
    }

    /// How many more jobs the topic may take now: the bound less the jobs on it, counted
    /// in the database (`BATCH` when unbounded).
    ///
    /// "On the topic" is a job handed to the broker that no worker has started: announced,
    /// still pending, due, not back in the outbox, and not held by a paused batch. Jobs sent
    /// back because their host is busy count too: their message is on the retry topic. The database knows this exactly;
    /// the broker's consumer lag does not (Tansu can report committed offsets past a log's
    /// end, which reads as no lag, and lags of messages its fetches never return).
    async fn room(&self) -> usize {
        if self.max_backlog == 0 {
            return BATCH;
        }
        let bound = i64::try_from(self.max_backlog).unwrap_or(i64::MAX);
        // Counting stops at the bound, so a relay held back reads at most `bound` rows.
        let on_topic = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM (SELECT 1 FROM files f \
               WHERE f.status = 'pending' AND f.announced_at IS NOT NULL \
                 AND (f.next_attempt_at IS NULL OR f.next_attempt_at <= now()) \
                 AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = f.id) \
                 AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.id = f.batch_id AND b.paused) \
               LIMIT $1) AS t",
        )
        .bind(bound)
        .fetch_one(&self.db.pool)
        .await;
        match on_topic {
            Ok(n) => usize::try_from(bound.saturating_sub(n)).unwrap_or(BATCH).min(BATCH),
            Err(e) => {
                tracing::debug!(error = %e, "cannot count the jobs on the topic; relaying without the bound");
                BATCH
            }
        }
    }

    /// Relay until `stop`; failures are logged and retried, never fatal.
    pub async fn run(self, stop: CancellationToken) {
        // The API accepts jobs while Kafka is away; the outbox keeps them until it is back.
        while let Err(e) = ensure_topics(&self.kafka).await {
            tracing::warn!(error = %e, "Kafka is not reachable yet; jobs wait in the outbox");
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        let mut topics_checked = tokio::time::Instant::now();
        // Failures in a row, so the relay says when it is publishing again.
        let mut failures = 0u32;
        loop {
            let woken = self.db.outboxed.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            // A broker that lost its state lost the topics too, and may take messages for
            // a topic that no longer exists without complaint: make sure they exist now
            // and then, not only after a failure.
            if topics_checked.elapsed() >= TOPIC_CHECK {
                topics_checked = tokio::time::Instant::now();
                if let Err(e) = ensure_topics(&self.kafka).await {
                    tracing::warn!(error = %e, "cannot check the Kafka topics");
                }
            }
            // While the workers are far behind, jobs wait here, in the order of the turns,
            // rather than in the topic ahead of every job that comes after them.
            let room = self.room().await;
            if room == 0 {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(BACKLOG_POLL) => continue,
                }
            }
            let batch = tokio::time::timeout(BATCH_TIMEOUT, self.run_once(room))
                .await
                .unwrap_or(Err(RelayError::TimedOut(BATCH_TIMEOUT)));
            if let (Ok(published), true) = (&batch, failures > 0) {
                tracing::info!(published, failures, "outbox relay publishing again");
                failures = 0;
            }
            let wait = match batch {
                Ok(n) if n == room => continue,
                Ok(_) => IDLE_POLL,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, failures, "outbox relay failed; will retry");
                    // A broker that lost its state lost the topics too: create them again.
                    if matches!(e, RelayError::Queue(_) | RelayError::TimedOut(_))
                        && let Err(e) = ensure_topics(&self.kafka).await
                    {
                        tracing::warn!(error = %e, "cannot create the Kafka topics");
                    }
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = &mut woken => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}
