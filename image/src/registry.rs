//! Talking to registries through `oci-client`: endpoints from `hosts.toml`, credentials,
//! manifest fetch and blob streams, with registry errors mapped to [`ImageError`].

use std::time::Duration;

use futures::stream::BoxStream;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::OciEnvelope;
use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth as OciAuth;
use oci_client::{Client, Reference, RegistryOperation};

use crate::hosts::{load_hosts, RegistryHost};
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

/// Maps an `oci-client` error about `what` to ours.
pub(crate) fn map_oci_error(e: OciDistributionError, what: &str) -> ImageError {
    match e {
        OciDistributionError::UnauthorizedError { url } => {
            ImageError::Unauthenticated(format!("{what}: registry answered 401 for {url}"))
        }
        OciDistributionError::AuthenticationFailure(reason) => {
            ImageError::Unauthenticated(format!("{what}: {reason}"))
        }
        OciDistributionError::RegistryError { envelope, url } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            let msg = format!("{what}: {envelope} ({url})");
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
            let msg = format!("{what}: HTTP {code} from {url}: {message}");
            match code {
                401 => ImageError::Unauthenticated(msg),
                403 => ImageError::PermissionDenied(msg),
                404 => ImageError::NotFound(msg),
                _ => ImageError::Registry(msg),
            }
        }
        OciDistributionError::DigestError(DigestError::VerificationError { expected, actual }) => {
            ImageError::DigestMismatch { expected, actual }
        }
        OciDistributionError::ImageManifestNotFoundError(m) => {
            ImageError::NotFound(format!("{what}: {m}"))
        }
        other => ImageError::Registry(format!("{what}: {}", with_causes(&other))),
    }
}

/// An error and its sources, "a: b: c": HTTP client errors keep the reason that
/// matters (an unknown certificate issuer, a refused connection) in their sources.
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
    text
}

/// One endpoint with its own HTTP client (TLS settings differ per host) and the
/// credentials it may see.
struct Endpoint {
    host: RegistryHost,
    client: Client,
    /// The same TLS settings, for manifest fetches (streamed with a size cap).
    http: reqwest::Client,
    auth: OciAuth,
    /// Credentials were given but are not sent to this host.
    withheld: bool,
    /// The bearer token of the first manifest fetch (None: none needed), reused for
    /// the pull's other manifests: `Client::auth` asks the token server every time.
    token: tokio::sync::Mutex<Option<Option<String>>>,
}

/// The endpoints of one image's registry, in the order to try them.
pub(crate) struct Registry {
    endpoints: Vec<Endpoint>,
    image: ImageRef,
    /// Longest a manifest fetch from one host may take.
    manifest_deadline: Option<Duration>,
}

impl Endpoint {
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
}

fn read_cas(host: &RegistryHost) -> Result<Vec<Vec<u8>>, ImageError> {
    host.ca
        .iter()
        .map(|path| {
            std::fs::read(path).map_err(ImageError::io(format!("read CA {}", path.display())))
        })
        .collect()
}

/// A plain HTTP client with `host`'s TLS settings (as `build_client` gives oci-client).
fn build_http(host: &RegistryHost, cas: &[Vec<u8>]) -> Result<reqwest::Client, ImageError> {
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
        .build()
        .map_err(bad)
}

fn build_client(host: &RegistryHost, cas: &[Vec<u8>]) -> Result<Client, ImageError> {
    let extra = cas
        .iter()
        .map(|data| Certificate {
            encoding: CertificateEncoding::Pem,
            data: data.clone(),
        })
        .collect();
    let config = ClientConfig {
        protocol: if host.plain_http {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        accept_invalid_certificates: host.skip_verify,
        extra_root_certificates: extra,
        // Index resolution is ours (linux/amd64), see `pull`.
        platform_resolver: None,
        connect_timeout: Some(Duration::from_secs(15)),
        read_timeout: Some(Duration::from_secs(120)),
        ..ClientConfig::default()
    };
    Client::try_from(config)
        .map_err(|e| ImageError::Registry(format!("client for {}: {e}", host.host)))
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
                Ok(Endpoint {
                    client: build_client(&host, &cas)?,
                    http: build_http(&host, &cas)?,
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
            manifest_deadline: (limits.min_rate > 0).then(|| limits.window * 2),
        })
    }

    fn reference(&self, host: &str, object: &str) -> Reference {
        if object.contains(':') {
            Reference::with_digest(host.into(), self.image.repository.clone(), object.into())
        } else {
            Reference::with_tag(host.into(), self.image.repository.clone(), object.into())
        }
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
            let r = self.reference(&ep.host.host, object);
            let what = format!(
                "manifest {}:{} at {}",
                self.image.name(),
                object,
                ep.host.host
            );
            let fetch = self.get_manifest(ep, &r, object);
            let res = match self.manifest_deadline {
                Some(d) => match tokio::time::timeout(d, fetch).await {
                    Ok(res) => res,
                    Err(_) => {
                        let e = ImageError::TooSlow(format!(
                            "{what}: no complete answer within {}s",
                            d.as_secs_f64()
                        ));
                        tracing::debug!(error = %e, "manifest fetch too slow, trying next host");
                        best = Some(keep_error(best, e));
                        continue;
                    }
                },
                None => fetch.await,
            };
            match res {
                Ok(body) => return Ok(body),
                Err(e) => {
                    let e = ep.explain(e.into_image_error(&what));
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
    /// [`MAX_MANIFEST_BYTES`] (declared length or bytes received): `oci-client` would
    /// buffer the whole body first. Its token handshake is reused.
    async fn get_manifest(
        &self,
        ep: &Endpoint,
        r: &Reference,
        object: &str,
    ) -> Result<Vec<u8>, FetchError> {
        let token = {
            let mut cached = ep.token.lock().await;
            match &*cached {
                Some(token) => token.clone(),
                None => {
                    let token = ep.client.auth(r, &ep.auth, RegistryOperation::Pull).await?;
                    *cached = Some(token.clone());
                    token
                }
            }
        };
        let scheme = if ep.host.plain_http { "http" } else { "https" };
        let url = format!(
            "{scheme}://{}/v2/{}/manifests/{object}",
            ep.host.host, self.image.repository
        );
        let mut req = ep
            .http
            .get(&url)
            .header(reqwest::header::ACCEPT, MANIFEST_TYPES.join(", "));
        req = match (token.as_ref(), &ep.auth) {
            (Some(token), _) | (None, OciAuth::Bearer(token)) => req.bearer_auth(token),
            (None, OciAuth::Basic(user, pass)) => req.basic_auth(user, Some(pass)),
            (None, OciAuth::Anonymous) => req,
        };
        let mut resp = req.send().await.map_err(FetchError::Http)?;
        let status = resp.status();
        let limit = if status.is_success() {
            MAX_MANIFEST_BYTES
        } else {
            64 << 10 // an error body: enough for the OCI error envelope
        };
        if resp.content_length().is_some_and(|n| n > limit as u64) && status.is_success() {
            return Err(FetchError::TooLarge(resp.content_length().unwrap_or(0)));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(FetchError::Http)? {
            if body.len() + chunk.len() > limit {
                if status.is_success() {
                    return Err(FetchError::TooLarge((body.len() + chunk.len()) as u64));
                }
                body.extend_from_slice(&chunk[..limit - body.len()]);
                break;
            }
            body.extend_from_slice(&chunk);
        }
        if status == reqwest::StatusCode::OK {
            return Ok(body);
        }
        let url = url.clone();
        Err(FetchError::Oci(match status {
            reqwest::StatusCode::UNAUTHORIZED => OciDistributionError::UnauthorizedError { url },
            s if s.is_client_error() => match serde_json::from_slice::<OciEnvelope>(&body) {
                Ok(envelope) => OciDistributionError::RegistryError { envelope, url },
                Err(_) => OciDistributionError::ServerError {
                    code: s.as_u16(),
                    url,
                    message: String::from_utf8_lossy(&body).into_owned(),
                },
            },
            s => OciDistributionError::ServerError {
                code: s.as_u16(),
                url,
                message: String::from_utf8_lossy(&body).into_owned(),
            },
        }))
    }

    /// Opens a stream of the blob `digest` from the first host that serves it.
    pub(crate) async fn blob_stream(
        &self,
        digest: &str,
        size: i64,
        media_type: &str,
    ) -> Result<BlobStream, ImageError> {
        let desc = OciDescriptor {
            media_type: media_type.to_owned(),
            digest: digest.to_owned(),
            size,
            ..Default::default()
        };
        let mut best: Option<ImageError> = None;
        for ep in self.endpoints.iter().filter(|e| e.host.pull) {
            let r = self.reference(&ep.host.host, digest);
            let what = format!("blob {digest} of {} at {}", self.image.name(), ep.host.host);
            // Token handshakes happen on manifest fetches; a mirror only used for
            // blobs still needs the credentials registered.
            ep.client
                .store_auth_if_needed(r.resolve_registry(), &ep.auth)
                .await;
            match ep.client.pull_blob_stream(&r, &desc).await {
                Ok(s) => return Ok(s.stream),
                Err(e) => {
                    let e = ep.explain(map_oci_error(e, &what));
                    tracing::debug!(error = %e, "blob fetch failed, trying next host");
                    best = Some(keep_error(best, e));
                }
            }
        }
        Err(best.unwrap_or_else(|| {
            ImageError::Registry(format!("no host can serve blobs of {}", self.image.name()))
        }))
    }
}

/// Why one manifest fetch failed.
enum FetchError {
    Oci(OciDistributionError),
    Http(reqwest::Error),
    /// Bytes declared or received so far.
    TooLarge(u64),
}

impl From<OciDistributionError> for FetchError {
    fn from(e: OciDistributionError) -> Self {
        FetchError::Oci(e)
    }
}

impl FetchError {
    fn into_image_error(self, what: &str) -> ImageError {
        match self {
            FetchError::Oci(e) => map_oci_error(e, what),
            FetchError::Http(e) => ImageError::Registry(format!("{what}: {}", with_causes(&e))),
            FetchError::TooLarge(n) => ImageError::Registry(format!(
                "{what}: manifest too large ({n} bytes or more, limit {MAX_MANIFEST_BYTES})"
            )),
        }
    }
}

/// Recognizes the digest failure `oci-client`'s verifying stream reports.
pub(crate) fn stream_digest_error(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<DigestError>())
        .is_some_and(|d| matches!(d, DigestError::VerificationError { .. }))
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
