//! Resumable transfers: after each part the store holds for good, a checkpoint (the
//! origin's validator, the hash states at that point, the store's partial write) goes to
//! the database, so the next attempt, in this worker or another, asks the origin for the
//! rest with `Range` and `If-Range` and goes on with the same upload. It starts over when
//! the origin cannot send a range or the file has changed.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;

use super::verify::{HashState, PendingState, Verifier};
use crate::fetch::RangeFrom;
use crate::lifecycle::{JobError, JobId};
use crate::metadata::JobRepository;
use crate::storage::{PartialWrite, WriteProgress};

/// Where a transfer stands, as saved between attempts.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    /// The origin's name for the version being fetched (strong entity tag or `Last-Modified`).
    pub validator: String,
    /// The whole file's size, as the origin declared it.
    pub total: Option<u64>,
    pub content_type: String,
    /// The hashes of the bytes in the store.
    pub hashes: HashState,
    pub write: PartialWrite,
}

impl Checkpoint {
    /// The request for the rest of the file, if a store with parts of `part_size` can go
    /// on with this checkpoint (same part size, a known total, and something left to
    /// fetch). Without a known total no answer could prove it is the same file.
    pub fn range(&self, part_size: Option<u64>) -> Option<RangeFrom> {
        let total = self.total?;
        let fits = part_size == Some(self.write.part_size) && self.write.stored < total;
        fits.then(|| RangeFrom { offset: self.write.stored, end: None, validator: self.validator.clone(), total })
    }
}

/// Saves a transfer's checkpoints as its write reports parts stored.
pub struct Recorder<'a> {
    pub repo: &'a dyn JobRepository,
    pub id: JobId,
    pub owner: &'a str,
    pub validator: String,
    pub total: Option<u64>,
    pub content_type: String,
    pub verifier: Verifier,
    /// Hash states at the ends of parts taken but not yet stored, oldest first.
    pub taken: Mutex<VecDeque<PendingState>>,
    /// The store no longer has the partial write this attempt went on with.
    pub gone: AtomicBool,
}

impl Recorder<'_> {
    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl WriteProgress for Recorder<'_> {
    fn part_taken(&self, offset: u64) {
        let state = self.verifier.state();
        debug_assert_eq!(state.size, offset, "the body is split at part ends");
        self.taken.lock().unwrap_or_else(|p| p.into_inner()).push_back(state);
    }

    async fn stored(&self, write: &PartialWrite) -> Result<(), JobError> {
        let hashes = {
            let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
            while taken.front().is_some_and(|h| h.size < write.stored) {
                taken.pop_front();
            }
            match taken.pop_front() {
                Some(hashes) if hashes.size == write.stored => hashes,
                _ => return Err(JobError::transient(format!("no hash state at offset {}", write.stored))),
            }
        };
        let hashes = hashes.ready().await?;
        let checkpoint = Checkpoint {
            validator: self.validator.clone(),
            total: self.total,
            content_type: self.content_type.clone(),
            hashes,
            write: write.clone(),
        };
        let body = serde_json::to_string(&checkpoint).expect("a checkpoint serializes");
        match self.repo.save_checkpoint(self.id, self.owner, write.stored, self.total, &body).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(JobError::transient("the job's lease was lost while its transfer was under way")),
            Err(e) => Err(JobError::transient(format!("cannot save the transfer's checkpoint: {e}"))),
        }
    }

    fn gone(&self) {
        self.gone.store(true, Ordering::Relaxed);
    }
}
