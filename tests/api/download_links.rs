//! Signed, expiring download links served by fileflow.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::{Origin, content, spawn_app};

#[tokio::test]
async fn a_signed_link_serves_the_object_until_it_expires() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let id = app.submit(&origin.url("/file/70000?seed=9&type=image/png"), &app.bucket, "dir/pic.png").await;
    assert_eq!(app.finished(&id).await["status"], "completed");

    let (status, link) = app.get(&format!("/api/v1/uploads/{id}/url?expires_in=2")).await;
    assert_eq!(status, 200, "{link}");
    let url = link["url"].as_str().unwrap();
    assert!(link["expires_at"].as_str().unwrap().ends_with('Z'));

    let response = app.client.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "image/png");
    assert_eq!(response.headers()["content-length"], "70000");
    assert!(response.bytes().await.unwrap() == content(9, 70_000));

    // Tampered: another expiry, another object, a changed signature, no signature. The
    // names differ between fileflow's links and S3's presigned ones; the refusal does not.
    let parsed = url::Url::parse(url).unwrap();
    let query: std::collections::HashMap<String, String> = parsed.query_pairs().into_owned().collect();
    // fileflow's own links, S3's presigned ones, Azure's SAS.
    let (sig_name, expiry_name) = if query.contains_key("signature") {
        ("signature", "expires")
    } else if query.contains_key("sig") {
        ("sig", "se")
    } else {
        ("X-Amz-Signature", "X-Amz-Expires")
    };
    let later = match query[expiry_name].parse::<i64>() {
        Ok(expiry) => (expiry + 1).to_string(),
        Err(_) => "2099-01-01T00:00:00Z".to_owned(),
    };
    let with_param = |name: &str, value: &str| {
        let mut bad = parsed.clone();
        let pairs: Vec<(String, String)> =
            query.iter().map(|(k, v)| (k.clone(), if k == name { value.to_owned() } else { v.clone() })).collect();
        bad.query_pairs_mut().clear().extend_pairs(pairs);
        bad.to_string()
    };
    let sig = &query[sig_name];
    // Another first digit, not another case of the same one: S3 reads its signature's hex
    // without regard to case (an `a` → `A` flip is the same signature, one time in 16).
    let flipped = format!("{}{}", if sig.starts_with('0') { '1' } else { '0' }, &sig[1..]);
    let mut other_object = parsed.clone();
    other_object
        .set_path(&parsed.path().replace("pic.png", "other.png").replace(&format!("/downloads/{id}"), "/downloads/99"));
    let tampered = [
        with_param(expiry_name, &later),
        with_param(sig_name, &flipped),
        other_object.to_string(),
        url.split('?').next().unwrap().to_owned(),
    ];
    for bad in tampered {
        let response = app.client.get(&bad).send().await.unwrap();
        assert_eq!(response.status(), 403, "{bad}");
        if !crate::helpers::store_links() {
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "forbidden");
        }
    }

    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = app.client.get(url).send().await.unwrap();
    if crate::helpers::store_links() {
        // The store judges its own links: Garage answers an expired one with 400.
        assert!(expired.status().is_client_error(), "an expired link was served: {}", expired.status());
    } else {
        assert_eq!(expired.status(), 403);
        let body: Value = expired.json().await.unwrap();
        assert!(body["error"]["message"].as_str().unwrap().contains("expired"), "{body}");
    }
    app.stop().await;
}

#[tokio::test]
async fn the_job_carries_a_download_url_once_completed() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let id = app.submit(&origin.url("/file/1234"), &app.bucket, "with-link").await;
    let job = app.finished(&id).await;
    let url = job["download_url"].as_str().expect("completed jobs carry a link");
    let bytes = app.client.get(url).send().await.unwrap().bytes().await.unwrap();
    assert!(bytes == content(1, 1234));
    app.stop().await;
}

#[tokio::test]
async fn links_are_refused_for_unfinished_jobs_and_bad_lifetimes() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let pending = app.submit(&origin.url("/delay/5000/10"), &app.bucket, "later").await;
    let (status, body) = app.get(&format!("/api/v1/uploads/{pending}/url")).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "wrong_state");

    let done = app.submit(&origin.url("/file/10"), &app.bucket, "now").await;
    app.finished(&done).await;
    for bad in ["0", "-5", "abc", "604801"] {
        let (status, body) = app.get(&format!("/api/v1/uploads/{done}/url?expires_in={bad}")).await;
        assert_eq!(status, 422, "{bad}");
        assert_eq!(body["error"]["field"], "expires_in");
    }
    let (status, _) = app.get(&format!("/api/v1/uploads/{done}/url?expires_in=604800")).await;
    assert_eq!(status, 200);
    app.stop().await;
}

#[tokio::test]
async fn links_survive_a_restart_because_the_key_is_kept() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let id = app.submit(&origin.url("/file/500"), &app.bucket, "kept").await;
    app.finished(&id).await;
    let (_, link) = app.get(&format!("/api/v1/uploads/{id}/url")).await;
    let url = link["url"].as_str().unwrap().to_owned();
    let settings = app.settings.clone();
    let dir = app.stop().await;

    let again = crate::helpers::start(settings, dir).await;
    // fileflow's own links: the new process listens on another port; the path and
    // signature are what matter. Presigned S3 links point at the store itself.
    let target = match url.find("/api/") {
        Some(at) => again.url(&url[at..]),
        None => url.clone(),
    };
    let response = again.client.get(target).send().await.unwrap();
    assert_eq!(response.status(), 200);
    again.stop().await;
}

/// What fileflow serves cannot act as part of its own site: no sniffing, a sandbox, and a
/// download rather than a page for anything but a few passive types. (S3 links are served
/// by the store, from its own origin.)
#[tokio::test]
async fn served_objects_cannot_run_as_part_of_the_api() {
    if crate::helpers::store_links() {
        return;
    }
    let origin = Origin::start().await;
    let app = spawn_app().await;
    for (key, kind, disposition) in [
        ("page.html", "text/html", "attachment; filename=\"page.html\""),
        ("icon.svg", "image/svg+xml", "attachment; filename=\"icon.svg\""),
        ("pic.png", "image/png", "inline; filename=\"pic.png\""),
    ] {
        let id = app.submit(&origin.url(&format!("/file/64?type={kind}")), &app.bucket, key).await;
        assert_eq!(app.finished(&id).await["status"], "completed");
        let (_, link) = app.get(&format!("/api/v1/uploads/{id}/url")).await;
        let response = app.client.get(link["url"].as_str().unwrap()).send().await.unwrap();
        let headers = response.headers();
        assert_eq!(headers["x-content-type-options"], "nosniff", "{key}");
        assert!(headers["content-security-policy"].to_str().unwrap().starts_with("sandbox"), "{key}");
        assert!(headers["content-disposition"].to_str().unwrap().starts_with(disposition), "{key}: {headers:?}");
    }
    app.stop().await;
}

/// A link names the version of the object its job stored: once another job overwrites
/// the key, the old link no longer serves (it would be other bytes); the new job's does.
#[tokio::test]
async fn a_link_serves_only_the_version_it_was_made_for() {
    if crate::helpers::store_links() {
        return; // presigned S3 links name the key only (see the README)
    }
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let first = app.submit(&origin.url("/file/5000?seed=1"), &app.bucket, "same.bin").await;
    assert_eq!(app.finished(&first).await["status"], "completed");
    let (_, old) = app.get(&format!("/api/v1/uploads/{first}/url")).await;
    let old = old["url"].as_str().unwrap().to_owned();
    assert!(app.client.get(&old).send().await.unwrap().bytes().await.unwrap() == content(1, 5000));

    let second = app.submit(&origin.url("/file/5000?seed=2"), &app.bucket, "same.bin").await;
    assert_eq!(app.finished(&second).await["status"], "completed");
    let response = app.client.get(&old).send().await.unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("replaced"), "{body}");
    let (_, new) = app.get(&format!("/api/v1/uploads/{second}/url")).await;
    let fresh = app.client.get(new["url"].as_str().unwrap()).send().await.unwrap();
    assert!(fresh.bytes().await.unwrap() == content(2, 5000));
    app.stop().await;
}

/// Links name the address users reach the store at (`--s3-public-endpoint`, or
/// `--public-url` for fileflow's own links), not the one fileflow talks to; here a
/// forwarder stands in for that public address, under another host name.
#[tokio::test]
async fn links_name_the_public_address_and_open_there() {
    let forwarder = Forwarder::start().await;
    let public = format!("http://localhost:{}", forwarder.port);
    let origin = Origin::start().await;
    let app = crate::helpers::spawn_app_with(|s| match s.store.storage {
        fileflow::config::StorageKind::S3 => s.store.s3_public_endpoint = Some(public.parse().unwrap()),
        fileflow::config::StorageKind::Azure => {
            let mut endpoint = s.store.azure_endpoint.clone().unwrap();
            endpoint.set_host(Some("localhost")).unwrap();
            endpoint.set_port(Some(forwarder.port)).unwrap();
            s.store.azure_public_endpoint = Some(endpoint);
        }
        _ => s.server.public_url = Some(public.parse().unwrap()),
    })
    .await;
    let store = match app.settings.store.storage {
        fileflow::config::StorageKind::S3 => app.settings.store.s3_endpoint.clone().unwrap(),
        fileflow::config::StorageKind::Azure => app.settings.store.azure_endpoint.clone().unwrap(),
        _ => url::Url::parse(&app.base).unwrap(),
    };
    forwarder.to(format!("{}:{}", store.host_str().unwrap(), store.port_or_known_default().unwrap()));
    let id = app.submit(&origin.url("/file/30000?seed=4"), &app.bucket, "public.bin").await;
    assert_eq!(app.finished(&id).await["status"], "completed");
    let (status, link) = app.get(&format!("/api/v1/uploads/{id}/url")).await;
    assert_eq!(status, 200, "{link}");
    let url = url::Url::parse(link["url"].as_str().unwrap()).unwrap();
    assert_eq!((url.host_str(), url.port()), (Some("localhost"), Some(forwarder.port)), "{url}");
    let response = app.client.get(url.clone()).send().await.unwrap();
    assert_eq!(response.status(), 200, "{url}");
    assert!(response.bytes().await.unwrap() == content(4, 30_000));
    assert!(forwarder.connections() >= 1, "the link was not opened through the public address");
    app.stop().await;
}

/// A TCP forwarder: what connects to its port is joined to the target set later.
struct Forwarder {
    port: u16,
    target: std::sync::Arc<std::sync::OnceLock<String>>,
    connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Forwarder {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = std::sync::Arc::new(std::sync::OnceLock::<String>::new());
        let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (to, count) = (target.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let to = to.get().cloned().expect("a target before the first connection");
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self { port, target, connections }
    }

    fn to(&self, target: String) {
        self.target.set(target).unwrap();
    }

    fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}
