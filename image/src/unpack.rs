//! Layer unpack: one (possibly compressed) layer tar into a snapshot directory.
//!
//! Every filesystem change is made relative to a directory fd opened with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, so no entry of a hostile layer
//! can reach outside the destination, neither with `..` nor through a symlink an
//! earlier entry created. OCI whiteouts become overlayfs whiteouts.

mod entry;
mod guard;
mod path;
mod safefs;
#[cfg(test)]
mod tests;

use std::io::{BufReader, Read};
use std::path::Path;

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
}

/// Unpack one layer tar stream into an empty dir `dest` (a snapshot being prepared),
/// converting OCI whiteouts to overlayfs whiteouts. Rejects hostile entries.
///
/// On error `dest` is left partially filled; the caller discards it (dropping the
/// `PendingSnapshot`). The stream is read to its end even after the tar's
/// end-of-archive marker, so a digest computed by a wrapping reader covers the blob.
pub fn unpack_layer<R: Read>(
    reader: R,
    compression: Compression,
    dest: &Path,
) -> Result<UnpackStats, UnpackError> {
    let reader = BufReader::with_capacity(256 * 1024, reader);
    match compression {
        Compression::None => unpack_tar(reader, dest),
        Compression::Gzip => unpack_tar(flate2::read::MultiGzDecoder::new(reader), dest),
        Compression::Zstd => {
            let decoder =
                zstd::stream::read::Decoder::with_buffer(reader).map_err(UnpackError::Tar)?;
            unpack_tar(decoder, dest)
        }
    }
}

fn unpack_tar<R: Read>(reader: R, dest: &Path) -> Result<UnpackStats, UnpackError> {
    let mut unpacker = entry::Unpacker::new(dest)?;
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
    // Drain padding after the end-of-archive blocks (see the doc comment above).
    std::io::copy(&mut reader, &mut std::io::sink()).map_err(UnpackError::Tar)?;
    Ok(unpacker.stats())
}
