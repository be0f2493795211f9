//! What the engine's calls fail with. Each variant is one kind of failure the
//! caller reacts to differently; `crate::status` turns it into a gRPC status once,
//! at the edge.

use tonic::Code;
use vessel_image::ImageError;

use crate::store::StoreError;
use crate::validate::InvalidInput;

/// Most bytes of a guest-written message passed on to the client.
const MAX_GUEST_MESSAGE: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The request is malformed or asks for what vessel refuses.
    #[error("{0}")]
    InvalidArgument(String),
    /// A refused request field (see `crate::validate`).
    #[error(transparent)]
    Input(#[from] InvalidInput),
    /// What the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The pod or container is not in a state that allows the call.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Something did not happen in time.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A bound on what the guest may send was hit.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The pod VM or its agent is gone or unreachable.
    #[error("{what}: {detail} (the pod VM may have died; check the pod's state)")]
    Unavailable { what: &'static str, detail: String },
    /// The guest agent refused the call with its own code. Its message is the
    /// guest's to choose: bounded and stripped of control characters.
    #[error("{what}: {message}")]
    Guest {
        what: &'static str,
        code: Code,
        message: String,
    },
    /// Starting, stopping or reaching the pod VM failed on the host.
    #[error("{what}: {source}")]
    Sandbox {
        what: &'static str,
        #[source]
        source: vessel_sandbox::Error,
    },
    /// The state store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The image store.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A host-side step failed (files, mounts, the network); the message says where
    /// to look.
    #[error("{0}")]
    Internal(String),
}

impl RuntimeError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        RuntimeError::InvalidArgument(msg.into())
    }

    pub fn precondition(msg: impl Into<String>) -> Self {
        RuntimeError::FailedPrecondition(msg.into())
    }

    pub fn internal(msg: impl Into<String>) -> Self {
        RuntimeError::Internal(msg.into())
    }

    /// A failed call to the pod's agent: its code is kept (a dead VM reads as
    /// Unavailable, a slow one as DeadlineExceeded).
    pub fn agent(what: &'static str, e: vessel_sandbox::Error) -> Self {
        match e {
            // tonic's own codes for a broken connection (Unavailable, Cancelled,
            // DeadlineExceeded) map the same way as the guest's.
            vessel_sandbox::Error::Agent(s) => RuntimeError::Guest {
                what,
                code: s.code(),
                message: guest_text(s.message()),
            },
            e => RuntimeError::sandbox(what, e),
        }
    }

    /// A failed VM operation on the host side.
    pub fn sandbox(what: &'static str, e: vessel_sandbox::Error) -> Self {
        use vessel_sandbox::Error as E;
        match e {
            E::Timeout(..) => RuntimeError::DeadlineExceeded(format!("{what}: {e}")),
            E::NotRunning | E::Connect(_) => RuntimeError::Unavailable {
                what,
                detail: e.to_string(),
            },
            E::Agent(_) => RuntimeError::agent(what, e),
            e => RuntimeError::Sandbox { what, source: e },
        }
    }

    /// A blocking task that panicked or was cancelled.
    pub fn task(what: &str, e: tokio::task::JoinError) -> Self {
        RuntimeError::Internal(format!("{what} failed: {e}"))
    }
}

/// A guest-written string made safe to pass on: at most [`MAX_GUEST_MESSAGE`]
/// bytes, control characters replaced.
fn guest_text(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len().min(MAX_GUEST_MESSAGE));
    for ch in raw.chars() {
        if out.len() + ch.len_utf8() > MAX_GUEST_MESSAGE {
            out.push('…');
            break;
        }
        out.push(if ch.is_control() { ' ' } else { ch });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_text_is_bounded_and_printable() {
        assert_eq!(guest_text("bad\narg\x1b[31m"), "bad arg [31m");
        let long = "x".repeat(10_000);
        let t = guest_text(&long);
        assert!(t.len() <= MAX_GUEST_MESSAGE + '…'.len_utf8());
        assert!(t.ends_with('…'));
        // Never cut inside a character.
        let wide = "é".repeat(1000);
        assert!(guest_text(&wide).chars().all(|c| c == 'é' || c == '…'));
    }

    #[test]
    fn guest_codes_are_kept_transport_is_unavailable() {
        let e = RuntimeError::agent(
            "agent StartContainer",
            vessel_sandbox::Error::Agent(tonic::Status::invalid_argument("no such\x07 binary")),
        );
        match e {
            RuntimeError::Guest { code, message, .. } => {
                assert_eq!(code, Code::InvalidArgument);
                assert_eq!(message, "no such  binary");
            }
            e => panic!("{e:?}"),
        }
        let e = RuntimeError::sandbox("agent StartContainer", vessel_sandbox::Error::NotRunning);
        assert!(matches!(e, RuntimeError::Unavailable { .. }));
        let e = RuntimeError::sandbox(
            "cannot start the pod VM",
            vessel_sandbox::Error::Timeout(std::time::Duration::from_secs(1), "x".into()),
        );
        assert!(matches!(e, RuntimeError::DeadlineExceeded(_)));
    }
}
