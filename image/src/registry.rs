//! Talking to registries: endpoints from `hosts.toml`, credentials, the token
//! handshake, manifest fetch and blob streams, with registry errors mapped to
//! [`ImageError`].
//!
//! All of it goes through vesseld's own reqwest client per endpoint
//! ([`crate::http`]: capped, time-bounded reads, a redirect policy and resolver that
//! keep a registry from sending vesseld to local addresses). `oci-client` is used
//! for its types only: its `Client` reads token answers, error bodies and redirect
//! answers whole, without a bound.

use std::time::Duration;

use futures::stream::BoxStream;
use futures::TryStreamExt as _;
use oci_client::errors::OciEnvelope;
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth as OciAuth;

use crate::hosts::{load_hosts, RegistryHost};
use crate::http::{
    bounded_text, error_body, find_refused, read_capped, BodyError, Guard, MAX_TOKEN_BYTES,
};
use crate::reference::ImageRef;
use crate::{DownloadLimits, ImageError, RegistryAuth};

/// Manifest media types this runtime can use.
const MANIFEST_TYPES: &[&str] = &[
    OCI_IMAGE_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// Largest manifest or index accepted; real ones are a few KiB.
pub(crate) const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// Longest a registry answer (up to a blob's first byte, or a whole manifest) may
/// take when the download rate check is off: it still ends.
const ANSWER_DEADLINE_WITHOUT_RATE: Duration = Duration::from_secs(300);

/// A byte stream of one blob, as received.
pub(crate) type BlobStream = BoxStream<'static, Result<bytes::Bytes, std::io::Error>>;

impl RegistryAuth {
    /// The credentials in `oci-client`'s terms.
    ///
    /// An identity token is an OAuth2 refresh token, which `oci-client` cannot send
    /// as such; it is offered as the password of Basic auth (user `<token>` unless a
    /// username is given), which token servers that issue identity tokens accept.
    pub(crate) fn to_oci(&self) -> Result<OciAuth, ImageError> {
        if let Some(token) = self.registry_token.as_deref().filter(|t| !t.is_empty()) {
            return Ok(OciAuth::Bearer(token.to_owned()));
        }
        if let Some(token) = self.identity_token.as_deref().filter(|t| !t.is_empty()) {
            let user = self.username.clone().unwrap_or_else(|| "<token>".into());
            return Ok(OciAuth::Basic(user, token.to_owned()));
        }
        if let Some(user) = self.username.as_deref().filter(|u| !u.is_empty()) {
            return Ok(OciAuth::Basic(
                user.to_owned(),
                self.password.clone().unwrap_or_default(),
            ));
        }
        if let Some(auth) = self.auth.as_deref().filter(|a| !a.is_empty()) {
            use base64::Engine as _;
            let bad = |reason: &str| ImageError::Unauthenticated(format!("invalid auth: {reason}"));
            let raw = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| bad("not base64"))?;
            let text = String::from_utf8(raw).map_err(|_| bad("not UTF-8"))?;
            let (user, pass) = text.split_once(':').ok_or_else(|| bad("no ':'"))?;
            return Ok(OciAuth::Basic(user.to_owned(), pass.to_owned()));
        }
        Ok(OciAuth::Anonymous)
    }
}

/// Maps an `oci-client` error about `what` to ours. Registry text in it is bounded
/// ([`bounded_text`]): it goes into the log and the CRI answer.
pub(crate) fn map_oci_error(e: OciDistributionError, what: &str) -> ImageError {
    match e {
        OciDistributionError::UnauthorizedError { url } => ImageError::Unauthenticated(format!(
            "{what}: registry answered 401 for {}",
            bounded_text(&url)
        )),
        OciDistributionError::AuthenticationFailure(reason) => {
            ImageError::Unauthenticated(format!("{what}: {}", bounded_text(&reason)))
        }
        OciDistributionError::RegistryError { envelope, url } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            let msg = format!(
                "{what}: {} ({})",
                bounded_text(&envelope.to_string()),
                bounded_text(&url)
            );
            if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized))
            {
                ImageError::Unauthenticated(msg)
            } else if codes.iter().any(|c| matches!(c, OciErrorCode::Denied)) {
                ImageError::PermissionDenied(msg)
            } else if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NotFound
                )
            }) {
                ImageError::NotFound(msg)
            } else {
                ImageError::Registry(msg)
            }
        }
        OciDistributionError::ServerError { code, url, message } => {
            server_error(code, &url, &bounded_text(&message), what)
        }
        OciDistributionError::ImageManifestNotFoundError(m) => {
            ImageError::NotFound(format!("{what}: {}", bounded_text(&m)))
        }
        other => ImageError::Registry(format!("{what}: {}", with_causes(&other))),
    }
}

/// An error and its sources, "a: b: c", bounded: HTTP client errors keep the reason
/// that matters (an unknown certificate issuer, a refused connection) in their
/// sources, and carry URLs a registry chose.
pub(crate) fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    bounded_text(&text)
}

/// An HTTP client error about `what`: a refused redirect or address is its own
/// error, a timeout is the registry being too slow.
fn http_error(e: &reqwest::Error, what: &str) -> ImageError {
    if let Some(r) = find_refused(e) {
        return ImageError::RedirectRefused {
            subject: what.to_owned(),
            target: r.target,
            reason: r.reason,
        };
    }
    ImageError::Registry(format!("{what}: {}", with_causes(e)))
}

/// The error for a non-success answer about `what`: `status` and the (bounded)
/// start of its body, parsed as an OCI error envelope for client errors, as the
/// spec has it. `cut` says why the body read stopped early, if it did.
fn status_error(
    status: reqwest::StatusCode,
    url: &str,
    body: &[u8],
    cut: Option<String>,
    what: &str,
) -> ImageError {
    let url = url.to_owned();
    if status == reqwest::StatusCode::UNAUTHORIZED {
        return map_oci_error(OciDistributionError::UnauthorizedError { url }, what);
    }
    if status.is_client_error() {
        if let Ok(envelope) = serde_json::from_slice::<OciEnvelope>(body) {
            return map_oci_error(OciDistributionError::RegistryError { envelope, url }, what);
        }
    }
    server_error(status.as_u16(), &url, &body_text(body, cut), what)
}

/// A body prefix for a message: bounded, then why it stopped.
fn body_text(body: &[u8], cut: Option<String>) -> String {
    let mut text = bounded_text(&String::from_utf8_lossy(body));
    if let Some(cut) = cut {
        text.push_str(&format!(" ({cut})"));
    }
    text
}

/// An HTTP status error; `message` is already bounded.
fn server_error(code: u16, url: &str, message: &str, what: &str) -> ImageError {
    let msg = format!("{what}: HTTP {code} from {}: {message}", bounded_text(url));
    match code {
        401 => ImageError::Unauthenticated(msg),
        403 => ImageError::PermissionDenied(msg),
        404 => ImageError::NotFound(msg),
        _ => ImageError::Registry(msg),
    }
}

/// A `Bearer` challenge's parameters (`realm`, `service`, `scope`), from a
/// `WWW-Authenticate` value; None for other schemes.
fn bearer_challenge(value: &str) -> Option<Vec<(String, String)>> {
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.next_if(|c| *c == ',' || c.is_whitespace()).is_some() {}
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
        if key.is_empty() || chars.next() != Some('=') {
            break;
        }
        let mut val = String::new();
        if chars.next_if_eq(&'"').is_some() {
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => val.extend(chars.next()),
                    c => val.push(c),
                }
            }
        } else {
            val = std::iter::from_fn(|| chars.next_if(|c| *c != ',')).collect();
        }
        params.push((key.trim().to_ascii_lowercase(), val.trim().to_owned()));
    }
    Some(params)
}

/// One endpoint with its own HTTP client (TLS settings, redirect policy and resolver
/// differ per host) and the credentials it may see.
struct Endpoint {
    host: RegistryHost,
    http: reqwest::Client,
    /// Where its requests may go: the token realm is checked against it.
    guard: Guard,
    auth: OciAuth,
    /// Credentials were given but are not sent to this host.
    withheld: bool,
    /// The bearer token of the first handshake (None: none needed), reused for the
    /// pull's other requests.
    token: tokio::sync::Mutex<Option<Option<String>>>,
}

/// The endpoints of one image's registry, in the order to try them.
pub(crate) struct Registry {
    endpoints: Vec<Endpoint>,
    image: ImageRef,
    /// Longest a manifest fetch from one host may take, and a blob's answer up to its
    /// first body byte (then the rate check takes over).
    answer_deadline: Duration,
}

impl Endpoint {
    fn scheme(&self) -> &'static str {
        if self.host.plain_http {
            "http"
        } else {
            "https"
        }
    }

    /// Adds why an authentication failure may have happened: the credentials were
    /// not sent here.
    fn explain(&self, e: ImageError) -> ImageError {
        match e {
            ImageError::Unauthenticated(msg) if self.withheld => {
                ImageError::Unauthenticated(format!(
                    "{msg} (the pull's credentials are not sent to {}{}; set \
                     send_credentials = true for it in hosts.toml to allow that)",
                    self.host.host,
                    if self.host.plain_http {
                        " over plain HTTP"
                    } else {
                        ", a mirror"
                    }
                ))
            }
            e => e,
        }
    }

    /// The token for pulling `repository`, once per endpoint and pull.
    async fn token(&self, repository: &str, what: &str) -> Result<Option<String>, ImageError> {
        let mut cached = self.token.lock().await;
        if let Some(token) = &*cached {
            return Ok(token.clone());
        }
        let token = self.handshake(repository, what).await?;
        *cached = Some(token.clone());
        Ok(token)
    }

    /// The distribution spec's token handshake: `/v2/` answers 401 with a Bearer
    /// challenge naming the token server (`realm`), which is asked for a pull token
    /// of `repository` (with Basic credentials if any). None: no token is needed
    /// (no challenge, or a Basic one: the credentials then go with each request).
    async fn handshake(&self, repository: &str, what: &str) -> Result<Option<String>, ImageError> {
        if let OciAuth::Bearer(token) = &self.auth {
            return Ok(Some(token.clone()));
        }
        let url = format!("{}://{}/v2/", self.scheme(), self.host.host);
        // Its body is not read: dropping the answer closes the connection.
        let probe = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| http_error(&e, what))?;
        let Some(challenge) = probe
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_challenge)
        else {
            return Ok(None);
        };
        drop(probe);
        let param = |k: &str| challenge.iter().find(|(key, _)| key == k).map(|(_, v)| v);
        let realm = param("realm").ok_or_else(|| {
            ImageError::Unauthenticated(format!("{what}: Bearer challenge without a realm"))
        })?;
        let realm_url = reqwest::Url::parse(realm).map_err(|e| {
            ImageError::Unauthenticated(format!("{what}: token realm {}: {e}", bounded_text(realm)))
        })?;
        self.guard
            .check(&realm_url)
            .map_err(|r| ImageError::RedirectRefused {
                subject: format!("{what} (token server)"),
                target: r.target,
                reason: r.reason,
            })?;
        let scope = format!("repository:{repository}:pull");
        let mut query = vec![("scope", scope.as_str())];
        if let Some(service) = param("service") {
            query.push(("service", service));
        }
        let mut req = self.http.get(realm_url.clone()).query(&query);
        if let OciAuth::Basic(user, pass) = &self.auth {
            req = req.basic_auth(user, Some(pass));
        }
        let what = format!("{what} (token from {})", bounded_text(realm));
        let mut resp = req.send().await.map_err(|e| http_error(&e, &what))?;
        let status = resp.status();
        if !status.is_success() {
            let (body, cut) = error_body(resp).await;
            return Err(ImageError::Unauthenticated(format!(
                "{what}: token server answered {status}: {}",
                body_text(&body, cut)
            )));
        }
        let body = read_capped(&mut resp, MAX_TOKEN_BYTES)
            .await
            .map_err(|e| match e {
                BodyError::TooLarge(seen) => ImageError::ResponseTooLarge {
                    subject: what.clone(),
                    body: "token response",
                    seen,
                    limit: MAX_TOKEN_BYTES as u64,
                },
                BodyError::Http(e) => http_error(&e, &what),
            })?;
        #[derive(serde::Deserialize)]
        struct TokenAnswer {
            token: Option<String>,
            access_token: Option<String>,
        }
        let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|e| {
            ImageError::Unauthenticated(format!("{what}: unparsable token response: {e}"))
        })?;
        let token = answer
            .token
            .or(answer.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ImageError::Unauthenticated(format!("{what}: no token in the token response"))
            })?;
        Ok(Some(token))
    }

    /// A GET of `url` with this endpoint's credentials: the handshake's token, else
    /// what the pull was given (Basic only where no token server is named).
    async fn get(
        &self,
        url: &str,
        repository: &str,
        what: &str,
    ) -> Result<reqwest::RequestBuilder, ImageError> {
        let token = self.token(repository, what).await?;
        let req = self.http.get(url);
        Ok(match (token.as_ref(), &self.auth) {
            (Some(token), _) | (None, OciAuth::Bearer(token)) => req.bearer_auth(token),
            (None, OciAuth::Basic(user, pass)) => req.basic_auth(user, Some(pass)),
            (None, OciAuth::Anonymous) => req,
        })
    }
}

fn read_cas(host: &RegistryHost) -> Result<Vec<Vec<u8>>, ImageError> {
    host.ca
        .iter()
        .map(|path| {
            std::fs::read(path).map_err(ImageError::io(format!("read CA {}", path.display())))
        })
        .collect()
}

/// The HTTP client for `host`: its TLS settings, and redirects and names checked by
/// `guard`.
fn build_http(
    host: &RegistryHost,
    cas: &[Vec<u8>],
    guard: &Guard,
) -> Result<reqwest::Client, ImageError> {
    let bad = |e: reqwest::Error| {
        ImageError::Registry(format!("client for {}: {}", host.host, with_causes(&e)))
    };
    let certs = cas
        .iter()
        .map(|pem| reqwest::Certificate::from_pem(pem))
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad)?;
    reqwest::Client::builder()
        .tls_danger_accept_invalid_certs(host.skip_verify)
        .tls_certs_merge(certs)
        .connect_timeout(Duration::from_secs(15))
        .read_timeout(Duration::from_secs(120))
        .redirect(guard.redirect_policy())
        .dns_resolver(std::sync::Arc::new(guard.resolver()))
        .build()
        .map_err(bad)
}

/// Whether `e` should stop trying further endpoints: the content itself is bad.
fn is_final(e: &ImageError) -> bool {
    matches!(
        e,
        ImageError::DigestMismatch { .. } | ImageError::UnsafeLayer { .. }
    )
}

/// Keeps the most telling error across endpoints: a registry's verdict (not found,
/// auth) beats "could not connect" from a dead mirror.
fn keep_error(best: Option<ImageError>, new: ImageError) -> ImageError {
    match best {
        Some(b)
            if matches!(new, ImageError::Registry(_)) && !matches!(b, ImageError::Registry(_)) =>
        {
            b
        }
        _ => new,
    }
}

impl Registry {
    /// Endpoints for `image` from `certs_dir`; `auth` goes only to those that may
    /// receive it ([`RegistryHost::gets_credentials`]).
    pub(crate) fn new(
        certs_dir: &std::path::Path,
        image: &ImageRef,
        auth: &RegistryAuth,
        limits: &DownloadLimits,
    ) -> Result<Self, ImageError> {
        let auth = auth.to_oci()?;
        let endpoints = load_hosts(certs_dir, &image.registry)?
            .into_iter()
            .map(|host| {
                let given = !matches!(auth, OciAuth::Anonymous);
                let allowed = host.gets_credentials();
                if given && !allowed {
                    tracing::debug!(host = %host.host, "pull credentials withheld from host");
                }
                let cas = read_cas(&host)?;
                let scheme = if host.plain_http { "http" } else { "https" };
                let guard = Guard::new(scheme, &host.host, host.local);
                Ok(Endpoint {
                    http: build_http(&host, &cas, &guard)?,
                    guard,
                    auth: if allowed {
                        auth.clone()
                    } else {
                        OciAuth::Anonymous
                    },
                    withheld: given && !allowed,
                    token: tokio::sync::Mutex::new(None),
                    host,
                })
            })
            .collect::<Result<Vec<_>, ImageError>>()?;
        Ok(Registry {
            endpoints,
            image: image.clone(),
            answer_deadline: if limits.min_rate > 0 {
                limits.window * 2
            } else {
                ANSWER_DEADLINE_WITHOUT_RATE
            },
        })
    }

    /// Fetches the manifest (or index) named by `object` (a tag or digest). Returns the
    /// raw bytes; the caller verifies them. Hosts with `resolve` are asked for tags,
    /// hosts with `pull` also for digests.
    pub(crate) async fn fetch_manifest(&self, object: &str) -> Result<Vec<u8>, ImageError> {
        let by_digest = object.contains(':');
        let mut best: Option<ImageError> = None;
        for ep in &self.endpoints {
            if !(ep.host.resolve || (by_digest && ep.host.pull)) {
                continue;
            }
            let what = format!(
                "manifest {}:{} at {}",
                self.image.name(),
                object,
                ep.host.host
            );
            let res = self
                .within_deadline(
                    self.get_manifest(ep, object, &what),
                    &what,
                    "complete answer",
                )
                .await;
            match res {
                Ok(body) => return Ok(body),
                Err(e) => {
                    let e = ep.explain(e);
                    tracing::debug!(error = %e, "manifest fetch failed, trying next host");
                    if is_final(&e) {
                        return Err(e);
                    }
                    best = Some(keep_error(best, e));
                }
            }
        }
        Err(best.unwrap_or_else(|| {
            ImageError::Registry(format!("no host can resolve {}", self.image.name()))
        }))
    }

    /// GETs one manifest from `ep`, refusing it as soon as it is known to be over
    /// [`MAX_MANIFEST_BYTES`] (declared length or bytes received).
    async fn get_manifest(
        &self,
        ep: &Endpoint,
        object: &str,
        what: &str,
    ) -> Result<Vec<u8>, ImageError> {
        let url = format!(
            "{}://{}/v2/{}/manifests/{object}",
            ep.scheme(),
            ep.host.host,
            self.image.repository
        );
        let mut resp = ep
            .get(&url, &self.image.repository, what)
            .await?
            .header(reqwest::header::ACCEPT, MANIFEST_TYPES.join(", "))
            .send()
            .await
            .map_err(|e| http_error(&e, what))?;
        let status = resp.status();
        if status != reqwest::StatusCode::OK {
            let (body, cut) = error_body(resp).await;
            return Err(status_error(status, &url, &body, cut, what));
        }
        read_capped(&mut resp, MAX_MANIFEST_BYTES)
            .await
            .map_err(|e| match e {
                BodyError::TooLarge(seen) => ImageError::ResponseTooLarge {
                    subject: what.to_owned(),
                    body: "manifest",
                    seen,
                    limit: MAX_MANIFEST_BYTES as u64,
                },
                BodyError::Http(e) => http_error(&e, what),
            })
    }

    /// Opens a stream of the blob `digest` from the first host that serves it. The
    /// answer must start within the answer deadline; the body's pace is the content
    /// store's rate check.
    /// `fut`, failed as TooSlow ("{what}: no {awaited} within ...") when it takes
    /// longer than the answer deadline.
    async fn within_deadline<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, ImageError>>,
        what: &str,
        awaited: &str,
    ) -> Result<T, ImageError> {
        let d = self.answer_deadline;
        tokio::time::timeout(d, fut).await.unwrap_or_else(|_| {
            Err(ImageError::TooSlow(format!(
                "{what}: no {awaited} within {}s",
                d.as_secs_f64()
            )))
        })
    }

    pub(crate) async fn blob_stream(&self, digest: &str) -> Result<BlobStream, ImageError> {
        let mut best: Option<ImageError> = None;
        for ep in self.endpoints.iter().filter(|e| e.host.pull) {
            let what = format!("blob {digest} of {} at {}", self.image.name(), ep.host.host);
            let res = self
                .within_deadline(self.open_blob(ep, digest, &what), &what, "answer")
                .await;
            match res {
                Ok(s) => return Ok(s),
                Err(e) => {
                    let e = ep.explain(e);
                    tracing::debug!(error = %e, "blob fetch failed, trying next host");
                    best = Some(keep_error(best, e));
                }
            }
        }
        Err(best.unwrap_or_else(|| {
            ImageError::Registry(format!("no host can serve blobs of {}", self.image.name()))
        }))
    }

    async fn open_blob(
        &self,
        ep: &Endpoint,
        digest: &str,
        what: &str,
    ) -> Result<BlobStream, ImageError> {
        let url = format!(
            "{}://{}/v2/{}/blobs/{digest}",
            ep.scheme(),
            ep.host.host,
            self.image.repository
        );
        let resp = ep
            .get(&url, &self.image.repository, what)
            .await?
            .send()
            .await
            .map_err(|e| http_error(&e, what))?;
        let status = resp.status();
        if status != reqwest::StatusCode::OK {
            let (body, cut) = error_body(resp).await;
            return Err(status_error(status, &url, &body, cut, what));
        }
        // The content store hashes and sizes what arrives.
        Ok(Box::pin(resp.bytes_stream().map_err(std::io::Error::other)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_map_to_oci_auth() {
        let a = RegistryAuth::default();
        assert!(matches!(a.to_oci().unwrap(), OciAuth::Anonymous));
        let a = RegistryAuth {
            username: Some("u".into()),
            password: Some("p".into()),
            ..Default::default()
        };
        assert!(matches!(a.to_oci().unwrap(), OciAuth::Basic(u, p) if u == "u" && p == "p"));
        let a = RegistryAuth {
            auth: Some("dXNlcjpwYTpzcw==".into()), // user:pa:ss
            ..Default::default()
        };
        assert!(matches!(a.to_oci().unwrap(), OciAuth::Basic(u, p) if u == "user" && p == "pa:ss"));
        let a = RegistryAuth {
            auth: Some("!!!".into()),
            ..Default::default()
        };
        assert!(matches!(a.to_oci(), Err(ImageError::Unauthenticated(_))));
        let a = RegistryAuth {
            registry_token: Some("tok".into()),
            username: Some("ignored".into()),
            ..Default::default()
        };
        assert!(matches!(a.to_oci().unwrap(), OciAuth::Bearer(t) if t == "tok"));
        let a = RegistryAuth {
            identity_token: Some("id".into()),
            ..Default::default()
        };
        assert!(matches!(a.to_oci().unwrap(), OciAuth::Basic(u, p) if u == "<token>" && p == "id"));
    }

    #[test]
    fn bearer_challenges_parse() {
        let c = bearer_challenge(
            r#"Bearer realm="https://auth.example/token",service="reg.example",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(
            c,
            vec![
                ("realm".into(), "https://auth.example/token".into()),
                ("service".into(), "reg.example".into()),
                ("scope".into(), "repository:a/b:pull,push".into()),
            ]
        );
        let c = bearer_challenge(r#"bearer Realm=http://x/t, service="s\"q""#).unwrap();
        assert_eq!(
            c,
            vec![
                ("realm".into(), "http://x/t".into()),
                ("service".into(), "s\"q".into())
            ]
        );
        assert!(bearer_challenge(r#"Basic realm="registry""#).is_none());
        assert_eq!(bearer_challenge("Bearer "), Some(vec![]));
    }

    #[test]
    fn status_errors_are_bounded() {
        let body = format!("{}\x1b[2J", "e".repeat(4000));
        let e = status_error(
            reqwest::StatusCode::INTERNAL_SERVER_ERROR,
            "http://r/v2/x/blobs/y",
            body.as_bytes(),
            Some("body cut at 4096 bytes".into()),
            "blob y",
        );
        assert_eq!(e.code(), crate::ErrorCode::Unavailable);
        let msg = e.to_string();
        assert!(msg.len() < 1400, "{}", msg.len());
        assert!(
            msg.contains("HTTP 500") && msg.ends_with("(body cut at 4096 bytes)"),
            "{msg}"
        );
        let e = status_error(
            reqwest::StatusCode::NOT_FOUND,
            "u",
            br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"gone\u001b[2J"}]}"#,
            None,
            "blob y",
        );
        assert!(matches!(e, ImageError::NotFound(_)), "{e:?}");
        assert!(!e.to_string().contains('\x1b'), "{e}");
    }

    #[test]
    fn registry_statuses_map_to_codes() {
        let server = |code| OciDistributionError::ServerError {
            code,
            url: "u".into(),
            message: String::new(),
        };
        assert!(matches!(
            map_oci_error(server(401), "x"),
            ImageError::Unauthenticated(_)
        ));
        assert!(matches!(
            map_oci_error(server(403), "x"),
            ImageError::PermissionDenied(_)
        ));
        assert!(matches!(
            map_oci_error(server(404), "x"),
            ImageError::NotFound(_)
        ));
        assert!(matches!(
            map_oci_error(server(500), "x"),
            ImageError::Registry(_)
        ));
        let unauthorized = OciDistributionError::UnauthorizedError { url: "u".into() };
        assert!(matches!(
            map_oci_error(unauthorized, "x"),
            ImageError::Unauthenticated(_)
        ));
        let envelope: oci_client::errors::OciEnvelope = serde_json::from_str(
            r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#,
        )
        .unwrap();
        let e = OciDistributionError::RegistryError {
            envelope,
            url: "u".into(),
        };
        assert!(matches!(map_oci_error(e, "x"), ImageError::NotFound(_)));
        let envelope: oci_client::errors::OciEnvelope =
            serde_json::from_str(r#"{"errors":[{"code":"DENIED","message":"no"}]}"#).unwrap();
        let e = OciDistributionError::RegistryError {
            envelope,
            url: "u".into(),
        };
        assert!(matches!(
            map_oci_error(e, "x"),
            ImageError::PermissionDenied(_)
        ));
    }
}
