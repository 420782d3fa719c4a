//! Which URLs the worker may call (server-side request forgery rules), as pure functions.
//!
//! A webhook URL comes from a producer, so without rules a message could make the worker call its
//! own cloud's metadata service, an admin port on localhost or anything else on the worker's
//! network. The rules, checked in three places:
//!
//! 1. When the message is parsed ([`WebhookUrl::parse`]): the shape alone. `http` or `https`, a
//!    host, no `user:password@`, no `#fragment`, no whitespace or control characters, at most
//!    [`MAX_URL_BYTES`].
//! 2. When the worker takes the message ([`Policy::check_url`]): `https` unless the worker allows
//!    plain `http`; the host (and port, when the entry names one) on the worker's allow list; a
//!    literal IP address in an allowed range ([`classify`]).
//! 3. Before every request ([`Policy::check_addr`]): every address the host resolves to is in an
//!    allowed range, and the request goes to one of those checked addresses (no second lookup
//!    that a DNS server could answer differently).
//!
//! Redirects are never followed (see `deliver`), so a receiver cannot send the worker elsewhere.
use crate::bounded::quote;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use url::{Host, Url};

/// Longest accepted webhook URL, in bytes.
pub const MAX_URL_BYTES: usize = 2048;

/// A webhook URL of an accepted shape (rule 1). Not yet allowed: that is the worker's
/// [`Policy`].
///
/// Its `Debug` and [`origin`](Self::origin) show the scheme, host and port only: the path and
/// query may carry the receiver's token, and URLs end up in logs.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookUrl(Url);

impl WebhookUrl {
    /// Checks the shape of a producer's URL. The error names the rule; a quoted value is cut to
    /// 64 characters.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > MAX_URL_BYTES {
            return Err(format!("{} bytes long, limit {MAX_URL_BYTES}", text.len()));
        }
        // The URL parser would silently drop tabs and newlines inside a URL and trim spaces
        // around it; what the producer wrote should be what is called.
        if text.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err("contains whitespace or control characters".into());
        }
        let url = Url::parse(text).map_err(|e| format!("{} is not a URL: {e}", quote(text)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "scheme {} is not https (or http)",
                quote(url.scheme())
            ));
        }
        if url.host().is_none() {
            return Err(format!("{} has no host", quote(text)));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(
                "must not carry credentials (user:password@): the worker signs every \
                        request instead"
                    .into(),
            );
        }
        if url.fragment().is_some() {
            return Err("must not have a #fragment (it is never sent)".into());
        }
        Ok(Self(url))
    }

    pub fn url(&self) -> &Url {
        &self.0
    }

    pub fn is_https(&self) -> bool {
        self.0.scheme() == "https"
    }

    /// The host as the URL parser normalised it (lowercase, IDNA to punycode, IP literals
    /// parsed).
    pub fn host(&self) -> Host<&str> {
        // `parse` refused URLs without a host.
        self.0.host().unwrap_or(Host::Domain(""))
    }

    /// The port, explicit or the scheme's.
    pub fn port(&self) -> u16 {
        self.0.port_or_known_default().unwrap_or(443)
    }

    /// `scheme://host:port`, for logs and errors: never the path or the query.
    pub fn origin(&self) -> String {
        format!(
            "{}://{}:{}",
            self.0.scheme(),
            self.0.host_str().unwrap_or(""),
            self.port()
        )
    }
}

impl fmt::Debug for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebhookUrl({}/…)", self.origin())
    }
}

/// Why a webhook is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("this worker sends no webhooks (it has no --webhook-allow list or no webhook secret)")]
    Disabled,
    #[error(
        "plain http is refused: webhook URLs use https (a worker allows http only with \
         --webhook-allow-http)"
    )]
    Http,
    #[error("host {host} is not on this worker's --webhook-allow list")]
    Host { host: String },
    #[error("address {ip} is {kind}: refused (a worker allows private addresses only with \
             --webhook-allow-private, and never {kind_never})", kind_never = NEVER_KINDS)]
    Address { ip: IpAddr, kind: &'static str },
}

/// What [`Refusal::Address`] says is never allowed.
const NEVER_KINDS: &str = "unspecified, multicast, broadcast, documentation or reserved ones";

/// One entry of the allow list: `hooks.example.com`, `*.example.com` (any subdomain, not
/// `example.com` itself), an IP address (`127.0.0.1`, `::1` or `[::1]`), each optionally with
/// `:PORT` (`hooks.example.com:8443`, `[::1]:8080`). Without a port, any port of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowEntry {
    host: HostPattern,
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// A domain, lowercase ASCII (punycode), without a trailing dot.
    Exact(String),
    /// `*.example.com`, kept as `.example.com`.
    Subdomains(String),
    Ip(IpAddr),
}

impl FromStr for AllowEntry {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("webhook allow entry {}: {why}", quote(text));
        let s = text.trim();
        if s.is_empty() || s.len() > 255 {
            return Err(bad("expected a host name, *.domain or IP address"));
        }
        if s.contains("://") || s.contains(['/', '@', '?', '#']) || s.contains(char::is_whitespace)
        {
            return Err(bad("a host, not a URL (no scheme, path or user)"));
        }
        // `[v6]`, `[v6]:port`, a bare v6 (two or more colons), `host`, `host:port`.
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (inside, after) = rest.split_once(']').ok_or_else(|| bad("unclosed `[`"))?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| bad("expected `:PORT`"))?),
            };
            (inside, port)
        } else if s.matches(':').count() >= 2 {
            (s, None)
        } else {
            match s.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        let port = port
            .map(|p| p.parse::<u16>().ok().filter(|&p| p != 0))
            .map(|p| p.ok_or_else(|| bad("the port must be 1..=65535")))
            .transpose()?;
        let host = if let Ok(ip) = host.parse::<IpAddr>() {
            HostPattern::Ip(ip)
        } else if let Some(domain) = host.strip_prefix("*.") {
            HostPattern::Subdomains(format!(".{}", domain_name(domain).map_err(|e| bad(&e))?))
        } else {
            HostPattern::Exact(domain_name(host).map_err(|e| bad(&e))?)
        };
        Ok(AllowEntry { host, port })
    }
}

/// A domain name as the URL parser writes hosts (lowercase, punycode), without a trailing dot;
/// `*` only as the leading label of a pattern (handled by the caller).
fn domain_name(text: &str) -> Result<String, String> {
    if text.contains('*') {
        return Err("`*` only as the first label (`*.example.com`)".into());
    }
    match Host::parse(text) {
        Ok(Host::Domain(d)) => {
            let d = d.trim_end_matches('.').to_string();
            let labels_ok = d.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
            if labels_ok {
                Ok(d)
            } else {
                Err("not a domain name".into())
            }
        }
        // An IP address in a form `IpAddr` does not read (`0x7f.1`): spell it plainly.
        Ok(_) => Err("write IP addresses plainly (127.0.0.1, ::1)".into()),
        Err(e) => Err(format!("not a host name: {e}")),
    }
}

impl AllowEntry {
    /// Whether a URL's host and port fall under this entry.
    pub fn matches(&self, host: &Host<&str>, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        match (&self.host, host) {
            (HostPattern::Exact(d), Host::Domain(h)) => h.trim_end_matches('.') == d,
            (HostPattern::Subdomains(suffix), Host::Domain(h)) => {
                let h = h.trim_end_matches('.');
                h.len() > suffix.len() && h.ends_with(suffix.as_str())
            }
            (HostPattern::Ip(ip), Host::Ipv4(h)) => *ip == IpAddr::V4(*h),
            (HostPattern::Ip(ip), Host::Ipv6(h)) => *ip == IpAddr::V6(*h),
            _ => false,
        }
    }
}

/// The worker's webhook rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Hosts webhooks may go to; empty: no webhooks at all.
    pub allow: Vec<AllowEntry>,
    /// Plain `http` URLs (development and tests; production receivers use https).
    pub allow_http: bool,
    /// Loopback, private (RFC 1918), shared (CGNAT), link-local and unique-local addresses
    /// (a receiver on the worker's own network). Never the ranges that are not unicast hosts.
    pub allow_private: bool,
}

impl Policy {
    pub fn is_enabled(&self) -> bool {
        !self.allow.is_empty()
    }

    /// Rule 2: whether the worker may send to `url` at all (before any lookup or request).
    pub fn check_url(&self, url: &WebhookUrl) -> Result<(), Refusal> {
        if !self.is_enabled() {
            return Err(Refusal::Disabled);
        }
        if !url.is_https() && !self.allow_http {
            return Err(Refusal::Http);
        }
        let host = url.host();
        if !self.allow.iter().any(|e| e.matches(&host, url.port())) {
            return Err(Refusal::Host {
                host: quote(&host.to_string()),
            });
        }
        match host {
            Host::Ipv4(ip) => self.check_addr(IpAddr::V4(ip)),
            Host::Ipv6(ip) => self.check_addr(IpAddr::V6(ip)),
            Host::Domain(_) => Ok(()),
        }
    }

    /// Rule 3: whether the worker may connect to `ip`.
    pub fn check_addr(&self, ip: IpAddr) -> Result<(), Refusal> {
        match classify(ip) {
            Range::Public => Ok(()),
            Range::Internal(_) if self.allow_private => Ok(()),
            Range::Internal(kind) | Range::Never(kind) => Err(Refusal::Address { ip, kind }),
        }
    }
}

/// What kind of address an IP is, for [`Policy::check_addr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// A global unicast address.
    Public,
    /// An address of the worker's own host or network: allowed with `allow_private`.
    Internal(&'static str),
    /// Not a unicast host anyone should call: never allowed.
    Never(&'static str),
}

/// The range of `ip`. IPv6 forms that embed an IPv4 address (IPv4-mapped `::ffff:a.b.c.d`,
/// NAT64 `64:ff9b::a.b.c.d`, 6to4 `2002:aabb:ccdd::`) are judged by that address, so
/// `::ffff:127.0.0.1` is loopback.
pub fn classify(ip: IpAddr) -> Range {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Range {
    let [a, b, c, _] = ip.octets();
    match (a, b, c) {
        (0, _, _) => Range::Never("unspecified (0.0.0.0/8)"),
        (127, _, _) => Range::Internal("loopback"),
        (10, _, _) | (192, 168, _) => Range::Internal("private"),
        (172, 16..=31, _) => Range::Internal("private"),
        (100, 64..=127, _) => Range::Internal("shared (CGNAT, 100.64.0.0/10)"),
        // Includes the cloud metadata service, 169.254.169.254.
        (169, 254, _) => Range::Internal("link-local"),
        (192, 0, 0) => Range::Never("reserved (IETF protocol assignments)"),
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => Range::Never("documentation"),
        (198, 18..=19, _) => Range::Never("reserved (benchmarking)"),
        (224..=239, _, _) => Range::Never("multicast"),
        (240..=255, _, _) => Range::Never("reserved (240.0.0.0/4, broadcast)"),
        _ => Range::Public,
    }
}

fn classify_v6(ip: Ipv6Addr) -> Range {
    if ip.is_unspecified() {
        return Range::Never("unspecified (::)");
    }
    if ip.is_loopback() {
        return Range::Internal("loopback");
    }
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    let s = ip.segments();
    let embedded_v4 = |hi: u16, lo: u16| {
        let [a, b] = hi.to_be_bytes();
        let [c, d] = lo.to_be_bytes();
        Ipv4Addr::new(a, b, c, d)
    };
    match s {
        // NAT64 well-known prefix: the last 32 bits are the IPv4 destination.
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => classify_v4(embedded_v4(hi, lo)),
        [0x64, 0xff9b, 1, ..] => Range::Internal("NAT64 local-use"),
        // IPv4-compatible (deprecated): never a real destination.
        [0, 0, 0, 0, 0, 0, _, _] => Range::Never("reserved (IPv4-compatible ::/96)"),
        // 6to4: the IPv4 address follows the prefix.
        [0x2002, hi, lo, ..] => classify_v4(embedded_v4(hi, lo)),
        // Teredo hides its IPv4 server and client addresses.
        [0x2001, 0, ..] => Range::Never("reserved (Teredo)"),
        [0x2001, 0xdb8, ..] => Range::Never("documentation"),
        [0x100, 0, 0, 0, ..] => Range::Never("reserved (discard-only)"),
        [first, ..] if first & 0xfe00 == 0xfc00 => Range::Internal("unique local (fc00::/7)"),
        [first, ..] if first & 0xffc0 == 0xfe80 => Range::Internal("link-local"),
        [first, ..] if first & 0xffc0 == 0xfec0 => Range::Internal("site-local"),
        [first, ..] if first & 0xff00 == 0xff00 => Range::Never("multicast"),
        _ => Range::Public,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> WebhookUrl {
        WebhookUrl::parse(s).unwrap()
    }

    fn policy(allow: &[&str]) -> Policy {
        Policy {
            allow: allow.iter().map(|a| a.parse().unwrap()).collect(),
            ..Policy::default()
        }
    }

    #[test]
    fn url_shapes() {
        let u = url("https://Hooks.Example.com/sdbatch?token=abc");
        assert_eq!(u.origin(), "https://hooks.example.com:443");
        assert_eq!(
            format!("{u:?}"),
            "WebhookUrl(https://hooks.example.com:443/…)"
        );
        assert!(!format!("{u:?}").contains("token"));
        assert_eq!(url("http://[::1]:8080/").origin(), "http://[::1]:8080");
        assert_eq!(
            url("http://2130706433/").host(),
            Host::<&str>::Ipv4(Ipv4Addr::LOCALHOST)
        );
        let refused = [
            ("ftp://example.com/", "scheme"),
            ("file:///etc/passwd", "scheme"),
            ("https://user:pw@example.com/", "credentials"),
            ("https://user@example.com/", "credentials"),
            ("https://example.com/#frag", "fragment"),
            ("https://exa\nmple.com/", "whitespace"),
            (" https://example.com/", "whitespace"),
            ("https://example.com/a b", "whitespace"),
            ("/relative", "not a URL"),
            ("https://", "not a URL"),
        ];
        for (text, why) in refused {
            let e = WebhookUrl::parse(text).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_BYTES));
        let e = WebhookUrl::parse(&long).unwrap_err();
        assert!(e.contains("limit 2048") && e.len() < 100, "{e}");
        assert!(WebhookUrl::parse(&long[..MAX_URL_BYTES]).is_ok());
    }

    #[test]
    fn a_quoted_url_is_cut() {
        let e = WebhookUrl::parse(&format!("{}://x", "a".repeat(1000))).unwrap_err();
        assert!(e.len() < 200, "{e}");
    }

    #[test]
    fn allow_entries() {
        let ok = [
            (
                "hooks.example.com",
                HostPattern::Exact("hooks.example.com".into()),
                None,
            ),
            (
                "Hooks.Example.COM.",
                HostPattern::Exact("hooks.example.com".into()),
                None,
            ),
            (
                "*.example.com",
                HostPattern::Subdomains(".example.com".into()),
                None,
            ),
            (
                "hooks.example.com:8443",
                HostPattern::Exact("hooks.example.com".into()),
                Some(8443),
            ),
            (
                "127.0.0.1",
                HostPattern::Ip(Ipv4Addr::LOCALHOST.into()),
                None,
            ),
            (
                "127.0.0.1:9",
                HostPattern::Ip(Ipv4Addr::LOCALHOST.into()),
                Some(9),
            ),
            ("::1", HostPattern::Ip(Ipv6Addr::LOCALHOST.into()), None),
            (
                "[::1]:8080",
                HostPattern::Ip(Ipv6Addr::LOCALHOST.into()),
                Some(8080),
            ),
            (
                "bücher.example",
                HostPattern::Exact("xn--bcher-kva.example".into()),
                None,
            ),
        ];
        for (text, host, port) in ok {
            assert_eq!(
                text.parse::<AllowEntry>(),
                Ok(AllowEntry { host, port }),
                "{text}"
            );
        }
        for bad in [
            "",
            "https://example.com",
            "example.com/path",
            "user@example.com",
            "a.*.example.com",
            "*",
            "example.com:0",
            "example.com:99999",
            "[::1",
            "[::1]8080",
            "0x7f.1",
            "exa mple.com",
        ] {
            assert!(bad.parse::<AllowEntry>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn allow_list_matching() {
        let p = Policy {
            allow_http: true,
            ..policy(&[
                "hooks.example.com",
                "*.corp.example",
                "api.example.org:8443",
            ])
        };
        for ok in [
            "https://hooks.example.com/x",
            "https://HOOKS.example.com./x",
            "http://hooks.example.com:8080/x",
            "https://a.corp.example/",
            "https://a.b.corp.example/",
            "https://api.example.org:8443/",
        ] {
            assert_eq!(p.check_url(&url(ok)), Ok(()), "{ok}");
        }
        for refused in [
            "https://example.com/",
            "https://evilhooks.example.com/",
            "https://hooks.example.com.evil.net/",
            "https://corp.example/",
            "https://acorp.example/",
            "https://api.example.org/",
            "https://api.example.org:443/",
            "https://1.2.3.4/",
        ] {
            assert!(
                matches!(p.check_url(&url(refused)), Err(Refusal::Host { .. })),
                "{refused}"
            );
        }
    }

    #[test]
    fn https_unless_http_is_allowed() {
        let p = policy(&["hooks.example.com"]);
        assert_eq!(
            p.check_url(&url("http://hooks.example.com/")),
            Err(Refusal::Http)
        );
        let p = Policy {
            allow_http: true,
            ..p
        };
        assert_eq!(p.check_url(&url("http://hooks.example.com/")), Ok(()));
    }

    #[test]
    fn no_allow_list_no_webhooks() {
        let p = Policy::default();
        assert_eq!(
            p.check_url(&url("https://example.com/")),
            Err(Refusal::Disabled)
        );
    }

    #[test]
    fn literal_addresses_are_checked_when_the_message_arrives() {
        let p = Policy {
            allow_http: true,
            ..policy(&[
                "127.0.0.1",
                "169.254.169.254",
                "::ffff:127.0.0.1",
                "8.8.8.8",
            ])
        };
        for internal in [
            "http://127.0.0.1:8080/",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::ffff:127.0.0.1]/",
        ] {
            assert!(
                matches!(p.check_url(&url(internal)), Err(Refusal::Address { .. })),
                "{internal}"
            );
        }
        assert_eq!(p.check_url(&url("https://8.8.8.8/")), Ok(()));
        let p = Policy {
            allow_private: true,
            ..p
        };
        assert_eq!(p.check_url(&url("http://127.0.0.1:8080/")), Ok(()));
    }

    #[test]
    fn address_ranges() {
        let internal = [
            "127.0.0.1",
            "127.255.255.254",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "169.254.169.254",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b:1::1",
            "2002:c0a8:0101::1",
        ];
        let never = [
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "240.0.0.1",
            "192.0.2.1",
            "198.51.100.1",
            "203.0.113.1",
            "192.0.0.8",
            "198.18.0.1",
            "::",
            "ff02::1",
            "2001:db8::1",
            "::7f00:1",
            "2001:0:4136:e378::1",
            "100::1",
            "::ffff:0.0.0.0",
        ];
        let public = [
            "8.8.8.8",
            "1.1.1.1",
            "172.15.255.255",
            "172.32.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "2606:4700:4700::1111",
            "2a00:1450:4001::1",
            "64:ff9b::808:808",
            "2002:0808:0808::1",
        ];
        let strict = Policy::default();
        let lax = Policy {
            allow_private: true,
            ..Policy::default()
        };
        for ip in internal {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(matches!(classify(ip), Range::Internal(_)), "{ip}");
            assert!(strict.check_addr(ip).is_err(), "{ip}");
            assert_eq!(lax.check_addr(ip), Ok(()), "{ip}");
        }
        for ip in never {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(matches!(classify(ip), Range::Never(_)), "{ip}");
            assert!(lax.check_addr(ip).is_err(), "{ip}");
        }
        for ip in public {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(classify(ip), Range::Public, "{ip}");
            assert_eq!(strict.check_addr(ip), Ok(()), "{ip}");
        }
    }

    #[test]
    fn refusals_say_why_without_echoing_the_url() {
        let p = policy(&["hooks.example.com"]);
        let e = p
            .check_url(&url(&format!(
                "https://{}.evil.net/?t=secret",
                "a".repeat(60)
            )))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not on this worker's --webhook-allow list"),
            "{e}"
        );
        assert!(!e.contains("secret") && e.len() < 200, "{e}");
    }
}
