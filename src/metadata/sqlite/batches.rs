//! Writes many jobs share (new jobs, claims, completions, each a statement for a batch),
//! and how a job's row is read.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};

use super::{SqliteDb, from_millis, to_millis};
use crate::domain::{BucketName, ObjectKey, SealedHeaders, SourceUrl};
use crate::lifecycle::{Grant, Job, JobId, JobStatus, NewJob, OriginVersion, StoredObject};
use crate::metadata::group_commit::all_or_each;
use crate::metadata::{Claim, ClaimState, Lease, RepoError, from_db, to_db};

pub(super) type NewJobAt = (NewJob, DateTime<Utc>);
/// What a worker records when a job completes: (job, lease owner, object, when).
pub(super) type Completion = (JobId, String, StoredObject, DateTime<Utc>);

/// Write new jobs, many to a statement, and wake idle receivers.
pub(super) async fn write_new_jobs(db: SqliteDb, batch: Vec<NewJobAt>) -> Vec<Result<Job, RepoError>> {
    let answers = all_or_each(&batch, |jobs| insert_jobs(&db, jobs)).await;
    if answers.iter().any(Result::is_ok) {
        db.queued.notify_waiters();
    }
    answers
}

/// Record completions, many to a statement.
pub(super) async fn record_completions(db: SqliteDb, batch: Vec<Completion>) -> Vec<Result<bool, RepoError>> {
    all_or_each(&batch, |completions| complete_jobs(&db, completions)).await
}

/// `count` numbered parameters from `?first`: `?1,?2,?3`.
pub(super) fn placeholders(first: usize, count: usize) -> String {
    (first..first + count).map(|n| format!("?{n}")).collect::<Vec<_>>().join(",")
}

/// `count` anonymous parameters, `?,?,?`: numbered in the order they appear. For long
/// statements of many rows: SQLite looks a numbered parameter's name up in a list of
/// them all, and sqlx asks for every name when it binds, so binding N numbered
/// parameters costs N² steps (3 % of the busy server's CPU, with 13 per completion).
fn anonymous(count: usize) -> String {
    vec!["?"; count].join(",")
}

/// Mark jobs completed where their lease is still held; answers whether each was.
pub(super) async fn complete_jobs(db: &SqliteDb, batch: &[Completion]) -> Result<Vec<bool>, RepoError> {
    let mut sql = String::from(
        "UPDATE files SET status = 'completed', etag = v.column3, size = v.column4, sha256 = v.column5, \
         md5 = v.column6, content_type = v.column7, object_version = v.column9, last_error = NULL, \
         origin_etag = v.column10, origin_last_modified = v.column11, not_modified = v.column12, \
         crc64nvme = v.column13, \
         bytes_done = v.column4, bytes_total = v.column4, \
         lease_owner = NULL, lease_expires_at = NULL, next_attempt_at = NULL, updated_at = v.column8 FROM (VALUES ",
    );
    for i in 0..batch.len() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(sql, "{sep}({})", anonymous(13));
    }
    sql.push_str(
        ") AS v WHERE files.id = v.column1 AND files.status = 'processing' AND files.lease_owner = v.column2 \
         RETURNING id",
    );
    let owned = batch.to_vec();
    let completed = db
        .write(move |c| {
            Box::pin(async move {
                let mut query = sqlx::query_scalar::<_, i64>(&sql);
                for (id, owner, stored, now) in &owned {
                    query = query
                        .bind(id.0)
                        .bind(owner)
                        .bind(&stored.etag)
                        .bind(to_db(stored.size))
                        .bind(&stored.sha256)
                        .bind(&stored.md5)
                        .bind(&stored.content_type)
                        .bind(to_millis(*now))
                        .bind(&stored.version)
                        .bind(&stored.origin.etag)
                        .bind(&stored.origin.last_modified)
                        .bind(stored.not_modified)
                        .bind(&stored.crc64nvme);
                }
                query.fetch_all(c).await
            })
        })
        .await?;
    Ok(batch.iter().map(|(id, ..)| completed.contains(&id.0)).collect())
}

/// Claim jobs in one statement (one thread hand-off however many); a job asked for twice
/// goes to one of its leases. Expiry and due times are judged by the clock of the machine
/// the database lives on, read when the statement runs. Jobs not claimed are looked up to
/// say why.
pub(super) async fn claim_jobs(db: &SqliteDb, batch: &[(JobId, Lease)]) -> Result<Vec<Claim>, RepoError> {
    let mut sql = String::from(
        "UPDATE files SET status = 'processing', lease_owner = v.column2, lease_expires_at = ?1 + v.column3, \
         next_attempt_at = NULL, updated_at = ?1 FROM (VALUES ",
    );
    for i in 0..batch.len() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(sql, "{sep}({})", placeholders(3 * i + 2, 3));
    }
    let ids: Vec<String> = (0..batch.len()).map(|i| format!("?{}", 3 * i + 2)).collect();
    // One job at a time writes an object: none while another job for it is processing,
    // and of the batch's due jobs for one object only the oldest. Two conditions, not one
    // with an OR: the first reads files_one_writer_per_key_idx (its `status = 'processing'`
    // matches the partial index), the second only the batch's rows; as one condition
    // neither could use an index, and every claim read the whole table.
    let _ = write!(
        sql,
        ") AS v WHERE files.id = v.column1 \
         AND ((files.status = 'pending' AND (files.next_attempt_at IS NULL OR files.next_attempt_at <= ?1)) \
              OR (files.status = 'processing' AND files.lease_expires_at <= ?1)) \
         AND NOT EXISTS (SELECT 1 FROM files o \
             WHERE o.bucket_name = files.bucket_name AND o.object_name = files.object_name \
               AND o.status = 'processing' AND o.id <> files.id) \
         AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.id = files.batch_id \
             AND (b.paused OR (b.state = 'cancelled' AND b.ended_at IS NULL AND files.status = 'pending'))) \
         AND NOT EXISTS (SELECT 1 FROM files o \
             WHERE o.id IN ({}) AND o.id < files.id AND o.status = 'pending' \
               AND o.bucket_name = files.bucket_name AND o.object_name = files.object_name \
               AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= ?1)) \
         RETURNING {COLUMNS}, lease_owner",
        ids.join(",")
    );
    let owned = batch.to_vec();
    let (now, mut claimed) = db
        .write(move |c| {
            Box::pin(async move {
                let now = Utc::now();
                let mut query = sqlx::query(&sql).bind(to_millis(now));
                for (id, lease) in &owned {
                    query = query.bind(id.0).bind(&lease.owner).bind(lease.millis());
                }
                let mut claimed = Vec::new();
                for row in query.fetch_all(c).await? {
                    let owner: String = row.try_get("lease_owner")?;
                    claimed.push((owner, job_from_row(&row)?));
                }
                Ok::<_, RepoError>((now, claimed))
            })
        })
        .await?;

    let mut claims = Vec::with_capacity(batch.len());
    for (id, lease) in batch {
        let won = claimed.iter().position(|(owner, job)| job.id == *id && *owner == lease.owner);
        let claim = match won {
            Some(at) => Claim::Claimed(Box::new(claimed.swap_remove(at).1)),
            None => Claim::refused(claim_state(db, *id).await?, now),
        };
        claims.push(claim);
    }
    Ok(claims)
}

/// What explains a refused claim of the job, as it is now (`None`: no such job).
pub(super) async fn claim_state(db: &SqliteDb, id: JobId) -> Result<Option<ClaimState>, RepoError> {
    let row = sqlx::query(
        "SELECT status, lease_expires_at, next_attempt_at, \
         EXISTS (SELECT 1 FROM batches b WHERE b.id = files.batch_id \
             AND (b.paused OR (b.state = 'cancelled' AND b.ended_at IS NULL AND files.status = 'pending'))) AS paused \
         FROM files WHERE id = ?1",
    )
    .bind(id.0)
    .fetch_optional(&db.reads)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let status: String = row.try_get("status")?;
    Ok(Some(ClaimState {
        status: status.parse::<JobStatus>().map_err(|reason| RepoError::Corrupt { id: id.0, reason })?,
        lease_expires_at: row.try_get::<Option<i64>, _>("lease_expires_at")?.map(from_millis),
        next_attempt_at: row.try_get::<Option<i64>, _>("next_attempt_at")?.map(from_millis),
        paused: row.try_get("paused")?,
    }))
}

/// Insert `batch` (at least one job) in one statement, which also queues each job (the
/// trigger files_new_job_enqueues); returns the jobs in the order given.
pub(super) async fn insert_jobs(db: &SqliteDb, batch: &[NewJobAt]) -> Result<Vec<Job>, RepoError> {
    let owned = batch.to_vec();
    db.write(move |c| Box::pin(async move { insert_on(c, &owned).await })).await
}

/// [`insert_jobs`] on a connection the caller holds (inside its transaction).
pub(super) async fn insert_on(c: &mut SqliteConnection, batch: &[NewJobAt]) -> Result<Vec<Job>, RepoError> {
    let mut sql = String::from(
        "INSERT INTO files (file_url, bucket_name, object_name, expected_sha256, expected_md5, \
         request_headers, owner_key, max_file_size, may_create_bucket, expected_size, if_exists, notify_url, \
         traceparent, priority, batch_id, batch_row, created_at, updated_at, status, retry_count) VALUES ",
    );
    for i in 0..batch.len() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(sql, "{sep}({},'pending',0)", anonymous(18));
    }
    let _ = write!(sql, " RETURNING {COLUMNS}");
    let mut query = sqlx::query(&sql);
    for (job, now) in batch {
        query = query
            .bind(job.source.as_str())
            .bind(job.bucket.as_str())
            .bind(job.key.as_str())
            .bind(job.expected_sha256.as_ref().map(|s| s.as_str()))
            .bind(job.expected_md5.as_ref().map(|s| s.as_str()))
            .bind(job.headers.as_ref().map(SealedHeaders::as_str))
            .bind(job.grant.owner.as_deref())
            .bind(job.grant.max_file_size.map(to_db))
            .bind(job.grant.may_create_bucket)
            .bind(job.expected_size.map(to_db))
            .bind(job.if_exists.as_str())
            .bind(job.notify_url.as_ref().map(SourceUrl::as_str))
            .bind(job.traceparent.as_deref())
            .bind(i64::from(job.priority))
            .bind(job.batch.map(|b| b.batch))
            .bind(job.batch.map(|b| to_db(b.row)))
            .bind(to_millis(*now))
            .bind(to_millis(*now));
    }
    let rows = query.fetch_all(c).await?;
    let mut jobs = rows.iter().map(job_from_row).collect::<Result<Vec<_>, _>>()?;
    // RETURNING gives no order, but ids are handed out in VALUES order.
    jobs.sort_unstable_by_key(|job| job.id.0);
    Ok(jobs)
}

pub(super) const COLUMNS: &str = "id, file_url, bucket_name, object_name, status, retry_count, last_error, \
    etag, size, sha256, md5, content_type, expected_sha256, expected_md5, request_headers, \
    created_at, updated_at, next_attempt_at, owner_key, max_file_size, may_create_bucket, object_version, \
    cancel_requested_at, expected_size, if_exists, notify_url, bytes_done, bytes_total, traceparent, priority, \
    origin_etag, origin_last_modified, not_modified, crc64nvme";

pub(super) fn job_from_row(row: &SqliteRow) -> Result<Job, RepoError> {
    let id: i64 = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    let status = status.parse::<JobStatus>().map_err(|reason| RepoError::Corrupt { id, reason })?;
    let corrupt = |reason: &str| RepoError::Corrupt { id, reason: reason.to_owned() };
    let retry_count: i64 = row.try_get("retry_count")?;
    let size: Option<i64> = row.try_get("size")?;
    Ok(Job {
        id: JobId(id),
        file_url: crate::metadata::parsed(id, "file_url", row.try_get("file_url")?, SourceUrl::parse)?,
        bucket_name: crate::metadata::parsed(id, "bucket_name", row.try_get("bucket_name")?, BucketName::parse)?,
        object_name: crate::metadata::parsed(id, "object_name", row.try_get("object_name")?, ObjectKey::parse)?,
        status,
        retry_count: u32::try_from(retry_count).map_err(|_| corrupt("negative retry_count"))?,
        last_error: row.try_get("last_error")?,
        etag: row.try_get("etag")?,
        size: size.map(u64::try_from).transpose().map_err(|_| corrupt("negative size"))?,
        sha256: row.try_get("sha256")?,
        md5: row.try_get("md5")?,
        crc64nvme: row.try_get("crc64nvme")?,
        content_type: row.try_get("content_type")?,
        expected_sha256: row.try_get("expected_sha256")?,
        expected_md5: row.try_get("expected_md5")?,
        expected_size: row.try_get::<Option<i64>, _>("expected_size")?.map(from_db),
        notify_url: row.try_get("notify_url")?,
        bytes_done: row.try_get::<Option<i64>, _>("bytes_done")?.map(from_db),
        bytes_total: row.try_get::<Option<i64>, _>("bytes_total")?.map(from_db),
        traceparent: row.try_get("traceparent")?,
        priority: u32::try_from(row.try_get::<i64, _>("priority")?).map_err(|_| corrupt("priority out of range"))?,
        if_exists: row
            .try_get::<String, _>("if_exists")?
            .parse()
            .map_err(|reason| RepoError::Corrupt { id, reason })?,
        request_headers: row.try_get::<Option<String>, _>("request_headers")?.map(SealedHeaders::from_stored),
        grant: Grant {
            owner: row.try_get("owner_key")?,
            max_file_size: row.try_get::<Option<i64>, _>("max_file_size")?.map(from_db),
            may_create_bucket: row.try_get("may_create_bucket")?,
        },
        object_version: row.try_get("object_version")?,
        cancel_requested: row.try_get::<Option<i64>, _>("cancel_requested_at")?.is_some(),
        created_at: from_millis(row.try_get("created_at")?),
        updated_at: from_millis(row.try_get("updated_at")?),
        next_attempt_at: row.try_get::<Option<i64>, _>("next_attempt_at")?.map(from_millis),
        origin: OriginVersion {
            etag: row.try_get("origin_etag")?,
            last_modified: row.try_get("origin_last_modified")?,
        },
        not_modified: row.try_get("not_modified")?,
    })
}
