//! The crate's error type and the coarse codes the CRI layer maps to gRPC status.

use std::sync::Arc;

/// Coarse classification of an [`ImageError`], mapped once to a gRPC code by the CRI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The image, manifest or blob does not exist.
    NotFound,
    /// The request itself is malformed (bad reference), or asks for an image this
    /// node refuses (unsupported, or over a configured limit).
    InvalidArgument,
    /// The registry wants (other) credentials.
    Unauthenticated,
    /// The credentials are valid but not allowed to pull.
    PermissionDenied,
    /// Content did not match its digest or was hostile.
    DataLoss,
    /// The registry could not be reached or failed, or answered past what this node
    /// accepts (an oversized answer, a redirect to a local address).
    Unavailable,
    /// The registry was too slow: a download fell below the minimum rate.
    DeadlineExceeded,
    /// The image cannot be removed in the state it is in (still in use).
    FailedPrecondition,
    /// Anything else (local I/O, database).
    Internal,
}

/// Errors of the image store. Cheap to clone so that one failed shared download can be
/// reported to every pull waiting on it.
#[derive(thiserror::Error, Debug, Clone)]
pub enum ImageError {
    /// No such image, manifest or blob.
    #[error("not found: {0}")]
    NotFound(String),
    /// The reference cannot be parsed.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        /// The reference as given.
        reference: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The registry answered 401.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The registry answered 403.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// Downloaded content hashes to something else than its descriptor says.
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The digest the manifest (or reference) promised.
        expected: String,
        /// The digest of what was received.
        actual: String,
    },
    /// A layer holds an entry that would escape or damage the snapshot.
    #[error("unsafe layer {digest}: {reason}")]
    UnsafeLayer {
        /// The layer blob's digest.
        digest: String,
        /// What was wrong.
        reason: String,
    },
    /// The registry failed or sent something unusable.
    #[error("registry: {0}")]
    Registry(String),
    /// A registry's answer (token, manifest) is larger than vesseld reads; the rest
    /// was not read.
    #[error("{subject}: {body} too large ({seen} bytes or more, limit {limit})")]
    ResponseTooLarge {
        /// What was being fetched, from where.
        subject: String,
        /// Which answer ("manifest", "token response").
        body: &'static str,
        /// Bytes declared or received when it was refused.
        seen: u64,
        /// The cap, in bytes.
        limit: u64,
    },
    /// The registry sent vesseld (a redirect, a token realm) to a local address,
    /// which is not reached from the host's network namespace for a registry not
    /// configured as local. Nothing was sent there.
    #[error(
        "{subject}: refused to follow the registry to {target}: a {reason} address, \
         reached only for a registry with local = true in its hosts.toml"
    )]
    RedirectRefused {
        /// What was being fetched, from where.
        subject: String,
        /// Where the registry pointed (bounded).
        target: String,
        /// What kind of address it is ("loopback", "link-local", ...).
        reason: &'static str,
    },
    /// The registry sent too slowly (below the configured minimum rate or past the
    /// manifest deadline).
    #[error("registry too slow: {0}")]
    TooSlow(String),
    /// The image uses something this runtime does not support (platform, media type).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The image is over a limit this node is configured with
    /// ([`crate::ImageLimits`]). The pull stopped when the limit was crossed; what the
    /// layer being unpacked had written is removed.
    #[error(
        "{subject}: {what} exceeds the limit of {limit} {unit} set by {key} in the \
         vesseld config"
    )]
    LimitExceeded {
        /// What was refused: the image, and the layer where the limit was crossed.
        subject: String,
        /// What was counted.
        what: String,
        /// The configured limit.
        limit: u64,
        /// What the limit counts ("bytes", "entries", "layers").
        unit: &'static str,
        /// The configuration key that sets it (e.g. `image.max_unpacked_bytes`).
        key: &'static str,
    },
    /// A local filesystem operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, and on which path.
        context: String,
        /// The underlying error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The metadata database or the snapshot store failed.
    #[error("store: {0}")]
    Store(String),
    /// Removing the image would take the layers of a container that still exists.
    #[error("image {image} is in use by {user}")]
    InUse {
        /// The image id.
        image: String,
        /// Who uses it (e.g. a container id).
        user: String,
    },
}

impl ImageError {
    /// The coarse code the CRI maps to a gRPC status.
    pub fn code(&self) -> ErrorCode {
        match self {
            ImageError::NotFound(_) => ErrorCode::NotFound,
            ImageError::InvalidReference { .. } => ErrorCode::InvalidArgument,
            ImageError::Unauthenticated(_) => ErrorCode::Unauthenticated,
            ImageError::PermissionDenied(_) => ErrorCode::PermissionDenied,
            ImageError::DigestMismatch { .. } | ImageError::UnsafeLayer { .. } => {
                ErrorCode::DataLoss
            }
            ImageError::Registry(_)
            | ImageError::ResponseTooLarge { .. }
            | ImageError::RedirectRefused { .. } => ErrorCode::Unavailable,
            ImageError::TooSlow(_) => ErrorCode::DeadlineExceeded,
            ImageError::Unsupported(_) | ImageError::LimitExceeded { .. } => {
                ErrorCode::InvalidArgument
            }
            ImageError::Io { .. } | ImageError::Store(_) => ErrorCode::Internal,
            ImageError::InUse { .. } => ErrorCode::FailedPrecondition,
        }
    }

    /// Wraps an I/O error with what was being done.
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| ImageError::Io {
            context,
            source: Arc::new(source),
        }
    }

    /// Wraps a database (or other store) error.
    pub(crate) fn store(e: impl std::fmt::Display) -> Self {
        ImageError::Store(e.to_string())
    }
}

impl From<vessel_storage::StorageError> for ImageError {
    fn from(e: vessel_storage::StorageError) -> Self {
        ImageError::Store(e.to_string())
    }
}
