//! `/metrics`: Prometheus metrics for admin keys, and the small metrics server of a worker
//! process (`--metrics-listen`).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Extension, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::error::{self, ApiError};
use super::state::AppState;
use crate::auth::Caller;
use crate::metrics::Metrics;

pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

/// Prometheus metrics (OpenMetrics text), for admin keys (and the open API).
#[utoipa::path(get, path = "/metrics", tag = "metrics",
    responses((status = 200, description = "the metrics", content_type = "application/openmetrics-text"),
        (status = 403, description = "not an admin key", body = error::ErrorBody)))]
pub(super) async fn metrics(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
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
