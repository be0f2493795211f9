//! Byte streams to the guest agent: kernel AF_VSOCK, or hybrid vsock (a unix socket
//! served by vhost-device-vsock, `CONNECT <port>\n` → `OK <host port>\n`).

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::UnixStream;
use vessel_proto::MAX_VSOCK_WRITE;

/// How long a detached hybrid handshake may wait for its answer. Long: closing before
/// the answer is what wedges the helper, and a guest this slow is dead anyway.
const HANDSHAKE_ABANDON: Duration = Duration::from_secs(120);

/// Where the agent listens, seen from the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VsockAddr {
    /// Kernel vhost-vsock: AF_VSOCK to the guest CID.
    Kernel {
        /// Guest CID.
        cid: u32,
        /// Guest port.
        port: u32,
    },
    /// Hybrid vsock over a unix socket.
    Hybrid {
        /// The helper's host-side unix socket.
        path: PathBuf,
        /// Guest port.
        port: u32,
    },
}

/// A connected stream of either kind.
#[derive(Debug)]
pub enum VsockStream {
    /// AF_VSOCK.
    Kernel(tokio_vsock::VsockStream),
    /// Unix socket after the hybrid handshake.
    Hybrid(UnixStream),
}

/// Connects to `addr` (one attempt).
pub async fn connect(addr: &VsockAddr) -> io::Result<CappedWrites<VsockStream>> {
    let stream = match addr {
        VsockAddr::Kernel { cid, port } => VsockStream::Kernel(
            tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, *port)).await?,
        ),
        VsockAddr::Hybrid { path, port } => {
            // The handshake runs in its own task so that a caller giving up (a
            // timeout, a dropped future) never closes the socket while the CONNECT is
            // pending: vhost-device-vsock 0.3 panics in its worker thread when the
            // guest's answer finds the host side closed (write of "OK" → EPIPE →
            // unwrap), after which no connection is ever served again.
            let (path, port) = (path.clone(), *port);
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                let r = tokio::time::timeout(HANDSHAKE_ABANDON, hybrid_handshake(&path, port))
                    .await
                    .unwrap_or_else(|_| {
                        Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "hybrid vsock: no answer",
                        ))
                    });
                // Nobody waiting: the stream is dropped now that closing it is safe.
                let _ = tx.send(r);
            });
            let s = rx
                .await
                .map_err(|_| io::Error::other("hybrid vsock: handshake task lost"))??;
            VsockStream::Hybrid(s)
        }
    };
    Ok(CappedWrites(stream))
}

/// Longest answer line accepted from the hybrid helper (without its newline).
const MAX_ANSWER: usize = 64;

/// Dials the hybrid socket and sends `CONNECT <port>`; returns once the answer is read.
async fn hybrid_handshake(path: &Path, port: u32) -> io::Result<UnixStream> {
    // The helper's socket is in the jail dir: checked, never followed.
    let mut s = crate::jail::connect_unix(path).await?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
    read_hybrid_answer(&mut s).await?;
    Ok(s)
}

/// Reads the helper's `OK <host port>\n` answer and returns the port. Byte by byte:
/// anything after '\n' belongs to the agent and stays unread.
async fn read_hybrid_answer(s: &mut (impl AsyncRead + Unpin)) -> io::Result<u32> {
    let mut line = Vec::with_capacity(16);
    loop {
        let b = s.read_u8().await.map_err(|e| {
            if matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
            ) {
                io::Error::new(io::ErrorKind::ConnectionRefused, "guest port not listening")
            } else {
                e
            }
        })?;
        if b == b'\n' {
            break;
        }
        line.push(b);
        if line.len() > MAX_ANSWER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "hybrid vsock: answer too long",
            ));
        }
    }
    parse_hybrid_answer(&line).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!(
                "hybrid vsock: {}",
                String::from_utf8_lossy(&line).escape_debug()
            ),
        )
    })
}

/// The host port in an `OK <port>` answer line (no newline); `None` for anything else.
fn parse_hybrid_answer(line: &[u8]) -> Option<u32> {
    let digits = line.strip_prefix(b"OK ")?;
    // Plain decimal only: `u32::from_str` would also take a leading '+'.
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Limits every write to `MAX_VSOCK_WRITE` bytes (vhost-device-vsock 0.3 stalls on
/// larger ones).
#[derive(Debug)]
pub struct CappedWrites<S>(pub S);

impl AsyncRead for VsockStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Kernel(s) => Pin::new(s).poll_read(cx, buf),
            Self::Hybrid(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for VsockStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Kernel(s) => Pin::new(s).poll_write(cx, buf),
            Self::Hybrid(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Kernel(s) => Pin::new(s).poll_flush(cx),
            Self::Hybrid(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Kernel(s) => Pin::new(s).poll_shutdown(cx),
            Self::Hybrid(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CappedWrites<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CappedWrites<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = buf.len().min(MAX_VSOCK_WRITE);
        Pin::new(&mut self.get_mut().0).poll_write(cx, &buf[..n])
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[test]
    fn hybrid_answers_parse() {
        assert_eq!(parse_hybrid_answer(b"OK 1073741824"), Some(1 << 30));
        assert_eq!(parse_hybrid_answer(b"OK 0"), Some(0));
        for bad in [
            &b"OK "[..],
            b"OK +5",
            b"OK 5 ",
            b"OK 4294967296",
            b"ok 5",
            b"FAILED",
            b"OK\t5",
        ] {
            assert_eq!(parse_hybrid_answer(bad), None, "{bad:?}");
        }
    }

    /// Every answer the helper (or a guest behind it) can send: the reader takes the
    /// first line and nothing past it, accepts only `OK <u32>`, and never holds more
    /// than `MAX_ANSWER` bytes of it.
    #[test]
    fn fuzz_hybrid_answers() {
        let seeds: Vec<Vec<u8>> = vec![
            b"OK 1073741824\nagent-bytes".to_vec(),
            b"OK 5\n".to_vec(),
            b"FAILED 111\n".to_vec(),
            format!("OK {}\n", "9".repeat(70)).into_bytes(),
        ];
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut accepted = 0u64;
        vessel_fuzz::fuzz("hybrid vsock answers", &seeds, |data| {
            let mut rest = data;
            let got = rt.block_on(read_hybrid_answer(&mut rest));
            let consumed = data.len() - rest.len();
            match data.iter().position(|&b| b == b'\n') {
                Some(nl) if nl <= MAX_ANSWER => {
                    assert_eq!(consumed, nl + 1, "read exactly the answer line");
                    let line = &data[..nl];
                    let expect = line
                        .strip_prefix(b"OK ")
                        .filter(|d| !d.is_empty() && d.iter().all(u8::is_ascii_digit))
                        .and_then(|d| std::str::from_utf8(d).ok()?.parse::<u32>().ok());
                    assert_eq!(got.as_ref().ok().copied(), expect, "{line:?}");
                    if got.is_ok() {
                        accepted += 1;
                    }
                }
                _ => {
                    assert!(got.is_err(), "no complete line is no answer");
                    assert!(consumed <= MAX_ANSWER + 1, "read {consumed} bytes");
                }
            }
        });
        eprintln!("fuzz hybrid vsock answers: {accepted} accepted");
    }

    /// A fake vhost-device-vsock: answers the handshake, then records what it reads.
    #[tokio::test]
    async fn hybrid_handshake_and_capped_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut hello = [0u8; 13];
            s.read_exact(&mut hello).await.unwrap();
            assert_eq!(&hello, b"CONNECT 1024\n");
            s.write_all(b"OK 1073741824\nagent-bytes").await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut c = connect(&VsockAddr::Hybrid {
            path: path.clone(),
            port: 1024,
        })
        .await
        .unwrap();
        // Bytes after the handshake line reach the caller.
        let mut first = [0u8; 11];
        c.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"agent-bytes");
        let big = vec![7u8; 3 * MAX_VSOCK_WRITE + 5];
        let n = c.write(&big).await.unwrap();
        assert!(n <= MAX_VSOCK_WRITE, "a single write of {n} bytes");
        c.write_all(&big[n..]).await.unwrap();
        c.shutdown().await.unwrap();
        drop(c);
        assert_eq!(server.await.unwrap(), big);
    }

    #[tokio::test]
    async fn hybrid_refused_when_port_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            // vhost-device-vsock drops the connection when nothing listens in the guest.
            let (mut s, _) = listener.accept().await.unwrap();
            let mut hello = [0u8; 13];
            s.read_exact(&mut hello).await.unwrap();
            drop(s);
        });
        let err = connect(&VsockAddr::Hybrid { path, port: 1024 })
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    }

    /// A caller that gives up mid-handshake must not close the socket before the
    /// answer: the late "OK" would hit a closed socket and kill vhost-device-vsock.
    #[tokio::test]
    async fn abandoned_handshake_keeps_the_socket_until_answered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (gave_up_tx, gave_up_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut hello = [0u8; 13];
            s.read_exact(&mut hello).await.unwrap();
            gave_up_rx.await.unwrap();
            // Give a (wrongly) dropped socket time to be closed.
            tokio::time::sleep(Duration::from_millis(100)).await;
            s.write_all(b"OK 1073741824\n")
                .await
                .expect("the client socket is still open when the answer comes");
            // Then the abandoned stream is closed cleanly.
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.unwrap();
            rest
        });
        let addr = VsockAddr::Hybrid { path, port: 1024 };
        let r = tokio::time::timeout(Duration::from_millis(200), connect(&addr)).await;
        assert!(r.is_err(), "no answer yet: the caller times out");
        gave_up_tx.send(()).unwrap();
        let rest = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("closed after the answer")
            .unwrap();
        assert!(rest.is_empty());
    }
}
