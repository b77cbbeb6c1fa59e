//! The callback guard (docs/design.md §7): herald refuses to send callbacks, pings and
//! telnets to loopback, private, link-local, CGNAT, cloud metadata, IPv6 unique-local
//! and similar addresses, unless configuration allows them by CIDR. The check runs on
//! the resolved address inside the HTTP client's resolver, so a host name cannot
//! rebind to a refused address after a check; IP literals, which never reach a
//! resolver, are checked before connecting.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

/// An address block, as `10.0.0.0/8` or `fd00::/8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a CIDR: {reason}")]
pub struct InvalidCidr {
    pub text: String,
    pub reason: String,
}

impl FromStr for Cidr {
    type Err = InvalidCidr;
    fn from_str(text: &str) -> Result<Self, InvalidCidr> {
        let invalid = |reason: String| InvalidCidr { text: text.to_string(), reason };
        let (addr, prefix) = text.trim().split_once('/').ok_or_else(|| invalid("expected address/prefix".into()))?;
        let network: IpAddr = addr.parse().map_err(|e: std::net::AddrParseError| invalid(e.to_string()))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix: u8 =
            prefix.parse().ok().filter(|p| *p <= max).ok_or_else(|| invalid(format!("prefix must be 0..={max}")))?;
        Ok(Cidr { network, prefix })
    }
}

impl TryFrom<String> for Cidr {
    type Error = InvalidCidr;
    fn try_from(text: String) -> Result<Self, InvalidCidr> {
        text.parse()
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        fn masked(bits: u128, prefix: u8, width: u8) -> u128 {
            if prefix == 0 { 0 } else { bits >> (width - prefix) }
        }
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                masked(u128::from(u32::from(net)), self.prefix, 32)
                    == masked(u128::from(u32::from(ip)), self.prefix, 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                masked(u128::from(net), self.prefix, 128) == masked(u128::from(ip), self.prefix, 128)
            }
            _ => false,
        }
    }
}

/// Why an address is refused, or None when it is an ordinary public address.
pub fn classify(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip == Ipv4Addr::new(169, 254, 169, 254) || ip == Ipv4Addr::new(100, 100, 100, 200) {
        Some("cloud metadata")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if a == 100 && (64..128).contains(&b) {
        Some("carrier-grade NAT")
    } else if ip.is_unspecified() || a == 0 {
        Some("unspecified")
    } else if ip.is_broadcast() || ip.is_multicast() || a >= 240 {
        Some("broadcast, multicast or reserved")
    } else if a == 192 && b == 0 && ip.octets()[2] == 0 {
        Some("IETF protocol assignments")
    } else if (a == 198 && (18..20).contains(&b)) || ip.is_documentation() {
        Some("benchmarking or documentation")
    } else {
        None
    }
}

fn classify_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let segments = ip.segments();
    // IPv4 embedded in IPv6 is judged by its IPv4 address: mapped (::ffff:a.b.c.d),
    // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) can all reach IPv4 hosts.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4).map(|_| "IPv4-mapped address of a refused range");
    }
    if segments[..6] == [0, 0, 0, 0, 0xffff, 0] {
        // IPv4-translated (SIIT, ::ffff:0:a.b.c.d).
        let v4 = Ipv4Addr::from((u128::from(ip) & 0xffff_ffff) as u32);
        return classify_v4(v4).map(|_| "IPv4-translated address of a refused range");
    }
    if segments[..3] == [0x64, 0xff9b, 1] {
        // Local-use NAT64 (RFC 8215): the translator and the IPv4 behind it are local.
        return Some("local-use NAT64");
    }
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let v4 = Ipv4Addr::from((u128::from(ip) & 0xffff_ffff) as u32);
        return classify_v4(v4).map(|_| "NAT64 address of a refused range");
    }
    if segments[0] == 0x2002 {
        let v4 =
            Ipv4Addr::new((segments[1] >> 8) as u8, segments[1] as u8, (segments[2] >> 8) as u8, segments[2] as u8);
        return classify_v4(v4).map(|_| "6to4 address of a refused range");
    }
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() {
        Some("unspecified")
    } else if segments[0] & 0xfe00 == 0xfc00 {
        Some("unique local (IPv6 ULA)")
    } else if segments[0] & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else if segments[0] & 0xffc0 == 0xfec0 {
        Some("site-local (deprecated)")
    } else if segments[0] & 0xff00 == 0xff00 {
        Some("multicast")
    } else if segments[0] == 0xfd00 && segments[1..4] == [0xec2, 0, 0] {
        Some("cloud metadata")
    } else if segments[..2] == [0x2001, 0xdb8] {
        Some("documentation")
    } else if segments[..6] == [0, 0, 0, 0, 0, 0] {
        Some("IPv4-compatible (deprecated)")
    } else {
        None
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("destination {ip} is refused ({reason}); allow it with callbackGuard.allowCidrs")]
pub struct Refused {
    pub ip: IpAddr,
    pub reason: &'static str,
}

/// The policy: refused ranges minus the CIDRs configuration allows.
#[derive(Clone, Debug, Default)]
pub struct Guard {
    allowed: Vec<Cidr>,
}

impl Guard {
    pub fn new(allowed: Vec<Cidr>) -> Self {
        Guard { allowed }
    }

    pub fn check(&self, ip: IpAddr) -> Result<(), Refused> {
        if self.allowed.iter().any(|cidr| cidr.contains(ip)) {
            return Ok(());
        }
        match classify(ip) {
            Some(reason) => Err(Refused { ip, reason }),
            None => Ok(()),
        }
    }

    /// Resolves `host:port` and refuses it unless every address is permitted: for a
    /// request whose connection someone else (a proxy) makes, to any of them.
    pub async fn resolve_all(&self, host: &str, port: u16) -> Result<(), GuardError> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let resolved = lookup(host, port).await?;
        if resolved.is_empty() {
            return Err(GuardError::NoAddress { host: host.to_string() });
        }
        Ok(resolved.iter().try_for_each(|addr| self.check(addr.ip()))?)
    }

    /// Resolves `host:port` and keeps only the permitted addresses.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, GuardError> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = host.parse::<IpAddr>() {
            self.check(ip)?;
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let resolved = lookup(host, port).await?;
        let mut refused = None;
        let permitted: Vec<SocketAddr> = resolved
            .into_iter()
            .filter(|addr| match self.check(addr.ip()) {
                Ok(()) => true,
                Err(e) => {
                    refused = Some(e);
                    false
                }
            })
            .collect();
        match (permitted.is_empty(), refused) {
            (true, Some(refused)) => Err(GuardError::Refused(refused)),
            (true, None) => Err(GuardError::NoAddress { host: host.to_string() }),
            _ => Ok(permitted),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("resolving {host}: {source}")]
    Resolve { host: String, source: std::io::Error },
    #[error("{host} has no address")]
    NoAddress { host: String },
}

/// The HTTP client's resolver: every host name a callback, ping or redirect target
/// names is resolved here and judged on its addresses.
pub struct GuardedResolver(pub Arc<Guard>);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.0.clone();
        Box::pin(async move {
            let addrs = guard
                .resolve(name.as_str(), 0)
                .await
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The addresses `host:port` resolves to (`host` without brackets).
async fn lookup(host: &str, port: u16) -> Result<Vec<SocketAddr>, GuardError> {
    let resolved = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| GuardError::Resolve { host: host.to_string(), source })?;
    Ok(resolved.collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn every_refused_range_is_refused_and_public_addresses_pass() {
        let refused = [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("192.168.1.1", "private"),
            ("169.254.10.10", "link-local"),
            ("169.254.169.254", "cloud metadata"),
            ("100.100.100.200", "cloud metadata"),
            ("100.64.0.1", "carrier-grade NAT"),
            ("100.127.255.254", "carrier-grade NAT"),
            ("0.0.0.0", "unspecified"),
            ("255.255.255.255", "broadcast, multicast or reserved"),
            ("224.0.0.1", "broadcast, multicast or reserved"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fd00::1", "unique local (IPv6 ULA)"),
            ("fc12::1", "unique local (IPv6 ULA)"),
            ("fe80::1", "link-local"),
            ("fd00:ec2::254", "unique local (IPv6 ULA)"),
            ("::ffff:127.0.0.1", "IPv4-mapped address of a refused range"),
            ("::ffff:10.0.0.1", "IPv4-mapped address of a refused range"),
            ("::ffff:169.254.169.254", "IPv4-mapped address of a refused range"),
            ("64:ff9b::a9fe:a9fe", "NAT64 address of a refused range"),
            ("2002:c0a8:0101::1", "6to4 address of a refused range"),
            ("::7f00:1", "IPv4-compatible (deprecated)"),
            ("64:ff9b:1::a00:1", "local-use NAT64"),
            ("64:ff9b:1:ffff::808:808", "local-use NAT64"),
            ("fec0::1", "site-local (deprecated)"),
            ("feff::1", "site-local (deprecated)"),
            ("::ffff:0:127.0.0.1", "IPv4-translated address of a refused range"),
            ("::ffff:0:10.1.2.3", "IPv4-translated address of a refused range"),
        ];
        for (addr, reason) in refused {
            assert_eq!(classify(ip(addr)), Some(reason), "{addr}");
        }
        for public in
            ["8.8.8.8", "1.1.1.1", "100.128.0.1", "2606:4700::1111", "::ffff:8.8.8.8", "::ffff:0:8.8.8.8", "172.32.0.1"]
        {
            assert_eq!(classify(ip(public)), None, "{public}");
        }
    }

    #[test]
    fn configured_cidrs_allow_exactly_their_range() {
        let guard = Guard::new(vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(guard.check(ip("127.0.0.1")).is_ok());
        assert!(guard.check(ip("10.0.0.1")).is_err());
        assert!(guard.check(ip("::1")).is_err());
        assert!(guard.check(ip("::ffff:127.0.0.1")).is_err(), "the mapped form is a different address");
        let v6 = Guard::new(vec!["fd00::/8".parse().unwrap()]);
        assert!(v6.check(ip("fd12::1")).is_ok());
        assert!(v6.check(ip("fe80::1")).is_err());
    }

    #[test]
    fn cidrs_parse_strictly() {
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("10.0.0.0".parse::<Cidr>().is_err());
        assert!("nonsense/8".parse::<Cidr>().is_err());
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("8.8.8.8")));
    }

    #[tokio::test]
    async fn literal_targets_are_refused_before_any_connection() {
        let guard = Guard::default();
        let err = guard.resolve("127.0.0.1", 80).await.unwrap_err();
        assert!(matches!(err, GuardError::Refused(Refused { reason: "loopback", .. })), "{err}");
        let err = guard.resolve("[::1]", 80).await.unwrap_err();
        assert!(matches!(err, GuardError::Refused(_)), "{err}");
    }

    #[tokio::test]
    async fn host_names_are_judged_on_what_they_resolve_to() {
        // "localhost" resolves (from /etc/hosts, no network) to loopback only.
        let err = Guard::default().resolve("localhost", 80).await.unwrap_err();
        assert!(matches!(err, GuardError::Refused(_)), "{err}");
        let allowed = Guard::new(vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()]);
        assert!(!allowed.resolve("localhost", 80).await.unwrap().is_empty());
    }
}
