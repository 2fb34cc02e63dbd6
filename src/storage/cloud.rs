//! Object stores reached through object_store's cloud backends — S3 (any S3-compatible
//! service), Azure Blob Storage and Google Cloud Storage — one implementation with what
//! differs between them behind [`Cloud`]: small objects in one PUT; larger ones as
//! multipart (block) uploads that are aborted on failure; resumable uploads part by part;
//! download links signed by each service's own scheme.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as StorePath;
use object_store::signer::Signer;
use object_store::{
    Attribute, Attributes, MultipartUpload, ObjectStore as _, ObjectStoreExt as _, PutMultipartOptions, PutOptions,
    PutPayload,
};
use url::Url;

use super::{
    ByteStream, Fence, Head, MIN_PART, ObjectInfo, ObjectStore, PartPlan, PartialWrite, PieceWrite, PutOutcome,
    ReadError, StoredBody, WriteOptions, WriteProgress, read_head,
};
use crate::domain::{BucketName, ObjectKey};
use crate::lifecycle::{Job, JobError, JobId};
use crate::links::DownloadLinks;

/// What differs between the services: how a client for one bucket is made, how a bucket
/// is created, and what the service calls a missing bucket.
#[async_trait]
pub trait Cloud: Send + Sync + 'static {
    type Client: object_store::ObjectStore + MultipartStore + Signer;

    /// The service's name in messages: `S3`, `Azure`, `GCS`.
    fn name(&self) -> &'static str;

    /// A client for `bucket` (an S3 or GCS bucket, an Azure container); `public`: one whose
    /// signed links name the address users reach the store at.
    fn client(&self, bucket: &str, public: bool) -> Result<Self::Client, JobError>;

    /// The request that creates `bucket` (signed as the service wants), or an error saying
    /// why it cannot be created. A success or a conflict (it exists) answers it.
    async fn create_bucket(
        &self,
        http: &reqwest::Client,
        client: &Self::Client,
        bucket: &BucketName,
    ) -> Result<reqwest::RequestBuilder, JobError>;

    /// Whether download links name another address than fileflow reaches the store at.
    fn public_elsewhere(&self) -> bool;

    /// Whether an error's text is the service saying the bucket does not exist.
    fn is_missing_bucket(&self, text: &str) -> bool;

    /// Whether uploads can go on from their stored parts in a later attempt (the
    /// service's multipart calls keep the object's content type).
    fn resumable(&self) -> bool {
        true
    }

    /// The checksum the service checks each part against, as a resumable write records it.
    fn part_checksum(&self) -> Option<&'static str> {
        None
    }

    /// The most parts (blocks) one upload may have.
    fn max_parts(&self) -> u64 {
        10_000
    }

    /// Whether every part of an upload but the last must be of one size.
    fn equal_parts(&self) -> bool {
        false
    }
}

/// Store-wide settings of a [`CloudStore`].
#[derive(Debug, Clone, Copy)]
pub struct CloudLimits {
    /// Create a missing bucket instead of failing the job.
    pub create_buckets: bool,
    /// The largest file accepted: parts grow so no upload needs more than the store allows.
    pub max_file_size: u64,
}

/// A store's clients, by bucket and whether they sign public links.
type Clients<T> = HashMap<(String, bool), Arc<T>>;

pub struct CloudStore<C: Cloud> {
    cloud: C,
    limits: CloudLimits,
    /// Clients by bucket and whether they sign public links.
    clients: Mutex<Clients<C::Client>>,
    /// For the requests fileflow makes itself (bucket creation).
    http: reqwest::Client,
    /// Buckets seen to exist (only tracked when creating buckets).
    existing: Mutex<HashSet<String>>,
}

impl<C: Cloud> CloudStore<C> {
    pub fn with(cloud: C, limits: CloudLimits) -> Self {
        let http = reqwest::Client::builder().no_proxy().build().expect("a plain client builds");
        Self { cloud, limits, clients: Mutex::default(), http, existing: Mutex::default() }
    }

    /// A write just begun as the upload `id`, in parts of `part_size`.
    fn new_write(&self, id: String, part_size: u64) -> PartialWrite {
        let checksum = self.cloud.part_checksum().map(str::to_owned);
        PartialWrite { id, part_size, stored: 0, parts: Vec::new(), checksum }
    }

    /// How this store's uploads are cut into parts (see [`PartPlan`]).
    fn plan(&self) -> PartPlan {
        PartPlan {
            max_parts: self.cloud.max_parts(),
            equal: self.cloud.equal_parts(),
            max_file_size: self.limits.max_file_size,
        }
    }

    /// Create `bucket` now, whatever the store's bucket creation setting says (an existing
    /// one is fine).
    pub async fn create_bucket(&self, bucket: &BucketName) -> Result<(), JobError> {
        let client = self.bucket(bucket.as_str())?;
        let name = self.cloud.name();
        let request = self.cloud.create_bucket(&self.http, &client, bucket).await?;
        let response = request
            .send()
            .await
            .map_err(|e| JobError::transient(format!("{name}: cannot create bucket {bucket}: {e}")))?;
        let status = response.status();
        if status.is_success() || status == reqwest::StatusCode::CONFLICT {
            return Ok(());
        }
        let body = response.text().await.unwrap_or_default();
        let message = format!("{name}: cannot create bucket {bucket}: HTTP {status}: {body}");
        Err(JobError::for_http_status(status.as_u16(), message))
    }

    fn bucket(&self, bucket: &str) -> Result<Arc<C::Client>, JobError> {
        self.client(bucket, false)
    }

    /// The client that signs download links.
    fn signer(&self, bucket: &str) -> Result<Arc<C::Client>, JobError> {
        self.client(bucket, self.cloud.public_elsewhere())
    }

    fn client(&self, bucket: &str, public: bool) -> Result<Arc<C::Client>, JobError> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let key = (bucket.to_owned(), public);
        if let Some(client) = clients.get(&key) {
            return Ok(client.clone());
        }
        let client = Arc::new(self.cloud.client(bucket, public)?);
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// Create the bucket unless it is known to exist.
    async fn ensure_bucket(&self, store: &C::Client, bucket: &BucketName) -> Result<(), JobError> {
        if self.existing.lock().unwrap_or_else(|p| p.into_inner()).contains(bucket.as_str()) {
            return Ok(());
        }
        match store.list_with_delimiter(Some(&StorePath::from("fileflow-bucket-probe"))).await {
            Ok(_) => {}
            Err(e) if self.classify(&e, "").message.contains("bucket does not exist") => {
                self.create_bucket(bucket).await?;
                tracing::info!(%bucket, store = self.cloud.name(), "bucket created");
            }
            Err(e) => return Err(self.classify(&e, "bucket check")),
        }
        self.existing.lock().unwrap_or_else(|p| p.into_inner()).insert(bucket.as_str().to_owned());
        Ok(())
    }

    /// Upload `body`, the file of `length` bytes when known: read ahead up to the smallest
    /// part; a body that ends by then goes up in one PUT, a longer one as a multipart
    /// upload cut by the store's [`PartPlan`]. The parts in flight and the one being filled
    /// stay within [`ObjectStore::write_buffer`] (what the transfer reserved) while parts
    /// are of the first size; when a file of unknown length outgrows it, one part uploads
    /// while the next fills.
    async fn upload(
        &self,
        store: &C::Client,
        location: &StorePath,
        options: &WriteOptions<'_>,
        rest: &mut ByteStream,
        fence: &dyn Fence,
    ) -> Result<PutOutcome, JobError> {
        let head = match read_head(rest, MIN_PART as usize).await? {
            Head::Whole(parts) => {
                fence.check().await?;
                let put = PutOptions { attributes: content_type_attr(options.content_type), ..Default::default() };
                let put = store
                    .put_opts(location, PutPayload::from_iter(parts), put)
                    .await
                    .map_err(|e| self.classify(&e, "PUT"))?;
                return Ok(PutOutcome::tagged(put.e_tag));
            }
            Head::Start(parts) => parts,
        };
        let multipart =
            PutMultipartOptions { attributes: content_type_attr(options.content_type), ..Default::default() };
        let upload = store.put_multipart_opts(location, multipart).await.map_err(|e| self.classify(&e, "multipart"))?;
        let mut upload = AbortOnDrop(Some(upload));
        let plan = self.plan();
        let size_of = |index: u64| plan.part(options.length, index);
        let budget = (PARTS_IN_FLIGHT as u64 + 1) * size_of(0);
        let streamed: Result<(), JobError> = async {
            let parts = upload.0.as_mut().expect("present until finished");
            let mut in_flight = InFlight::default();
            let (mut part, mut len, mut index) = (Vec::new(), 0u64, 0u64);
            let mut body = futures::stream::iter(head.into_iter().map(Ok)).chain(rest);
            loop {
                let next = body.next().await.transpose()?;
                let ended = next.is_none();
                let mut chunk = next.unwrap_or_default();
                // Cut whole parts off what came; the last part goes when the body ends.
                while !chunk.is_empty() || (ended && len > 0) {
                    let size = size_of(index);
                    let take = (size - len).min(chunk.len() as u64) as usize;
                    if take > 0 {
                        part.push(chunk.split_to(take));
                        len += take as u64;
                    }
                    if len < size && !ended {
                        break;
                    }
                    let next = size_of(index + 1);
                    while !in_flight.is_empty() && in_flight.iter().map(|p| p.1).sum::<u64>() + len + next > budget {
                        let (done, _) = in_flight.pop_front().expect("parts in flight");
                        self.part_uploaded(done).await?;
                    }
                    let put = parts.put_part(PutPayload::from_iter(std::mem::take(&mut part)));
                    in_flight.push_back((tokio::spawn(put), std::mem::take(&mut len)));
                    index += 1;
                }
                if ended {
                    break;
                }
            }
            while let Some((done, _)) = in_flight.pop_front() {
                self.part_uploaded(done).await?;
            }
            fence.check().await
        }
        .await;
        let mut parts = upload.0.take().expect("present until finished");
        match streamed {
            Ok(()) => {
                let done = parts.complete().await.map_err(|e| self.classify_mid_upload(&e, "multipart completion"))?;
                Ok(PutOutcome::tagged(done.e_tag))
            }
            Err(e) => {
                if let Err(abort) = parts.abort().await {
                    tracing::warn!(error = %abort, "could not abort a multipart upload");
                }
                Err(e)
            }
        }
    }

    /// Wait for one part of [`upload`](Self::upload).
    async fn part_uploaded(&self, upload: tokio::task::JoinHandle<object_store::Result<()>>) -> Result<(), JobError> {
        let done = upload.await.map_err(|e| JobError::transient(format!("{} part upload: {e}", self.cloud.name())))?;
        done.map_err(|e| self.classify_mid_upload(&e, "part upload"))
    }
}

/// Parts of an upload in flight at once. Measured with 1 GiB into Garage on two cores:
/// 2 in flight 129 MiB/s, 4 161 MiB/s, 8 157 MiB/s; each part in flight holds its bytes
/// (5 MiB on S3), so 4 keeps a transfer's memory near 25 MiB.
const PARTS_IN_FLIGHT: usize = 4;

impl<C: Cloud> CloudStore<C> {
    /// A resumable upload: parts go up through the store's own multipart calls, at most
    /// [`PARTS_IN_FLIGHT`] at a time, and each one in the store is reported in order.
    #[allow(clippy::too_many_arguments)]
    async fn upload_resumable(
        &self,
        store: &Arc<C::Client>,
        location: &StorePath,
        options: &WriteOptions<'_>,
        mut body: ByteStream,
        fence: &dyn Fence,
        from: Option<PartialWrite>,
        progress: &dyn WriteProgress,
    ) -> Result<PutOutcome, JobError> {
        let (content_type, length) = (options.content_type, options.length);
        let part_size = self.plan().first(length);
        let resumed = from.is_some();
        let mut write = match from {
            Some(write) => write,
            None => {
                let options = PutMultipartOptions { attributes: content_type_attr(content_type), ..Default::default() };
                let id =
                    store.create_multipart_opts(location, options).await.map_err(|e| self.classify(&e, "multipart"))?;
                self.new_write(id, part_size)
            }
        };
        let mut reported = resumed;
        let result: Result<PutOutcome, JobError> = async {
            let mut in_flight = InFlight::default();
            let mut part: Vec<Bytes> = Vec::new();
            let mut part_len = 0u64;
            let mut offset = write.stored;
            let mut ended = false;
            while !ended {
                match body.next().await {
                    Some(Err(e)) => {
                        // Keep what is in flight: a next attempt goes on after it.
                        while let Some((upload, len)) = in_flight.pop_front() {
                            reported |= self.part_done(upload, len, &mut write, resumed, progress).await?;
                        }
                        return Err(e);
                    }
                    Some(Ok(chunk)) => {
                        part_len += chunk.len() as u64;
                        offset += chunk.len() as u64;
                        part.push(chunk);
                        if part_len < part_size {
                            continue;
                        }
                        progress.part_taken(offset);
                    }
                    // The file ended with its last part: nothing more to upload.
                    None if part_len == 0 && (write.stored > 0 || !in_flight.is_empty()) => break,
                    None => ended = true,
                }
                let index = write.parts.len() + in_flight.len();
                let (store, location, id) = (store.clone(), location.clone(), write.id.clone());
                let payload = PutPayload::from_iter(std::mem::take(&mut part));
                let upload = tokio::spawn(async move { store.put_part(&location, &id, index, payload).await });
                in_flight.push_back((upload, std::mem::take(&mut part_len)));
                while in_flight.len() >= PARTS_IN_FLIGHT {
                    let (upload, len) = in_flight.pop_front().expect("parts in flight");
                    reported |= self.part_done(upload, len, &mut write, resumed, progress).await?;
                }
            }
            while let Some((upload, len)) = in_flight.pop_front() {
                reported |= self.part_done(upload, len, &mut write, resumed, progress).await?;
            }
            fence.check().await?;
            let parts = write.parts.iter().map(|p| PartId { content_id: p.clone() }).collect();
            let done = store
                .complete_multipart(location, &write.id, parts)
                .await
                .map_err(|e| self.classify_mid_upload(&e, "multipart completion"))?;
            Ok(PutOutcome::tagged(done.e_tag))
        }
        .await;
        if result.is_err() && !reported {
            // Nothing to go on with: remove what was uploaded.
            if let Err(e) = store.abort_multipart(location, &write.id).await {
                tracing::warn!(error = %e, "could not abort a multipart upload");
            }
        }
        result
    }

    /// Wait for the next part's upload and add it to `write`; a whole part (every one but
    /// the last) is reported to `progress`, and then `true` is returned.
    async fn part_done(
        &self,
        upload: tokio::task::JoinHandle<object_store::Result<PartId>>,
        len: u64,
        write: &mut PartialWrite,
        resumed: bool,
        progress: &dyn WriteProgress,
    ) -> Result<bool, JobError> {
        let part = upload.await.map_err(|e| JobError::transient(format!("{} part upload: {e}", self.cloud.name())))?;
        let part = part.map_err(|e| self.part_failed(&e, resumed, progress))?;
        write.parts.push(part.content_id);
        if len < write.part_size {
            // The last part is not a place to go on from: a next attempt uploads it again.
            return Ok(false);
        }
        write.stored += len;
        progress.stored(write).await?;
        Ok(true)
    }

    /// What a failed part upload means; a resumed upload that the store no longer has is
    /// reported gone, so the next attempt starts over.
    fn part_failed(&self, e: &object_store::Error, resumed: bool, progress: &dyn WriteProgress) -> JobError {
        if resumed && matches!(e, object_store::Error::NotFound { .. }) {
            progress.gone();
        }
        self.classify_mid_upload(e, "part upload")
    }

    /// What a failed request means for the job: a missing bucket and refused credentials
    /// are permanent, the rest may pass. `what` names the request.
    fn classify(&self, e: &object_store::Error, what: &str) -> JobError {
        use object_store::Error as E;
        let what = format!("{} {what}", self.cloud.name());
        match e {
            E::NotFound { .. } => JobError::permanent(format!("{what}: the bucket does not exist")),
            E::PermissionDenied { .. } | E::Unauthenticated { .. } => JobError::permanent(format!("{what}: {e}")),
            _ => {
                let text = e.to_string();
                if self.cloud.is_missing_bucket(&text) {
                    JobError::permanent(format!("{what}: the bucket does not exist"))
                } else {
                    JobError::transient(format!("{what}: {text}"))
                }
            }
        }
    }

    /// [`classify`](Self::classify) for the requests of a multipart upload already begun
    /// (parts, completion): there "not found" means the upload is gone, not the bucket: a
    /// completion the store carried out but whose answer was lost, then retried, finds no
    /// upload. Trying the job again uploads it afresh.
    fn classify_mid_upload(&self, e: &object_store::Error, what: &str) -> JobError {
        match e {
            object_store::Error::NotFound { .. } => JobError::transient(format!(
                "{} {what}: the multipart upload is gone (completed by a lost answer, or aborted)",
                self.cloud.name()
            )),
            _ => self.classify(e, what),
        }
    }
}

/// A multipart upload whose parts are put by index, in any order.
struct CloudPieces<'a, C: Cloud> {
    cloud: &'a CloudStore<C>,
    store: Arc<C::Client>,
    location: StorePath,
    bucket: &'a BucketName,
    from: PartialWrite,
}

#[async_trait]
impl<C: Cloud> PieceWrite for CloudPieces<'_, C> {
    fn partial(&self) -> PartialWrite {
        self.from.clone()
    }

    async fn put(&self, offset: u64, chunks: Vec<Bytes>) -> Result<Vec<String>, JobError> {
        let part_size = self.from.part_size;
        let first = usize::try_from(offset / part_size).expect("a part index fits");
        // A piece is a whole number of parts (the file's last may be shorter): cut it there.
        let mut parts = Vec::new();
        let (mut part, mut len) = (Vec::new(), 0u64);
        for chunk in chunks {
            let mut chunk = chunk;
            while !chunk.is_empty() {
                let take = (part_size - len).min(chunk.len() as u64) as usize;
                part.push(chunk.split_to(take));
                len += take as u64;
                if len == part_size {
                    parts.push(std::mem::take(&mut part));
                    len = 0;
                }
            }
        }
        if len > 0 {
            parts.push(part);
        }
        let mut ids = Vec::with_capacity(parts.len());
        for (i, part) in parts.into_iter().enumerate() {
            let put = self.store.put_part(&self.location, &self.from.id, first + i, PutPayload::from_iter(part)).await;
            let id = put.map_err(|e| {
                let e = self.cloud.classify_mid_upload(&e, "part upload");
                JobError { message: format!("{} (bucket {})", e.message, self.bucket), ..e }
            })?;
            ids.push(id.content_id);
        }
        Ok(ids)
    }

    async fn sync(&self) -> Result<(), JobError> {
        Ok(())
    }

    async fn complete(&self, parts: Vec<String>, fence: &dyn Fence) -> Result<PutOutcome, JobError> {
        fence.check().await?;
        let parts = parts.into_iter().map(|content_id| PartId { content_id }).collect();
        let done = self.store.complete_multipart(&self.location, &self.from.id, parts).await.map_err(|e| {
            let e = self.cloud.classify_mid_upload(&e, "multipart completion");
            JobError { message: format!("{} (bucket {})", e.message, self.bucket), ..e }
        })?;
        Ok(PutOutcome::tagged(done.e_tag))
    }

    async fn abort(&self) {
        match self.store.abort_multipart(&self.location, &self.from.id).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => tracing::warn!(bucket = %self.bucket, error = %e, "could not abort a multipart upload"),
        }
    }
}

/// Pieces put in any order, uploaded in file order through an upload that numbers its
/// blocks as they come (Azure): a piece waits here until those before it have come.
struct OrderedPieces<'a, C: Cloud> {
    cloud: &'a CloudStore<C>,
    bucket: &'a BucketName,
    write: PartialWrite,
    state: tokio::sync::Mutex<InOrder>,
}

struct InOrder {
    /// Where the next piece to upload starts.
    next: u64,
    waiting: BTreeMap<u64, Vec<Bytes>>,
    upload: Box<dyn object_store::MultipartUpload>,
    in_flight: VecDeque<tokio::task::JoinHandle<object_store::Result<()>>>,
}

impl<C: Cloud> OrderedPieces<'_, C> {
    fn failed(&self, e: &object_store::Error, what: &str) -> JobError {
        let e = self.cloud.classify_mid_upload(e, what);
        JobError { message: format!("{} (bucket {})", e.message, self.bucket), ..e }
    }

    /// Wait for the oldest upload in flight.
    async fn settle_one(&self, state: &mut InOrder) -> Result<(), JobError> {
        let Some(upload) = state.in_flight.pop_front() else { return Ok(()) };
        let done =
            upload.await.map_err(|e| JobError::transient(format!("{} part upload: {e}", self.cloud.cloud.name())))?;
        done.map_err(|e| self.failed(&e, "part upload"))
    }
}

#[async_trait]
impl<C: Cloud> PieceWrite for OrderedPieces<'_, C> {
    fn partial(&self) -> PartialWrite {
        self.write.clone()
    }

    async fn put(&self, offset: u64, chunks: Vec<Bytes>) -> Result<Vec<String>, JobError> {
        let mut state = self.state.lock().await;
        state.waiting.insert(offset, chunks);
        loop {
            let next = state.next;
            let Some(chunks) = state.waiting.remove(&next) else { break };
            state.next += chunks.iter().map(|c| c.len() as u64).sum::<u64>();
            let upload = state.upload.put_part(PutPayload::from_iter(chunks));
            state.in_flight.push_back(tokio::spawn(upload));
            while state.in_flight.len() >= PARTS_IN_FLIGHT {
                self.settle_one(&mut state).await?;
            }
        }
        Ok(Vec::new())
    }

    async fn sync(&self) -> Result<(), JobError> {
        Ok(())
    }

    async fn complete(&self, _parts: Vec<String>, fence: &dyn Fence) -> Result<PutOutcome, JobError> {
        let mut state = self.state.lock().await;
        if !state.waiting.is_empty() {
            return Err(JobError::transient("a piece of the file never came"));
        }
        while !state.in_flight.is_empty() {
            self.settle_one(&mut state).await?;
        }
        fence.check().await?;
        let done = state.upload.complete().await.map_err(|e| self.failed(&e, "multipart completion"))?;
        Ok(PutOutcome::tagged(done.e_tag))
    }

    async fn abort(&self) {
        let mut state = self.state.lock().await;
        for upload in state.in_flight.drain(..) {
            upload.abort();
        }
        if let Err(e) = state.upload.abort().await {
            tracing::warn!(bucket = %self.bucket, error = %e, "could not abort a multipart upload");
        }
    }
}

/// Part uploads under way, oldest first, with their lengths. Those still running when it is
/// dropped (the write failed or was abandoned) are stopped, so no part lands after the
/// upload is aborted, nor holds its bytes past the transfer's memory reservation.
struct InFlight<T>(VecDeque<(tokio::task::JoinHandle<T>, u64)>);

impl<T> Default for InFlight<T> {
    fn default() -> Self {
        Self(VecDeque::new())
    }
}

impl<T> std::ops::Deref for InFlight<T> {
    type Target = VecDeque<(tokio::task::JoinHandle<T>, u64)>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl<T> std::ops::DerefMut for InFlight<T> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl<T> Drop for InFlight<T> {
    fn drop(&mut self) {
        for (upload, _) in &self.0 {
            upload.abort();
        }
    }
}

/// Aborts a multipart upload whose attempt was dropped midway (lease lost, shutdown).
struct AbortOnDrop(Option<Box<dyn MultipartUpload>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(writer) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let mut writer = writer;
                if let Err(e) = writer.abort().await {
                    tracing::warn!(error = %e, "could not abort an abandoned multipart upload");
                }
            });
        }
    }
}

fn content_type_attr(content_type: &str) -> Attributes {
    let mut attributes = Attributes::new();
    attributes.insert(Attribute::ContentType, content_type.to_owned().into());
    attributes
}

fn location(key: &ObjectKey) -> StorePath {
    StorePath::from_iter(key.as_str().split('/'))
}

#[async_trait]
impl<C: Cloud> ObjectStore for CloudStore<C> {
    async fn put(
        &self,
        bucket: &BucketName,
        key: &ObjectKey,
        options: WriteOptions<'_>,
        mut body: ByteStream,
        fence: &dyn Fence,
    ) -> Result<PutOutcome, JobError> {
        let store = self.bucket(bucket.as_str())?;
        if self.limits.create_buckets && options.may_create_bucket {
            self.ensure_bucket(&store, bucket).await?;
        }
        self.upload(&store, &location(key), &options, &mut body, fence)
            .await
            .map_err(|e| JobError { message: format!("{} (bucket {bucket})", e.message), ..e })
    }

    /// A write whose parts the service checked another way (an S3 upload begun with
    /// SHA-256 checksums) would refuse this version's parts: it is started over.
    fn goes_on_with(&self, write: &PartialWrite) -> bool {
        write.checksum.as_deref() == self.cloud.part_checksum()
    }

    fn resumable_part_size(&self, length: u64) -> Option<u64> {
        self.cloud.resumable().then(|| self.plan().for_length(length))
    }

    async fn put_resumable(
        &self,
        bucket: &BucketName,
        key: &ObjectKey,
        options: WriteOptions<'_>,
        body: ByteStream,
        fence: &dyn Fence,
        _job: JobId,
        from: Option<PartialWrite>,
        progress: &dyn WriteProgress,
    ) -> Result<PutOutcome, JobError> {
        let store = self.bucket(bucket.as_str())?;
        if from.is_none() && self.limits.create_buckets && options.may_create_bucket {
            self.ensure_bucket(&store, bucket).await?;
        }
        self.upload_resumable(&store, &location(key), &options, body, fence, from, progress)
            .await
            .map_err(|e| JobError { message: format!("{} (bucket {bucket})", e.message), ..e })
    }

    /// One part per piece: each range fetched goes up as one part, by its index (on
    /// Azure, as one block, in file order).
    fn piece_size(&self, length: u64) -> Option<u64> {
        Some(self.plan().for_length(length))
    }

    /// The parts in flight and the one being filled (for a file of unknown length, while
    /// its parts are the first size: see [`PartPlan`]).
    fn write_buffer(&self, length: Option<u64>) -> u64 {
        self.plan().first(length) * (PARTS_IN_FLIGHT as u64 + 1)
    }

    async fn start_pieces<'a>(
        &'a self,
        bucket: &'a BucketName,
        key: &'a ObjectKey,
        options: WriteOptions<'a>,
        _job: JobId,
        from: Option<PartialWrite>,
    ) -> Result<Box<dyn PieceWrite + 'a>, JobError> {
        let store = self.bucket(bucket.as_str())?;
        let location = location(key);
        // A new write (stores that cannot resume always start one) may create the bucket.
        let new_write = from.is_none() || !self.cloud.resumable();
        if new_write && self.limits.create_buckets && options.may_create_bucket {
            self.ensure_bucket(&store, bucket).await?;
        }
        let multipart =
            PutMultipartOptions { attributes: content_type_attr(options.content_type), ..Default::default() };
        let failed = |e: object_store::Error| self.classify(&e, &format!("multipart (bucket {bucket})"));
        let part_size = self.plan().first(options.length);
        if !self.cloud.resumable() {
            // The service's own multipart calls would drop the content type: blocks go up
            // through an upload that keeps it, in file order, and nothing is resumed.
            let upload = store.put_multipart_opts(&location, multipart).await.map_err(failed)?;
            let write = self.new_write(String::new(), part_size);
            let state = InOrder { next: 0, waiting: BTreeMap::new(), upload, in_flight: VecDeque::new() };
            return Ok(Box::new(OrderedPieces { cloud: self, bucket, write, state: tokio::sync::Mutex::new(state) }));
        }
        let from = match from {
            Some(from) => from,
            None => {
                let id = store.create_multipart_opts(&location, multipart).await.map_err(failed)?;
                self.new_write(id, part_size)
            }
        };
        Ok(Box::new(CloudPieces { cloud: self, store, location, bucket, from }))
    }

    async fn discard(&self, bucket: &BucketName, key: &ObjectKey, write: &PartialWrite) -> Result<(), JobError> {
        let store = self.bucket(bucket.as_str())?;
        match store.abort_multipart(&location(key), &write.id).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.classify(&e, "multipart abort")),
        }
    }

    async fn head(&self, bucket: &BucketName, key: &ObjectKey) -> Result<Option<ObjectInfo>, ReadError> {
        let store = self.bucket(bucket.as_str()).map_err(|e| ReadError::Store(e.message))?;
        match store.head(&location(key)).await {
            Ok(meta) => {
                let tagged = PutOutcome::tagged(meta.e_tag);
                Ok(Some(ObjectInfo { size: meta.size, etag: tagged.etag, version: tagged.version }))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) if self.cloud.is_missing_bucket(&e.to_string()) => Ok(None),
            Err(e) => Err(ReadError::Store(e.to_string())),
        }
    }

    async fn get(&self, bucket: &BucketName, key: &ObjectKey) -> Result<StoredBody, ReadError> {
        let store = self.bucket(bucket.as_str()).map_err(|e| ReadError::Store(e.message))?;
        super::stored_body(store.get(&location(key)).await)
    }
}

#[async_trait]
impl<C: Cloud> DownloadLinks for CloudStore<C> {
    // A presigned link cannot name, nor be ended with, the key it was made for: only
    // `--max-link-lifetime` bounds it.
    async fn link(&self, job: &Job, expires_at: DateTime<Utc>, _minted_by: Option<&str>) -> anyhow::Result<Url> {
        let store = self.signer(job.bucket_name.as_str()).map_err(|e| anyhow::anyhow!(e.message))?;
        let key = job.object_name.clone();
        // Whole seconds, rounded up: a link asked for 600 s says so (X-Amz-Expires=600, …).
        let millis = (expires_at - Utc::now()).num_milliseconds().max(0) as u64;
        let lifetime = std::time::Duration::from_secs(millis.div_ceil(1000));
        Ok(store.signed_url(reqwest::Method::GET, &location(&key), lifetime).await?)
    }
}
