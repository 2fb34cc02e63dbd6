//! The HTTP API. Each area owns its router; this module merges them and adds what every
//! request gets (a body limit and one log line).

mod auth;
mod batch;
mod dashboard;
mod downloads;
mod error;
mod events;
mod extract;
mod health;
mod openapi;
mod serve;
mod sites;
mod uploads;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tracing::Instrument as _;

use crate::auth::{Caller, Gate};
use crate::events::ChangeFeed;
use crate::fetch::DestinationGuard;
use crate::links::{DownloadLinks, LinkSigner};
use crate::metadata::JobRepository;
use crate::metrics::Metrics;
use crate::secrets::HeaderSealer;
use crate::storage::ObjectStore;
use crate::telemetry::TraceParent;
use crate::webhooks::WebhookOutbox;

pub use error::ApiError;
pub use openapi::document as openapi_document;
pub use serve::{ServerLimits, serve};
pub use sites::SitePolicy;
pub use uploads::job_json;

/// Largest request body the API reads; an upload request is a few hundred bytes.
const MAX_BODY: usize = 64 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub repo: Arc<dyn JobRepository>,
    pub store: Arc<dyn ObjectStore>,
    pub links: Arc<dyn DownloadLinks>,
    /// Set when fileflow signs and serves download links itself.
    pub signer: Option<Arc<LinkSigner>>,
    pub guard: DestinationGuard,
    /// Who may call the API.
    pub gate: Arc<Gate>,
    /// Encrypts per-job origin headers before they reach the database.
    pub sealer: Arc<HeaderSealer>,
    /// The server's largest file; a key's own limit can only lower it.
    pub max_file_size: u64,
    /// Webhook deliveries and their tries, for the job's view.
    pub outbox: Arc<dyn WebhookOutbox>,
    /// Whether webhooks can be signed (a secret is configured): `notify_url` needs it.
    pub webhooks_signed: bool,
    pub metrics: Arc<Metrics>,
    /// Job changes as they happen, for the event streams.
    pub changes: Arc<ChangeFeed>,
    /// Which hosts the API is served under and which sites' pages may change things.
    pub sites: Arc<SitePolicy>,
}

/// The API. `request_timeout` bounds reading a request (its body is read inside the
/// handler) and producing its answer; a download's body streams on after it. (A body-level
/// timeout layer was tried too: wrapping every request body cost the distributed accept
/// four fifths of its throughput at 8 clients, 4,291 → 894 jobs/s, and bought nothing.)
pub fn router(state: AppState, request_timeout: Duration) -> Router {
    // Every /api/ route needs a caller the gate admits, except signed download links,
    // which carry their own authority.
    let keyed = uploads::router()
        .merge(batch::router())
        .merge(events::router())
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::authenticate));
    Router::new()
        .merge(keyed)
        .merge(downloads::router())
        .merge(health::router())
        .merge(dashboard::router())
        .merge(openapi::router())
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, request_timeout))
        // Outermost first: the Host check (DNS rebinding), CORS answers for --cors-origins,
        // then the cross-site check of state-changing requests.
        .layer(middleware::from_fn_with_state(state.sites.clone(), sites::check_origin))
        .layer(tower::util::option_layer(state.sites.cors_layer()))
        .layer(middleware::from_fn_with_state(state.sites.clone(), sites::check_host))
        .layer(middleware::from_fn_with_state(state.metrics.clone(), log_request))
        // Every request gets an id (a caller's own `X-Request-Id` is kept), in its answer
        // and on every log line written while it is served.
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}

/// Prometheus metrics (OpenMetrics text), for admin keys (and the open API).
#[utoipa::path(get, path = "/metrics", tag = "metrics",
    responses((status = 200, description = "the metrics", content_type = "application/openmetrics-text"),
        (status = 403, description = "not an admin key", body = error::ErrorBody)))]
async fn metrics(State(state): State<AppState>, Extension(caller): Extension<Caller>) -> Result<Response, ApiError> {
    if !caller.is_admin() {
        return Err(ApiError::Forbidden("metrics are for admin keys".into()));
    }
    Ok(metrics_text(&state.metrics))
}

/// The metrics as an HTTP answer.
pub fn metrics_text(metrics: &Metrics) -> Response {
    ([(CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], metrics.render()).into_response()
}

/// A worker process's own small server on `--metrics-listen`: `/metrics` and `/healthz`,
/// open (it is meant for a private network or loopback).
pub fn metrics_router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(|State(m): State<Arc<Metrics>>| async move { metrics_text(&m) }))
        .route("/healthz", get(|| async { axum::Json(serde_json::json!({ "status": "ok" })) }))
        .with_state(metrics)
}

/// One structured line per request, and its count and latency by route; every line logged
/// while the request is served carries its `request_id`. The query string is left out: it
/// may hold a signature.
async fn log_request(State(metrics): State<Arc<Metrics>>, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let caller = request.headers().get("traceparent").and_then(|v| v.to_str().ok()).and_then(TraceParent::parse);
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |m| m.as_str()).to_owned();
    let request_id = request.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    // Span names and attributes, like metric labels, never carry a method the client made up.
    let label = crate::metrics::method_label(method.as_str());
    let span = tracing::info_span!("request", %request_id, trace_id = tracing::field::Empty,
        otel.name = format!("{label} {route}"), otel.kind = "server", http.request.method = label,
        http.route = %route, http.response.status_code = tracing::field::Empty, otel.status_code = tracing::field::Empty);
    let trace = crate::telemetry::join(&span, caller.as_ref());
    request.extensions_mut().insert(trace);
    let response = next.run(request).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    metrics.request(method.as_str(), &route, status, elapsed);
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
    span.in_scope(|| {
        tracing::info!(%method, uri = %path, status, latency_us = elapsed.as_micros() as u64, "request");
    });
    response
}
