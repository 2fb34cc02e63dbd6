//! The fetcher port: how bytes are pulled from an origin.

mod guard;
mod http;
mod pace;

use async_trait::async_trait;
use url::Url;

use crate::lifecycle::JobError;
use crate::storage::ByteStream;

pub use guard::{DestinationGuard, HostList, Refused};
pub use http::{FetchSettings, HttpFetcher, Lookup, SystemLookup, describe, guarded_client};
pub use pace::{MinRate, at_least};

/// An origin's answer, body not yet read.
pub struct Fetched {
    pub content_length: Option<u64>,
    pub content_type: Option<String>,
    pub body: ByteStream,
}

#[async_trait]
pub trait Fetcher: Send + Sync + 'static {
    /// Start fetching `url` with the caller's extra request `headers`; errors are
    /// classified transient or permanent.
    async fn fetch(&self, url: &Url, headers: &[(String, String)]) -> Result<Fetched, JobError>;
}
