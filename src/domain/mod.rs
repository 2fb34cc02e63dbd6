//! Validated values that enter fileflow from the outside world.
//!
//! Each type is parsed once, at the edge, and can only hold a valid value afterwards
//! ("parse, don't validate").

pub mod api_key;
mod bucket_name;
mod checksum;
mod object_key;
mod request_headers;
mod source_url;

pub use api_key::{ApiKey, IssuedKey, KeyLimits, NewKey, Role, Scope};
pub use bucket_name::BucketName;
pub use checksum::{Md5Hex, Sha256Hex};
pub use object_key::ObjectKey;
pub use request_headers::{RequestHeaders, SealedHeaders};
pub use source_url::SourceUrl;

/// Why a value was refused; the message is meant for the API caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(pub String);

impl InvalidValue {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}
