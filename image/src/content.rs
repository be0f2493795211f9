//! Content-addressed blob store: `content/blobs/sha256/<hex>`.
//!
//! Blobs are streamed into `content/ingest/`, hashed as they arrive, fsynced, checked
//! against their digest and only then renamed into place, so a blob that exists is
//! always complete and verified. `open` discards leftover ingest files.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use crate::registry::BlobStream;
use crate::{DownloadLimits, ImageError};

/// Checks that `digest` is `sha256:<64 lowercase hex>` and returns the hex.
pub(crate) fn digest_hex(digest: &str) -> Result<&str, ImageError> {
    match digest.split_once(':') {
        Some(("sha256", hex))
            if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            Ok(hex)
        }
        _ => Err(ImageError::Unsupported(format!("digest {digest:?}"))),
    }
}

/// `sha256:<hex>` of `data`.
pub(crate) fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn fsync_dir(dir: &Path) -> Result<(), ImageError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(ImageError::io(format!("fsync {}", dir.display())))
}

/// The blob store.
#[derive(Debug, Clone)]
pub(crate) struct ContentStore {
    blobs: PathBuf,
    ingest: PathBuf,
    root: PathBuf,
    limits: DownloadLimits,
}

/// Checks a download's rate, window by window.
struct RateCheck {
    limits: DownloadLimits,
    window_end: tokio::time::Instant,
    window_bytes: u64,
}

impl RateCheck {
    fn new(limits: DownloadLimits) -> Self {
        RateCheck {
            limits,
            window_end: tokio::time::Instant::now() + limits.window,
            window_bytes: 0,
        }
    }

    /// When the current window closes (never when the check is off).
    fn deadline(&self) -> Option<tokio::time::Instant> {
        (self.limits.min_rate > 0).then_some(self.window_end)
    }

    /// Counts `n` bytes received now; at or past the window's end, checks it and
    /// starts the next. Err(what was received in the window) when too slow.
    fn add(&mut self, n: u64) -> Result<(), u64> {
        self.window_bytes += n;
        let now = tokio::time::Instant::now();
        if self.limits.min_rate == 0 || now < self.window_end {
            return Ok(());
        }
        let need = self.limits.min_rate as f64 * self.limits.window.as_secs_f64();
        if (self.window_bytes as f64) < need {
            return Err(self.window_bytes);
        }
        self.window_bytes = 0;
        self.window_end = now + self.limits.window;
        Ok(())
    }
}

impl ContentStore {
    /// Opens (creating) the store under `root` and removes unfinished ingests.
    pub(crate) fn open(root: &Path) -> Result<Self, ImageError> {
        let blobs = root.join("blobs/sha256");
        let ingest = root.join("ingest");
        for dir in [&blobs, &ingest] {
            std::fs::create_dir_all(dir)
                .map_err(ImageError::io(format!("create {}", dir.display())))?;
        }
        let entries = std::fs::read_dir(&ingest)
            .map_err(ImageError::io(format!("read {}", ingest.display())))?;
        for entry in entries.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
        Ok(ContentStore {
            blobs,
            ingest,
            root: root.to_path_buf(),
            limits: DownloadLimits::default(),
        })
    }

    /// Uses `limits` for downloads.
    pub(crate) fn with_limits(mut self, limits: DownloadLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The store's top directory.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// Where blob `digest` lives (whether or not it exists).
    pub(crate) fn path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.blobs.join(digest_hex(digest)?))
    }

    /// Whether the verified blob `digest` is present.
    pub(crate) fn exists(&self, digest: &str) -> bool {
        self.path(digest).is_ok_and(|p| p.is_file())
    }

    /// Reads a (small) blob whole.
    pub(crate) fn read(&self, digest: &str) -> Result<Vec<u8>, ImageError> {
        let path = self.path(digest)?;
        std::fs::read(&path).map_err(ImageError::io(format!("read {}", path.display())))
    }

    fn ingest_path(&self, hex: &str) -> PathBuf {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        self.ingest
            .join(format!("{hex}-{}-{n}", std::process::id()))
    }

    /// Publishes a fully written, fsynced temp file as blob `hex`.
    fn publish(&self, tmp: &Path, hex: &str) -> Result<(), ImageError> {
        let dest = self.blobs.join(hex);
        std::fs::rename(tmp, &dest)
            .map_err(ImageError::io(format!("rename {}", dest.display())))?;
        fsync_dir(&self.blobs)
    }

    /// Stores `data` as blob `digest` after checking it hashes to `digest`.
    pub(crate) fn write_bytes(&self, digest: &str, data: &[u8]) -> Result<(), ImageError> {
        let hex = digest_hex(digest)?;
        let actual = sha256_digest(data);
        if actual != digest {
            return Err(ImageError::DigestMismatch {
                expected: digest.to_owned(),
                actual,
            });
        }
        if self.exists(digest) {
            return Ok(());
        }
        let tmp = self.ingest_path(hex);
        let guard = RemoveOnDrop(Some(tmp.clone()));
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()
        };
        write().map_err(ImageError::io(format!("write {}", tmp.display())))?;
        self.publish(&tmp, hex)?;
        guard.disarm();
        Ok(())
    }

    /// Streams a blob into the store, verifying size and digest. Returns the bytes
    /// received. On any failure nothing is left behind.
    pub(crate) async fn ingest(
        &self,
        digest: &str,
        size: Option<u64>,
        mut stream: BlobStream,
    ) -> Result<u64, ImageError> {
        let hex = digest_hex(digest)?;
        let tmp = self.ingest_path(hex);
        let guard = RemoveOnDrop(Some(tmp.clone()));
        let io = |what: &str| ImageError::io(format!("{what} {}", tmp.display()));
        let file = tokio::fs::File::create(&tmp).await.map_err(io("create"))?;
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let mut hasher = Sha256::new();
        let mut received = 0u64;
        let mut rate = RateCheck::new(self.limits);
        let too_slow = |got: u64, received: u64| {
            ImageError::TooSlow(format!(
                "download of {digest}: {got} bytes in the last {}s, below the minimum of \
                 {} bytes/s (image.min_download_rate_kib); {received} bytes received",
                self.limits.window.as_secs_f64(),
                self.limits.min_rate,
            ))
        };
        loop {
            let next = match rate.deadline() {
                Some(at) => match tokio::time::timeout_at(at, stream.next()).await {
                    Ok(next) => next,
                    // Nothing arrived before the window closed: check what did.
                    Err(_) => match rate.add(0) {
                        Ok(()) => continue,
                        Err(got) => return Err(too_slow(got, received)),
                    },
                },
                None => stream.next().await,
            };
            let Some(chunk) = next else { break };
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    return Err(ImageError::Registry(format!(
                        "download of {digest}: {}",
                        crate::registry::with_causes(&e)
                    )));
                }
            };
            received += chunk.len() as u64;
            rate.add(chunk.len() as u64)
                .map_err(|got| too_slow(got, received))?;
            if size.is_some_and(|s| received > s) {
                return Err(ImageError::Registry(format!(
                    "blob {digest} is larger than its descriptor's {} bytes",
                    size.unwrap_or_default()
                )));
            }
            hasher.update(&chunk);
            out.write_all(&chunk).await.map_err(io("write"))?;
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != digest {
            return Err(ImageError::DigestMismatch {
                expected: digest.to_owned(),
                actual,
            });
        }
        if size.is_some_and(|s| received != s) {
            return Err(ImageError::Registry(format!(
                "blob {digest}: got {received} bytes, descriptor says {}",
                size.unwrap_or_default()
            )));
        }
        out.flush().await.map_err(io("flush"))?;
        let file = out.into_inner();
        file.sync_all().await.map_err(io("fsync"))?;
        drop(file);
        let this = self.clone();
        let (tmp2, hex2) = (tmp.clone(), hex.to_owned());
        tokio::task::spawn_blocking(move || this.publish(&tmp2, &hex2))
            .await
            .map_err(|e| ImageError::Store(format!("publish task: {e}")))??;
        guard.disarm();
        Ok(received)
    }

    /// Digests of all stored blobs.
    pub(crate) fn list(&self) -> Result<Vec<String>, ImageError> {
        let entries = std::fs::read_dir(&self.blobs)
            .map_err(ImageError::io(format!("read {}", self.blobs.display())))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            if let Some(name) = entry.file_name().to_str() {
                let d = format!("sha256:{name}");
                if digest_hex(&d).is_ok() {
                    out.push(d);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Deletes blob `digest` (absent is fine).
    pub(crate) fn remove(&self, digest: &str) -> Result<(), ImageError> {
        let path = self.path(digest)?;
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(ImageError::io(format!("remove {}", path.display()))(e))
            }
            _ => Ok(()),
        }
    }
}

/// Deletes a temp file unless disarmed (the blob was published).
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream_of(chunks: Vec<&'static [u8]>) -> BlobStream {
        futures::stream::iter(chunks.into_iter().map(|c| Ok(bytes::Bytes::from_static(c)))).boxed()
    }

    #[tokio::test]
    async fn ingest_verifies_and_publishes() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ContentStore::open(dir.path()).unwrap();
        let d = sha256_digest(b"hello world");
        let n = cs
            .ingest(&d, Some(11), stream_of(vec![b"hello ", b"world"]))
            .await
            .unwrap();
        assert_eq!(n, 11);
        assert!(cs.exists(&d));
        assert_eq!(cs.read(&d).unwrap(), b"hello world");
        assert_eq!(cs.list().unwrap(), vec![d.clone()]);

        let wrong = sha256_digest(b"other");
        let err = cs
            .ingest(&wrong, None, stream_of(vec![b"hello world"]))
            .await
            .unwrap_err();
        match err {
            ImageError::DigestMismatch { expected, actual } => {
                assert_eq!(expected, wrong);
                assert_eq!(actual, d);
            }
            e => panic!("{e:?}"),
        }
        assert!(!cs.exists(&wrong));
        // Oversized streams stop early.
        let err = cs
            .ingest(&wrong, Some(3), stream_of(vec![b"hello world"]))
            .await
            .unwrap_err();
        assert!(matches!(err, ImageError::Registry(_)), "{err:?}");
        // Nothing left in ingest.
        assert_eq!(
            std::fs::read_dir(dir.path().join("ingest"))
                .unwrap()
                .count(),
            0
        );
        cs.remove(&d).unwrap();
        assert!(!cs.exists(&d));
        assert!(cs.path("sha256:../../etc").is_err());
    }

    #[test]
    fn open_cleans_leftover_ingests() {
        let dir = tempfile::tempdir().unwrap();
        ContentStore::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("ingest/partial"), b"x").unwrap();
        ContentStore::open(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("ingest"))
                .unwrap()
                .count(),
            0
        );
    }
}
