//! A throwaway container registry: Debian's `docker-registry` (distribution v2) on
//! 127.0.0.1, with its own storage dir, killed and removed on drop.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The registry binary (Debian package `docker-registry`).
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running registry. Dropping it kills the process and removes its storage.
pub struct TestRegistry {
    child: Child,
    port: u16,
    credentials: Option<(String, String)>,
    /// Serving HTTPS with a certificate for 127.0.0.1 signed by `<dir>/ca.crt`.
    tls: bool,
    dir: tempfile::TempDir,
}

/// How to start one.
#[derive(Clone, Default)]
struct Options {
    credentials: Option<(String, String)>,
    tls: bool,
    /// Serve this storage dir (another registry's) instead of a fresh one.
    storage: Option<PathBuf>,
}

impl TestRegistry {
    /// Starts an open registry (no auth) on a free port.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_inner(Options::default())
    }

    /// Starts a registry that requires HTTP basic auth with `user`/`pass`
    /// (htpasswd, bcrypt).
    pub fn start_with_htpasswd(user: &str, pass: &str) -> anyhow::Result<Self> {
        Self::start_inner(Options {
            credentials: Some((user.to_owned(), pass.to_owned())),
            ..Options::default()
        })
    }

    /// Starts an HTTPS registry serving `plain`'s storage (push there, pull here),
    /// with a certificate for 127.0.0.1 from a CA of its own ([`Self::ca_cert`]).
    /// Needs `openssl`.
    pub fn start_tls_view_of(plain: &TestRegistry) -> anyhow::Result<Self> {
        Self::start_inner(Options {
            tls: true,
            storage: Some(plain.storage_dir()),
            ..Options::default()
        })
    }

    /// The CA certificate (PEM) that signed an HTTPS registry's certificate.
    pub fn ca_cert(&self) -> Option<PathBuf> {
        self.tls.then(|| self.dir.path().join("ca.crt"))
    }

    /// `"127.0.0.1:PORT"`, the registry host as it appears in image references.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `"http://127.0.0.1:PORT"` (`https://` for an HTTPS registry).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr())
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `(user, password)` when started with [`start_with_htpasswd`](Self::start_with_htpasswd).
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// The registry's blob storage directory.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The registry process's stdout+stderr so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    fn start_inner(opts: Options) -> anyhow::Result<Self> {
        // Another process can take the port between probing and binding: retry.
        let mut last_err = None;
        for _ in 0..3 {
            match Self::try_start(opts.clone()) {
                Ok(r) => return Ok(r),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("registry did not start")))
    }

    fn try_start(opts: Options) -> anyhow::Result<Self> {
        let Options {
            credentials,
            tls,
            storage,
        } = opts;
        let dir = tempfile::Builder::new()
            .prefix("vessel-registry-")
            .tempdir()
            .context("registry temp dir")?;
        let port = free_port()?;
        if tls {
            make_certs(dir.path())?;
        }
        let config = dir.path().join("config.yml");
        let data = storage.unwrap_or_else(|| dir.path().join("data"));
        std::fs::write(
            &config,
            config_yaml(dir.path(), &data, port, credentials.is_some(), tls),
        )?;
        if let Some((user, pass)) = &credentials {
            let hash = bcrypt::hash_with_result(pass, 4)
                .context("bcrypt")?
                .format_for_version(bcrypt::Version::TwoY);
            std::fs::write(dir.path().join("htpasswd"), format!("{user}:{hash}\n"))?;
        }
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {REGISTRY_BIN}"))?;
        let mut reg = Self {
            child,
            port,
            credentials,
            tls,
            dir,
        };
        reg.wait_ready()?;
        Ok(reg)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("docker-registry exited with {status}: {}", self.log());
            }
            // 200 when open, 401 when auth is on: either way it serves the API. An
            // HTTPS registry answers a plain request with 400.
            if matches!(http_status(self.port, "/v2/"), Ok(200 | 401 | 400)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "docker-registry not ready after {START_TIMEOUT:?}: {}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // `dir` (a TempDir) removes the storage after this.
    }
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("probe a free port")?;
    Ok(listener.local_addr()?.port())
}

fn config_yaml(dir: &Path, data: &Path, port: u16, auth: bool, tls: bool) -> String {
    let mut s = format!(
        "version: 0.1\n\
         log:\n  level: warn\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n\
         http:\n  addr: 127.0.0.1:{port}\n",
        data = data.display(),
    );
    if tls {
        s.push_str(&format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            dir.join("server.crt").display(),
            dir.join("server.key").display()
        ));
    }
    if auth {
        s.push_str(&format!(
            "auth:\n  htpasswd:\n    realm: vessel-test\n    path: {}\n",
            dir.join("htpasswd").display()
        ));
    }
    s
}

/// A CA (`ca.crt`) and a server certificate for IP 127.0.0.1 it signed
/// (`server.crt`, `server.key`), with the openssl command line tool.
fn make_certs(dir: &Path) -> anyhow::Result<()> {
    let ext = dir.join("server.ext");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let steps: [Vec<&str>; 3] = [
        [
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.crt"],
        ]
        .concat()
        .into_iter()
        .chain(["-days", "2", "-subj", "/CN=vessel-test-ca"])
        .collect(),
        [
            &["req"][..],
            &ec,
            &["-keyout", "server.key", "-out", "server.csr"],
        ]
        .concat()
        .into_iter()
        .chain(["-subj", "/CN=127.0.0.1"])
        .collect(),
        vec![
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    ];
    for args in steps {
        let out = Command::new("openssl")
            .args(&args)
            .current_dir(dir)
            .output()
            .context("run openssl")?;
        if !out.status.success() {
            bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(())
}

/// Status code of a plain `GET path` on 127.0.0.1:port (no HTTP client needed, so
/// this works outside an async runtime).
fn http_status(port: u16, path: &str) -> anyhow::Result<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    let line = std::str::from_utf8(&head)?;
    line.get(9..12)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad HTTP status line {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_answers_and_cleans_up() {
        let reg = TestRegistry::start().unwrap();
        assert_eq!(http_status(reg.port(), "/v2/").unwrap(), 200);
        assert!(reg.addr().starts_with("127.0.0.1:"));
        let dir = reg.dir.path().to_path_buf();
        let pid = reg.child.id();
        drop(reg);
        assert!(!dir.exists(), "storage dir left behind");
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "registry process not reaped"
        );
    }

    #[test]
    fn htpasswd_requires_auth() {
        let reg = TestRegistry::start_with_htpasswd("alice", "s3cret").unwrap();
        assert_eq!(http_status(reg.port(), "/v2/").unwrap(), 401);
        assert_eq!(reg.credentials(), Some(("alice", "s3cret")));
    }
}
