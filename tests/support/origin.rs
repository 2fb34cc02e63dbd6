//! A local origin server for tests and benchmarks: serves generated files and misbehaves
//! on demand.
//!
//! Routes (sizes in bytes; every body is the deterministic stream `content(seed, size)`):
//! - `/file/{size}?seed=S` — 200 with Content-Length;
//! - `/flaky/{name}/{failures}/{size}` — 500 for the first `failures` requests to `name`, then 200;
//! - `/status/{code}` — always that status (with `Retry-After: 1` on 429 and 503);
//! - `/reset/{size}` — declares `size`, sends half, then breaks the connection;
//! - `/short/{size}` — declares `size`, sends half, then ends the body;
//!
//! `/reset/…` and `/short/…` are also served at [`Origin::raw_url`] by a bare TCP server
//! that writes the head and half the body itself, then resets (`/reset`, with SO_LINGER 0)
//! or closes cleanly (`/short`): the exact failures a real origin produces.
//! - `/trickle/{size}?every_ms=N` — one byte every N ms;
//! - `/redirect/{hops}/{size}` — `hops` redirects, then the file;
//! - `/delay/{ms}/{size}` — waits, then serves the file;
//! - `/to?url=U` — a redirect to any URL;
//! - `/manifest/{name}?every_ms=M&piece=P` — a body the test set with [`Origin::serve_manifest`]
//!   (with `every_ms`, in pieces of `P` bytes, one every `M` ms);
//! - `/gzip/{size}` — the file labelled `Content-Encoding: gzip` (to check it is stored as served);
//! - `/png` — a PNG signature and header chunk labelled `application/octet-stream`;
//! - `/echo-header/{name}` — 200 only if the request carried header `name`, whose value is the body;
//! - `/versioned/{name}/{size}?seed=S&slow_ms=N` — the file of seed `S + 1000 × version`,
//!   where the test changes `name`'s version ([`Origin::set_version`]) as an origin whose
//!   file is replaced; headers at once, then the body in 8 pieces over `slow_ms`.
//! - `/resumable/{name}/{size}?seed=S&cut=N&validator=etag|date|none&ranges=no&every_ms=M` —
//!   the file of [`Origin::set_version`]'s version, named by a strong ETag (or a
//!   `Last-Modified` date, or nothing); answers `Range: bytes=N-` with 206 unless
//!   `ranges=no` or its `If-Range` names another version; the first request breaks the
//!   connection once the file's byte `cut` is reached; `every_ms` paces 1 MiB pieces.
//!   [`Origin::bytes_sent`] counts body bytes sent, [`Origin::ranges_asked`] the ranges asked.
//!   `lie=` makes its partial answers sloppy as real origins' are: `unknown_total`
//!   (`Content-Range: …/*`), `ignore_if_range` (206 of the current version whatever
//!   `If-Range` says), `wrong_start` (the range starts 1 MiB before the one asked),
//!   `short_total` (the 206 says the file is 1 MiB shorter and ends there), `no_validator`
//!   (the 206 carries no ETag or Last-Modified), `not_to_end` (the 206 stops 1 MiB short of
//!   the end and says so), `whole_as_206` (a request for the whole file answered 206 with
//!   the whole file's range), `refuse_range` (416 to every ranged request), `range_as_200`
//!   (says `Accept-Ranges: bytes`, answers every ranged request 200 with the whole file).
//!   A request with `If-None-Match` (or `If-Modified-Since`) naming the current version is
//!   answered `304 Not Modified` (unless `conditional=ignore`), counted by
//!   [`Origin::not_modified`].
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures::StreamExt;

const CHUNK: usize = 64 * 1024;

/// The bytes of generated file `seed`, from offset `start`, `len` long.
pub fn content_range(seed: u64, start: u64, len: usize) -> Vec<u8> {
    // A keyed hash of each 8-byte word's position: any range can be made without the
    // bytes before it.
    let word = |i: u64| {
        let mut x = i.wrapping_add(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x.to_le_bytes()
    };
    let mut out = Vec::with_capacity(len + 16);
    let first = start / 8;
    let last = (start + len as u64).div_ceil(8);
    for w in first..last {
        out.extend_from_slice(&word(w));
    }
    let skip = (start % 8) as usize;
    out.drain(..skip);
    out.truncate(len);
    out
}

pub fn content(seed: u64, size: u64) -> Vec<u8> {
    content_range(seed, 0, size as usize)
}

/// The generated body as a stream of chunks, never all in memory.
pub fn content_stream(seed: u64, size: u64) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    futures::stream::unfold(0u64, move |offset| async move {
        if offset >= size {
            return None;
        }
        let len = CHUNK.min((size - offset) as usize);
        Some((Ok(Bytes::from(content_range(seed, offset, len))), offset + len as u64))
    })
}

#[derive(Clone, Default)]
struct Counters(
    Arc<Mutex<HashMap<String, u32>>>,
    Arc<Mutex<HashMap<String, u64>>>,
    Arc<Mutex<HashMap<String, Vec<String>>>>,
    /// Manifests served at `/manifest/{name}`: content type and body.
    Arc<Mutex<HashMap<String, (String, Bytes)>>>,
);

impl Counters {
    fn hit(&self, name: &str) -> u32 {
        let mut map = self.0.lock().unwrap();
        let n = map.entry(name.to_owned()).or_default();
        *n += 1;
        *n
    }

    /// One more body being sent until the guard is dropped (the body ended or was dropped).
    fn streaming(&self) -> Streaming {
        let mut map = self.0.lock().unwrap();
        let now = {
            let n = map.entry("streaming".to_owned()).or_default();
            *n += 1;
            *n
        };
        let most = map.entry("most streaming".to_owned()).or_default();
        *most = (*most).max(now);
        Streaming(self.clone())
    }
}

/// A body on its way (see [`Counters::streaming`]).
struct Streaming(Counters);

impl Drop for Streaming {
    fn drop(&mut self) {
        if let Some(n) = self.0.0.lock().unwrap().get_mut("streaming") {
            *n -= 1;
        }
    }
}

pub struct Origin {
    pub addr: SocketAddr,
    pub raw_addr: SocketAddr,
    _raw: tokio::task::JoinHandle<()>,
    counters: Counters,
    _server: tokio::task::JoinHandle<()>,
}

impl Origin {
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1").await
    }

    /// An origin listening on another loopback address (e.g. `127.0.0.2`).
    pub async fn start_on(ip: &str) -> Self {
        let counters = Counters::default();
        let app = Router::new()
            .route("/file/{size}", get(file))
            .route("/flaky/{name}/{failures}/{size}", get(flaky))
            .route("/status/{code}", get(status))
            .route("/reset/{size}", get(reset))
            .route("/short/{size}", get(short))
            .route("/trickle/{size}", get(trickle))
            .route("/slow/{size}", get(slow))
            .route("/redirect/{hops}/{size}", get(redirect))
            .route("/delay/{ms}/{size}", get(delay))
            .route("/to", get(redirect_to))
            .route("/echo-header/{name}", get(echo_header))
            .route("/headers", get(all_headers))
            .route("/png", get(png))
            .route("/gzip/{size}", get(gzip))
            .route("/versioned/{name}/{size}", get(versioned))
            .route("/resumable/{name}/{size}", get(resumable))
            .route("/manifest/{name}", get(manifest))
            .layer(axum::middleware::from_fn_with_state(counters.clone(), count))
            .with_state(counters.clone());
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        let raw = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let raw_addr = raw.local_addr().unwrap();
        let raw_counters = counters.clone();
        let raw_server = tokio::spawn(async move {
            while let Ok((socket, _)) = raw.accept().await {
                tokio::spawn(serve_raw(socket, raw_counters.clone()));
            }
        });
        Self { addr, raw_addr, _raw: raw_server, counters, _server: server }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A URL on the bare TCP server (`/reset/{size}`, `/short/{size}`).
    pub fn raw_url(&self, path: &str) -> String {
        format!("http://{}{}", self.raw_addr, path)
    }

    /// The most requests that were being answered at one time (until their headers went).
    pub fn most_at_once(&self) -> u32 {
        self.counters.0.lock().unwrap().get("most in flight").copied().unwrap_or(0)
    }

    /// Most `/slow` bodies sent at once, from the answer's headers to the body's end.
    pub fn most_streaming(&self) -> u32 {
        self.counters.0.lock().unwrap().get("most streaming").copied().unwrap_or(0)
    }

    /// `/slow` bodies being sent now.
    pub fn streaming(&self) -> u32 {
        self.counters.0.lock().unwrap().get("streaming").copied().unwrap_or(0)
    }

    /// Replace the file served at `/versioned/{name}/…`: requests from now on get `version`.
    pub fn set_version(&self, name: &str, version: u32) {
        self.counters.0.lock().unwrap().insert(format!("version:{name}"), version);
    }

    /// The seed of `/versioned/{name}/…?seed=seed` at `version`.
    pub fn versioned_seed(seed: u64, version: u32) -> u64 {
        seed + 1000 * u64::from(version)
    }

    /// Body bytes `/resumable/{name}/…` has sent (also those of a connection it broke).
    pub fn bytes_sent(&self, name: &str) -> u64 {
        self.counters.1.lock().unwrap().get(&format!("sent:{name}")).copied().unwrap_or(0)
    }

    /// The `Range` headers of the requests to `/resumable/{name}/…`, in order ("" for none).
    pub fn ranges_asked(&self, name: &str) -> Vec<String> {
        self.counters.2.lock().unwrap().get(name).cloned().unwrap_or_default()
    }

    /// The most bounded ranges (`bytes=N-M`) `/resumable/{name}/…` was sending at one time
    /// (counted, not timed: from each answer's head to its end or break).
    pub fn most_ranges_at_once(&self, name: &str) -> u32 {
        self.counters.0.lock().unwrap().get(&format!("most sending:{name}")).copied().unwrap_or(0)
    }

    /// Serve `body` at `/manifest/{name}` with `content_type`; returns its URL.
    pub fn serve_manifest(&self, name: &str, content_type: &str, body: impl Into<Bytes>) -> String {
        self.counters.3.lock().unwrap().insert(name.to_owned(), (content_type.to_owned(), body.into()));
        self.url(&format!("/manifest/{name}"))
    }

    /// How many requests to `/resumable/{name}/…` were answered `304 Not Modified`.
    pub fn not_modified(&self, name: &str) -> u32 {
        self.counters.0.lock().unwrap().get(&format!("not_modified:{name}")).copied().unwrap_or(0)
    }

    /// How many requests reached `path` (without its query).
    pub fn hits(&self, path: &str) -> u32 {
        self.counters.0.lock().unwrap().get(&format!("path:{path}")).copied().unwrap_or(0)
    }
}

async fn count(State(c): State<Counters>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    c.hit(&format!("path:{}", req.uri().path()));
    let now = c.hit("in flight");
    {
        let mut map = c.0.lock().unwrap();
        let most = map.entry("most in flight".to_owned()).or_default();
        *most = (*most).max(now);
    }
    let response = next.run(req).await;
    *c.0.lock().unwrap().get_mut("in flight").unwrap() -= 1;
    response
}

fn seed_of(q: &HashMap<String, String>) -> u64 {
    q.get("seed").and_then(|s| s.parse().ok()).unwrap_or(1)
}

fn streamed(seed: u64, size: u64, content_type: &str) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_LENGTH, size.into());
    headers.insert(header::CONTENT_TYPE, content_type.parse().unwrap());
    (headers, Body::from_stream(content_stream(seed, size))).into_response()
}

async fn manifest(
    State(c): State<Counters>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some((content_type, body)) = c.3.lock().unwrap().get(&name).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let every_ms: u64 = q.get("every_ms").and_then(|v| v.parse().ok()).unwrap_or(0);
    if every_ms == 0 {
        return ([(header::CONTENT_TYPE, content_type)], body).into_response();
    }
    // In pieces of `piece` bytes, one every `every_ms`.
    let piece: usize = q.get("piece").and_then(|v| v.parse().ok()).unwrap_or(4096);
    let pieces: Vec<Bytes> = body.chunks(piece.max(1)).map(Bytes::copy_from_slice).collect();
    let stream = futures::stream::iter(pieces).then(move |p| async move {
        tokio::time::sleep(Duration::from_millis(every_ms)).await;
        Ok::<_, std::io::Error>(p)
    });
    ([(header::CONTENT_TYPE, content_type)], Body::from_stream(stream)).into_response()
}

async fn file(Path(size): Path<u64>, Query(q): Query<HashMap<String, String>>) -> Response {
    let ct = q.get("type").cloned().unwrap_or_else(|| "application/octet-stream".into());
    streamed(seed_of(&q), size, &ct)
}

async fn flaky(
    State(c): State<Counters>,
    Path((name, failures, size)): Path<(String, u32, u64)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if c.hit(&format!("flaky:{name}")) <= failures {
        return (StatusCode::INTERNAL_SERVER_ERROR, "try again").into_response();
    }
    streamed(seed_of(&q), size, "application/octet-stream")
}

async fn status(Path(code): Path<u16>, Query(q): Query<HashMap<String, String>>) -> Response {
    let code = StatusCode::from_u16(code).unwrap();
    let mut headers = HeaderMap::new();
    if code == StatusCode::TOO_MANY_REQUESTS || code == StatusCode::SERVICE_UNAVAILABLE {
        let pause = q.get("retry_after").cloned().unwrap_or_else(|| "1".into());
        headers.insert(header::RETRY_AFTER, pause.parse().unwrap());
    }
    (code, headers, format!("status {code}")).into_response()
}

async fn reset(Path(size): Path<u64>, Query(q): Query<HashMap<String, String>>) -> Response {
    let half = content_stream(seed_of(&q), size / 2);
    let broken = half.chain(futures::stream::once(async {
        Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "origin breaks the connection"))
    }));
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_LENGTH, size.into());
    (headers, Body::from_stream(broken)).into_response()
}

async fn short(Path(size): Path<u64>, Query(q): Query<HashMap<String, String>>) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_LENGTH, size.into());
    (headers, Body::from_stream(content_stream(seed_of(&q), size / 2))).into_response()
}

async fn trickle(Path(size): Path<u64>, Query(q): Query<HashMap<String, String>>) -> Response {
    let every = Duration::from_millis(q.get("every_ms").and_then(|s| s.parse().ok()).unwrap_or(1000));
    let bytes = content(seed_of(&q), size);
    let stream = futures::stream::iter(bytes).then(move |b| async move {
        tokio::time::sleep(every).await;
        Ok::<_, std::io::Error>(Bytes::from(vec![b]))
    });
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_LENGTH, size.into());
    (headers, Body::from_stream(stream)).into_response()
}

/// `size` bytes in chunks of `chunk` (default 64 KiB), one every `every_ms` (default 10).
async fn slow(State(c): State<Counters>, Path(size): Path<u64>, Query(q): Query<HashMap<String, String>>) -> Response {
    let every = Duration::from_millis(q.get("every_ms").and_then(|s| s.parse().ok()).unwrap_or(10));
    let chunk = q.get("chunk").and_then(|s| s.parse().ok()).unwrap_or(64 * 1024u64);
    let seed = seed_of(&q);
    let sending = c.streaming();
    let stream = futures::stream::iter((0..size).step_by(chunk as usize)).then(move |start| async move {
        tokio::time::sleep(every).await;
        Ok::<_, std::io::Error>(Bytes::from(content_range(seed, start, chunk.min(size - start) as usize)))
    });
    let stream = stream.map(move |chunk| {
        let _sending = &sending;
        chunk
    });
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_LENGTH, size.into());
    (headers, Body::from_stream(stream)).into_response()
}

async fn versioned(
    State(c): State<Counters>,
    Path((name, size)): Path<(String, u64)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let version = c.0.lock().unwrap().get(&format!("version:{name}")).copied().unwrap_or(0);
    let seed = Origin::versioned_seed(seed_of(&q), version);
    let pause = Duration::from_millis(q.get("slow_ms").and_then(|s| s.parse().ok()).unwrap_or(0) / 8);
    let bytes = content(seed, size);
    let piece = (bytes.len() / 8).max(1);
    let pieces: Vec<Bytes> = bytes.chunks(piece).map(Bytes::copy_from_slice).collect();
    let stream = futures::stream::iter(pieces).then(move |p| async move {
        tokio::time::sleep(pause).await;
        Ok::<_, std::io::Error>(p)
    });
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_LENGTH, size.into());
    (headers, Body::from_stream(stream)).into_response()
}

async fn resumable(
    State(c): State<Counters>,
    Path((name, size)): Path<(String, u64)>,
    Query(q): Query<HashMap<String, String>>,
    request: HeaderMap,
) -> Response {
    let request_no = c.hit(&format!("resumable:{name}"));
    let arg = |k: &str| q.get(k).map(String::as_str);
    let bumped = u32::from(request_no > 1 && arg("bump") == Some("1"));
    let version = c.0.lock().unwrap().get(&format!("version:{name}")).copied().unwrap_or(0) + bumped;
    let seed = Origin::versioned_seed(seed_of(&q), version);
    let etag = format!("\"{name}-v{version}\"");
    // A date that moves with the version.
    let modified =
        httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + u64::from(version)));
    let validator = match arg("validator").unwrap_or("etag") {
        "etag" => Some((header::ETAG, etag)),
        "date" => Some((header::LAST_MODIFIED, modified)),
        "weak" => Some((header::ETAG, format!("W/{etag}"))),
        _ => None,
    };
    // A conditional request (RFC 9110 §13.1.2, §13.1.3) about the current version: 304, no
    // body (weak comparison for `If-None-Match`; `If-Modified-Since` only without it).
    let asked = |name| request.get(name).and_then(|v: &axum::http::HeaderValue| v.to_str().ok());
    let weakly = |tag: &str| tag.trim().trim_start_matches("W/").to_owned();
    let unchanged = match (asked(header::IF_NONE_MATCH), asked(header::IF_MODIFIED_SINCE), &validator) {
        (Some(tags), _, Some((h, current))) if *h == header::ETAG => {
            tags.split(',').any(|tag| weakly(tag) == weakly(current))
        }
        (None, Some(since), Some((h, current))) if *h == header::LAST_MODIFIED => since == current,
        _ => false,
    };
    if unchanged && arg("conditional") != Some("ignore") {
        c.hit(&format!("not_modified:{name}"));
        let (h, current) = validator.expect("only a named version is unchanged");
        return (StatusCode::NOT_MODIFIED, [(h, current)]).into_response();
    }
    let range = request.get(header::RANGE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    c.2.lock().unwrap().entry(name.clone()).or_default().push(range.clone());
    let lie = arg("lie").unwrap_or("");
    let same_version = match (request.get(header::IF_RANGE).and_then(|v| v.to_str().ok()), &validator) {
        _ if lie == "ignore_if_range" => true,
        (Some(asked), Some((_, current))) => asked == current,
        (Some(_), None) => false,
        (None, _) => true,
    };
    // `bytes=N-` or `bytes=N-M`: the first byte, and the last one asked if any.
    let spec = range.strip_prefix("bytes=").and_then(|r| r.split_once('-'));
    let asked_end = spec.and_then(|(_, m)| m.parse::<u64>().ok());
    let weak = matches!(&validator, Some((_, v)) if v.starts_with("W/"));
    let asked = spec
        .and_then(|(n, _)| n.parse::<u64>().ok())
        .filter(|&n| n < size && same_version && !weak && arg("ranges") != Some("no") && lie != "range_as_200");
    const LIE: u64 = 1024 * 1024;
    let from = match (asked, lie) {
        (Some(n), "wrong_start") => Some(n.saturating_sub(LIE)),
        (None, "whole_as_206") => Some(0),
        (from, _) => from,
    };
    // The last byte this answer sends, and the total it declares ("*" when unknown).
    let end = asked.and(asked_end).map_or(size - 1, |m| m.min(size - 1));
    let (last, total) = match (asked, lie) {
        (Some(_), "short_total") => (end.min(size - LIE - 1), (size - LIE).to_string()),
        (Some(_), "not_to_end") => (end.saturating_sub(LIE), size.to_string()),
        (Some(_), "unknown_total") => (end, "*".to_owned()),
        _ => (end, size.to_string()),
    };
    let validator = validator.filter(|_| !(asked.is_some() && lie == "no_validator"));
    if asked.is_some() && lie == "refuse_range" {
        let unsatisfiable = [(header::CONTENT_RANGE, format!("bytes */{size}"))];
        return (StatusCode::RANGE_NOT_SATISFIABLE, unsatisfiable).into_response();
    }
    let start = from.unwrap_or(0);
    let size = last + 1;
    let mut cut = arg("cut").and_then(|n| n.parse::<u64>().ok()).filter(|_| request_no == 1);
    if let Some(at) = arg("cut_once").and_then(|n| n.parse::<u64>().ok())
        && request_no > 1
        && (start..=last).contains(&at)
        && c.hit(&format!("cut_once:{name}")) <= arg("cut_times").and_then(|n| n.parse().ok()).unwrap_or(1)
    {
        cut = Some(at);
    }
    let every = Duration::from_millis(arg("every_ms").and_then(|n| n.parse().ok()).unwrap_or(0));
    let piece = 1024 * 1024u64;
    let end = cut.map_or(size, |cut| cut.clamp(start, size));
    let counters = c.clone();
    let sent = name.clone();
    let pieces = futures::stream::iter((start..end).step_by(piece as usize)).then(move |at| {
        let (counters, sent) = (counters.clone(), sent.clone());
        async move {
            tokio::time::sleep(every).await;
            let len = piece.min(end - at);
            *counters.1.lock().unwrap().entry(format!("sent:{sent}")).or_default() += len;
            Ok::<_, std::io::Error>(Bytes::from(content_range(seed, at, len as usize)))
        }
    });
    let broken = futures::stream::iter(
        cut.map(|_| Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "origin breaks the connection"))),
    );
    let sending = asked.and(asked_end).map(|_| Sending::start(&c, &name));
    let pieces = pieces.map(move |piece| {
        let _counted = &sending;
        piece
    });
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_LENGTH, (size - start).into());
    headers.insert(header::CONTENT_TYPE, "application/octet-stream".parse().unwrap());
    if arg("ranges") != Some("no") {
        headers.insert(header::ACCEPT_RANGES, "bytes".parse().unwrap());
    }
    if let Some((name, value)) = validator {
        headers.insert(name, value.parse().unwrap());
    }
    let status = match from {
        Some(from) => {
            headers.insert(header::CONTENT_RANGE, format!("bytes {from}-{last}/{total}").parse().unwrap());
            StatusCode::PARTIAL_CONTENT
        }
        None => StatusCode::OK,
    };
    (status, headers, Body::from_stream(pieces.chain(broken))).into_response()
}

/// Counts one body among those being sent for a name, until dropped.
struct Sending {
    counters: Counters,
    name: String,
}

impl Sending {
    fn start(c: &Counters, name: &str) -> Self {
        let now = c.hit(&format!("sending:{name}"));
        let mut map = c.0.lock().unwrap();
        let most = map.entry(format!("most sending:{name}")).or_default();
        *most = (*most).max(now);
        Self { counters: c.clone(), name: name.to_owned() }
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        *self.counters.0.lock().unwrap().get_mut(&format!("sending:{}", self.name)).unwrap() -= 1;
    }
}

async fn redirect(Path((hops, size)): Path<(u32, u64)>, Query(q): Query<HashMap<String, String>>) -> Response {
    let seed = seed_of(&q);
    if hops == 0 {
        return streamed(seed, size, "application/octet-stream");
    }
    let next = format!("/redirect/{}/{size}?seed={seed}", hops - 1);
    (StatusCode::FOUND, [(header::LOCATION, next)]).into_response()
}

async fn delay(Path((ms, size)): Path<(u64, u64)>, Query(q): Query<HashMap<String, String>>) -> Response {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    streamed(seed_of(&q), size, "application/octet-stream")
}

/// Answer one request by hand: a correct head, half the declared body, then a reset or
/// a clean close.
async fn serve_raw(mut socket: tokio::net::TcpStream, counters: Counters) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut reader = BufReader::new(&mut socket);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).await.is_err() {
        return;
    }
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => {}
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    counters.hit(&format!("path:{path}"));
    let mut parts = path.trim_start_matches('/').split('/');
    let (kind, size) = (parts.next().unwrap_or(""), parts.next().and_then(|s| s.parse::<u64>().ok()).unwrap_or(0));
    let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {size}\r\ncontent-type: application/octet-stream\r\n\r\n");
    if socket.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let _ = socket.write_all(&content(1, size / 2)).await;
    let _ = socket.flush().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    if kind == "reset" {
        let _ = socket.set_zero_linger();
        drop(socket);
    } else {
        let _ = socket.shutdown().await;
    }
}

async fn redirect_to(Query(q): Query<HashMap<String, String>>) -> Response {
    (StatusCode::FOUND, [(header::LOCATION, q.get("url").cloned().unwrap_or_default())]).into_response()
}

async fn gzip(Path(size): Path<u64>, Query(q): Query<HashMap<String, String>>) -> Response {
    let mut response = streamed(seed_of(&q), size, "application/gzip");
    response.headers_mut().insert(header::CONTENT_ENCODING, "gzip".parse().unwrap());
    response
}

async fn echo_header(Path(name): Path<String>, headers: HeaderMap) -> Response {
    match headers.get(&name) {
        Some(value) => (StatusCode::OK, value.as_bytes().to_vec()).into_response(),
        None => (StatusCode::UNAUTHORIZED, "missing header").into_response(),
    }
}

/// Every request header, as a JSON object (a repeated name keeps its last value).
async fn all_headers(headers: HeaderMap) -> Response {
    let map: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .map(|(name, value)| (name.as_str().to_owned(), String::from_utf8_lossy(value.as_bytes()).into()))
        .collect();
    (StatusCode::OK, serde_json::Value::Object(map).to_string()).into_response()
}

/// A listener that only counts connections: proof that nothing reached an address.
pub struct Canary {
    pub addr: SocketAddr,
    hits: Arc<std::sync::atomic::AtomicUsize>,
}

impl Canary {
    pub async fn start(addr: &str) -> Self {
        Self::try_start(addr).await.unwrap()
    }

    /// [`Canary::start`], or the error when the address is taken.
    pub async fn try_start(addr: &str) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = hits.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(socket);
            }
        });
        Ok(Self { addr, hits })
    }

    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The first bytes of a PNG file.
pub const PNG_HEAD: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0";

async fn png() -> Response {
    ([(header::CONTENT_TYPE, "application/octet-stream")], PNG_HEAD.to_vec()).into_response()
}
