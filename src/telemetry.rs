//! Logging and tracing: one structured event per line, JSON for machines, text for
//! people; and, when a collector is configured, the spans of requests and transfers
//! exported over OTLP, joined into one trace from the caller through the API and the
//! queue to the worker.

use std::io::IsTerminal;

use anyhow::Context as _;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider};
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};
use url::Url;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// JSON lines when standard error is not a terminal, readable text when it is.
    Auto,
    Json,
    Text,
}

/// The spans fileflow exports: an API request, and one attempt at a job's transfer (a
/// child of the request that created the job, in whichever process runs it). Log lines
/// logged inside them go along as span events.
const EXPORTED_SPANS: [&str; 2] = ["request", "transfer"];

/// What [`init`] set up; [`Telemetry::shutdown`] sends the spans still buffered.
#[must_use = "shut it down at exit, or the last spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Export what is still buffered and stop exporting (blocks for at most the exporter's timeout).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "could not send the last traces");
        }
    }
}

/// Install the global subscriber. `RUST_LOG` overrides the default level (`info`). Traces
/// are exported when `otlp` names a collector (its `/v1/traces` is posted to) or the
/// standard `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set;
/// `process` (serve, api, worker) goes on the resource beside `service.name`, which is
/// `fileflow` unless `OTEL_SERVICE_NAME` says otherwise.
pub fn init(format: LogFormat, otlp: Option<&Url>, process: &str) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let lines = if json {
        // The spans a line was logged in (a request with its `request_id`, a job with its
        // `job_id`) come with it, under `spans`.
        lines.json().flatten_event(true).with_current_span(false).with_span_list(true).boxed()
    } else {
        lines.boxed()
    };
    let provider = exporting(otlp).then(|| tracer_provider(otlp, process)).transpose()?;
    let export = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("fileflow"))
            .with_filter(filter_fn(|meta| !meta.is_span() || EXPORTED_SPANS.contains(&meta.name())))
    });
    tracing_subscriber::registry().with(filter).with(lines).with(export).init();
    if let Some(endpoint) = otlp {
        tracing::info!(%endpoint, "exporting traces over OTLP");
    }
    Ok(Telemetry { provider })
}

fn exporting(otlp: Option<&Url>) -> bool {
    otlp.is_some()
        || ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
            .iter()
            .any(|var| std::env::var_os(var).is_some_and(|v| !v.is_empty()))
}

/// Spans batched and posted as OTLP protobuf over HTTP, from a thread of their own.
fn tracer_provider(otlp: Option<&Url>, process: &str) -> anyhow::Result<SdkTracerProvider> {
    let mut exporter = SpanExporter::builder().with_http();
    if let Some(base) = otlp {
        exporter = exporter.with_endpoint(format!("{}/v1/traces", base.as_str().trim_end_matches('/')));
    }
    let exporter = exporter.build().context("cannot set up the OTLP trace exporter")?;
    let mut resource =
        Resource::builder().with_attribute(opentelemetry::KeyValue::new("fileflow.process", process.to_owned()));
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("fileflow");
    }
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build())
}

/// Give `span` its place in a trace: a child of `parent` (a caller's or a job's trace
/// context) when there is one, else the start of a trace. Returns the span's own trace
/// context, to hand on (a job keeps its request's); its `trace_id` is recorded on the
/// span, so the span's log lines name it. With export off, the ids are made here.
pub fn join(span: &tracing::Span, parent: Option<&TraceParent>) -> TraceParent {
    if let Some(parent) = parent {
        // Fails only when nothing is exported (no layer), which is fine.
        let _ = span.set_parent(parent.remote_context());
    }
    let exported = span.context().span().span_context().clone();
    let trace = if exported.is_valid() {
        TraceParent { trace_id: exported.trace_id().to_string(), span_id: exported.span_id().to_string() }
    } else {
        TraceParent::child_of(parent)
    };
    span.record("trace_id", trace.trace_id.as_str());
    trace
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
    /// A new span in `parent`'s trace, or in a new trace.
    pub fn child_of(parent: Option<&Self>) -> Self {
        let span_id = random_hex(8);
        match parent {
            Some(parent) => Self { trace_id: parent.trace_id.clone(), span_id },
            None => Self { trace_id: random_hex(16), span_id },
        }
    }

    /// As the remote parent of a span fileflow exports.
    fn remote_context(&self) -> opentelemetry::Context {
        let span = SpanContext::new(
            TraceId::from_hex(&self.trace_id).unwrap_or(TraceId::INVALID),
            SpanId::from_hex(&self.span_id).unwrap_or(SpanId::INVALID),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        opentelemetry::Context::new().with_remote_span_context(span)
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
    fn a_callers_trace_is_continued_and_a_bad_header_starts_a_new_one_without_export() {
        let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let next = TraceParent::child_of(TraceParent::parse(caller).as_ref());
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
            let fresh = TraceParent::child_of(TraceParent::parse(bad).as_ref());
            assert_eq!((fresh.trace_id.len(), fresh.span_id.len()), (32, 16));
            assert_ne!(fresh.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        }
    }
}
