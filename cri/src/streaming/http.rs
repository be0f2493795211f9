//! The HTTP side: accept (plain or TLS), take the token from the path, choose the
//! transport from the upgrade headers, answer 101 and hand the upgraded connection
//! to `spdy` or `ws`. Anything else gets a plain HTTP error.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;
use vessel_streamproto::k8s;
use vessel_streamproto::spdy::{self, session};

use super::StreamingServer;

/// Time a client has to send its request line and headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

pub fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| {
            format!(
                "streaming.tls_cert_file {}: no PEM certificates",
                cert.display()
            )
        })?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| {
        format!(
            "streaming.tls_key_file {}: no PEM private key",
            key.display()
        )
    })?;
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("streaming TLS certificate and key do not form a usable pair")?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

pub async fn serve(server: Arc<StreamingServer>, listener: TcpListener, tls: Option<TlsAcceptor>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "streaming accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let server = server.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => connection(server, TokioIo::new(s)).await,
                        _ => tracing::debug!(%peer, "streaming TLS handshake failed"),
                    }
                }
                None => connection(server, TokioIo::new(tcp)).await,
            }
        });
    }
}

async fn connection<IO>(server: Arc<StreamingServer>, io: IO)
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let server = server.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(server, req)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(64 * 1024)
        .serve_connection(io, svc)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "streaming connection ended");
    }
}

fn reply(code: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{msg}\n"))));
    *r.status_mut() = code;
    r
}

fn header_values<'a>(req: &'a Request<Incoming>, name: &str) -> Vec<&'a str> {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect()
}

fn handle(server: Arc<StreamingServer>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().trim_start_matches('/').to_owned();
    let Some((kind, token)) = path.split_once('/') else {
        return reply(StatusCode::NOT_FOUND, "not found");
    };
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let transport = if upgrade == spdy::UPGRADE.to_ascii_lowercase() {
        Transport::Spdy
    } else if upgrade == "websocket" {
        Transport::WebSocket
    } else {
        return reply(
            StatusCode::BAD_REQUEST,
            "streaming requests must upgrade to SPDY/3.1 or websocket",
        );
    };
    // Choose the subprotocol before spending the token, so a client can retry with
    // other offers.
    let is_pf = kind == "portforward";
    let protocol = match transport {
        Transport::Spdy => {
            let offers = header_values(&req, k8s::PROTOCOL_HEADER);
            let supported: &[&'static str] = if is_pf {
                &[k8s::SPDY_PORT_FORWARD_PROTOCOL]
            } else {
                k8s::SPDY_EXEC_PROTOCOLS
            };
            match k8s::negotiate(offers.iter().copied(), supported) {
                Some(p) => p,
                // An old client offering nothing gets the first protocol version.
                None if offers.is_empty() => supported[supported.len() - 1],
                None => {
                    return reply(
                        StatusCode::FORBIDDEN,
                        &format!(
                            "none of the offered protocols is supported; use one of {supported:?}"
                        ),
                    )
                }
            }
        }
        Transport::WebSocket => {
            let offers = header_values(&req, "sec-websocket-protocol");
            let supported = if is_pf {
                k8s::WS_PORT_FORWARD_PROTOCOLS
            } else {
                k8s::WS_EXEC_PROTOCOLS
            };
            match k8s::negotiate(offers.iter().copied(), supported) {
                Some(p) => p,
                None => {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        &format!("Sec-WebSocket-Protocol must offer one of {supported:?}"),
                    )
                }
            }
        }
    };
    let ws_key = req
        .headers()
        .get("sec-websocket-key")
        .map(|k| k.as_bytes().to_vec());
    if transport == Transport::WebSocket && ws_key.is_none() {
        return reply(StatusCode::BAD_REQUEST, "Sec-WebSocket-Key is missing");
    }
    const UNKNOWN_TOKEN: &str =
        "unknown or expired streaming token; call Exec/Attach/PortForward again";
    // The limits are per pod, so look at the token first, but spend it only once
    // the session may start: a refused client can retry the same URL.
    let Some(pod) = server.tokens.peek(token, |t| t.pod.clone()) else {
        return reply(StatusCode::NOT_FOUND, UNKNOWN_TOKEN);
    };
    // Held by the session until it ends.
    let permit = match server.sessions.acquire(&pod) {
        Ok(p) => p,
        Err(refused) => {
            tracing::info!(pod = %pod, reason = refused.reason(), "streaming session refused");
            let mut r = reply(StatusCode::TOO_MANY_REQUESTS, &refused.to_string());
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            return r;
        }
    };
    let Some(super::Ticket { pending, .. }) = server.tokens.take(token) else {
        return reply(StatusCode::NOT_FOUND, UNKNOWN_TOKEN);
    };
    if pending.path() != kind {
        return reply(
            StatusCode::NOT_FOUND,
            "streaming token is for another request kind",
        );
    }
    let ports_query = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.strip_prefix("port="))
        .flat_map(|v| v.split(','))
        .filter_map(|p| p.parse().ok())
        .take(64)
        .collect::<Vec<u16>>();
    let upgraded = hyper::upgrade::on(req);
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("Upgrade"),
    );
    match transport {
        Transport::Spdy => {
            h.insert(
                header::UPGRADE,
                header::HeaderValue::from_static(spdy::UPGRADE),
            );
            h.insert(
                k8s::PROTOCOL_HEADER,
                header::HeaderValue::from_static(protocol),
            );
        }
        Transport::WebSocket => {
            h.insert(
                header::UPGRADE,
                header::HeaderValue::from_static("websocket"),
            );
            let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(
                ws_key.as_deref().unwrap_or_default(),
            );
            if let Ok(v) = header::HeaderValue::from_str(&accept) {
                h.insert("sec-websocket-accept", v);
            }
            h.insert(
                "sec-websocket-protocol",
                header::HeaderValue::from_static(protocol),
            );
        }
    }
    tokio::spawn(async move {
        let _permit = permit;
        let io = match upgraded.await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                tracing::debug!(error = %e, "streaming upgrade failed");
                return;
            }
        };
        match transport {
            Transport::Spdy => {
                let (session, incoming) =
                    session::Session::start(io, session::Role::Server, Default::default());
                super::spdy::serve(server, pending, protocol, session, incoming).await;
            }
            Transport::WebSocket => {
                super::ws::serve(server, pending, protocol, io, ports_query).await;
            }
        }
    });
    resp
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    Spdy,
    WebSocket,
}
