//! Request extractors that answer in the API's error shape.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde_json::{Map, Value};

use super::error::ApiError;

/// A JSON object body. Field checks are left to the handler, so each error names its field.
pub struct JsonObject(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<Value>::from_request(req, state).await {
            Ok(axum::Json(Value::Object(map))) => Ok(Self(map)),
            Ok(_) => Err(ApiError::MalformedJson("request body must be a JSON object".into())),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::UnsupportedMediaType),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::PayloadTooLarge),
            Err(rejection) => Err(ApiError::MalformedJson(rejection.body_text())),
        }
    }
}

impl JsonObject {
    /// A string field; `Ok(None)` when absent or null.
    pub fn optional_str(&self, field: &'static str) -> Result<Option<&str>, ApiError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::invalid(field, "must be a string")),
        }
    }

    pub fn required_str(&self, field: &'static str) -> Result<&str, ApiError> {
        self.optional_str(field)?.ok_or_else(|| ApiError::invalid(field, "is required"))
    }
}
