//! The command-line client: the same binary talks to a running fileflow through its HTTP
//! API (`submit`, `jobs`, `job`, `retry`, `cancel`, `url`). Answers print as tables for
//! people or as the API's own JSON for scripts; `submit --wait` follows the job with a
//! progress bar on a terminal and plain lines when piped, and exits non-zero when a job
//! does not complete.

use std::io::{IsTerminal as _, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use super::api::{Client, human, print_value};
use crate::config::{ClientCommand, OutputFormat};

/// How often `--wait` looks at a job.
const POLL: Duration = Duration::from_millis(250);

/// Whether a job's status is final.
pub(super) fn finished(job: &Value) -> bool {
    matches!(job["status"].as_str(), Some("completed" | "failed" | "cancelled"))
}

/// Run a client command; the exit code says whether what it asked for went well (for
/// `--wait`: whether every job completed).
pub async fn run(command: ClientCommand, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    let args = command.args();
    let client = Client::new(args.server.clone(), args.api_key.clone())?;
    let format = args.output;
    match command {
        ClientCommand::Submit {
            url,
            bucket,
            key,
            from,
            prefix,
            sha256,
            md5,
            if_exists,
            notify_url,
            priority,
            wait,
            ..
        } => {
            let ids = match (url, from) {
                (Some(url), None) => {
                    let key = key.context("--key is required with a URL")?;
                    let mut body = json!({ "file_url": url.as_str(), "bucket_name": bucket, "object_name": key });
                    for (field, value) in
                        [("sha256", sha256), ("md5", md5), ("if_exists", if_exists), ("notify_url", notify_url)]
                    {
                        if let Some(value) = value {
                            body[field] = Value::String(value);
                        }
                    }
                    if let Some(priority) = priority {
                        body["priority"] = json!(priority);
                    }
                    let id = client.submit(body).await?;
                    if !wait {
                        print_value(out, format, &json!({ "id": id }), |o| writeln!(o, "{id}"))?;
                    }
                    vec![id]
                }
                (None, Some(path)) => {
                    let tsv =
                        std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
                    let results = client.submit_list(tsv, &bucket, &prefix).await?;
                    let refused = results.iter().filter(|r| r.get("error").is_some()).count();
                    if !wait || format == OutputFormat::Table {
                        print_value(out, format, &json!({ "results": results }), |o| {
                            for (line, result) in results.iter().enumerate() {
                                match result["id"].as_str() {
                                    Some(id) => writeln!(o, "{id}")?,
                                    None => writeln!(
                                        o,
                                        "line {}: {}",
                                        line + 1,
                                        result["error"]["message"].as_str().unwrap_or("refused")
                                    )?,
                                }
                            }
                            Ok(())
                        })?;
                    }
                    let ids: Vec<String> = results.iter().filter_map(|r| r["id"].as_str().map(str::to_owned)).collect();
                    if refused > 0 && !wait {
                        return Ok(ExitCode::FAILURE);
                    }
                    ids
                }
                (Some(_), Some(_)) => bail!("give either a URL or --from, not both"),
                (None, None) => bail!("give the URL to fetch, or --from a URL list"),
            };
            if !wait {
                return Ok(ExitCode::SUCCESS);
            }
            let mut all_completed = true;
            let mut jobs = Vec::new();
            for id in &ids {
                let job = follow(&client, id).await?;
                all_completed &= job["status"] == "completed";
                jobs.push(job);
            }
            match jobs.as_slice() {
                [job] => print_job(out, format, job)?,
                _ => print_jobs(out, format, &json!({ "uploads": jobs }))?,
            }
            Ok(if all_completed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        ClientCommand::Jobs { status, limit, before, .. } => {
            let listed = client.jobs(status.as_deref(), limit, before.as_deref()).await?;
            print_jobs(out, format, &listed)?;
            Ok(ExitCode::SUCCESS)
        }
        ClientCommand::Job { id, .. } => {
            print_job(out, format, &client.job(&id).await?)?;
            Ok(ExitCode::SUCCESS)
        }
        ClientCommand::Retry { id, .. } => {
            print_job(out, format, &client.retry(&id).await?)?;
            Ok(ExitCode::SUCCESS)
        }
        ClientCommand::Cancel { id, .. } => {
            print_job(out, format, &client.cancel(&id).await?)?;
            Ok(ExitCode::SUCCESS)
        }
        ClientCommand::Batch { action } => super::batch::run(&client, action, format, out).await,
        ClientCommand::Url { id, expires_in, .. } => {
            let link = client.url(&id, expires_in.map(Into::into)).await?;
            print_value(out, format, &link, |o| writeln!(o, "{}", link["url"].as_str().unwrap_or_default()))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Follow a job until it ends: a progress bar with bytes, rate and ETA on a terminal (on
/// standard error), a line per change when piped. Returns the finished job.
async fn follow(client: &Client, id: &str) -> anyhow::Result<Value> {
    let terminal = std::io::stderr().is_terminal();
    let bar = terminal.then(|| {
        let bar = ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    });
    let mut last_line = String::new();
    let mut last_print = std::time::Instant::now() - Duration::from_secs(1);
    loop {
        let job = client.job(id).await?;
        let status = job["status"].as_str().unwrap_or("unknown").to_owned();
        let done = job["bytes_done"].as_u64().unwrap_or(0);
        let total = job["bytes_total"].as_u64();
        match &bar {
            Some(bar) => {
                if let Some(total) = total {
                    if bar.length() != Some(total) {
                        bar.set_length(total);
                        bar.set_style(
                            ProgressStyle::with_template(
                                "{spinner} job {prefix} {msg:10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                            )
                            .expect("a valid template")
                            .progress_chars("=> "),
                        );
                    }
                } else if bar.length().is_some() || bar.position() == 0 {
                    bar.set_style(
                        ProgressStyle::with_template("{spinner} job {prefix} {msg:10} {bytes} {bytes_per_sec}")
                            .expect("a valid template"),
                    );
                }
                bar.set_prefix(id.to_owned());
                bar.set_message(status.clone());
                bar.set_position(done);
            }
            None => {
                let line = match total {
                    Some(total) => format!("job {id}: {status} {} of {}", human(done), human(total)),
                    None => format!("job {id}: {status} {}", human(done)),
                };
                // A line when the status changes, and at most one a second for progress.
                let status_changed = !last_line.starts_with(&format!("job {id}: {status} "));
                if line != last_line && (status_changed || last_print.elapsed() >= Duration::from_secs(1)) {
                    eprintln!("{line}");
                    last_line = line;
                    last_print = std::time::Instant::now();
                }
            }
        }
        if finished(&job) {
            if let Some(bar) = bar {
                bar.finish_with_message(status.clone());
            }
            if status != "completed" {
                eprintln!("job {id} {status}: {}", job["last_error"].as_str().unwrap_or("no error recorded"));
            }
            return Ok(job);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One job: its fields, one per line.
fn print_job(out: &mut impl Write, format: OutputFormat, job: &Value) -> anyhow::Result<()> {
    print_value(out, format, job, |o| {
        if let Some(fields) = job.as_object() {
            for (name, value) in fields {
                let text = match value {
                    Value::String(s) => s.clone(),
                    Value::Null => continue,
                    other => other.to_string(),
                };
                writeln!(o, "{name:15} {text}")?;
            }
        }
        Ok(())
    })
}

/// A page of jobs: one row each.
fn print_jobs(out: &mut impl Write, format: OutputFormat, listed: &Value) -> anyhow::Result<()> {
    let jobs = listed["uploads"].as_array().cloned().unwrap_or_default();
    print_value(out, format, listed, |o| {
        writeln!(o, "{:>8}  {:10}  {:>10}  {:>7}  BUCKET/KEY", "ID", "STATUS", "SIZE", "DONE")?;
        for job in &jobs {
            let size = job["size"].as_u64().or(job["bytes_total"].as_u64()).map(human).unwrap_or_else(|| "-".into());
            let done = match (job["bytes_done"].as_u64(), job["bytes_total"].as_u64()) {
                (Some(done), Some(total)) if total > 0 => format!("{}%", done * 100 / total),
                _ => "-".into(),
            };
            writeln!(
                o,
                "{:>8}  {:10}  {:>10}  {:>7}  {}/{}",
                job["id"].as_str().unwrap_or(""),
                job["status"].as_str().unwrap_or(""),
                size,
                done,
                job["bucket_name"].as_str().unwrap_or(""),
                job["object_name"].as_str().unwrap_or("")
            )?;
        }
        if let Some(next) = listed["next_before"].as_str() {
            writeln!(o, "more: --before {next}")?;
        }
        Ok(())
    })
}
