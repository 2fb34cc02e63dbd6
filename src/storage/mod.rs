//! The object store port: where fetched bytes end up.

mod local;
mod s3;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::BoxStream;

use crate::domain::{BucketName, ObjectKey};
use crate::lifecycle::JobError;

pub use local::LocalStore;
pub use s3::{S3Settings, S3Store};

/// A stream of bytes whose errors are already classified for the job lifecycle.
pub type ByteStream = BoxStream<'static, Result<Bytes, JobError>>;

/// A stored object's store-side identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutOutcome {
    /// The store's ETag, when it reports one worth keeping.
    pub etag: Option<String>,
    /// What tells this write's object from a later one at the same key (the store's
    /// version or entity tag), when the store names one.
    pub version: Option<String>,
}

impl PutOutcome {
    /// An object the store tagged with `e_tag` (quotes removed), which is also its version.
    pub fn tagged(e_tag: Option<String>) -> Self {
        let etag = e_tag.map(|t| t.trim_matches('"').to_owned());
        Self { version: etag.clone(), etag }
    }
}

/// How to store one object.
#[derive(Debug, Clone, Copy)]
pub struct WriteOptions<'a> {
    pub content_type: &'a str,
    /// Whether a missing bucket may be created (when the store is set up to create them).
    pub may_create_bucket: bool,
}

/// An object the store has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    /// The store's ETag, when it reports one worth keeping.
    pub etag: Option<String>,
    pub version: Option<String>,
}

/// A stored object opened for reading.
pub struct StoredBody {
    pub size: u64,
    /// The object's version, as [`PutOutcome::version`] named it when it was written.
    pub version: Option<String>,
    pub body: BoxStream<'static, std::io::Result<Bytes>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("object not found")]
    NotFound,
    #[error("object store error: {0}")]
    Store(String),
}

/// Asked just before a stored object becomes visible (the rename into place, the single
/// PUT, the multipart completion): an error stops the write and nothing is left in place.
/// Workers answer with their lease, so a worker that lost its job cannot replace the
/// object another worker has stored since.
#[async_trait]
pub trait Fence: Send + Sync {
    async fn check(&self) -> Result<(), JobError>;
}

/// No fence: the write is the caller's alone (tests, tools).
pub struct Unfenced;

#[async_trait]
impl Fence for Unfenced {
    async fn check(&self) -> Result<(), JobError> {
        Ok(())
    }
}

#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// Store `body` at `bucket/key`, all or nothing: if the stream yields an error, or the
    /// `fence` refuses just before the object would become visible, the upload is
    /// aborted, nothing is left in place, and that error is returned.
    async fn put(
        &self,
        bucket: &BucketName,
        key: &ObjectKey,
        options: WriteOptions<'_>,
        body: ByteStream,
        fence: &dyn Fence,
    ) -> Result<PutOutcome, JobError>;

    /// Open a stored object for reading.
    async fn get(&self, bucket: &BucketName, key: &ObjectKey) -> Result<StoredBody, ReadError>;

    /// What the store has at `bucket/key` (`None`: nothing, or no such bucket).
    async fn head(&self, bucket: &BucketName, key: &ObjectKey) -> Result<Option<ObjectInfo>, ReadError>;

    /// Remove what writes left behind when their process died mid-way (staging files),
    /// if older than `older_than` (no live write is that old); returns how many. Stores
    /// that leave nothing behind, or clean up themselves, do nothing.
    async fn sweep_abandoned(&self, _older_than: std::time::Duration) -> std::io::Result<u64> {
        Ok(0)
    }
}

/// The start of a body, read before deciding how to store it.
enum Head {
    /// The body ended within the limit: all of it.
    Whole(Vec<Bytes>),
    /// The first chunks, over the limit by less than one chunk; the rest is still in the stream.
    Start(Vec<Bytes>),
}

/// Read `body` until more than `limit` bytes have come or it ends, so a small object can go
/// to the store in one write and a large one streams on from where this stopped.
async fn read_head(body: &mut ByteStream, limit: usize) -> Result<Head, JobError> {
    let mut chunks = Vec::new();
    let mut size = 0;
    while size <= limit {
        let Some(chunk) = body.next().await else { return Ok(Head::Whole(chunks)) };
        let chunk = chunk?;
        size += chunk.len();
        chunks.push(chunk);
    }
    Ok(Head::Start(chunks))
}
