//! The HTTP layer vesseld keeps between itself and registries.
//!
//! Every byte read from a registry goes through here, not through `oci-client`
//! (which reads token, error and redirect bodies whole: a 1 GiB token answer took
//! 2.5 GB of RSS, a 1 GiB error body went three times into the log). So:
//! - bodies are read chunk by chunk and refused past a cap: tokens 64 KiB, manifests
//!   4 MiB ([`crate::registry`]), error bodies 4 KiB (the prefix is kept);
//! - an error body is read for at most [`ERROR_BODY_DEADLINE`], so a registry
//!   trickling one cannot hold a download slot;
//! - registry text that reaches an error (and so the log and the CRI answer) is at
//!   most [`MAX_REGISTRY_TEXT`] bytes, control characters escaped;
//! - redirects and token realms are not followed to loopback, link-local,
//!   unspecified, multicast or cloud metadata addresses (SSRF from the host's
//!   network namespace) unless the registry's hosts.toml says `local = true`; names
//!   are checked again once resolved ([`GuardedResolver`]).

use std::net::{IpAddr, SocketAddr, ToSocketAddrs as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reqwest::Url;

/// Largest token server answer read; real ones (a JWT or two) are a few KiB.
pub(crate) const MAX_TOKEN_BYTES: usize = 64 << 10;
/// How much of an error body is read: the OCI error envelope fits easily.
pub(crate) const MAX_ERROR_BODY_BYTES: usize = 4 << 10;
/// Longest an error body may take to arrive; what came by then is used.
pub(crate) const ERROR_BODY_DEADLINE: Duration = Duration::from_secs(5);
/// Most bytes of registry-supplied text (messages, URLs) put into an error.
pub(crate) const MAX_REGISTRY_TEXT: usize = 1024;
/// Redirects followed per request, as reqwest's default policy.
const MAX_REDIRECTS: usize = 10;

static REFUSED_BYTES: AtomicU64 = AtomicU64::new(0);

/// Bytes registries sent or declared past a cap (token, manifest, error body) that
/// vesseld did not read, since the process started. A body without a declared
/// length counts what had arrived past the cap when the connection was dropped.
pub fn registry_bytes_refused() -> u64 {
    REFUSED_BYTES.load(Ordering::Relaxed)
}

fn count_refused(n: u64) {
    REFUSED_BYTES.fetch_add(n, Ordering::Relaxed);
}

/// `text` fit for an error message: control characters escaped, at most
/// [`MAX_REGISTRY_TEXT`] bytes, with how much was left out.
pub(crate) fn bounded_text(text: &str) -> String {
    let mut out = String::new();
    let mut cut = None;
    for (i, c) in text.char_indices() {
        let start = out.len();
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
        if out.len() > MAX_REGISTRY_TEXT {
            out.truncate(start);
            cut = Some(i);
            break;
        }
    }
    if let Some(i) = cut {
        out.push_str(&format!("... ({} more bytes)", text.len() - i));
    }
    out
}

/// Why a capped body read failed.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// Declared or received at least this many bytes, over the cap.
    TooLarge(u64),
    Http(reqwest::Error),
}

/// Reads `resp`'s body, refusing it as soon as it is known to be over `cap` bytes
/// (declared length or bytes received). The caller bounds the time.
pub(crate) async fn read_capped(
    resp: &mut reqwest::Response,
    cap: usize,
) -> Result<Vec<u8>, BodyError> {
    if let Some(n) = resp.content_length().filter(|&n| n > cap as u64) {
        count_refused(n);
        return Err(BodyError::TooLarge(n));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(BodyError::Http)? {
        let seen = body.len() + chunk.len();
        if seen > cap {
            count_refused((seen - cap) as u64);
            return Err(BodyError::TooLarge(seen as u64));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The first [`MAX_ERROR_BODY_BYTES`] of an error answer's body, as much as arrives
/// within [`ERROR_BODY_DEADLINE`], and whether it was cut short. Never fails: the
/// status is the error, the body only explains it.
pub(crate) async fn error_body(mut resp: reqwest::Response) -> (Vec<u8>, Option<String>) {
    // Taken before the body: reqwest's count shrinks as the body arrives.
    let declared = resp.content_length();
    let mut body = Vec::new();
    // Some(bytes seen past the cap) once the prefix is full.
    let read = async {
        while let Ok(Some(chunk)) = resp.chunk().await {
            let room = MAX_ERROR_BODY_BYTES - body.len();
            if chunk.len() >= room {
                body.extend_from_slice(&chunk[..room]);
                return Some((chunk.len() - room) as u64);
            }
            body.extend_from_slice(&chunk);
        }
        None
    };
    let cut = match tokio::time::timeout(ERROR_BODY_DEADLINE, read).await {
        Ok(Some(past)) => {
            let rest = declared.map_or(0, |n| n.saturating_sub(body.len() as u64));
            count_refused(rest.max(past));
            Some(format!("body cut at {MAX_ERROR_BODY_BYTES} bytes"))
        }
        Ok(None) => None,
        Err(_) => Some(format!(
            "body cut off after {}s",
            ERROR_BODY_DEADLINE.as_secs()
        )),
    };
    (body, cut)
}

/// Why an address is not reached for a registry that is not local, if it is not.
pub(crate) fn refused_ip(ip: IpAddr) -> Option<&'static str> {
    let ip = match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if v4.is_unspecified() || o[0] == 0 {
                Some("unspecified")
            } else if v4.is_multicast() || v4.is_broadcast() {
                Some("multicast")
            } else if o == [100, 100, 100, 200] {
                // Alibaba Cloud's metadata service.
                Some("cloud metadata")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if s[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if s == [0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254] {
                // AWS's metadata service over IPv6.
                Some("cloud metadata")
            } else {
                None
            }
        }
    }
}

/// A redirect, token realm or resolved address vesseld refused to reach.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{target} is a {reason} address")]
pub(crate) struct Refused {
    /// Where the registry sent vesseld (bounded).
    pub(crate) target: String,
    /// What kind of address it is.
    pub(crate) reason: &'static str,
}

/// The refusal inside a reqwest error (redirect policy or resolver), if any.
pub(crate) fn find_refused(e: &(dyn std::error::Error + 'static)) -> Option<Refused> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<Refused>() {
            return Some(r.clone());
        }
        cur = err.source();
    }
    None
}

/// Where one endpoint's requests may go.
#[derive(Debug, Clone)]
pub(crate) struct Guard {
    /// The endpoint's own host (lowercase, IPv6 without brackets) and port.
    host: String,
    port: Option<u16>,
    /// hosts.toml says `local = true`: nothing is refused.
    local: bool,
}

impl Guard {
    /// For the endpoint `host` (`host[:port]`) reached over `scheme`.
    pub(crate) fn new(scheme: &str, host: &str, local: bool) -> Self {
        let url = Url::parse(&format!("{scheme}://{host}/")).ok();
        Guard {
            host: url
                .as_ref()
                .and_then(|u| u.host_str())
                .map(|h| h.trim_matches(['[', ']']).to_ascii_lowercase())
                .unwrap_or_else(|| host.to_ascii_lowercase()),
            port: url.as_ref().and_then(|u| u.port_or_known_default()),
            local,
        }
    }

    /// Refuses `url` if it leaves the endpoint for a local address (by literal
    /// address or the name `localhost`; other names are checked once resolved).
    /// The endpoint itself (same host and port) is always allowed: it is configured.
    pub(crate) fn check(&self, url: &Url) -> Result<(), Refused> {
        let refuse = |reason| Refused {
            target: bounded_text(url.as_str()),
            reason,
        };
        if !matches!(url.scheme(), "http" | "https") {
            return Err(refuse("non-HTTP"));
        }
        if self.local {
            return Ok(());
        }
        let same_host = url
            .host_str()
            .is_some_and(|h| h.trim_matches(['[', ']']).eq_ignore_ascii_case(&self.host));
        if same_host && url.port_or_known_default() == self.port {
            return Ok(());
        }
        // `Url` normalizes hosts (IPv4 in any notation becomes dotted decimal).
        let Some(host) = url.host_str().map(|h| h.trim_matches(['[', ']'])) else {
            return Err(refuse("host-less"));
        };
        if let Ok(ip) = host.parse::<IpAddr>() {
            return refused_ip(ip).map_or(Ok(()), |r| Err(refuse(r)));
        }
        let name = host.trim_end_matches('.').to_ascii_lowercase();
        if name == "localhost" || name.ends_with(".localhost") {
            return Err(refuse("loopback"));
        }
        Ok(())
    }

    /// A redirect policy refusing what [`Guard::check`] refuses.
    pub(crate) fn redirect_policy(&self) -> reqwest::redirect::Policy {
        let guard = self.clone();
        reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > MAX_REDIRECTS {
                return attempt.error("too many redirects");
            }
            match guard.check(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(refused) => attempt.error(refused),
            }
        })
    }

    /// A resolver that drops refused addresses of names other than the endpoint's
    /// own, and fails when none is left.
    pub(crate) fn resolver(&self) -> GuardedResolver {
        GuardedResolver {
            own: self.host.clone(),
            local: self.local,
        }
    }
}

/// The system resolver (getaddrinfo, off the async workers), filtered by a
/// [`Guard`]: `https://metadata.example/` resolving to 169.254.169.254 is refused
/// like the literal address.
#[derive(Debug, Clone)]
pub(crate) struct GuardedResolver {
    own: String,
    local: bool,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let name = name.as_str().trim_end_matches('.').to_ascii_lowercase();
        let check = !self.local && name != self.own;
        Box::pin(async move {
            let lookup = name.clone();
            let addrs: Vec<SocketAddr> =
                tokio::task::spawn_blocking(move || (lookup.as_str(), 0).to_socket_addrs())
                    .await??
                    .collect();
            if !check {
                return Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs);
            }
            let mut refused = None;
            let kept: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| match refused_ip(a.ip()) {
                    Some(reason) => {
                        refused.get_or_insert((a.ip(), reason));
                        false
                    }
                    None => true,
                })
                .collect();
            if let (true, Some((ip, reason))) = (kept.is_empty(), refused) {
                return Err(Box::new(Refused {
                    target: bounded_text(&format!("{name} (resolves to {ip})")),
                    reason,
                })
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_bounded_and_escaped() {
        assert_eq!(bounded_text("plain"), "plain");
        assert_eq!(bounded_text("a\nb\x1b[31m"), "a\\nb\\u{1b}[31m");
        let long = "x".repeat(10_000);
        let b = bounded_text(&long);
        assert!(b.len() < MAX_REGISTRY_TEXT + 32, "{}", b.len());
        assert!(b.ends_with(&format!("... ({} more bytes)", 10_000 - MAX_REGISTRY_TEXT)));
        // Escapes count towards the bound, and no char is split.
        let b = bounded_text(&"\u{7}é".repeat(2000));
        assert!(b.len() < MAX_REGISTRY_TEXT + 32);
    }

    #[test]
    fn local_addresses_are_refused() {
        for (ip, want) in [
            ("127.0.0.2", Some("loopback")),
            ("::1", Some("loopback")),
            ("::ffff:127.0.0.1", Some("loopback")),
            ("169.254.169.254", Some("link-local")),
            ("fe80::1", Some("link-local")),
            ("0.0.0.0", Some("unspecified")),
            ("::", Some("unspecified")),
            ("100.100.100.200", Some("cloud metadata")),
            ("fd00:ec2::254", Some("cloud metadata")),
            ("224.0.0.1", Some("multicast")),
            ("93.184.216.34", None),
            ("10.1.2.3", None),
            ("2001:db8::1", None),
        ] {
            assert_eq!(refused_ip(ip.parse().unwrap()), want, "{ip}");
        }
    }

    #[test]
    fn guard_allows_the_endpoint_and_refuses_local_targets() {
        let g = Guard::new("http", "127.0.0.1:5000", false);
        let url = |s: &str| Url::parse(s).unwrap();
        g.check(&url("http://127.0.0.1:5000/v2/x/blobs/y")).unwrap();
        g.check(&url("https://storage.example/blob")).unwrap();
        for target in [
            "http://127.0.0.1:6379/",
            "http://127.0.0.2:5000/",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]:5000/",
            "http://[fe80::1]/",
            "http://localhost:5000/",
            "http://a.localhost./",
            "file:///etc/passwd",
        ] {
            let e = g.check(&url(target)).unwrap_err();
            assert!(!e.to_string().is_empty(), "{target}");
        }
        let local = Guard::new("http", "reg.example", true);
        local.check(&url("http://169.254.169.254/")).unwrap();
        assert!(local.check(&url("file:///x")).is_err());
        // A named endpoint: its own name on its own port only.
        let g = Guard::new("https", "Reg.Example", false);
        g.check(&url("https://reg.example:443/v2/")).unwrap();
        assert!(g.check(&url("http://127.0.0.1/")).is_err());
    }

    #[tokio::test]
    async fn resolver_refuses_names_of_local_addresses() {
        use reqwest::dns::Resolve as _;
        let name = |s: &str| s.parse::<reqwest::dns::Name>().unwrap();
        let guarded = Guard::new("https", "reg.example", false).resolver();
        let err = match guarded.resolve(name("localhost")).await {
            Ok(addrs) => panic!("resolved: {:?}", addrs.collect::<Vec<_>>()),
            Err(e) => e,
        };
        let refused = find_refused(&*err).expect("a refusal");
        assert_eq!(refused.reason, "loopback");
        // The endpoint's own name, or any name for a local registry, resolves.
        let own = Guard::new("http", "localhost:5000", false).resolver();
        assert!(own.resolve(name("localhost")).await.is_ok());
        let local = Guard::new("https", "reg.example", true).resolver();
        assert!(local.resolve(name("localhost")).await.is_ok());
    }
}
