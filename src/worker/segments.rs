//! Segmented transfers: a large file from an origin that serves byte ranges of a version
//! it names is fetched as several ranges at once, so an origin that caps each connection
//! is not the limit. The file is cut into pieces (the store's [`crate::storage::ObjectStore::piece_size`]);
//! `segments` fetchers each take the next piece not yet taken, ask for exactly its range
//! with `If-Range`, check the answer proves it is that range of that version
//! ([`RangeFrom::continues`]), and put it in its place in the store (a multipart part by
//! index, a positioned write into the staging file). Pieces are hashed in file order as
//! they complete: a piece is held in memory from its fetch until the hashing has read it,
//! and at most `segments + 2` pieces are held at once (a fetcher waits for room before it
//! takes a piece), which bounds memory. Each piece failing for a passing reason is fetched
//! again alone, a few times. Once the pieces up to a point are stored and hashed, a
//! checkpoint is saved, as for a resumable write, so a cut transfer goes on after them.
//! An answer that is not the range asked of the same file stops the attempt and
//! everything stored is removed: the caller fetches the whole file in one stream instead.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::Worker;
use super::hosts::HostPermit;
use super::memory::Reserved;
use super::progress::{Progress, until_cancelled};
use super::resume::{Checkpoint, Recorder};
use super::verify::{Expectations, verified};
use crate::fetch::{RangeAnswer, RangeFrom, at_least};
use crate::lifecycle::{Cause, Job, JobError, OriginVersion, StoredObject};
use crate::storage::{ByteStream, Fence, PieceWrite, WriteOptions, WriteProgress as _};

/// Times a piece is fetched again after a passing failure (a cut connection, a stall)
/// before the attempt fails.
const PIECE_RETRIES: u32 = 3;
/// The first pause before a piece is fetched again; it doubles each time.
const PIECE_RETRY_DELAY: Duration = Duration::from_millis(200);
/// Pieces held beyond one per fetcher, so a fetcher that finished its piece can go on
/// while the one before it is still coming.
const SPARE_PIECES: usize = 2;

/// How the rest of a file is cut into pieces, one range request each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Plan {
    /// Where the first piece starts (after the bytes stored by earlier attempts).
    pub start: u64,
    pub total: u64,
    pub piece: u64,
}

impl Plan {
    pub fn count(&self) -> usize {
        usize::try_from(self.total.saturating_sub(self.start).div_ceil(self.piece)).unwrap_or(usize::MAX)
    }

    /// Piece `index`'s offset and length.
    pub fn piece(&self, index: usize) -> (u64, u64) {
        let offset = self.start + index as u64 * self.piece;
        (offset, self.piece.min(self.total - offset))
    }
}

/// Why a segmented attempt stopped.
pub(super) enum SegmentFailure {
    /// An answer did not prove it was the range asked of the same file; nothing of the
    /// attempt is kept. The file can still be fetched whole.
    Unproven(String),
    Failed(JobError),
}

impl From<JobError> for SegmentFailure {
    fn from(e: JobError) -> Self {
        Self::Failed(e)
    }
}

/// What a segmented transfer starts from: the first answer, already under way.
pub(super) struct Segmenting<'a> {
    pub job: &'a Job,
    pub owner: &'a str,
    pub headers: &'a [(String, String)],
    pub fence: &'a dyn Fence,
    pub cancel: &'a CancellationToken,
    pub progress: &'a Progress,
    pub checkpointed: &'a AtomicBool,
    /// Fetchers at once (the extra host places are the caller's to hold).
    pub segments: usize,
    pub validator: String,
    pub total: u64,
    pub content_type: String,
    pub expect: Expectations,
    pub options: WriteOptions<'a>,
    /// The checkpoint the first answer continues, if it does.
    pub resumed: Option<Checkpoint>,
}

/// A piece fetched and stored, on its way to the hashing.
struct Done {
    index: usize,
    chunks: Vec<Bytes>,
    parts: Vec<String>,
    /// Its room among the pieces held, given back once it is hashed.
    room: OwnedSemaphorePermit,
}

/// What the fetchers share.
struct Shared<'a> {
    run: &'a Segmenting<'a>,
    writer: &'a dyn PieceWrite,
    plan: Plan,
    next: AtomicUsize,
    room: Arc<Semaphore>,
    first: Mutex<Option<ByteStream>>,
    done: mpsc::UnboundedSender<Done>,
}

impl Worker {
    /// Whether the file of `total` bytes the first answer announces (its version named,
    /// from `start` on) is fetched in ranges, and by how many fetchers at most: the origin
    /// serves ranges, the rest of the file is over the threshold, and the store takes pieces.
    pub(super) fn segments_for(&self, accepts_ranges: bool, total: u64, start: u64) -> Option<usize> {
        let piece = self.store.piece_size(total)?;
        let remaining = total.saturating_sub(start);
        let useful = usize::try_from(remaining.div_ceil(piece)).unwrap_or(usize::MAX);
        let wanted = self.settings.segments.min(useful);
        (accepts_ranges && remaining > self.settings.segment_threshold && wanted > 1).then_some(wanted)
    }

    /// Places among `host`'s transfers and memory for up to `wanted - 1` ranges besides
    /// the first, as many as both have free now (none when the store takes no pieces).
    /// `reserved` is what the transfer of a file of `total` bytes holds already.
    pub(super) fn more_ranges(
        &self,
        host: &str,
        wanted: usize,
        total: u64,
        reserved: u64,
    ) -> (Vec<HostPermit>, Option<Reserved>) {
        let Some(piece) = self.store.piece_size(total) else { return (Vec::new(), None) };
        let mut places = self.hosts.more(host, wanted.saturating_sub(1));
        while !places.is_empty() {
            let pieces = (1 + places.len() + SPARE_PIECES) as u64;
            if let Some(held) = self.memory.try_reserve((pieces * piece).saturating_sub(reserved)) {
                return (places, Some(held));
            }
            if let Some(place) = places.pop() {
                place.unused();
            }
        }
        (places, None)
    }

    /// Fetch and store the file in pieces (see the module's documentation).
    /// `first` is the first answer's body (counted, paced and cancellable), from where the
    /// pieces start.
    pub(super) async fn segmented(
        &self,
        run: Segmenting<'_>,
        first: ByteStream,
    ) -> Result<StoredObject, SegmentFailure> {
        let job = run.job;
        let resumed = run.resumed.is_some();
        let writer = match self
            .store
            .start_pieces(
                &job.bucket_name,
                &job.object_name,
                run.options,
                job.id,
                run.resumed.as_ref().map(|c| c.write.clone()),
            )
            .await
        {
            Ok(writer) => writer,
            Err(e) => {
                if resumed {
                    self.forget_checkpoint(job, true).await;
                }
                return Err(e.or_because(Cause::Store).into());
            }
        };
        let base = writer.partial();
        let piece = self.store.piece_size(run.total).expect("a store that takes pieces has a piece size");
        let plan = Plan { start: base.stored, total: run.total, piece };
        let checkpointed = AtomicBool::new(resumed);
        let outcome = self.pieces(&run, first, &*writer, plan, &checkpointed).await;
        match &outcome {
            Ok(_) => {}
            Err(SegmentFailure::Unproven(why)) => {
                tracing::warn!(job_id = %job.id, reason = %why, "origin's range answer is not the range asked of the same file; what was stored is removed");
                writer.abort().await;
                if checkpointed.load(Ordering::Relaxed) {
                    self.forget_checkpoint(job, true).await;
                }
            }
            // Kept for the next attempt when a checkpoint names it (the caller forgets it
            // when no attempt follows).
            Err(SegmentFailure::Failed(_)) if checkpointed.load(Ordering::Relaxed) => {}
            Err(SegmentFailure::Failed(_)) => writer.abort().await,
        }
        outcome
    }

    /// Fetch every piece of `plan` with `run.segments` fetchers, hash them in order,
    /// checkpoint, and complete the write.
    async fn pieces(
        &self,
        run: &Segmenting<'_>,
        first: ByteStream,
        writer: &dyn PieceWrite,
        plan: Plan,
        checkpointed: &AtomicBool,
    ) -> Result<StoredObject, SegmentFailure> {
        let job = run.job;
        let base = writer.partial();
        // Stores that cannot go on with a write later (Azure) save no checkpoints.
        let resumable = self.store.resumable_part_size(run.total).is_some();
        let (done, arrived) = mpsc::unbounded_channel();
        let shared = Shared {
            run,
            writer,
            plan,
            next: AtomicUsize::new(0),
            room: Arc::new(Semaphore::new(run.segments + SPARE_PIECES)),
            // The first answer's body is the first piece's, already on its way.
            first: Mutex::new(Some(first)),
            done,
        };
        let parts = Arc::new(Mutex::new(base.parts.clone()));
        let ordered = in_order(arrived, plan, parts.clone());
        let (mut hashed, verifier) = verified(ordered, run.expect.clone(), run.resumed.as_ref().map(|c| &c.hashes));
        let recorder = Recorder {
            repo: &*self.repo,
            id: job.id,
            owner: run.owner,
            validator: run.validator.clone(),
            total: Some(plan.total),
            content_type: run.content_type.clone(),
            verifier: verifier.clone(),
            taken: Default::default(),
            gone: Default::default(),
        };
        let fetchers = futures::future::try_join_all((0..run.segments).map(|_| self.fetch_pieces(&shared)));
        let hashing = async {
            // Checkpoints at the store's part boundaries, as a resumable write saves them.
            let mut offset = plan.start;
            let mut index = 0;
            let mut saved = plan.start;
            while let Some(chunk) = hashed.next().await {
                offset += chunk?.len() as u64;
                let (start, len) = plan.piece(index);
                if offset < start + len {
                    continue;
                }
                index += 1;
                let boundary = offset / base.part_size != saved / base.part_size;
                if !resumable || offset == plan.total || !boundary {
                    continue;
                }
                writer.sync().await?;
                recorder.part_taken(offset);
                let parts = parts.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let write = crate::storage::PartialWrite { stored: offset, parts, ..base.clone() };
                recorder.stored(&write).await?;
                // From now on a checkpoint names the write: a failure keeps it.
                run.checkpointed.store(true, Ordering::Relaxed);
                checkpointed.store(true, Ordering::Relaxed);
                saved = offset;
            }
            Ok::<_, JobError>(())
        };
        let ((), ()) = tokio::try_join!(async { fetchers.await.map(drop) }, async {
            hashing.await.map_err(SegmentFailure::Failed)
        })?;
        let digests = verifier.digests().ok_or_else(|| JobError::transient("the hashing ended before the file"))?;
        let parts = parts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let put = writer.complete(parts, run.fence).await.map_err(|e| e.or_because(Cause::Store))?;
        tracing::info!(job_id = %job.id, segments = run.segments, pieces = plan.count(), "file fetched in ranges");
        // The caller knows the origin's answer, and sets its version.
        Ok(digests.stored(put, run.content_type.clone(), OriginVersion::default()))
    }

    /// One fetcher: take the next piece while there are some, fetch it, store it, pass it on.
    async fn fetch_pieces(&self, shared: &Shared<'_>) -> Result<(), SegmentFailure> {
        loop {
            // Room first, then the piece: every piece taken has room, so the next one to
            // be hashed always comes.
            let room = shared.room.clone().acquire_owned().await.expect("the semaphore is never closed");
            let index = shared.next.fetch_add(1, Ordering::Relaxed);
            if index >= shared.plan.count() {
                return Ok(());
            }
            let (offset, _) = shared.plan.piece(index);
            let chunks = self.fetch_piece(shared, index).await?;
            let parts = shared.writer.put(offset, chunks.clone()).await.map_err(|e| e.or_because(Cause::Store))?;
            // The hashing side has stopped only when the attempt is over.
            let _ = shared.done.send(Done { index, chunks, parts, room });
        }
    }

    /// Piece `index`'s bytes, fetched again alone after a passing failure.
    async fn fetch_piece(&self, shared: &Shared<'_>, index: usize) -> Result<Vec<Bytes>, SegmentFailure> {
        let run = shared.run;
        let (offset, len) = shared.plan.piece(index);
        let first = shared.first.lock().unwrap_or_else(|p| p.into_inner()).take().filter(|_| index == 0);
        let mut body = first;
        let mut retries = 0;
        loop {
            let whole = body.is_some();
            let body = match body.take() {
                Some(body) => body,
                None => {
                    let range = RangeFrom {
                        offset,
                        end: Some(offset + len - 1),
                        validator: run.validator.clone(),
                        total: run.total,
                    };
                    let answer = tokio::select! {
                        answer = self.fetcher.fetch_range(run.job.file_url.as_url(), run.headers, &range) => answer,
                        () = run.cancel.cancelled() => return Err(JobError::cancelled().into()),
                    };
                    match answer {
                        Ok(RangeAnswer::Proven(fetched)) => run.progress.count(until_cancelled(
                            at_least(self.hosts.paced(run.job.file_url.as_url(), fetched.body), self.settings.min_rate),
                            run.cancel.clone(),
                        )),
                        Ok(RangeAnswer::Unproven(why)) => return Err(SegmentFailure::Unproven(why)),
                        Err(e) => {
                            retries = self.again(run, index, retries, e).await?;
                            continue;
                        }
                    }
                }
            };
            match read_piece(body, len, whole, run.progress).await {
                Ok(chunks) => return Ok(chunks),
                Err(ReadFailure::TooLong) => {
                    return Err(SegmentFailure::Unproven(format!(
                        "the origin sent more than the {len} bytes of the range from {offset}"
                    )));
                }
                Err(ReadFailure::Cut(e, got)) => {
                    run.progress.take_back(got);
                    retries = self.again(run, index, retries, e).await?;
                }
            }
        }
    }

    /// After piece `index` failed with `e`: the retries so far plus this one, after a pause,
    /// when it may be fetched again; else the attempt's error.
    async fn again(
        &self,
        run: &Segmenting<'_>,
        index: usize,
        retries: u32,
        e: JobError,
    ) -> Result<u32, SegmentFailure> {
        // A host asking to slow down, a cancel, a permanent error: the whole attempt's business.
        if !e.is_transient() || e.cause == Cause::Throttled || retries >= PIECE_RETRIES {
            return Err(e.into());
        }
        tracing::info!(job_id = %run.job.id, piece = index, error = %e, "a range failed; fetching it again");
        tokio::select! {
            () = tokio::time::sleep(PIECE_RETRY_DELAY * 2u32.pow(retries)) => Ok(retries + 1),
            () = run.cancel.cancelled() => Err(JobError::cancelled().into()),
        }
    }
}

enum ReadFailure {
    /// The body ended or broke before the piece was whole; so many bytes had come.
    Cut(JobError, u64),
    /// A range answer went on past its range.
    TooLong,
}

/// Read a piece of `len` bytes from `body`; `whole`: the body goes on after the piece
/// (the first answer, for the whole file or its rest), which is then dropped.
async fn read_piece(
    mut body: ByteStream,
    len: u64,
    whole: bool,
    progress: &Progress,
) -> Result<Vec<Bytes>, ReadFailure> {
    let mut chunks = Vec::new();
    let mut got = 0u64;
    while got < len {
        match body.next().await {
            Some(Ok(mut chunk)) => {
                let wanted = len - got;
                if chunk.len() as u64 > wanted {
                    if !whole {
                        return Err(ReadFailure::TooLong);
                    }
                    // Counted as it came; the rest of it is another piece's.
                    progress.take_back(chunk.len() as u64 - wanted);
                    chunk.truncate(wanted as usize);
                }
                got += chunk.len() as u64;
                chunks.push(chunk);
            }
            Some(Err(e)) => return Err(ReadFailure::Cut(e, got)),
            None => {
                let e =
                    JobError::transient(format!("origin body interrupted: received {got} of the range's {len} bytes"))
                        .because(Cause::Network);
                return Err(ReadFailure::Cut(e, got));
            }
        }
    }
    if !whole
        && let Some(Ok(extra)) = body.next().await
        && !extra.is_empty()
    {
        return Err(ReadFailure::TooLong);
    }
    Ok(chunks)
}

/// The pieces as they arrive, put back in file order as one stream (for the hashing);
/// each piece's parts are added to `parts` as it begins, and its room given back once
/// the next one begins.
fn in_order(arrived: mpsc::UnboundedReceiver<Done>, plan: Plan, parts: Arc<Mutex<Vec<String>>>) -> ByteStream {
    struct State {
        arrived: mpsc::UnboundedReceiver<Done>,
        waiting: BTreeMap<usize, Done>,
        next: usize,
        current: std::vec::IntoIter<Bytes>,
        _room: Option<OwnedSemaphorePermit>,
    }
    let state = State { arrived, waiting: BTreeMap::new(), next: 0, current: Vec::new().into_iter(), _room: None };
    futures::stream::unfold(state, move |mut st| {
        let parts = parts.clone();
        async move {
            loop {
                if let Some(chunk) = st.current.next() {
                    return Some((Ok(chunk), st));
                }
                st._room = None;
                if st.next >= plan.count() {
                    return None;
                }
                if let Some(done) = st.waiting.remove(&st.next) {
                    parts.lock().unwrap_or_else(|p| p.into_inner()).extend(done.parts);
                    st.current = done.chunks.into_iter();
                    st._room = Some(done.room);
                    st.next += 1;
                    continue;
                }
                match st.arrived.recv().await {
                    Some(done) => {
                        st.waiting.insert(done.index, done);
                    }
                    // The fetchers stopped; the attempt ends with their error.
                    None => return Some((Err(JobError::transient("the range fetchers stopped")), st)),
                }
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_cuts_the_rest_of_the_file_into_pieces() {
        let plan = Plan { start: 0, total: 25, piece: 10 };
        assert_eq!(plan.count(), 3);
        assert_eq!((0..3).map(|i| plan.piece(i)).collect::<Vec<_>>(), [(0, 10), (10, 10), (20, 5)]);
        let resumed = Plan { start: 20, total: 40, piece: 10 };
        assert_eq!(resumed.count(), 2);
        assert_eq!(resumed.piece(1), (30, 10));
        assert_eq!(Plan { start: 40, total: 40, piece: 10 }.count(), 0);
    }

    #[tokio::test]
    async fn pieces_are_put_back_in_order_and_their_room_given_back() {
        let plan = Plan { start: 0, total: 30, piece: 10 };
        let room = Arc::new(Semaphore::new(3));
        let (send, arrived) = mpsc::unbounded_channel();
        for index in [2, 0, 1] {
            let permit = room.clone().acquire_owned().await.unwrap();
            let chunks = vec![Bytes::from(vec![index as u8; 10])];
            send.send(Done { index, chunks, parts: vec![format!("p{index}")], room: permit }).unwrap();
        }
        let parts = Arc::new(Mutex::new(Vec::new()));
        let bytes: Vec<u8> = in_order(arrived, plan, parts.clone()).map(|c| c.unwrap().to_vec()).concat().await;
        assert_eq!(bytes, [[0u8; 10], [1; 10], [2; 10]].concat());
        assert_eq!(*parts.lock().unwrap(), ["p0", "p1", "p2"]);
        assert_eq!(room.available_permits(), 3);
    }
}
