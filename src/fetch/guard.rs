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

/// Addresses that are not public destinations, each with what it is: every entry of
/// IANA's IPv4 and IPv6 Special-Purpose Address Registries (as of 2025, RFC 6890 and its
/// successors), whether or not the registry calls it globally reachable (anycast relays
/// and AS112 sinks are infrastructure, not file origins), plus multicast, the deprecated
/// IPv6 site-local and IPv4-translated forms, and cloud platform addresses outside those
/// registries. A test lists every entry with its verdict.
pub const REFUSED_RANGES: &[(&str, &str)] = &[
    // IPv4 Special-Purpose Address Registry.
    ("0.0.0.0/8", "\"this network\""),
    ("0.0.0.0/32", "\"this host on this network\""),
    ("10.0.0.0/8", "private use"),
    ("100.64.0.0/10", "shared address space (CGNAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata)"),
    ("172.16.0.0/12", "private use"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.0.0/29", "IPv4 service continuity prefix"),
    ("192.0.0.8/32", "IPv4 dummy address"),
    ("192.0.0.9/32", "Port Control Protocol anycast"),
    ("192.0.0.10/32", "TURN anycast"),
    ("192.0.0.170/32", "NAT64/DNS64 discovery"),
    ("192.0.0.171/32", "NAT64/DNS64 discovery"),
    ("192.0.2.0/24", "documentation (TEST-NET-1)"),
    ("192.31.196.0/24", "AS112-v4"),
    ("192.52.193.0/24", "AMT"),
    ("192.88.99.0/24", "deprecated 6to4 relay anycast"),
    ("192.88.99.2/32", "6a44 relay anycast"),
    ("192.168.0.0/16", "private use"),
    ("192.175.48.0/24", "direct delegation AS112 service"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation (TEST-NET-2)"),
    ("203.0.113.0/24", "documentation (TEST-NET-3)"),
    ("240.0.0.0/4", "reserved"),
    ("255.255.255.255/32", "limited broadcast"),
    // IPv4 outside the special-purpose registry.
    ("224.0.0.0/4", "multicast"),
    ("168.63.129.16/32", "Azure platform (wire server)"),
    // IPv6 Special-Purpose Address Registry.
    ("::1/128", "loopback"),
    ("::/128", "unspecified"),
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("64:ff9b::/96", "IPv4-IPv6 translation"),
    ("64:ff9b:1::/48", "local-use IPv4-IPv6 translation"),
    ("100::/64", "discard-only"),
    ("100:0:0:1::/64", "dummy IPv6 prefix"),
    ("2001::/23", "IETF protocol assignments"),
    ("2001::/32", "TEREDO"),
    ("2001:1::1/128", "Port Control Protocol anycast"),
    ("2001:1::2/128", "TURN anycast"),
    ("2001:1::3/128", "DNS-SD service registration protocol anycast"),
    ("2001:2::/48", "benchmarking"),
    ("2001:3::/32", "AMT"),
    ("2001:4:112::/48", "AS112-v6"),
    ("2001:10::/28", "deprecated ORCHID"),
    ("2001:20::/28", "ORCHIDv2"),
    ("2001:30::/28", "drone remote ID entity tags"),
    ("2001:db8::/32", "documentation"),
    ("2002::/16", "6to4"),
    ("2620:4f:8000::/48", "direct delegation AS112 service"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "segment routing (SRv6) SIDs"),
    ("fc00::/7", "unique-local"),
    ("fe80::/10", "link-local"),
    // IPv6 outside the special-purpose registry.
    ("::ffff:0:0:0/96", "IPv4-translated (SIIT)"),
    ("fec0::/10", "deprecated site-local"),
    ("ff00::/8", "multicast"),
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
    /// [`REFUSED_RANGES`], parsed; the narrowest match names the range.
    refused: Vec<(IpNet, &'static str)>,
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
        let mut refused: Vec<(IpNet, &'static str)> = REFUSED_RANGES
            .iter()
            .map(|(net, what)| (net.parse().expect("built-in ranges are valid CIDRs"), *what))
            .collect();
        refused.sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
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
        match self.refused.iter().find(|(net, _)| net.contains(&ip)) {
            Some((net, what)) => Err(Refused(format!("{ip} is in the non-public range {net} ({what})"))),
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

    /// Every registry entry, with an address inside it and what the guard says about it.
    /// Mapped and compatible IPv6 forms are judged as the IPv4 address they carry, so a
    /// mapped public address is allowed and a mapped private one is not.
    #[test]
    fn every_special_purpose_entry_and_its_verdict() {
        let table: &[(&str, &str, &str)] = &[
            ("0.0.0.0/8", "0.1.2.3", "refused"),
            ("0.0.0.0/32", "0.0.0.0", "refused"),
            ("10.0.0.0/8", "10.255.0.1", "refused"),
            ("100.64.0.0/10", "100.127.255.254", "refused"),
            ("127.0.0.0/8", "127.8.9.10", "refused"),
            ("169.254.0.0/16", "169.254.169.254", "refused"),
            ("172.16.0.0/12", "172.20.0.1", "refused"),
            ("192.0.0.0/24", "192.0.0.200", "refused"),
            ("192.0.0.0/29", "192.0.0.1", "refused"),
            ("192.0.0.8/32", "192.0.0.8", "refused"),
            ("192.0.0.9/32", "192.0.0.9", "refused"),
            ("192.0.0.10/32", "192.0.0.10", "refused"),
            ("192.0.0.170/32", "192.0.0.170", "refused"),
            ("192.0.0.171/32", "192.0.0.171", "refused"),
            ("192.0.2.0/24", "192.0.2.55", "refused"),
            ("192.31.196.0/24", "192.31.196.1", "refused"),
            ("192.52.193.0/24", "192.52.193.1", "refused"),
            ("192.88.99.0/24", "192.88.99.1", "refused"),
            ("192.88.99.2/32", "192.88.99.2", "refused"),
            ("192.168.0.0/16", "192.168.1.1", "refused"),
            ("192.175.48.0/24", "192.175.48.6", "refused"),
            ("198.18.0.0/15", "198.19.255.1", "refused"),
            ("198.51.100.0/24", "198.51.100.7", "refused"),
            ("203.0.113.0/24", "203.0.113.9", "refused"),
            ("240.0.0.0/4", "250.1.2.3", "refused"),
            ("255.255.255.255/32", "255.255.255.255", "refused"),
            ("224.0.0.0/4", "239.255.255.250", "refused"),
            ("168.63.129.16/32", "168.63.129.16", "refused"),
            ("::1/128", "::1", "refused"),
            ("::/128", "::", "refused"),
            ("::ffff:0:0/96", "::ffff:10.0.0.1", "refused"),
            ("::ffff:0:0/96", "::ffff:8.8.8.8", "allowed"),
            ("64:ff9b::/96", "64:ff9b::808:808", "refused"),
            ("64:ff9b:1::/48", "64:ff9b:1::1", "refused"),
            ("100::/64", "100::1", "refused"),
            ("100:0:0:1::/64", "100:0:0:1::1", "refused"),
            ("2001::/23", "2001:1ff::1", "refused"),
            ("2001::/32", "2001:0:4136:e378::1", "refused"),
            ("2001:1::1/128", "2001:1::1", "refused"),
            ("2001:1::2/128", "2001:1::2", "refused"),
            ("2001:1::3/128", "2001:1::3", "refused"),
            ("2001:2::/48", "2001:2::1", "refused"),
            ("2001:3::/32", "2001:3::1", "refused"),
            ("2001:4:112::/48", "2001:4:112::1", "refused"),
            ("2001:10::/28", "2001:10::1", "refused"),
            ("2001:20::/28", "2001:20::1", "refused"),
            ("2001:30::/28", "2001:30::1", "refused"),
            ("2001:db8::/32", "2001:db8::1", "refused"),
            ("2002::/16", "2002:c000:204::1", "refused"),
            ("2620:4f:8000::/48", "2620:4f:8000::1", "refused"),
            ("3fff::/20", "3fff:fff::1", "refused"),
            ("5f00::/16", "5f00::1", "refused"),
            ("fc00::/7", "fd00:ec2::254", "refused"),
            ("fe80::/10", "fe80::1", "refused"),
            ("::ffff:0:0:0/96", "::ffff:0:a00:1", "refused"),
            ("fec0::/10", "fec0::1", "refused"),
            ("ff00::/8", "ff02::1", "refused"),
        ];
        let listed: std::collections::BTreeSet<&str> = table.iter().map(|(net, ..)| *net).collect();
        let built_in: std::collections::BTreeSet<&str> = REFUSED_RANGES.iter().map(|(net, _)| *net).collect();
        assert_eq!(listed, built_in, "the table lists every built-in range");
        for (net, ip, verdict) in table {
            let parsed: IpAddr = ip.parse().unwrap();
            let net_parsed: IpNet = net.parse().unwrap();
            assert!(net_parsed.contains(&parsed), "{ip} is not in {net}");
            let got = if guard().check_ip(parsed).is_ok() { "allowed" } else { "refused" };
            assert_eq!(got, *verdict, "{ip} in {net}");
        }
        let why = guard().check_ip("192.0.0.9".parse().unwrap()).unwrap_err();
        assert!(why.0.contains("192.0.0.9/32 (Port Control Protocol anycast)"), "the narrowest entry names it: {why}");
    }

    #[test]
    fn allows_public_addresses() {
        for ip in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "192.0.1.1",
            "192.88.100.1",
            "168.63.129.17",
            "2001:200::1",
            "2a00:1450:4001::1",
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
