//! The one place where errors of the lower crates become gRPC statuses.

use tonic::{Code, Status};
use vessel_image::{ErrorCode, ImageError};

use crate::validate::InvalidInput;

/// A refused request field: the caller's mistake (or attack), InvalidArgument.
pub fn invalid_input_status(e: &InvalidInput) -> Status {
    Status::invalid_argument(e.to_string())
}

/// Maps an image-store error to a status whose message says what to do about it.
pub fn image_status(e: &ImageError) -> Status {
    let (code, hint) = match e.code() {
        ErrorCode::NotFound => (
            Code::NotFound,
            "check the image name and tag (crictl images lists what is present)",
        ),
        ErrorCode::InvalidArgument => (
            Code::InvalidArgument,
            "use a reference like registry.example.com/repo/name:tag or name@sha256:<digest>",
        ),
        ErrorCode::Unauthenticated => (
            Code::Unauthenticated,
            "pass registry credentials (crictl pull --creds user:password)",
        ),
        ErrorCode::PermissionDenied => (
            Code::PermissionDenied,
            "the credentials are not allowed to pull this repository",
        ),
        ErrorCode::DataLoss => (
            Code::DataLoss,
            "the registry served content that failed verification; nothing was stored",
        ),
        ErrorCode::Unavailable => (
            Code::Unavailable,
            "check that the registry (or its mirror in certs_dir/<host>/hosts.toml) is reachable, then retry",
        ),
        ErrorCode::DeadlineExceeded => (
            Code::DeadlineExceeded,
            "the registry sent too slowly; check it (or its mirror), or lower \
             [image] min_download_rate_kib",
        ),
        ErrorCode::FailedPrecondition => (
            Code::FailedPrecondition,
            "remove the containers that use it first (crictl ps -a lists them)",
        ),
        ErrorCode::Internal => (
            Code::Internal,
            "see the vesseld log; check free space and permissions under the root dir",
        ),
    };
    Status::new(code, format!("{e} ({hint})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map() {
        let s = image_status(&ImageError::InvalidReference {
            reference: "UPPER".into(),
            reason: "uppercase".into(),
        });
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("UPPER"));
        assert_eq!(
            image_status(&ImageError::NotFound("x".into())).code(),
            Code::NotFound
        );
        assert_eq!(
            image_status(&ImageError::Registry("down".into())).code(),
            Code::Unavailable
        );
        assert_eq!(
            image_status(&ImageError::TooSlow("trickle".into())).code(),
            Code::DeadlineExceeded
        );
        let s = invalid_input_status(&InvalidInput::LogPath {
            path: "../x".into(),
            reason: "contains \"..\"",
        });
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("../x"));
    }
}
