//! Prometheus metrics, names prefixed `fileflow_`: one registry per process (its API's
//! `/metrics`, or `--metrics-listen`), in the OpenMetrics text format `prometheus-client`
//! writes. Counters get their `_total` suffix from the format.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::lifecycle::Settlement;
use crate::metadata::JobRepository;
use crate::queue::Queue;

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Request {
    /// One of the standard methods, or `other`: never a value the client made up.
    pub method: &'static str,
    /// The route's pattern (`/api/v1/uploads/{id}`), never the path itself.
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostState {
    /// `busy` (every place taken and jobs waiting), `throttled` (fewer places than the
    /// limit after 429/503 answers) or `paused` (asked to be left alone: `Retry-After`).
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Route {
    pub route: String,
}

/// Latency buckets of API requests: 0.1 ms to about 3 s.
fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// What a process counts.
pub struct Metrics {
    registry: Registry,
    pub accepted: Counter,
    pub completed: Counter,
    pub failed: Family<Reason, Counter>,
    pub retried: Counter,
    pub cancelled: Counter,
    /// Answers 429 or 503 from origins (each halves its host's window of transfers).
    pub origin_throttled: Counter,
    /// Origin hosts in each state, in this process.
    pub origin_hosts: Family<HostState, Gauge>,
    /// Bytes of --max-memory the transfers hold now.
    pub memory_reserved: Gauge,
    pub bytes_stored: Counter,
    pub transfer_duration: Histogram,
    pub transfer_size: Histogram,
    pub in_flight: Gauge,
    pub queue_depth: Gauge,
    pub consumer_lag: Gauge,
    pub outbox_depth: Gauge,
    pub webhook_outbox_depth: Gauge,
    pub reannounced: Family<Kind, Counter>,
    pub sweep_duration: Histogram,
    pub requests: Family<Request, Counter>,
    pub request_duration: Family<Route, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let metrics = Self {
            accepted: Counter::default(),
            completed: Counter::default(),
            failed: Family::default(),
            retried: Counter::default(),
            cancelled: Counter::default(),
            origin_throttled: Counter::default(),
            origin_hosts: Family::default(),
            memory_reserved: Gauge::default(),
            bytes_stored: Counter::default(),
            // 10 ms to about 3 h.
            transfer_duration: Histogram::new(exponential_buckets(0.01, 3.0, 14)),
            // 1 KiB to 16 GiB.
            transfer_size: Histogram::new(exponential_buckets(1024.0, 4.0, 13)),
            in_flight: Gauge::default(),
            queue_depth: Gauge::default(),
            consumer_lag: Gauge::default(),
            outbox_depth: Gauge::default(),
            webhook_outbox_depth: Gauge::default(),
            reannounced: Family::default(),
            sweep_duration: latency_buckets(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_buckets),
            registry: Registry::default(),
        };
        let m = &metrics;
        registry.register(
            "fileflow_origin_throttled",
            "Origin answers 429 or 503, each of which halved its host's window of transfers at once",
            m.origin_throttled.clone(),
        );
        registry.register(
            "fileflow_origin_hosts",
            "Origin hosts by state in this process: busy (places taken, jobs waiting), throttled (window cut by 429/503), paused (Retry-After)",
            m.origin_hosts.clone(),
        );
        registry.register(
            "fileflow_memory_reserved_bytes",
            "Bytes of --max-memory the transfers of this process hold now",
            m.memory_reserved.clone(),
        );
        registry.register(
            "fileflow_jobs_accepted",
            "Jobs accepted (202, and each accepted batch item)",
            m.accepted.clone(),
        );
        registry.register("fileflow_jobs_completed", "Jobs completed", m.completed.clone());
        registry.register("fileflow_jobs_failed", "Jobs failed for good, by reason", m.failed.clone());
        registry.register("fileflow_jobs_retried", "Attempts that failed and were scheduled again", m.retried.clone());
        registry.register("fileflow_jobs_cancelled", "Jobs cancelled", m.cancelled.clone());
        registry.register(
            "fileflow_bytes_stored",
            "Bytes of the objects completed jobs stored",
            m.bytes_stored.clone(),
        );
        registry.register(
            "fileflow_transfer_duration_seconds",
            "Duration of the attempts that completed a job",
            m.transfer_duration.clone(),
        );
        registry.register(
            "fileflow_transfer_size_bytes",
            "Size of the objects completed jobs stored",
            m.transfer_size.clone(),
        );
        registry.register("fileflow_transfers_in_flight", "Transfers under way in this process", m.in_flight.clone());
        registry.register(
            "fileflow_queue_depth",
            "Jobs in the embedded queue (waiting or held)",
            m.queue_depth.clone(),
        );
        registry.register(
            "fileflow_kafka_consumer_lag",
            "Messages on the jobs topic the workers' group has not consumed yet",
            m.consumer_lag.clone(),
        );
        registry.register("fileflow_outbox_depth", "Job announcements waiting for the relay", m.outbox_depth.clone());
        registry.register(
            "fileflow_webhook_outbox_depth",
            "Webhook deliveries neither delivered nor given up",
            m.webhook_outbox_depth.clone(),
        );
        registry.register(
            "fileflow_reconciler_reannounced",
            "Jobs the reconciler announced again (kind: pending overdue, expired lease)",
            m.reannounced.clone(),
        );
        registry.register(
            "fileflow_reconciler_sweep_duration_seconds",
            "Duration of each reconciler sweep (stuck jobs, old idempotency keys, retention)",
            m.sweep_duration.clone(),
        );
        registry.register("fileflow_http_requests", "API requests answered, by route and status", m.requests.clone());
        registry.register(
            "fileflow_http_request_duration_seconds",
            "Time to answer API requests (to the response's head), by route",
            m.request_duration.clone(),
        );
        Self { registry, ..metrics }
    }

    /// Everything, in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }

    /// Count an attempt's recorded outcome.
    pub fn outcome(&self, settlement: &Settlement, elapsed: Duration) {
        match settlement {
            Settlement::Completed(stored) => {
                self.completed.inc();
                self.bytes_stored.inc_by(stored.size);
                self.transfer_size.observe(stored.size as f64);
                self.transfer_duration.observe(elapsed.as_secs_f64());
            }
            Settlement::RetryScheduled { .. } => {
                self.retried.inc();
            }
            Settlement::Failed { cause, .. } => {
                self.failed.get_or_create(&Reason { reason: cause.label() }).inc();
            }
            Settlement::Cancelled => {
                self.cancelled.inc();
            }
        }
    }

    /// Count one answered request. `route` is a route's pattern or a fixed word, `status`
    /// one fileflow answered: with the method's bounded label, no value here comes from the
    /// client, so no client can grow the series.
    pub fn request(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let method = method_label(method);
        self.requests.get_or_create(&Request { method, route: route.to_owned(), status }).inc();
        self.request_duration.get_or_create(&Route { route: route.to_owned() }).observe(elapsed.as_secs_f64());
    }

    /// Marks a transfer in flight until dropped.
    pub fn transfer(self: &Arc<Self>) -> InFlight {
        self.in_flight.inc();
        InFlight(self.clone())
    }
}

/// The label of an HTTP method: the standard ones (RFC 9110, and PATCH) as they are, any
/// other `other`.
pub fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "OPTIONS" => "OPTIONS",
        "CONNECT" => "CONNECT",
        "TRACE" => "TRACE",
        _ => "other",
    }
}

/// A transfer counted in [`Metrics::in_flight`].
pub struct InFlight(Arc<Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

/// How often gauges of shared state (queue depth, outbox depth) are read.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// Read the embedded queue's depth and the outboxes' now and then until `stop`.
pub async fn sample(
    metrics: Arc<Metrics>,
    repo: Arc<dyn JobRepository>,
    webhooks: Arc<dyn crate::metadata::WebhookOutbox>,
    queue: Option<Arc<dyn Queue>>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Some(queue) = &queue
            && let Some(depth) = queue.depth().await
        {
            metrics.queue_depth.set(i64::try_from(depth).unwrap_or(i64::MAX));
        }
        match repo.outbox_depth().await {
            Ok(Some(depth)) => {
                metrics.outbox_depth.set(i64::try_from(depth).unwrap_or(i64::MAX));
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "cannot read the outbox's depth"),
        }
        match webhooks.depth().await {
            Ok(depth) => {
                metrics.webhook_outbox_depth.set(i64::try_from(depth).unwrap_or(i64::MAX));
            }
            Err(e) => tracing::debug!(error = %e, "cannot read the webhook outbox's depth"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::{Cause, StoredObject};

    #[test]
    fn outcomes_and_requests_are_rendered_under_their_names() {
        let metrics = Arc::new(Metrics::new());
        metrics.accepted.inc();
        let stored = StoredObject {
            etag: "e".into(),
            size: 2048,
            sha256: None,
            md5: None,
            crc64nvme: None,
            content_type: None,
            version: None,
            origin: Default::default(),
            not_modified: false,
        };
        metrics.outcome(&Settlement::Completed(stored), Duration::from_millis(30));
        metrics
            .outcome(&Settlement::Failed { last_error: "HTTP 404".into(), cause: Cause::OriginStatus }, Duration::ZERO);
        metrics.request("POST", "/api/v1/upload", 202, Duration::from_micros(300));
        let flying = metrics.transfer();
        let text = metrics.render();
        for line in [
            "fileflow_jobs_accepted_total 1",
            "fileflow_jobs_completed_total 1",
            "fileflow_jobs_failed_total{reason=\"origin_status\"} 1",
            "fileflow_bytes_stored_total 2048",
            "fileflow_transfer_size_bytes_count 1",
            "fileflow_transfers_in_flight 1",
            "fileflow_http_requests_total{method=\"POST\",route=\"/api/v1/upload\",status=\"202\"} 1",
            "fileflow_http_request_duration_seconds_count{route=\"/api/v1/upload\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        drop(flying);
        assert!(metrics.render().lines().any(|l| l == "fileflow_transfers_in_flight 0"));
    }

    #[test]
    fn made_up_methods_count_as_other() {
        let metrics = Metrics::new();
        for method in ["XA1B2C3D4", "get", "PROPFIND", "POST "] {
            metrics.request(method, "unmatched", 405, Duration::ZERO);
        }
        let text = metrics.render();
        assert!(text.contains("fileflow_http_requests_total{method=\"other\",route=\"unmatched\",status=\"405\"} 4"));
        assert!(!text.contains("XA1B2C3D4") && !text.contains("PROPFIND"), "{text}");
    }
}
