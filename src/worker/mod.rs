//! Workers: take a delivery, claim its job, stream origin → store, record the outcome.
//!
//! [`Worker::run_once`] is one step (receive one message and see it through), so tests
//! can drive a worker without sleeping; [`run_pool`] runs steps concurrently until told
//! to stop.

mod attempt;
mod hosts;
mod memory;
mod pool;
mod progress;
mod resume;
mod segments;
mod sniff;
mod transfer;
mod verify;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::fetch::{Fetcher, MinRate};
use crate::lifecycle::{JobId, RetryPolicy};
use crate::metadata::{Claim, JobRepository, Lease, RepoError};
use crate::metrics::Metrics;
use crate::queue::{Delivery, Queue, QueueError};
use crate::secrets::HeaderSealer;
use crate::storage::ObjectStore;
pub use hosts::{HostRate, Hosts};
pub use memory::Memory;
pub use pool::run_pool;

pub use verify::{DigestName, DigestSet, Digests, Expectations, HashState, Verifier, verified};

/// How often [`sample`] reads the hosts' states and the memory held.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// Set the gauges of a worker process's shared state (origin hosts by state, memory
/// reserved) now and then until `stop`.
pub async fn sample(hosts: Arc<Hosts>, memory: Arc<Memory>, metrics: Arc<Metrics>, stop: CancellationToken) {
    use crate::metrics::HostState;
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (busy, throttled, paused) = hosts.census();
        for (state, count) in [("busy", busy), ("throttled", throttled), ("paused", paused)] {
            metrics.origin_hosts.get_or_create(&HostState { state }).set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        metrics.memory_reserved.set(i64::try_from(memory.in_use()).unwrap_or(i64::MAX));
    }
}

/// How workers behave.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub policy: RetryPolicy,
    /// How long a claim lasts without renewal; a dead worker's job waits this long.
    pub lease: Duration,
    pub max_file_size: u64,
    /// Longest one attempt may take, however the origin trickles.
    pub transfer_timeout: Duration,
    /// The slowest an origin may send, averaged over a window, before the attempt is cut.
    pub min_rate: MinRate,
    /// Ranges of one large file fetched at once (1: one stream per file).
    pub segments: usize,
    /// Files (or rests of files) larger than this are fetched in ranges, when the origin allows.
    pub segment_threshold: u64,
    /// The digests every transfer computes for its record (`--digests`).
    pub digests: verify::DigestSet,
}

/// What one step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkOutcome {
    Completed(JobId),
    RetryScheduled {
        id: JobId,
        retry_count: u32,
        due_at: DateTime<Utc>,
    },
    Failed {
        id: JobId,
        error: String,
    },
    /// A caller cancelled the job; the transfer stopped and nothing was stored.
    Cancelled(JobId),
    /// The message named a job that needs no work (finished or unknown); it was acknowledged.
    Skipped(JobId),
    /// Another worker holds the job; the message will come back when that lease ends.
    Deferred(JobId),
    /// Shutdown: the job and its message were handed back untouched.
    HandedBack(JobId),
    /// The lease was lost mid-way (this worker stalled); the new holder owns the job.
    LeaseLost(JobId),
}

/// A failure of fileflow's own infrastructure (database, queue), not of a job.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

#[derive(Clone)]
pub struct Worker {
    pub repo: Arc<dyn JobRepository>,
    pub queue: Arc<dyn Queue>,
    pub store: Arc<dyn ObjectStore>,
    pub fetcher: Arc<dyn Fetcher>,
    /// Opens the jobs' encrypted origin headers.
    pub sealer: Arc<HeaderSealer>,
    /// Transfers in flight per origin host, and hosts that asked for a pause.
    pub hosts: Arc<Hosts>,
    /// What the process's transfers may hold in memory at once (`--max-memory`).
    pub memory: Arc<Memory>,
    pub settings: WorkerSettings,
    pub metrics: Arc<Metrics>,
}

impl Worker {
    /// Receive one message and see it through. `abort` hands the job back unfinished.
    pub async fn run_once(&self, abort: &CancellationToken) -> Result<WorkOutcome, WorkerError> {
        let delivery = self.queue.receive().await?;
        self.handle(delivery, abort).await
    }

    /// Claim the delivery's job and see it through. On an infrastructure error the
    /// delivery is let go of (see [`Queue::abandon`]) before the error is returned.
    pub async fn handle(&self, delivery: Delivery, abort: &CancellationToken) -> Result<WorkOutcome, WorkerError> {
        let (lease, claim) = self.claim_all(std::slice::from_ref(&delivery)).await?.pop().expect("one claim asked");
        self.work(delivery, lease, claim, abort, None).await
    }

    /// Claim the jobs of several deliveries at once (one request to the repository), each
    /// under a lease of its own. If that fails, every delivery is let go of.
    pub(super) async fn claim_all(&self, deliveries: &[Delivery]) -> Result<Vec<(Lease, Claim)>, WorkerError> {
        let requests: Vec<_> =
            deliveries.iter().map(|d| (d.job_id, Lease::for_claim(&d.token, self.settings.lease))).collect();
        match self.repo.claim_many(&requests).await {
            Ok(claims) => Ok(requests.into_iter().map(|(_, lease)| lease).zip(claims).collect()),
            Err(e) => {
                futures::future::join_all(deliveries.iter().map(|d| self.queue.abandon(d))).await;
                Err(e.into())
            }
        }
    }
}
