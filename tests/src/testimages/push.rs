//! Minimal distribution-API client: blob uploads and manifest puts over plain HTTP.

use anyhow::{bail, Context};
use reqwest::{header, Client, StatusCode};

use super::layer::sha256_digest;

/// Where to push: a registry address and optional basic-auth credentials.
#[derive(Debug, Clone)]
pub struct Target {
    /// `"127.0.0.1:PORT"`.
    pub addr: String,
    /// `(user, password)` for htpasswd registries.
    pub auth: Option<(String, String)>,
}

impl From<&str> for Target {
    fn from(addr: &str) -> Self {
        Self {
            addr: addr.to_owned(),
            auth: None,
        }
    }
}

impl From<&String> for Target {
    fn from(addr: &String) -> Self {
        Self::from(addr.as_str())
    }
}

impl From<String> for Target {
    fn from(addr: String) -> Self {
        Self { addr, auth: None }
    }
}

impl From<&crate::registry::TestRegistry> for Target {
    fn from(reg: &crate::registry::TestRegistry) -> Self {
        Self {
            addr: reg.addr(),
            auth: reg.credentials().map(|(u, p)| (u.to_owned(), p.to_owned())),
        }
    }
}

/// One repository on one registry.
pub(crate) struct Repo {
    http: Client,
    target: Target,
    name: String,
}

impl Repo {
    pub(crate) fn new(target: Target, name: &str) -> Self {
        Self {
            http: Client::new(),
            target,
            name: name.to_owned(),
        }
    }

    fn url(&self, rest: &str) -> String {
        format!("http://{}/v2/{}/{rest}", self.target.addr, self.name)
    }

    fn req(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, url);
        match &self.target.auth {
            Some((u, p)) => rb.basic_auth(u, Some(p)),
            None => rb,
        }
    }

    /// Uploads a blob (POST then PUT, the two-step monolithic upload) unless present.
    pub(crate) async fn put_blob(&self, data: &[u8]) -> anyhow::Result<String> {
        let digest = sha256_digest(data);
        let head = self
            .req(reqwest::Method::HEAD, &self.url(&format!("blobs/{digest}")))
            .send()
            .await?;
        if head.status() == StatusCode::OK {
            return Ok(digest);
        }
        let start = self
            .req(reqwest::Method::POST, &self.url("blobs/uploads/"))
            .send()
            .await?;
        let start = ok_or_body(start, StatusCode::ACCEPTED, "start blob upload").await?;
        let location = start
            .headers()
            .get(header::LOCATION)
            .context("upload without Location")?
            .to_str()?
            .to_owned();
        let mut url = if location.starts_with('/') {
            format!("http://{}{location}", self.target.addr)
        } else {
            location
        };
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str("digest=");
        url.push_str(&digest);
        let put = self
            .req(reqwest::Method::PUT, &url)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, data.len())
            .body(data.to_vec())
            .send()
            .await?;
        ok_or_body(put, StatusCode::CREATED, "finish blob upload").await?;
        Ok(digest)
    }

    /// Puts a manifest (or index) under `reference` (a tag or its digest).
    pub(crate) async fn put_manifest(
        &self,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> anyhow::Result<String> {
        let digest = sha256_digest(body);
        let resp = self
            .req(
                reqwest::Method::PUT,
                &self.url(&format!("manifests/{reference}")),
            )
            .header(header::CONTENT_TYPE, media_type)
            .body(body.to_vec())
            .send()
            .await?;
        let resp = ok_or_body(resp, StatusCode::CREATED, "put manifest").await?;
        if let Some(d) = resp.headers().get("docker-content-digest") {
            if d.to_str()? != digest {
                bail!("registry computed digest {d:?}, expected {digest}");
            }
        }
        Ok(digest)
    }

    /// Gets a manifest: `(media type, body)`.
    pub(crate) async fn get_manifest(&self, reference: &str) -> anyhow::Result<(String, Vec<u8>)> {
        let accept = [
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
        ]
        .join(", ");
        let resp = self
            .req(
                reqwest::Method::GET,
                &self.url(&format!("manifests/{reference}")),
            )
            .header(header::ACCEPT, accept)
            .send()
            .await?;
        let resp = ok_or_body(resp, StatusCode::OK, "get manifest").await?;
        let mt = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or_default().to_owned())
            .unwrap_or_default();
        Ok((mt, resp.bytes().await?.to_vec()))
    }

    /// Gets a blob.
    pub(crate) async fn get_blob(&self, digest: &str) -> anyhow::Result<Vec<u8>> {
        let resp = self
            .req(reqwest::Method::GET, &self.url(&format!("blobs/{digest}")))
            .send()
            .await?;
        let resp = ok_or_body(resp, StatusCode::OK, "get blob").await?;
        Ok(resp.bytes().await?.to_vec())
    }
}

async fn ok_or_body(
    resp: reqwest::Response,
    want: StatusCode,
    what: &str,
) -> anyhow::Result<reqwest::Response> {
    if resp.status() == want {
        return Ok(resp);
    }
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    bail!("{what}: HTTP {status}: {body}")
}
