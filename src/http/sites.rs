//! Which sites may talk to the API: the defences against a web page in the user's own
//! browser, which can reach a loopback API as easily as the user can.
//!
//! - **Host check** (DNS rebinding): a page on `attacker.example` whose name re-resolves to
//!   127.0.0.1 sends `Host: attacker.example`. Only requests addressed to a loopback name or
//!   address, the listen address, `--public-url`'s host or one of `--allowed-hosts` are
//!   served; others get `421 misdirected_request`, on every route. An IP-literal `Host` is
//!   accepted when it is loopback or the listen address, and any IP literal when listening
//!   on an unspecified address (`0.0.0.0`, `::`): a browser that sends an IP literal
//!   connected to that address itself, so no rebinding is involved, and probes that use a
//!   pod's IP keep working.
//! - **Cross-site check** (CSRF): a state-changing request (anything but `GET`, `HEAD`,
//!   `OPTIONS`) whose `Origin` is not fileflow's own (the host it was reached on, or
//!   `--public-url`) nor one of `--cors-origins` gets `403 forbidden` and changes nothing;
//!   without an `Origin`, `Sec-Fetch-Site: cross-site` or `same-site` is refused the same
//!   way. Clients that are not browsers (curl, the CLI) send neither and are let through.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower_http::cors::{AllowOrigin, CorsLayer};
use url::Url;

use super::error::ApiError;

/// A name `--allowed-hosts` lets through.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// This name or address exactly.
    Exact(String),
    /// Any name ending with this (given as `.example.com`: the name itself and its subdomains).
    Suffix(String),
    /// Anything (`*`): for a proxy in front that checks `Host` itself.
    Any,
}

/// Which `Host` and `Origin` headers the API accepts.
#[derive(Debug, Clone)]
pub struct SitePolicy {
    listen: IpAddr,
    hosts: Vec<HostPattern>,
    /// Origins besides the request's own whose pages may change things: `--public-url`'s
    /// and `--cors-origins`.
    origins: Vec<url::Origin>,
    /// `--cors-origins`, as browsers send them in `Origin`.
    cors: Vec<HeaderValue>,
}

impl SitePolicy {
    /// The policy of an API listening on `listen`, reached at `public_url`, allowing
    /// `allowed_hosts` and the browser apps `cors_origins`.
    pub fn new(
        listen: SocketAddr,
        public_url: Option<&Url>,
        allowed_hosts: &[String],
        cors_origins: &[Url],
    ) -> Result<Self, String> {
        let mut hosts = Vec::new();
        if let Some(host) = public_url.and_then(Url::host_str) {
            hosts.push(HostPattern::Exact(normalize(host)));
        }
        for given in allowed_hosts.iter().map(|h| h.trim()).filter(|h| !h.is_empty()) {
            let pattern = match given {
                "*" => HostPattern::Any,
                suffix if suffix.starts_with('.') => HostPattern::Suffix(normalize(suffix)),
                name => {
                    if name.contains('/') || name.contains('*') {
                        return Err(format!(
                            "--allowed-hosts: {name:?} is not a host name (give `files.example.com`, \
                             `.example.com` for its subdomains, or `*`)"
                        ));
                    }
                    HostPattern::Exact(normalize(split_port(name).0))
                }
            };
            hosts.push(pattern);
        }
        let mut origins: Vec<url::Origin> = public_url.map(Url::origin).into_iter().collect();
        let mut cors = Vec::new();
        for origin in cors_origins {
            if !matches!(origin.scheme(), "http" | "https") || origin.host().is_none() {
                return Err(format!("--cors-origins: {origin} is not an http(s) origin"));
            }
            let serialized = origin.origin().ascii_serialization();
            cors.push(HeaderValue::from_str(&serialized).map_err(|e| format!("--cors-origins: {origin}: {e}"))?);
            origins.push(origin.origin());
        }
        Ok(Self { listen: listen.ip(), hosts, origins, cors })
    }

    /// CORS answers for the `--cors-origins` browser apps (none when there are none): they
    /// may call the API with a key in `Authorization` (no cookies are involved).
    pub fn cors_layer(&self) -> Option<CorsLayer> {
        if self.cors.is_empty() {
            return None;
        }
        Some(
            CorsLayer::new()
                .allow_origin(AllowOrigin::list(self.cors.clone()))
                .allow_methods([Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE])
                .allow_headers([
                    header::AUTHORIZATION,
                    header::CONTENT_TYPE,
                    HeaderName::from_static("idempotency-key"),
                    HeaderName::from_static("x-request-id"),
                    HeaderName::from_static("traceparent"),
                ])
                .expose_headers([
                    header::LOCATION,
                    header::RETRY_AFTER,
                    header::WWW_AUTHENTICATE,
                    HeaderName::from_static("x-request-id"),
                    HeaderName::from_static("idempotent-replayed"),
                ])
                .max_age(Duration::from_secs(600)),
        )
    }

    /// Whether a request addressed to `host` (a `Host` header's value) may be served.
    pub fn host_allowed(&self, host: &str) -> bool {
        let (name, port) = split_port(host);
        // Not a host (userinfo, a path) or not a port: nothing fileflow is served under.
        if name.contains(['@', '/', '\\', ' ']) || port.is_some_and(|p| p.parse::<u16>().is_err()) {
            return false;
        }
        let name = normalize(name);
        if let Ok(ip) = name.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            let ip = ip.to_canonical();
            if ip.is_loopback() || ip == self.listen.to_canonical() || self.listen.is_unspecified() {
                return true;
            }
        } else if name == "localhost" {
            return true;
        }
        self.hosts.iter().any(|pattern| match pattern {
            HostPattern::Any => true,
            HostPattern::Exact(exact) => *exact == name,
            HostPattern::Suffix(suffix) => name.ends_with(suffix.as_str()) || name == suffix[1..],
        })
    }

    /// Whether a page of `origin` (an `Origin` header's value) may change things through a
    /// request that reached the API as `host`.
    pub fn origin_allowed(&self, origin: &str, host: Option<&str>) -> bool {
        let Ok(url) = Url::parse(origin) else { return false };
        if !matches!(url.scheme(), "http" | "https") {
            return false;
        }
        let origin = url.origin();
        if self.origins.contains(&origin) {
            return true;
        }
        // The request's own origin: the page was served from the host the request went to,
        // over plain HTTP (fileflow serves no TLS itself; behind a TLS proxy `--public-url`
        // names the https origin).
        let (Some(host), Some(origin_host)) = (host, url.host_str()) else { return false };
        if url.scheme() != "http" {
            return false;
        }
        let (name, port) = split_port(host);
        let port = match port {
            Some(port) => port.parse::<u16>().ok(),
            None => url.port_or_known_default(),
        };
        normalize(name) == normalize(origin_host) && port == url.port_or_known_default()
    }
}

/// `host[:port]` split in two; IPv6 literals keep their brackets.
fn split_port(host: &str) -> (&str, Option<&str>) {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => (&host[..=end], host[end + 1..].strip_prefix(':')),
            None => (host, None),
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') => (name, Some(port)),
        _ => (host, None),
    }
}

/// Lowercase, without a trailing dot (`Example.COM.` is `example.com`).
fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// The host a request was sent to: its `Host` header (or, in absolute form, its URI's).
fn request_host(request: &Request) -> Option<&str> {
    match request.headers().get(header::HOST) {
        Some(value) => value.to_str().ok(),
        None => request.uri().authority().map(|a| a.as_str()),
    }
}

/// Answers `421 misdirected_request` to a request addressed to a host fileflow does not
/// serve under. A request without any `Host` (HTTP/1.0 tools; browsers always send one) is
/// served.
pub async fn check_host(State(policy): State<Arc<SitePolicy>>, request: Request, next: Next) -> Response {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let header = hosts.next().map(|value| value.to_str().unwrap_or("\u{fffd}"));
    if hosts.next().is_some() {
        // RFC 9112 §3.2: a request with more than one Host is refused.
        return ApiError::Misdirected("a request may name only one Host".into()).into_response();
    }
    // In absolute form (`GET http://host/path`) the URI's authority is where the request
    // goes (RFC 9112 §3.2.2): it must pass too.
    let authority = request.uri().authority().map(|a| a.as_str());
    let refused = [header, authority].into_iter().flatten().find(|host| !policy.host_allowed(host));
    if let Some(host) = refused {
        tracing::warn!(host, "refused a request for a host fileflow is not served under");
        return ApiError::Misdirected(format!(
            "fileflow is not served under the host {host:?}; an operator can allow it with --allowed-hosts \
             (a page of another site reaching this API by DNS rebinding is refused this way)"
        ))
        .into_response();
    }
    next.run(request).await
}

/// Answers `403 forbidden` to a state-changing request sent by a page of another site.
pub async fn check_origin(State(policy): State<Arc<SitePolicy>>, request: Request, next: Next) -> Response {
    if matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(request).await;
    }
    let origin = request.headers().get(header::ORIGIN).map(HeaderValue::to_str);
    let refused = match origin {
        Some(Ok(origin)) => (!policy.origin_allowed(origin, request_host(&request))).then(|| origin.to_owned()),
        Some(Err(_)) => Some("(not text)".to_owned()),
        None => match request.headers().get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
            Some(site @ ("cross-site" | "same-site")) => Some(format!("(Sec-Fetch-Site: {site})")),
            _ => None,
        },
    };
    if let Some(origin) = refused {
        tracing::warn!(%origin, method = %request.method(), "refused a state-changing request from another site");
        return ApiError::Forbidden(format!(
            "requests from the web page {origin} may not change anything here; an operator can allow a \
             browser app with --cors-origins"
        ))
        .into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(listen: &str, public: Option<&str>, hosts: &[&str], cors: &[&str]) -> SitePolicy {
        let public = public.map(|p| Url::parse(p).unwrap());
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let cors: Vec<Url> = cors.iter().map(|c| Url::parse(c).unwrap()).collect();
        SitePolicy::new(listen.parse().unwrap(), public.as_ref(), &hosts, &cors).unwrap()
    }

    #[test]
    fn hosts_that_are_not_hosts_are_refused() {
        let policy = SitePolicy::new("127.0.0.1:8000".parse().unwrap(), None, &[], &[]).unwrap();
        assert!(policy.host_allowed("127.0.0.1:8000") && policy.host_allowed("localhost"));
        for bad in ["127.0.0.1:8000@evil.com", "localhost:99999", "localhost:x", "127.0.0.1/evil", "evil.com"] {
            assert!(!policy.host_allowed(bad), "{bad}");
        }
        // The page's scheme counts: an https page is not the plain-HTTP API's own origin.
        assert!(policy.origin_allowed("http://127.0.0.1:8000", Some("127.0.0.1:8000")));
        assert!(!policy.origin_allowed("https://127.0.0.1:8000", Some("127.0.0.1:8000")));
    }

    #[test]
    fn loopback_the_listen_address_and_configured_names_are_served() {
        let p = policy("127.0.0.1:8000", Some("https://files.example.com"), &["ops.example", ".corp.example"], &[]);
        for ok in [
            "127.0.0.1:8000",
            "127.9.9.9",
            "localhost:8000",
            "LOCALHOST.",
            "[::1]:8000",
            "[::ffff:127.0.0.1]",
            "files.example.com",
            "FILES.example.com:443",
            "ops.example:8000",
            "corp.example",
            "a.b.corp.example",
        ] {
            assert!(p.host_allowed(ok), "{ok} was refused");
        }
        for refused in [
            "rebind.attacker.example:8000",
            "attacker.localhost",
            "10.0.0.5:8000",
            "files.example.com.attacker.example",
            "evilcorp.example",
            "",
            "[::2]",
        ] {
            assert!(!p.host_allowed(refused), "{refused} was served");
        }
    }

    #[test]
    fn a_specific_listen_address_is_served_and_unspecified_accepts_ip_literals_only() {
        let p = policy("10.0.0.5:8000", None, &[], &[]);
        assert!(p.host_allowed("10.0.0.5:8000"));
        assert!(!p.host_allowed("10.0.0.6:8000"));
        let any = policy("0.0.0.0:8000", None, &[], &[]);
        assert!(any.host_allowed("10.0.0.6:8000") && any.host_allowed("[fd00::1]:8000"));
        assert!(!any.host_allowed("fileflow.internal:8000"), "names still need --allowed-hosts");
        assert!(policy("0.0.0.0:8000", None, &["*"], &[]).host_allowed("anything.example"));
    }

    #[test]
    fn only_the_own_origin_the_public_url_and_cors_origins_may_change_things() {
        let p = policy("127.0.0.1:8000", Some("https://files.example.com"), &[], &["https://app.example.com"]);
        let host = Some("127.0.0.1:8000");
        assert!(p.origin_allowed("http://127.0.0.1:8000", host));
        assert!(p.origin_allowed("https://files.example.com", host));
        assert!(p.origin_allowed("https://app.example.com", host));
        assert!(p.origin_allowed("http://localhost", Some("localhost")));
        for refused in [
            "https://attacker.example",
            "http://127.0.0.1:3000",
            "http://localhost:8000",
            "null",
            "https://app.example.com:8443",
            "file://",
        ] {
            assert!(!p.origin_allowed(refused, host), "{refused} was let through");
        }
        assert!(!p.origin_allowed("http://127.0.0.1:8000", None));
    }

    #[test]
    fn malformed_settings_are_refused() {
        let listen = "127.0.0.1:8000".parse().unwrap();
        assert!(SitePolicy::new(listen, None, &["http://x/".into()], &[]).is_err());
        assert!(SitePolicy::new(listen, None, &[], &[Url::parse("file:///tmp").unwrap()]).is_err());
    }
}
