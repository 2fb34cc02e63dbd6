//! The HTTP API. Each area owns its router; this module merges them and adds what every
//! request gets (a body limit and one log line).

mod auth;
mod batch;
mod batches;
mod dashboard;
mod downloads;
mod error;
mod events;
mod extract;
mod fields;
mod health;
mod metrics;
mod openapi;
mod serve;
mod sites;
mod state;
mod uploads;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tracing::Instrument as _;

use crate::metrics::Metrics;
use crate::telemetry::TraceParent;

pub use batches::run_batches;
pub use error::ApiError;
pub use metrics::{metrics_router, metrics_text};
pub use openapi::document as openapi_document;
pub use serve::{ServerLimits, serve};
pub use sites::SitePolicy;
pub use state::AppState;

/// Largest request body the API reads; an upload request is a few hundred bytes.
const MAX_BODY: usize = 64 * 1024;

/// The API. `request_timeout` bounds reading a request (its body is read inside the
/// handler) and producing its answer; a download's body streams on after it. (A body-level
/// timeout layer was tried too: wrapping every request body cost the distributed accept
/// four fifths of its throughput at 8 clients, 4,291 → 894 jobs/s, and bought nothing.)
pub fn router(state: AppState, request_timeout: Duration) -> Router {
    // Every /api/ route needs a caller the gate admits, except signed download links,
    // which carry their own authority.
    let keyed = uploads::router()
        .merge(batch::router())
        .merge(batches::router())
        .merge(events::router())
        .merge(metrics::router())
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
