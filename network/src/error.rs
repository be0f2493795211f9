//! Typed errors of the crate.

use std::path::PathBuf;

use crate::cni::PluginError;

/// Everything that can go wrong while setting up or tearing down a pod network.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("{op}: {source}")]
    Sys {
        op: &'static str,
        #[source]
        source: nix::Error,
    },
    /// A netlink request failed.
    #[error("netlink {op}: {source}")]
    Netlink {
        op: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
    /// The network namespace already exists.
    #[error("network namespace {0} already exists")]
    NetnsExists(PathBuf),
    /// A name that must be a single path component is not.
    #[error("invalid name {0:?}")]
    InvalidName(String),
    /// No usable CNI network configuration was found.
    #[error("no CNI network configuration in {0}")]
    NoNetworkConfig(PathBuf),
    /// No configuration has the requested network name.
    #[error("no CNI network named {name:?} in {dir}")]
    NetworkNotFound { name: String, dir: PathBuf },
    /// A CNI configuration file is malformed.
    #[error("invalid CNI configuration {path}: {reason}")]
    InvalidConfig { path: PathBuf, reason: String },
    /// The configuration asks for a CNI version this runtime does not speak.
    #[error("unsupported CNI version {0:?}")]
    UnsupportedVersion(String),
    /// A plugin binary is not in any of the configured directories.
    #[error("CNI plugin {plugin:?} not found in {dirs:?}")]
    PluginNotFound { plugin: String, dirs: Vec<PathBuf> },
    /// A plugin ran and reported an error.
    #[error("CNI plugin {plugin} {command} failed: {error}")]
    Plugin {
        plugin: String,
        command: &'static str,
        error: PluginError,
    },
    /// A plugin did not finish in time.
    #[error("CNI plugin {plugin} {command} timed out")]
    PluginTimeout {
        plugin: String,
        command: &'static str,
    },
    /// A plugin printed something that is not a valid result.
    #[error("CNI plugin {plugin} returned an invalid result: {reason}")]
    InvalidResult { plugin: String, reason: String },
    /// A cached result could not be read or written.
    #[error("CNI cache {path}: {reason}")]
    Cache { path: PathBuf, reason: String },
    /// The pod netns has no interface the plan needs.
    #[error("interface {0} not found in the pod network namespace")]
    LinkNotFound(String),
    /// A worker thread died.
    #[error("netns worker thread panicked")]
    ThreadPanicked,
    /// Several cleanup steps failed; every step was still attempted.
    #[error("teardown incomplete: {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Teardown(Vec<Error>),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { op, path, source }
}

pub(crate) fn sys(op: &'static str) -> impl FnOnce(nix::Error) -> Error {
    move |source| Error::Sys { op, source }
}

pub(crate) fn nl(op: &'static str) -> impl FnOnce(rtnetlink::Error) -> Error {
    move |source| Error::Netlink { op, source }
}
