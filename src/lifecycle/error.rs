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

/// What part of the work failed: a short, bounded name (metrics count failed jobs by it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Cause {
    /// The origin answered with an error status, or an answer fileflow cannot use.
    OriginStatus,
    /// The origin asked fileflow to slow down (429 or 503).
    Throttled,
    /// The content did not match its declared size or checksums.
    Verification,
    /// Larger than the limit.
    TooLarge,
    /// A destination refused by the fetching rules (address, scheme, redirect).
    Destination,
    /// `if_exists: fail` met an object.
    Exists,
    /// The object store.
    Store,
    /// Too slow: a timeout or the minimum rate.
    Timeout,
    /// The connection to the origin: cannot connect, reset, cut short.
    Network,
    #[default]
    Other,
}

impl Cause {
    pub fn label(self) -> &'static str {
        match self {
            Self::OriginStatus => "origin_status",
            Self::Throttled => "throttled",
            Self::Verification => "verification",
            Self::TooLarge => "too_large",
            Self::Destination => "destination",
            Self::Exists => "exists",
            Self::Store => "store",
            Self::Timeout => "timeout",
            Self::Network => "network",
            Self::Other => "other",
        }
    }
}

/// Why one attempt at a job failed, classified where it happened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct JobError {
    pub kind: ErrorKind,
    pub cause: Cause,
    pub message: String,
    /// A delay the origin asked for (`Retry-After`).
    pub retry_after: Option<Duration>,
}

impl JobError {
    pub fn transient(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Transient, cause: Cause::Other, message: message.into(), retry_after: None }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Permanent, cause: Cause::Other, message: message.into(), retry_after: None }
    }

    /// The error for an HTTP answer with `status`: 5xx, 408 and 429 may pass (transient),
    /// the rest will not (permanent).
    pub fn for_http_status(status: u16, message: impl Into<String>) -> Self {
        match status {
            500..=599 | 408 | 429 => Self::transient(message),
            _ => Self::permanent(message),
        }
    }

    pub fn cancelled() -> Self {
        Self {
            kind: ErrorKind::Cancelled,
            cause: Cause::Other,
            message: "cancelled by request".into(),
            retry_after: None,
        }
    }

    /// Say what part of the work failed.
    pub fn because(mut self, cause: Cause) -> Self {
        self.cause = cause;
        self
    }

    /// `cause`, unless a more precise one is known (a store's write fails with the
    /// origin's error when the body it streams breaks).
    pub fn or_because(self, cause: Cause) -> Self {
        match self.cause {
            Cause::Other => self.because(cause),
            _ => self,
        }
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
