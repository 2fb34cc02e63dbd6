//! What a transfer has received so far, and a body that ends when its job is cancelled:
//! shared by the transfer in one stream and the one in ranges.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

use crate::lifecycle::JobError;
use crate::storage::ByteStream;

/// Bytes a transfer has received, and the size its origin declared.
#[derive(Debug, Clone)]
pub(super) struct Progress(Arc<(AtomicU64, AtomicU64)>);

impl Default for Progress {
    fn default() -> Self {
        Self(Arc::new((AtomicU64::new(0), AtomicU64::new(Self::UNKNOWN))))
    }
}

impl Progress {
    /// No size declared.
    const UNKNOWN: u64 = u64::MAX;

    /// The transfer starts at byte `done` of a file of `total` bytes.
    pub(super) fn start(&self, done: u64, total: Option<u64>) {
        self.0.0.store(done, Ordering::Relaxed);
        self.0.1.store(total.unwrap_or(Self::UNKNOWN), Ordering::Relaxed);
    }

    /// Bytes counted that will come again (a range fetched anew).
    pub(super) fn take_back(&self, bytes: u64) {
        let _ = self.0.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |done| Some(done.saturating_sub(bytes)));
    }

    pub(super) fn read(&self) -> (u64, Option<u64>) {
        let total = self.0.1.load(Ordering::Relaxed);
        (self.0.0.load(Ordering::Relaxed), (total != Self::UNKNOWN).then_some(total))
    }

    /// `body`, counted as it goes by.
    pub(super) fn count(&self, body: ByteStream) -> ByteStream {
        let counter = self.clone();
        body.inspect(move |chunk| {
            if let Ok(chunk) = chunk {
                counter.0.0.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        })
        .boxed()
    }
}

/// `body`, ended with a "cancelled" error as soon as `cancel` fires (also while it waits
/// for the origin).
pub(super) fn until_cancelled(body: ByteStream, cancel: CancellationToken) -> ByteStream {
    let stopped = cancel.clone();
    let cancelled = futures::stream::once(async move { stopped.is_cancelled() })
        .filter_map(|stopped| async move { stopped.then(|| Err(JobError::cancelled())) });
    body.take_until(cancel.cancelled_owned()).chain(cancelled).boxed()
}
