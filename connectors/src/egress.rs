//! Where a source may connect. A pipeline defined through the API is a tenant's word, not
//! the operator's: it must not reach the server's loopback services, the cloud metadata
//! address, the private network or a Unix socket unless the operator opened them. The
//! policy is checked twice: on the URL when the pipeline is saved, and on every address a
//! host name resolves to when a connection is made (so a name that later resolves
//! elsewhere, DNS rebinding, is refused too). It never lets a refused address through
//! because a name resolved to several.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use crate::error::{SourceError, SourceErrorKind};

/// An address range, `10.0.0.0/8` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    /// Parses `addr/bits` or a bare address (a range of one).
    pub fn parse(s: &str) -> Option<Cidr> {
        let (addr, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b.parse::<u8>().ok()?)),
            None => (s, None),
        };
        let net: IpAddr = addr.trim_matches(['[', ']']).parse().ok()?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = bits.unwrap_or(max);
        (bits <= max).then_some(Cidr { net, bits })
    }

    /// Whether `ip` is inside the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, canonical(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// An IPv4 address written as IPv6 (`::ffff:127.0.0.1`) is judged as the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Why an address is not public, or `None` when it is.
pub fn non_public(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => non_public_v6(v6),
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    Some(if ip.is_loopback() {
        "a loopback address"
    } else if ip.is_unspecified() || o[0] == 0 {
        "an unspecified address"
    } else if ip.is_link_local() {
        "a link-local address (the cloud metadata service lives there)"
    } else if ip.is_private() {
        "a private-network address"
    } else if o[0] == 100 && (64..128).contains(&o[1]) {
        "a shared (carrier-grade NAT) address"
    } else if ip.is_multicast() || ip.is_broadcast() || o[0] >= 240 {
        "a multicast, broadcast or reserved address"
    } else {
        return None;
    })
}

fn non_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    Some(if ip.is_loopback() {
        "a loopback address"
    } else if ip.is_unspecified() {
        "an unspecified address"
    } else if first & 0xffc0 == 0xfe80 {
        "a link-local address"
    } else if first & 0xfe00 == 0xfc00 {
        "a unique-local (private) address"
    } else if ip.is_multicast() {
        "a multicast address"
    } else if let Some(v4) = ip.to_ipv4() {
        // ::a.b.c.d (deprecated compatible form) and NAT64 prefixes embed IPv4 addresses.
        return non_public_v4(v4).filter(|_| first == 0);
    } else {
        return None;
    })
}

/// Hosts and ranges a source may reach although they are not public. The default refuses
/// every non-public address and Unix sockets; [`EgressPolicy::unrestricted`] is for the
/// shell user's own pipelines, which reach whatever that user can.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    unrestricted: bool,
    hosts: Vec<String>,
    ranges: Vec<Cidr>,
}

impl fmt::Debug for EgressPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.unrestricted {
            return f.write_str("EgressPolicy(unrestricted)");
        }
        f.debug_struct("EgressPolicy")
            .field("hosts", &self.hosts)
            .field("ranges", &self.ranges)
            .finish()
    }
}

impl EgressPolicy {
    /// Every address allowed (the CLI on the user's own pipeline files).
    pub fn unrestricted() -> Self {
        EgressPolicy {
            unrestricted: true,
            ..Self::default()
        }
    }

    /// Public addresses only, plus `allow`: a comma-separated list of host names and
    /// address ranges (`db.internal,10.1.0.0/16,127.0.0.1`), as `--allow-source-hosts`
    /// takes it. `*` opens everything.
    pub fn allowing(allow: &str) -> Result<Self, SourceError> {
        let mut policy = EgressPolicy::default();
        for item in allow.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if item == "*" {
                policy.unrestricted = true;
            } else if let Some(range) = Cidr::parse(item) {
                policy.ranges.push(range);
            } else if item
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            {
                policy.hosts.push(item.to_ascii_lowercase());
            } else {
                return Err(SourceError::new(
                    SourceErrorKind::Config,
                    format!(
                        "allowed source host {item:?} is neither a host name nor an address range"
                    ),
                ));
            }
        }
        Ok(policy)
    }

    /// Whether every address is allowed.
    pub fn is_unrestricted(&self) -> bool {
        self.unrestricted
    }

    fn host_opened(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.contains(&host)
    }

    /// Whether `ip` may be reached.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), SourceError> {
        if self.unrestricted || self.ranges.iter().any(|r| r.contains(ip)) {
            return Ok(());
        }
        match non_public(ip) {
            None => Ok(()),
            Some(why) => Err(refused(&ip.to_string(), why)),
        }
    }

    /// The save-time check of a host as a URL names it: an address literal is judged
    /// now; a name is judged on what it resolves to at connect time, except names that
    /// always mean this machine (`localhost`).
    pub fn check_host(&self, host: &str) -> Result<(), SourceError> {
        if self.unrestricted || self.host_opened(host) {
            return Ok(());
        }
        let bare = host.trim_matches(['[', ']']);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return self.check_ip(ip);
        }
        let lower = bare.trim_end_matches('.').to_ascii_lowercase();
        if lower.is_empty() || lower.starts_with('/') {
            return Err(refused(host, "a Unix socket"));
        }
        if lower == "localhost" || lower.ends_with(".localhost") {
            return self
                .check_ip(IpAddr::V4(Ipv4Addr::LOCALHOST))
                .map_err(|_| refused(host, "this machine"));
        }
        Ok(())
    }

    /// The save-time check of an HTTP(S) URL.
    pub fn check_url(&self, url: &str) -> Result<(), SourceError> {
        let parsed = reqwest::Url::parse(url).map_err(|_| {
            SourceError::new(SourceErrorKind::Config, format!("{url:?} is not a URL"))
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(SourceError::new(
                SourceErrorKind::Config,
                format!("{url:?}: only http and https URLs are allowed"),
            ));
        }
        let host = parsed.host_str().ok_or_else(|| {
            SourceError::new(SourceErrorKind::Config, format!("{url:?} names no host"))
        })?;
        self.check_host(host)
    }

    /// Resolves `host` and keeps the addresses the policy allows; none is an error that
    /// names the first refused one. An opened host name keeps every address.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, SourceError> {
        let bare = host.trim_matches(['[', ']']);
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare, port))
            .await
            .map_err(|e| {
                SourceError::new(
                    SourceErrorKind::Transient,
                    format!("cannot resolve {host}: {e}"),
                )
            })?
            .collect();
        if self.unrestricted || self.host_opened(host) {
            return Ok(addrs);
        }
        let mut first_refusal = None;
        let allowed: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| match self.check_ip(a.ip()) {
                Ok(()) => true,
                Err(e) => {
                    first_refusal.get_or_insert(e);
                    false
                }
            })
            .collect();
        match (allowed.is_empty(), first_refusal) {
            // A name that resolves to a refused address is refused whole: trying only
            // its public addresses would still let it probe the private ones by timing.
            (_, Some(e)) => Err(SourceError::new(
                SourceErrorKind::Config,
                format!("{host} resolves to {}", e.message()),
            )),
            (true, None) => Err(SourceError::new(
                SourceErrorKind::Transient,
                format!("{host} resolves to no address"),
            )),
            (false, None) => Ok(allowed),
        }
    }

    /// A DNS resolver for reqwest that applies the policy to every address it returns.
    pub fn resolver(&self) -> Arc<PolicyResolver> {
        Arc::new(PolicyResolver(self.clone()))
    }

    /// A redirect policy that follows at most five redirects, each to a URL the save-time
    /// check allows (names are then resolved through [`Self::resolver`]).
    pub fn redirects(&self) -> reqwest::redirect::Policy {
        let policy = self.clone();
        reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= 5 {
                return attempt.error("more than 5 redirects");
            }
            match policy.check_url(attempt.url().as_str()) {
                Ok(()) => attempt.follow(),
                Err(e) => attempt.error(e.message().to_string()),
            }
        })
    }

    /// A reqwest client builder whose connections and redirects keep to the policy.
    pub fn http_client(&self) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .dns_resolver(self.resolver())
            .redirect(self.redirects())
    }
}

fn refused(what: &str, why: &str) -> SourceError {
    SourceError::new(
        SourceErrorKind::Config,
        format!(
            "{what} is {why}; sources defined through the API may not reach it (the operator opens hosts with --allow-source-hosts / SLUICE_ALLOW_SOURCE_HOSTS)"
        ),
    )
}

/// reqwest's resolver under an [`EgressPolicy`].
#[derive(Debug)]
pub struct PolicyResolver(EgressPolicy);

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        Box::pin(async move {
            let addrs = policy
                .resolve(name.as_str(), 0)
                .await
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn every_non_public_range_is_refused_by_default() {
        let policy = EgressPolicy::default();
        for bad in [
            "127.0.0.1",
            "127.8.9.10",
            "169.254.169.254",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(policy.check_ip(ip(bad)).is_err(), "{bad} allowed");
        }
        for good in ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "172.32.0.1"] {
            assert!(policy.check_ip(ip(good)).is_ok(), "{good} refused");
        }
    }

    #[test]
    fn hosts_in_urls_are_checked_at_save_time() {
        let policy = EgressPolicy::default();
        for bad in [
            "http://169.254.169.254/latest/meta-data",
            "http://127.0.0.1:8069",
            "http://[::1]/",
            "http://localhost:5432",
            "http://db.localhost/",
            "file:///etc/passwd",
        ] {
            assert!(policy.check_url(bad).is_err(), "{bad} allowed");
        }
        assert!(
            policy
                .check_url("https://quickbooks.api.intuit.com")
                .is_ok()
        );
        assert!(policy.check_host("/var/run/postgresql").is_err());
        assert!(policy.check_host("").is_err());
    }

    #[test]
    fn the_operator_opens_hosts_and_ranges() {
        let policy = EgressPolicy::allowing("127.0.0.1, 10.0.0.0/8, erp.internal").expect("ok");
        assert!(policy.check_ip(ip("127.0.0.1")).is_ok());
        assert!(policy.check_ip(ip("127.0.0.2")).is_err());
        assert!(policy.check_ip(ip("10.200.0.1")).is_ok());
        assert!(policy.check_ip(ip("169.254.169.254")).is_err());
        assert!(policy.check_host("ERP.internal").is_ok());
        assert!(EgressPolicy::allowing("a b").is_err());
        assert!(EgressPolicy::allowing("*").expect("ok").is_unrestricted());
        assert!(Cidr::parse("10.0.0.0/33").is_none());
        assert!(Cidr::parse("fd00::/8").expect("v6").contains(ip("fd12::1")));
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_a_refused_address_is_refused_at_connect_time() {
        let err = EgressPolicy::default()
            .resolve("localhost", 80)
            .await
            .expect_err("loopback");
        assert!(err.message().contains("loopback"), "{err}");
        let opened = EgressPolicy::allowing("127.0.0.0/8,::1").expect("ok");
        assert!(
            !opened
                .resolve("localhost", 80)
                .await
                .expect("ok")
                .is_empty()
        );
    }

    #[tokio::test]
    async fn a_redirect_to_a_refused_address_is_not_followed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = socket.read(&mut buf).await;
                let answer = "HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/latest/meta-data\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
                let _ = socket.write_all(answer.as_bytes()).await;
            }
        });
        // The operator opened this one address; the redirect leads elsewhere.
        let policy = EgressPolicy::allowing("127.0.0.1").expect("allow");
        let client = policy.http_client().build().expect("client");
        let err = client
            .get(format!("http://127.0.0.1:{port}/start"))
            .send()
            .await
            .expect_err("the redirect is refused");
        assert!(err.is_redirect(), "{err}");
        assert!(format!("{err:?}").contains("link-local"), "{err:?}");
        server.abort();
    }
}
