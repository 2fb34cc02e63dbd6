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
        s.max_connections = 16;
        s.max_connections_per_ip = Some(3);
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
        s.auth = fileflow::auth::AuthMode::Required;
        s.unauthenticated_rate_limit = 4;
    })
    .await;
    let (_, good) = app.create_key("admin", &[], KeyLimits::default()).await;
    let flooder = client_from("127.0.0.3");
    let mut statuses = Vec::new();
    for i in 0..60 {
        let response = flooder
            .get(app.url("/api/v1/uploads"))
            .bearer_auth(format!("ffk_{i:012}_notasecret"))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        if status == 429 {
            assert!(response.headers().contains_key("retry-after"));
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "rate_limited", "{body}");
            assert!(body["error"]["message"].as_str().unwrap().contains("without a valid API key"), "{body}");
        }
        statuses.push(status);
    }
    let unauthorized = statuses.iter().filter(|&&s| s == 401).count();
    let limited = statuses.iter().filter(|&&s| s == 429).count();
    // A burst of five seconds' worth (20) is answered 401, the rest turned away.
    assert!((20..=25).contains(&unauthorized), "{statuses:?}");
    assert_eq!(unauthorized + limited, 60, "{statuses:?}");
    // Even its good key waits: nothing from that address is looked up meanwhile.
    let response = flooder.get(app.url("/api/v1/uploads")).bearer_auth(&good).send().await.unwrap();
    assert_eq!(response.status(), 429);

    // A caller with a good key from another address is served throughout.
    let response = app.client.get(app.url("/api/v1/uploads")).bearer_auth(&good).send().await.unwrap();
    assert_eq!(response.status(), 200);
    // And after its wait, the flooding address is heard again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let response = flooder.get(app.url("/api/v1/uploads")).bearer_auth(&good).send().await.unwrap();
    assert_eq!(response.status(), 200);
    app.stop().await;
}
