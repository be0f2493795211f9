//! The agent's vsock listener, with every write capped at `MAX_VSOCK_WRITE` bytes:
//! vhost-device-vsock 0.3 stalls on larger writes from newer guest kernels.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_stream::wrappers::ReceiverStream;
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY};
use vessel_proto::MAX_VSOCK_WRITE;

/// Any byte stream whose writes are split into chunks of at most `MAX_VSOCK_WRITE`.
pub struct CappedWrites<S> {
    inner: S,
}

impl<S> CappedWrites<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CappedWrites<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CappedWrites<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = buf.len().min(MAX_VSOCK_WRITE);
        Pin::new(&mut self.inner).poll_write(cx, &buf[..n])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // Write only the first non-empty slice, capped: callers loop on short writes.
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map(|b| &b[..])
            .unwrap_or(&[]);
        let n = first.len().min(MAX_VSOCK_WRITE);
        Pin::new(&mut self.inner).poll_write(cx, &first[..n])
    }

    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for CappedWrites<VsockStream> {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

/// Binds the agent port and yields accepted connections, wrapped.
pub fn incoming(port: u32) -> io::Result<ReceiverStream<io::Result<CappedWrites<VsockStream>>>> {
    let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port))?;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let conn = listener.accept().await.map(|(s, _)| CappedWrites::new(s));
            if let Err(e) = &conn {
                crate::log::warn(&format!("vsock accept: {e}"));
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
            if tx.send(conn).await.is_err() {
                break;
            }
        }
    });
    Ok(ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn writes_are_capped_but_complete() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut a = CappedWrites::new(a);
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        // A single poll_write never takes more than the cap...
        let n = a.write(&data).await.unwrap();
        assert_eq!(n, MAX_VSOCK_WRITE);
        // ...and write_all still delivers everything.
        a.write_all(&data[n..]).await.unwrap();
        drop(a);
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, data);
    }
}
