//! The transfer itself: origin → verify → store, going on from a checkpoint when the origin
//! proves it is the same file, and what an object already at the key means.

use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

use super::Worker;
use super::hosts::host_of;
use super::memory;
use super::progress::{Progress, until_cancelled};
use super::resume::{Checkpoint, Recorder};
use super::segments::{SegmentFailure, Segmenting};
use super::sniff;
use super::verify::{DigestSet, Expectations, verified};
use crate::domain::{BucketName, ObjectKey, RequestHeaders};
use crate::fetch::at_least;
use crate::lifecycle::{Cause, IfExists, Job, JobError, JobId, OriginVersion, StoredObject};
use crate::storage::{Fence, ObjectStore, WriteOptions, split_at_parts};

/// A fence that also refuses when an object appeared at the key meanwhile (`if_exists: fail`).
pub(super) struct AbsentFence<'a> {
    inner: &'a dyn Fence,
    store: &'a dyn ObjectStore,
    bucket: &'a BucketName,
    key: &'a ObjectKey,
}

#[async_trait::async_trait]
impl Fence for AbsentFence<'_> {
    async fn check(&self) -> Result<(), JobError> {
        self.inner.check().await?;
        match self.store.head(self.bucket, self.key).await {
            Ok(None) => Ok(()),
            Ok(Some(_)) => Err(object_exists(self.bucket, self.key)),
            Err(e) => Err(JobError::transient(format!("cannot tell whether {}/{} exists: {e}", self.bucket, self.key))
                .because(Cause::Store)),
        }
    }
}

pub(super) fn object_exists(bucket: &BucketName, key: &ObjectKey) -> JobError {
    JobError::permanent(format!("{bucket}/{key} already exists (if_exists: fail)")).because(Cause::Exists)
}

/// The outcome of a job whose origin answered `304 Not Modified`: the object `last` stored,
/// kept as it is.
fn not_modified(last: Job) -> StoredObject {
    StoredObject {
        etag: last.etag.unwrap_or_default(),
        size: last.size.unwrap_or_default(),
        sha256: last.sha256,
        md5: last.md5,
        crc64nvme: last.crc64nvme,
        content_type: last.content_type,
        version: last.object_version,
        origin: last.origin,
        not_modified: true,
    }
}

impl Worker {
    /// For `if_exists: skip` and `fail`: what an object already at the key means. Skip
    /// completes with it as it is; fail fails the job; otherwise the transfer goes on.
    pub(super) async fn existing_object(
        &self,
        job: &Job,
        bucket: &BucketName,
        key: &ObjectKey,
    ) -> Result<Option<StoredObject>, JobError> {
        if matches!(job.if_exists, IfExists::Overwrite | IfExists::IfChanged) {
            return Ok(None);
        }
        let existing = self.store.head(bucket, key).await.map_err(|e| {
            JobError::transient(format!("cannot tell whether {bucket}/{key} exists: {e}")).because(Cause::Store)
        })?;
        let Some(existing) = existing else { return Ok(None) };
        match job.if_exists {
            IfExists::Skip => self.same_content(job, bucket, key, existing).await.map(Some),
            _ => Err(object_exists(bucket, key)),
        }
    }

    /// For `if_exists: skip`: the object at the key as the job's outcome, if it matches
    /// every size and digest the job declares. Its size comes from the store; declared
    /// digests are checked by reading the object back (no store keeps SHA-256, and only
    /// some keep an MD5 of the whole object), so a skip is never taken on trust.
    pub(super) async fn same_content(
        &self,
        job: &Job,
        bucket: &BucketName,
        key: &ObjectKey,
        existing: crate::storage::ObjectInfo,
    ) -> Result<StoredObject, JobError> {
        let other = |what: String| {
            JobError::permanent(format!(
                "an object with other content is at the key {bucket}/{key} (if_exists: skip): {what}"
            ))
            .because(Cause::Exists)
        };
        if let Some(size) = job.expected_size
            && size != existing.size
        {
            return Err(other(format!("its size is {} bytes, the job declares {size}", existing.size)));
        }
        let mut digests = None;
        if job.expected_sha256.is_some() || job.expected_md5.is_some() {
            let stored = self.store.get(bucket, key).await.map_err(|e| {
                JobError::transient(format!("cannot read {bucket}/{key} to compare it: {e}")).because(Cause::Store)
            })?;
            let object = format!("{bucket}/{key}");
            let body = stored.body.map(move |chunk| {
                chunk.map_err(|e| JobError::transient(format!("cannot read {object}: {e}")).because(Cause::Store))
            });
            let read_back = Expectations { max_size: u64::MAX, compute: self.digests(), ..Default::default() };
            let (mut body, verifier) = verified(body.boxed(), read_back, None);
            while let Some(chunk) = body.next().await {
                chunk?;
            }
            let read = verifier.digests().ok_or_else(|| JobError::transient("the stored object's read ended early"))?;
            for (name, declared, actual) in
                [("sha256", &job.expected_sha256, &read.sha256), ("md5", &job.expected_md5, &read.md5)]
            {
                // A declared digest is always computed.
                let actual = actual.as_deref().unwrap_or_default();
                if let Some(declared) = declared
                    && !declared.eq_ignore_ascii_case(actual)
                {
                    return Err(other(format!("its {name} is {actual}, the job declares {declared}")));
                }
            }
            digests = Some(read);
        }
        Ok(StoredObject {
            etag: existing.etag.or_else(|| existing.version.clone()).unwrap_or_default(),
            size: existing.size,
            sha256: digests.as_ref().and_then(|d| d.sha256.clone()),
            md5: digests.as_ref().and_then(|d| d.md5.clone()),
            crc64nvme: digests.and_then(|d| d.crc64nvme),
            content_type: None,
            version: existing.version,
            origin: OriginVersion::default(),
            not_modified: false,
        })
    }

    /// The largest file `job` may store: the server's limit, or its caller's when lower.
    fn max_size(&self, job: &Job) -> u64 {
        job.grant.max_file_size.map_or(self.settings.max_file_size, |m| m.min(self.settings.max_file_size))
    }

    /// What a transfer of `job` must deliver (the origin's declared length aside).
    fn expectations(&self, job: &Job) -> Expectations {
        Expectations {
            max_size: self.max_size(job),
            declared_length: None,
            sha256: job.expected_sha256.clone(),
            md5: job.expected_md5.clone(),
            size: job.expected_size,
            compute: self.digests(),
        }
    }

    /// The digests a transfer computes: those `--digests` names, and MD5 where the store
    /// takes it for the ETag.
    pub(super) fn digests(&self) -> DigestSet {
        let wanted = self.settings.digests;
        DigestSet { md5: wanted.md5 || self.store.etag_is_md5(), ..wanted }
    }

    /// For `if_exists: if_changed`: the job that stored the object now at the key, if it
    /// fetched it from this job's URL and the origin named the file's version then. The
    /// object must still be the one that job stored (same size, and same store version or
    /// ETag), so a key written since by anyone else is fetched again.
    async fn stored_version(&self, job: &Job, bucket: &BucketName, key: &ObjectKey) -> Result<Option<Job>, JobError> {
        let last = self.repo.last_stored(bucket, key).await.map_err(|e| {
            JobError::transient(format!("cannot read what was stored at {bucket}/{key}: {e}")).because(Cause::Store)
        })?;
        // What the job declares must hold of the stored object as recorded (a digest it
        // declares must have been recorded), and the file must be within its limit: else
        // the file is fetched, and checked, in full.
        let same_digest = |declared: &Option<String>, recorded: &Option<String>| match declared {
            None => true,
            Some(d) => recorded.as_deref().is_some_and(|r| r.eq_ignore_ascii_case(d)),
        };
        let max_size = self.max_size(job);
        let Some(last) = last.filter(|last| {
            last.file_url == job.file_url
                && last.origin.askable()
                && job.expected_size.is_none_or(|size| last.size == Some(size))
                && last.size.is_some_and(|size| size <= max_size)
                && same_digest(&job.expected_sha256, &last.sha256)
                && same_digest(&job.expected_md5, &last.md5)
        }) else {
            return Ok(None);
        };
        let existing = self.store.head(bucket, key).await.map_err(|e| {
            JobError::transient(format!("cannot tell whether {bucket}/{key} exists: {e}")).because(Cause::Store)
        })?;
        let unquoted = |tag: &str| tag.trim_matches('"').to_owned();
        let same = existing.is_some_and(|now| {
            Some(now.size) == last.size
                && match (&now.version, &last.object_version) {
                    (Some(now), Some(then)) => now == then,
                    _ => now.etag.as_deref().map(unquoted) == last.etag.as_deref().map(unquoted),
                }
        });
        Ok(same.then_some(last))
    }

    /// One attempt under `owner`'s lease, and what its end means for a checkpoint saved on
    /// the way: kept for the next attempt after a transient error, forgotten otherwise
    /// (with the partial write it names, unless that became the object).
    pub(super) async fn transfer(
        &self,
        job: &Job,
        owner: &str,
        fence: &dyn Fence,
        cancel: &CancellationToken,
        progress: &Progress,
    ) -> Result<StoredObject, JobError> {
        let checkpointed = AtomicBool::new(job.bytes_done.is_some_and(|done| done > 0));
        let outcome = self.transfer_once(job, owner, fence, cancel, progress, &checkpointed, true).await;
        let ended = !matches!(&outcome, Err(e) if e.is_transient());
        if ended && checkpointed.load(Ordering::Relaxed) {
            self.forget_checkpoint(job, outcome.is_err()).await;
        }
        outcome
    }

    /// One attempt: origin → verify → store. Sets `checkpointed` when it may save checkpoints.
    /// With `in_ranges`, a large file may be fetched as several ranges at once; when the
    /// origin's range answers do not prove themselves, it is fetched again in one stream.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn transfer_once(
        &self,
        job: &Job,
        owner: &str,
        fence: &dyn Fence,
        cancel: &CancellationToken,
        progress: &Progress,
        checkpointed: &AtomicBool,
        in_ranges: bool,
    ) -> Result<StoredObject, JobError> {
        let (url, bucket, key) = (job.file_url.as_url(), &job.bucket_name, &job.object_name);

        if let Some(done) = self.existing_object(job, bucket, key).await? {
            return Ok(done);
        }
        let absent;
        let fence: &dyn Fence = match job.if_exists {
            // Checked again just before the object becomes visible.
            IfExists::Fail => {
                absent = AbsentFence { inner: fence, store: &*self.store, bucket, key };
                &absent
            }
            IfExists::Overwrite | IfExists::Skip | IfExists::IfChanged => fence,
        };
        let headers = match &job.request_headers {
            Some(sealed) => self.sealer.open(sealed).map_err(|e| JobError::permanent(e.to_string()))?,
            None => RequestHeaders::default(),
        };
        // Progress from an earlier attempt: it may have saved a checkpoint to go on from.
        let mut saved = match job.bytes_done {
            Some(done) if done > 0 => self.saved_checkpoint(job.id).await,
            _ => None,
        };
        // Its hashes must go on with every digest this attempt computes (`--digests` may
        // have changed since); else the part stored is of no use.
        let wanted = self.expectations(job);
        // And the store must take more parts of the write (an older fileflow may have begun
        // it checking parts another way).
        if saved.as_ref().is_some_and(|c| !c.hashes.goes_on_with(&wanted) || !self.store.goes_on_with(&c.write)) {
            tracing::info!(job_id = %job.id, "the checkpoint's hashes or stored parts cannot go on; starting over");
            self.forget_checkpoint(job, true).await;
            saved = None;
        }
        let from =
            saved.as_ref().and_then(|c| c.range(c.total.and_then(|total| self.store.resumable_part_size(total))));
        // Sync: ask the origin whether the file changed since it was stored (not when
        // going on from a checkpoint: an earlier attempt found that it had).
        let since = match (&saved, job.if_exists) {
            (None, IfExists::IfChanged) => self.stored_version(job, bucket, key).await?,
            _ => None,
        };
        let fetched = tokio::select! {
            fetched = async {
                match &since {
                    Some(last) => self.fetcher.fetch_if_changed(url, headers.pairs(), &last.origin).await,
                    None => self.fetcher.fetch(url, headers.pairs(), from.as_ref()).await.map(Some),
                }
            } => fetched?,
            () = cancel.cancelled() => return Err(JobError::cancelled()),
        };
        let Some(fetched) = fetched else {
            let last = since.expect("only a conditional request is answered `Not Modified`");
            tracing::info!(job_id = %job.id, stored_by = %last.id, "the origin's file has not changed; keeping the object");
            return Ok(not_modified(last));
        };
        let origin = fetched.origin.clone();
        let resumed = match saved {
            // The fetcher hands back a body past byte 0 only as the proven rest of the file
            // this checkpoint was saved from (see `RangeFrom::continues`).
            Some(checkpoint) if fetched.start > 0 && from.as_ref().is_some_and(|f| f.offset == fetched.start) => {
                Some(checkpoint)
            }
            Some(_) => {
                if from.is_some() {
                    tracing::info!(job_id = %job.id, "the origin cannot send the rest of the same file; starting over");
                }
                self.forget_checkpoint(job, true).await;
                None
            }
            None => None,
        };
        if fetched.start > 0 && resumed.is_none() {
            // Never reached: a body that starts past byte 0 is never stored as a whole object.
            return Err(JobError::transient("origin sent part of the file where the whole was asked for")
                .because(Cause::OriginStatus));
        }
        let max_size = wanted.max_size;
        if let Some(length) = fetched.content_length
            && length > max_size
        {
            return Err(JobError::permanent(format!(
                "file too large: origin declares {length} bytes, the limit is {max_size}"
            ))
            .because(Cause::TooLarge));
        }
        // What this transfer's buffers can hold, from the process's budget; a transfer
        // waits here while the budget is spent.
        let remaining = fetched.content_length.map(|length| length.saturating_sub(fetched.start));
        let reserved = memory::for_transfer(remaining, self.store.write_buffer(fetched.content_length));
        let held = tokio::select! {
            held = self.memory.reserve(reserved) => held,
            () = cancel.cancelled() => return Err(JobError::cancelled()),
        };
        // A cancel ends the body with an error, so the store aborts what it has written.
        progress.start(fetched.start, fetched.content_length);
        let body = self.hosts.paced(url, fetched.body);
        let body = progress.count(until_cancelled(at_least(body, self.settings.min_rate), cancel.clone()));
        let (content_type, body) = match &resumed {
            // The start of the file, where its type shows, was read by the first attempt.
            Some(c) => (c.content_type.clone(), body),
            None => sniff::content_type(fetched.content_type, body).await,
        };
        let expect = Expectations { declared_length: fetched.content_length, ..wanted };
        let options = WriteOptions {
            content_type: &content_type,
            may_create_bucket: job.grant.may_create_bucket,
            length: fetched.content_length,
        };
        // A large file from an origin that serves ranges of a version it names: several
        // ranges at once, as many as the host's free places and the memory budget allow.
        let segments = match (&fetched.validator, fetched.content_length) {
            (Some(_), Some(total)) if in_ranges => {
                self.segments_for(fetched.accepts_ranges, total, fetched.start).map(|wanted| (wanted, total))
            }
            _ => None,
        };
        let (more, more_held) = match segments {
            Some((wanted, total)) => self.more_ranges(&host_of(url), wanted, total, reserved),
            None => (Vec::new(), None),
        };
        if let (false, Some(validator), Some(total)) = (more.is_empty(), &fetched.validator, fetched.content_length) {
            let run = Segmenting {
                job,
                owner,
                headers: headers.pairs(),
                fence,
                cancel,
                progress,
                checkpointed,
                segments: 1 + more.len(),
                validator: validator.clone(),
                total,
                content_type: content_type.clone(),
                expect,
                options,
                resumed,
            };
            let outcome = self.segmented(run, body).await;
            // Given back before a fetch in one stream takes its own.
            drop((more, more_held, held));
            return match outcome {
                Ok(stored) => Ok(StoredObject { origin, ..stored }),
                Err(SegmentFailure::Failed(e)) => Err(e),
                // What was stored is gone: the whole file, in one stream.
                Err(SegmentFailure::Unproven(_)) => {
                    Box::pin(self.transfer_once(job, owner, fence, cancel, progress, checkpointed, false)).await
                }
            };
        }
        // Large files from an origin that names its version are stored part by part, with
        // a checkpoint after each, so a cut transfer goes on where it stopped.
        let part_size = fetched.content_length.and_then(|length| self.store.resumable_part_size(length));
        let resumable = match (part_size, &fetched.validator, fetched.content_length) {
            (Some(part), Some(_), Some(length)) => resumed.is_some() || length > part,
            _ => false,
        };
        let (put, verifier) = match (part_size, fetched.validator) {
            (Some(part), Some(validator)) if resumable => {
                checkpointed.store(true, Ordering::Relaxed);
                let body = split_at_parts(body, fetched.start, part);
                let (body, verifier) = verified(body, expect, resumed.as_ref().map(|c| &c.hashes));
                let recorder = Recorder {
                    repo: &*self.repo,
                    id: job.id,
                    owner,
                    validator,
                    total: fetched.content_length,
                    content_type: content_type.clone(),
                    verifier: verifier.clone(),
                    taken: Default::default(),
                    gone: Default::default(),
                };
                let from = resumed.map(|c| c.write);
                let put = self.store.put_resumable(bucket, key, options, body, fence, job.id, from, &recorder).await;
                if let Err(e) = &put
                    && recorder.is_gone()
                {
                    tracing::info!(job_id = %job.id, error = %e, "the stored part of the file is gone; the next attempt starts over");
                    self.forget_checkpoint(job, true).await;
                }
                (put.map_err(|e| e.or_because(Cause::Store))?, verifier)
            }
            _ if resumed.is_some() => {
                // A resumed body continues stored parts: it cannot be stored on its own.
                self.forget_checkpoint(job, true).await;
                return Err(JobError::transient("cannot go on with the stored part of the file; starting over")
                    .because(Cause::Store));
            }
            _ => {
                let (body, verifier) = verified(body, expect, None);
                let put = self.store.put(bucket, key, options, body, fence).await;
                (put.map_err(|e| e.or_because(Cause::Store))?, verifier)
            }
        };
        let digests = verifier.digests().ok_or_else(|| JobError::transient("store finished before the body ended"))?;
        Ok(digests.stored(put, content_type, origin))
    }

    /// The job's saved checkpoint, if it has one that reads.
    pub(super) async fn saved_checkpoint(&self, id: JobId) -> Option<Checkpoint> {
        let body = match self.repo.checkpoint(id).await {
            Ok(body) => body?,
            Err(e) => {
                tracing::warn!(job_id = %id, error = %e, "cannot read the transfer's checkpoint; starting over");
                return None;
            }
        };
        serde_json::from_str(&body)
            .inspect_err(|e| tracing::warn!(job_id = %id, error = %e, "unreadable checkpoint; starting over"))
            .ok()
    }

    /// Forget the job's checkpoint, so a next attempt starts over; with `discard`, also
    /// remove the partial write it names (not when that write became the object).
    pub(super) async fn forget_checkpoint(&self, job: &Job, discard: bool) {
        let id = job.id;
        let Some(checkpoint) = self.saved_checkpoint(id).await else { return };
        let (bucket, key) = (&job.bucket_name, &job.object_name);
        if discard && let Err(e) = self.store.discard(bucket, key, &checkpoint.write).await {
            tracing::warn!(job_id = %id, error = %e, "cannot remove a partial write");
        }
        if let Err(e) = self.repo.clear_checkpoint(id).await {
            tracing::warn!(job_id = %id, error = %e, "cannot forget the transfer's checkpoint");
        }
    }
}
