//! What goes on the topics: the seed's JSON job message, keyed by job id, with the
//! attempt and due time in headers on the retry topic.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The seed's message: `{"id","file_url","bucket_name","object_name"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobMessage {
    pub id: String,
    pub file_url: String,
    pub bucket_name: String,
    pub object_name: String,
}

pub const ATTEMPT_HEADER: &str = "fileflow-attempt";
/// The W3C trace context of the request that created the job.
pub const TRACEPARENT_HEADER: &str = "traceparent";
pub const DUE_AT_HEADER: &str = "fileflow-due-at-ms";
pub const ERROR_HEADER: &str = "fileflow-error";
pub const ORIGIN_TOPIC_HEADER: &str = "fileflow-origin-topic";
pub const ORIGIN_PARTITION_HEADER: &str = "fileflow-origin-partition";
pub const ORIGIN_OFFSET_HEADER: &str = "fileflow-origin-offset";

pub fn due_at_from_header(value: Option<&[u8]>) -> Option<DateTime<Utc>> {
    let ms: i64 = std::str::from_utf8(value?).ok()?.parse().ok()?;
    DateTime::<Utc>::from_timestamp_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_is_the_seeds_json() {
        let raw = r#"{"id":"21","file_url":"https://cdn.example/photo.jpg","bucket_name":"file-bucket","object_name":"kitty2.jpg"}"#;
        let msg: JobMessage = serde_json::from_str(raw).unwrap();
        assert_eq!(msg.id, "21");
        assert_eq!(serde_json::to_string(&msg).unwrap(), raw);
        assert!(serde_json::from_str::<JobMessage>(r#"{"id": 21}"#).is_err());
    }

    #[test]
    fn due_times_round_trip_through_headers() {
        let t = DateTime::<Utc>::from_timestamp_millis(1_795_868_005_123).unwrap();
        assert_eq!(due_at_from_header(Some(t.timestamp_millis().to_string().as_bytes())), Some(t));
        assert_eq!(due_at_from_header(Some(b"soon")), None);
        assert_eq!(due_at_from_header(None), None);
    }
}
