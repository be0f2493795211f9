//! Layer unpack: one (possibly compressed) layer tar into a snapshot directory.
//!
//! Every filesystem change is made relative to a directory fd opened with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, so no entry of a hostile layer
//! can reach outside the destination, neither with `..` nor through a symlink an
//! earlier entry created. OCI whiteouts become overlayfs whiteouts.
//!
//! What a layer may write is bounded by an [`UnpackBudget`]: bytes of content and
//! entries, shared by all layers of one pull and charged before each chunk is
//! written, so that a small compressed layer cannot fill the disk or the inode table.

mod entry;
mod guard;
mod path;
mod safefs;
#[cfg(test)]
mod tests;

use std::io::{BufReader, Read};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

pub use guard::RecordTooLarge;
pub use path::WHITEOUT_PREFIX;

/// Compression of a layer blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip (one or more members).
    Gzip,
    /// zstd (one or more frames).
    Zstd,
}

impl Compression {
    /// Compression of an OCI or Docker layer media type.
    pub fn from_media_type(mt: &str) -> Result<Self, UnpackError> {
        // Parameters ("; foo=bar") do not change the format.
        let base = mt.split(';').next().unwrap_or("").trim();
        Ok(match base {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Compression::None,
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Compression::Gzip,
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Compression::Zstd,
            _ => return Err(UnpackError::UnsupportedMediaType(mt.to_owned())),
        })
    }
}

/// What one unpack wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Tar entries applied (whiteouts included).
    pub entries: u64,
    /// Bytes of regular-file content written.
    pub bytes: u64,
}

/// Errors of [`unpack_layer`].
#[derive(thiserror::Error, Debug)]
pub enum UnpackError {
    /// A hostile or malformed entry: it would escape the destination, go through a
    /// symlink, or cannot be represented safely.
    #[error("unsafe layer entry {path:?}: {reason}")]
    Unsafe {
        /// The entry's path as written in the tar.
        path: String,
        /// Why it was refused.
        reason: String,
    },
    /// A filesystem operation failed while applying an entry.
    #[error("unpack {path:?}: {source}")]
    Io {
        /// The entry's path as written in the tar (or the destination).
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The stream is not a valid (compressed) tar.
    #[error("reading layer tar: {0}")]
    Tar(#[source] std::io::Error),
    /// A record the tar reader would hold in memory (GNU long name or link, PAX
    /// header, sparse map) declares more than the cap; nothing of it was allocated.
    #[error("layer tar refused: {0}")]
    TooLarge(#[source] RecordTooLarge),
    /// The layer media type is not one this unpacker knows.
    #[error("unsupported layer media type {0:?}")]
    UnsupportedMediaType(String),
    /// The layer (with the others sharing its [`UnpackBudget`]) holds more than the
    /// budget allows. Nothing past the limit was written.
    #[error("more than {limit} {} in the image's layers", what.unit())]
    LimitExceeded {
        /// Which limit.
        what: Limit,
        /// Its value.
        limit: u64,
    },
}

/// A quantity an [`UnpackBudget`] bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Bytes read out of the tar for its entries: regular-file content (sparse holes
    /// included: they are read as zeros), data of the entries that have none on disk,
    /// xattr values, and anything after the end-of-archive marker.
    Bytes,
    /// Tar entries: files, directories, links, devices, whiteouts, PAX global headers.
    Entries,
}

impl Limit {
    /// The unit the limit counts in.
    pub fn unit(self) -> &'static str {
        match self {
            Limit::Bytes => "bytes",
            Limit::Entries => "entries",
        }
    }
}

/// The most one budget lets through: no real image comes near the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Bytes (see [`Limit::Bytes`]); default 64 GiB.
    pub max_bytes: u64,
    /// Entries (see [`Limit::Entries`]); default 4,000,000.
    pub max_entries: u64,
}

impl UnpackLimits {
    /// Default of [`UnpackLimits::max_bytes`].
    pub const DEFAULT_MAX_BYTES: u64 = 64 << 30;
    /// Default of [`UnpackLimits::max_entries`].
    pub const DEFAULT_MAX_ENTRIES: u64 = 4_000_000;
}

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits {
            max_bytes: Self::DEFAULT_MAX_BYTES,
            max_entries: Self::DEFAULT_MAX_ENTRIES,
        }
    }
}

/// What is left of an [`UnpackLimits`] for the layers of one pull. Cheap to clone:
/// clones share the counters, so layers unpacking concurrently draw from one budget.
///
/// Each chunk of content is charged before it is written, each entry before it is
/// applied. Once one limit is crossed the budget stays exhausted: every later charge
/// fails with that limit, so the other layers drawing from it stop at their next
/// chunk or entry.
#[derive(Debug, Clone)]
pub struct UnpackBudget {
    inner: Arc<BudgetState>,
}

#[derive(Debug)]
struct BudgetState {
    limits: UnpackLimits,
    bytes_left: AtomicU64,
    entries_left: AtomicU64,
    /// 0: within budget; otherwise the [`Limit`] crossed first (see `TRIPPED_*`).
    tripped: AtomicU8,
}

const TRIPPED_BYTES: u8 = 1;
const TRIPPED_ENTRIES: u8 = 2;

impl UnpackBudget {
    /// A fresh budget of `limits`.
    pub fn new(limits: UnpackLimits) -> Self {
        UnpackBudget {
            inner: Arc::new(BudgetState {
                limits,
                bytes_left: AtomicU64::new(limits.max_bytes),
                entries_left: AtomicU64::new(limits.max_entries),
                tripped: AtomicU8::new(0),
            }),
        }
    }

    /// The limits this budget started from.
    pub fn limits(&self) -> UnpackLimits {
        self.inner.limits
    }

    /// `(bytes, entries)` still allowed.
    pub fn remaining(&self) -> (u64, u64) {
        (
            self.inner.bytes_left.load(Ordering::Relaxed),
            self.inner.entries_left.load(Ordering::Relaxed),
        )
    }

    /// The error of the limit crossed first, if one was.
    pub fn exceeded(&self) -> Option<UnpackError> {
        let (what, limit) = match self.inner.tripped.load(Ordering::Acquire) {
            0 => return None,
            TRIPPED_BYTES => (Limit::Bytes, self.inner.limits.max_bytes),
            _ => (Limit::Entries, self.inner.limits.max_entries),
        };
        Some(UnpackError::LimitExceeded { what, limit })
    }

    /// Takes `n` bytes, or fails (taking nothing) if fewer are left.
    pub(crate) fn take_bytes(&self, n: u64) -> Result<(), UnpackError> {
        self.take(&self.inner.bytes_left, n, TRIPPED_BYTES)
    }

    /// Takes one entry, or fails if none is left.
    pub(crate) fn take_entry(&self) -> Result<(), UnpackError> {
        self.take(&self.inner.entries_left, 1, TRIPPED_ENTRIES)
    }

    fn take(&self, left: &AtomicU64, n: u64, tag: u8) -> Result<(), UnpackError> {
        if let Some(e) = self.exceeded() {
            return Err(e);
        }
        if left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(n))
            .is_err()
        {
            // The first limit crossed is the one reported, by every layer.
            let _ =
                self.inner
                    .tripped
                    .compare_exchange(0, tag, Ordering::AcqRel, Ordering::Acquire);
            return Err(self.exceeded().unwrap_or(UnpackError::LimitExceeded {
                what: Limit::Bytes,
                limit: self.inner.limits.max_bytes,
            }));
        }
        Ok(())
    }
}

/// Unpack one layer tar stream into an empty dir `dest` (a snapshot being prepared),
/// converting OCI whiteouts to overlayfs whiteouts. Rejects hostile entries, and
/// layers beyond the default [`UnpackLimits`] (a budget of its own).
///
/// On error `dest` is left partially filled; the caller discards it (dropping the
/// `PendingSnapshot`). The stream is read to its end even after the tar's
/// end-of-archive marker, so a digest computed by a wrapping reader covers the blob.
pub fn unpack_layer<R: Read>(
    reader: R,
    compression: Compression,
    dest: &Path,
) -> Result<UnpackStats, UnpackError> {
    let budget = UnpackBudget::new(UnpackLimits::default());
    unpack_layer_within(reader, compression, dest, &budget)
}

/// [`unpack_layer`] drawing from `budget` (shared with the other layers of a pull):
/// fails with [`UnpackError::LimitExceeded`] before writing past it.
pub fn unpack_layer_within<R: Read>(
    reader: R,
    compression: Compression,
    dest: &Path,
    budget: &UnpackBudget,
) -> Result<UnpackStats, UnpackError> {
    let reader = BufReader::with_capacity(256 * 1024, reader);
    match compression {
        Compression::None => unpack_tar(reader, dest, budget),
        Compression::Gzip => unpack_tar(flate2::read::MultiGzDecoder::new(reader), dest, budget),
        Compression::Zstd => {
            let decoder =
                zstd::stream::read::Decoder::with_buffer(reader).map_err(UnpackError::Tar)?;
            unpack_tar(decoder, dest, budget)
        }
    }
}

fn unpack_tar<R: Read>(
    reader: R,
    dest: &Path,
    budget: &UnpackBudget,
) -> Result<UnpackStats, UnpackError> {
    let mut unpacker = entry::Unpacker::new(dest, budget.clone())?;
    // Every byte reaches `tar` through the guard, which refuses oversized records
    // before `tar` reads (and allocates for) them.
    let mut reader = guard::HeaderGuard::new(reader);
    let res = (|| {
        let mut archive = tar::Archive::new(&mut reader);
        for item in archive.entries().map_err(UnpackError::Tar)? {
            let mut item = item.map_err(UnpackError::Tar)?;
            unpacker.apply(&mut item)?;
        }
        Ok(())
    })();
    // `tar` may wrap or replace the guard's error; report the cause itself.
    if let Some(v) = reader.violation() {
        return Err(UnpackError::TooLarge(v.clone()));
    }
    res?;
    unpacker.finish()?;
    // Drain padding after the end-of-archive blocks (see the doc comment above),
    // within the budget: zeros there cost no disk but all of the decompression.
    unpacker.drain(&mut reader)?;
    Ok(unpacker.stats())
}
