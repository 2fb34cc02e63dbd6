//! The batches' background work, in every API process: reading manifests into jobs (a
//! batch at a time per reader, under a lease, so a batch whose process died is taken up
//! again where its last committed chunk ended), and closing ended batches (writing their
//! report).

use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::manifest::{Format, Line, Lines, csv_header, reason, row_item};
use super::report::write_report;
use super::request::{BatchRequest, ManifestSource};
use crate::auth::Caller;
use crate::lifecycle::{BatchRow, NewJob};
use crate::metadata::{Batch, EndNotice, InvalidRow};

use crate::http::extract::JsonObject;
use crate::http::state::AppState;
use crate::http::uploads::parse_new_job;

/// How often the runner looks for batches to read or close.
const POLL: Duration = Duration::from_millis(200);
/// How long a reader holds a batch without a word (each chunk it records renews it): a
/// batch whose process died is taken up again this long after its last chunk.
const READ_LEASE: Duration = Duration::from_secs(30);
/// Rows recorded per transaction, at most.
const CHUNK_ROWS: usize = 2000;
/// How long rows wait to be recorded, at most.
const CHUNK_WAIT: Duration = Duration::from_millis(500);
/// Manifests read at once by one process.
const READERS: usize = 2;
/// How often a paused reader looks whether its batch was resumed.
const PAUSED_POLL: Duration = Duration::from_millis(500);

/// Read manifests and close ended batches until `stop`.
pub async fn run(state: AppState, stop: CancellationToken) {
    let reader = format!("reader-{}-{:08x}", std::process::id(), rand::random::<u32>());
    let mut readers = JoinSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(POLL) => {}
        }
        while readers.try_join_next().is_some() {}
        // Cancelling a large batch's jobs takes a while; a stop does not wait for it (each
        // chunk is its own transaction, and the next runner goes on with the rest).
        let ending = tokio::select! {
            () = stop.cancelled() => break,
            ending = state.bulk.ending(Utc::now()) => ending,
        };
        match ending {
            Ok(ended) => {
                for batch in ended {
                    close(&state, &batch).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot look for ended batches; will try again"),
        }
        while readers.len() < READERS {
            match state.bulk.take_reading(&reader, READ_LEASE, Utc::now()).await {
                Ok(Some(batch)) => {
                    let (state, reader, stop) = (state.clone(), reader.clone(), stop.clone());
                    readers.spawn(async move {
                        tokio::select! {
                            () = stop.cancelled() => {}
                            () = read(&state, &reader, batch) => {}
                        }
                    });
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot look for batches to read; will try again");
                    break;
                }
            }
        }
    }
    // Each reader stopped between two recorded chunks: what it read after the last one is
    // read again by whoever takes the batch up.
    readers.shutdown().await;
    match state.bulk.release_reading(&reader).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(batches = n, "batch reading handed back for the next start"),
        Err(e) => tracing::warn!(error = %e, "cannot hand batch reading back; it is taken up when its lease lapses"),
    }
}

/// Write an ended batch's report (if it asked for one) and close it, enqueueing its
/// `batch.completed` or `batch.cancelled` webhook (if it has a `notify_url`) in the same
/// transaction.
async fn close(state: &AppState, batch: &Batch) {
    let request = BatchRequest::from_stored(&batch.request);
    let error = match &request {
        Ok(request) => match &request.report {
            Some(location) => write_report(state, batch, location).await.err(),
            None => None,
        },
        Err(e) => Some(e.clone()),
    };
    if let Some(error) = &error {
        tracing::warn!(batch_id = batch.id, error, "batch report not written");
    }
    let notice = request.ok().and_then(|r| r.defaults.notify_url).map(|url| EndNotice {
        url,
        // The body shows the batch as `GET /api/v1/batches/{id}` does once it has ended.
        render: Box::new(|closed: &Batch| {
            serde_json::to_string(&super::view::view(closed.clone())).expect("a batch's view serializes")
        }),
    });
    match state.bulk.close(batch.id, error.as_deref(), notice, Utc::now()).await {
        Ok(true) => tracing::info!(batch_id = batch.id, state = %batch.state, total = batch.total, "batch ended"),
        Ok(false) => tracing::debug!(batch_id = batch.id, "batch closed by another process"),
        Err(e) => tracing::warn!(batch_id = batch.id, error = %e, "cannot close the batch; will try again"),
    }
}

/// Read `batch`'s manifest from where it stands into jobs, then mark it read.
async fn read(state: &AppState, reader: &str, batch: Batch) {
    let id = batch.id;
    let error = match read_rows(state, reader, &batch).await {
        Ok(Some(())) => None,
        // The lease went to another reader, or the batch was cancelled: nothing to mark.
        Ok(None) => return,
        Err(error) => {
            tracing::warn!(batch_id = id, error, "reading the batch's manifest stopped");
            Some(error)
        }
    };
    match state.bulk.finish_reading(id, reader, error.as_deref(), Utc::now()).await {
        Ok(_) => tracing::info!(batch_id = id, "batch manifest read"),
        Err(e) => tracing::warn!(batch_id = id, error = %e, "cannot mark the batch read; another reader will"),
    }
}

/// Why reading stopped (`Err`), or `Ok(None)` when this reader should let go.
async fn read_rows(state: &AppState, reader: &str, batch: &Batch) -> Result<Option<()>, String> {
    let request = BatchRequest::from_stored(&batch.request)?;
    let caller = match &batch.owner {
        None => Caller::Open,
        Some(owner) => match state.gate.caller_for_key(owner).await.map_err(|e| e.to_string())? {
            Some(caller) => caller,
            None => return Err("the API key that created the batch was revoked".into()),
        },
    };
    let (mut lines, hint) = open(state, &request.source).await?;
    let mut format = request.format.or(hint);
    let mut header: Vec<String> = Vec::new();
    let mut chunk = Chunk::default();
    let mut row = 0u64;
    let mut first = true;
    while let Some(line) = lines.next().await.map_err(|e| format!("reading the manifest: {e}"))? {
        let text = match line {
            Line::Text(bytes) => match String::from_utf8(bytes) {
                Ok(text) => Ok(text),
                Err(_) => Err("the row is not UTF-8".to_owned()),
            },
            Line::TooLong => Err(format!("the row is longer than {} bytes", super::manifest::MAX_LINE)),
        };
        if first {
            first = false;
            let first_line = text.clone().map_err(|e| format!("the first line: {e}"))?;
            let chosen = *format.get_or_insert_with(|| Format::sniff(first_line.as_bytes()));
            match chosen {
                Format::Csv => {
                    header = csv_header(&first_line)?;
                    continue;
                }
                Format::Tsv if first_line.trim() == crate::http::batch::TSV_HEADER => continue,
                Format::Tsv => return Err("a URL list starts with a TsvHttpData-1.0 line".into()),
                Format::Jsonl => {}
            }
        }
        if matches!(&text, Ok(t) if t.trim().is_empty()) {
            continue;
        }
        row += 1;
        if row <= batch.rows_read {
            continue; // Recorded before this reader took the batch up.
        }
        let format = format.expect("chosen at the first line");
        let item = text.and_then(|text| row_item(format, &header, &text, &request.defaults));
        match item {
            Ok(item) => {
                let file_url = item.get("file_url").and_then(|v| v.as_str()).map(str::to_owned);
                match parse_new_job(&JsonObject(item), state, &caller) {
                    Ok(job) => chunk.jobs.push(NewJob {
                        traceparent: request.traceparent.clone(),
                        batch: Some(BatchRow { batch: batch.id, row }),
                        ..job
                    }),
                    Err(e) => chunk.invalid.push(InvalidRow { row, file_url, reason: reason(&e) }),
                }
            }
            Err(why) => chunk.invalid.push(InvalidRow { row, file_url: None, reason: why }),
        }
        if chunk.is_due() && !flush(state, reader, batch.id, row, &mut chunk).await? {
            return Ok(None);
        }
    }
    if !flush(state, reader, batch.id, row.max(batch.rows_read), &mut chunk).await? {
        return Ok(None);
    }
    Ok(Some(()))
}

/// Rows read and not recorded yet.
struct Chunk {
    jobs: Vec<NewJob>,
    invalid: Vec<InvalidRow>,
    since: Instant,
}

impl Default for Chunk {
    fn default() -> Self {
        Self { jobs: Vec::new(), invalid: Vec::new(), since: Instant::now() }
    }
}

impl Chunk {
    fn is_due(&self) -> bool {
        self.jobs.len() + self.invalid.len() >= CHUNK_ROWS || self.since.elapsed() >= CHUNK_WAIT
    }
}

/// Record the chunk (rows up to `rows_read`); `false` when this reader should let go (its
/// lease was lost, or the batch was cancelled). Waits here while the batch is paused.
async fn flush(state: &AppState, reader: &str, id: i64, rows_read: u64, chunk: &mut Chunk) -> Result<bool, String> {
    let taken = std::mem::take(chunk);
    let now = state
        .bulk
        .append_rows(id, reader, rows_read, &taken.jobs, &taken.invalid, READ_LEASE, Utc::now())
        .await
        .map_err(|e| format!("recording rows: {e}"))?;
    let Some(mut now) = now else { return Ok(false) };
    state.metrics.accepted.inc_by(taken.jobs.len() as u64);
    while now.paused {
        tokio::time::sleep(PAUSED_POLL).await;
        // An empty chunk renews the lease and says whether the batch is still paused.
        match state.bulk.append_rows(id, reader, rows_read, &[], &[], READ_LEASE, Utc::now()).await {
            Ok(Some(batch)) => now = batch,
            Ok(None) => return Ok(false),
            Err(e) => return Err(format!("recording rows: {e}")),
        }
    }
    Ok(true)
}

/// Open the manifest: its lines, and the format its content type or name names.
async fn open(state: &AppState, source: &ManifestSource) -> Result<(Lines, Option<Format>), String> {
    match source {
        ManifestSource::Url(url) => {
            let url = url::Url::parse(url).map_err(|e| format!("manifest_url: {e}"))?;
            let mut tries = 0;
            let fetched = loop {
                match state.fetcher.fetch(&url, &[], None).await {
                    Ok(fetched) => break fetched,
                    Err(e) if e.is_transient() && tries < 3 => {
                        tries += 1;
                        tracing::info!(error = %e, "fetching a manifest failed; trying again");
                        tokio::time::sleep(Duration::from_secs(1 << tries)).await;
                    }
                    Err(e) => return Err(format!("fetching the manifest: {e}")),
                }
            };
            let hint = fetched
                .content_type
                .as_deref()
                .and_then(Format::from_content_type)
                .or_else(|| Format::from_name(url.path()));
            let body: BoxStream<'static, std::io::Result<bytes::Bytes>> =
                fetched.body.map(|chunk| chunk.map_err(std::io::Error::other)).boxed();
            Ok((Lines::new(body), hint))
        }
        ManifestSource::Stored { bucket_name, object_name } => {
            let bucket = crate::domain::BucketName::parse(bucket_name).map_err(|e| format!("manifest: {e}"))?;
            let key = crate::domain::ObjectKey::parse(object_name).map_err(|e| format!("manifest: {e}"))?;
            let stored = state.store.get(&bucket, &key).await.map_err(|e| format!("reading the manifest: {e}"))?;
            Ok((Lines::new(stored.body), Format::from_name(object_name)))
        }
    }
}
