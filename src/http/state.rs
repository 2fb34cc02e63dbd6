//! What every handler is given: the ports and settings the API works with.

use std::sync::Arc;

use super::sites::SitePolicy;
use crate::auth::Gate;
use crate::events::ChangeFeed;
use crate::fetch::{DestinationGuard, Fetcher};
use crate::links::{DownloadLinks, LinkSigner};
use crate::metadata::{BatchStore, JobRepository, WebhookOutbox};
use crate::metrics::Metrics;
use crate::secrets::HeaderSealer;
use crate::storage::ObjectStore;

#[derive(Clone)]
pub struct AppState {
    pub repo: Arc<dyn JobRepository>,
    /// Batches: manifests read into jobs.
    pub bulk: Arc<dyn BatchStore>,
    /// Fetches manifests (through the destination guard, as workers fetch sources).
    pub fetcher: Arc<dyn Fetcher>,
    pub store: Arc<dyn ObjectStore>,
    pub links: Arc<dyn DownloadLinks>,
    /// Set when fileflow signs and serves download links itself.
    pub signer: Option<Arc<LinkSigner>>,
    pub guard: DestinationGuard,
    /// Who may call the API.
    pub gate: Arc<Gate>,
    /// Encrypts per-job origin headers before they reach the database.
    pub sealer: Arc<HeaderSealer>,
    /// The server's largest file; a key's own limit can only lower it.
    pub max_file_size: u64,
    /// Webhook deliveries and their tries, for the job's view.
    pub outbox: Arc<dyn WebhookOutbox>,
    /// Whether webhooks can be signed (a secret is configured): `notify_url` needs it.
    pub webhooks_signed: bool,
    pub metrics: Arc<Metrics>,
    /// Job changes as they happen, for the event streams.
    pub changes: Arc<ChangeFeed>,
    /// Which hosts the API is served under and which sites' pages may change things.
    pub sites: Arc<SitePolicy>,
}
