//! A batch as the API shows it: its view (`GET /api/v1/batches/{id}`, the batch's event
//! stream, the `batch.*` webhooks), with its pace.

use chrono::Utc;
use serde::Serialize;

use super::manifest::Format;
use super::request::{BatchRequest, Location, ManifestSource};
use crate::metadata::{Batch, BatchCounts};
use crate::wire::timestamp;

/// A batch as the API shows it.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct BatchView {
    id: String,
    /// `reading` (the manifest is being read; its jobs already run), `running`, `paused`,
    /// `completed` or `cancelled`.
    pub(super) status: &'static str,
    /// Manifest rows read so far: jobs plus invalid rows.
    total: u64,
    counts: BatchCounts,
    /// Bytes of the completed jobs.
    bytes_done: u64,
    /// Jobs ended per second, over the batch's life so far (to its end, once ended).
    rate: f64,
    /// Seconds until the jobs read so far have ended, at `rate`; null once the batch has
    /// ended, while it is paused, or before a job has ended.
    eta_seconds: Option<u64>,
    /// Why reading the manifest stopped early, if it did (the rows read before stay).
    read_error: Option<String>,
    manifest_url: Option<String>,
    manifest: Option<Location>,
    format: Option<Format>,
    report: Option<ReportView>,
    created_at: String,
    updated_at: String,
    /// When every job had ended and the report was written.
    ended_at: Option<String>,
}

/// Where a batch's report goes, and whether it is there.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ReportView {
    bucket_name: String,
    object_name: String,
    /// Whether the report has been written.
    written: bool,
    /// Why it could not be written, if it could not.
    error: Option<String>,
    /// Where the key that may see the batch reads it, once written:
    /// `/api/v1/batches/{id}/report`.
    url: Option<String>,
}

pub(crate) fn view(batch: Batch) -> BatchView {
    let request = BatchRequest::from_stored(&batch.request).ok();
    let status = match batch.state {
        state if state.is_open() && batch.paused => "paused",
        state => state.as_str(),
    };
    let (manifest_url, manifest) = match request.as_ref().map(|r| &r.source) {
        Some(ManifestSource::Url(url)) => (Some(url.clone()), None),
        Some(ManifestSource::Stored { bucket_name, object_name }) => {
            (None, Some(Location { bucket_name: bucket_name.clone(), object_name: object_name.clone() }))
        }
        None => (None, None),
    };
    let (rate, eta_seconds) = pace(&batch, Utc::now());
    BatchView {
        id: batch.id.to_string(),
        status,
        total: batch.total,
        counts: batch.counts,
        bytes_done: batch.bytes_done,
        rate,
        eta_seconds: eta_seconds.filter(|_| status != "paused"),
        read_error: batch.read_error,
        manifest_url,
        manifest,
        format: request.as_ref().and_then(|r| r.format),
        report: request.and_then(|r| r.report).map(|l| ReportView {
            bucket_name: l.bucket_name,
            object_name: l.object_name,
            written: batch.report_written,
            url: batch.report_written.then(|| format!("/api/v1/batches/{}/report", batch.id)),
            error: batch.report_error,
        }),
        created_at: timestamp(batch.created_at),
        updated_at: timestamp(batch.updated_at),
        ended_at: batch.ended_at.map(timestamp),
    }
}

/// Jobs ended per second over `batch`'s life until `now` (or its end), and the seconds
/// its jobs still waiting or running would take at that pace.
fn pace(batch: &Batch, now: chrono::DateTime<Utc>) -> (f64, Option<u64>) {
    let c = &batch.counts;
    let ended = c.completed + c.failed + c.cancelled;
    let until = batch.ended_at.unwrap_or(now);
    let seconds = (until - batch.created_at).num_milliseconds().max(1) as f64 / 1000.0;
    let rate = ended as f64 / seconds;
    let left = c.pending + c.processing;
    let eta = (batch.ended_at.is_none() && rate > 0.0).then(|| (left as f64 / rate).ceil() as u64);
    // Two decimals are plenty, and keep the JSON short.
    ((rate * 100.0).round() / 100.0, eta)
}
