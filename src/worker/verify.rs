//! The stream between origin and store: counts, hashes and checks bytes on their way,
//! so nothing is held in memory and a bad file is refused before it is committed.

use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use crc_fast::{CrcAlgorithm, Digest as Crc};
use futures::StreamExt;
use md5::Md5;
use sha2::digest::common::hazmat::SerializableState;
use sha2::{Digest, Sha256};

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::lifecycle::{Cause, JobError, OriginVersion, StoredObject};
use crate::storage::{ByteStream, PutOutcome};

/// A digest fileflow can compute for the record (`--digests`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DigestName {
    Sha256,
    Md5,
    Crc64nvme,
}

/// Which digests a transfer computes for its record. A digest the job declares is
/// computed whatever this says (it must be checked), and so is MD5 where it becomes the
/// object's ETag (the disk store).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DigestSet {
    pub sha256: bool,
    pub md5: bool,
    pub crc64nvme: bool,
}

impl Default for DigestSet {
    /// All of them.
    fn default() -> Self {
        Self { sha256: true, md5: true, crc64nvme: true }
    }
}

impl DigestSet {
    /// The digests `names` names.
    pub fn of(names: &[DigestName]) -> Self {
        Self {
            sha256: names.contains(&DigestName::Sha256),
            md5: names.contains(&DigestName::Md5),
            crc64nvme: names.contains(&DigestName::Crc64nvme),
        }
    }
}

/// What the stream promises to deliver.
#[derive(Debug, Clone, Default)]
pub struct Expectations {
    /// Refuse the file once it grows past this many bytes.
    pub max_size: u64,
    /// The origin's Content-Length: a shorter body is an interrupted transfer.
    pub declared_length: Option<u64>,
    pub sha256: Option<String>,
    pub md5: Option<String>,
    /// The size the caller said the content has.
    pub size: Option<u64>,
    /// The digests to compute besides the declared ones.
    pub compute: DigestSet,
}

impl Expectations {
    /// The digests this stream computes: those asked for, and those it must check.
    fn computed(&self) -> DigestSet {
        DigestSet {
            sha256: self.compute.sha256 || self.sha256.is_some(),
            md5: self.compute.md5 || self.md5.is_some(),
            crc64nvme: self.compute.crc64nvme,
        }
    }
}

/// Size and checksums of a body that was read to its end and matched its expectations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    pub size: u64,
    /// Hex; `None` when not computed (see [`DigestSet`]).
    pub sha256: Option<String>,
    pub md5: Option<String>,
    /// CRC64/NVME of the whole file, as S3 writes it (`x-amz-checksum-crc64nvme`: the
    /// big-endian value, base64); `None` only when going on from a checkpoint saved
    /// before fileflow kept it.
    pub crc64nvme: Option<String>,
}

impl Digests {
    /// What a transfer stored: the store's write of these bytes, their type, and how the
    /// origin named their version. Without an ETag of the store's, the MD5 is it.
    pub fn stored(self, put: PutOutcome, content_type: String, origin: OriginVersion) -> StoredObject {
        StoredObject {
            etag: put.etag.or_else(|| self.md5.clone()).unwrap_or_default(),
            size: self.size,
            sha256: self.sha256,
            md5: self.md5,
            crc64nvme: self.crc64nvme,
            content_type: Some(content_type),
            version: put.version,
            origin,
            not_modified: false,
        }
    }
}

/// A CRC64/NVME value as S3 shows it: its 8 bytes big-endian, base64.
pub fn crc64nvme_text(crc: u64) -> String {
    BASE64.encode(crc.to_be_bytes())
}

/// The hashes part way through a body, saved so a later attempt can go on from there.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HashState {
    /// Bytes hashed so far.
    pub size: u64,
    /// The SHA-256 and MD5 states as their crates serialize them, base64 (those computed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    md5: Option<String>,
    /// The CRC64/NVME register so far (not finalized); absent in older checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crc64nvme: Option<u64>,
}

impl HashState {
    /// Whether a stream with `expect` can go on from this state: it holds every hash the
    /// stream computes, readable.
    pub fn goes_on_with(&self, expect: &Expectations) -> bool {
        restore(self, expect.computed()).is_ok()
    }
}

/// Bodies longer than this are hashed beside the transfer (see [`Lane`]); shorter ones,
/// most of them, in the stream itself, where a hand-over to a thread would cost more than
/// the hashing.
const HASH_BESIDE_AFTER: u64 = 1 << 20;

/// Bytes a hashing thread may have waiting, at most; the body waits beyond that. The
/// chunks are the ones the store holds anyway, so this is what the hashing may lag behind.
const LANE_BACKLOG: u32 = 4 << 20;

/// One hash of a long body, computed on a thread of its own, so MD5 and SHA-256 run at
/// once, each beside the transfer, instead of one after the other in the stream between
/// the origin and the store (measured here: a 1 GiB file into the disk store moved at
/// about 340 MiB/s, the speed of the two hashes in a row). Work is done in the order
/// given, so a state asked for after some bytes is the state at exactly that point.
#[derive(Clone)]
struct Lane {
    work: mpsc::UnboundedSender<LaneWork>,
    /// Bytes that may still be handed over before the thread catches up.
    room: Arc<Semaphore>,
}

enum LaneWork {
    Bytes(Bytes),
    /// The hash's state so far, serialized.
    State(oneshot::Sender<Vec<u8>>),
    /// The digest; the lane ends.
    Finish(oneshot::Sender<Vec<u8>>),
}

impl Lane {
    fn start<H>(mut hasher: H) -> Lane
    where
        H: Digest + SerializableState + Send + 'static,
    {
        let (work, mut queued) = mpsc::unbounded_channel();
        let room = Arc::new(Semaphore::new(LANE_BACKLOG as usize));
        let freed = room.clone();
        tokio::task::spawn_blocking(move || {
            while let Some(work) = queued.blocking_recv() {
                match work {
                    LaneWork::Bytes(bytes) => {
                        hasher.update(&bytes);
                        freed.add_permits(permits(&bytes) as usize);
                    }
                    LaneWork::State(reply) => {
                        let _ = reply.send(hasher.serialize().to_vec());
                    }
                    LaneWork::Finish(reply) => {
                        let _ = reply.send(hasher.finalize().to_vec());
                        return;
                    }
                }
            }
        });
        Lane { work, room }
    }

    async fn feed(&self, bytes: Bytes) -> Result<(), JobError> {
        let room = self.room.acquire_many(permits(&bytes)).await.map_err(|_| lane_gone())?;
        room.forget();
        self.work.send(LaneWork::Bytes(bytes)).map_err(|_| lane_gone())
    }

    fn ask(&self, what: fn(oneshot::Sender<Vec<u8>>) -> LaneWork) -> oneshot::Receiver<Vec<u8>> {
        let (reply, answer) = oneshot::channel();
        // A lane that has gone drops the reply; the receiver then says so.
        let _ = self.work.send(what(reply));
        answer
    }
}

fn permits(bytes: &Bytes) -> u32 {
    u32::try_from(bytes.len()).unwrap_or(u32::MAX).min(LANE_BACKLOG)
}

/// The digest a lane asked to finish answers, hex; `None` without a lane.
async fn answered(answer: Option<oneshot::Receiver<Vec<u8>>>) -> Result<Option<String>, JobError> {
    match answer {
        Some(answer) => Ok(Some(hex::encode(answer.await.map_err(|_| lane_gone())?))),
        None => Ok(None),
    }
}

fn lane_gone() -> JobError {
    JobError::transient("a hashing thread stopped")
}

/// The hashes computed (see [`DigestSet`]); CRC64/NVME is kept beside them.
enum Hashers {
    /// In the stream.
    Here { sha256: Option<Sha256>, md5: Option<Md5> },
    /// Each on its own lane.
    Beside { sha256: Option<Lane>, md5: Option<Lane> },
}

struct Hashing {
    hashers: Hashers,
    /// Always in the stream: at several GiB/s it costs less than a hand-over.
    crc64: Option<Crc>,
    size: u64,
    digests: Option<Digests>,
}

/// A verified stream's running hashes and, once it ended well, its digests.
#[derive(Clone)]
pub struct Verifier(Arc<Mutex<Hashing>>);

/// The hashes at one point of a body, once the hashing has got there.
pub struct PendingState {
    pub size: u64,
    sha256: Option<Snapshot>,
    md5: Option<Snapshot>,
    crc64nvme: Option<u64>,
}

enum Snapshot {
    Ready(Vec<u8>),
    Later(oneshot::Receiver<Vec<u8>>),
}

impl Snapshot {
    async fn bytes(self) -> Result<Vec<u8>, JobError> {
        match self {
            Snapshot::Ready(bytes) => Ok(bytes),
            Snapshot::Later(answer) => answer.await.map_err(|_| lane_gone()),
        }
    }
}

impl PendingState {
    pub async fn ready(self) -> Result<HashState, JobError> {
        let encoded = |snapshot: Option<Snapshot>| async move {
            match snapshot {
                Some(snapshot) => snapshot.bytes().await.map(|bytes| Some(BASE64.encode(bytes))),
                None => Ok(None),
            }
        };
        let (sha256, md5) = (encoded(self.sha256).await?, encoded(self.md5).await?);
        Ok(HashState { size: self.size, sha256, md5, crc64nvme: self.crc64nvme })
    }
}

impl Verifier {
    fn lock(&self) -> std::sync::MutexGuard<'_, Hashing> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Size and checksums, once the stream has ended and matched its expectations.
    pub fn digests(&self) -> Option<Digests> {
        self.lock().digests.clone()
    }

    /// The hashes of the bytes that have gone by so far (ready once they are hashed).
    pub fn state(&self) -> PendingState {
        let h = self.lock();
        let (sha256, md5) = match &h.hashers {
            Hashers::Here { sha256, md5 } => (
                sha256.as_ref().map(|h| Snapshot::Ready(h.serialize().to_vec())),
                md5.as_ref().map(|h| Snapshot::Ready(h.serialize().to_vec())),
            ),
            Hashers::Beside { sha256, md5 } => (
                sha256.as_ref().map(|lane| Snapshot::Later(lane.ask(LaneWork::State))),
                md5.as_ref().map(|lane| Snapshot::Later(lane.ask(LaneWork::State))),
            ),
        };
        PendingState { size: h.size, sha256, md5, crc64nvme: h.crc64.as_ref().map(Crc::get_state) }
    }

    /// Count and hash `chunk`: here while the body is short, beside it once it is long.
    async fn take(&self, chunk: &Bytes, max_size: u64) -> Result<(), JobError> {
        let lanes = {
            let mut h = self.lock();
            h.size += chunk.len() as u64;
            if h.size > max_size {
                return Err(JobError::permanent(format!("file too large: more than the limit of {max_size} bytes"))
                    .because(Cause::TooLarge));
            }
            if let Some(crc) = &mut h.crc64 {
                crc.update(chunk);
            }
            let long = h.size > HASH_BESIDE_AFTER;
            match &mut h.hashers {
                Hashers::Here { sha256, md5 } if !long => {
                    if let Some(sha256) = sha256 {
                        sha256.update(chunk);
                    }
                    if let Some(md5) = md5 {
                        md5.update(chunk);
                    }
                    return Ok(());
                }
                Hashers::Here { sha256, md5 } => {
                    let (sha256, md5) = (sha256.clone().map(Lane::start), md5.clone().map(Lane::start));
                    h.hashers = Hashers::Beside { sha256: sha256.clone(), md5: md5.clone() };
                    (sha256, md5)
                }
                Hashers::Beside { sha256, md5 } => (sha256.clone(), md5.clone()),
            }
        };
        for lane in [lanes.0, lanes.1].into_iter().flatten() {
            lane.feed(chunk.clone()).await?;
        }
        Ok(())
    }

    /// The digests of everything taken, hex (those computed).
    async fn finish_hashes(&self) -> Result<(Option<String>, Option<String>), JobError> {
        let lanes = match &mut self.lock().hashers {
            Hashers::Here { sha256, md5 } => {
                return Ok((
                    sha256.as_mut().map(|h| hex::encode(h.finalize_reset())),
                    md5.as_mut().map(|h| hex::encode(h.finalize_reset())),
                ));
            }
            Hashers::Beside { sha256, md5 } => {
                (sha256.as_ref().map(|l| l.ask(LaneWork::Finish)), md5.as_ref().map(|l| l.ask(LaneWork::Finish)))
            }
        };
        Ok((answered(lanes.0).await?, answered(lanes.1).await?))
    }
}

struct State {
    body: ByteStream,
    expect: Expectations,
    hashing: Verifier,
    done: bool,
}

impl State {
    /// The end of the body: the last chance to refuse it, before the store commits.
    async fn finish(&mut self) -> Result<(), JobError> {
        let size = self.hashing.lock().size;
        if let Some(declared) = self.expect.declared_length
            && size != declared
        {
            let what = if size < declared { "origin body interrupted" } else { "origin sent more than it declared" };
            return Err(JobError::transient(format!("{what}: received {size} of {declared} declared bytes"))
                .because(Cause::Network));
        }
        if let Some(expected) = self.expect.size
            && size != expected
        {
            return Err(JobError::permanent(format!("size mismatch: expected {expected} bytes, content has {size}"))
                .because(Cause::Verification));
        }
        let (sha256, md5) = self.hashing.finish_hashes().await?;
        let crc64nvme = self.hashing.lock().crc64.as_ref().map(|crc| crc64nvme_text(crc.finalize()));
        for (name, expected, actual) in [("sha256", &self.expect.sha256, &sha256), ("md5", &self.expect.md5, &md5)] {
            let Some(expected) = expected else { continue };
            let actual = actual.as_deref().unwrap_or("nothing (not computed)");
            if expected != actual {
                return Err(JobError::permanent(format!(
                    "checksum mismatch: expected {name} {expected}, content has {actual}"
                ))
                .because(Cause::Verification));
            }
        }
        self.hashing.lock().digests = Some(Digests { size, sha256, md5, crc64nvme });
        Ok(())
    }
}

/// Wrap `body` so it is measured and verified as it streams: the whole file's body, or,
/// given the hashes of the bytes before it (`from`), the rest of it. The verifier holds
/// the digests once the stream ended without error.
pub fn verified(body: ByteStream, expect: Expectations, from: Option<&HashState>) -> (ByteStream, Verifier) {
    let wanted = expect.computed();
    let (sha256, md5, crc64, size) = match from.map(|state| restore(state, wanted)).transpose() {
        Ok(Some(restored)) => restored,
        Ok(None) => (
            wanted.sha256.then(Sha256::new),
            wanted.md5.then(Md5::new),
            wanted.crc64nvme.then(|| Crc::new(CrcAlgorithm::Crc64Nvme)),
            0,
        ),
        Err(e) => return (futures::stream::once(async move { Err(e) }).boxed(), Verifier::empty()),
    };
    let hashers = Hashers::Here { sha256, md5 };
    let hashing = Verifier(Arc::new(Mutex::new(Hashing { hashers, crc64, size, digests: None })));
    let state = State { body, expect, hashing: hashing.clone(), done: false };
    let stream = futures::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        let item = match st.body.next().await {
            Some(Ok(chunk)) => match st.hashing.take(&chunk, st.expect.max_size).await {
                Ok(()) => return Some((Ok(chunk), st)),
                Err(e) => Err(e),
            },
            Some(Err(e)) => Err(e),
            None => match st.finish().await {
                Ok(()) => return None,
                Err(e) => Err(e),
            },
        };
        st.done = true;
        Some((item, st))
    });
    (stream.boxed(), hashing)
}

impl Verifier {
    fn empty() -> Self {
        let hashers = Hashers::Here { sha256: None, md5: None };
        Self(Arc::new(Mutex::new(Hashing { hashers, crc64: None, size: 0, digests: None })))
    }
}

/// The `wanted` hashers a [`HashState`] saved (a saved state without one of them cannot
/// go on: the transfer starts over).
#[allow(clippy::type_complexity)]
fn restore(state: &HashState, wanted: DigestSet) -> Result<(Option<Sha256>, Option<Md5>, Option<Crc>, u64), JobError> {
    let broken = |what: &str| JobError::transient(format!("saved {what} hash state is unreadable; starting over"));
    // One hasher, if wanted: from its saved state, which must be there and read.
    fn one<H: SerializableState>(saved: &Option<String>, wanted: bool) -> Result<Option<H>, ()> {
        match (saved, wanted) {
            (_, false) => Ok(None),
            (None, true) => Err(()),
            (Some(saved), true) => {
                let bytes = BASE64.decode(saved).map_err(drop)?;
                let state = bytes.as_slice().try_into().map_err(drop)?;
                H::deserialize(state).map(Some).map_err(drop)
            }
        }
    }
    let sha256 = one::<Sha256>(&state.sha256, wanted.sha256).map_err(|()| broken("SHA-256"))?;
    let md5 = one::<Md5>(&state.md5, wanted.md5).map_err(|()| broken("MD5"))?;
    let crc64 = match wanted.crc64nvme {
        true => state.crc64nvme.map(|register| Crc::new_with_init_state(CrcAlgorithm::Crc64Nvme, register)),
        false => None,
    };
    Ok((sha256, md5, crc64, state.size))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use futures::TryStreamExt;

    use super::*;

    fn body(parts: &[&'static [u8]]) -> ByteStream {
        let parts: Vec<Result<Bytes, JobError>> = parts.iter().map(|p| Ok(Bytes::from_static(p))).collect();
        futures::stream::iter(parts).boxed()
    }

    fn expect() -> Expectations {
        Expectations { max_size: 1 << 20, ..Default::default() }
    }

    const HELLO_SHA256: &str = "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9";
    const HELLO_MD5: &str = "5eb63bbbe01eeed093cb22bb8f5acdc3";

    fn hello() -> Digests {
        Digests {
            size: 11,
            sha256: Some(HELLO_SHA256.into()),
            md5: Some(HELLO_MD5.into()),
            crc64nvme: Some(crc64nvme_text(crc_fast::checksum(CrcAlgorithm::Crc64Nvme, b"hello world"))),
        }
    }

    #[test]
    fn crc64nvme_is_written_as_s3_writes_it() {
        // The CRC-64/NVME check value (the CRC of "123456789"), as S3's base64.
        let check = crc_fast::checksum(CrcAlgorithm::Crc64Nvme, b"123456789");
        assert_eq!(check, 0xae8b_1486_0a79_9888);
        assert_eq!(crc64nvme_text(check), "rosUhgp5mIg=");
    }

    #[tokio::test]
    async fn passes_bytes_through_and_records_digests() {
        let (stream, slot) = verified(body(&[b"hello", b" ", b"world"]), expect(), None);
        let out: Vec<Bytes> = stream.try_collect().await.unwrap();
        assert_eq!(out.concat(), b"hello world");
        let digests = slot.digests().unwrap();
        assert_eq!(digests, hello());
    }

    #[tokio::test]
    async fn matching_checksums_pass_and_a_mismatch_is_permanent() {
        let good = Expectations { sha256: Some(HELLO_SHA256.into()), md5: Some(HELLO_MD5.into()), ..expect() };
        let (stream, _) = verified(body(&[b"hello world"]), good, None);
        assert!(stream.try_collect::<Vec<_>>().await.is_ok());

        let sized = Expectations { size: Some(11), ..expect() };
        assert!(verified(body(&[b"hello world"]), sized, None).0.try_collect::<Vec<_>>().await.is_ok());
        let missized = Expectations { size: Some(4), ..expect() };
        let err = verified(body(&[b"hello world"]), missized, None).0.try_collect::<Vec<_>>().await.unwrap_err();
        assert!(!err.is_transient() && err.message.contains("size mismatch: expected 4 bytes"), "{err}");

        let bad = Expectations { sha256: Some("0".repeat(64)), ..expect() };
        let (stream, slot) = verified(body(&[b"hello world"]), bad, None);
        let err = stream.try_collect::<Vec<_>>().await.unwrap_err();
        assert!(!err.is_transient());
        assert!(err.message.contains("checksum mismatch"), "{err}");
        assert!(slot.digests().is_none());
    }

    #[tokio::test]
    async fn only_the_digests_asked_for_or_declared_are_computed() {
        let crc_only = DigestSet { sha256: false, md5: false, crc64nvme: true };
        let (stream, verifier) =
            verified(body(&[b"hello world"]), Expectations { compute: crc_only, ..expect() }, None);
        stream.try_collect::<Vec<_>>().await.unwrap();
        assert_eq!(verifier.digests().unwrap(), Digests { sha256: None, md5: None, ..hello() });

        // A declared digest is checked (so computed) whatever the set says.
        let none = DigestSet { sha256: false, md5: false, crc64nvme: false };
        let declared = Expectations { compute: none, md5: Some(HELLO_MD5.into()), ..expect() };
        let (stream, verifier) = verified(body(&[b"hello world"]), declared, None);
        stream.try_collect::<Vec<_>>().await.unwrap();
        let expected = Digests { size: 11, sha256: None, md5: Some(HELLO_MD5.into()), crc64nvme: None };
        assert_eq!(verifier.digests().unwrap(), expected);
        let wrong = Expectations { compute: none, sha256: Some("0".repeat(64)), ..expect() };
        let err = verified(body(&[b"hello world"]), wrong, None).0.try_collect::<Vec<_>>().await.unwrap_err();
        assert!(err.message.contains("checksum mismatch"), "{err}");

        // A long body hashed beside the stream, and a checkpoint taken there, with MD5 only.
        let md5_only = Expectations { compute: DigestSet { md5: true, ..none }, ..expect_large() };
        let data = vec![7u8; 3 << 20];
        let chunks = |from: usize| {
            let parts: Vec<Result<Bytes, JobError>> =
                data[from..].chunks(64 * 1024).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
            futures::stream::iter(parts).boxed()
        };
        let (mut stream, verifier) = verified(chunks(0), md5_only.clone(), None);
        let mut pending = None;
        let mut seen = 0;
        while let Some(chunk) = stream.next().await {
            seen += chunk.unwrap().len();
            if seen == 2 << 20 {
                pending = Some(verifier.state());
            }
        }
        let whole =
            Digests { size: 3 << 20, sha256: None, md5: Some(hex::encode(Md5::digest(&data))), crc64nvme: None };
        assert_eq!(verifier.digests().unwrap(), whole);
        let saved = pending.unwrap().ready().await.unwrap();
        assert!(saved.goes_on_with(&md5_only) && !saved.goes_on_with(&expect_large()));
        let (rest, resumed) = verified(chunks(saved.size as usize), md5_only, Some(&saved));
        rest.try_collect::<Vec<_>>().await.unwrap();
        assert_eq!(resumed.digests().unwrap(), whole);
        // A state saved without SHA-256 cannot go on where SHA-256 is now wanted.
        let err = verified(chunks(saved.size as usize), expect_large(), Some(&saved))
            .0
            .try_collect::<Vec<_>>()
            .await
            .unwrap_err();
        assert!(err.is_transient() && err.message.contains("starting over"), "{err}");
    }

    #[tokio::test]
    async fn stops_as_soon_as_the_size_limit_is_passed() {
        let small = Expectations { max_size: 8, ..expect() };
        let (stream, _) = verified(body(&[b"hello", b" world", b"never read"]), small, None);
        let items: Vec<_> = stream.collect().await;
        assert_eq!(items.len(), 2);
        let err = items[1].clone().unwrap_err();
        assert!(!err.is_transient() && err.message.contains("too large"), "{err}");
    }

    #[tokio::test]
    async fn a_body_shorter_than_declared_is_transient() {
        let declared = Expectations { declared_length: Some(20), ..expect() };
        let (stream, slot) = verified(body(&[b"hello world"]), declared, None);
        let err = stream.try_collect::<Vec<_>>().await.unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(slot.digests().is_none());
    }

    #[tokio::test]
    async fn a_saved_state_goes_on_where_the_first_part_ended() {
        // A first attempt that got 6 bytes and then broke off.
        let broken = body(&[b"hello", b" "]).chain(futures::stream::once(async { Err(JobError::transient("cut")) }));
        let (first, verifier) = verified(broken.boxed(), expect(), None);
        assert!(first.try_collect::<Vec<_>>().await.is_err());
        let saved = verifier.state().ready().await.unwrap();
        assert_eq!(saved.size, 6);
        let saved: HashState = serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();

        let whole = Expectations { declared_length: Some(11), sha256: Some(HELLO_SHA256.into()), ..expect() };
        let (rest, verifier) = verified(body(&[b"world"]), whole, Some(&saved));
        assert_eq!(rest.try_collect::<Vec<_>>().await.unwrap().concat(), b"world");
        assert_eq!(verifier.digests().unwrap(), hello());
        // A checkpoint saved before the CRC was kept still completes, without it.
        let older = HashState { crc64nvme: None, ..saved.clone() };
        let (rest, verifier) = verified(body(&[b"world"]), expect(), Some(&older));
        rest.try_collect::<Vec<_>>().await.unwrap();
        assert_eq!(verifier.digests().unwrap(), Digests { crc64nvme: None, ..hello() });

        let garbled = HashState { sha256: Some("AAAA".into()), ..saved };
        let err = verified(body(&[b"world"]), expect(), Some(&garbled)).0.try_collect::<Vec<_>>().await.unwrap_err();
        assert!(err.is_transient() && err.message.contains("unreadable"), "{err}");
    }

    #[tokio::test]
    async fn a_long_body_is_hashed_beside_the_stream_with_states_at_exact_points() {
        let data: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let chunks = |from: usize| {
            let parts: Vec<Result<Bytes, JobError>> =
                data[from..].chunks(64 * 1024).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
            futures::stream::iter(parts).boxed()
        };
        let whole = Digests {
            size: data.len() as u64,
            sha256: Some(hex::encode(Sha256::digest(&data))),
            md5: Some(hex::encode(Md5::digest(&data))),
            crc64nvme: Some(crc64nvme_text(crc_fast::checksum(CrcAlgorithm::Crc64Nvme, &data))),
        };
        let (mut stream, verifier) = verified(chunks(0), expect_large(), None);
        let (mut seen, mut states) = (0, Vec::new());
        while let Some(chunk) = stream.next().await {
            seen += chunk.unwrap().len();
            if seen % (1 << 20) == 0 {
                // Past the first MiB the hashes run on their own threads.
                states.push(verifier.state());
            }
        }
        assert_eq!(verifier.digests().unwrap(), whole);
        assert_eq!(states.len(), 3);
        for pending in states {
            let saved = pending.ready().await.unwrap();
            let (rest, resumed) = verified(chunks(saved.size as usize), expect_large(), Some(&saved));
            rest.try_collect::<Vec<_>>().await.unwrap();
            assert_eq!(resumed.digests().unwrap(), whole, "resumed from {}", saved.size);
        }
    }

    fn expect_large() -> Expectations {
        Expectations { max_size: 1 << 30, ..Default::default() }
    }
}
