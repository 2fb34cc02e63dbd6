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

/// Hosts or networks an operator names in `--fetch-allow` / `--fetch-deny`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostList {
    names: Vec<String>,
    nets: Vec<IpNet>,
}

impl HostList {
    /// Parse entries that are each a host name, an IP address or a CIDR.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        let mut list = Self::default();
        for entry in entries.iter().map(|e| e.as_ref().trim()).filter(|e| !e.is_empty()) {
            if let Ok(net) = entry.parse::<IpNet>() {
                list.nets.push(net);
            } else if let Ok(ip) = entry.parse::<IpAddr>() {
                list.nets.push(IpNet::from(ip));
            } else if Host::parse(entry).is_ok_and(|h| matches!(h, Host::Domain(_))) {
                list.names.push(normalize_name(entry));
            } else {
                return Err(format!("{entry:?} is neither a host name, an IP address nor a CIDR"));
            }
        }
        Ok(list)
    }

    fn has_name(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }

    fn net_of(&self, ip: IpAddr) -> Option<&IpNet> {
        self.nets.iter().find(|net| net.contains(&ip))
    }
}

fn normalize_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

#[derive(Debug, Clone)]
pub struct DestinationGuard {
    allow_private: bool,
    allow: HostList,
    deny: HostList,
    refused: Vec<IpNet>,
}

impl DestinationGuard {
    /// `allow_private` turns the range checks off (tests, on-premise origins); the deny
    /// list still applies.
    pub fn new(allow_private: bool) -> Self {
        Self::with_lists(allow_private, HostList::default(), HostList::default())
    }

    /// A guard with an operator's allowlist (names and networks let through although
    /// non-public) and denylist (refused although public; checked first).
    pub fn with_lists(allow_private: bool, allow: HostList, deny: HostList) -> Self {
        let refused = REFUSED_RANGES.iter().map(|r| r.parse().expect("built-in ranges are valid CIDRs")).collect();
        Self { allow_private, allow, deny, refused }
    }

    /// Whether `name` is on the allowlist, so its addresses skip the range checks.
    pub fn allows_name(&self, name: &str) -> bool {
        self.allow.has_name(&normalize_name(name))
    }

    /// Check an address the connection would go to.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Refused> {
        let ip = canonical(ip);
        if let Some(net) = self.deny.net_of(ip) {
            return Err(Refused(format!("{ip} is in the denied network {net}")));
        }
        if self.allow_private || self.allow.net_of(ip).is_some() {
            return Ok(());
        }
        match self.refused.iter().find(|net| net.contains(&ip)) {
            Some(net) => Err(Refused(format!("{ip} is in the non-public range {net}"))),
            None => Ok(()),
        }
    }

    /// Check an address that `name` resolved to.
    pub fn check_resolved(&self, name: &str, ip: IpAddr) -> Result<(), Refused> {
        let ip = canonical(ip);
        if self.allows_name(name) {
            return match self.deny.net_of(ip) {
                Some(net) => Err(Refused(format!("{name} resolves to {ip}, in the denied network {net}"))),
                None => Ok(()),
            };
        }
        self.check_ip(ip).map_err(|Refused(why)| Refused(format!("{name} resolves to {why}")))
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
        let name = normalize_name(name);
        if self.deny.has_name(&name) {
            return Err(Refused(format!("host {name:?} is denied")));
        }
        if self.allow_private || self.allow.has_name(&name) {
            return Ok(());
        }
        let refused = REFUSED_NAMES.contains(&name.as_str()) || name.ends_with(".localhost");
        if refused {
            return Err(Refused(format!("host {name:?} is not a public destination")));
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
        for ip in ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"] {
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
        assert!(guard().check_url(&Url::parse("https://example.com/a.jpg").unwrap()).is_ok());
    }

    #[test]
    fn operators_can_allow_and_deny_hosts_and_networks() {
        let allow = HostList::parse(&["minio.internal", "10.1.0.0/16", "192.168.7.7"]).unwrap();
        let deny = HostList::parse(&["evil.example.com", "93.184.216.0/24"]).unwrap();
        let g = DestinationGuard::with_lists(false, allow, deny);
        let ok = |u: &str| g.check_url(&Url::parse(u).unwrap()).is_ok();
        assert!(ok("http://minio.internal/x"));
        assert!(ok("http://10.1.2.3/x"));
        assert!(ok("http://192.168.7.7/x"));
        assert!(!ok("http://10.2.0.1/x"), "only the allowed network");
        assert!(!ok("http://192.168.7.8/x"));
        assert!(!ok("http://evil.example.com/x"));
        assert!(!ok("http://EVIL.example.com./x"));
        assert!(!ok("http://93.184.216.34/x"));
        assert!(g.check_resolved("minio.internal", "10.9.9.9".parse().unwrap()).is_ok());
        assert!(g.check_resolved("other.internal", "10.9.9.9".parse().unwrap()).is_err());
        assert!(g.check_resolved("minio.internal", "93.184.216.1".parse().unwrap()).is_err());
        // The deny list applies even when private destinations are allowed.
        let open = DestinationGuard::with_lists(true, HostList::default(), HostList::parse(&["10.0.0.0/8"]).unwrap());
        assert!(open.check_ip("10.0.0.1".parse().unwrap()).is_err());
        assert!(open.check_ip("127.0.0.1".parse().unwrap()).is_ok());
        assert!(HostList::parse(&["not a host!"]).is_err());
    }

    #[test]
    fn allow_private_lets_private_destinations_through_but_not_bad_schemes() {
        let open = DestinationGuard::new(true);
        assert!(open.check_url(&Url::parse("http://127.0.0.1:9000/x").unwrap()).is_ok());
        assert!(open.check_url(&Url::parse("http://localhost/x").unwrap()).is_ok());
        assert!(open.check_url(&Url::parse("file:///etc/passwd").unwrap()).is_err());
    }
}
