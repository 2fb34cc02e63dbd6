//! One client cannot take the API from the others: connections are shared out per client
//! address, and an address sending requests without a valid key is turned away before any
//! key is looked up, while callers with good keys from other addresses go on.

use std::net::IpAddr;
use std::time::Duration;

use fileflow::auth::KeyLimits;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::helpers::{TestApp, spawn_app_with};

/// A client whose connections come from `ip` (another loopback address).
fn client_from(ip: &str) -> reqwest::Client {
    let ip: IpAddr = ip.parse().unwrap();
    reqwest::Client::builder().no_proxy().local_address(ip).build().unwrap()
}

fn addr(app: &TestApp) -> String {
    app.base.trim_start_matches("http://").to_owned()
}

#[tokio::test]
async fn one_address_cannot_take_every_connection() {
    let app = spawn_app_with(|s| {
        s.server.max_connections = 16;
        s.server.max_connections_per_ip = Some(3);
    })
    .await;
    // Three idle connections from 127.0.0.1: its whole share.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tokio::net::TcpStream::connect(addr(&app)).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A fourth is told why and closed.
    let mut fourth = tokio::net::TcpStream::connect(addr(&app)).await.unwrap();
    let _ = fourth.write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n").await;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), fourth.read_to_string(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(answer.contains("\"code\":\"rate_limited\"") && answer.contains("retry-after: 1"), "{answer}");

    // Another address is served meanwhile.
    let other = client_from("127.0.0.2");
    let response = other.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), 200);

    // Once 127.0.0.1 lets go of one, it is served again.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let response = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn a_flood_of_bad_keys_is_turned_away_before_lookup_and_good_keys_go_on() {
    let app = spawn_app_with(|s| {
        s.auth.mode = fileflow::auth::AuthMode::Required;
        s.auth.unauthenticated_rate_limit = 4;
    })
    .await;
    let (_, good) = app.create_key("admin", &[], KeyLimits::default()).await;
    let flooder = client_from("127.0.0.3");
    let bad = |i: usize| flooder.get(app.url("/api/v1/uploads")).bearer_auth(format!("ffk_{i:012}_notasecret")).send();
    // Five seconds' worth (20) are looked up and answered 401...
    for i in 0..20 {
        assert_eq!(bad(i).await.unwrap().status(), 401);
    }
    // ...then the address is turned away before any lookup, its good key too.
    let response = flooder.get(app.url("/api/v1/uploads")).bearer_auth(&good).send().await.unwrap();
    assert_eq!(response.status(), 429);
    // Each such answer is held a second, so a flood gets one answer per connection per
    // second; of 40 at once, only what refilled meanwhile (4/s) is looked up.
    let started = std::time::Instant::now();
    let answers: Vec<reqwest::Response> =
        futures::future::join_all((20..60).map(|i| async move { bad(i).await.unwrap() })).await;
    let took = started.elapsed();
    let looked_up = answers.iter().filter(|r| r.status() == 401).count();
    assert!(looked_up <= 6, "{looked_up} of 40 reached the key store");
    for response in answers.into_iter().filter(|r| r.status() != 401) {
        assert_eq!(response.status(), 429);
        assert!(response.headers().contains_key("retry-after"));
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "rate_limited", "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("without a valid API key"), "{body}");
    }
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(5), "{took:?}");
    // A caller with a good key from another address is served at once.
    let started = std::time::Instant::now();
    let response = app.client.get(app.url("/api/v1/uploads")).bearer_auth(&good).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(started.elapsed() < Duration::from_millis(500));
    // And once its allowance refills, the flooding address is heard again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let response = flooder.get(app.url("/api/v1/uploads")).bearer_auth(&good).send().await.unwrap();
    assert_eq!(response.status(), 200);
    app.stop().await;
}
