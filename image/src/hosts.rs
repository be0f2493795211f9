//! Registry host configuration in containerd's `hosts.toml` format.
//!
//! `<certs_dir>/<registry>/hosts.toml` (else `<certs_dir>/_default/hosts.toml`) lists
//! mirrors as `[host."<url>"]` tables, tried in file order, and the upstream as
//! `server = "<url>"`, tried last. A `http://` URL means plain HTTP.
//!
//! Pull credentials go to the `server` (the registry they were given for) when it is
//! reached over HTTPS, and to no other host unless its table says
//! `send_credentials = true` (which also allows them over plain HTTP).
//!
//! A host's redirects and token realm are not followed to loopback, link-local or
//! cloud metadata addresses unless its table (or the top level, for the `server`)
//! says `local = true`: the registry is then trusted to point vesseld at services
//! of the host's own network namespace. The configured host itself is always reached.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ImageError;

/// One endpoint to talk to for a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryHost {
    /// Plain HTTP instead of HTTPS.
    pub plain_http: bool,
    /// `host[:port]` to connect to.
    pub host: String,
    /// May serve blobs.
    pub pull: bool,
    /// May resolve tags to manifests.
    pub resolve: bool,
    /// Accept any TLS certificate.
    pub skip_verify: bool,
    /// Extra CA certificates (PEM files) to trust.
    pub ca: Vec<PathBuf>,
    /// Receives the pull's credentials (see [`RegistryHost::gets_credentials`]).
    pub send_credentials: bool,
    /// The registry itself (the `server`), not a mirror.
    pub upstream: bool,
    /// May send vesseld to local addresses (`local = true`, see the module docs).
    pub local: bool,
}

impl RegistryHost {
    fn upstream(registry: &str) -> Self {
        // Docker Hub's API is not served on the name images use.
        let host = if registry == "docker.io" {
            "registry-1.docker.io".to_owned()
        } else {
            registry.to_owned()
        };
        RegistryHost {
            plain_http: false,
            host,
            pull: true,
            resolve: true,
            skip_verify: false,
            ca: Vec::new(),
            send_credentials: false,
            upstream: true,
            local: false,
        }
    }

    /// Whether the pull's credentials may be sent to this host: explicitly allowed
    /// (`send_credentials = true`), or the registry itself over HTTPS. A mirror is a
    /// different party, and plain HTTP shows them to the network.
    pub fn gets_credentials(&self) -> bool {
        self.send_credentials || (self.upstream && !self.plain_http)
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HostFields {
    capabilities: Option<Vec<String>>,
    skip_verify: Option<bool>,
    ca: Option<OneOrMany>,
    override_path: Option<bool>,
    send_credentials: Option<bool>,
    local: Option<bool>,
    // Accepted for compatibility, not supported.
    #[serde(rename = "client")]
    _client: Option<toml::Value>,
    #[serde(rename = "header")]
    _header: Option<toml::Value>,
    #[serde(rename = "dial_timeout")]
    _dial_timeout: Option<toml::Value>,
}

#[derive(Deserialize, Default)]
struct HostsFile {
    server: Option<String>,
    #[serde(flatten)]
    fields: HostFieldsLoose,
    #[serde(default)]
    host: toml::Table,
}

/// The server's own settings sit at the top level next to `server`/`host`.
#[derive(Deserialize, Default)]
struct HostFieldsLoose {
    capabilities: Option<Vec<String>>,
    skip_verify: Option<bool>,
    ca: Option<OneOrMany>,
    send_credentials: Option<bool>,
    local: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn paths(self, base: &Path) -> Vec<PathBuf> {
        let v = match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        };
        v.into_iter().map(|p| base.join(p)).collect()
    }
}

fn bad(path: &Path, reason: impl std::fmt::Display) -> ImageError {
    ImageError::Registry(format!("invalid hosts config {}: {reason}", path.display()))
}

/// Splits a host URL into (plain_http, host). Only the registry root (or `/v2`) is
/// supported as path: the client always talks to `<host>/v2/`.
fn parse_url(url: &str, file: &Path, override_path: bool) -> Result<(bool, String), ImageError> {
    let (plain_http, rest) = if let Some(r) = url.strip_prefix("http://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("https://") {
        (false, r)
    } else if url.contains("://") {
        return Err(bad(file, format!("unsupported scheme in {url:?}")));
    } else {
        (false, url)
    };
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let path = path.trim_end_matches('/');
    if host.is_empty() || !(path.is_empty() || path == "/v2") || override_path {
        return Err(bad(
            file,
            format!("unsupported host url {url:?} (only a host root)"),
        ));
    }
    Ok((plain_http, host.to_owned()))
}

fn capabilities(caps: Option<Vec<String>>, file: &Path) -> Result<(bool, bool), ImageError> {
    let Some(caps) = caps else {
        return Ok((true, true));
    };
    let (mut pull, mut resolve) = (false, false);
    for c in caps {
        match c.as_str() {
            "pull" => pull = true,
            "resolve" => resolve = true,
            "push" => {}
            other => return Err(bad(file, format!("unknown capability {other:?}"))),
        }
    }
    Ok((pull, resolve))
}

/// Parses one `hosts.toml` for `registry`. `file` names it in errors and its directory
/// anchors relative `ca` paths. Returns the mirrors in order, then the upstream.
pub fn parse_hosts_toml(
    text: &str,
    file: &Path,
    registry: &str,
) -> Result<Vec<RegistryHost>, ImageError> {
    let parsed: HostsFile = toml::from_str(text).map_err(|e| bad(file, e))?;
    let base = file.parent().unwrap_or(Path::new("/"));
    let mut hosts = Vec::new();
    for (url, value) in parsed.host {
        let fields: HostFields = value
            .try_into()
            .map_err(|e| bad(file, format!("host {url:?}: {e}")))?;
        let (plain_http, host) = parse_url(&url, file, fields.override_path.unwrap_or(false))?;
        let (pull, resolve) = capabilities(fields.capabilities, file)?;
        hosts.push(RegistryHost {
            plain_http,
            host,
            pull,
            resolve,
            skip_verify: fields.skip_verify.unwrap_or(false),
            ca: fields.ca.map(|c| c.paths(base)).unwrap_or_default(),
            send_credentials: fields.send_credentials.unwrap_or(false),
            upstream: false,
            local: fields.local.unwrap_or(false),
        });
    }
    let mut upstream = RegistryHost::upstream(registry);
    if let Some(server) = &parsed.server {
        let (plain_http, host) = parse_url(server, file, false)?;
        upstream.plain_http = plain_http;
        upstream.host = host;
    }
    let (pull, resolve) = capabilities(parsed.fields.capabilities, file)?;
    upstream.pull = pull;
    upstream.resolve = resolve;
    upstream.skip_verify = parsed.fields.skip_verify.unwrap_or(false);
    upstream.ca = parsed.fields.ca.map(|c| c.paths(base)).unwrap_or_default();
    upstream.send_credentials = parsed.fields.send_credentials.unwrap_or(false);
    upstream.local = parsed.fields.local.unwrap_or(false);
    hosts.push(upstream);
    Ok(hosts)
}

/// The endpoints to use for `registry`, per `certs_dir`: its own `hosts.toml`, else
/// `_default/hosts.toml`, else the registry itself over HTTPS (with any `*.crt` in
/// `<certs_dir>/<registry>/` trusted, as containerd does).
pub fn load_hosts(certs_dir: &Path, registry: &str) -> Result<Vec<RegistryHost>, ImageError> {
    let dir = certs_dir.join(registry);
    for file in [
        dir.join("hosts.toml"),
        certs_dir.join("_default/hosts.toml"),
    ] {
        match std::fs::read_to_string(&file) {
            Ok(text) => return parse_hosts_toml(&text, &file, registry),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ImageError::io(format!("read {}", file.display()))(e)),
        }
    }
    let mut upstream = RegistryHost::upstream(registry);
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut ca: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "crt"))
            .collect();
        ca.sort();
        upstream.ca = ca;
    }
    Ok(vec![upstream])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, registry: &str) -> Result<Vec<RegistryHost>, ImageError> {
        parse_hosts_toml(
            text,
            Path::new("/etc/vessel/certs.d/x/hosts.toml"),
            registry,
        )
    }

    #[test]
    fn mirrors_in_file_order_then_server() {
        let hosts = parse(
            r#"
server = "https://registry-1.docker.io"

[host."http://127.0.0.1:5000"]
  capabilities = ["pull", "resolve"]

[host."https://mirror.example:8443/v2"]
  capabilities = ["pull"]
  skip_verify = true
  ca = ["ca1.pem", "/abs/ca2.pem"]

[host."a.mirror.example"]
  ca = "only.pem"
"#,
            "docker.io",
        )
        .unwrap();
        assert_eq!(hosts.len(), 4);
        assert_eq!(
            hosts[0],
            RegistryHost {
                plain_http: true,
                host: "127.0.0.1:5000".into(),
                pull: true,
                resolve: true,
                skip_verify: false,
                ca: vec![],
                send_credentials: false,
                upstream: false,
                local: false,
            }
        );
        assert!(!hosts[1].plain_http);
        assert_eq!(hosts[1].host, "mirror.example:8443");
        assert!(hosts[1].pull && !hosts[1].resolve && hosts[1].skip_verify);
        assert_eq!(
            hosts[1].ca,
            vec![
                PathBuf::from("/etc/vessel/certs.d/x/ca1.pem"),
                PathBuf::from("/abs/ca2.pem")
            ]
        );
        assert_eq!(hosts[2].host, "a.mirror.example");
        assert!(!hosts[2].plain_http, "no scheme means https");
        assert_eq!(
            hosts[2].ca,
            vec![PathBuf::from("/etc/vessel/certs.d/x/only.pem")]
        );
        assert_eq!(hosts[3].host, "registry-1.docker.io");
        assert!(hosts[3].pull && hosts[3].resolve);
    }

    #[test]
    fn server_defaults_and_top_level_settings() {
        let hosts = parse("", "docker.io").unwrap();
        assert_eq!(hosts, vec![RegistryHost::upstream("docker.io")]);
        assert_eq!(hosts[0].host, "registry-1.docker.io");

        let hosts = parse(
            "server = \"http://reg.local:5000\"\nskip_verify = true\ncapabilities = [\"pull\"]\n",
            "reg.local:5000",
        )
        .unwrap();
        assert_eq!(hosts.len(), 1);
        assert!(hosts[0].plain_http && hosts[0].skip_verify && hosts[0].pull);
        assert!(!hosts[0].resolve);
        assert_eq!(hosts[0].host, "reg.local:5000");
    }

    #[test]
    fn credentials_go_to_the_https_server_and_opted_in_hosts() {
        let hosts = parse(
            r#"
server = "https://reg.example"

[host."https://mirror.example"]

[host."http://plain-mirror.example"]

[host."https://trusted-mirror.example"]
  send_credentials = true

[host."http://trusted-plain.example"]
  send_credentials = true
"#,
            "reg.example",
        )
        .unwrap();
        let gets: Vec<(&str, bool)> = hosts
            .iter()
            .map(|h| (h.host.as_str(), h.gets_credentials()))
            .collect();
        assert_eq!(
            gets,
            vec![
                ("mirror.example", false),
                ("plain-mirror.example", false),
                ("trusted-mirror.example", true),
                ("trusted-plain.example", true),
                ("reg.example", true),
            ]
        );
        // The registry itself over plain HTTP only when allowed.
        let plain = parse("server = \"http://reg.local:5000\"\n", "reg.local:5000").unwrap();
        assert!(!plain[0].gets_credentials());
        let plain = parse(
            "server = \"http://reg.local:5000\"\nsend_credentials = true\n",
            "reg.local:5000",
        )
        .unwrap();
        assert!(plain[0].gets_credentials());
        // No hosts.toml: the registry over HTTPS.
        assert!(RegistryHost::upstream("quay.io").gets_credentials());
    }

    #[test]
    fn local_is_per_host_and_off_by_default() {
        let hosts = parse(
            r#"
server = "http://127.0.0.1:5000"
local = true

[host."http://127.0.0.1:5001"]

[host."http://10.0.0.7:5000"]
  local = true
"#,
            "127.0.0.1:5000",
        )
        .unwrap();
        let local: Vec<(&str, bool)> = hosts.iter().map(|h| (h.host.as_str(), h.local)).collect();
        assert_eq!(
            local,
            vec![
                ("127.0.0.1:5001", false),
                ("10.0.0.7:5000", true),
                ("127.0.0.1:5000", true),
            ]
        );
        assert!(!parse("", "docker.io").unwrap()[0].local);
        assert!(parse("[host.\"https://m.example\"]\nlocal = \"yes\"\n", "x").is_err());
    }

    #[test]
    fn rejects_malformed_configs() {
        for bad_cfg in [
            "server = ",
            "server = \"ftp://x\"",
            "[host.\"https://m.example/prefix\"]\n",
            "[host.\"https://m.example\"]\ncapabilities = [\"fly\"]\n",
            "[host.\"https://m.example\"]\nbogus = 1\n",
            "[host.\"https://m.example\"]\noverride_path = true\n",
        ] {
            assert!(parse(bad_cfg, "docker.io").is_err(), "{bad_cfg}");
        }
    }

    #[test]
    fn load_prefers_registry_dir_then_default() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path();
        // Nothing configured: upstream over https.
        assert_eq!(
            load_hosts(certs, "quay.io").unwrap(),
            vec![RegistryHost::upstream("quay.io")]
        );
        std::fs::create_dir_all(certs.join("_default")).unwrap();
        std::fs::write(
            certs.join("_default/hosts.toml"),
            "[host.\"http://127.0.0.1:1\"]\n",
        )
        .unwrap();
        let hosts = load_hosts(certs, "quay.io").unwrap();
        assert_eq!(hosts.len(), 2);
        assert_eq!(hosts[0].host, "127.0.0.1:1");
        assert_eq!(hosts[1].host, "quay.io");

        std::fs::create_dir_all(certs.join("quay.io")).unwrap();
        std::fs::write(
            certs.join("quay.io/hosts.toml"),
            "server = \"http://127.0.0.1:2\"\n",
        )
        .unwrap();
        let hosts = load_hosts(certs, "quay.io").unwrap();
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[0].host, "127.0.0.1:2");

        // A registry dir with only certificates trusts them.
        std::fs::create_dir_all(certs.join("reg.example")).unwrap();
        std::fs::write(certs.join("reg.example/ca.crt"), "x").unwrap();
        std::fs::remove_file(certs.join("_default/hosts.toml")).unwrap();
        let hosts = load_hosts(certs, "reg.example").unwrap();
        assert_eq!(hosts[0].ca, vec![certs.join("reg.example/ca.crt")]);
    }
}
