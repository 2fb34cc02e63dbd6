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

/// A whole number from 0 to `max`, however JSON writes it (`3`, `3.0`, `3e0`: JSON Schema's
/// `integer` takes them all).
pub fn whole_number(value: &Value, max: u64) -> Option<u64> {
    let n = match value.as_u64() {
        Some(n) => n,
        None => value.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= max as f64).map(|f| f as u64)?,
    };
    (n <= max).then_some(n)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn whole_numbers_may_be_written_as_floats_but_not_be_fractions_or_out_of_range() {
        for (value, expected) in [
            (json!(3), Some(3)),
            (json!(3.0), Some(3)),
            (json!(0), Some(0)),
            (json!(10), Some(10)),
            (json!(11), None),
            (json!(3.5), None),
            (json!(-1), None),
            (json!(-0.0), Some(0)),
            (json!("3"), None),
            (json!(1e300), None),
        ] {
            assert_eq!(whole_number(&value, 10), expected, "{value}");
        }
        assert_eq!(whole_number(&json!(u64::MAX), i64::MAX as u64), None);
        assert_eq!(whole_number(&json!(9.3e18), i64::MAX as u64), None);
    }
}
