//! The SPDY transport: streams named by their `streamtype` header become the
//! channels of `io`. Exec/attach wait (with a timeout) for the streams the request
//! asked for; port-forward pairs `data` and `error` streams by `requestid`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_cri::v1 as cri;
use tokio::sync::{mpsc, oneshot, watch};
use vessel_streamproto::k8s::{self, StreamType};
use vessel_streamproto::spdy::session::{Session, Stream, StreamWriter};

use super::io::{ExecIo, PortForwardConn, QUEUE};
use super::{exec, portforward, Pending, StreamingServer, Wanted};

pub async fn serve(
    server: Arc<StreamingServer>,
    pending: Pending,
    protocol: &'static str,
    session: Session,
    mut incoming: mpsc::Receiver<Stream>,
) {
    let creation = Duration::from_secs(server.config.stream_creation_timeout_s);
    let watchdog = idle_watchdog(&session, server.config.idle_timeout_s);
    if let Pending::PortForward(req) = pending {
        port_forward(&server, req, &session, incoming).await;
    } else if let Some(wanted) = pending.wanted() {
        if let Some((io, drains)) =
            exec_io(&session, &mut incoming, wanted, protocol, creation).await
        {
            exec::run(server.engine.clone(), pending, io).await;
            finish(drains).await;
        }
    }
    watchdog.abort();
    session.close().await;
}

/// Waits (boundedly) for the output and status streams to be queued with their FIN:
/// closing the session first would cut them off.
async fn finish(drains: Vec<tokio::task::JoinHandle<()>>) {
    let all = async {
        for d in drains {
            let _ = d.await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), all).await;
}

/// Closes the session when nothing moved either way for `idle_s` seconds.
fn idle_watchdog(session: &Session, idle_s: u64) -> tokio::task::JoinHandle<()> {
    let session = session.clone();
    tokio::spawn(async move {
        if idle_s == 0 {
            return;
        }
        let limit = Duration::from_secs(idle_s);
        loop {
            let idle = session.idle_for();
            if idle >= limit {
                tracing::info!("streaming session idle for {idle_s}s: closing");
                session.close().await;
                return;
            }
            tokio::time::sleep(limit - idle).await;
        }
    })
}

async fn exec_io(
    session: &Session,
    incoming: &mut mpsc::Receiver<Stream>,
    wanted: Wanted,
    protocol: &'static str,
    creation: Duration,
) -> Option<(ExecIo, Vec<tokio::task::JoinHandle<()>>)> {
    let mut streams: HashMap<StreamType, Stream> = HashMap::new();
    let complete = |s: &HashMap<StreamType, Stream>| {
        s.contains_key(&StreamType::Error)
            && (!wanted.stdin || s.contains_key(&StreamType::Stdin))
            && (!wanted.stdout || s.contains_key(&StreamType::Stdout))
            && (!wanted.stderr || wanted.tty || s.contains_key(&StreamType::Stderr))
    };
    let collect = async {
        while !complete(&streams) {
            let st = incoming.recv().await?;
            match st
                .headers
                .get(k8s::STREAM_TYPE_HEADER)
                .and_then(StreamType::parse)
            {
                Some(t) if t != StreamType::Data && !streams.contains_key(&t) => {
                    streams.insert(t, st);
                }
                _ => {
                    tracing::debug!(headers = ?st.headers, "unexpected SPDY stream: reset");
                    st.writer()
                        .reset(vessel_streamproto::spdy::rst::PROTOCOL_ERROR)
                        .await;
                }
            }
        }
        Some(())
    };
    match tokio::time::timeout(creation, collect).await {
        Ok(Some(())) => {}
        Ok(None) => return None,
        Err(_) => {
            tracing::info!(
                "streaming client did not open its streams within {}s",
                creation.as_secs()
            );
            return None;
        }
    }
    let (gone_tx, gone) = watch::channel(false);
    let (status_tx, status_rx) = oneshot::channel::<k8s::Status>();
    let v4 = protocol == "v4.channel.k8s.io";
    let error = streams.remove(&StreamType::Error)?;
    let (stdin_tx, stdin) = mpsc::channel(QUEUE);
    let (resize_tx, resize) = mpsc::channel(4);
    let stdin = streams.remove(&StreamType::Stdin).map(|s| {
        tokio::spawn(pump_in(s, stdin_tx));
        stdin
    });
    let mut drains = Vec::new();
    let mut out = |st: Stream| {
        let (tx, h) = pump_out(st);
        drains.push(h);
        tx
    };
    let stdout = streams.remove(&StreamType::Stdout).map(&mut out);
    let stderr = streams.remove(&StreamType::Stderr).map(&mut out);
    // The resize stream may come before or after the others (or never).
    let resize_wanted = wanted.tty;
    let early_resize = streams.remove(&StreamType::Resize);
    let mut incoming = std::mem::replace(incoming, mpsc::channel(1).1);
    tokio::spawn(async move {
        let mut current = early_resize;
        loop {
            if let Some(st) = current.take() {
                tokio::spawn(pump_resize(st, resize_tx.clone()));
            }
            match incoming.recv().await {
                Some(st)
                    if resize_wanted
                        && st.headers.get(k8s::STREAM_TYPE_HEADER) == Some("resize") =>
                {
                    current = Some(st)
                }
                Some(st) => {
                    st.writer()
                        .reset(vessel_streamproto::spdy::rst::PROTOCOL_ERROR)
                        .await
                }
                None => break,
            }
        }
    });
    // The status goes out on the error stream, then the stream ends.
    drains.push(tokio::spawn(async move {
        if let Ok(st) = status_rx.await {
            let body = if v4 {
                st.to_json()
            } else if st.status == "Success" {
                Vec::new()
            } else {
                st.message.clone().into_bytes()
            };
            if !body.is_empty() {
                let _ = error.send(&body).await;
            }
            let _ = error.finish().await;
        }
    }));
    let s = session.clone();
    tokio::spawn(async move {
        s.closed().await;
        let _ = gone_tx.send(true);
    });
    let io = ExecIo {
        stdin,
        stdout,
        stderr,
        resize: resize_wanted.then_some(resize),
        status: status_tx,
        gone,
    };
    Some((io, drains))
}

/// Stream → channel, until the peer's FIN.
async fn pump_in(mut st: Stream, tx: mpsc::Sender<Vec<u8>>) {
    while let Some(d) = st.recv().await {
        if tx.send(d).await.is_err() {
            break;
        }
    }
}

/// Channel → stream; FIN when the channel's senders are done.
fn pump_out(st: Stream) -> (mpsc::Sender<Vec<u8>>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    let (_, w) = st.split();
    let h = tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            if w.send(&d).await.is_err() {
                return;
            }
        }
        let _ = w.finish().await;
    });
    (tx, h)
}

/// Resize messages are JSON objects, one after another, without separators.
async fn pump_resize(mut st: Stream, tx: mpsc::Sender<k8s::TerminalSize>) {
    let mut buf = Vec::new();
    while let Some(d) = st.recv().await {
        buf.extend_from_slice(&d);
        if buf.len() > 4096 {
            return;
        }
        loop {
            let mut it =
                serde_json::Deserializer::from_slice(&buf).into_iter::<k8s::TerminalSize>();
            let size = match it.next() {
                Some(Ok(size)) => size,
                Some(Err(e)) if e.is_eof() => break,
                None => break,
                Some(Err(_)) => return,
            };
            let used = it.byte_offset();
            buf.drain(..used);
            if tx.send(size).await.is_err() {
                return;
            }
        }
    }
}

async fn port_forward(
    server: &Arc<StreamingServer>,
    req: cri::PortForwardRequest,
    session: &Session,
    mut incoming: mpsc::Receiver<Stream>,
) {
    let (conn_tx, conn_rx) = mpsc::channel(QUEUE);
    let serving = tokio::spawn(portforward::run(
        server.engine.clone(),
        req.pod_sandbox_id.clone(),
        conn_rx,
    ));
    // requestid → the half of the pair that came first.
    let mut halves: HashMap<String, Stream> = HashMap::new();
    loop {
        let st = tokio::select! {
            st = incoming.recv() => match st { Some(st) => st, None => break },
            _ = session.closed() => break,
        };
        let port = st
            .headers
            .get(k8s::PORT_HEADER)
            .and_then(|p| p.parse::<u16>().ok());
        let kind = st
            .headers
            .get(k8s::STREAM_TYPE_HEADER)
            .and_then(StreamType::parse);
        let (Some(port), Some(kind @ (StreamType::Data | StreamType::Error))) = (port, kind) else {
            st.writer()
                .reset(vessel_streamproto::spdy::rst::PROTOCOL_ERROR)
                .await;
            continue;
        };
        if port == 0 || (!req.port.is_empty() && !req.port.contains(&i32::from(port))) {
            let w = st.writer();
            if kind == StreamType::Error {
                let _ = w
                    .send(format!("port {port} was not requested in PortForward").as_bytes())
                    .await;
                let _ = w.finish().await;
            } else {
                w.reset(vessel_streamproto::spdy::rst::REFUSED_STREAM).await;
            }
            continue;
        }
        let id = st
            .headers
            .get(k8s::REQUEST_ID_HEADER)
            .unwrap_or_default()
            .to_owned();
        let Some(other) = halves.remove(&id) else {
            // Bounded by the session's stream cap: each half holds a stream slot.
            halves.insert(id, st);
            continue;
        };
        let (data, error) = match kind {
            StreamType::Data => (st, other),
            _ => (other, st),
        };
        if data.headers.get(k8s::STREAM_TYPE_HEADER) != Some("data")
            || error.headers.get(k8s::STREAM_TYPE_HEADER) != Some("error")
        {
            data.writer()
                .reset(vessel_streamproto::spdy::rst::PROTOCOL_ERROR)
                .await;
            error
                .writer()
                .reset(vessel_streamproto::spdy::rst::PROTOCOL_ERROR)
                .await;
            continue;
        }
        let conn = pair(port, data, error);
        if conn_tx.send(conn).await.is_err() {
            break;
        }
    }
    drop(conn_tx);
    let _ = serving.await;
}

/// Wires a data/error stream pair to a connection.
fn pair(port: u16, data: Stream, error: Stream) -> PortForwardConn {
    let (from_tx, from_client) = mpsc::channel(QUEUE);
    let (to_client, mut to_rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    let (err_tx, err_rx) = oneshot::channel::<String>();
    let (data_in, data_out): (_, StreamWriter) = data.split();
    let mut data_in = data_in;
    tokio::spawn(async move {
        while let Some(d) = data_in.recv().await {
            if from_tx.send(d).await.is_err() {
                break;
            }
        }
    });
    tokio::spawn(async move {
        while let Some(d) = to_rx.recv().await {
            if data_out.send(&d).await.is_err() {
                return;
            }
        }
        let _ = data_out.finish().await;
    });
    let (mut err_in, err_out) = error.split();
    tokio::spawn(async move {
        // The client writes nothing on the error stream; drain it so its FIN counts.
        tokio::spawn(async move { while err_in.recv().await.is_some() {} });
        if let Ok(msg) = err_rx.await {
            let _ = err_out.send(msg.as_bytes()).await;
        }
        let _ = err_out.finish().await;
    });
    PortForwardConn {
        port,
        from_client,
        to_client,
        error: err_tx,
    }
}
