//! SQLite metadata repository: the embedded default. The embedded queue lives in the
//! same database file (see `queue::embedded`).

use std::fmt::Write as _;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use futures::FutureExt as _;
use futures::future::BoxFuture;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{Connection as _, Row, SqliteConnection, SqlitePool};
use tokio::sync::{Notify, mpsc};

use super::cancel_answer;
use super::group_commit::{MAX_BATCH, Pending, all_or_each, group_commit, through};
use super::writer::Writer;
use super::{
    Cancel, Claim, ClaimState, Created, IDEMPOTENCY_WINDOW, IdempotencyKey, JobRepository, KeyUse, Lease, ListFilter,
    Reconciled, RepoError, Requeue, Sweep, from_db, millis, to_db,
};
use crate::domain::{BucketName, ObjectKey, SealedHeaders, SourceUrl};
use crate::lifecycle::{Grant, Job, JobId, JobStatus, NewJob, Settlement, StoredObject};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// What a commit of the embedded database survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// A power loss (`synchronous=FULL`): the default.
    #[value(name = "power-loss")]
    PowerLoss,
    /// A crash of the process, not of the machine (`synchronous=NORMAL`): faster.
    #[value(name = "process-crash")]
    ProcessCrash,
}

/// An open SQLite database, shared by the repository and the embedded queue.
///
/// SQLite takes one writer at a time. All of this process's writes go through one
/// connection ([`SqliteDb::write`]), so they queue in order instead of colliding on the
/// database lock and backing off in SQLite's busy handler (which sleeps up to 100 ms a try
/// and made the tail of accept latency). Reads run beside them on `reads`, as WAL allows.
#[derive(Clone, Debug)]
pub struct SqliteDb {
    pub reads: SqlitePool,
    writer: Writer,
    /// Woken whenever a queue row becomes deliverable, so idle workers start at once.
    pub queued: Arc<Notify>,
    /// The database file (`None` for an in-memory database).
    pub file: Option<std::path::PathBuf>,
    /// Held while any clone lives; the checkpoint task ends with the last.
    _alive: Arc<()>,
}

/// An unfinished job that should be moving and has no queue row (?1 now, ?2 the grace
/// period in milliseconds, ?3 whether overdue `pending` jobs count).
const STUCK: &str = "status IN ('pending', 'processing') AND updated_at < ?1 - ?2 \
     AND ((status = 'pending' AND ?3) OR (status = 'processing' AND lease_expires_at <= ?1)) \
     AND NOT EXISTS (SELECT 1 FROM queue q WHERE q.job_id = files.id)";

/// Most finished jobs one retention statement deletes.
const DELETE_CHUNK: u64 = 100;

/// How often the write-ahead log is copied into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// Copy the write-ahead log into the database file every [`CHECKPOINT_EVERY`] on a
/// connection of its own, until the database is closed. A passive checkpoint runs beside
/// the writer (SQLite lets one writer append to the log while it is copied), so commits
/// never wait for it; once the whole log is copied, the next write starts it over from
/// the beginning, which keeps the file small.
async fn checkpoint(mut connection: SqliteConnection, alive: std::sync::Weak<()>) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if alive.strong_count() == 0 {
            let _ = connection.close().await;
            return;
        }
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&mut connection).await {
            tracing::warn!(error = %e, "write-ahead log checkpoint failed; will try again");
        }
    }
}

impl SqliteDb {
    /// Open (creating if needed) the database at `url` (`sqlite://path`), every commit
    /// durable against power loss.
    pub async fn connect(url: &str) -> Result<Self, RepoError> {
        Self::connect_with(url, Durability::PowerLoss).await
    }

    /// [`connect`](Self::connect) with the durability chosen.
    pub async fn connect_with(url: &str, durability: Durability) -> Result<Self, RepoError> {
        let synchronous = match durability {
            // WAL + FULL syncs the log at every commit, so a job answered 202 survives a
            // power loss, not only a crash (group commit keeps that to one sync per group).
            Durability::PowerLoss => SqliteSynchronous::Full,
            // WAL + NORMAL syncs at checkpoints only: durable against a process crash; a
            // power loss may lose the last commits but never corrupts the database.
            Durability::ProcessCrash => SqliteSynchronous::Normal,
        };
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let file = Some(options.get_filename().to_path_buf()).filter(|f| !f.as_os_str().is_empty() && f != ":memory:");
        // The writer connects first, so it is the one that creates the file and sets WAL.
        // It leaves checkpoints to a connection of their own (below): SQLite runs an
        // automatic checkpoint inside the commit that fills the log, so every write queued
        // behind that commit waited for the database file to be written and synced.
        let writer_options = options.clone().pragma("wal_autocheckpoint", if file.is_some() { "0" } else { "1000" });
        let writer = Writer::start(SqliteConnection::connect_with(&writer_options).await?);
        let alive = Arc::new(());
        if file.is_some() {
            let checkpoints = SqliteConnection::connect_with(&options).await?;
            tokio::spawn(checkpoint(checkpoints, Arc::downgrade(&alive)));
        }
        // A local file does not go stale: no ping before each use.
        let reads =
            SqlitePoolOptions::new().max_connections(8).test_before_acquire(false).connect_with(options).await?;
        Ok(Self { reads, writer, queued: Arc::new(Notify::new()), file, _alive: alive })
    }

    /// Run `work` on the write connection, after the writes queued before it. The work
    /// runs to its end even if the caller stops waiting.
    pub async fn write<T, E, F>(&self, work: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<sqlx::Error> + Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<T, E>> + Send + 'static,
    {
        self.writer.run(work).await
    }

    /// The default database inside a data directory.
    pub fn default_url(data_dir: &Path) -> String {
        format!("sqlite://{}", data_dir.join("fileflow.db").display())
    }

    pub async fn migrate(&self) -> Result<(), RepoError> {
        self.write(|c| Box::pin(async move { MIGRATOR.run_direct(c).await.map_err(RepoError::from) })).await
    }
}

pub(crate) fn to_millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub(crate) fn from_millis(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or(DateTime::<Utc>::MIN_UTC)
}

type NewJobAt = (NewJob, DateTime<Utc>);
/// What a worker records when a job completes: (job, lease owner, object, when).
type Completion = (JobId, String, StoredObject, DateTime<Utc>);

/// The SQLite implementation of [`JobRepository`].
#[derive(Clone, Debug)]
pub struct SqliteRepository {
    db: SqliteDb,
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

/// Write new jobs, many to a statement, and wake idle receivers.
async fn write_new_jobs(db: SqliteDb, batch: Vec<NewJobAt>) -> Vec<Result<Job, RepoError>> {
    let answers = all_or_each(&batch, |jobs| insert_jobs(&db, jobs)).await;
    if answers.iter().any(Result::is_ok) {
        db.queued.notify_waiters();
    }
    answers
}

/// Record completions, many to a statement.
async fn record_completions(db: SqliteDb, batch: Vec<Completion>) -> Vec<Result<bool, RepoError>> {
    all_or_each(&batch, |completions| complete_jobs(&db, completions)).await
}

/// `count` numbered parameters from `?first`: `?1,?2,?3`.
fn placeholders(first: usize, count: usize) -> String {
    (first..first + count).map(|n| format!("?{n}")).collect::<Vec<_>>().join(",")
}

/// Mark jobs completed where their lease is still held; answers whether each was.
async fn complete_jobs(db: &SqliteDb, batch: &[Completion]) -> Result<Vec<bool>, RepoError> {
    let mut sql = String::from(
        "UPDATE files SET status = 'completed', etag = v.column3, size = v.column4, sha256 = v.column5, \
         md5 = v.column6, content_type = v.column7, object_version = v.column9, last_error = NULL, \
         bytes_done = v.column4, bytes_total = v.column4, \
         lease_owner = NULL, lease_expires_at = NULL, next_attempt_at = NULL, updated_at = v.column8 FROM (VALUES ",
    );
    for i in 0..batch.len() {
        let p = 9 * i;
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(sql, "{sep}({})", placeholders(p + 1, 9));
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
                        .bind(&stored.version);
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
async fn claim_jobs(db: &SqliteDb, batch: &[(JobId, Lease)]) -> Result<Vec<Claim>, RepoError> {
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
async fn claim_state(db: &SqliteDb, id: JobId) -> Result<Option<ClaimState>, RepoError> {
    let row = sqlx::query("SELECT status, lease_expires_at, next_attempt_at FROM files WHERE id = ?1")
        .bind(id.0)
        .fetch_optional(&db.reads)
        .await?;
    let Some(row) = row else { return Ok(None) };
    let status: String = row.try_get("status")?;
    Ok(Some(ClaimState {
        status: status.parse::<JobStatus>().map_err(|reason| RepoError::Corrupt { id: id.0, reason })?,
        lease_expires_at: row.try_get::<Option<i64>, _>("lease_expires_at")?.map(from_millis),
        next_attempt_at: row.try_get::<Option<i64>, _>("next_attempt_at")?.map(from_millis),
    }))
}

/// Insert `batch` (at least one job) in one statement, which also queues each job (the
/// trigger files_new_job_enqueues); returns the jobs in the order given.
async fn insert_jobs(db: &SqliteDb, batch: &[NewJobAt]) -> Result<Vec<Job>, RepoError> {
    let owned = batch.to_vec();
    db.write(move |c| Box::pin(async move { insert_on(c, &owned).await })).await
}

/// [`insert_jobs`] on a connection the caller holds (inside its transaction).
async fn insert_on(c: &mut SqliteConnection, batch: &[NewJobAt]) -> Result<Vec<Job>, RepoError> {
    let mut sql = String::from(
        "INSERT INTO files (file_url, bucket_name, object_name, expected_sha256, expected_md5, \
         request_headers, owner_key, max_file_size, may_create_bucket, expected_size, if_exists, notify_url, \
         traceparent, created_at, updated_at, status, retry_count) VALUES ",
    );
    for i in 0..batch.len() {
        let p = 14 * i;
        let sep = if i == 0 { "" } else { "," };
        // created_at and updated_at are both the 14th value.
        let _ = write!(sql, "{sep}({},?{},'pending',0)", placeholders(p + 1, 14), p + 14);
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
            .bind(to_millis(*now));
    }
    let rows = query.fetch_all(c).await?;
    let mut jobs = rows.iter().map(job_from_row).collect::<Result<Vec<_>, _>>()?;
    // RETURNING gives no order, but ids are handed out in VALUES order.
    jobs.sort_unstable_by_key(|job| job.id.0);
    Ok(jobs)
}

const COLUMNS: &str = "id, file_url, bucket_name, object_name, status, retry_count, last_error, \
    etag, size, sha256, md5, content_type, expected_sha256, expected_md5, request_headers, \
    created_at, updated_at, next_attempt_at, owner_key, max_file_size, may_create_bucket, object_version, \
    cancel_requested_at, expected_size, if_exists, notify_url, bytes_done, bytes_total, traceparent";

fn job_from_row(row: &SqliteRow) -> Result<Job, RepoError> {
    let id: i64 = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    let status = status.parse::<JobStatus>().map_err(|reason| RepoError::Corrupt { id, reason })?;
    let corrupt = |reason: &str| RepoError::Corrupt { id, reason: reason.to_owned() };
    let retry_count: i64 = row.try_get("retry_count")?;
    let size: Option<i64> = row.try_get("size")?;
    Ok(Job {
        id: JobId(id),
        file_url: super::parsed(id, "file_url", row.try_get("file_url")?, SourceUrl::parse)?,
        bucket_name: super::parsed(id, "bucket_name", row.try_get("bucket_name")?, BucketName::parse)?,
        object_name: super::parsed(id, "object_name", row.try_get("object_name")?, ObjectKey::parse)?,
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
        expected_size: row.try_get::<Option<i64>, _>("expected_size")?.map(from_db),
        notify_url: row.try_get("notify_url")?,
        bytes_done: row.try_get::<Option<i64>, _>("bytes_done")?.map(from_db),
        bytes_total: row.try_get::<Option<i64>, _>("bytes_total")?.map(from_db),
        traceparent: row.try_get("traceparent")?,
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
    })
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
                    "INSERT INTO queue (job_id, attempt, due_at) \
                     SELECT id, retry_count + 1, MAX(COALESCE(next_attempt_at, 0), ?1) FROM files \
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
                        "INSERT INTO queue (job_id, attempt, due_at) VALUES (?1, 1, ?2) \
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
