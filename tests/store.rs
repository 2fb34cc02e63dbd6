//! One conformance suite for the object stores, written once and run against each store the
//! test servers provide: the disk, S3 (Garage), Azure Blob Storage (Azurite) and GCS (its
//! XML API, on moto's S3 application: no GCS emulator from the registries accepts
//! object_store's GCS object writes; the README says what that cannot show).
//!
//! Each case states what every store must do: whole objects or nothing, resumable writes
//! that go on after a cut, a missing bucket that fails for good, links that serve the bytes.

#[path = "support/services.rs"]
mod services;

#[path = "support/jobs.rs"]
mod jobs;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use fileflow::domain::{BucketName, ObjectKey};
use fileflow::lifecycle::{JobError, JobId};
use fileflow::links::DownloadLinks;
use fileflow::secrets::Secret;
use fileflow::storage::{
    AzureSettings, AzureStore, ByteStream, Fence, GcsSettings, GcsStore, LocalStore, ObjectStore, PartialWrite,
    S3Settings, S3Store, Unfenced, WriteOptions, WriteProgress, split_at_parts,
};
use futures::StreamExt as _;

const MAX_FILE: u64 = 5 << 30;

/// A store under test, with a bucket of its own.
struct Under {
    store: Arc<dyn ObjectStore>,
    /// The store's own download links (the disk store's are served by fileflow's API and
    /// tested end to end).
    links: Option<Arc<dyn DownloadLinks>>,
    bucket: BucketName,
    _dir: Option<tempfile::TempDir>,
}

async fn disk() -> Option<Under> {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::new(dir.path()).unwrap());
    Some(Under { store, links: None, bucket: bucket(), _dir: Some(dir) })
}

fn s3_settings(create_buckets: bool) -> Option<S3Settings> {
    let s3 = services::s3()?;
    Some(S3Settings {
        endpoint: Some(s3.endpoint.parse().unwrap()),
        public_endpoint: None,
        region: s3.region,
        access_key_id: s3.access_key,
        secret_access_key: Secret::new(s3.secret_key),
        create_buckets,
        max_file_size: MAX_FILE,
    })
}

async fn s3() -> Option<Under> {
    let store = Arc::new(S3Store::new(s3_settings(false)?));
    let bucket = bucket();
    store.create_bucket(&bucket).await.unwrap();
    Some(Under { links: Some(store.clone()), store, bucket, _dir: None })
}

async fn azure() -> Option<Under> {
    let azure = services::azure()?;
    let store = Arc::new(AzureStore::new(AzureSettings {
        account: Some(azure.account),
        access_key: Some(Secret::new(azure.key)),
        endpoint: Some(azure.endpoint.parse().unwrap()),
        public_endpoint: None,
        use_emulator: false,
        create_buckets: false,
        max_file_size: MAX_FILE,
    }));
    let bucket = bucket();
    store.create_bucket(&bucket).await.unwrap();
    Some(Under { links: Some(store.clone()), store, bucket, _dir: None })
}

/// GCS object writes, on moto's S3 application through the XML API (the README says what
/// it cannot show: generations, create-only puts). Its buckets are made with a plain PUT,
/// as it has no JSON API, and their names are letters and digits only.
async fn gcs() -> Option<Under> {
    let gcs = services::gcs_writes()?;
    let store = Arc::new(
        GcsStore::new(GcsSettings {
            service_account: Some(gcs.service_account),
            endpoint: Some(gcs.endpoint.parse().unwrap()),
            public_endpoint: None,
            project: None,
            create_buckets: false,
            max_file_size: MAX_FILE,
        })
        .unwrap(),
    );
    let bucket = BucketName::parse(&services::unique("conformance")).unwrap();
    let made = reqwest::Client::new().put(format!("{}/{bucket}", gcs.endpoint)).send().await.unwrap();
    assert!(made.status().is_success(), "moto made no bucket: {}", made.status());
    Some(Under { links: Some(store.clone()), store, bucket, _dir: None })
}

fn bucket() -> BucketName {
    BucketName::parse(&services::unique("conformance-")).unwrap()
}

fn key(name: &str) -> ObjectKey {
    ObjectKey::parse(name).unwrap()
}

const OPTIONS: WriteOptions<'static> =
    WriteOptions { content_type: "application/octet-stream", may_create_bucket: false, length: None };

/// `len` bytes that differ with `seed`.
fn bytes(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[0] ^ seed).collect()
}

/// `data` as a stream of 64 KiB chunks, ending with `error` if one is given.
fn stream(data: &[u8], error: Option<JobError>) -> ByteStream {
    let chunks: Vec<Result<Bytes, JobError>> =
        data.chunks(64 * 1024).map(|c| Ok(Bytes::copy_from_slice(c))).chain(error.map(Err)).collect();
    futures::stream::iter(chunks).boxed()
}

async fn read(under: &Under, name: &str) -> Vec<u8> {
    let mut body = under.store.get(&under.bucket, &key(name)).await.unwrap().body;
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    out
}

/// A fence that refuses, as a worker that lost its lease does.
struct Refuses;

#[async_trait]
impl Fence for Refuses {
    async fn check(&self) -> Result<(), JobError> {
        Err(JobError::transient("the lease was lost"))
    }
}

/// Keeps the last place a resumable write reported.
#[derive(Default)]
struct Saved {
    last: Mutex<Option<PartialWrite>>,
    gone: AtomicBool,
}

#[async_trait]
impl WriteProgress for Saved {
    fn part_taken(&self, _offset: u64) {}

    async fn stored(&self, write: &PartialWrite) -> Result<(), JobError> {
        *self.last.lock().unwrap() = Some(write.clone());
        Ok(())
    }

    fn gone(&self) {
        self.gone.store(true, Ordering::SeqCst);
    }
}

/// Small and large objects read back as written, with their size, whether their length
/// was declared or not (multipart uploads cut by the length, or growing parts without);
/// a new write at the key is another version.
async fn put_head_get(under: Under) {
    let objects = [
        ("small.bin", 100, false),
        ("large/part.bin", 3 * 1024 * 1024 + 17, false),
        ("parts/unknown.bin", 12 * 1024 * 1024 + 17, false),
        ("parts/declared.bin", 12 * 1024 * 1024 + 17, true),
    ];
    for (name, len, declared) in objects {
        let options = WriteOptions { length: declared.then_some(len as u64), ..OPTIONS };
        let data = bytes(1, len);
        let put = under.store.put(&under.bucket, &key(name), options, stream(&data, None), &Unfenced).await.unwrap();
        let head = under.store.head(&under.bucket, &key(name)).await.unwrap().expect("the object is there");
        assert_eq!(head.size, len as u64, "{name}");
        assert!(read(&under, name).await == data, "{name}: other bytes read back");
        let again = bytes(2, len);
        let second =
            under.store.put(&under.bucket, &key(name), options, stream(&again, None), &Unfenced).await.unwrap();
        assert!(read(&under, name).await == again, "{name}: the second write is what is read");
        if put.version.is_some() {
            assert_ne!(put.version, second.version, "{name}: a new write is a new version");
        }
    }
    assert!(under.store.head(&under.bucket, &key("absent")).await.unwrap().is_none());
}

/// A body that fails, or a fence that refuses, leaves nothing at the key, small or large.
async fn all_or_nothing(under: Under) {
    for len in [1000, 3 * 1024 * 1024, 11 * 1024 * 1024] {
        let data = bytes(3, len);
        let name = format!("broken-{len}");
        let cut = stream(&data, Some(JobError::transient("origin body interrupted")));
        let failed = under.store.put(&under.bucket, &key(&name), OPTIONS, cut, &Unfenced).await;
        assert!(failed.is_err(), "{name}: a failed body must fail the write");
        assert!(under.store.head(&under.bucket, &key(&name)).await.unwrap().is_none(), "{name}: left behind");

        let name = format!("fenced-{len}");
        let refused = under.store.put(&under.bucket, &key(&name), OPTIONS, stream(&data, None), &Refuses).await;
        assert!(refused.is_err(), "{name}: a refusing fence must stop the write");
        assert!(under.store.head(&under.bucket, &key(&name)).await.unwrap().is_none(), "{name}: left behind");
    }
}

/// A resumable write cut after its first part goes on from there in a second attempt, and
/// the object is the whole file; a discarded write cannot be gone on with.
async fn resumable_write_goes_on_after_a_cut(under: Under) {
    let part = under.store.resumable_part_size(0).expect("a store that resumes writes") as usize;
    let data = bytes(4, 2 * part + 1000);
    let name = key("resumed.bin");
    let saved = Saved::default();
    let first = stream(&data[..part + part / 2], Some(JobError::transient("origin body interrupted")));
    let first = split_at_parts(first, 0, part as u64);
    let cut = under.store.put_resumable(&under.bucket, &name, OPTIONS, first, &Unfenced, JobId(1), None, &saved).await;
    assert!(cut.is_err());
    let write = saved.last.lock().unwrap().clone().expect("the first part was reported stored");
    assert_eq!(write.stored, part as u64);
    assert!(under.store.head(&under.bucket, &name).await.unwrap().is_none(), "nothing visible before the end");
    assert!(under.store.goes_on_with(&write), "the store goes on with a write it began");

    let rest = split_at_parts(stream(&data[part..], None), part as u64, part as u64);
    let done = Saved::default();
    under
        .store
        .put_resumable(&under.bucket, &name, OPTIONS, rest, &Unfenced, JobId(1), Some(write), &done)
        .await
        .unwrap();
    assert!(read(&under, "resumed.bin").await == data, "the resumed object is not the whole file");
}

/// A resumable write cut, then discarded: going on with it finds its parts gone (the
/// store says so, and the next attempt starts over), and nothing is at the key.
async fn a_discarded_write_is_gone(under: Under) {
    let part = under.store.resumable_part_size(0).expect("a store that resumes writes") as usize;
    let data = bytes(4, 2 * part + 1000);
    let other = key("discarded.bin");
    let saved = Saved::default();
    let first = split_at_parts(
        stream(&data[..part + 10], Some(JobError::transient("origin body interrupted"))),
        0,
        part as u64,
    );
    let _ = under.store.put_resumable(&under.bucket, &other, OPTIONS, first, &Unfenced, JobId(2), None, &saved).await;
    let write = saved.last.lock().unwrap().clone().expect("the first part was reported stored");
    under.store.discard(&under.bucket, &other, &write).await.unwrap();
    let rest = split_at_parts(stream(&data[part..], None), part as u64, part as u64);
    let gone = Saved::default();
    let resumed =
        under.store.put_resumable(&under.bucket, &other, OPTIONS, rest, &Unfenced, JobId(2), Some(write), &gone);
    assert!(resumed.await.is_err(), "a discarded write must not be completed");
    assert!(gone.gone.load(Ordering::SeqCst), "the store says the parts are gone");
    assert!(under.store.head(&under.bucket, &other).await.unwrap().is_none());
}

/// A write in pieces takes them in any order and makes the object of them, in file order;
/// a second attempt goes on after the pieces stored without a gap (those past it are
/// written again); a fence that refuses leaves nothing visible; an aborted write is gone.
async fn pieces_in_any_order_make_the_object(under: Under) {
    let piece = under.store.piece_size(0).expect("a store that takes pieces") as usize;
    let data = bytes(6, 3 * piece + 1000);
    let at = |i: usize| (i * piece, data[i * piece..((i + 1) * piece).min(data.len())].to_vec());
    let chunks = |bytes: Vec<u8>| bytes.chunks(64 * 1024).map(Bytes::copy_from_slice).collect::<Vec<_>>();
    let name = key("pieces.bin");
    let write = under.store.start_pieces(&under.bucket, &name, OPTIONS, JobId(3), None).await.unwrap();
    let mut parts = vec![Vec::new(); 4];
    for i in [2, 0, 3, 1] {
        let (offset, bytes) = at(i);
        parts[i] = write.put(offset as u64, chunks(bytes)).await.unwrap();
    }
    write.complete(parts.concat(), &Unfenced).await.unwrap();
    assert!(read(&under, "pieces.bin").await == data, "the object is not the pieces in order");

    // Pieces 0 and 2 stored, then the attempt ends: the next goes on after piece 0.
    let name = key("gone-on.bin");
    let write = under.store.start_pieces(&under.bucket, &name, OPTIONS, JobId(4), None).await.unwrap();
    let first = write.put(0, chunks(at(0).1)).await.unwrap();
    write.put(2 * piece as u64, chunks(at(2).1)).await.unwrap();
    write.sync().await.unwrap();
    let saved = PartialWrite { stored: piece as u64, parts: first.clone(), ..write.partial() };
    drop(write);
    let write = under.store.start_pieces(&under.bucket, &name, OPTIONS, JobId(4), Some(saved)).await.unwrap();
    let mut parts = first;
    for i in 1..4 {
        let (offset, bytes) = at(i);
        parts.extend(write.put(offset as u64, chunks(bytes)).await.unwrap());
    }
    write.complete(parts, &Unfenced).await.unwrap();
    assert!(read(&under, "gone-on.bin").await == data, "the object gone on with is not the whole file");

    // Refused by the fence, then aborted: nothing at the key.
    let name = key("refused.bin");
    let write = under.store.start_pieces(&under.bucket, &name, OPTIONS, JobId(5), None).await.unwrap();
    let parts = write.put(0, chunks(data.clone())).await.unwrap();
    assert!(write.complete(parts, &Refuses).await.is_err());
    write.abort().await;
    assert!(under.store.head(&under.bucket, &name).await.unwrap().is_none(), "a refused write left an object");
}

/// A bucket that does not exist fails the write for good (no retry can help), and nothing
/// is created.
async fn a_missing_bucket_fails_for_good(under: Under) {
    let missing = bucket();
    let error = under.store.put(&missing, &key("x"), OPTIONS, stream(b"x", None), &Unfenced).await.unwrap_err();
    assert!(!error.is_transient(), "{error:?}");
    assert!(error.message.contains("does not exist"), "{}", error.message);
}

/// A resumable write records the checksum its parts are checked by (S3: CRC64/NVME); one
/// begun by an older fileflow, whose parts S3 checked by SHA-256 (no checksum recorded), is
/// not gone on with: S3 would refuse its next part.
async fn a_write_with_other_part_checks_is_not_gone_on_with(under: Under) {
    let part = under.store.resumable_part_size(0).expect("a store that resumes writes") as usize;
    let data = bytes(7, part + 1000);
    let saved = Saved::default();
    let first = split_at_parts(
        stream(&data[..part + 10], Some(JobError::transient("origin body interrupted"))),
        0,
        part as u64,
    );
    let name = key("checked.bin");
    let _ = under.store.put_resumable(&under.bucket, &name, OPTIONS, first, &Unfenced, JobId(4), None, &saved).await;
    let write = saved.last.lock().unwrap().clone().expect("the first part was reported stored");
    assert_eq!(write.checksum.as_deref(), Some("crc64nvme"));
    assert!(under.store.goes_on_with(&write));
    assert!(!under.store.goes_on_with(&PartialWrite { checksum: None, ..write.clone() }));
    under.store.discard(&under.bucket, &name, &write).await.unwrap();
}

/// The store's own links serve the stored bytes.
async fn links_serve_the_stored_bytes(under: Under) {
    let links = under.links.as_ref().expect("a store that signs its own links");
    let data = bytes(5, 70_000);
    under.store.put(&under.bucket, &key("linked.bin"), OPTIONS, stream(&data, None), &Unfenced).await.unwrap();
    let job = jobs::completed(under.bucket.as_str(), "linked.bin");
    let url = links.link(&job, chrono::Utc::now() + chrono::Duration::seconds(60), None).await.unwrap();
    let response = reqwest::Client::builder().no_proxy().build().unwrap().get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.unwrap() == data, "the link serves other bytes");
}

/// Each store runs the cases that apply to it, and only those: a case that does not apply
/// is not generated, rather than passing without checking anything.
macro_rules! conformance {
    ($store:ident: $under:ident, $($case:ident),* $(,)?) => {
        mod $store {
            $(#[tokio::test] async fn $case() {
                if let Some(under) = super::$under().await { super::$case(under).await }
            })*
        }
    };
}

// The disk makes a bucket's folder on first write and its links are fileflow's own (served
// by the API, tested end to end); Azure uploads start over instead of resuming, and are not
// taken in pieces (README).
conformance!(
    disk_store: disk,
    put_head_get,
    all_or_nothing,
    resumable_write_goes_on_after_a_cut,
    a_discarded_write_is_gone,
    pieces_in_any_order_make_the_object,
);
conformance!(
    s3_store: s3,
    put_head_get,
    all_or_nothing,
    resumable_write_goes_on_after_a_cut,
    a_discarded_write_is_gone,
    pieces_in_any_order_make_the_object,
    a_missing_bucket_fails_for_good,
    links_serve_the_stored_bytes,
    a_write_with_other_part_checks_is_not_gone_on_with,
);
conformance!(
    azure_store: azure,
    put_head_get,
    all_or_nothing,
    a_missing_bucket_fails_for_good,
    links_serve_the_stored_bytes,
);
// moto answers a part of an aborted upload with a 500 (a KeyError), where GCS says the
// upload is gone (404): the discarded-write case cannot be shown on it.
conformance!(
    gcs_store: gcs,
    put_head_get,
    all_or_nothing,
    resumable_write_goes_on_after_a_cut,
    a_missing_bucket_fails_for_good,
    links_serve_the_stored_bytes,
);
