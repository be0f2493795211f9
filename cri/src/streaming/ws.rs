//! The WebSocket transport: binary messages whose first byte is the channel
//! (`k8s::channel`). Exec/attach use channels 0-4 (v5 adds 255, the close signal);
//! port-forward uses a data and an error channel per requested port, each opened by
//! a server message holding the port (little-endian).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use k8s_cri::v1 as cri;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use vessel_streamproto::k8s::{self, channel};

use super::io::{ExecIo, PortForwardConn, QUEUE};
use super::{exec, portforward, Pending, StreamingServer};

/// Largest message accepted from the client.
const MAX_MESSAGE: usize = 1 << 20;

pub async fn serve<IO>(
    server: Arc<StreamingServer>,
    pending: Pending,
    protocol: &'static str,
    io: IO,
    ports_query: Vec<u16>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
    let (mut sink, mut source) = ws.split();
    // Everything outbound goes through one queue: (channel, bytes), None = close.
    let (out_tx, mut out_rx) = mpsc::channel::<Option<(u8, Vec<u8>)>>(QUEUE);
    let (gone_tx, gone) = watch::channel(false);
    let idle = Duration::from_secs(server.config.idle_timeout_s);
    let writer = tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            let Some((ch, data)) = m else {
                // A normal-closure code: Go clients read a bare close as an error.
                let frame = CloseFrame {
                    code: CloseCode::Normal,
                    reason: Default::default(),
                };
                let _ = sink.send(Message::Close(Some(frame))).await;
                break;
            };
            let mut frame = Vec::with_capacity(data.len() + 1);
            frame.push(ch);
            frame.extend_from_slice(&data);
            if sink
                .send(Message::Binary(Bytes::from(frame)))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    // Inbound: (channel, bytes) to whoever serves the channel.
    let (in_tx, mut in_rx) = mpsc::channel::<(u8, Vec<u8>)>(QUEUE);
    let reader = tokio::spawn(async move {
        loop {
            let next = if idle.is_zero() {
                source.next().await
            } else {
                // Idle: treated like the client leaving.
                tokio::time::timeout(idle, source.next())
                    .await
                    .unwrap_or_default()
            };
            match next {
                Some(Ok(Message::Binary(b))) if !b.is_empty() => {
                    if in_tx.send((b[0], b[1..].to_vec())).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            }
        }
        let _ = gone_tx.send(true);
    });
    match pending {
        Pending::Exec(_) | Pending::Attach(_) => {
            let wanted = pending.wanted().unwrap_or_default();
            let (stdin_tx, stdin_rx) = mpsc::channel(QUEUE);
            let (resize_tx, resize_rx) = mpsc::channel(4);
            let v5 = protocol == "v5.channel.k8s.io";
            // Route inbound channels.
            let route = tokio::spawn(async move {
                let mut stdin_tx = Some(stdin_tx);
                while let Some((ch, data)) = in_rx.recv().await {
                    match ch {
                        channel::STDIN => {
                            if let Some(tx) = &stdin_tx {
                                if tx.send(data).await.is_err() {
                                    stdin_tx = None;
                                }
                            }
                        }
                        channel::RESIZE => {
                            if let Ok(size) = serde_json::from_slice(&data) {
                                let _ = resize_tx.try_send(size);
                            }
                        }
                        channel::CLOSE if v5 && data.first() == Some(&channel::STDIN) => {
                            stdin_tx = None;
                        }
                        _ => {}
                    }
                }
            });
            let (status_tx, status_rx) = oneshot::channel();
            let mut forwarders = Vec::new();
            let mut sender = |ch: u8| {
                let out = out_tx.clone();
                let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
                forwarders.push(tokio::spawn(async move {
                    while let Some(d) = rx.recv().await {
                        if out.send(Some((ch, d))).await.is_err() {
                            break;
                        }
                    }
                }));
                tx
            };
            let io = ExecIo {
                stdin: wanted.stdin.then_some(stdin_rx),
                stdout: wanted.stdout.then(|| sender(channel::STDOUT)),
                stderr: (wanted.stderr && !wanted.tty).then(|| sender(channel::STDERR)),
                resize: wanted.tty.then_some(resize_rx),
                status: status_tx,
                gone,
            };
            let engine = server.engine.clone();
            let run = tokio::spawn(exec::run(engine, pending, io));
            if let Ok(status) = status_rx.await {
                // The output channels close when the run ends; what they still hold
                // goes out before the status.
                let _ = run.await;
                for f in forwarders {
                    let _ = f.await;
                }
                let _ = out_tx.send(Some((channel::ERROR, status.to_json()))).await;
            }
            route.abort();
        }
        Pending::PortForward(req) => {
            let mut ports = ports_query;
            if ports.is_empty() {
                ports = req
                    .port
                    .iter()
                    .filter_map(|p| u16::try_from(*p).ok())
                    .collect();
            }
            port_forward(&server, req, ports, &out_tx, in_rx, gone).await;
        }
    }
    let _ = out_tx.send(None).await;
    drop(out_tx);
    let _ = writer.await;
    reader.abort();
}

async fn port_forward(
    server: &Arc<StreamingServer>,
    req: cri::PortForwardRequest,
    ports: Vec<u16>,
    out: &mpsc::Sender<Option<(u8, Vec<u8>)>>,
    mut in_rx: mpsc::Receiver<(u8, Vec<u8>)>,
    mut gone: watch::Receiver<bool>,
) {
    let (conn_tx, conn_rx) = mpsc::channel(QUEUE);
    let serving = tokio::spawn(portforward::run(
        server.engine.clone(),
        req.pod_sandbox_id.clone(),
        conn_rx,
    ));
    // One connection per requested port; data channel 2i, error channel 2i+1.
    let mut to_guest: Vec<Option<mpsc::Sender<Vec<u8>>>> = Vec::new();
    for (i, port) in ports.iter().copied().enumerate() {
        let Some((data_ch, err_ch)) = k8s::port_forward_channels(i) else {
            break;
        };
        if port == 0 || (!req.port.is_empty() && !req.port.contains(&i32::from(port))) {
            to_guest.push(None);
            continue;
        }
        for ch in [data_ch, err_ch] {
            let p = k8s::port_forward_prefix(ch, port);
            let _ = out.send(Some((p[0], p[1..].to_vec()))).await;
        }
        let (from_tx, from_client) = mpsc::channel(QUEUE);
        let (to_client, mut to_rx) = mpsc::channel::<Vec<u8>>(QUEUE);
        let (err_tx, err_rx) = oneshot::channel::<String>();
        let o = out.clone();
        tokio::spawn(async move {
            while let Some(d) = to_rx.recv().await {
                if o.send(Some((data_ch, d))).await.is_err() {
                    return;
                }
            }
        });
        let o = out.clone();
        tokio::spawn(async move {
            if let Ok(msg) = err_rx.await {
                let _ = o.send(Some((err_ch, msg.into_bytes()))).await;
            }
        });
        to_guest.push(Some(from_tx));
        let conn = PortForwardConn {
            port,
            from_client,
            to_client,
            error: err_tx,
        };
        if conn_tx.send(conn).await.is_err() {
            break;
        }
    }
    drop(conn_tx);
    loop {
        tokio::select! {
            m = in_rx.recv() => {
                let Some((ch, data)) = m else { break };
                // Client messages on a data channel go to that port's connection.
                let i = usize::from(ch / 2);
                if ch % 2 == 0 {
                    if let Some(Some(tx)) = to_guest.get(i) {
                        if tx.send(data).await.is_err() {
                            to_guest[i] = None;
                        }
                    }
                }
            }
            _ = super::io::until_gone(&mut gone) => break,
        }
    }
    drop(to_guest);
    serving.abort();
}
