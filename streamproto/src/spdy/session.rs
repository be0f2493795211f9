//! A SPDY/3.1 session over any byte stream, for either side: one task reads frames
//! and routes them to streams, one writes frames (and owns the compressor, since
//! header blocks must be compressed in the order they go out).
//!
//! Bounds: frame size (`MAX_FRAME_PAYLOAD`), header blocks (`MAX_HEADER_BLOCK`),
//! open streams per session (`Limits::max_streams`, more are refused), and received
//! bytes waiting per stream (`Limits::stream_queue` frames): when a stream's reader
//! falls behind, the session stops reading the socket, so the peer is held back by
//! TCP rather than by our memory. Like spdystream (the Kubernetes peer, which never
//! sends WINDOW_UPDATE), we do not stop sending on the peer's window; we do send
//! WINDOW_UPDATEs for what we consume, for peers that count.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    goaway, rst, Frame, FrameError, HeaderBlockError, HeaderCompressor, HeaderDecompressor,
    Headers, DATA_FLAG_FIN, DEFAULT_WINDOW, SYN_FLAG_FIN,
};

/// Which side of the session we are: clients open odd-numbered streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Streams open at once; SYN_STREAMs beyond are refused (RST_STREAM).
    pub max_streams: usize,
    /// Received DATA frames queued per stream before the session stops reading.
    pub stream_queue: usize,
    /// Largest DATA frame this side sends.
    pub send_chunk: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_streams: 64,
            stream_queue: 16,
            send_chunk: 32 * 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("SPDY session closed")]
    Closed,
    #[error("SPDY stream refused by the peer (status {0})")]
    Refused(u32),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Header(#[from] HeaderBlockError),
    #[error("SPDY protocol error: {0}")]
    Protocol(&'static str),
    #[error("SPDY I/O: {0}")]
    Io(#[from] std::io::Error),
}

enum Out {
    Syn {
        id: u32,
        headers: Headers,
        reply: oneshot::Sender<Result<(), SessionError>>,
    },
    Reply {
        id: u32,
        headers: Headers,
    },
    Frame(Frame),
}

struct StreamEntry {
    /// Received data; dropped on FIN or reset.
    data: Option<mpsc::Sender<Vec<u8>>>,
    /// Waiting for SYN_REPLY (streams we opened).
    reply: Option<oneshot::Sender<Result<(), SessionError>>>,
    /// We sent FIN; once the peer's FIN comes too the entry goes (frees its slot).
    sent_fin: bool,
}

struct Shared {
    role: Role,
    limits: Limits,
    out: mpsc::Sender<Out>,
    streams: Mutex<HashMap<u32, StreamEntry>>,
    /// Held while a SYN_STREAM is queued, so ids reach the wire in order.
    next_id: tokio::sync::Mutex<u32>,
    closed: watch::Sender<bool>,
    /// Milliseconds since `epoch` of the last frame either way.
    last_activity: AtomicU64,
    epoch: Instant,
}

impl Shared {
    fn streams(&self) -> std::sync::MutexGuard<'_, HashMap<u32, StreamEntry>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn touch(&self) {
        self.last_activity
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// Handle to a session; cheap to clone.
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
}

/// One stream: receive with `recv`, send with `send`, half-close with `finish`.
pub struct Stream {
    pub id: u32,
    /// The headers of its SYN_STREAM.
    pub headers: Headers,
    rx: mpsc::Receiver<Vec<u8>>,
    unacked: u32,
    writer: StreamWriter,
}

/// The sending half of a stream (clonable, for use from another task).
#[derive(Clone)]
pub struct StreamWriter {
    id: u32,
    shared: Arc<Shared>,
}

impl Session {
    /// Starts the session's tasks on `io`. For a server, `incoming` yields the
    /// streams the peer opens (already answered with SYN_REPLY).
    pub fn start<IO>(io: IO, role: Role, limits: Limits) -> (Session, mpsc::Receiver<Stream>)
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(io);
        let (out_tx, out_rx) = mpsc::channel(64);
        let (in_tx, in_rx) = mpsc::channel(limits.max_streams.max(1));
        let shared = Arc::new(Shared {
            role,
            limits,
            out: out_tx,
            streams: Mutex::new(HashMap::new()),
            next_id: tokio::sync::Mutex::new(if role == Role::Client { 1 } else { 2 }),
            closed: watch::channel(false).0,
            last_activity: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        let s = shared.clone();
        tokio::spawn(async move {
            let r = write_loop(&s, wr, out_rx).await;
            if let Err(e) = r {
                tracing::debug!(error = %e, "SPDY writer ended");
            }
            s.closed.send_replace(true);
        });
        let s = shared.clone();
        tokio::spawn(async move {
            let r = read_loop(&s, rd, in_tx).await;
            if let Err(e) = &r {
                tracing::debug!(error = %e, "SPDY reader ended");
                let status = match e {
                    SessionError::Io(_) | SessionError::Closed => goaway::OK,
                    _ => goaway::PROTOCOL_ERROR,
                };
                let _ = s.out.try_send(Out::Frame(Frame::GoAway {
                    last_good_stream_id: 0,
                    status,
                }));
            }
            // Every stream's reader sees its end; openers waiting for a reply fail.
            for (_, e) in s.streams().drain() {
                if let Some(r) = e.reply {
                    let _ = r.send(Err(SessionError::Closed));
                }
            }
            s.closed.send_replace(true);
        });
        (Session { shared }, in_rx)
    }

    /// Opens a stream (client side use) and waits for the peer's SYN_REPLY.
    pub async fn open(&self, headers: Headers) -> Result<Stream, SessionError> {
        let (data_tx, rx) = mpsc::channel(self.shared.limits.stream_queue);
        let (reply_tx, reply_rx) = oneshot::channel();
        let (sent_tx, sent_rx) = oneshot::channel();
        let mut next = self.shared.next_id.lock().await;
        let id = *next;
        *next += 2;
        self.shared.streams().insert(
            id,
            StreamEntry {
                data: Some(data_tx),
                reply: Some(reply_tx),
                sent_fin: false,
            },
        );
        self.shared
            .out
            .send(Out::Syn {
                id,
                headers: headers.clone(),
                reply: sent_tx,
            })
            .await
            .map_err(|_| SessionError::Closed)?;
        drop(next);
        sent_rx.await.map_err(|_| SessionError::Closed)??;
        reply_rx.await.map_err(|_| SessionError::Closed)??;
        Ok(Stream {
            id,
            headers,
            rx,
            unacked: 0,
            writer: StreamWriter {
                id,
                shared: self.shared.clone(),
            },
        })
    }

    /// Resolves once the session is over (socket closed, GOAWAY, or `close`).
    pub async fn closed(&self) {
        let mut rx = self.shared.closed.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    pub fn is_closed(&self) -> bool {
        *self.shared.closed.borrow()
    }

    /// Time since the last frame went either way.
    pub fn idle_for(&self) -> std::time::Duration {
        let now = self.shared.epoch.elapsed().as_millis() as u64;
        let last = self.shared.last_activity.load(Ordering::Relaxed);
        std::time::Duration::from_millis(now.saturating_sub(last))
    }

    /// Sends GOAWAY; the writer ends after it, which ends the session.
    pub async fn close(&self) {
        let _ = self
            .shared
            .out
            .send(Out::Frame(Frame::GoAway {
                last_good_stream_id: 0,
                status: goaway::OK,
            }))
            .await;
    }
}

impl Stream {
    /// The next received bytes; `None` once the peer finished (FIN), reset the
    /// stream, or the session ended.
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        let d = self.rx.recv().await?;
        // Return consumed window in batches (one frame per 32 KiB, not per chunk).
        self.unacked += d.len() as u32;
        if self.unacked >= DEFAULT_WINDOW / 2 {
            let delta = std::mem::take(&mut self.unacked);
            for stream_id in [self.id, 0] {
                let _ = self
                    .writer
                    .shared
                    .out
                    .send(Out::Frame(Frame::WindowUpdate { stream_id, delta }))
                    .await;
            }
        }
        Some(d)
    }

    pub fn writer(&self) -> StreamWriter {
        self.writer.clone()
    }

    pub async fn send(&self, data: &[u8]) -> Result<(), SessionError> {
        self.writer.send(data).await
    }

    pub async fn finish(&self) -> Result<(), SessionError> {
        self.writer.finish().await
    }

    /// Splits into receiving and sending halves.
    pub fn split(self) -> (StreamReader, StreamWriter) {
        (
            StreamReader {
                inner: Some(self.rx),
                id: self.id,
                unacked: 0,
                shared: self.writer.shared.clone(),
            },
            self.writer,
        )
    }
}

/// The receiving half of a split stream.
pub struct StreamReader {
    inner: Option<mpsc::Receiver<Vec<u8>>>,
    id: u32,
    unacked: u32,
    shared: Arc<Shared>,
}

impl StreamReader {
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        let d = self.inner.as_mut()?.recv().await?;
        self.unacked += d.len() as u32;
        if self.unacked >= DEFAULT_WINDOW / 2 {
            let delta = std::mem::take(&mut self.unacked);
            for stream_id in [self.id, 0] {
                let _ = self
                    .shared
                    .out
                    .send(Out::Frame(Frame::WindowUpdate { stream_id, delta }))
                    .await;
            }
        }
        Some(d)
    }
}

impl StreamWriter {
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Queues `data` as DATA frames (waits while the writer is behind).
    pub async fn send(&self, data: &[u8]) -> Result<(), SessionError> {
        for chunk in data.chunks(self.shared.limits.send_chunk.max(1)) {
            self.shared
                .out
                .send(Out::Frame(Frame::Data {
                    stream_id: self.id,
                    flags: 0,
                    data: chunk.to_vec(),
                }))
                .await
                .map_err(|_| SessionError::Closed)?;
        }
        Ok(())
    }

    /// Half-closes our side (empty DATA with FIN).
    pub async fn finish(&self) -> Result<(), SessionError> {
        {
            let mut streams = self.shared.streams();
            if let Some(e) = streams.get_mut(&self.id) {
                if e.data.is_none() && e.reply.is_none() {
                    streams.remove(&self.id);
                } else {
                    e.sent_fin = true;
                }
            }
        }
        self.shared
            .out
            .send(Out::Frame(Frame::Data {
                stream_id: self.id,
                flags: DATA_FLAG_FIN,
                data: Vec::new(),
            }))
            .await
            .map_err(|_| SessionError::Closed)
    }

    /// Aborts the stream both ways.
    pub async fn reset(&self, status: u32) {
        self.shared.streams().remove(&self.id);
        let _ = self
            .shared
            .out
            .send(Out::Frame(Frame::RstStream {
                stream_id: self.id,
                status,
            }))
            .await;
    }
}

async fn write_loop<W: AsyncWrite>(
    s: &Shared,
    wr: W,
    mut rx: mpsc::Receiver<Out>,
) -> Result<(), SessionError> {
    let mut wr = std::pin::pin!(tokio::io::BufWriter::with_capacity(64 * 1024, wr));
    let mut comp = HeaderCompressor::new();
    let mut buf = Vec::with_capacity(64 * 1024);
    while let Some(out) = rx.recv().await {
        let mut next = Some(out);
        // Coalesce what is queued into one write.
        while let Some(out) = next.take() {
            let mut done = false;
            match out {
                Out::Syn { id, headers, reply } => {
                    Frame::SynStream {
                        stream_id: id,
                        associated_to: 0,
                        priority: 0,
                        flags: 0,
                        header_block: comp.compress(&headers),
                    }
                    .encode(&mut buf);
                    let _ = reply.send(Ok(()));
                }
                Out::Reply { id, headers } => Frame::SynReply {
                    stream_id: id,
                    flags: 0,
                    header_block: comp.compress(&headers),
                }
                .encode(&mut buf),
                Out::Frame(f) => {
                    done = matches!(f, Frame::GoAway { .. });
                    f.encode(&mut buf);
                }
            }
            wr.write_all(&buf).await?;
            buf.clear();
            s.touch();
            if done {
                wr.flush().await?;
                let _ = wr.shutdown().await;
                return Ok(());
            }
            if buf.capacity() > 256 * 1024 {
                buf = Vec::with_capacity(64 * 1024);
            }
            next = rx.try_recv().ok();
        }
        wr.flush().await?;
    }
    Ok(())
}

async fn read_loop<R: AsyncRead>(
    s: &Arc<Shared>,
    rd: R,
    incoming: mpsc::Sender<Stream>,
) -> Result<(), SessionError> {
    let mut rd = std::pin::pin!(rd);
    let mut decomp = HeaderDecompressor::new();
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut last_peer_id = 0u32;
    loop {
        let frame = loop {
            if let Some((f, used)) = Frame::parse(&buf)? {
                buf.drain(..used);
                break f;
            }
            if buf.capacity() - buf.len() < 16 * 1024 {
                buf.reserve(64 * 1024);
            }
            if rd.read_buf(&mut buf).await? == 0 {
                return Err(SessionError::Closed);
            }
        };
        s.touch();
        match frame {
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                let tx = s.streams().get(&stream_id).and_then(|e| e.data.clone());
                if let Some(tx) = tx {
                    // Waiting here is the per-stream bound: the peer waits on TCP.
                    if !data.is_empty() && tx.send(data).await.is_err() {
                        // The stream's reader is gone: discard what comes.
                    }
                }
                if flags & DATA_FLAG_FIN != 0 {
                    let mut streams = s.streams();
                    if let Some(e) = streams.get_mut(&stream_id) {
                        e.data = None;
                        if e.sent_fin {
                            streams.remove(&stream_id);
                        }
                    }
                }
            }
            Frame::SynStream {
                stream_id,
                flags,
                header_block,
                ..
            } => {
                // Decompress even a refused stream's block: the context must advance.
                let headers = decomp.decompress(&header_block)?;
                let peer_parity = if s.role == Role::Server { 1 } else { 0 };
                if stream_id == 0 || stream_id % 2 != peer_parity || stream_id <= last_peer_id {
                    return Err(SessionError::Protocol("bad stream id in SYN_STREAM"));
                }
                last_peer_id = stream_id;
                if s.streams().len() >= s.limits.max_streams {
                    let _ = s
                        .out
                        .send(Out::Frame(Frame::RstStream {
                            stream_id,
                            status: rst::REFUSED_STREAM,
                        }))
                        .await;
                    continue;
                }
                let (tx, rx) = mpsc::channel(s.limits.stream_queue.max(1));
                s.streams().insert(
                    stream_id,
                    StreamEntry {
                        data: (flags & SYN_FLAG_FIN == 0).then_some(tx),
                        reply: None,
                        sent_fin: false,
                    },
                );
                let _ = s
                    .out
                    .send(Out::Reply {
                        id: stream_id,
                        headers: Headers::new(),
                    })
                    .await;
                let stream = Stream {
                    id: stream_id,
                    headers,
                    rx,
                    unacked: 0,
                    writer: StreamWriter {
                        id: stream_id,
                        shared: s.clone(),
                    },
                };
                if incoming.send(stream).await.is_err() {
                    // Nobody takes streams any more: the session is being torn down.
                    return Err(SessionError::Closed);
                }
            }
            Frame::SynReply {
                stream_id,
                header_block,
                ..
            } => {
                decomp.decompress(&header_block)?;
                if let Some(r) = s.streams().get_mut(&stream_id).and_then(|e| e.reply.take()) {
                    let _ = r.send(Ok(()));
                }
            }
            Frame::Headers { header_block, .. } => {
                decomp.decompress(&header_block)?;
            }
            Frame::RstStream { stream_id, status } => {
                if let Some(e) = s.streams().remove(&stream_id) {
                    if let Some(r) = e.reply {
                        let _ = r.send(Err(SessionError::Refused(status)));
                    }
                }
            }
            Frame::Ping { id } => {
                let _ = s.out.send(Out::Frame(Frame::Ping { id })).await;
            }
            Frame::GoAway { .. } => return Ok(()),
            Frame::Settings { .. } | Frame::WindowUpdate { .. } | Frame::Unknown { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn client_and_server_exchange_data_and_fin() {
        let (a, b) = tokio::io::duplex(1024);
        let (client, _) = Session::start(a, Role::Client, Limits::default());
        let (server, mut incoming) = Session::start(b, Role::Server, Limits::default());
        let opener = tokio::spawn(async move {
            let mut st = client
                .open(Headers::new().with("streamtype", "stdin"))
                .await
                .unwrap();
            st.send(&vec![7u8; 200_000]).await.unwrap();
            st.finish().await.unwrap();
            let mut back = Vec::new();
            while let Some(d) = st.recv().await {
                back.extend(d);
            }
            back
        });
        let mut st = incoming.recv().await.unwrap();
        assert_eq!(st.headers.get("streamtype"), Some("stdin"));
        let mut n = 0;
        while let Some(d) = st.recv().await {
            assert!(d.iter().all(|b| *b == 7));
            n += d.len();
        }
        assert_eq!(n, 200_000);
        st.send(b"bye").await.unwrap();
        st.finish().await.unwrap();
        assert_eq!(opener.await.unwrap(), b"bye");
        server.close().await;
        server.closed().await;
    }

    #[tokio::test]
    async fn streams_over_the_cap_are_refused() {
        let (a, b) = tokio::io::duplex(1024);
        let limits = Limits {
            max_streams: 2,
            ..Limits::default()
        };
        let (client, _) = Session::start(a, Role::Client, Limits::default());
        let (_server, mut incoming) = Session::start(b, Role::Server, limits);
        let _s1 = client.open(Headers::new()).await.unwrap();
        let _s2 = client.open(Headers::new()).await.unwrap();
        assert!(matches!(
            client.open(Headers::new()).await,
            Err(SessionError::Refused(rst::REFUSED_STREAM))
        ));
        assert!(incoming.recv().await.is_some());
    }

    #[tokio::test]
    async fn finished_streams_free_their_slot() {
        let (a, b) = tokio::io::duplex(1024);
        let limits = Limits {
            max_streams: 1,
            ..Limits::default()
        };
        let (client, _) = Session::start(a, Role::Client, Limits::default());
        let (_server, mut incoming) = Session::start(b, Role::Server, limits);
        for _ in 0..5 {
            let mut c = client.open(Headers::new()).await.unwrap();
            c.finish().await.unwrap();
            let mut s = incoming.recv().await.unwrap();
            assert_eq!(s.recv().await, None);
            s.finish().await.unwrap();
            assert_eq!(c.recv().await, None);
        }
    }

    #[tokio::test]
    async fn garbage_ends_the_session() {
        let (mut a, b) = tokio::io::duplex(1024);
        let (server, _incoming) = Session::start(b, Role::Server, Limits::default());
        a.write_all(&[0x80, 9, 0, 1, 0, 0, 0, 0]).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), server.closed())
            .await
            .unwrap();
    }
}
