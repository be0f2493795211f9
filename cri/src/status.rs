//! The one place where errors of the lower crates become gRPC statuses.

use tonic::{Code, Status};
use vessel_image::{ErrorCode, ImageError};

use crate::engine::RuntimeError;
use crate::store::StoreError;

/// The engine's errors at the gRPC edge: the one place they get a code.
impl From<RuntimeError> for Status {
    fn from(e: RuntimeError) -> Self {
        let code = match &e {
            RuntimeError::InvalidArgument(_) | RuntimeError::Input(_) => Code::InvalidArgument,
            RuntimeError::NotFound(_) => Code::NotFound,
            RuntimeError::FailedPrecondition(_) => Code::FailedPrecondition,
            RuntimeError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            RuntimeError::ResourceExhausted(_) => Code::ResourceExhausted,
            RuntimeError::Unavailable { .. } => Code::Unavailable,
            RuntimeError::Guest { code, .. } => *code,
            RuntimeError::Sandbox { .. } | RuntimeError::Internal(_) => Code::Internal,
            RuntimeError::Store(s) => match s {
                StoreError::NotFound { .. } => Code::NotFound,
                StoreError::Ambiguous { .. } => Code::InvalidArgument,
                StoreError::NameTaken { .. } => Code::AlreadyExists,
                StoreError::BadTransition { .. } => Code::FailedPrecondition,
                StoreError::Db(_) => Code::Internal,
                // Retried by vesseld; the call works again once the disk has room.
                StoreError::Unsaved(_) => Code::Unavailable,
            },
            RuntimeError::Image(i) => return image_status(i),
        };
        Status::new(code, e.to_string())
    }
}

/// Store errors at the gRPC edge (the readers that do not go through the engine).
pub fn store_status(e: StoreError) -> Status {
    RuntimeError::from(e).into()
}

/// Maps an image-store error to a status whose message says what to do about it.
pub fn image_status(e: &ImageError) -> Status {
    if let ImageError::LimitExceeded { .. } = e {
        // The message names the key; the hint says what the operator can do.
        let hint = "the image is larger than this node allows; use a smaller image, or, if \
                    it is trusted, raise that key in the [image] table of the vesseld \
                    config and restart vesseld";
        return Status::new(Code::InvalidArgument, format!("{e} ({hint})"));
    }
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
        let s = image_status(&ImageError::LimitExceeded {
            subject: "image x".into(),
            what: "its layer count (501)".into(),
            limit: 500,
            unit: "layers",
            key: "image.max_layers",
        });
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(
            s.message().contains("image.max_layers") && s.message().contains("500"),
            "{}",
            s.message()
        );
        assert!(
            !s.message().contains("use a reference like"),
            "{}",
            s.message()
        );
        let s = Status::from(RuntimeError::from(crate::validate::InvalidInput::LogPath {
            path: "../x".into(),
            reason: "contains \"..\"",
        }));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("../x"));
    }

    #[test]
    fn runtime_errors_map_once() {
        let code = |e: RuntimeError| Status::from(e).code();
        assert_eq!(code(RuntimeError::invalid("x")), Code::InvalidArgument);
        assert_eq!(code(RuntimeError::NotFound("x".into())), Code::NotFound);
        assert_eq!(
            code(RuntimeError::precondition("x")),
            Code::FailedPrecondition
        );
        assert_eq!(
            code(RuntimeError::DeadlineExceeded("x".into())),
            Code::DeadlineExceeded
        );
        assert_eq!(
            code(RuntimeError::sandbox(
                "x",
                vessel_sandbox::Error::NotRunning
            )),
            Code::Unavailable
        );
        assert_eq!(
            code(RuntimeError::Store(StoreError::NameTaken {
                kind: "pod",
                name: "n".into(),
                holder: "h".into()
            })),
            Code::AlreadyExists
        );
        assert_eq!(
            code(RuntimeError::agent(
                "agent ExecProcess",
                vessel_sandbox::Error::Agent(Status::permission_denied("no"))
            )),
            Code::PermissionDenied
        );
        assert_eq!(
            code(RuntimeError::Image(ImageError::NotFound("x".into()))),
            Code::NotFound
        );
    }
}
