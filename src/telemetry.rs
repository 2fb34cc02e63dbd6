//! Logging: one structured event per line, JSON for machines, text for people.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Install the global subscriber. `RUST_LOG` overrides the default level (`info`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        // The spans a line was logged in (a request with its `request_id`, a job with its
        // `job_id`) come with it, under `spans`.
        builder.json().flatten_event(true).with_current_span(false).with_span_list(true).init();
    } else {
        builder.init();
    }
}

/// A W3C trace context (`traceparent`, <https://www.w3.org/TR/trace-context/>): the trace
/// a request belongs to and the span fileflow gives it. A job keeps its request's, and its
/// message carries it to the worker, so the request's and the job's lines share a trace id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits.
    pub span_id: String,
}

impl TraceParent {
    /// A new span in the caller's trace when `header` is a valid `traceparent`, else in a new trace.
    pub fn continue_or_start(header: Option<&str>) -> Self {
        let span_id = random_hex(8);
        match header.and_then(Self::parse) {
            Some(caller) => Self { trace_id: caller.trace_id, span_id },
            None => Self { trace_id: random_hex(16), span_id },
        }
    }

    /// A `traceparent` header's trace and parent span; `None` unless valid (version 00,
    /// ids of the right length in lowercase hex and not all zeros).
    pub fn parse(header: &str) -> Option<Self> {
        let mut parts = header.trim().split('-');
        let (version, trace_id, span_id, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                && s.bytes().any(|b| b != b'0')
        };
        let valid =
            version == "00" && parts.next().is_none() && hex(trace_id, 32) && hex(span_id, 16) && flags.len() == 2;
        valid.then(|| Self { trace_id: trace_id.to_owned(), span_id: span_id.to_owned() })
    }

    /// As a `traceparent` header (sampled).
    pub fn header(&self) -> String {
        format!("00-{}-{}-01", self.trace_id, self.span_id)
    }
}

fn random_hex(bytes: usize) -> String {
    let mut raw = vec![0u8; bytes];
    rand::Rng::fill(&mut rand::rng(), raw.as_mut_slice());
    hex::encode(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_callers_trace_is_continued_and_a_bad_header_starts_a_new_one() {
        let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let next = TraceParent::continue_or_start(Some(caller));
        assert_eq!(next.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(next.span_id, "00f067aa0ba902b7");
        assert_eq!(TraceParent::parse(&next.header()), Some(next.clone()));
        for bad in [
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "garbage",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
            let fresh = TraceParent::continue_or_start(Some(bad));
            assert_eq!((fresh.trace_id.len(), fresh.span_id.len()), (32, 16));
            assert_ne!(fresh.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        }
    }
}
