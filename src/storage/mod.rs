//! The object store port: where fetched bytes end up.

mod local;
mod s3;

use async_trait::async_trait;
use bytes::Bytes;
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
}

/// A stored object opened for reading.
pub struct StoredBody {
    pub size: u64,
    pub body: BoxStream<'static, std::io::Result<Bytes>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("object not found")]
    NotFound,
    #[error("object store error: {0}")]
    Store(String),
}

#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// Store `body` at `bucket/key`, all or nothing: if the stream yields an error the
    /// upload is aborted, nothing is left in place, and that error is returned.
    async fn put(
        &self,
        bucket: &BucketName,
        key: &ObjectKey,
        content_type: &str,
        body: ByteStream,
    ) -> Result<PutOutcome, JobError>;

    /// Open a stored object for reading.
    async fn get(&self, bucket: &BucketName, key: &ObjectKey) -> Result<StoredBody, ReadError>;
}
