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
    /// The whole file's length, when the origin declared it (also when only the rest is sent).
    pub content_length: Option<u64>,
    pub content_type: Option<String>,
    /// What identifies this version of the file for a later `If-Range`: a strong entity tag,
    /// else the `Last-Modified` date; `None` when the origin gave neither.
    pub validator: Option<String>,
    /// Where `body` starts in the file: the offset asked for when the origin sent the rest
    /// of the same file (206), else 0 (the whole file, from its start).
    pub start: u64,
    pub body: ByteStream,
}

/// Ask only for the file from `offset` on, and only if it is still the version `validator` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeFrom {
    pub offset: u64,
    pub validator: String,
}

#[async_trait]
pub trait Fetcher: Send + Sync + 'static {
    /// Start fetching `url` with the caller's extra request `headers`, from `from`'s offset
    /// when the origin still has that version and can send a range (else the whole file,
    /// with [`Fetched::start`] 0); errors are classified transient or permanent.
    async fn fetch(
        &self,
        url: &Url,
        headers: &[(String, String)],
        from: Option<&RangeFrom>,
    ) -> Result<Fetched, JobError>;
}
