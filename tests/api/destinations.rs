//! The destination guard, end to end: a table of bad destinations, each with its expected
//! outcome, and canary listeners that prove no connection was made.
//!
//! A test resolver plays a hostile DNS server. `127.0.0.2` stands in for a public origin
//! (it is on the allowlist); everything else on loopback is private, as it is by default.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use fileflow::fetch::Lookup;
use fileflow::startup::Hooks;
use serde_json::{Value, json};

use crate::helpers::{Origin, TestApp, content, spawn_app_with_hooks};
use crate::origin::Canary;

/// Answers per name, in order; the last answer repeats.
#[derive(Default)]
struct TestDns {
    answers: HashMap<String, Vec<Vec<IpAddr>>>,
    calls: Mutex<HashMap<String, usize>>,
}

impl TestDns {
    fn answer(mut self, name: &str, answers: &[&[&str]]) -> Self {
        let parsed = answers.iter().map(|a| a.iter().map(|ip| ip.parse().unwrap()).collect()).collect();
        self.answers.insert(name.to_owned(), parsed);
        self
    }
}

#[async_trait]
impl Lookup for TestDns {
    async fn lookup(&self, host: &str) -> std::io::Result<Vec<IpAddr>> {
        let mut calls = self.calls.lock().unwrap();
        let n = calls.entry(host.to_owned()).or_default();
        *n += 1;
        let answers = self.answers.get(host).ok_or_else(|| std::io::Error::other(format!("no such host {host}")))?;
        Ok(answers[(*n - 1).min(answers.len() - 1)].clone())
    }
}

struct Harness {
    app: TestApp,
    origin: Origin,
    canary: Canary,
    canary_v6: Option<Canary>,
    /// Listens where the rebinding name points after its first answer.
    rebind_canary: Canary,
}

async fn harness() -> Harness {
    // The rebinding canary listens on 127.0.0.1 at the origin's port, which some other
    // test's server may hold: take an origin whose port is free there.
    let (origin, rebind_canary) = loop {
        let origin = Origin::start_on("127.0.0.2").await;
        if let Ok(canary) = Canary::try_start(&format!("127.0.0.1:{}", origin.addr.port())).await {
            break (origin, canary);
        }
    };
    let canary = Canary::start("127.0.0.1:0").await;
    let canary_v6 = match tokio::net::TcpListener::bind(("::1", canary.addr.port())).await {
        Ok(probe) => {
            drop(probe);
            Some(Canary::start(&format!("[::1]:{}", canary.addr.port())).await)
        }
        Err(_) => None,
    };
    let dns = Arc::new(
        TestDns::default()
            .answer("good.test", &[&["127.0.0.2"]])
            .answer("loopback.test", &[&["127.0.0.1"]])
            .answer("metadata.test", &[&["169.254.169.254"]])
            .answer("private.test", &[&["10.0.0.7"]])
            .answer("mixed.test", &[&["127.0.0.2", "127.0.0.1"]])
            .answer("mixed-v6.test", &[&["127.0.0.2", "::1"]])
            .answer("v6loop.test", &[&["::1"]])
            .answer("mapped.test", &[&["::ffff:127.0.0.1"]])
            .answer("ula.test", &[&["fd00:ec2::254"]])
            .answer("rebind.test", &[&["127.0.0.2"], &["127.0.0.1"]]),
    );
    let app = spawn_app_with_hooks(
        |s| {
            s.fetch.allow_private = false;
            s.fetch.allow = vec!["127.0.0.2".into()];
            s.retry.max_retries = 2;
            s.fetch.connect_timeout = Duration::from_secs(2);
        },
        Hooks { lookup: Some(dns) },
    )
    .await;
    Harness { app, origin, canary, canary_v6, rebind_canary }
}

#[tokio::test]
async fn refused_at_submit_with_422_and_nothing_reached() {
    let h = harness().await;
    let c = h.canary.addr.port();
    let cases = [
        format!("http://127.0.0.1:{c}/"),
        format!("http://127.1:{c}/"),
        format!("http://2130706433:{c}/"),
        format!("http://0x7f000001:{c}/"),
        format!("http://0177.0.0.1:{c}/"),
        format!("http://0x7f.1:{c}/"),
        format!("http://0.0.0.0:{c}/"),
        format!("http://0:{c}/"),
        "http://10.0.0.1/".into(),
        "http://172.16.0.1/".into(),
        "http://172.31.255.254/".into(),
        "http://192.168.0.1/".into(),
        "http://169.254.169.254/latest/meta-data/".into(),
        "http://169.254.169.254./latest/meta-data/".into(),
        "http://100.64.0.1/".into(),
        "http://192.0.0.1/".into(),
        "http://198.18.0.1/".into(),
        "http://224.0.0.1/".into(),
        "http://240.0.0.1/".into(),
        "http://255.255.255.255/".into(),
        format!("http://[::1]:{c}/"),
        format!("http://[::]:{c}/"),
        format!("http://[::127.0.0.1]:{c}/"),
        format!("http://[::ffff:127.0.0.1]:{c}/"),
        format!("http://[::ffff:7f00:1]:{c}/"),
        "http://[::ffff:169.254.169.254]/".into(),
        "http://[fc00::1]/".into(),
        "http://[fd00:ec2::254]/".into(),
        "http://[fe80::1]/".into(),
        "http://[ff02::1]/".into(),
        "http://[64:ff9b::7f00:1]/".into(),
        "http://[2002:7f00:1::1]/".into(),
        "http://[2001::1]/".into(),
        format!("http://localhost:{c}/"),
        format!("http://LOCALHOST.:{c}/"),
        format!("http://app.localhost:{c}/"),
        "http://metadata.google.internal/computeMetadata/v1/".into(),
        "file:///etc/passwd".into(),
        format!("ftp://127.0.0.2:{c}/"),
        format!("gopher://127.0.0.2:{c}/"),
        format!("http://user:pw@good.test:{}/file/10", h.origin.addr.port()),
    ];
    for url in &cases {
        let response =
            h.app.post_upload(&json!({ "file_url": url, "bucket_name": "file-bucket", "object_name": "x" })).await;
        assert_eq!(response.status(), 422, "{url} was not refused at submit");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["field"], "file_url", "{url}: {body}");
    }
    let (_, list) = h.app.get("/api/v1/uploads").await;
    assert_eq!(list["uploads"], json!([]), "a refused request writes nothing");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(h.canary.hits(), 0);
    assert_eq!(h.canary_v6.as_ref().map_or(0, Canary::hits), 0);
    println!("{} destinations refused at submit", cases.len());
    h.app.stop().await;
}

#[tokio::test]
async fn refused_at_fetch_fail_at_once_and_nothing_reached() {
    let h = harness().await;
    let c = h.canary.addr.port();
    let o = h.origin.addr.port();
    let redirect = |to: &str| {
        format!(
            "http://good.test:{o}/to?url={}",
            url::form_urlencoded::byte_serialize(to.as_bytes()).collect::<String>()
        )
    };
    let cases = [
        ("name resolving to loopback", format!("http://loopback.test:{c}/")),
        ("name resolving to the metadata address", "http://metadata.test/latest/meta-data/".to_owned()),
        ("name resolving to a private network", "http://private.test/".to_owned()),
        ("name with public and private answers", format!("http://mixed.test:{c}/")),
        ("name with a public and a loopback v6 answer", format!("http://mixed-v6.test:{c}/")),
        ("name resolving to ::1", format!("http://v6loop.test:{c}/")),
        ("name resolving to an IPv4-mapped loopback", format!("http://mapped.test:{c}/")),
        ("name resolving to a unique-local address", "http://ula.test/".to_owned()),
        ("redirect to loopback", redirect(&format!("http://127.0.0.1:{c}/"))),
        ("redirect to the metadata address", redirect("http://169.254.169.254/latest/meta-data/")),
        ("redirect to localhost", redirect(&format!("http://localhost:{c}/"))),
        ("redirect to a name resolving to loopback", redirect(&format!("http://loopback.test:{c}/"))),
        ("redirect to ::1", redirect(&format!("http://[::1]:{c}/"))),
        ("redirect to a decimal loopback", redirect(&format!("http://2130706433:{c}/"))),
        ("redirect to file://", redirect("file:///etc/passwd")),
    ];
    let mut ids = Vec::new();
    for (name, url) in &cases {
        let id = h.app.submit(url, &h.app.bucket, "refused").await;
        ids.push((name, id));
    }
    for (name, id) in ids {
        let job = h.app.finished(&id).await;
        assert_eq!(job["status"], "failed", "{name}: {job}");
        assert_eq!(job["retry_count"], 0, "{name}: refusals are permanent: {job}");
        let error = job["last_error"].as_str().unwrap();
        assert!(error.contains("refused"), "{name}: {error}");
        println!("{name}: failed, {error}");
    }
    assert_eq!(h.canary.hits(), 0, "a refused destination was connected to");
    assert_eq!(h.canary_v6.as_ref().map_or(0, Canary::hits), 0);
    assert!(h.app.stored_objects().await.is_empty());
    h.app.stop().await;
}

#[tokio::test]
async fn allowed_destinations_work_and_rebinding_has_no_window() {
    let h = harness().await;
    let o = h.origin.addr.port();
    // The harness itself works: an allowed name and an allowed redirect complete.
    let good = h.app.submit(&format!("http://good.test:{o}/file/100"), &h.app.bucket, "good").await;
    let hop = h.app.submit(&format!("http://good.test:{o}/to?url=%2Ffile%2F200"), &h.app.bucket, "hop").await;
    // The rebinding name answers 127.0.0.2 first, 127.0.0.1 ever after: fileflow looks it up
    // once per connection and connects to the address it checked.
    let rebind = h.app.submit(&format!("http://rebind.test:{o}/file/300?seed=4"), &h.app.bucket, "rebind").await;
    for id in [&good, &hop, &rebind] {
        assert_eq!(h.app.finished(id).await["status"], "completed");
    }
    assert_eq!(h.app.read_object("rebind").await, content(4, 300));
    assert_eq!(h.rebind_canary.hits(), 0, "the rebound address was connected to");
    h.app.stop().await;
}

/// Through a proxy (which resolves names itself), fileflow still resolves and checks each
/// name first: a name that resolves to a private address never reaches the proxy.
#[tokio::test]
async fn names_are_checked_before_a_proxy_sees_them() {
    let proxy = Canary::start("127.0.0.1:0").await;
    let dns = Arc::new(
        TestDns::default()
            .answer("private.test", &[&["10.0.0.7"]])
            .answer("metadata.test", &[&["169.254.169.254"]])
            .answer("good.test", &[&["127.0.0.2"]]),
    );
    let proxy_url = format!("http://{}", proxy.addr);
    let app = spawn_app_with_hooks(
        |s| {
            s.fetch.allow_private = false;
            s.fetch.allow = vec!["127.0.0.2".into()];
            s.fetch.proxy = Some(proxy_url.parse().unwrap());
            s.retry.max_retries = 0;
        },
        Hooks { lookup: Some(dns) },
    )
    .await;
    for name in ["private.test", "metadata.test"] {
        let id = app.submit(&format!("http://{name}/file/10"), &app.bucket, name).await;
        let job = app.finished(&id).await;
        assert_eq!(job["status"], "failed", "{job}");
        assert!(job["last_error"].as_str().unwrap().contains("refused"), "{job}");
    }
    assert_eq!(proxy.hits(), 0, "a refused name reached the proxy");
    // An allowed name does go through the proxy (which hangs up: the job fails, transiently).
    let id = app.submit("http://good.test/file/10", &app.bucket, "good").await;
    assert_eq!(app.finished(&id).await["status"], "failed");
    assert!(proxy.hits() >= 1, "the proxy was not used");
    app.stop().await;
}
