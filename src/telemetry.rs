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
