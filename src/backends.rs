//! The one place where configuration chooses adapters. Two stacks are supported:
//! embedded (SQLite + embedded queue) and distributed (PostgreSQL + Kafka); either can
//! store objects on the local disk or in S3.

use std::path::Path;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use url::Url;

use crate::auth::KeyStore;
use crate::config::{DataArgs, Settings, StorageKind};
use crate::events::{Announcing, ChangeFeed};
use crate::links::{CappedLinks, DownloadLinks, LinkSigner};
use crate::metadata::WebhookOutbox;
use crate::metadata::{BatchStore, JobRepository, PgDb, PgRepository, RepoError, SqliteDb, SqliteRepository};
use crate::queue::kafka::KafkaSettings;
use crate::secrets::HeaderSealer;
use crate::storage::{AzureStore, GcsStore, LocalStore, ObjectStore, S3Store};

/// The metadata database, migrated.
pub enum Database {
    Sqlite(SqliteDb),
    Postgres(PgDb),
}

/// Where workers get their jobs from.
pub enum QueueSource {
    /// The `queue` table of the SQLite database.
    Embedded(SqliteDb),
    /// Kafka, fed by the outbox relay from PostgreSQL.
    Kafka { settings: KafkaSettings, db: PgDb },
}

/// The adapters a process runs with.
pub struct Backends {
    pub repo: Arc<dyn JobRepository>,
    /// Batches, in the same database as their jobs.
    pub bulk: Arc<dyn BatchStore>,
    /// The API keys, in the same database.
    pub keys: Arc<dyn KeyStore>,
    /// The webhook outbox, in the same database.
    pub outbox: Arc<dyn WebhookOutbox>,
    /// Encrypts per-job origin headers for the database (API) and opens them (workers).
    pub sealer: Arc<HeaderSealer>,
    pub store: Arc<dyn ObjectStore>,
    pub links: Arc<dyn DownloadLinks>,
    /// Present when fileflow serves its own signed download links.
    pub signer: Option<Arc<LinkSigner>>,
    pub queue: QueueSource,
    /// Job changes as they happen (fed by the repository on SQLite, by the database's
    /// notifications on PostgreSQL: see [`crate::events`]).
    pub changes: Arc<ChangeFeed>,
}

/// Open the metadata database named by the settings and apply pending migrations (every
/// command does this on start; concurrent starts are safe: the migrator takes a lock).
pub async fn open_database(settings: &DataArgs) -> anyhow::Result<Database> {
    let url = match &settings.database_url {
        Some(url) => url.expose().to_owned(),
        None => SqliteDb::default_url(&settings.data_dir),
    };
    match url.split_once(':').map(|(scheme, _)| scheme) {
        Some("sqlite") => {
            // The database holds every job's URL and the keys' records: its file is made
            // private before SQLite opens it (its WAL and shared-memory files take the
            // database file's mode), and files of an older start are made private too.
            let file = sqlx::sqlite::SqliteConnectOptions::from_str(&url)
                .ok()
                .map(|o| o.get_filename().to_path_buf())
                .filter(|f| !f.as_os_str().is_empty() && f != Path::new(":memory:"));
            if let Some(file) = &file {
                crate::files::create_private(file).with_context(|| format!("cannot create {}", file.display()))?;
            }
            let db = SqliteDb::connect_with(&url, settings.sqlite_durability)
                .await
                .with_context(|| format!("cannot open {url}"))?;
            for suffix in ["-wal", "-shm"] {
                if let Some(file) = &file {
                    let mut name = file.clone().into_os_string();
                    name.push(suffix);
                    crate::files::make_private(Path::new(&name))?;
                }
            }
            db.migrate().await.context("cannot migrate the SQLite database")?;
            Ok(Database::Sqlite(db))
        }
        Some("postgres" | "postgresql") => Ok(Database::Postgres(open_postgres(&url).await?)),
        _ => bail!("unsupported --database-url {url:?}: expected sqlite://… or postgres://…"),
    }
}

impl Database {
    /// The database's API keys.
    pub fn keys(&self) -> Arc<dyn KeyStore> {
        match self {
            Self::Sqlite(db) => Arc::new(db.clone()),
            Self::Postgres(db) => Arc::new(db.clone()),
        }
    }

    /// The database's webhook outbox.
    pub fn outbox(&self) -> Arc<dyn WebhookOutbox> {
        match self {
            Self::Sqlite(db) => Arc::new(db.clone()),
            Self::Postgres(db) => Arc::new(db.clone()),
        }
    }
}

/// How long a starting process waits for PostgreSQL to come up (a restart, a failover)
/// before it gives up.
const DATABASE_WAIT: Duration = Duration::from_secs(60);

/// Connect to PostgreSQL and migrate, waiting while the server is unreachable or starting
/// up; a refusal (bad credentials, no such database) fails at once.
async fn open_postgres(url: &str) -> anyhow::Result<PgDb> {
    let deadline = tokio::time::Instant::now() + DATABASE_WAIT;
    loop {
        let opened = async {
            let db = PgDb::connect(url).await?;
            db.migrate().await?;
            Ok::<_, RepoError>(db)
        }
        .await;
        match opened {
            Ok(db) => return Ok(db),
            Err(e) if e.is_unavailable() && tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "PostgreSQL is not available yet; waiting");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(anyhow::Error::new(e).context("cannot open the PostgreSQL database")),
        }
    }
}

/// Build every adapter from the settings. `public_url` is where this process's API is reached.
pub async fn build(settings: &Settings, public_url: Url) -> anyhow::Result<Backends> {
    let data = &settings.data;
    crate::files::create_dir(&data.data_dir, data.file_mode)
        .with_context(|| format!("cannot create data dir {}", data.data_dir.display()))?;
    let database = open_database(data).await?;
    let keys = database.keys();
    let outbox = database.outbox();
    let changes = Arc::new(ChangeFeed::default());
    let kafka = settings.kafka.settings(settings.fetch.transfer_timeout)?;
    let (repo, bulk, queue): (Arc<dyn JobRepository>, Arc<dyn BatchStore>, QueueSource) = match (database, kafka) {
        (Database::Sqlite(db), None) => {
            let repo = Arc::new(SqliteRepository::new(db.clone()));
            let bulk = repo.clone();
            (Arc::new(Announcing::new(repo, changes.clone())), bulk, QueueSource::Embedded(db))
        }
        (Database::Postgres(db), Some(kafka)) => {
            let repo = Arc::new(PgRepository::new(db.clone()));
            (repo.clone(), repo, QueueSource::Kafka { settings: kafka, db })
        }
        (Database::Sqlite(_), Some(_)) => {
            bail!("the Kafka queue needs PostgreSQL metadata (--database-url postgres://…): its outbox lives there")
        }
        (Database::Postgres(_), None) => {
            bail!("PostgreSQL metadata needs the Kafka queue (--kafka-brokers); the embedded queue lives in SQLite")
        }
    };

    let store = &settings.store;
    let (store, links, signer): (Arc<dyn ObjectStore>, Arc<dyn DownloadLinks>, _) = match store.storage {
        StorageKind::Fs => {
            let root = data.data_dir.join("objects");
            let store = LocalStore::with_mode(&root, data.file_mode)
                .with_context(|| format!("cannot open object store {}", root.display()))?;
            let signer = Arc::new(LinkSigner::load_or_create(&data.data_dir, public_url)?);
            (Arc::new(store), signer.clone(), Some(signer))
        }
        StorageKind::S3 => {
            let store = Arc::new(S3Store::new(store.s3()?));
            (store.clone(), store, None)
        }
        StorageKind::Azure => {
            let store = Arc::new(AzureStore::new(store.azure()));
            (store.clone(), store, None)
        }
        StorageKind::Gcs => {
            let store = GcsStore::new(store.gcs()).map_err(|e| anyhow::anyhow!(e.message))?;
            let store = Arc::new(store);
            (store.clone(), store, None)
        }
    };
    let sealer = Arc::new(HeaderSealer::load(settings.auth.encryption_key.as_ref(), &data.data_dir)?);
    let links = Arc::new(CappedLinks { inner: links, max: settings.server.max_link_lifetime });
    Ok(Backends { repo, bulk, keys, outbox, sealer, store, links, signer, queue, changes })
}
