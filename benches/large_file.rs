//! Large-file benchmark: one file of `FILEFLOW_BENCH_SIZE` bytes (default 1 GiB) from a
//! local origin through a release `fileflow serve` into the local store. Prints the
//! throughput and fileflow's peak resident memory (VmHWM), next to a bare
//! `curl -o` of the same URL to the same disk as the ceiling.
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

#[tokio::main]
async fn main() {
    let size: u64 = std::env::var("FILEFLOW_BENCH_SIZE").ok().and_then(|s| s.parse().ok()).unwrap_or(1 << 30);
    let origin = origin::Origin::start().await;
    let url = origin.url(&format!("/file/{size}?seed=11"));
    let dir = tempfile::tempdir_in(std::env::var("FILEFLOW_BENCH_DIR").unwrap_or_else(|_| ".".into())).unwrap();

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

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fileflow"))
        .arg("serve")
        .env("FILEFLOW_LISTEN", "127.0.0.1:0")
        .env("FILEFLOW_DATA_DIR", dir.path().join("data"))
        .env("FILEFLOW_FETCH_ALLOW_PRIVATE", "true")
        .env("FILEFLOW_LOG_FORMAT", "json")
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
    let idle_hwm = vm_hwm_kib(pid).unwrap_or(0);

    let started = Instant::now();
    let body = json!({ "file_url": url, "bucket_name": "bench", "object_name": "large.bin" });
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
    let peak_hwm = vm_hwm_kib(pid).unwrap_or(0);
    child.kill().await.ok();

    let mib = size as f64 / (1024.0 * 1024.0);
    println!("| figure | value |");
    println!("|---|---|");
    println!("| file size | {mib:.0} MiB |");
    println!("| fileflow job status | {} |", job["status"].as_str().unwrap_or("?"));
    println!("| fileflow throughput | {:.1} MiB/s ({secs:.2} s) |", mib / secs);
    if curl_ok {
        println!("| curl -o throughput (ceiling) | {:.1} MiB/s ({curl_secs:.2} s) |", mib / curl_secs);
        println!("| fileflow / curl | {:.2} |", curl_secs / secs);
    } else {
        println!("| curl -o throughput (ceiling) | curl not available |");
    }
    println!("| fileflow peak RSS, idle | {:.1} MiB |", idle_hwm as f64 / 1024.0);
    println!("| fileflow peak RSS (VmHWM) | {:.1} MiB |", peak_hwm as f64 / 1024.0);
}
