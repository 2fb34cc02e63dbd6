//! The HTTP fetcher: reqwest with the destination guard on every lookup and redirect.

use std::error::Error as StdError;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{
    ACCEPT_RANGES, CONTENT_RANGE, CONTENT_TYPE, ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, LAST_MODIFIED, RANGE,
    RETRY_AFTER,
};
use reqwest::{StatusCode, redirect};
use url::Url;

use super::{DestinationGuard, Fetched, Fetcher, PartialAnswer, RangeAnswer, RangeFrom, Refused};
use crate::lifecycle::{Cause, JobError, OriginVersion};

/// Limits on talking to origins.
#[derive(Debug, Clone)]
pub struct FetchSettings {
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of a response.
    pub read_timeout: Duration,
    pub max_redirects: usize,
    /// An explicitly configured proxy; proxy environment variables are never read. The
    /// proxy resolves names itself; fileflow resolves and checks each name first, but
    /// cannot see which address the proxy then connects to.
    pub proxy: Option<Url>,
}

/// Name resolution, replaceable so tests can answer as a hostile DNS server would.
#[async_trait]
pub trait Lookup: Send + Sync + 'static {
    async fn lookup(&self, host: &str) -> std::io::Result<Vec<IpAddr>>;
}

/// The system resolver.
pub struct SystemLookup;

#[async_trait]
impl Lookup for SystemLookup {
    async fn lookup(&self, host: &str) -> std::io::Result<Vec<IpAddr>> {
        Ok(tokio::net::lookup_host((host, 0)).await?.map(|a| a.ip()).collect())
    }
}

pub struct HttpFetcher {
    client: reqwest::Client,
    guard: DestinationGuard,
    max_redirects: usize,
    /// Set when requests go through a proxy: names are then resolved and checked here
    /// before the proxy sees them.
    proxied_lookup: Option<Arc<dyn Lookup>>,
}

impl HttpFetcher {
    pub fn new(guard: DestinationGuard, settings: &FetchSettings) -> Result<Self, reqwest::Error> {
        Self::with_lookup(guard, settings, Arc::new(SystemLookup))
    }

    pub fn with_lookup(
        guard: DestinationGuard,
        settings: &FetchSettings,
        lookup: Arc<dyn Lookup>,
    ) -> Result<Self, reqwest::Error> {
        // Redirects are followed by `fetch` itself, hop by hop, so each hop is checked
        // and the caller's headers go only where they were meant to.
        let mut builder = guarded_client(guard.clone(), lookup.clone())
            .connect_timeout(settings.connect_timeout)
            .read_timeout(settings.read_timeout);
        if let Some(proxy) = &settings.proxy {
            builder = builder.proxy(reqwest::Proxy::all(proxy.clone())?);
        }
        Ok(Self {
            client: builder.build()?,
            guard,
            max_redirects: settings.max_redirects,
            proxied_lookup: settings.proxy.is_some().then_some(lookup),
        })
    }

    /// Check `url` before a request to it: always its scheme, credentials and host; and
    /// through a proxy (which resolves names itself) every address its name resolves to.
    async fn check_destination(&self, url: &Url) -> Result<(), JobError> {
        let refused = |r: Refused| JobError::permanent(r.to_string()).because(Cause::Destination);
        self.guard.check_url(url).map_err(refused)?;
        if let (Some(lookup), Some(url::Host::Domain(name))) = (&self.proxied_lookup, url.host()) {
            let ips =
                lookup.lookup(name).await.map_err(|e| JobError::transient(format!("cannot resolve {name}: {e}")))?;
            for ip in ips {
                self.guard.check_resolved(name, ip).map_err(refused)?;
            }
        }
        Ok(())
    }
}

/// An HTTP client that connects only to addresses the guard allows (names resolved by
/// `lookup` and checked before connecting), follows no redirect, sends no Referer and reads
/// no proxy variables. Origin fetches and webhooks go through it.
pub fn guarded_client(guard: DestinationGuard, lookup: Arc<dyn Lookup>) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .user_agent(concat!("fileflow/", env!("CARGO_PKG_VERSION")))
        .no_proxy()
        .redirect(redirect::Policy::none())
        .referer(false)
        .dns_resolver(Arc::new(GuardedResolver { guard, lookup }))
}

/// Whether a caller's headers for `origin` may go with a request to `hop`: only to the
/// same origin (scheme, host and port), so a redirect elsewhere, or from https to http,
/// never carries them.
fn same_origin(origin: &Url, hop: &Url) -> bool {
    origin.origin() == hop.origin()
}

/// Resolves names itself and hands reqwest only checked addresses, so the connection goes
/// to an address that was checked (no second lookup for DNS rebinding to exploit). A name
/// with any refused address is refused whole.
struct GuardedResolver {
    guard: DestinationGuard,
    lookup: Arc<dyn Lookup>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.guard.clone();
        let lookup = self.lookup.clone();
        Box::pin(async move {
            let host = name.as_str();
            guard.check_name(host)?;
            let ips = lookup.lookup(host).await?;
            if ips.is_empty() {
                return Err(format!("{host} has no addresses").into());
            }
            for ip in &ips {
                guard.check_resolved(host, *ip)?;
            }
            let addrs: Vec<SocketAddr> = ips.into_iter().map(|ip| SocketAddr::new(ip, 0)).collect();
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// Find an error of type `T` anywhere in `err`'s source chain.
fn find_cause<'a, T: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// An error and its causes, each once, as one line.
pub fn describe(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut current = err.source();
    while let Some(e) = current {
        let next = e.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        current = e.source();
    }
    text
}

/// Classify a failed request or body read.
fn classify(err: reqwest::Error) -> JobError {
    if let Some(refused) = find_cause::<Refused>(&err) {
        return JobError::permanent(refused.to_string()).because(Cause::Destination);
    }
    let (what, cause) = if err.is_timeout() {
        ("origin timed out", Cause::Timeout)
    } else if err.is_connect() {
        ("cannot connect to origin", Cause::Network)
    } else if err.is_body() || err.is_decode() {
        ("origin body interrupted", Cause::Network)
    } else {
        ("origin request failed", Cause::Network)
    };
    // Strip the URL: it may carry tokens in its query string.
    let err = err.without_url();
    JobError::transient(format!("{what}: {}", describe(&err))).because(cause)
}

/// What names this version of the file for `If-Range` (RFC 9110 §13.1.5): a strong entity
/// tag, else the `Last-Modified` date.
fn validator(headers: &reqwest::header::HeaderMap) -> Option<String> {
    let text = |name| headers.get(name).and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok());
    text(ETAG).filter(|tag| tag.starts_with('"')).or_else(|| text(LAST_MODIFIED)).map(str::to_owned)
}

/// The `ETag` and `Last-Modified` headers as the origin wrote them.
fn origin_version(headers: &reqwest::header::HeaderMap) -> OriginVersion {
    let text = |name| headers.get(name).and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok()).map(str::to_owned);
    OriginVersion { etag: text(ETAG), last_modified: text(LAST_MODIFIED) }
}

/// `Content-Range: bytes first-last/total` as (first, last, total); total `None` when it says `*`.
fn content_range(headers: &reqwest::header::HeaderMap) -> Option<(u64, u64, Option<u64>)> {
    let value = headers.get(CONTENT_RANGE)?.to_str().ok()?;
    let (range, total) = value.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let (first, last): (u64, u64) = (first.trim().parse().ok()?, last.trim().parse().ok()?);
    let total = if total.trim() == "*" { None } else { Some(total.trim().parse().ok()?) };
    (first <= last).then_some((first, last, total))
}

/// `Retry-After` as a delay: either seconds or an HTTP date.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(std::time::SystemTime::now()).unwrap_or(Duration::ZERO))
}

fn status_error(status: StatusCode, headers: &reqwest::header::HeaderMap) -> JobError {
    let cause = match status {
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => Cause::Throttled,
        _ => Cause::OriginStatus,
    };
    let error = JobError::for_http_status(status.as_u16(), format!("origin answered HTTP {status}")).because(cause);
    // Only an answer that may pass asks for a pause (a permanent one ends the job).
    if error.is_transient() { error.with_retry_after(retry_after(headers)) } else { error }
}

impl HttpFetcher {
    /// Send a GET for `url` (with `range`'s `Range` and `If-Range` when given, and asking
    /// whether the file changed since `since` when given), following redirects hop by hop,
    /// each one checked; the caller's headers go only to `url`'s origin.
    async fn send(
        &self,
        url: &Url,
        headers: &[(String, String)],
        range: Option<&RangeFrom>,
        since: Option<&OriginVersion>,
    ) -> Result<reqwest::Response, JobError> {
        let mut hop = url.clone();
        let mut redirects = 0;
        loop {
            self.check_destination(&hop).await.map_err(|e| match redirects {
                0 => e,
                _ => JobError { message: format!("redirect {}", e.message), ..e },
            })?;
            let mut request = self.client.get(hop.clone());
            if let Some(range) = range {
                request = request.header(RANGE, range.header()).header(IF_RANGE, &range.validator);
            }
            if let Some(since) = since {
                if let Some(etag) = since.strong_etag() {
                    request = request.header(IF_NONE_MATCH, etag);
                }
                if let Some(date) = &since.last_modified {
                    request = request.header(IF_MODIFIED_SINCE, date);
                }
            }
            if same_origin(url, &hop) {
                for (name, value) in headers {
                    request = request.header(name, value);
                }
            }
            let response = request.send().await.map_err(classify)?;
            let status = response.status();
            if !status.is_redirection() || status == StatusCode::NOT_MODIFIED {
                return Ok(response);
            }
            let target = response.headers().get(reqwest::header::LOCATION).and_then(|l| l.to_str().ok());
            let Some(next) = target.and_then(|t| hop.join(t).ok()) else {
                return Err(JobError::permanent(format!(
                    "origin answered HTTP {status} without a redirect that can be followed"
                ))
                .because(Cause::OriginStatus));
            };
            redirects += 1;
            if redirects > self.max_redirects {
                return Err(JobError::permanent(format!("origin redirected more than {} times", self.max_redirects))
                    .because(Cause::Destination));
            }
            hop = next;
        }
    }
}

/// What a partial answer says it holds.
fn partial_answer(response: &reqwest::Response) -> PartialAnswer {
    PartialAnswer {
        range: content_range(response.headers()),
        validator: validator(response.headers()),
        length: response.content_length(),
    }
}

/// Whether the origin says it serves byte ranges (`Accept-Ranges: bytes`, RFC 9110 §14.3).
fn accepts_ranges(headers: &reqwest::header::HeaderMap) -> bool {
    headers
        .get_all(ACCEPT_RANGES)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|unit| unit.trim().eq_ignore_ascii_case("bytes"))
}

/// `response` as a [`Fetched`] whose body starts at `start` of a file of `content_length`.
fn fetched(response: reqwest::Response, start: u64, content_length: Option<u64>) -> Fetched {
    let head = response.headers();
    Fetched {
        content_length,
        content_type: head.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned),
        validator: validator(head),
        origin: origin_version(head),
        start,
        accepts_ranges: accepts_ranges(head),
        body: response.bytes_stream().map_err(classify).boxed(),
    }
}

impl HttpFetcher {
    /// The origin's answer to a request for the whole file, or for its rest from `from`.
    async fn whole_file(
        &self,
        url: &Url,
        headers: &[(String, String)],
        from: Option<&RangeFrom>,
        response: reqwest::Response,
    ) -> Result<Fetched, JobError> {
        let status = response.status();
        if status == StatusCode::RANGE_NOT_SATISFIABLE && from.is_some() {
            // The file is not what the checkpoint says (it shrank, or changed): start over.
            tracing::warn!("origin cannot send the rest asked for (416); fetching the whole file");
            drop(response);
            return Box::pin(self.fetch(url, headers, None)).await;
        }
        if !status.is_success() {
            return Err(status_error(status, response.headers()));
        }
        let partial = partial_answer(&response);
        let (start, content_length) = match (status, from) {
            (StatusCode::PARTIAL_CONTENT, Some(from)) => match from.continues(&partial) {
                Ok(()) => (from.offset, Some(from.total)),
                Err(why) => {
                    // Not provably the rest of the same file: never store it; ask for the
                    // whole file once instead (the caller drops its checkpoint).
                    tracing::warn!(offset = from.offset, reason = %why,
                        "origin's partial answer does not continue the stored part; fetching the whole file");
                    drop(response);
                    return Box::pin(self.fetch(url, headers, None)).await;
                }
            },
            (StatusCode::PARTIAL_CONTENT, None) => match partial.range {
                // A 206 that holds the whole file is the whole file.
                Some((0, last, Some(total))) if last + 1 == total => (0, Some(total)),
                _ => {
                    return Err(JobError::transient(
                        "origin answered 206 with part of the file to a request for all of it",
                    )
                    .because(Cause::OriginStatus));
                }
            },
            _ => (0, response.content_length()),
        };
        Ok(fetched(response, start, content_length))
    }
}

#[async_trait]
impl Fetcher for HttpFetcher {
    async fn fetch(
        &self,
        url: &Url,
        headers: &[(String, String)],
        from: Option<&RangeFrom>,
    ) -> Result<Fetched, JobError> {
        let response = self.send(url, headers, from, None).await?;
        self.whole_file(url, headers, from, response).await
    }

    async fn fetch_if_changed(
        &self,
        url: &Url,
        headers: &[(String, String)],
        since: &OriginVersion,
    ) -> Result<Option<Fetched>, JobError> {
        let response = self.send(url, headers, None, Some(since)).await?;
        if response.status() == StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        self.whole_file(url, headers, None, response).await.map(Some)
    }

    async fn fetch_range(
        &self,
        url: &Url,
        headers: &[(String, String)],
        range: &RangeFrom,
    ) -> Result<RangeAnswer, JobError> {
        let response = self.send(url, headers, Some(range), None).await?;
        let status = response.status();
        let unproven = |why: String| Ok(RangeAnswer::Unproven(why));
        match status {
            StatusCode::PARTIAL_CONTENT => match range.continues(&partial_answer(&response)) {
                Ok(()) => Ok(RangeAnswer::Proven(fetched(response, range.offset, Some(range.total)))),
                Err(why) => unproven(format!("the answer to `Range: {}` is not that range: {why}", range.header())),
            },
            // If-Range did its work (the file changed), or the origin ignored Range.
            StatusCode::OK => unproven(format!(
                "the origin answered `Range: {}` with the whole file (200): it changed or ignores ranges",
                range.header()
            )),
            StatusCode::RANGE_NOT_SATISFIABLE => {
                unproven(format!("the origin cannot send `Range: {}` (416): the file changed", range.header()))
            }
            // Another success, or a refusal of the range alone (the whole file was served a
            // moment ago): the whole file's answer has the last word.
            _ if status.is_success() || (status.is_client_error() && status != StatusCode::TOO_MANY_REQUESTS) => {
                unproven(format!("the origin answered `Range: {}` with HTTP {status}", range.header()))
            }
            _ => Err(status_error(status, response.headers())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_origin_statuses() {
        let none = reqwest::header::HeaderMap::new();
        for code in [500, 502, 503, 504, 408, 429] {
            let e = status_error(StatusCode::from_u16(code).unwrap(), &none);
            assert!(e.is_transient(), "{code} should be transient");
        }
        for code in [400, 401, 403, 404, 410, 451] {
            let e = status_error(StatusCode::from_u16(code).unwrap(), &none);
            assert!(!e.is_transient(), "{code} should be permanent");
        }
    }

    #[test]
    fn reads_content_range() {
        let mut headers = reqwest::header::HeaderMap::new();
        for (value, read) in [
            ("bytes 10-99/100", Some((10, 99, Some(100)))),
            ("bytes 10-99/*", Some((10, 99, None))),
            ("bytes 99-10/100", None),
            ("bytes */100", None),
            ("items 1-2/3", None),
        ] {
            headers.insert(CONTENT_RANGE, value.parse().unwrap());
            assert_eq!(content_range(&headers), read, "{value}");
        }
    }

    #[test]
    fn reads_retry_after_in_seconds_and_as_a_date() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(RETRY_AFTER, "7".parse().unwrap());
        let e = status_error(StatusCode::TOO_MANY_REQUESTS, &headers);
        assert_eq!(e.retry_after, Some(Duration::from_secs(7)));

        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        headers.insert(RETRY_AFTER, httpdate::fmt_http_date(later).parse().unwrap());
        let delay = retry_after(&headers).unwrap();
        assert!(delay > Duration::from_secs(100) && delay <= Duration::from_secs(120));

        headers.insert(RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&headers), None);
    }
}
