//! [`WebhookOutbox`] on both databases: `webhook_deliveries` and `webhook_attempts`.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;

use super::outbox::{Attempted, DueDelivery, PER_RECEIVER, Subject, WebhookOutbox, message_id};
use super::{PgDb, RepoError, SqliteDb, from_db, from_millis, millis, to_millis};
use crate::lifecycle::JobId;
use crate::wire::{AttemptView, DeliveryView};

fn due_from_row<R: Row>(row: &R) -> Result<DueDelivery, RepoError>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    let id: i64 = row.try_get("id")?;
    let job: Option<i64> = row.try_get("job_id")?;
    let batch: Option<i64> = row.try_get("batch_id")?;
    let subject = match (job, batch) {
        (Some(job), _) => Subject::Job(JobId(job)),
        (None, Some(batch)) => {
            Subject::Batch { id: batch, data: row.try_get::<Option<String>, _>("payload")?.unwrap_or_default() }
        }
        (None, None) => {
            return Err(RepoError::Corrupt { id, reason: "a webhook delivery for neither a job nor a batch".into() });
        }
    };
    Ok(DueDelivery {
        id,
        subject,
        event: row.try_get("event")?,
        url: row.try_get("url")?,
        attempts: u32::try_from(row.try_get::<i32, _>("attempts")?).unwrap_or(0),
    })
}

/// A delivery row (id, event, url, delivered_at, given_up_at, next_attempt_at) as the job's
/// view shows it, under its id; `time` reads a time as the database keeps it.
fn delivery_from_row<R: Row, T>(row: &R, time: impl Fn(T) -> DateTime<Utc>) -> Result<(i64, DeliveryView), RepoError>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<T>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    let id: i64 = row.try_get("id")?;
    let delivered_at = row.try_get::<Option<T>, _>("delivered_at")?.map(&time);
    let given_up_at = row.try_get::<Option<T>, _>("given_up_at")?.map(&time);
    let pending = delivered_at.is_none() && given_up_at.is_none();
    let next_attempt_at = row.try_get::<Option<T>, _>("next_attempt_at")?.map(&time).filter(|_| pending);
    let view = DeliveryView {
        id: message_id(id),
        event: row.try_get("event")?,
        url: row.try_get("url")?,
        delivered_at,
        given_up_at,
        next_attempt_at,
        attempts: Vec::new(),
    };
    Ok((id, view))
}

/// A try row (delivery_id, attempted_at, status, error), under its delivery's id.
fn attempt_from_row<R: Row, T>(row: &R, time: impl Fn(T) -> DateTime<Utc>) -> Result<(i64, AttemptView), RepoError>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<i32>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> T: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    let status: Option<i32> = row.try_get("status")?;
    Ok((
        row.try_get("delivery_id")?,
        AttemptView {
            at: time(row.try_get("attempted_at")?),
            status: status.and_then(|s| u16::try_from(s).ok()),
            error: row.try_get("error")?,
        },
    ))
}

/// The deliveries of a job with their tries, from the rows of both.
fn views(deliveries: Vec<(i64, DeliveryView)>, attempts: Vec<(i64, AttemptView)>) -> Vec<DeliveryView> {
    let mut deliveries = deliveries;
    for (delivery, attempt) in attempts {
        if let Some((_, view)) = deliveries.iter_mut().find(|(id, _)| *id == delivery) {
            view.attempts.push(attempt);
        }
    }
    deliveries.into_iter().map(|(_, view)| view).collect()
}

/// The columns a try's outcome sets: (delivered_at, given_up_at, next_attempt_at), each
/// written as the database keeps times.
fn outcome_columns<T>(
    outcome: Attempted,
    at: DateTime<Utc>,
    time: impl Fn(DateTime<Utc>) -> T,
) -> (Option<T>, Option<T>, Option<T>) {
    match outcome {
        Attempted::Delivered => (Some(time(at)), None, None),
        Attempted::GaveUp => (None, Some(time(at)), None),
        Attempted::RetryAt(when) => (None, None, Some(time(when))),
    }
}

const DELIVERIES_SQLITE: &str = "SELECT id, event, url, delivered_at, given_up_at, next_attempt_at \
    FROM webhook_deliveries WHERE job_id = ?1 ORDER BY id";
const ATTEMPTS_SQLITE: &str = "SELECT a.delivery_id, a.attempted_at, a.status, a.error FROM webhook_attempts a \
    JOIN webhook_deliveries d ON d.id = a.delivery_id WHERE d.job_id = ?1 ORDER BY a.attempted_at";
const DELIVERIES_PG: &str = "SELECT id, event, url, delivered_at, given_up_at, next_attempt_at \
    FROM webhook_deliveries WHERE job_id = $1 ORDER BY id";
const ATTEMPTS_PG: &str = "SELECT a.delivery_id, a.attempted_at, a.status, a.error FROM webhook_attempts a \
    JOIN webhook_deliveries d ON d.id = a.delivery_id WHERE d.job_id = $1 ORDER BY a.attempted_at";

/// Deliveries neither delivered nor given up (the partial due index covers them).
const UNSETTLED: &str = "SELECT count(*) FROM webhook_deliveries WHERE delivered_at IS NULL AND given_up_at IS NULL";

#[async_trait]
impl WebhookOutbox for SqliteDb {
    async fn claim_due(&self, limit: u32, hold: Duration) -> Result<Vec<DueDelivery>, RepoError> {
        let hold = millis(hold);
        let rows = self
            .write(move |c| {
                Box::pin(async move {
                    let now = to_millis(Utc::now());
                    sqlx::query(
                        "UPDATE webhook_deliveries SET claimed_until = ?1 + ?2 WHERE id IN \
                         (WITH due AS (SELECT id, substr(url, 1, instr(url, '://') + 1 + instr(substr(url, instr(url, '://') + 3), '/')) AS receiver, next_attempt_at, ROW_NUMBER() OVER \
                            (PARTITION BY substr(url, 1, instr(url, '://') + 1 + instr(substr(url, instr(url, '://') + 3), '/')) ORDER BY next_attempt_at, id) AS nth FROM webhook_deliveries \
                            WHERE delivered_at IS NULL AND given_up_at IS NULL AND next_attempt_at <= ?1 \
                            AND (claimed_until IS NULL OR claimed_until < ?1)), \
                          sending AS (SELECT substr(url, 1, instr(url, '://') + 1 + instr(substr(url, instr(url, '://') + 3), '/')) AS receiver, count(*) AS n FROM webhook_deliveries \
                            WHERE delivered_at IS NULL AND given_up_at IS NULL AND claimed_until >= ?1 GROUP BY 1) \
                          SELECT due.id FROM due LEFT JOIN sending ON sending.receiver = due.receiver \
                          WHERE due.nth + COALESCE(sending.n, 0) <= ?4 ORDER BY due.next_attempt_at LIMIT ?3) \
                         RETURNING id, job_id, batch_id, payload, event, url, attempts",
                    )
                    .bind(now)
                    .bind(hold)
                    .bind(i64::from(limit))
                    .bind(i64::from(PER_RECEIVER))
                    .fetch_all(c)
                    .await
                })
            })
            .await?;
        rows.iter().map(due_from_row).collect()
    }

    async fn record_attempt(
        &self,
        id: i64,
        at: DateTime<Utc>,
        status: Option<u16>,
        error: Option<&str>,
        outcome: Attempted,
    ) -> Result<(), RepoError> {
        let error = error.map(str::to_owned);
        let at_ms = to_millis(at);
        let (delivered, given_up, next) = outcome_columns(outcome, at, to_millis);
        self.write(move |c| {
            Box::pin(async move {
                use sqlx::Connection as _;
                let mut tx = c.begin().await?;
                sqlx::query(
                    "INSERT INTO webhook_attempts (delivery_id, attempted_at, status, error) VALUES (?1, ?2, ?3, ?4)",
                )
                .bind(id)
                .bind(at_ms)
                .bind(status.map(i32::from))
                .bind(error)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE webhook_deliveries SET attempts = attempts + 1, claimed_until = NULL, \
                     delivered_at = COALESCE(?2, delivered_at), given_up_at = COALESCE(?3, given_up_at), \
                     next_attempt_at = COALESCE(?4, next_attempt_at) WHERE id = ?1",
                )
                .bind(id)
                .bind(delivered)
                .bind(given_up)
                .bind(next)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok::<_, RepoError>(())
            })
        })
        .await
    }

    async fn depth(&self) -> Result<u64, RepoError> {
        let depth: i64 = sqlx::query_scalar(UNSETTLED).fetch_one(&self.reads).await?;
        Ok(from_db(depth))
    }

    async fn deliveries_of(&self, job: JobId) -> Result<Vec<DeliveryView>, RepoError> {
        let deliveries = sqlx::query(DELIVERIES_SQLITE).bind(job.0).fetch_all(&self.reads).await?;
        let attempts = sqlx::query(ATTEMPTS_SQLITE).bind(job.0).fetch_all(&self.reads).await?;
        Ok(views(
            deliveries.iter().map(|row| delivery_from_row(row, from_millis)).collect::<Result<_, _>>()?,
            attempts.iter().map(|row| attempt_from_row(row, from_millis)).collect::<Result<_, _>>()?,
        ))
    }
}

#[async_trait]
impl WebhookOutbox for PgDb {
    async fn claim_due(&self, limit: u32, hold: Duration) -> Result<Vec<DueDelivery>, RepoError> {
        // The UPDATE checks the claim again: of two dispatchers that picked the same row,
        // the second finds it claimed once the first commits, and leaves it.
        let rows = sqlx::query(
            "UPDATE webhook_deliveries SET claimed_until = now() + $1 * interval '1 millisecond' WHERE id IN \
             (WITH due AS (SELECT id, substring(url from '^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*') AS receiver, next_attempt_at, ROW_NUMBER() OVER \
                (PARTITION BY substring(url from '^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*') ORDER BY next_attempt_at, id) AS nth FROM webhook_deliveries \
                WHERE delivered_at IS NULL AND given_up_at IS NULL AND next_attempt_at <= now() \
                AND (claimed_until IS NULL OR claimed_until < now())), \
              sending AS (SELECT substring(url from '^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*') AS receiver, count(*) AS n FROM webhook_deliveries \
                WHERE delivered_at IS NULL AND given_up_at IS NULL AND claimed_until >= now() GROUP BY 1) \
              SELECT due.id FROM due LEFT JOIN sending ON sending.receiver = due.receiver \
              WHERE due.nth + COALESCE(sending.n, 0) <= $3 ORDER BY due.next_attempt_at LIMIT $2) \
             AND delivered_at IS NULL AND given_up_at IS NULL AND (claimed_until IS NULL OR claimed_until < now()) \
             RETURNING id, job_id, batch_id, payload, event, url, attempts",
        )
        .bind(millis(hold) as f64)
        .bind(i64::from(limit))
        .bind(i64::from(PER_RECEIVER))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(due_from_row).collect()
    }

    async fn record_attempt(
        &self,
        id: i64,
        at: DateTime<Utc>,
        status: Option<u16>,
        error: Option<&str>,
        outcome: Attempted,
    ) -> Result<(), RepoError> {
        let (delivered, given_up, next) = outcome_columns(outcome, at, |t| t);
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO webhook_attempts (delivery_id, attempted_at, status, error) VALUES ($1, $2, $3, $4)")
            .bind(id)
            .bind(at)
            .bind(status.map(i32::from))
            .bind(error)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE webhook_deliveries SET attempts = attempts + 1, claimed_until = NULL, \
             delivered_at = COALESCE($2, delivered_at), given_up_at = COALESCE($3, given_up_at), \
             next_attempt_at = COALESCE($4, next_attempt_at) WHERE id = $1",
        )
        .bind(id)
        .bind(delivered)
        .bind(given_up)
        .bind(next)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn depth(&self) -> Result<u64, RepoError> {
        let depth: i64 = sqlx::query_scalar(UNSETTLED).fetch_one(&self.pool).await?;
        Ok(from_db(depth))
    }

    async fn deliveries_of(&self, job: JobId) -> Result<Vec<DeliveryView>, RepoError> {
        let deliveries = sqlx::query(DELIVERIES_PG).bind(job.0).fetch_all(&self.pool).await?;
        let attempts = sqlx::query(ATTEMPTS_PG).bind(job.0).fetch_all(&self.pool).await?;
        let same = |t: DateTime<Utc>| t;
        Ok(views(
            deliveries.iter().map(|row| delivery_from_row(row, same)).collect::<Result<_, _>>()?,
            attempts.iter().map(|row| attempt_from_row(row, same)).collect::<Result<_, _>>()?,
        ))
    }
}
