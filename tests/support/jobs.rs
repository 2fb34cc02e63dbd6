//! Jobs as a repository hands them out, for tests of what reads them (links, stores).
#![allow(dead_code)]

use chrono::Utc;
use fileflow::lifecycle::{Grant, Job, JobId, JobStatus};

/// A completed job that stored `bucket/key`.
pub fn completed(bucket: &str, key: &str) -> Job {
    let now = Utc::now();
    Job {
        id: JobId(1),
        file_url: fileflow::domain::SourceUrl::parse("https://example.com/a").unwrap(),
        bucket_name: fileflow::domain::BucketName::parse(bucket).unwrap(),
        object_name: fileflow::domain::ObjectKey::parse(key).unwrap(),
        status: JobStatus::Completed,
        retry_count: 0,
        last_error: None,
        etag: None,
        size: Some(1),
        sha256: None,
        md5: None,
        crc64nvme: None,
        content_type: None,
        expected_sha256: None,
        expected_md5: None,
        expected_size: None,
        if_exists: Default::default(),
        priority: 0,
        notify_url: None,
        request_headers: None,
        grant: Grant::open(),
        object_version: None,
        cancel_requested: false,
        bytes_done: None,
        bytes_total: None,
        traceparent: None,
        created_at: now,
        updated_at: now,
        next_attempt_at: None,
        origin: Default::default(),
        not_modified: false,
    }
}
