//! The streaming server: Exec, Attach and PortForward return a URL on it; the
//! client (the kubelet, crictl, a test) then connects there and upgrades to SPDY/3.1
//! or WebSocket. As in containerd and CRI-O it is an HTTP server of its own, apart
//! from the CRI socket. Bytes go to and from the pod VM through the agent.
//!
//! - `tokens`: the pending requests behind the URLs (single use, TTL, capped).
//! - `limits`: open sessions per pod and node, and the per-pod rate of new ones.
//! - `http`: listener (plain or TLS), routing, upgrades.
//! - `spdy`, `ws`: the two transports, each turning the wire into `io` channels.
//! - `exec`, `portforward`: the agent side of a session.

mod config;
mod exec;
mod http;
mod io;
mod limits;
mod portforward;
mod spdy;
mod tokens;
mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use k8s_cri::v1 as cri;
use tonic::Status;

pub use config::StreamingConfig;

use crate::engine::Engine;
use tokens::TokenCache;

/// A request waiting for its client.
#[derive(Debug, Clone)]
pub enum Pending {
    Exec(cri::ExecRequest),
    Attach(cri::AttachRequest),
    PortForward(cri::PortForwardRequest),
}

/// What a token names: the request and the pod it goes into (the key of the
/// per-pod session limits, known before the token is spent).
struct Ticket {
    pod: String,
    pending: Pending,
}

/// The streams an exec or attach asks for.
#[derive(Debug, Clone, Copy, Default)]
struct Wanted {
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
}

impl Pending {
    /// What an exec or attach asks for; None for a port-forward.
    fn wanted(&self) -> Option<Wanted> {
        let (stdin, stdout, stderr, tty) = match self {
            Pending::Exec(r) => (r.stdin, r.stdout, r.stderr, r.tty),
            Pending::Attach(r) => (r.stdin, r.stdout, r.stderr, r.tty),
            Pending::PortForward(_) => return None,
        };
        Some(Wanted {
            stdin,
            stdout,
            stderr,
            tty,
        })
    }

    fn path(&self) -> &'static str {
        match self {
            Pending::Exec(_) => "exec",
            Pending::Attach(_) => "attach",
            Pending::PortForward(_) => "portforward",
        }
    }
}

/// Shared by the CRI handlers (which add tokens) and the HTTP side (which takes them).
pub struct StreamingServer {
    config: StreamingConfig,
    engine: Arc<Engine>,
    tokens: TokenCache<Ticket>,
    base_url: String,
    sessions: Arc<limits::SessionLimits>,
}

impl StreamingServer {
    /// Binds the listener and starts serving in the background.
    pub async fn start(config: StreamingConfig, engine: Arc<Engine>) -> anyhow::Result<Arc<Self>> {
        let ip: std::net::IpAddr = config
            .address
            .parse()
            .context("streaming.address is not an IP address")?;
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, config.port))
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {}:{} for streaming ([streaming] address/port)",
                    config.address, config.port
                )
            })?;
        let addr = listener.local_addr()?;
        let tls = match (&config.tls_cert_file, &config.tls_key_file) {
            (Some(cert), Some(key)) => Some(http::tls_acceptor(cert, key)?),
            _ => None,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let server = Arc::new(Self {
            tokens: TokenCache::new(Duration::from_secs(config.token_ttl_s), config.max_pending),
            sessions: limits::SessionLimits::new(&config),
            base_url: format!("{scheme}://{addr}"),
            config,
            engine,
        });
        tracing::info!(url = %server.base_url, "streaming server listening");
        tokio::spawn(http::serve(server.clone(), listener, tls));
        Ok(server)
    }

    fn url_for(&self, pod: String, pending: Pending) -> Result<String, Status> {
        let path = pending.path();
        let token = self
            .tokens
            .insert(Ticket { pod, pending })
            .map_err(|e| Status::resource_exhausted(e.to_string()))?;
        Ok(format!("{}/{path}/{token}", self.base_url))
    }

    pub fn exec(&self, req: cri::ExecRequest) -> Result<cri::ExecResponse, Status> {
        if req.cmd.first().is_none_or(|p| p.is_empty()) {
            return Err(Status::invalid_argument(
                "Exec: cmd is empty (its first element names the program to run)",
            ));
        }
        if !(req.stdin || req.stdout || req.stderr) {
            return Err(Status::invalid_argument(
                "Exec: one of stdin, stdout or stderr must be set",
            ));
        }
        if req.tty && req.stderr {
            return Err(Status::invalid_argument(
                "Exec: tty and stderr cannot both be set (a terminal has one output)",
            ));
        }
        let (c, _) = exec::check_container(&self.engine, &req.container_id)?;
        Ok(cri::ExecResponse {
            url: self.url_for(c.pod_id, Pending::Exec(req))?,
        })
    }

    pub fn attach(&self, req: cri::AttachRequest) -> Result<cri::AttachResponse, Status> {
        if !(req.stdin || req.stdout || req.stderr) {
            return Err(Status::invalid_argument(
                "Attach: one of stdin, stdout or stderr must be set",
            ));
        }
        let (c, _) = exec::check_container(&self.engine, &req.container_id)?;
        Ok(cri::AttachResponse {
            url: self.url_for(c.pod_id, Pending::Attach(req))?,
        })
    }

    pub fn port_forward(
        &self,
        req: cri::PortForwardRequest,
    ) -> Result<cri::PortForwardResponse, Status> {
        if let Some(p) = req.port.iter().find(|p| !(1..=65535).contains(*p)) {
            return Err(Status::invalid_argument(format!(
                "PortForward: port {p} is not a TCP port"
            )));
        }
        portforward::check_pod(&self.engine, &req.pod_sandbox_id)?;
        Ok(cri::PortForwardResponse {
            url: self.url_for(req.pod_sandbox_id.clone(), Pending::PortForward(req))?,
        })
    }
}
