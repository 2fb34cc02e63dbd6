//! The API's door: every `/api/` route but signed downloads passes through [`authenticate`],
//! which puts the [`Caller`] in the request for the handlers to judge what it may see.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;

use super::error::ApiError;
use super::state::AppState;
use crate::auth::{Caller, Refusal};

/// How long an answer to an address out of its keyless allowance is held.
const TARPIT: std::time::Duration = std::time::Duration::from_secs(1);

pub async fn authenticate(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let bearer = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
        .map(str::trim);
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let admitted = state.gate.admit(bearer, peer).await;
    if let Err(Refusal::TooManyStrangers(_)) = &admitted {
        // Hold the answer a moment: a client that floods with bad keys gets one answer per
        // connection per TARPIT, not as many as it can send (its connections are capped
        // per address), so it cannot spend the server's time that other clients need.
        tokio::time::sleep(TARPIT).await;
    }
    let caller: Caller = admitted.map_err(|refusal| match refusal {
        Refusal::Missing => ApiError::Unauthorized {
            message: "this API needs a key: send `Authorization: Bearer <key>`",
            invalid: false,
        },
        Refusal::Invalid => ApiError::Unauthorized {
            message: "the API key is not valid (unknown, malformed or revoked)",
            invalid: true,
        },
        Refusal::RateLimited(wait) => {
            ApiError::RateLimited { message: "too many requests for this API key".into(), retry_after: wait }
        }
        Refusal::TooManyStrangers(wait) => ApiError::RateLimited {
            message: "too many requests without a valid API key from this address".into(),
            retry_after: wait.saturating_sub(TARPIT),
        },
        Refusal::Unavailable => ApiError::Internal(anyhow::anyhow!("API keys cannot be looked up now")),
    })?;
    request.extensions_mut().insert(caller);
    Ok(next.run(request).await)
}
