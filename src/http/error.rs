//! The one error type of the HTTP API: `{"error":{"code","message"[,"field"]}}`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    MalformedJson(String),
    #[error("expected a request with Content-Type: application/json")]
    UnsupportedMediaType,
    #[error("request body is too large")]
    PayloadTooLarge,
    #[error("{field}: {message}")]
    InvalidField { field: &'static str, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Forbidden(String),
    /// Addressed to a host fileflow is not served under (DNS rebinding).
    #[error("{0}")]
    Misdirected(String),
    /// No key, or one that is not valid. `invalid` says a key was sent (RFC 6750 `invalid_token`).
    #[error("{message}")]
    Unauthorized { message: &'static str, invalid: bool },
    /// Over a limit of the caller's key; answered with `Retry-After`.
    #[error("{message}")]
    RateLimited { message: String, retry_after: std::time::Duration },
    /// Logged in full, answered without detail.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    pub fn invalid(field: &'static str, message: impl std::fmt::Display) -> Self {
        Self::InvalidField { field, message: message.to_string() }
    }

    pub fn status_code(&self) -> StatusCode {
        match self {
            Self::MalformedJson(_) => StatusCode::BAD_REQUEST,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::InvalidField { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Misdirected(_) => StatusCode::MISDIRECTED_REQUEST,
            Self::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Every [`ApiError::code`], as the API's description lists them.
    pub const CODES: [&'static str; 11] = [
        "malformed_json",
        "unsupported_media_type",
        "payload_too_large",
        "invalid_field",
        "not_found",
        "wrong_state",
        "forbidden",
        "misdirected_request",
        "unauthorized",
        "rate_limited",
        "internal",
    ];

    fn code(&self) -> &'static str {
        match self {
            Self::MalformedJson(_) => "malformed_json",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::PayloadTooLarge => "payload_too_large",
            Self::InvalidField { .. } => "invalid_field",
            Self::NotFound(_) => "not_found",
            Self::Conflict(_) => "wrong_state",
            Self::Forbidden(_) => "forbidden",
            Self::Misdirected(_) => "misdirected_request",
            Self::Unauthorized { .. } => "unauthorized",
            Self::RateLimited { .. } => "rate_limited",
            Self::Internal(_) => "internal",
        }
    }
}

impl From<crate::metadata::RepoError> for ApiError {
    fn from(e: crate::metadata::RepoError) -> Self {
        Self::Internal(e.into())
    }
}

/// What went wrong, as every error answer says it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// What kind of error: `malformed_json` (400), `unsupported_media_type` (415),
    /// `payload_too_large` (413), `invalid_field` (422), `not_found` (404), `wrong_state` (409),
    /// `forbidden` (403), `misdirected_request` (421), `unauthorized` (401), `rate_limited`
    /// (429), `internal` (500).
    pub code: &'static str,
    pub message: String,
    /// The field at fault (422 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// An error answer: `{"error":{…}}`.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

impl ApiError {
    /// What went wrong (an internal error is logged in full and shown without detail).
    pub fn body(&self) -> ErrorDetail {
        let message = match self {
            Self::Internal(e) => {
                tracing::error!(error = format!("{e:#}"), "request failed");
                "internal error".to_owned()
            }
            other => other.to_string(),
        };
        let field = match self {
            Self::InvalidField { field, .. } => Some(field.to_string()),
            _ => None,
        };
        ErrorDetail { code: self.code(), message, field }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status_code(), Json(ErrorBody { error: self.body() })).into_response();
        let headers = response.headers_mut();
        match &self {
            Self::Unauthorized { invalid, .. } => {
                let challenge = if *invalid {
                    r#"Bearer realm="fileflow", error="invalid_token""#
                } else {
                    r#"Bearer realm="fileflow""#
                };
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
            }
            Self::RateLimited { retry_after, .. } => {
                // Whole seconds, rounded up, never 0 (a client would come straight back).
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_description_lists_every_code() {
        let every = [
            ApiError::MalformedJson(String::new()),
            ApiError::UnsupportedMediaType,
            ApiError::PayloadTooLarge,
            ApiError::invalid("f", ""),
            ApiError::NotFound(String::new()),
            ApiError::Conflict(String::new()),
            ApiError::Forbidden(String::new()),
            ApiError::Misdirected(String::new()),
            ApiError::Unauthorized { message: "", invalid: false },
            ApiError::RateLimited { message: String::new(), retry_after: std::time::Duration::ZERO },
            ApiError::Internal(anyhow::anyhow!("")),
        ];
        let codes: Vec<&str> = every.iter().map(ApiError::code).collect();
        assert_eq!(codes, ApiError::CODES);
    }
}
