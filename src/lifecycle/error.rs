use std::fmt;
use std::time::Duration;

/// Whether trying again could help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Timeouts, resets, 5xx, 408, 429, store throttling: worth another attempt.
    Transient,
    /// Origin 4xx, refused destination, too large, checksum mismatch, bad bucket: retrying cannot help.
    Permanent,
    /// A caller cancelled the job: the attempt stopped on purpose.
    Cancelled,
}

/// Why one attempt at a job failed, classified where it happened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct JobError {
    pub kind: ErrorKind,
    pub message: String,
    /// A delay the origin asked for (`Retry-After`).
    pub retry_after: Option<Duration>,
}

impl JobError {
    pub fn transient(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Transient, message: message.into(), retry_after: None }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Permanent, message: message.into(), retry_after: None }
    }

    pub fn cancelled() -> Self {
        Self { kind: ErrorKind::Cancelled, message: "cancelled by request".into(), retry_after: None }
    }

    pub fn with_retry_after(mut self, delay: Option<Duration>) -> Self {
        self.retry_after = delay;
        self
    }

    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}
