//! Bounded output buffer between a process's pipe (or pty) and ReadOutput streams.
//!
//! Every byte has a stream offset. Bytes stay in the buffer until a reader
//! acknowledges them, so a reader that dies mid-stream (vesseld killed) can come back
//! and read again from the last offset it stored: at-least-once delivery. The
//! capacity counts unacknowledged bytes; when it is reached the pump stops reading,
//! so the process blocks on write instead of losing output.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::Notify;

/// Largest chunk handed to a reader at once, and read from a pipe at once. Under
/// TCG every message costs the guest a fixed amount of work (wake-ups, framing,
/// syscalls), so bigger chunks move more bytes per unit of it; the transport
/// splits writes to the vsock cap anyway.
pub const CHUNK: usize = 64 * 1024;

#[derive(Default)]
struct Inner {
    /// Offset of `data[0]`: every byte below it was acknowledged and freed.
    base: u64,
    /// Unacknowledged bytes `[base, base + data.len())`.
    data: VecDeque<u8>,
    closed: bool,
}

impl Inner {
    fn end(&self) -> u64 {
        self.base + self.data.len() as u64
    }
}

/// `data[skip..skip + n]` as one Vec, copied slice by slice (a byte-wise iterator
/// is several times slower in an emulated guest).
fn copy_range(data: &VecDeque<u8>, skip: usize, n: usize) -> Vec<u8> {
    let (front, back) = data.as_slices();
    let mut out = Vec::with_capacity(n);
    if skip < front.len() {
        let take = n.min(front.len() - skip);
        out.extend_from_slice(&front[skip..skip + take]);
        out.extend_from_slice(&back[..n - take]);
    } else {
        let at = skip - front.len();
        out.extend_from_slice(&back[at..at + n]);
    }
    out
}

/// A byte queue with a capacity, a producer (`pump`) and readers (`chunk_at`).
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
    }

    /// Frees every byte below `offset` (an offset past the end frees what there is).
    pub fn ack(&self, offset: u64) {
        {
            let mut inner = self.lock();
            let n = offset
                .saturating_sub(inner.base)
                .min(inner.data.len() as u64);
            if n == 0 {
                return;
            }
            inner.data.drain(..n as usize);
            inner.base += n;
        }
        self.writable.notify_waiters();
    }

    /// The next chunk at or after `offset`, as (offset of its first byte, bytes);
    /// `None` once the source closed and nothing is left from `offset` on. Bytes
    /// already freed are skipped: the chunk then starts at the oldest kept byte.
    pub async fn chunk_at(&self, offset: u64) -> Option<(u64, Vec<u8>)> {
        loop {
            let notified = self.readable.notified();
            {
                let inner = self.lock();
                let from = offset.max(inner.base);
                if from < inner.end() {
                    let skip = (from - inner.base) as usize;
                    let n = (inner.data.len() - skip).min(CHUNK);
                    return Some((from, copy_range(&inner.data, skip, n)));
                }
                if inner.closed {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// Copies `src` into the buffer until EOF (EIO from a pty master counts as EOF),
    /// never holding more unacknowledged bytes than the capacity.
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
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn ranges_copy_across_the_wrap() {
        let mut d: VecDeque<u8> = VecDeque::with_capacity(8);
        d.extend([0, 0, 0, 0, 0, 0]);
        d.drain(..4);
        d.extend([1, 2, 3, 4, 5]); // wraps: the slices are [0, 0, 1, 2] and [3, 4, 5]
        let want: Vec<u8> = d.iter().copied().collect();
        for skip in 0..d.len() {
            for n in 0..=d.len() - skip {
                assert_eq!(copy_range(&d, skip, n), want[skip..skip + n], "{skip} {n}");
            }
        }
    }

    fn spawn_pump(buf: &Arc<OutputBuffer>, pipe: usize) -> tokio::io::DuplexStream {
        let (w, r) = tokio::io::duplex(pipe);
        let buf = buf.clone();
        tokio::spawn(async move { buf.pump(r).await });
        w
    }

    /// Reads from `offset` to the end, acking as it goes when `ack` is set.
    async fn read_to_end(buf: &OutputBuffer, mut offset: u64, ack: bool) -> Vec<u8> {
        let mut got = Vec::new();
        while let Some((at, c)) = buf.chunk_at(offset).await {
            assert_eq!(at, offset, "chunks follow each other");
            assert!(!c.is_empty() && c.len() <= CHUNK);
            offset += c.len() as u64;
            got.extend(c);
            if ack {
                buf.ack(offset);
            }
        }
        got
    }

    #[tokio::test]
    async fn delivers_everything_with_offsets_then_ends() {
        let buf = Arc::new(OutputBuffer::new(1024));
        let mut w = spawn_pump(&buf, 64);
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let writer = tokio::spawn({
            let data = data.clone();
            async move { w.write_all(&data).await.unwrap() }
        });
        assert_eq!(read_to_end(&buf, 0, true).await, data);
        writer.await.unwrap();
        assert_eq!(buf.lock().base, data.len() as u64);
    }

    #[tokio::test]
    async fn unacked_bytes_can_be_read_again() {
        let buf = OutputBuffer::new(1024);
        buf.push(b"hello world\n");
        buf.close();
        // A reader that never acks (it "died"): everything is still there.
        assert_eq!(read_to_end(&buf, 0, false).await, b"hello world\n");
        // It had stored offset 6 before dying: the next one resumes there.
        assert_eq!(read_to_end(&buf, 6, false).await, b"world\n");
        // Acked bytes are freed; an older offset starts at the oldest kept byte.
        buf.ack(6);
        assert_eq!(buf.lock().data.len(), 6);
        assert_eq!(buf.chunk_at(2).await, Some((6, b"world\n".to_vec())));
        // Acks never go backwards, and one past the end frees what there is.
        buf.ack(3);
        assert_eq!(buf.lock().base, 6);
        buf.ack(100);
        assert_eq!(buf.lock().base, 12);
        assert_eq!(buf.chunk_at(0).await, None);
    }

    #[tokio::test]
    async fn offset_past_the_end_waits_for_data() {
        let buf = Arc::new(OutputBuffer::new(1024));
        buf.push(b"ab");
        let reader = tokio::spawn({
            let buf = buf.clone();
            async move { buf.chunk_at(3).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!reader.is_finished());
        buf.push(b"cde");
        assert_eq!(reader.await.unwrap(), Some((3, b"de".to_vec())));
    }

    #[tokio::test]
    async fn unacked_bytes_apply_back_pressure() {
        let buf = Arc::new(OutputBuffer::new(100));
        let mut w = spawn_pump(&buf, 10);
        // Reading without acking does not make room: the writer blocks once the
        // buffer (100) and the pipe (10) are full.
        let writer = tokio::spawn(async move {
            w.write_all(&[7u8; 1000]).await.unwrap();
            w
        });
        let mut offset = 0;
        while offset < 100 {
            let (_, c) = buf.chunk_at(offset).await.unwrap();
            offset += c.len() as u64;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!writer.is_finished(), "writer was not blocked");
        assert_eq!(buf.lock().data.len(), 100);
        // Acks let it go on, and nothing is lost.
        buf.ack(offset);
        let mut total = offset;
        let mut w = loop {
            let (at, c) = buf.chunk_at(total).await.unwrap();
            assert_eq!(at, total);
            total += c.len() as u64;
            buf.ack(total);
            if total == 1000 {
                break writer.await.unwrap();
            }
        };
        w.shutdown().await.unwrap();
        drop(w);
        assert_eq!(buf.chunk_at(total).await, None);
    }

    #[tokio::test]
    async fn closed_buffer_ends_at_once() {
        assert!(OutputBuffer::closed().chunk_at(0).await.is_none());
    }
}
