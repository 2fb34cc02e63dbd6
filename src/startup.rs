//! Wiring: build the adapters, bind the API, run API, relay and workers until told to stop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::auth::{Gate, KeyLimits};
use crate::backends::{self, Backends, QueueSource};
use crate::config::{Command, Settings};
use crate::fetch::{
    DestinationGuard, FetchSettings, HostList, HttpFetcher, Lookup, MinRate, SystemLookup, guarded_client,
};
use crate::http::{self, AppState, ServerLimits, SitePolicy};
use crate::lifecycle::RetryPolicy;
use crate::metrics::Metrics;
use crate::queue::kafka::{KafkaBacklog, KafkaQueue, ensure_topics};
use crate::queue::{Backlog, ConsumerLock, EmbeddedQueue, Queue};
use crate::reconciler::{self, ReconcileSettings};
use crate::relay::OutboxRelay;
use crate::storage::ObjectStore;
use crate::webhooks::Dispatcher;
use crate::worker::{Hosts, Worker, WorkerSettings, run_pool};

/// How long workers get, after the grace period, to hand their jobs back.
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
        let listener = if runs_api {
            let listener = TcpListener::bind(settings.listen)
                .await
                .with_context(|| format!("cannot listen on {}", settings.listen))?;
            Some(listener)
        } else {
            None
        };
        let port = match &listener {
            Some(l) => l.local_addr()?.port(),
            None => settings.listen.port(),
        };
        let public_url = match &settings.public_url {
            Some(url) => url.clone(),
            None => Url::parse(&format!("http://{}:{port}", settings.listen.ip()))?,
        };
        let sites = SitePolicy::new(
            settings.listen,
            settings.public_url.as_ref(),
            &settings.allowed_hosts,
            &settings.cors_origins,
        )
        .map_err(|e| anyhow::anyhow!(e))?;
        let backends = backends::build(&settings, public_url).await?;
        let allow = HostList::parse(&settings.fetch_allow).map_err(|e| anyhow::anyhow!("--fetch-allow: {e}"))?;
        let deny = HostList::parse(&settings.fetch_deny).map_err(|e| anyhow::anyhow!("--fetch-deny: {e}"))?;
        let guard = DestinationGuard::with_lists(settings.fetch_allow_private, allow, deny);
        let gate = match runs_api {
            true => {
                let defaults = KeyLimits {
                    rate_limit: Some(settings.key_rate_limit).filter(|&r| r > 0),
                    max_unfinished: Some(settings.key_max_unfinished).filter(|&n| n > 0),
                    max_file_size: None,
                };
                let gate = Gate::new(
                    settings.auth,
                    settings.listen,
                    backends.keys.clone(),
                    defaults,
                    settings.unauthenticated_rate_limit,
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
                let queue = EmbeddedQueue::new(db.clone(), settings.job_lease, consumer.clone());
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
                    relay = Some(OutboxRelay::new(db.clone(), kafka)?);
                    backlog = Some(Arc::new(KafkaBacklog::new(kafka)?));
                }
                if runs_workers {
                    ensure_topics(kafka).await.context("cannot create the Kafka topics")?;
                    Some(KafkaQueue::start(kafka, settings.worker_concurrency)? as Arc<dyn Queue>)
                } else {
                    None
                }
            }
        };
        let lookup = hooks.lookup.unwrap_or_else(|| Arc::new(SystemLookup));
        let dispatcher = match (&settings.webhook_secret, runs_api) {
            (Some(secret), true) => Some(Dispatcher {
                outbox: backends.outbox.clone(),
                repo: backends.repo.clone(),
                links: backends.links.clone(),
                client: guarded_client(guard.clone(), lookup.clone())
                    .connect_timeout(settings.connect_timeout)
                    .build()
                    .context("cannot build the webhook HTTP client")?,
                guard: guard.clone(),
                secret: secret.clone(),
                policy: RetryPolicy {
                    max_retries: WEBHOOK_RETRIES,
                    base_delay: settings.retry_base_delay,
                    max_delay: settings.retry_max_delay,
                },
            }),
            _ => None,
        };
        let metrics = Arc::new(Metrics::new());
        let metrics_listener = match settings.metrics_listen {
            Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?),
            None => None,
        };
        let worker = match queue.clone() {
            Some(queue) => {
                let fetch = FetchSettings {
                    connect_timeout: settings.connect_timeout,
                    read_timeout: settings.read_timeout,
                    max_redirects: settings.max_redirects,
                    proxy: settings.fetch_proxy.clone(),
                };
                let fetcher =
                    HttpFetcher::with_lookup(guard.clone(), &fetch, lookup).context("cannot build the HTTP client")?;
                Some(Worker {
                    repo: backends.repo.clone(),
                    queue,
                    store: backends.store.clone(),
                    fetcher: Arc::new(fetcher),
                    sealer: backends.sealer.clone(),
                    hosts: Arc::new(Hosts::new(settings.per_host_concurrency)),
                    metrics: metrics.clone(),
                    settings: WorkerSettings {
                        policy: RetryPolicy {
                            max_retries: settings.max_retries,
                            base_delay: settings.retry_base_delay,
                            max_delay: settings.retry_max_delay,
                        },
                        lease: settings.job_lease,
                        max_file_size: settings.max_file_size.as_u64(),
                        transfer_timeout: settings.transfer_timeout,
                        min_rate: MinRate {
                            bytes_per_second: settings.min_transfer_rate.as_u64(),
                            window: settings.min_rate_window,
                        },
                        segments: usize::from(settings.segments),
                        segment_threshold: settings.segment_threshold.as_u64(),
                    },
                })
            }
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
        })
    }

    /// The port the API listens on (the real one when the settings asked for port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Run until `shutdown` resolves or a part stops; then stop taking work, let jobs in
    /// flight finish within the grace period, and hand back whatever is still running.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let stop = CancellationToken::new();
        let abort = CancellationToken::new();

        let mut api: Option<JoinHandle<std::io::Result<()>>> = self.listener.map(|listener| {
            let state = AppState {
                repo: self.backends.repo.clone(),
                store: self.backends.store.clone(),
                links: self.backends.links.clone(),
                signer: self.backends.signer.clone(),
                guard: self.guard.clone(),
                gate: self.gate.clone().expect("an API process has a gate"),
                sealer: self.backends.sealer.clone(),
                max_file_size: self.settings.max_file_size.as_u64(),
                outbox: self.backends.outbox.clone(),
                webhooks_signed: self.settings.webhook_secret.is_some(),
                metrics: self.metrics.clone(),
                changes: self.backends.changes.clone(),
                sites: self.sites.clone(),
            };
            let limits = ServerLimits {
                max_connections: self.settings.max_connections,
                max_connections_per_ip: self.settings.connections_per_ip(),
                header_timeout: self.settings.header_timeout,
            };
            let router = http::router(state, self.settings.request_timeout);
            tracing::info!(port = self.port, "API listening");
            tokio::spawn(http::serve(listener, router, limits, stop.clone().cancelled_owned()))
        });
        let metrics_server = self.metrics_listener.map(|listener| {
            let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
            tracing::info!(%addr, "metrics listening");
            let limits = ServerLimits {
                max_connections: 64,
                max_connections_per_ip: 64,
                header_timeout: self.settings.header_timeout,
            };
            tokio::spawn(http::serve(
                listener,
                http::metrics_router(self.metrics.clone()),
                limits,
                stop.clone().cancelled_owned(),
            ))
        });
        // On PostgreSQL an API process hears job changes from the database itself.
        let listener = match (&self.backends.queue, api.is_some()) {
            (QueueSource::Kafka { db, .. }, true) => {
                Some(tokio::spawn(crate::events::listen(db.pool.clone(), self.backends.changes.clone(), stop.clone())))
            }
            _ => None,
        };
        let sampler = tokio::spawn(crate::metrics::sample(
            self.metrics.clone(),
            self.backends.repo.clone(),
            self.backends.outbox.clone(),
            self.queue.clone(),
            stop.clone(),
        ));
        let relay = self.relay.map(|relay| {
            tracing::info!("outbox relay started");
            tokio::spawn(relay.run(stop.clone()))
        });
        let dispatcher = self.dispatcher.map(|dispatcher| tokio::spawn(dispatcher.run(stop.clone())));
        let reconciler = api.is_some().then(|| {
            let settings = ReconcileSettings {
                interval: self.settings.reconcile_interval,
                grace: self.settings.reconcile_grace,
                retention: self.settings.retention,
            };
            let metrics = self.metrics.clone();
            tokio::spawn(reconciler::run(
                self.backends.repo.clone(),
                self.backlog.clone(),
                settings,
                metrics,
                stop.clone(),
            ))
        });
        let sweeper = self.worker.as_ref().map(|worker| {
            // No attempt outlives the transfer timeout: a staging file older than that
            // (and the grace period) was left by a process that died mid-write.
            let older_than = self.settings.transfer_timeout + self.settings.shutdown_grace;
            tokio::spawn(sweep_abandoned_writes(worker.store.clone(), older_than, stop.clone()))
        });
        let mut workers: Option<JoinHandle<()>> = self.worker.map(|worker| {
            let concurrency = self.settings.worker_concurrency;
            tracing::info!(concurrency, "workers started");
            tokio::spawn(run_pool(worker, concurrency, stop.clone(), abort.clone()))
        });

        let mut failure = None;
        tokio::select! {
            () = shutdown => tracing::info!("shutdown requested"),
            result = async { api.as_mut().expect("guarded").await }, if api.is_some() => {
                api = None;
                tracing::error!(?result, "API stopped");
                failure = Some(anyhow::anyhow!("the API stopped: {result:?}"));
            }
            result = async { workers.as_mut().expect("guarded").await }, if workers.is_some() => {
                workers = None;
                tracing::error!(?result, "workers stopped");
                failure = Some(anyhow::anyhow!("the workers stopped: {result:?}"));
            }
        }
        stop.cancel();
        // Open event streams end, so the API's connections can drain.
        self.backends.changes.stopped.cancel();
        if let Some(listener) = listener {
            let _ = listener.await;
        }
        if let Some(api) = api {
            let _ = api.await;
        }
        if let Some(relay) = relay {
            let _ = relay.await;
        }
        if let Some(server) = metrics_server {
            let _ = server.await;
        }
        let _ = sampler.await;
        if let Some(reconciler) = reconciler {
            let _ = reconciler.await;
        }
        if let Some(dispatcher) = dispatcher {
            let _ = dispatcher.await;
        }
        if let Some(sweeper) = sweeper {
            let _ = sweeper.await;
        }
        if let Some(mut workers) = workers {
            let grace = self.settings.shutdown_grace;
            if tokio::time::timeout(grace, &mut workers).await.is_err() {
                tracing::warn!(grace = %humantime::format_duration(grace), "jobs still running after the grace period; handing them back");
                abort.cancel();
                if tokio::time::timeout(HAND_BACK_TIMEOUT, workers).await.is_err() {
                    tracing::error!("workers did not hand their jobs back in time; their leases will lapse");
                }
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
