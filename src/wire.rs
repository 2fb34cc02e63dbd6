//! Wire shapes: how a job and its webhook deliveries are shown as JSON, by the API, its
//! event streams and the webhooks alike (one shape, so they never drift apart).

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use crate::lifecycle::{IfExists, Job, JobId, JobStatus};
use crate::links::DownloadLinks;

/// The lifetime of the download link a completed job's view carries.
pub const DEFAULT_LINK_SECS: i64 = 3600;

/// A job as the API shows it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct JobView {
    #[schema(value_type = String)]
    pub id: JobId,
    pub file_url: String,
    pub bucket_name: String,
    pub object_name: String,
    pub status: JobStatus,
    pub retry_count: u32,
    pub last_error: Option<String>,
    pub etag: Option<String>,
    pub size: Option<u64>,
    pub sha256: Option<String>,
    pub md5: Option<String>,
    /// CRC64/NVME of the stored bytes as S3 writes it (`x-amz-checksum-crc64nvme`:
    /// big-endian, base64); null where fileflow did not read them (`if_exists: skip`).
    pub crc64nvme: Option<String>,
    pub content_type: Option<String>,
    pub if_exists: IfExists,
    /// Among its caller's waiting jobs, higher goes first.
    pub priority: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notify_url: Option<String>,
    /// Bytes received by the transfer under way (or the last one), and the declared size.
    pub bytes_done: Option<u64>,
    pub bytes_total: Option<u64>,
    pub created_at: String,
    pub updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub download_url: Option<String>,
    /// The origin's `ETag` and `Last-Modified` for the file this job stored, as sent
    /// (what a later `if_exists: if_changed` job asks the origin about).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin_etag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin_last_modified: Option<String>,
    /// `if_exists: if_changed`: the origin answered `304 Not Modified`, so the job
    /// completed with the object already at the key, without a transfer.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub not_modified: bool,
    /// The job's webhook deliveries and their tries (a single job's view only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhooks: Option<Vec<DeliveryView>>,
}

/// A job as the API shows it, as JSON (webhooks carry it too).
/// Its download link is minted for the key `minted_by` (revoking that key ends the links
/// fileflow signs).
pub async fn job_json(
    job: Job,
    links: &dyn DownloadLinks,
    minted_by: Option<&str>,
) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::to_value(job_view(job, links, minted_by).await?)?)
}

/// A job as the API shows it, its download link minted for the key `minted_by`.
pub async fn job_view(job: Job, links: &dyn DownloadLinks, minted_by: Option<&str>) -> anyhow::Result<JobView> {
    let download_url = if job.status == JobStatus::Completed {
        let expires_at = Utc::now() + chrono::Duration::seconds(DEFAULT_LINK_SECS);
        Some(links.link(&job, expires_at, minted_by).await?.to_string())
    } else {
        None
    };
    Ok(JobView {
        id: job.id,
        file_url: job.file_url.as_str().to_owned(),
        bucket_name: job.bucket_name.as_str().to_owned(),
        object_name: job.object_name.as_str().to_owned(),
        status: job.status,
        retry_count: job.retry_count,
        last_error: job.last_error,
        etag: job.etag,
        size: job.size,
        sha256: job.sha256,
        md5: job.md5,
        crc64nvme: job.crc64nvme,
        content_type: job.content_type,
        if_exists: job.if_exists,
        priority: job.priority,
        notify_url: job.notify_url,
        bytes_done: job.bytes_done,
        bytes_total: job.bytes_total,
        created_at: timestamp(job.created_at),
        updated_at: timestamp(job.updated_at),
        next_attempt_at: job.next_attempt_at.map(timestamp),
        download_url,
        origin_etag: job.origin.etag,
        origin_last_modified: job.origin.last_modified,
        not_modified: job.not_modified,
        webhooks: None,
    })
}

pub fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// One try, as the job's view shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct AttemptView {
    pub at: DateTime<Utc>,
    /// The receiver's HTTP status, when it answered.
    pub status: Option<u16>,
    pub error: Option<String>,
}

/// A job's delivery, with its tries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct DeliveryView {
    pub id: String,
    #[serde(rename = "type")]
    pub event: String,
    pub url: String,
    pub delivered_at: Option<DateTime<Utc>>,
    pub given_up_at: Option<DateTime<Utc>>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub attempts: Vec<AttemptView>,
}
