//! A batch's request as it is kept with the batch: what its reader needs, also after a restart.

use serde::{Deserialize, Serialize};

use super::manifest::{Defaults, Format};
use crate::domain::{BucketName, InvalidValue, ObjectKey};

/// A bucket and an object name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Location {
    #[schema(value_type = crate::http::fields::BucketName)]
    pub bucket_name: String,
    #[schema(value_type = crate::http::fields::ObjectName)]
    pub object_name: String,
}

impl Location {
    /// The bucket and object it names, checked.
    pub fn parse(&self) -> Result<(BucketName, ObjectKey), InvalidValue> {
        Ok((BucketName::parse(&self.bucket_name)?, ObjectKey::parse(&self.object_name)?))
    }
}

/// Where a manifest is read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ManifestSource {
    /// Fetched as any source is (the destination guard, the HTTP fetcher).
    Url(String),
    /// An object in the store.
    Stored { bucket_name: String, object_name: String },
}

/// A batch's request as kept with it: what the reader needs after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRequest {
    pub source: ManifestSource,
    pub format: Option<Format>,
    pub defaults: Defaults,
    pub report: Option<Location>,
    pub traceparent: Option<String>,
}

impl BatchRequest {
    pub fn from_stored(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("the batch's stored request is unreadable: {e}"))
    }
}
