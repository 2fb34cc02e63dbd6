//! Liveness and readiness.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use serde_json::{Value, json};

use super::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz))
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "health", security(()), responses((status = 200, description = "up")))]
pub(super) async fn healthz() -> axum::Json<Value> {
    axum::Json(json!({ "status": "ok" }))
}

/// The process can serve requests: its database answers.
#[utoipa::path(get, path = "/readyz", tag = "health", security(()),
    responses((status = 200, description = "ready"), (status = 503, description = "the database does not answer")))]
pub(super) async fn readyz(State(state): State<AppState>) -> (StatusCode, axum::Json<Value>) {
    match state.repo.ping().await {
        Ok(()) => (StatusCode::OK, axum::Json(json!({ "status": "ready" }))),
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({ "status": "unavailable" })))
        }
    }
}
