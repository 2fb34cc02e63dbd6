//! The object store port: where fetched bytes end up.

mod azure;
mod cloud;
mod gcs;
mod local;
mod parts;
mod s3;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::BoxStream;

use crate::domain::{BucketName, ObjectKey};
use crate::lifecycle::JobError;

pub use azure::{AzureSettings, AzureStore};
pub use cloud::{Cloud, CloudLimits, CloudStore};
pub use gcs::{GcsSettings, GcsStore};
pub use local::LocalStore;
pub use parts::{MIN_PART, PartPlan};
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
    /// The whole file's length, when the origin declared it: stores cut their parts by it.
    pub length: Option<u64>,
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

/// Where a resumable write stands: what another attempt, in this process or another, needs
/// to go on with it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartialWrite {
    /// The store's name for the write: an S3 multipart upload's id, a staging file's name.
    pub id: String,
    /// Bytes in every part but the last.
    pub part_size: u64,
    /// Bytes in the store for good (whole parts), from the file's start.
    pub stored: u64,
    /// The parts in the store, in order (S3: their part ids).
    pub parts: Vec<String>,
    /// The checksum the store checks this write's parts against, when the write declared
    /// one (S3: `crc64nvme`); absent in checkpoints saved before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

/// Told by a resumable write how far it has got.
#[async_trait]
pub trait WriteProgress: Send + Sync {
    /// The write has taken exactly `offset` bytes of the file (a part's end) and has not
    /// read past them yet.
    fn part_taken(&self, offset: u64);
    /// The parts up to `write.stored` are in the store for good: an attempt that fails from
    /// now on can be resumed from there. An error stops the write.
    async fn stored(&self, write: &PartialWrite) -> Result<(), JobError>;
    /// The partial write the attempt was to go on with is no longer in the store.
    fn gone(&self);
}

/// `body`, which starts at `start` in its file, with no chunk running past the end of a
/// `part_size` part, so a resumable write can cut its parts between chunks.
pub fn split_at_parts(body: ByteStream, start: u64, part_size: u64) -> ByteStream {
    let state = (body, start, None::<Bytes>);
    futures::stream::unfold(state, move |(mut body, offset, held)| async move {
        let chunk = match held {
            Some(chunk) => chunk,
            None => match body.next().await? {
                Ok(chunk) => chunk,
                Err(e) => return Some((Err(e), (body, offset, None))),
            },
        };
        let to_part_end = part_size - offset % part_size;
        if (chunk.len() as u64) <= to_part_end {
            let len = chunk.len() as u64;
            return Some((Ok(chunk), (body, offset + len, None)));
        }
        let mut rest = chunk;
        let head = rest.split_to(to_part_end as usize);
        Some((Ok(head), (body, offset + to_part_end, Some(rest))))
    })
    .boxed()
}

/// A write whose pieces (ranges of the file, each a whole number of the store's parts but
/// the last) arrive in any order, for a file fetched as several ranges at once
/// ([`ObjectStore::start_pieces`]). Its state between attempts is a [`PartialWrite`] whose
/// `stored` bytes are the ones before the first piece still missing.
#[async_trait]
pub trait PieceWrite: Send + Sync {
    /// The write as an attempt that goes on with it needs it: id and part size, and what
    /// it was started from (the bytes and parts stored before this attempt).
    fn partial(&self) -> PartialWrite;
    /// Store `chunks`, the file's bytes from `offset` (a piece's start); returns the ids of
    /// the parts they became, in order (none on stores without parts).
    async fn put(&self, offset: u64, chunks: Vec<Bytes>) -> Result<Vec<String>, JobError>;
    /// Make every piece put so far durable, before a checkpoint names them.
    async fn sync(&self) -> Result<(), JobError>;
    /// Make the object visible, made of `parts` (every part of the file, in order), once
    /// `fence` agrees.
    async fn complete(&self, parts: Vec<String>, fence: &dyn Fence) -> Result<PutOutcome, JobError>;
    /// Remove what the write made: no attempt will go on with it.
    async fn abort(&self);
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

    /// Whether this store can hold an object at `bucket/key` at all (a file name's length on
    /// disk, say); `Err` says why not, for the caller who asked. Stores that take every
    /// valid key answer `Ok`.
    fn check_key(&self, _bucket: &BucketName, _key: &ObjectKey) -> Result<(), String> {
        Ok(())
    }

    /// Open a stored object for reading.
    async fn get(&self, bucket: &BucketName, key: &ObjectKey) -> Result<StoredBody, ReadError>;

    /// What the store has at `bucket/key` (`None`: nothing, or no such bucket).
    async fn head(&self, bucket: &BucketName, key: &ObjectKey) -> Result<Option<ObjectInfo>, ReadError>;

    /// Whether this store can go on with `write`, begun by an earlier attempt (perhaps by an
    /// older fileflow that checked its parts another way).
    fn goes_on_with(&self, _write: &PartialWrite) -> bool {
        true
    }

    /// The part size of [`ObjectStore::put_resumable`] for a file of `length` bytes; `None`
    /// if the store cannot resume writes.
    fn resumable_part_size(&self, _length: u64) -> Option<u64> {
        None
    }

    /// Store the file whose bytes from `from.stored` on (from its start when `from` is
    /// `None`) are `body`, in parts of [`ObjectStore::resumable_part_size`]; no chunk of
    /// `body` may run past a part's end (see [`split_at_parts`]). Each part in the store
    /// for good is reported to `progress`; when the write then fails, its parts are kept,
    /// so a later attempt given the last [`PartialWrite`] reported can go on from there,
    /// and [`ObjectStore::discard`] removes them once no attempt will. A write that fails
    /// before reporting anything removes what it made. `job` names the write: one at a
    /// time per job. The `fence` is asked as in [`ObjectStore::put`].
    #[allow(clippy::too_many_arguments)]
    async fn put_resumable(
        &self,
        _bucket: &BucketName,
        _key: &ObjectKey,
        _options: WriteOptions<'_>,
        _body: ByteStream,
        _fence: &dyn Fence,
        _job: crate::lifecycle::JobId,
        _from: Option<PartialWrite>,
        _progress: &dyn WriteProgress,
    ) -> Result<PutOutcome, JobError> {
        Err(JobError::permanent("this object store cannot resume writes"))
    }

    /// The piece size of [`ObjectStore::start_pieces`] for a file of `length` bytes;
    /// `None` if the store cannot take pieces out of order.
    fn piece_size(&self, _length: u64) -> Option<u64> {
        None
    }

    /// Whether the store names no ETag of its own, so an object's ETag is the MD5 of its
    /// bytes, which every transfer into it must then compute (the disk store).
    fn etag_is_md5(&self) -> bool {
        false
    }

    /// Most bytes of a body one write ([`ObjectStore::put`], [`ObjectStore::put_resumable`])
    /// holds in memory at once for a file of `length` bytes (`None`: unknown): the worker's
    /// memory budget reserves this per transfer.
    fn write_buffer(&self, length: Option<u64>) -> u64;

    /// Start a write whose pieces come in any order (see [`PieceWrite`]), or go on with the
    /// resumable write `from` (made by [`ObjectStore::put_resumable`] or an earlier piece
    /// write: its stored bytes are kept, anything after them is written again). `job` names
    /// the write, as in [`ObjectStore::put_resumable`].
    async fn start_pieces<'a>(
        &'a self,
        _bucket: &'a BucketName,
        _key: &'a ObjectKey,
        _options: WriteOptions<'a>,
        _job: crate::lifecycle::JobId,
        _from: Option<PartialWrite>,
    ) -> Result<Box<dyn PieceWrite + 'a>, JobError> {
        Err(JobError::permanent("this object store cannot take a file in pieces"))
    }

    /// Remove the parts a resumable write kept.
    async fn discard(&self, _bucket: &BucketName, _key: &ObjectKey, _write: &PartialWrite) -> Result<(), JobError> {
        Ok(())
    }

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

/// The I/O error at the root of `err`, if any: what the file system itself said.
pub(crate) fn io_cause<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        current = e.source();
    }
    None
}

/// An object_store read, as a [`StoredBody`] or why there is none.
fn stored_body(read: object_store::Result<object_store::GetResult>) -> Result<StoredBody, ReadError> {
    use futures::TryStreamExt as _;
    match read {
        Ok(found) => Ok(StoredBody {
            size: found.meta.size,
            version: found.meta.e_tag.clone(),
            body: found.into_stream().map_err(std::io::Error::other).boxed(),
        }),
        Err(object_store::Error::NotFound { .. }) => Err(ReadError::NotFound),
        Err(e) => Err(ReadError::Store(e.to_string())),
    }
}
