use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Cause, Decision, JobError, RetryPolicy};
use crate::domain::{BucketName, Md5Hex, ObjectKey, SealedHeaders, Sha256Hex, SourceUrl};

/// A job's identifier: the `files` row id, shown as a string as in the seed (`"21"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub i64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for JobId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(JobId)
    }
}

impl Serialize for JobId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Where a job is in its life.
///
/// `pending → processing → completed`; `processing → pending` when a retry is scheduled or
/// a worker hands the job back; `processing → failed` when it gives up; `failed → pending`
/// when a caller asks for a retry; `pending` or `processing → cancelled` when a caller
/// cancels (a transfer under way stops first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Pending,
    Processing,
    Completed,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [Self::Pending, Self::Processing, Self::Completed, Self::Failed, Self::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Processing => "processing",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether nothing more will happen to the job (a failed one may still be retried by
    /// a caller).
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// Whether the lifecycle allows going from `self` to `next`.
    pub fn can_become(self, next: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, next),
            (Pending, Processing)
                | (Processing, Pending)
                | (Processing, Completed)
                | (Processing, Failed)
                | (Failed, Pending)
                | (Pending, Cancelled)
                | (Processing, Cancelled)
        )
    }
}

impl FromStr for JobStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|status| status.as_str() == s).ok_or_else(|| {
            format!("unknown status {s:?}: expected pending, processing, completed, failed or cancelled")
        })
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a job does when its object already exists.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum IfExists {
    /// Replace it (the default).
    #[default]
    Overwrite,
    /// Keep it and complete without fetching.
    Skip,
    /// Fail the job, leaving the object as it is.
    Fail,
    /// Sync: when fileflow stored the object at the key from this URL and it is still
    /// that object, ask the origin whether the file changed since (`If-None-Match` /
    /// `If-Modified-Since`); a `304 Not Modified` completes the job without a transfer,
    /// anything else stores the file as `overwrite` would.
    #[serde(rename = "if_changed")]
    IfChanged,
}

impl IfExists {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Overwrite => "overwrite",
            Self::Skip => "skip",
            Self::Fail => "fail",
            Self::IfChanged => "if_changed",
        }
    }
}

impl FromStr for IfExists {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [Self::Overwrite, Self::Skip, Self::Fail, Self::IfChanged]
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not one of overwrite, skip, fail, if_changed"))
    }
}

/// A validated request to copy a URL into a bucket.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub source: SourceUrl,
    pub bucket: BucketName,
    pub key: ObjectKey,
    pub expected_sha256: Option<Sha256Hex>,
    pub expected_md5: Option<Md5Hex>,
    /// The size the content must have, when the caller knows it.
    pub expected_size: Option<u64>,
    pub if_exists: IfExists,
    /// Among the waiting jobs of the same caller, higher goes first (then older first).
    pub priority: u32,
    /// Where to send a webhook when the job ends (checked by the destination guard).
    pub notify_url: Option<SourceUrl>,
    /// Extra headers for the origin request, encrypted.
    pub headers: Option<SealedHeaders>,
    /// Who asked, and what that allows the job.
    pub grant: Grant,
    /// The W3C `traceparent` of the request that created the job.
    pub traceparent: Option<String>,
    /// The batch the job was read from, and its row in the manifest.
    pub batch: Option<BatchRow>,
}

/// Where a job of a batch came from: the batch's id and the manifest row (from 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchRow {
    pub batch: i64,
    pub row: u64,
}

/// What the caller who created a job allowed it: recorded with the job, so workers apply
/// the caller's limits without knowing callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The API key that created the job; `None` when the API was open.
    pub owner: Option<String>,
    /// The largest file this job may store, under the server's own limit.
    pub max_file_size: Option<u64>,
    /// Whether a missing bucket may be created for it (admin keys and the open API only).
    pub may_create_bucket: bool,
}

impl Grant {
    /// What a job created through the open API (no keys) may do: everything the server allows.
    pub fn open() -> Self {
        Self { owner: None, max_file_size: None, may_create_bucket: true }
    }
}

/// A job as recorded by the metadata repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: JobId,
    pub file_url: SourceUrl,
    pub bucket_name: BucketName,
    pub object_name: ObjectKey,
    pub status: JobStatus,
    pub retry_count: u32,
    pub last_error: Option<String>,
    pub etag: Option<String>,
    pub size: Option<u64>,
    pub sha256: Option<String>,
    pub md5: Option<String>,
    /// CRC64/NVME of the stored bytes, as S3 writes it (big-endian, base64).
    pub crc64nvme: Option<String>,
    pub content_type: Option<String>,
    pub expected_sha256: Option<String>,
    pub expected_md5: Option<String>,
    pub expected_size: Option<u64>,
    pub if_exists: IfExists,
    /// Among the waiting jobs of the same caller, higher goes first.
    pub priority: u32,
    pub notify_url: Option<String>,
    /// Extra headers for the origin request, encrypted (secret: never shown by the API).
    pub request_headers: Option<SealedHeaders>,
    pub grant: Grant,
    /// The store's version of the object this job wrote (download links are bound to it).
    pub object_version: Option<String>,
    /// A caller asked to cancel the job while a worker had it: the worker stops.
    pub cancel_requested: bool,
    /// Bytes received by the transfer under way (or the last one), and the size the
    /// origin declared; `None` before a transfer started, or when no size was declared.
    pub bytes_done: Option<u64>,
    pub bytes_total: Option<u64>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When the next attempt is due, while a retry is scheduled.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The W3C `traceparent` of the request that created the job.
    pub traceparent: Option<String>,
    /// The origin's version of the file this job stored (for a later `if_changed`).
    pub origin: OriginVersion,
    /// The job completed on the origin's `304 Not Modified`, without a transfer.
    pub not_modified: bool,
}

/// How an origin named the version of a file it sent: its `ETag` (strong or weak) and
/// `Last-Modified` headers, as it wrote them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OriginVersion {
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

impl OriginVersion {
    /// The entity tag, if strong: a weak one (`W/…`) names a version only up to
    /// "equivalent" content, not the same bytes, so it is never asked about.
    pub fn strong_etag(&self) -> Option<&str> {
        self.etag.as_deref().filter(|tag| tag.starts_with('"'))
    }

    /// Whether the origin can be asked whether this version changed: a strong entity tag,
    /// or a `Last-Modified` date.
    pub fn askable(&self) -> bool {
        self.strong_etag().is_some() || self.last_modified.is_some()
    }
}

/// What a successful attempt stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    pub etag: String,
    pub size: u64,
    /// Digests and type of the bytes fileflow moved (unknown when it kept an object that
    /// was already there, `if_exists: skip`).
    pub sha256: Option<String>,
    pub md5: Option<String>,
    pub crc64nvme: Option<String>,
    pub content_type: Option<String>,
    /// The store's version of the object, when it names one.
    pub version: Option<String>,
    /// The origin's version of the file (unknown when the object was already there).
    pub origin: OriginVersion,
    /// The origin answered `304 Not Modified`: the object at the key is kept as it is.
    pub not_modified: bool,
}

/// The new state of a job after an attempt, ready to be persisted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    Completed(StoredObject),
    RetryScheduled {
        retry_count: u32,
        last_error: String,
        due_at: DateTime<Utc>,
    },
    Failed {
        last_error: String,
        /// What part of the work failed.
        cause: Cause,
    },
    /// The attempt stopped because a caller cancelled the job.
    Cancelled,
}

impl Settlement {
    pub fn status(&self) -> JobStatus {
        match self {
            Self::Completed(_) => JobStatus::Completed,
            Self::RetryScheduled { .. } => JobStatus::Pending,
            Self::Failed { .. } => JobStatus::Failed,
            Self::Cancelled => JobStatus::Cancelled,
        }
    }

    /// What the attempt came to, as logs and traces name it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Completed(_) => "completed",
            Self::RetryScheduled { .. } => "retry",
            Self::Failed { .. } => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Decide what an attempt's outcome means for a job that had `retries_so_far` retries.
pub fn settle(
    retries_so_far: u32,
    outcome: Result<StoredObject, JobError>,
    policy: &RetryPolicy,
    now: DateTime<Utc>,
    jitter: f64,
) -> Settlement {
    match outcome {
        Ok(stored) => Settlement::Completed(stored),
        Err(error) if error.kind == super::ErrorKind::Cancelled => Settlement::Cancelled,
        Err(error) => match policy.decide(retries_so_far, &error, jitter) {
            Decision::Retry { retry_count, delay } => Settlement::RetryScheduled {
                retry_count,
                last_error: error.message,
                due_at: now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX),
            },
            Decision::GiveUp => Settlement::Failed { last_error: error.message, cause: error.cause },
        },
    }
}

/// How often a held lease is renewed: a third of its length, so one late renewal does not lose it.
pub const fn lease_renew_interval(lease: Duration) -> Duration {
    Duration::from_millis(lease.as_millis() as u64 / 3)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored() -> StoredObject {
        StoredObject {
            etag: "1c08478abf509b7b0dcb32d625151d2b".into(),
            size: 43410,
            sha256: Some("00".repeat(32)),
            md5: Some("1c08478abf509b7b0dcb32d625151d2b".into()),
            crc64nvme: None,
            content_type: Some("image/jpeg".into()),
            version: None,
            origin: OriginVersion::default(),
            not_modified: false,
        }
    }

    #[test]
    fn transitions_follow_the_lifecycle() {
        use JobStatus::*;
        assert!(Pending.can_become(Processing));
        assert!(Processing.can_become(Completed));
        assert!(Processing.can_become(Pending));
        assert!(Processing.can_become(Failed));
        assert!(Failed.can_become(Pending));
        assert!(!Pending.can_become(Completed));
        assert!(!Completed.can_become(Pending));
        assert!(!Completed.can_become(Processing));
        assert!(!Failed.can_become(Completed));
        assert!(Pending.can_become(Cancelled) && Processing.can_become(Cancelled));
        assert!(!Completed.can_become(Cancelled) && !Cancelled.can_become(Pending));
        assert!(Cancelled.is_final() && !Processing.is_final());
        for status in JobStatus::ALL {
            assert_eq!(status.as_str().parse::<JobStatus>().unwrap(), status);
        }
        assert!("done".parse::<JobStatus>().is_err());
    }

    #[test]
    fn a_stored_object_completes_the_job() {
        let now = Utc::now();
        let s = settle(2, Ok(stored()), &RetryPolicy::default(), now, 0.5);
        assert_eq!(s, Settlement::Completed(stored()));
        assert_eq!(s.status(), JobStatus::Completed);
    }

    #[test]
    fn a_transient_error_schedules_a_retry_in_the_future() {
        let now = Utc::now();
        let s = settle(0, Err(JobError::transient("HTTP 503")), &RetryPolicy::default(), now, 0.0);
        assert_eq!(
            s,
            Settlement::RetryScheduled {
                retry_count: 1,
                last_error: "HTTP 503".into(),
                due_at: now + chrono::Duration::milliseconds(500),
            }
        );
        assert_eq!(s.status(), JobStatus::Pending);
    }

    #[test]
    fn the_last_transient_error_and_any_permanent_one_fail_the_job() {
        let now = Utc::now();
        let policy = RetryPolicy::default();
        assert_eq!(
            settle(3, Err(JobError::transient("HTTP 503").because(Cause::OriginStatus)), &policy, now, 0.0),
            Settlement::Failed { last_error: "HTTP 503".into(), cause: Cause::OriginStatus }
        );
        assert_eq!(
            settle(0, Err(JobError::permanent("HTTP 404")), &policy, now, 0.0),
            Settlement::Failed { last_error: "HTTP 404".into(), cause: Cause::Other }
        );
        assert_eq!(settle(0, Err(JobError::cancelled()), &policy, now, 0.0), Settlement::Cancelled);
    }
}
