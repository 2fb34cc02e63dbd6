//! The local-directory object store: `<root>/<bucket>/<key>`, written through a staging
//! file that is renamed into place, so a reader never sees half an object.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::{Path as StorePath, PathPart};
use object_store::{ObjectStoreExt as _, PutPayload, WriteMultipart};

use super::{
    ByteStream, Fence, Head, ObjectInfo, ObjectStore, PartialWrite, PieceWrite, PutOutcome, ReadError, StoredBody,
    WriteOptions, WriteProgress, read_head,
};
use crate::domain::{BucketName, ObjectKey};
use crate::files::FileMode;
use crate::lifecycle::{Cause, JobError, JobId};

/// Bytes buffered before a write is handed to the file system.
const CHUNK: usize = 1024 * 1024;
/// Writes in flight per upload; with [`CHUNK`] this bounds an upload's buffers.
const WRITES_IN_FLIGHT: usize = 2;
/// The longest file name the store writes: Linux file systems take 255 bytes, and a
/// staging file adds `#` and a job id (up to 19 digits) to an object's name.
const MAX_NAME: usize = 255 - 20;
/// The longest path the store writes below its root (PATH_MAX is 4,096 bytes with its NUL).
const MAX_PATH: usize = 4095 - 20;
/// How much a resumable write stages between the points it can be resumed from (each one
/// an fsync of the staging file and a checkpoint in the database).
const RESUMABLE_PART: u64 = 16 * 1024 * 1024;
/// The pieces of a file fetched as several ranges at once: each is one range request and
/// is held in memory until the hashing has read it, so this times the ranges in flight
/// (plus a few) bounds such a transfer's memory.
const PIECE: u64 = 8 * 1024 * 1024;

#[derive(Debug)]
pub struct LocalStore {
    fs: LocalFileSystem,
    root: std::path::PathBuf,
    /// `root` as the file system names it (errors name it so; paths are measured from it).
    canonical_root: std::path::PathBuf,
    /// Mode of stored objects and their directories (private by default).
    mode: FileMode,
}

impl LocalStore {
    /// A store rooted at `root` (created if missing). Buckets are directories below it and
    /// are created on first use.
    pub fn new(root: &Path) -> std::io::Result<Self> {
        Self::with_mode(root, FileMode::PRIVATE)
    }

    /// A store whose objects get `mode` (their directories, and `root`, its directory mode).
    pub fn with_mode(root: &Path, mode: FileMode) -> std::io::Result<Self> {
        crate::files::create_dir(root, mode)?;
        let fs = LocalFileSystem::new_with_prefix(root).map_err(std::io::Error::other)?.with_fsync(true);
        let canonical_root = root.canonicalize()?;
        Ok(Self { fs, root: root.to_owned(), canonical_root, mode })
    }

    /// Give a stored object and its directories their modes, whatever the umask gave them.
    fn settle(&self, location: &StorePath) -> Result<(), JobError> {
        let file = self.fs.path_to_filesystem(location);
        file.map_err(std::io::Error::other)
            .and_then(|file| crate::files::settle(&self.root, &file, self.mode))
            .map_err(|e| JobError::transient(format!("local store: cannot set the object's mode: {e}")))
    }

    /// A write's failure as the job sees it: permanent when the file system can never take
    /// this key (a name too long, an object where a folder must be or the other way round,
    /// no permission, read-only, over quota), transient otherwise; worded without the
    /// server's paths.
    fn write_error(
        &self,
        what: &str,
        bucket: &BucketName,
        key: &ObjectKey,
        err: &(dyn std::error::Error + 'static),
    ) -> JobError {
        use std::io::ErrorKind as K;
        let Some(io) = super::io_cause(err) else {
            let text = self.scrub(&err.to_string());
            return JobError::transient(format!("local store: cannot {what} {bucket}/{key}: {text}"))
                .because(Cause::Store);
        };
        let never = match io.kind() {
            K::InvalidFilename => Some("a name in the key is longer than the file system allows"),
            // Creating the key's folders meets a file where a folder must be.
            K::NotADirectory | K::AlreadyExists => Some("a part of the key's path is an object, not a folder"),
            K::IsADirectory | K::DirectoryNotEmpty => Some("the key is a folder that holds other objects"),
            K::PermissionDenied => Some("permission denied by the file system"),
            K::ReadOnlyFilesystem => Some("the file system is read-only"),
            K::QuotaExceeded => Some("the disk quota is exceeded"),
            K::FileTooLarge => Some("the file is larger than the file system allows"),
            _ => None,
        };
        match never {
            Some(why) => JobError::permanent(format!("local store: cannot {what} {bucket}/{key}: {why}")),
            // An OS error's text names no path; any other is reduced to its kind.
            None if io.raw_os_error().is_some() => {
                JobError::transient(format!("local store: cannot {what} {bucket}/{key}: {io}"))
            }
            None => JobError::transient(format!("local store: cannot {what} {bucket}/{key}: {}", io.kind())),
        }
        .because(Cause::Store)
    }

    /// `text` without the store's own location on the server.
    fn scrub(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for root in [&self.canonical_root, &self.root] {
            let root = root.to_string_lossy();
            if !root.is_empty() {
                text = text.replace(&*root, "<data-dir>");
            }
        }
        text
    }

    fn location(bucket: &BucketName, key: &ObjectKey) -> StorePath {
        // Each segment is added as a part, so characters the file system cannot take are
        // escaped and no segment can climb out of the bucket.
        std::iter::once(PathPart::from(bucket.as_str())).chain(key.as_str().split('/').map(PathPart::from)).collect()
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    fn etag_is_md5(&self) -> bool {
        true
    }

    async fn put(
        &self,
        bucket: &BucketName,
        key: &ObjectKey,
        _options: WriteOptions<'_>,
        mut body: ByteStream,
        fence: &dyn Fence,
    ) -> Result<PutOutcome, JobError> {
        let location = Self::location(bucket, key);
        // A body that fits in one chunk is written, synced and renamed into place in one
        // go on the blocking pool; a larger one streams through a staged multipart write.
        let start = match read_head(&mut body, CHUNK).await? {
            Head::Whole(chunks) => {
                fence.check().await?;
                let put = self
                    .fs
                    .put(&location, PutPayload::from_iter(chunks))
                    .await
                    .map_err(|e| self.write_error("write", bucket, key, &e))?;
                self.settle(&location)?;
                // The file's entity tag (inode, modification time, size): a later write
                // at the same key is a new file with another one.
                return Ok(PutOutcome { etag: None, version: put.e_tag });
            }
            Head::Start(chunks) => chunks,
        };
        let upload =
            self.fs.put_multipart(&location).await.map_err(|e| self.write_error("start writing", bucket, key, &e))?;
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
                    .map_err(|e| self.write_error("write", bucket, key, &e))?;
                writer.put(chunk);
            }
            fence.check().await
        }
        .await;
        match written {
            Ok(()) => {
                let put = writer.finish().await.map_err(|e| self.write_error("finish writing", bucket, key, &e))?;
                self.settle(&location)?;
                Ok(PutOutcome { etag: None, version: put.e_tag })
            }
            Err(error) => {
                if let Err(abort) = writer.abort().await {
                    tracing::warn!(%bucket, %key, error = %abort, "could not remove a staged upload");
                }
                Err(error)
            }
        }
    }

    fn check_key(&self, bucket: &BucketName, key: &ObjectKey) -> Result<(), String> {
        let location = Self::location(bucket, key);
        if let Some(part) = location.parts().find(|part| part.as_ref().len() > MAX_NAME) {
            return Err(format!(
                "the local store keeps each part of a key as a file name of at most {MAX_NAME} bytes; \
                 one part is {} bytes (as stored)",
                part.as_ref().len()
            ));
        }
        let depth = self.canonical_root.as_os_str().len() + 1 + location.as_ref().len();
        if depth > MAX_PATH {
            return Err(format!("the key is too long for the local store's file system paths ({MAX_PATH} bytes)"));
        }
        Ok(())
    }

    fn resumable_part_size(&self, _length: u64) -> Option<u64> {
        Some(RESUMABLE_PART)
    }

    async fn put_resumable(
        &self,
        bucket: &BucketName,
        key: &ObjectKey,
        _options: WriteOptions<'_>,
        body: ByteStream,
        fence: &dyn Fence,
        job: JobId,
        from: Option<PartialWrite>,
        progress: &dyn WriteProgress,
    ) -> Result<PutOutcome, JobError> {
        let location = Self::location(bucket, key);
        let failed = |what: &str, e: &(dyn std::error::Error + 'static)| self.write_error(what, bucket, key, e);
        let target = self.fs.path_to_filesystem(&location).map_err(|e| failed("locate", &e))?;
        let staging = staging_path(&target, job);
        let mut write = match from {
            Some(write) => write,
            None => PartialWrite {
                id: job.to_string(),
                part_size: RESUMABLE_PART,
                stored: 0,
                parts: Vec::new(),
                checksum: None,
            },
        };
        let file = match open_staging(&staging, write.stored, self.mode).await {
            Ok(Some(file)) => file,
            Ok(None) => {
                progress.gone();
                return Err(JobError::transient("local store: the staged part of the file is gone; starting over"));
            }
            Err(e) => return Err(failed("stage", &e)),
        };
        let mut staged = Staged { file: Some(file), pending: None };
        let mut reported = write.stored > 0;
        let written: Result<(), JobError> = async {
            let mut body = body;
            let mut buffer: Vec<Bytes> = Vec::new();
            let mut buffered = 0;
            let mut offset = write.stored;
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                offset += chunk.len() as u64;
                buffered += chunk.len();
                buffer.push(chunk);
                let part_end = offset % RESUMABLE_PART == 0;
                if part_end {
                    progress.part_taken(offset);
                }
                if buffered >= CHUNK || part_end {
                    staged.write(std::mem::take(&mut buffer)).await.map_err(|e| failed("write", &e))?;
                    buffered = 0;
                }
                if part_end {
                    staged.sync().await.map_err(|e| failed("sync", &e))?;
                    write.stored = offset;
                    progress.stored(&write).await?;
                    reported = true;
                }
            }
            staged.write(buffer).await.map_err(|e| failed("write", &e))?;
            staged.sync().await.map_err(|e| failed("sync", &e))?;
            fence.check().await
        }
        .await;
        if let Err(error) = written {
            if !reported {
                let _ = tokio::fs::remove_file(&staging).await;
            }
            return Err(error);
        }
        publish(&staging, &target).await.map_err(|e| failed("move into place", &e))?;
        self.settle(&location)?;
        let meta = self.fs.head(&location).await.map_err(|e| failed("read back", &e))?;
        Ok(PutOutcome { etag: None, version: meta.e_tag })
    }

    fn piece_size(&self, _length: u64) -> Option<u64> {
        Some(PIECE)
    }

    /// The chunks being written and the one being filled.
    fn write_buffer(&self, _length: Option<u64>) -> u64 {
        (CHUNK * (WRITES_IN_FLIGHT + 1)) as u64
    }

    async fn start_pieces<'a>(
        &'a self,
        bucket: &'a BucketName,
        key: &'a ObjectKey,
        _options: WriteOptions<'a>,
        job: JobId,
        from: Option<PartialWrite>,
    ) -> Result<Box<dyn PieceWrite + 'a>, JobError> {
        let location = Self::location(bucket, key);
        let failed = |what: &str, e: &(dyn std::error::Error + 'static)| self.write_error(what, bucket, key, e);
        let target = self.fs.path_to_filesystem(&location).map_err(|e| failed("locate", &e))?;
        let staging = staging_path(&target, job);
        let from = from.unwrap_or_else(|| PartialWrite {
            id: job.to_string(),
            part_size: RESUMABLE_PART,
            stored: 0,
            parts: Vec::new(),
            checksum: None,
        });
        let file = match open_staging(&staging, from.stored, self.mode).await {
            Ok(Some(file)) => file,
            Ok(None) => {
                return Err(JobError::transient("local store: the staged part of the file is gone; starting over"));
            }
            Err(e) => return Err(failed("stage", &e)),
        };
        Ok(Box::new(LocalPieces { store: self, bucket, key, location, target, staging, file: Arc::new(file), from }))
    }

    async fn discard(&self, bucket: &BucketName, key: &ObjectKey, write: &PartialWrite) -> Result<(), JobError> {
        let target = self
            .fs
            .path_to_filesystem(&Self::location(bucket, key))
            .map_err(|e| JobError::transient(format!("local store: bad location: {}", self.scrub(&e.to_string()))))?;
        let job = write.id.parse().map_err(|_| JobError::permanent("local store: not a staging file's name"))?;
        match tokio::fs::remove_file(staging_path(&target, JobId(job))).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(JobError::transient(format!("local store: cannot remove a staging file: {e}"))),
        }
    }

    async fn sweep_abandoned(&self, older_than: std::time::Duration) -> std::io::Result<u64> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || remove_stale_staging(&root, older_than))
            .await
            .map_err(std::io::Error::other)?
    }

    async fn head(&self, bucket: &BucketName, key: &ObjectKey) -> Result<Option<ObjectInfo>, ReadError> {
        match self.fs.head(&Self::location(bucket, key)).await {
            Ok(meta) => Ok(Some(ObjectInfo { size: meta.size, etag: None, version: meta.e_tag })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            // A part of the key's path is an object: nothing can be at the key (a write
            // there then fails for good).
            Err(e) if super::io_cause(&e).is_some_and(|io| io.kind() == std::io::ErrorKind::NotADirectory) => Ok(None),
            Err(e) => Err(ReadError::Store(self.scrub(&e.to_string()))),
        }
    }

    async fn get(&self, bucket: &BucketName, key: &ObjectKey) -> Result<StoredBody, ReadError> {
        super::stored_body(self.fs.get(&Self::location(bucket, key)).await).map_err(|e| match e {
            ReadError::Store(text) => ReadError::Store(self.scrub(&text)),
            other => other,
        })
    }
}

/// A piece write into the staging file: each piece written at its place (`pwrite`), the
/// file renamed into place when complete.
struct LocalPieces<'a> {
    store: &'a LocalStore,
    bucket: &'a BucketName,
    key: &'a ObjectKey,
    location: StorePath,
    target: std::path::PathBuf,
    staging: std::path::PathBuf,
    file: Arc<std::fs::File>,
    from: PartialWrite,
}

impl LocalPieces<'_> {
    fn failed(&self, what: &str, e: &(dyn std::error::Error + 'static)) -> JobError {
        self.store.write_error(what, self.bucket, self.key, e)
    }
}

#[async_trait]
impl PieceWrite for LocalPieces<'_> {
    fn partial(&self) -> PartialWrite {
        self.from.clone()
    }

    async fn put(&self, offset: u64, chunks: Vec<Bytes>) -> Result<Vec<String>, JobError> {
        use std::os::unix::fs::FileExt as _;
        let file = self.file.clone();
        let written = tokio::task::spawn_blocking(move || {
            let mut at = offset;
            for chunk in &chunks {
                file.write_all_at(chunk, at)?;
                at += chunk.len() as u64;
            }
            Ok::<_, std::io::Error>(())
        })
        .await
        .map_err(std::io::Error::other);
        written.and_then(|w| w).map_err(|e| self.failed("write", &e))?;
        Ok(Vec::new())
    }

    async fn sync(&self) -> Result<(), JobError> {
        let file = self.file.clone();
        let synced = tokio::task::spawn_blocking(move || file.sync_data()).await.map_err(std::io::Error::other);
        synced.and_then(|s| s).map_err(|e| self.failed("sync", &e))
    }

    async fn complete(&self, _parts: Vec<String>, fence: &dyn Fence) -> Result<PutOutcome, JobError> {
        self.sync().await?;
        fence.check().await?;
        publish(&self.staging, &self.target).await.map_err(|e| self.failed("move into place", &e))?;
        self.store.settle(&self.location)?;
        let meta = self.store.fs.head(&self.location).await.map_err(|e| self.failed("read back", &e))?;
        Ok(PutOutcome { etag: None, version: meta.e_tag })
    }

    async fn abort(&self) {
        if let Err(e) = tokio::fs::remove_file(&self.staging).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(bucket = %self.bucket, key = %self.key, error = %e, "could not remove a staging file");
        }
    }
}

/// The staging file of `job`'s resumable write to `target`: `<target>#<job id>`, which the
/// sweep of abandoned staging files also knows.
fn staging_path(target: &Path, job: JobId) -> std::path::PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_owned();
    name.push(format!("#{job}"));
    target.with_file_name(name)
}

/// Open the staging file to go on after its first `stored` bytes (truncating anything
/// after them), or a new one when `stored` is 0. `None`: the file is gone or shorter.
async fn open_staging(path: &Path, stored: u64, mode: FileMode) -> std::io::Result<Option<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        if stored == 0 {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            // The object's own mode from the start, whatever the umask (it is renamed into place).
            let file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path)?;
            crate::files::set_mode(&path, mode.file_bits())?;
            return Ok(Some(file));
        }
        let file = match std::fs::OpenOptions::new().write(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if file.metadata()?.len() < stored {
            return Ok(None);
        }
        file.set_len(stored)?;
        let mut file = file;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(stored))?;
        Ok(Some(file))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// A staging file written on the blocking pool, one write in flight while the next is gathered.
struct Staged {
    file: Option<std::fs::File>,
    pending: Option<tokio::task::JoinHandle<std::io::Result<std::fs::File>>>,
}

impl Staged {
    /// The file, once the write in flight is done.
    async fn settled(&mut self) -> std::io::Result<std::fs::File> {
        if let Some(pending) = self.pending.take() {
            return pending.await.map_err(std::io::Error::other)?;
        }
        self.file.take().ok_or_else(|| std::io::Error::other("an earlier write failed"))
    }

    /// Start writing `chunks` after what is written.
    async fn write(&mut self, chunks: Vec<Bytes>) -> std::io::Result<()> {
        let mut file = self.settled().await?;
        self.pending = Some(tokio::task::spawn_blocking(move || {
            for chunk in &chunks {
                std::io::Write::write_all(&mut file, chunk)?;
            }
            Ok(file)
        }));
        Ok(())
    }

    /// Wait for the writes and make them durable.
    async fn sync(&mut self) -> std::io::Result<()> {
        let file = self.settled().await?;
        let file = tokio::task::spawn_blocking(move || file.sync_data().map(|()| file))
            .await
            .map_err(std::io::Error::other)??;
        self.file = Some(file);
        Ok(())
    }
}

/// Rename a synced staging file into place and make the rename durable.
async fn publish(staging: &Path, target: &Path) -> std::io::Result<()> {
    let (staging, target) = (staging.to_owned(), target.to_owned());
    tokio::task::spawn_blocking(move || {
        std::fs::rename(&staging, &target)?;
        match target.parent() {
            Some(dir) => std::fs::File::open(dir)?.sync_all(),
            None => Ok(()),
        }
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Whether `name` is a staging file of the file system store: `<object>#<digits>` (an
/// object's own `#` is escaped in its file name, so no object looks like this).
fn is_staging(name: &str) -> bool {
    name.rsplit_once('#').is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Remove staging files under `dir` last written more than `older_than` ago.
fn remove_stale_staging(dir: &Path, older_than: std::time::Duration) -> std::io::Result<u64> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            removed += remove_stale_staging(&entry.path(), older_than)?;
        } else if kind.is_file()
            && entry.file_name().to_str().is_some_and(is_staging)
            && entry.metadata()?.modified()?.elapsed().is_ok_and(|age| age > older_than)
        {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_staging_names_are_staging() {
        assert!(is_staging("big.bin#1"));
        assert!(is_staging("a#b#12"));
        assert!(!is_staging("big.bin"));
        assert!(!is_staging("report#final"));
        assert!(!is_staging("trailing#"));
    }

    #[tokio::test]
    async fn abandoned_staging_files_are_swept_and_objects_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path()).unwrap();
        std::fs::create_dir_all(dir.path().join("b/nested")).unwrap();
        std::fs::write(dir.path().join("b/nested/obj"), b"object").unwrap();
        std::fs::write(dir.path().join("b/nested/obj#1"), b"half").unwrap();
        std::fs::write(dir.path().join("b/other#3"), b"half").unwrap();
        assert_eq!(store.sweep_abandoned(std::time::Duration::from_secs(3600)).await.unwrap(), 0, "too young");
        assert_eq!(store.sweep_abandoned(std::time::Duration::ZERO).await.unwrap(), 2);
        assert!(dir.path().join("b/nested/obj").exists());
        assert!(!dir.path().join("b/nested/obj#1").exists() && !dir.path().join("b/other#3").exists());
    }
}
