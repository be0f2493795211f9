//! Byte streams to the guest agent: kernel AF_VSOCK, or hybrid vsock (a unix socket
//! served by vhost-device-vsock, `CONNECT <port>\n` → `OK <host port>\n`).

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::UnixStream;
use vessel_proto::MAX_VSOCK_WRITE;

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
            let mut s = UnixStream::connect(path).await?;
            s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
            // Read the answer byte by byte: anything after '\n' belongs to the agent.
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
                if line.len() > 64 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "hybrid vsock: answer too long",
                    ));
                }
            }
            if !line.starts_with(b"OK ") {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("hybrid vsock: {}", String::from_utf8_lossy(&line)),
                ));
            }
            VsockStream::Hybrid(s)
        }
    };
    Ok(CappedWrites(stream))
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
}
