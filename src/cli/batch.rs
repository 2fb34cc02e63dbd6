//! `fileflow batch …`: submit a manifest (a local file is sent with the request; a URL is
//! fetched by the server), follow the batch with one progress bar, list and steer batches.

use std::io::{IsTerminal as _, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use serde_json::{Value, json};
use url::Url;

use super::api::{Client, Request, human, print_value};
use crate::config::{BatchCommand, OutputFormat};

/// How often `--wait` looks at a batch.
const POLL: Duration = Duration::from_millis(500);

pub(super) async fn run(
    client: &Client,
    action: BatchCommand,
    format: OutputFormat,
    out: &mut impl Write,
) -> anyhow::Result<ExitCode> {
    let (batch, wait) = match action {
        BatchCommand::Submit {
            manifest,
            bucket,
            prefix,
            format: manifest_format,
            manifest_key,
            report,
            if_exists,
            priority,
            notify_url,
            wait,
            ..
        } => {
            let defaults =
                Defaults { bucket, prefix, format: manifest_format, report, if_exists, priority, notify_url };
            let batch = if manifest.starts_with("http://") || manifest.starts_with("https://") {
                submit_url(client, &manifest, &defaults).await?
            } else {
                submit_file(client, Path::new(&manifest), manifest_key, &defaults).await?
            };
            if !wait {
                let id = batch["id"].as_str().unwrap_or_default().to_owned();
                print_value(out, format, &batch, |o| writeln!(o, "{id}"))?;
                return Ok(ExitCode::SUCCESS);
            }
            (batch, true)
        }
        BatchCommand::Show { id, wait, .. } => {
            (client.call(Method::GET, &format!("/api/v1/batches/{id}"), None).await?, wait)
        }
        BatchCommand::List { limit, before, .. } => {
            let mut path = format!("/api/v1/batches?limit={limit}");
            if let Some(before) = before {
                path.push_str(&format!("&before={before}"));
            }
            let listed = client.call(Method::GET, &path, None).await?;
            print_value(out, format, &listed, |o| {
                writeln!(
                    o,
                    "{:>8}  {:10}  {:>9}  {:>9}  {:>7}  {:>7}  {:>7}",
                    "ID", "STATUS", "ROWS", "COMPLETED", "FAILED", "INVALID", "WAITING"
                )?;
                for batch in listed["batches"].as_array().into_iter().flatten() {
                    let c = &batch["counts"];
                    let n = |f: &str| c[f].as_u64().unwrap_or(0);
                    writeln!(
                        o,
                        "{:>8}  {:10}  {:>9}  {:>9}  {:>7}  {:>7}  {:>7}",
                        batch["id"].as_str().unwrap_or(""),
                        batch["status"].as_str().unwrap_or(""),
                        batch["total"].as_u64().unwrap_or(0),
                        n("completed"),
                        n("failed") + n("cancelled"),
                        n("invalid"),
                        n("pending") + n("processing"),
                    )?;
                }
                if let Some(next) = listed["next_before"].as_str() {
                    writeln!(o, "more: --before {next}")?;
                }
                Ok(())
            })?;
            return Ok(ExitCode::SUCCESS);
        }
        BatchCommand::Cancel { id, .. } => (steer(client, &id, "cancel").await?, false),
        BatchCommand::Pause { id, .. } => (steer(client, &id, "pause").await?, false),
        BatchCommand::Resume { id, .. } => (steer(client, &id, "resume").await?, false),
    };
    let batch = if wait { follow(client, &batch).await? } else { batch };
    print_batch(out, format, &batch)?;
    Ok(if !wait || every_row_completed(&batch) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The batch's settings for its rows, as the command line gave them.
struct Defaults {
    bucket: Option<String>,
    prefix: String,
    format: Option<String>,
    report: Option<String>,
    if_exists: Option<String>,
    priority: Option<u32>,
    notify_url: Option<String>,
}

async fn submit_url(client: &Client, manifest: &str, d: &Defaults) -> anyhow::Result<Value> {
    let mut body = json!({ "manifest_url": manifest, "prefix": d.prefix });
    for (field, value) in
        [("bucket_name", &d.bucket), ("format", &d.format), ("if_exists", &d.if_exists), ("notify_url", &d.notify_url)]
    {
        if let Some(value) = value {
            body[field] = json!(value);
        }
    }
    if let Some(priority) = d.priority {
        body["priority"] = json!(priority);
    }
    if let Some(report) = &d.report {
        let bucket = d.bucket.as_deref().context("--report needs --bucket, where the report goes")?;
        body["report"] = json!({ "bucket_name": bucket, "object_name": report });
    }
    client.call(Method::POST, "/api/v1/batches", Some(Request::Json(body))).await
}

async fn submit_file(
    client: &Client,
    path: &Path,
    manifest_key: Option<String>,
    d: &Defaults,
) -> anyhow::Result<Value> {
    let bucket =
        d.bucket.as_deref().context("--bucket is required with a local manifest: the server keeps it there")?;
    let file = tokio::fs::File::open(path).await.with_context(|| format!("cannot read {}", path.display()))?;
    let name = path.file_name().and_then(|n| n.to_str()).context("the manifest's path names no file")?;
    // A name of its own, so a batch never reads another submission's manifest.
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    let key = manifest_key.unwrap_or_else(|| format!("manifests/{stamp}-{name}"));
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let content_type = match (d.format.as_deref(), extension.as_str()) {
        (Some("csv"), _) | (None, "csv") => "text/csv",
        (Some("jsonl"), _) | (None, "jsonl" | "ndjson") => "application/x-ndjson",
        (Some("tsv"), _) | (None, "tsv") => "text/tab-separated-values",
        _ => "application/octet-stream",
    };
    let mut url = Url::parse("http://x/api/v1/batches/upload").expect("a valid URL");
    {
        let mut query = url.query_pairs_mut();
        query.append_pair("bucket_name", bucket).append_pair("manifest_object_name", &key);
        query.append_pair("prefix", &d.prefix);
        for (name, value) in [
            ("format", &d.format),
            ("if_exists", &d.if_exists),
            ("notify_url", &d.notify_url),
            ("report_object_name", &d.report),
        ] {
            if let Some(value) = value {
                query.append_pair(name, value);
            }
        }
        if let Some(priority) = d.priority {
            query.append_pair("priority", &priority.to_string());
        }
    }
    let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
    let path = format!("{}?{}", url.path(), url.query().unwrap_or(""));
    client.call(Method::POST, &path, Some(Request::Stream { content_type, body })).await
}

async fn steer(client: &Client, id: &str, action: &str) -> anyhow::Result<Value> {
    client.call(Method::POST, &format!("/api/v1/batches/{id}/{action}"), None).await
}

fn count(batch: &Value, field: &str) -> u64 {
    batch["counts"][field].as_u64().unwrap_or(0)
}

/// Rows whose job has ended, or that could not become one.
fn rows_done(batch: &Value) -> u64 {
    ["completed", "failed", "cancelled", "invalid"].iter().map(|f| count(batch, f)).sum()
}

/// Whether the batch did all it was asked: the whole manifest read, every row's job
/// completed, and its report written if it asked for one.
fn every_row_completed(batch: &Value) -> bool {
    batch["status"] == "completed"
        && batch["read_error"].is_null()
        && batch["report"]["error"].is_null()
        && count(batch, "completed") == batch["total"].as_u64().unwrap_or(u64::MAX)
}

/// Whether the batch has ended: every job ended and its report (if it asked for one) written.
fn ended(batch: &Value) -> bool {
    matches!(batch["status"].as_str(), Some("completed" | "cancelled")) && batch["ended_at"].is_string()
}

/// Follow a batch until it ends: one progress bar over its rows on a terminal (on
/// standard error), a line every few seconds when piped. Returns the ended batch.
async fn follow(client: &Client, batch: &Value) -> anyhow::Result<Value> {
    let id = batch["id"].as_str().context("the answer names no batch id")?.to_owned();
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("batch {prefix} {msg:10} [{bar:30}] {pos}/{len} rows {per_sec} ETA {eta}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(id.clone());
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    });
    let mut last_print = std::time::Instant::now() - Duration::from_secs(60);
    let mut last_status = String::new();
    loop {
        let batch = client.call(Method::GET, &format!("/api/v1/batches/{id}"), None).await?;
        let status = batch["status"].as_str().unwrap_or("unknown").to_owned();
        let (done, total) = (rows_done(&batch), batch["total"].as_u64().unwrap_or(0));
        match &bar {
            Some(bar) => {
                bar.set_length(total);
                bar.set_position(done);
                bar.set_message(status.clone());
            }
            None => {
                if status != last_status || last_print.elapsed() >= Duration::from_secs(5) {
                    eprintln!(
                        "batch {id}: {status} {done}/{total} rows done ({} completed, {} failed, {} invalid), {}",
                        count(&batch, "completed"),
                        count(&batch, "failed") + count(&batch, "cancelled"),
                        count(&batch, "invalid"),
                        human(batch["bytes_done"].as_u64().unwrap_or(0))
                    );
                    last_print = std::time::Instant::now();
                    last_status = status.clone();
                }
            }
        }
        if ended(&batch) {
            if let Some(bar) = bar {
                bar.finish_with_message(status);
            }
            return Ok(batch);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A batch: its status, counts and report.
fn print_batch(out: &mut impl Write, format: OutputFormat, batch: &Value) -> anyhow::Result<()> {
    print_value(out, format, batch, |o| {
        writeln!(o, "{:15} {}", "id", batch["id"].as_str().unwrap_or(""))?;
        writeln!(o, "{:15} {}", "status", batch["status"].as_str().unwrap_or(""))?;
        writeln!(o, "{:15} {}", "rows", batch["total"].as_u64().unwrap_or(0))?;
        for field in ["pending", "processing", "completed", "failed", "cancelled", "invalid"] {
            writeln!(o, "{field:15} {}", count(batch, field))?;
        }
        writeln!(o, "{:15} {}", "bytes_done", human(batch["bytes_done"].as_u64().unwrap_or(0)))?;
        if let Some(error) = batch["read_error"].as_str() {
            writeln!(o, "{:15} {error}", "read_error")?;
        }
        let report = &batch["report"];
        if report.is_object() {
            let state = match (report["written"].as_bool(), report["error"].as_str()) {
                (Some(true), _) => "written".to_owned(),
                (_, Some(error)) => format!("not written: {error}"),
                _ => "written when the batch ends".to_owned(),
            };
            writeln!(
                o,
                "{:15} {}/{} ({state})",
                "report",
                report["bucket_name"].as_str().unwrap_or(""),
                report["object_name"].as_str().unwrap_or("")
            )?;
        }
        Ok(())
    })
}
