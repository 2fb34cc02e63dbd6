//! The destination guard: which hosts and addresses fileflow may connect to.
//!
//! fileflow fetches URLs chosen by its callers; without this guard a caller could make it
//! read cloud metadata or services on the private network it runs in.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use url::{Host, Url};

/// Why a destination was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("destination refused: {0}")]
pub struct Refused(pub String);

/// Ranges that are not public destinations: loopback, private, link-local (cloud
/// metadata), CGNAT, documentation/benchmark nets, multicast, reserved, and the IPv6
/// forms that embed or translate to IPv4.
const REFUSED_RANGES: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "64:ff9b::/96",
    "64:ff9b:1::/48",
    "100::/64",
    "2001::/32",
    "2001:db8::/32",
    "2002::/16",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
];

/// Host names that always mean "this machine" or a metadata service.
const REFUSED_NAMES: &[&str] = &["localhost", "metadata.google.internal", "metadata"];

#[derive(Debug, Clone)]
pub struct DestinationGuard {
    allow_private: bool,
    refused: Vec<IpNet>,
}

impl DestinationGuard {
    /// `allow_private` turns the guard off for addresses (tests, on-premise origins).
    pub fn new(allow_private: bool) -> Self {
        let refused = REFUSED_RANGES
            .iter()
            .map(|r| r.parse().expect("built-in ranges are valid CIDRs"))
            .collect();
        Self {
            allow_private,
            refused,
        }
    }

    pub fn allows_private(&self) -> bool {
        self.allow_private
    }

    /// Check an address the connection would go to.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Refused> {
        if self.allow_private {
            return Ok(());
        }
        let ip = canonical(ip);
        match self.refused.iter().find(|net| net.contains(&ip)) {
            Some(net) => Err(Refused(format!("{ip} is in the non-public range {net}"))),
            None => Ok(()),
        }
    }

    /// Check a URL before anything is resolved: scheme, credentials, refused names and
    /// IP-literal hosts (which no resolver will see).
    pub fn check_url(&self, url: &Url) -> Result<(), Refused> {
        match url.scheme() {
            "http" | "https" => {}
            other => return Err(Refused(format!("scheme {other:?} is not allowed"))),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Refused("URLs with credentials are not allowed".into()));
        }
        match url.host() {
            None => Err(Refused("URL has no host".into())),
            Some(Host::Ipv4(v4)) => self.check_ip(IpAddr::V4(v4)),
            Some(Host::Ipv6(v6)) => self.check_ip(IpAddr::V6(v6)),
            Some(Host::Domain(name)) => self.check_name(name),
        }
    }

    /// Check a host name before it is looked up.
    pub fn check_name(&self, name: &str) -> Result<(), Refused> {
        if self.allow_private {
            return Ok(());
        }
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let refused = REFUSED_NAMES.contains(&name.as_str()) || name.ends_with(".localhost");
        if refused {
            return Err(Refused(format!(
                "host {name:?} is not a public destination"
            )));
        }
        Ok(())
    }
}

/// IPv4-mapped and IPv4-compatible IPv6 addresses are judged by their IPv4 part.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => compatible_v4(v6).map_or(ip, IpAddr::V4),
        },
        v4 => v4,
    }
}

/// The deprecated `::a.b.c.d` form (but not `::` and `::1`, which have their own meaning).
fn compatible_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    if s[..6].iter().all(|&x| x == 0) && (s[6] != 0 || s[7] > 1) {
        let [.., a, b, c, d] = v6.octets();
        return Some(Ipv4Addr::new(a, b, c, d));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> DestinationGuard {
        DestinationGuard::new(false)
    }

    #[test]
    fn refuses_non_public_addresses() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(guard().check_ip(ip).is_err(), "{ip} was allowed");
        }
    }

    #[test]
    fn allows_public_addresses() {
        for ip in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(guard().check_ip(ip).is_ok(), "{ip} was refused");
        }
    }

    #[test]
    fn checks_the_parsed_host_of_urls_not_the_string() {
        for url in [
            "http://127.0.0.1/",
            "http://2130706433/",
            "http://0x7f000001/",
            "http://0177.0.0.1/",
            "http://127.1/",
            "http://[::1]:8080/",
            "http://localhost/",
            "http://LOCALHOST./",
            "http://api.localhost/",
            "http://metadata.google.internal/computeMetadata/v1/",
            "http://169.254.169.254/latest/meta-data/",
            "ftp://example.com/",
            "http://user:pw@example.com/",
        ] {
            let url = Url::parse(url).unwrap();
            assert!(guard().check_url(&url).is_err(), "{url} was allowed");
        }
        assert!(
            guard()
                .check_url(&Url::parse("https://example.com/a.jpg").unwrap())
                .is_ok()
        );
    }

    #[test]
    fn allow_private_lets_private_destinations_through_but_not_bad_schemes() {
        let open = DestinationGuard::new(true);
        assert!(
            open.check_url(&Url::parse("http://127.0.0.1:9000/x").unwrap())
                .is_ok()
        );
        assert!(
            open.check_url(&Url::parse("http://localhost/x").unwrap())
                .is_ok()
        );
        assert!(
            open.check_url(&Url::parse("file:///etc/passwd").unwrap())
                .is_err()
        );
    }
}
