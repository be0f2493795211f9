//! Errors of the sandbox crate.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong driving a pod VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is unusable.
    #[error("invalid VM config: {0}")]
    InvalidConfig(String),
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A helper program (QEMU, virtiofsd, vhost-device-vsock) could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A helper process (or the VM itself) exited before it became ready.
    #[error("{program} exited during startup; its log ends with:\n{log_tail}")]
    HelperDied {
        /// The program.
        program: String,
        /// The last lines of its log (the run dir is gone after an unwound start).
        log_tail: String,
    },
    /// Something did not happen in time.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    /// The guest booted no agent in time.
    #[error("the agent did not answer within {limit:?} (last error: {last_error}); console ends with:\n{log_tail}")]
    AgentNotReady {
        /// The boot timeout.
        limit: Duration,
        /// The last Health error.
        last_error: String,
        /// The last lines of the guest console.
        log_tail: String,
    },
    /// The QMP conversation failed.
    #[error("QMP: {0}")]
    Qmp(String),
    /// The VM process is gone.
    #[error("the VM is not running")]
    NotRunning,
    /// The persisted run state is missing or unreadable.
    #[error("VM state in {path}: {reason}")]
    State {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Connecting to the agent failed.
    #[error("agent connection: {0}")]
    Connect(String),
    /// The agent answered with an error.
    #[error("agent: {0}")]
    Agent(#[from] tonic::Status),
    /// JSON (de)serialization failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// A system call failed.
    #[error("{0}: {1}")]
    Sys(&'static str, std::io::Error),
}

impl Error {
    pub(crate) fn died(program: &str, logs: &[&Path]) -> Self {
        let log_tail = logs
            .iter()
            .map(|l| tail(l, 20))
            .collect::<Vec<_>>()
            .join("\n");
        Self::HelperDied {
            program: program.into(),
            log_tail,
        }
    }

    pub(crate) fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
}

/// The last `n` lines of a log file, for error messages.
pub(crate) fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "[{}]\n{}",
        path.display(),
        lines[lines.len().saturating_sub(n)..].join("\n")
    )
}
