use std::path::PathBuf;

/// Errors of the snapshot store.
#[derive(thiserror::Error, Debug)]
pub enum StorageError {
    /// The chain id is not `<algorithm>:<lowercase hex>` (or bare hex) of a known size.
    #[error("invalid chain id {0:?}")]
    InvalidChainId(String),
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("create", "rename", ...).
        op: &'static str,
        /// The path it was done on.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The process exporting a share dir (virtiofsd) cannot be used for a mount:
    /// gone, or not (yet) in its own namespace rooted at the share dir.
    #[error("share dir exporter: {what}: {source}")]
    Exporter {
        /// The step that failed.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A request the store refuses (bad name or size).
    #[error("invalid {0}")]
    Invalid(String),
    /// mkfs.ext4 failed on a new scratch disk.
    #[error("mkfs.ext4 {path}: {message}")]
    Mkfs {
        /// The disk file.
        path: PathBuf,
        /// Exit status and stderr.
        message: String,
    },
    /// A new scratch disk would promise more than the filesystem can back.
    #[error(
        "no room for a scratch disk of {need} bytes: the pods' disks may still grow by \
         {promised} bytes and {dir} has {available} bytes free (scratch_overcommit \
         {ratio}); free space there, lower writable_layer_mib or raise \
         [containers] scratch_overcommit"
    )]
    NoRoom {
        /// The new disk's size.
        need: u64,
        /// What the existing disks may still take (apparent size minus allocated).
        promised: u64,
        /// Free bytes of the filesystem.
        available: u64,
        /// The allowed overcommit.
        ratio: f64,
        /// The disks' directory.
        dir: PathBuf,
    },
}

impl StorageError {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| StorageError::Io { op, path, source }
    }
}
