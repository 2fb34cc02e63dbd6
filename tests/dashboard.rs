//! The web dashboard in a real headless Chromium, driven over WebDriver (chromedriver):
//! submit a file from the form, watch its progress bar move live, see it completed, open
//! its detail and fetch its download link. A screenshot is kept as a test artefact
//! (`<target>/tmp/dashboard.png`).

#[path = "support/origin.rs"]
mod origin;

#[path = "support/process.rs"]
mod process;

use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use origin::{Origin, content};
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// chromedriver on a free port, and a browser session through it; `None` (after saying so)
/// when Chromium is not installed, except under CI, where that fails the test.
async fn browser() -> Option<(tokio::process::Child, Client, tempfile::TempDir)> {
    if !std::path::Path::new(CHROMEDRIVER).exists() || !std::path::Path::new(CHROMIUM).exists() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{CHROMIUM} and {CHROMEDRIVER} are needed (scripts/services.sh install puts them there)");
        }
        eprintln!("skipped: no {CHROMIUM} / {CHROMEDRIVER} (run scripts/services.sh install)");
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let driver = tokio::process::Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromedriver starts");
    let profile = tempfile::tempdir().unwrap();
    let args = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
    ]
    .into_iter()
    .map(str::to_owned)
    .chain([format!("--user-data-dir={}", profile.path().display())])
    .collect::<Vec<_>>();
    let mut capabilities = serde_json::Map::new();
    capabilities.insert("goog:chromeOptions".into(), json!({ "binary": CHROMIUM, "args": args }));
    // The dependency graph has two TLS providers; the WebDriver client needs one chosen.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    let client = loop {
        match ClientBuilder::rustls()
            .expect("a TLS setup")
            .capabilities(capabilities.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(client) => break client,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no browser session: {e}"),
        }
    };
    Some((driver, client, profile))
}

/// Evaluate `script` in the page until `done` accepts its value (at most `limit`).
async fn wait_for(client: &Client, script: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let value = client.execute(script, Vec::new()).await.unwrap();
        if done(&value) {
            return value;
        }
        assert!(Instant::now() < deadline, "{script} never got there; last {value}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn submit_watch_progress_and_download_in_a_browser() {
    let Some((_driver, client, _profile)) = browser().await else { return };
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = process::start(dir.path(), &[]).await;
    client.goto(&format!("{}/", server.base)).await.unwrap();
    wait_for(&client, "return document.getElementById('live').textContent", Duration::from_secs(10), |v| v == "live")
        .await;

    // 8 MiB at about 3 MiB/s.
    let size = 8 * 1024 * 1024u64;
    let url = origin.url(&format!("/slow/{size}?every_ms=20&seed=8"));
    client.find(Locator::Css("#file-url")).await.unwrap().send_keys(&url).await.unwrap();
    client.find(Locator::Css("#bucket")).await.unwrap().send_keys("browser").await.unwrap();
    client.find(Locator::Css("#key")).await.unwrap().send_keys("watched.bin").await.unwrap();
    client.find(Locator::Css("#submit button")).await.unwrap().click().await.unwrap();
    let accepted =
        wait_for(&client, "return document.getElementById('submit-result').textContent", Duration::from_secs(5), |v| {
            v.as_str().is_some_and(|t| t.contains("accepted"))
        })
        .await;
    let id = accepted.as_str().unwrap().split_whitespace().nth(1).unwrap().to_owned();

    // The row's progress bar moves while the job runs, from the live event stream alone.
    let row = format!("document.querySelector('tr[data-id=\"{id}\"]')");
    let moving = wait_for(
        &client,
        &format!(
            "const r = {row}; if (!r) return null; const p = r.querySelector('progress'); \
                  return [r.querySelector('.status').textContent, p ? p.value : 0, p ? p.max : 0];"
        ),
        Duration::from_secs(15),
        |v| v[0] == "processing" && v[1].as_f64().is_some_and(|d| d > 0.0 && d < size as f64),
    )
    .await;
    println!("seen moving: {moving}");
    let screenshot = client.screenshot().await.unwrap();
    wait_for(
        &client,
        &format!("const r = {row}; return r && r.querySelector('.status').textContent"),
        Duration::from_secs(20),
        |v| v == "completed",
    )
    .await;

    // The job's detail, and its download link.
    client.find(Locator::Css(&format!("tr[data-id=\"{id}\"]"))).await.unwrap().click().await.unwrap();
    let link =
        wait_for(&client, "return document.getElementById('download-link').value", Duration::from_secs(5), |v| {
            v.as_str().is_some_and(|l| l.contains("/api/v1/downloads/"))
        })
        .await;
    let stored = reqwest::get(link.as_str().unwrap()).await.unwrap().bytes().await.unwrap();
    assert!(stored == content(8, size), "the link serves the object");

    // A batch shows in the Batches panel, its bar and counts moving to its end.
    let rows: Vec<String> =
        (0..6).map(|i| format!("{},batch/{i}", origin.url(&format!("/delay/200/100?seed={i}")))).collect();
    let manifest =
        origin.serve_manifest("dash.csv", "text/csv", format!("file_url,object_name\n{}\n", rows.join("\n")));
    let created: Value = reqwest::Client::new()
        .post(format!("{}/api/v1/batches", server.base))
        .json(&json!({ "manifest_url": manifest, "bucket_name": "browser" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let batch = created["id"].as_str().unwrap();
    let shown = wait_for(
        &client,
        &format!(
            "const r = document.querySelector('tr[data-batch=\"{batch}\"]'); if (!r) return null; \
             const p = r.querySelector('progress'); \
             return [r.querySelector('.status').textContent, p.value, p.max, r.children[3].textContent];"
        ),
        Duration::from_secs(30),
        |v| v[0] == "completed",
    )
    .await;
    assert_eq!((shown[1].as_f64(), shown[2].as_f64(), shown[3].as_str()), (Some(6.0), Some(6.0), Some("6")), "{shown}");

    let path = format!("{}/dashboard.png", env!("CARGO_TARGET_TMPDIR"));
    std::fs::write(&path, &screenshot).unwrap();
    println!("screenshot (while the job moved): {path}");
    client.close().await.unwrap();
}
