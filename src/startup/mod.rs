//! Wiring: build the adapters, bind the API, run API, relay and workers until told to stop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::auth::Gate;
use crate::backends::{self, Backends, QueueSource};
use crate::config::{Command, Settings};
use crate::fetch::{DestinationGuard, Fetcher, HttpFetcher, Lookup, SystemLookup, guarded_client};
use crate::http::{self, AppState, ServerLimits, SitePolicy};
use crate::lifecycle::RetryPolicy;
use crate::metrics::Metrics;
use crate::queue::kafka::{KafkaBacklog, KafkaQueue, ensure_topics};
use crate::queue::{Backlog, ConsumerLock, EmbeddedQueue, Queue};
use crate::reconciler;
use crate::relay::OutboxRelay;
use crate::storage::ObjectStore;
use crate::webhooks::Dispatcher;
use crate::worker::{Hosts, Memory, Worker, run_pool};

mod loops;
pub use loops::Loops;

/// How long workers get, after the grace period, to hand their jobs back.
/// The smallest --max-memory: one transfer's buffers into any store (S3's 5 parts of 5 MiB).
const MIN_MEMORY: u64 = 32 * 1024 * 1024;
const HAND_BACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Tries of a webhook after the first, with the retry backoff (capped by --retry-max-delay).
const WEBHOOK_RETRIES: u32 = 9;
/// How long closing the queue (leaving Kafka's consumer group) may take.
const QUEUE_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Parts of the application that tests may replace.
#[derive(Default)]
pub struct Hooks {
    /// Name resolution for origin fetches (default: the system resolver).
    pub lookup: Option<Arc<dyn Lookup>>,
}

pub struct Application {
    listener: Option<TcpListener>,
    port: u16,
    backends: Backends,
    guard: DestinationGuard,
    /// Who may call the API (API processes).
    gate: Option<Arc<Gate>>,
    /// Which hosts the API is served under and which sites may change things.
    sites: Arc<SitePolicy>,
    worker: Option<Worker>,
    /// The workers' queue, closed at the end (Kafka leaves its consumer group).
    queue: Option<Arc<dyn Queue>>,
    /// Held while the process runs, so others can tell its leases from a dead process's.
    _consumer_lock: Option<ConsumerLock>,
    relay: Option<OutboxRelay>,
    /// How the reconciler tells whether the queue has caught up (Kafka).
    backlog: Option<Arc<dyn Backlog>>,
    /// Sends webhooks (API processes, when a webhook secret is set).
    dispatcher: Option<Dispatcher>,
    settings: Settings,
    metrics: Arc<Metrics>,
    metrics_listener: Option<TcpListener>,
    /// Fetches sources (workers) and manifests (the API's batch runner).
    fetcher: Arc<dyn Fetcher>,
}

impl Application {
    /// Build the process for `role` (`serve`, `api` or `worker`); binds the listener at once.
    pub async fn build(settings: Settings, role: Command) -> anyhow::Result<Self> {
        Self::build_with(settings, role, Hooks::default()).await
    }

    /// [`Application::build`] with parts replaced (tests).
    pub async fn build_with(settings: Settings, role: Command, hooks: Hooks) -> anyhow::Result<Self> {
        let runs_api = matches!(role, Command::Serve | Command::Api);
        let runs_workers = matches!(role, Command::Serve | Command::Worker);
        let server = &settings.server;
        let listener = if runs_api {
            let listener = TcpListener::bind(server.listen)
                .await
                .with_context(|| format!("cannot listen on {}", server.listen))?;
            Some(listener)
        } else {
            None
        };
        let port = match &listener {
            Some(l) => l.local_addr()?.port(),
            None => server.listen.port(),
        };
        let public_url = match &server.public_url {
            Some(url) => url.clone(),
            None => Url::parse(&format!("http://{}:{port}", server.listen.ip()))?,
        };
        let sites = server.sites().map_err(|e| anyhow::anyhow!(e))?;
        let backends = backends::build(&settings, public_url).await?;
        let guard = settings.fetch.guard()?;
        let gate = match runs_api {
            true => {
                let auth = &settings.auth;
                let gate = Gate::new(
                    auth.mode,
                    server.listen,
                    backends.keys.clone(),
                    auth.key_defaults(),
                    auth.unauthenticated_rate_limit,
                )
                .await?;
                Some(Arc::new(gate))
            }
            false => None,
        };

        let mut consumer_lock = None;
        let mut relay = None;
        let mut backlog: Option<Arc<dyn Backlog>> = None;
        let queue: Option<Arc<dyn Queue>> = match &backends.queue {
            QueueSource::Embedded(db) if runs_workers => {
                // Unique per process start: a restarted process (pid 1 in a container)
                // must not take its predecessor's leases for its own.
                let consumer = format!("{}-{}-{:06x}", hostname(), std::process::id(), rand::random::<u32>() >> 8);
                let queue = EmbeddedQueue::new(db.clone(), settings.worker.job_lease, consumer.clone());
                if let Some(file) = &db.file {
                    let owners = std::path::PathBuf::from(format!("{}.owners", file.display()));
                    consumer_lock = Some(
                        ConsumerLock::take(&owners, &consumer)
                            .with_context(|| format!("cannot mark this process alive in {}", owners.display()))?,
                    );
                    let recovered = queue.recover_dead_consumers(&owners).await?;
                    if recovered > 0 {
                        tracing::info!(jobs = recovered, "resuming jobs left in flight by processes that are gone");
                    }
                }
                Some(Arc::new(queue) as _)
            }
            QueueSource::Embedded(_) => None,
            QueueSource::Kafka { settings: kafka, db } => {
                if runs_api {
                    relay = Some(OutboxRelay::new(db.clone(), kafka, settings.kafka.max_backlog)?);
                    backlog = Some(Arc::new(KafkaBacklog::new(kafka)?));
                }
                if runs_workers {
                    ensure_topics(kafka).await.context("cannot create the Kafka topics")?;
                    Some(KafkaQueue::start(kafka, settings.worker.worker_concurrency)? as Arc<dyn Queue>)
                } else {
                    None
                }
            }
        };
        let lookup = hooks.lookup.unwrap_or_else(|| Arc::new(SystemLookup));
        // A host's rate is shared by up to --per-host-concurrency streams, each of which
        // --min-transfer-rate would cut below its floor.
        let floor = settings.fetch.min_rate().bytes_per_second
            * u64::try_from(settings.worker.per_host_concurrency.max(1)).unwrap_or(u64::MAX);
        if let Some(rate) = settings.worker.host_rates.iter().find(|r| r.bytes_per_second <= floor) {
            anyhow::bail!(
                "--host-rate {}={}: at or below --per-host-concurrency × --min-transfer-rate ({}), so the \
                 host's transfers sharing it would be cut for going too slowly",
                rate.host,
                bytesize::ByteSize(rate.bytes_per_second),
                bytesize::ByteSize(floor)
            );
        }
        if settings.worker.max_memory.as_u64() < MIN_MEMORY {
            anyhow::bail!(
                "--max-memory {}: at least {} (one transfer's buffers into any store)",
                settings.worker.max_memory,
                bytesize::ByteSize(MIN_MEMORY)
            );
        }
        let dispatcher = match (&settings.auth.webhook_secret, runs_api) {
            (Some(secret), true) => Some(Dispatcher {
                outbox: backends.outbox.clone(),
                repo: backends.repo.clone(),
                links: backends.links.clone(),
                client: guarded_client(guard.clone(), lookup.clone())
                    .connect_timeout(settings.fetch.connect_timeout)
                    .build()
                    .context("cannot build the webhook HTTP client")?,
                guard: guard.clone(),
                secret: secret.clone(),
                policy: RetryPolicy { max_retries: WEBHOOK_RETRIES, ..settings.retry.policy() },
            }),
            _ => None,
        };
        let metrics = Arc::new(Metrics::new());
        let metrics_listener = match server.metrics_listen {
            Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?),
            None => None,
        };
        let fetcher: Arc<dyn Fetcher> = Arc::new(
            HttpFetcher::with_lookup(guard.clone(), &settings.fetch.client(), lookup)
                .context("cannot build the HTTP client")?,
        );
        let worker = match queue.clone() {
            Some(queue) => Some(Worker {
                repo: backends.repo.clone(),
                queue,
                store: backends.store.clone(),
                fetcher: fetcher.clone(),
                sealer: backends.sealer.clone(),
                hosts: Arc::new(
                    Hosts::new(settings.worker.per_host_concurrency)
                        .with_waiting(settings.worker.worker_concurrency)
                        .with_rates(&settings.worker.host_rates),
                ),
                memory: Arc::new(Memory::new(settings.worker.max_memory.as_u64())),
                metrics: metrics.clone(),
                settings: settings.worker_settings(),
            }),
            None => None,
        };
        Ok(Self {
            listener,
            port,
            backends,
            guard,
            gate,
            sites: Arc::new(sites),
            worker,
            queue,
            _consumer_lock: consumer_lock,
            relay,
            backlog,
            dispatcher,
            settings,
            metrics,
            metrics_listener,
            fetcher,
        })
    }

    /// The port the API listens on (the real one when the settings asked for port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Run until `shutdown` resolves or a part stops; then stop taking work, let jobs in
    /// flight finish within the grace period, and hand back whatever is still running.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let abort = CancellationToken::new();
        let mut loops = Loops::new(CancellationToken::new());
        let runs_api = self.listener.is_some();

        if let Some(listener) = self.listener {
            let state = AppState {
                repo: self.backends.repo.clone(),
                bulk: self.backends.bulk.clone(),
                fetcher: self.fetcher.clone(),
                store: self.backends.store.clone(),
                links: self.backends.links.clone(),
                signer: self.backends.signer.clone(),
                guard: self.guard.clone(),
                gate: self.gate.clone().expect("an API process has a gate"),
                sealer: self.backends.sealer.clone(),
                max_file_size: self.settings.store.max_file_size.as_u64(),
                outbox: self.backends.outbox.clone(),
                webhooks_signed: self.settings.auth.webhook_secret.is_some(),
                metrics: self.metrics.clone(),
                changes: self.backends.changes.clone(),
                sites: self.sites.clone(),
            };
            let limits = self.settings.server.limits();
            let batches = state.clone();
            loops.spawn_infallible("batch runner", |stop| http::run_batches(batches, stop));
            let router = http::router(state, self.settings.server.request_timeout);
            tracing::info!(port = self.port, "API listening");
            loops.spawn("api", |stop| async move {
                Ok(http::serve(listener, router, limits, stop.cancelled_owned()).await?)
            });
        }
        if let Some(listener) = self.metrics_listener {
            let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
            tracing::info!(%addr, "metrics listening");
            let limits = ServerLimits {
                max_connections: 64,
                max_connections_per_ip: 64,
                header_timeout: self.settings.server.header_timeout,
            };
            let router = http::metrics_router(self.metrics.clone());
            loops.spawn("metrics server", |stop| async move {
                Ok(http::serve(listener, router, limits, stop.cancelled_owned()).await?)
            });
        }
        // On PostgreSQL an API process hears job changes from the database itself.
        if let (QueueSource::Kafka { db, .. }, true) = (&self.backends.queue, runs_api) {
            let (pool, changes) = (db.pool.clone(), self.backends.changes.clone());
            loops.spawn_infallible("change listener", |stop| crate::events::listen(pool, changes, stop));
        }
        let (metrics, repo, outbox, queue) =
            (self.metrics.clone(), self.backends.repo.clone(), self.backends.outbox.clone(), self.queue.clone());
        loops.spawn_infallible("metrics sampler", |stop| crate::metrics::sample(metrics, repo, outbox, queue, stop));
        if let Some(relay) = self.relay {
            tracing::info!("outbox relay started");
            loops.spawn_infallible("outbox relay", |stop| relay.run(stop));
        }
        if let Some(dispatcher) = self.dispatcher {
            loops.spawn_infallible("webhook dispatcher", |stop| dispatcher.run(stop));
        }
        if runs_api {
            let (repo, backlog, metrics) = (self.backends.repo.clone(), self.backlog.clone(), self.metrics.clone());
            let settings = self.settings.sweep.reconcile();
            loops.spawn_infallible("reconciler", |stop| reconciler::run(repo, backlog, settings, metrics, stop));
        }
        if let Some(worker) = self.worker {
            // No attempt outlives the transfer timeout: a staging file older than that
            // (and the grace period) was left by a process that died mid-write.
            let older_than = self.settings.fetch.transfer_timeout + self.settings.worker.shutdown_grace;
            let store = worker.store.clone();
            loops.spawn_infallible("staging sweeper", |stop| sweep_abandoned_writes(store, older_than, stop));
            let concurrency = self.settings.worker.worker_concurrency;
            tracing::info!(concurrency, "workers started");
            let abort = abort.clone();
            let (hosts, memory, metrics) = (worker.hosts.clone(), worker.memory.clone(), worker.metrics.clone());
            loops.spawn_infallible("worker sampler", |stop| crate::worker::sample(hosts, memory, metrics, stop));
            loops.spawn_infallible("workers", |stop| run_pool(worker, concurrency, stop, abort));
        }

        let failure = tokio::select! {
            () = shutdown => {
                tracing::info!("shutdown requested");
                None
            }
            ended = loops.first_ended() => {
                let why = ended.outcome.err().unwrap_or_else(|| "ended by itself".to_owned());
                tracing::error!(part = ended.name, error = %why, "a part of the process stopped; stopping the rest");
                Some(anyhow::anyhow!("the {} stopped: {why}", ended.name))
            }
        };
        // Open event streams end with the loops, so the API's connections can drain.
        self.backends.changes.stopped.cancel();
        // Jobs in flight get the grace period; whatever still runs then is handed back.
        let grace = self.settings.worker.shutdown_grace;
        let late = loops.stop_and_join(grace).await;
        if !late.is_empty() {
            tracing::warn!(grace = %humantime::format_duration(grace), parts = ?late, "still running after the grace period; handing their jobs back");
            abort.cancel();
            let stuck = loops.join(HAND_BACK_TIMEOUT).await;
            if !stuck.is_empty() {
                tracing::error!(parts = ?stuck, "did not stop in time; jobs they hold will be picked up when their leases lapse");
            }
        }
        if let Some(queue) = self.queue {
            queue.close(QUEUE_CLOSE_TIMEOUT).await;
        }
        tracing::info!("stopped");
        failure.map_or(Ok(()), Err)
    }
}

/// Remove what writes of dead processes left in the store, now and then, until `stop`.
async fn sweep_abandoned_writes(store: Arc<dyn ObjectStore>, older_than: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(older_than.min(Duration::from_secs(600)));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match store.sweep_abandoned(older_than).await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "removed writes left behind by processes that died mid-way"),
            Err(e) => tracing::warn!(error = %e, "cannot sweep abandoned writes"),
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("can install a SIGTERM handler");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "fileflow".into())
}
