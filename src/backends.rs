//! The one place where configuration chooses adapters.

use std::sync::Arc;

use anyhow::{Context, bail};
use url::Url;

use crate::config::{Settings, StorageKind};
use crate::links::{DownloadLinks, LinkSigner};
use crate::metadata::{JobRepository, SqliteDb, SqliteRepository};
use crate::queue::{EmbeddedQueue, Queue};
use crate::storage::{LocalStore, ObjectStore};

/// The adapters a process runs with.
pub struct Backends {
    pub repo: Arc<dyn JobRepository>,
    pub queue: Arc<dyn Queue>,
    pub store: Arc<dyn ObjectStore>,
    pub links: Arc<dyn DownloadLinks>,
    /// Present when fileflow serves its own signed download links.
    pub signer: Option<Arc<LinkSigner>>,
}

/// The metadata database named by the settings, migrated.
pub async fn open_database(settings: &Settings) -> anyhow::Result<SqliteDb> {
    let url = match &settings.database_url {
        Some(url) => url.clone(),
        None => SqliteDb::default_url(&settings.data_dir),
    };
    match url.split_once(':').map(|(scheme, _)| scheme) {
        Some("sqlite") => {
            let db = SqliteDb::connect(&url).await.with_context(|| format!("cannot open {url}"))?;
            db.migrate().await.context("cannot migrate the SQLite database")?;
            Ok(db)
        }
        Some("postgres" | "postgresql") => {
            bail!("PostgreSQL metadata is not available in this build yet; use sqlite://")
        }
        _ => bail!("unsupported --database-url {url:?}: expected sqlite://… or postgres://…"),
    }
}

/// Build every adapter from the settings. `public_url` is where this process's API is reached.
pub async fn build(settings: &Settings, public_url: Url) -> anyhow::Result<Backends> {
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("cannot create data dir {}", settings.data_dir.display()))?;
    if settings.kafka_brokers.is_some() {
        bail!("the Kafka queue is not available in this build yet; unset --kafka-brokers to use the embedded queue");
    }
    let db = open_database(settings).await?;
    let consumer = format!("{}-{}", hostname(), std::process::id());
    let queue = EmbeddedQueue::new(db.clone(), settings.job_lease, consumer);
    let repo = SqliteRepository::new(db);

    let (store, signer): (Arc<dyn ObjectStore>, Arc<LinkSigner>) = match settings.storage {
        StorageKind::Fs => {
            let root = settings.data_dir.join("objects");
            let store =
                LocalStore::new(&root).with_context(|| format!("cannot open object store {}", root.display()))?;
            let signer = LinkSigner::load_or_create(&settings.data_dir, public_url)?;
            (Arc::new(store), Arc::new(signer))
        }
        StorageKind::S3 => {
            bail!("the S3 store is not available in this build yet; use --storage fs")
        }
    };
    Ok(Backends { repo: Arc::new(repo), queue: Arc::new(queue), store, links: signer.clone(), signer: Some(signer) })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "fileflow".to_owned())
}
