//! Bounded output buffer between a process's pipe (or pty) and ReadOutput streams.
//! When the buffer is full the pump stops reading, so the process blocks on write
//! instead of losing output.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::Notify;

/// Largest chunk handed to a reader at once (fits one vsock write with framing).
pub const CHUNK: usize = 16 * 1024;

#[derive(Default)]
struct Inner {
    data: VecDeque<u8>,
    closed: bool,
}

/// A byte queue with a capacity, a producer (`pump`) and consumers (`next_chunk`).
pub struct OutputBuffer {
    cap: usize,
    inner: Mutex<Inner>,
    readable: Notify,
    writable: Notify,
}

impl OutputBuffer {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            inner: Mutex::default(),
            readable: Notify::new(),
            writable: Notify::new(),
        }
    }

    /// A buffer that is already at its end (e.g. stderr of a TTY process).
    pub fn closed() -> Self {
        let b = Self::new(1);
        b.close();
        b
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn close(&self) {
        self.lock().closed = true;
        self.readable.notify_waiters();
        self.readable.notify_one();
    }

    /// Room left, waiting until there is some.
    async fn wait_room(&self) -> usize {
        loop {
            let notified = self.writable.notified();
            let free = self.cap.saturating_sub(self.lock().data.len());
            if free > 0 {
                return free;
            }
            notified.await;
        }
    }

    pub fn push(&self, bytes: &[u8]) {
        self.lock().data.extend(bytes);
        self.readable.notify_waiters();
        self.readable.notify_one();
    }

    /// Next chunk of output; `None` once the source closed and everything was read.
    pub async fn next_chunk(&self) -> Option<Vec<u8>> {
        loop {
            let notified = self.readable.notified();
            {
                let mut inner = self.lock();
                if !inner.data.is_empty() {
                    let n = inner.data.len().min(CHUNK);
                    let chunk: Vec<u8> = inner.data.drain(..n).collect();
                    drop(inner);
                    self.writable.notify_waiters();
                    self.writable.notify_one();
                    return Some(chunk);
                }
                if inner.closed {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// Copies `src` into the buffer until EOF (EIO from a pty master counts as EOF),
    /// never holding more than the capacity.
    pub async fn pump<R: AsyncRead + Unpin>(&self, mut src: R) {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let room = self.wait_room().await.min(buf.len());
            match src.read(&mut buf[..room]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => self.push(&buf[..n]),
            }
        }
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn delivers_everything_then_ends() {
        let buf = Arc::new(OutputBuffer::new(1024));
        let (mut w, r) = tokio::io::duplex(64);
        let pump = tokio::spawn({
            let buf = buf.clone();
            async move { buf.pump(r).await }
        });
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let writer = tokio::spawn({
            let data = data.clone();
            async move {
                w.write_all(&data).await.unwrap();
            }
        });
        let mut got = Vec::new();
        while let Some(c) = buf.next_chunk().await {
            assert!(c.len() <= CHUNK);
            got.extend(c);
        }
        writer.await.unwrap();
        pump.await.unwrap();
        assert_eq!(got, data);
    }

    #[tokio::test]
    async fn full_buffer_applies_back_pressure() {
        let buf = Arc::new(OutputBuffer::new(100));
        let (mut w, r) = tokio::io::duplex(10);
        tokio::spawn({
            let buf = buf.clone();
            async move { buf.pump(r).await }
        });
        // Nobody reads: the writer must block once buffer (100) + pipe (10) are full.
        let blocked = tokio::time::timeout(
            std::time::Duration::from_millis(300),
            w.write_all(&[7u8; 1000]),
        )
        .await;
        assert!(blocked.is_err(), "writer was not blocked");
        assert!(buf.lock().data.len() <= 100);
        // Draining lets it go on.
        let mut n = 0;
        while n < 100 {
            n += buf.next_chunk().await.unwrap().len();
        }
    }

    #[tokio::test]
    async fn closed_buffer_ends_at_once() {
        assert!(OutputBuffer::closed().next_chunk().await.is_none());
    }
}
