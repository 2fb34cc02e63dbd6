//! The local-directory object store: `<root>/<bucket>/<key>`, written through a staging
//! file that is renamed into place, so a reader never sees half an object.

use std::path::Path;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::{Path as StorePath, PathPart};
use object_store::{ObjectStoreExt as _, PutPayload, WriteMultipart};

use super::{ByteStream, Fence, Head, ObjectStore, PutOutcome, ReadError, StoredBody, read_head};
use crate::domain::{BucketName, ObjectKey};
use crate::lifecycle::JobError;

/// Bytes buffered before a write is handed to the file system.
const CHUNK: usize = 1024 * 1024;
/// Writes in flight per upload; with [`CHUNK`] this bounds an upload's buffers.
const WRITES_IN_FLIGHT: usize = 2;

#[derive(Debug)]
pub struct LocalStore {
    fs: LocalFileSystem,
}

impl LocalStore {
    /// A store rooted at `root` (created if missing). Buckets are directories below it and
    /// are created on first use.
    pub fn new(root: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        let fs = LocalFileSystem::new_with_prefix(root).map_err(std::io::Error::other)?.with_fsync(true);
        Ok(Self { fs })
    }

    fn location(bucket: &BucketName, key: &ObjectKey) -> StorePath {
        // Each segment is added as a part, so characters the file system cannot take are
        // escaped and no segment can climb out of the bucket.
        std::iter::once(PathPart::from(bucket.as_str())).chain(key.as_str().split('/').map(PathPart::from)).collect()
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn put(
        &self,
        bucket: &BucketName,
        key: &ObjectKey,
        _content_type: &str,
        mut body: ByteStream,
        fence: &dyn Fence,
    ) -> Result<PutOutcome, JobError> {
        let location = Self::location(bucket, key);
        // A body that fits in one chunk is written, synced and renamed into place in one
        // go on the blocking pool; a larger one streams through a staged multipart write.
        let start = match read_head(&mut body, CHUNK).await? {
            Head::Whole(chunks) => {
                fence.check().await?;
                self.fs
                    .put(&location, PutPayload::from_iter(chunks))
                    .await
                    .map_err(|e| JobError::transient(format!("local store: write failed: {e}")))?;
                return Ok(PutOutcome { etag: None });
            }
            Head::Start(chunks) => chunks,
        };
        let upload = self
            .fs
            .put_multipart(&location)
            .await
            .map_err(|e| JobError::transient(format!("local store: cannot start write: {e}")))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, CHUNK);
        for chunk in start {
            writer.put(chunk);
        }
        let written: Result<(), JobError> = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                writer
                    .wait_for_capacity(WRITES_IN_FLIGHT)
                    .await
                    .map_err(|e| JobError::transient(format!("local store: write failed: {e}")))?;
                writer.put(chunk);
            }
            fence.check().await
        }
        .await;
        match written {
            Ok(()) => {
                writer
                    .finish()
                    .await
                    .map_err(|e| JobError::transient(format!("local store: cannot finish write: {e}")))?;
                Ok(PutOutcome { etag: None })
            }
            Err(error) => {
                if let Err(abort) = writer.abort().await {
                    tracing::warn!(%bucket, %key, error = %abort, "could not remove a staged upload");
                }
                Err(error)
            }
        }
    }

    async fn get(&self, bucket: &BucketName, key: &ObjectKey) -> Result<StoredBody, ReadError> {
        match self.fs.get(&Self::location(bucket, key)).await {
            Ok(found) => Ok(StoredBody {
                size: found.meta.size,
                body: found.into_stream().map_err(std::io::Error::other).boxed(),
            }),
            Err(object_store::Error::NotFound { .. }) => Err(ReadError::NotFound),
            Err(e) => Err(ReadError::Store(e.to_string())),
        }
    }
}
