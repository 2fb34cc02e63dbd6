//! SQLite metadata repository: the embedded default. The embedded queue lives in the
//! same database file (see `queue::embedded`). Here: the database, its connections and
//! its write connection's background checkpoints; `batches.rs`, the writes many jobs share
//! (new jobs, claims, completions) and how a row is read; `repository.rs`, the repository.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use futures::future::BoxFuture;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection as _, SqliteConnection, SqlitePool};
use tokio::sync::Notify;

use super::writer::Writer;
use super::{RepoError, millis};

mod batches;
mod bulk;
mod repository;

pub use repository::SqliteRepository;

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
