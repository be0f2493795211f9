//! Clients of vesseld's streaming server for the tests: SPDY/3.1 (the kubelet's
//! transport, through the shared `vessel-streamproto` framing) and WebSocket
//! (tokio-tungstenite), for exec/attach and port-forward.

use anyhow::{bail, Context as _};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message;
use vessel_streamproto::k8s::{self, channel, Status, TerminalSize};
use vessel_streamproto::spdy::session::{Limits, Role, Session, Stream};
use vessel_streamproto::spdy::Headers;

/// (host:port, path) of an http:// URL.
fn split_url(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("not an http URL: {url}"))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    Ok((host.to_owned(), format!("/{path}")))
}

/// Upgrades to SPDY offering `protocols`; the session and the protocol chosen.
pub async fn spdy_connect(url: &str, protocols: &[&str]) -> anyhow::Result<(Session, String)> {
    let (host, path) = split_url(url)?;
    let mut tcp = TcpStream::connect(&host).await?;
    tcp.set_nodelay(true)?;
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
    );
    for p in protocols {
        req.push_str(&format!("{}: {p}\r\n", k8s::PROTOCOL_HEADER));
    }
    req.push_str("Content-Length: 0\r\n\r\n");
    tcp.write_all(req.as_bytes()).await?;
    // Read the response head byte by byte: what follows it is SPDY.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let b = tcp.read_u8().await.context("response head")?;
        head.push(b);
        if head.len() > 16 * 1024 {
            bail!("response head too long");
        }
    }
    let head = String::from_utf8_lossy(&head).to_string();
    if !head.starts_with("HTTP/1.1 101") {
        bail!("no upgrade: {head}");
    }
    let chosen = head
        .lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(k8s::PROTOCOL_HEADER)
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    let (session, _) = Session::start(tcp, Role::Client, Limits::default());
    Ok((session, chosen))
}

/// What an exec/attach client collected.
#[derive(Debug, Default)]
pub struct ExecOutcome {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The v4 status from the error stream/channel (None: none came).
    pub status: Option<Status>,
}

impl ExecOutcome {
    pub fn exit_code(&self) -> Option<i32> {
        self.status.as_ref().and_then(Status::code)
    }
}

/// What to send during an exec.
#[derive(Debug, Clone, Default)]
pub struct ExecInput {
    pub stdin: Option<Vec<u8>>,
    /// Keep stdin open (no EOF) after sending it.
    pub keep_stdin_open: bool,
    pub tty: bool,
    pub resize: Option<TerminalSize>,
    pub stderr: bool,
}

async fn read_all(mut s: Stream) -> Vec<u8> {
    let mut v = Vec::new();
    while let Some(d) = s.recv().await {
        v.extend(d);
    }
    v
}

/// A whole exec/attach over SPDY v4.
pub async fn spdy_exec(url: &str, input: ExecInput) -> anyhow::Result<ExecOutcome> {
    let (session, proto) = spdy_connect(url, &["v4.channel.k8s.io"]).await?;
    if proto != "v4.channel.k8s.io" {
        bail!("server chose {proto:?}");
    }
    let open = |t: &str| session.open(Headers::new().with(k8s::STREAM_TYPE_HEADER, t));
    let error = open("error").await?;
    let stdin = match &input.stdin {
        Some(_) => Some(open("stdin").await?),
        None => None,
    };
    let stdout = open("stdout").await?;
    let stderr = match input.stderr && !input.tty {
        true => Some(open("stderr").await?),
        false => None,
    };
    if input.tty {
        let resize = open("resize").await?;
        if let Some(size) = input.resize {
            resize.send(&serde_json::to_vec(&size)?).await?;
        }
        // The stream stays open (the session's end closes it).
        std::mem::forget(resize);
    }
    if let (Some(st), Some(data)) = (stdin, input.stdin.clone()) {
        st.send(&data).await?;
        if !input.keep_stdin_open {
            st.finish().await?;
        } else {
            std::mem::forget(st);
        }
    }
    let out = tokio::spawn(read_all(stdout));
    let err = stderr.map(|s| tokio::spawn(read_all(s)));
    let status = read_all(error).await;
    let stdout = out.await?;
    let stderr = match err {
        Some(h) => h.await?,
        None => Vec::new(),
    };
    session.close().await;
    Ok(ExecOutcome {
        stdout,
        stderr,
        status: if status.is_empty() {
            None
        } else {
            Some(serde_json::from_slice(&status).context("error stream is not a Status")?)
        },
    })
}

pub type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// Upgrades to WebSocket offering `protocol`.
pub async fn ws_connect(url: &str, protocol: &str) -> anyhow::Result<Ws> {
    let (host, _) = split_url(url)?;
    let mut req = url.replacen("http://", "ws://", 1).into_client_request()?;
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", protocol.parse()?);
    let tcp = TcpStream::connect(&host).await?;
    tcp.set_nodelay(true)?;
    let (ws, resp) = tokio_tungstenite::client_async(req, tcp).await?;
    let chosen = resp
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if chosen != protocol {
        bail!("server chose {chosen:?}");
    }
    Ok(ws)
}

/// A whole exec/attach over WebSocket v5 (stdin EOF by the close signal).
pub async fn ws_exec(url: &str, input: ExecInput) -> anyhow::Result<ExecOutcome> {
    let ws = ws_connect(url, "v5.channel.k8s.io").await?;
    let (mut sink, mut source) = ws.split();
    if let Some(size) = input.resize {
        let mut m = vec![channel::RESIZE];
        m.extend(serde_json::to_vec(&size)?);
        sink.send(Message::Binary(m.into())).await?;
    }
    if let Some(data) = &input.stdin {
        for chunk in data.chunks(32 * 1024) {
            let mut m = vec![channel::STDIN];
            m.extend_from_slice(chunk);
            sink.send(Message::Binary(m.into())).await?;
        }
        if !input.keep_stdin_open {
            sink.send(Message::Binary(vec![channel::CLOSE, channel::STDIN].into()))
                .await?;
        }
    }
    let mut out = ExecOutcome::default();
    while let Some(m) = source.next().await {
        let m = match m {
            Ok(m) => m,
            Err(_) => break,
        };
        let Message::Binary(b) = m else {
            if m.is_close() {
                break;
            }
            continue;
        };
        let Some((&ch, data)) = b.split_first() else {
            continue;
        };
        match ch {
            channel::STDOUT => out.stdout.extend_from_slice(data),
            channel::STDERR => out.stderr.extend_from_slice(data),
            channel::ERROR => out.status = Some(serde_json::from_slice(data)?),
            _ => {}
        }
    }
    Ok(out)
}

/// One port-forward connection over an open SPDY session: data and error streams.
pub struct SpdyPortConn {
    pub data: Stream,
    pub error: Stream,
}

pub async fn spdy_port_conn(
    session: &Session,
    port: u16,
    request_id: u32,
) -> anyhow::Result<SpdyPortConn> {
    let h = |t: &str| {
        Headers::new()
            .with(k8s::STREAM_TYPE_HEADER, t)
            .with(k8s::PORT_HEADER, &port.to_string())
            .with(k8s::REQUEST_ID_HEADER, &request_id.to_string())
    };
    let error = session.open(h("error")).await?;
    let data = session.open(h("data")).await?;
    Ok(SpdyPortConn { data, error })
}

/// Sends `request`, half-closes, and reads the whole answer (and any error text).
pub async fn spdy_port_roundtrip(
    session: &Session,
    port: u16,
    request_id: u32,
    request: &[u8],
) -> anyhow::Result<(Vec<u8>, String)> {
    let c = spdy_port_conn(session, port, request_id).await?;
    c.data.send(request).await?;
    c.data.finish().await?;
    let answer = read_all(c.data).await;
    let err = read_all(c.error).await;
    Ok((answer, String::from_utf8_lossy(&err).into_owned()))
}
