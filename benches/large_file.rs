//! Large-file benchmark: one file of `FILEFLOW_BENCH_SIZE` bytes (default 1 GiB) from a
//! local origin through a release `fileflow serve`, into the local store and, when the
//! `FILEFLOW_TEST_S3_*` variables name an S3 server (as `scripts/services.sh start`
//! writes them), into S3 as well. Prints throughput and fileflow's peak resident memory
//! (VmHWM) beside a bare `curl -o` of the same URL to the same disk, the ceiling.
//!
//! Run with `cargo bench --bench large_file`.

#[path = "../tests/support/origin.rs"]
mod origin;

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

struct Run {
    status: String,
    secs: f64,
    idle_mib: f64,
    peak_mib: f64,
}

/// One `fileflow serve` process, one job, measured.
async fn run_fileflow(url: &str, data_dir: &std::path::Path, env: &[(&str, String)]) -> Run {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fileflow"))
        .arg("serve")
        .env("FILEFLOW_LISTEN", "127.0.0.1:0")
        .env("FILEFLOW_DATA_DIR", data_dir)
        .env("FILEFLOW_FETCH_ALLOW_PRIVATE", "true")
        .env("FILEFLOW_LOG_FORMAT", "json")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("fileflow starts");
    let pid = child.id().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut port = 0;
    while let Some(line) = lines.next_line().await.unwrap() {
        if let Ok(event) = serde_json::from_str::<Value>(&line)
            && event["message"] == "API listening"
        {
            port = event["port"].as_u64().unwrap();
            break;
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let idle = vm_hwm_kib(pid).unwrap_or(0);

    let started = Instant::now();
    let body = json!({ "file_url": url, "bucket_name": "bench-large", "object_name": "large.bin" });
    let accepted: Value =
        client.post(format!("{base}/api/v1/upload")).json(&body).send().await.unwrap().json().await.unwrap();
    let id = accepted["id"].as_str().unwrap().to_owned();
    let job = loop {
        let job: Value = client.get(format!("{base}/api/v1/uploads/{id}")).send().await.unwrap().json().await.unwrap();
        if job["status"] == "completed" || job["status"] == "failed" {
            break job;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let secs = started.elapsed().as_secs_f64();
    let peak = vm_hwm_kib(pid).unwrap_or(0);
    child.kill().await.ok();
    Run {
        status: job["status"].as_str().unwrap_or("?").to_owned(),
        secs,
        idle_mib: idle as f64 / 1024.0,
        peak_mib: peak as f64 / 1024.0,
    }
}

#[tokio::main]
async fn main() {
    let size: u64 = std::env::var("FILEFLOW_BENCH_SIZE").ok().and_then(|s| s.parse().ok()).unwrap_or(1 << 30);
    let origin = origin::Origin::start().await;
    let url = origin.url(&format!("/file/{size}?seed=11"));
    let dir = tempfile::tempdir_in(std::env::var("FILEFLOW_BENCH_DIR").unwrap_or_else(|_| ".".into())).unwrap();
    let mib = size as f64 / (1024.0 * 1024.0);

    // Ceiling: the same bytes through curl to the same disk.
    let started = Instant::now();
    let curl = std::process::Command::new("curl")
        .args(["-sf", "--noproxy", "*", "-o"])
        .arg(dir.path().join("curl.bin"))
        .arg(&url)
        .status();
    let curl_secs = started.elapsed().as_secs_f64();
    let curl_ok = curl.map(|s| s.success()).unwrap_or(false);
    let _ = std::fs::remove_file(dir.path().join("curl.bin"));

    let mut runs = vec![("local disk", run_fileflow(&url, &dir.path().join("fs"), &[]).await)];
    let s3_var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    if let (Some(endpoint), Some(region), Some(key), Some(secret)) = (
        s3_var("FILEFLOW_TEST_S3_ENDPOINT"),
        s3_var("FILEFLOW_TEST_S3_REGION"),
        s3_var("FILEFLOW_TEST_S3_ACCESS_KEY"),
        s3_var("FILEFLOW_TEST_S3_SECRET_KEY"),
    ) {
        let env = [
            ("FILEFLOW_STORAGE", "s3".to_owned()),
            ("FILEFLOW_S3_ENDPOINT", endpoint),
            ("AWS_REGION", region),
            ("AWS_ACCESS_KEY_ID", key),
            ("AWS_SECRET_ACCESS_KEY", secret),
            ("FILEFLOW_CREATE_BUCKETS", "true".to_owned()),
        ];
        runs.push(("S3", run_fileflow(&url, &dir.path().join("s3"), &env).await));
    }

    println!("file: {mib:.0} MiB");
    println!("| path | status | MiB/s | seconds | vs curl -o | peak RSS (VmHWM) | RSS idle |");
    println!("|---|---|---|---|---|---|---|");
    if curl_ok {
        println!("| curl -o, same disk (ceiling) | - | {:.1} | {curl_secs:.2} | 1.00 | - | - |", mib / curl_secs);
    }
    for (name, run) in runs {
        let ratio = if curl_ok { format!("{:.2}", curl_secs / run.secs) } else { "-".into() };
        println!(
            "| fileflow → {name} | {} | {:.1} | {:.2} | {ratio} | {:.1} MiB | {:.1} MiB |",
            run.status,
            mib / run.secs,
            run.secs,
            run.peak_mib,
            run.idle_mib
        );
    }
}
