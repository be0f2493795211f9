//! Single-instance guard and the listening socket.
//!
//! A flock on `<run_root>/vesseld.lock` keeps a second vesseld from starting. The
//! socket path is checked on its own too (the lock may live in another run_root):
//! a socket that accepts connections belongs to a live server and is never
//! deleted; one that refuses them is stale and is replaced.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("another vesseld is running: lock file {path} is held (pid {holder})")]
    Locked { path: PathBuf, holder: String },
    #[error("socket {path} is live (a server accepts connections on it); stop that server first or choose another `listen` path")]
    SocketLive { path: PathBuf },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> InstanceError {
    let path = path.to_owned();
    move |source| InstanceError::Io { what, path, source }
}

/// Held for the daemon's lifetime; the kernel drops the lock when the process dies.
pub struct InstanceLock {
    _lock: Flock<File>,
}

impl InstanceLock {
    pub fn acquire(path: &Path) -> Result<Self, InstanceError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(io("cannot open lock file", path))?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let holder = std::fs::read_to_string(path)
                    .map(|s| s.trim().to_owned())
                    .unwrap_or_default();
                return Err(InstanceError::Locked {
                    path: path.to_owned(),
                    holder: if holder.is_empty() {
                        "unknown".into()
                    } else {
                        holder
                    },
                });
            }
            Err((_, errno)) => {
                return Err(io("cannot lock", path)(std::io::Error::from(errno)));
            }
        };
        // The pid is informational (for the error message of a second instance).
        lock.set_len(0).map_err(io("cannot write", path))?;
        write!(&mut *lock, "{}", std::process::id()).map_err(io("cannot write", path))?;
        Ok(InstanceLock { _lock: lock })
    }
}

/// Binds the CRI socket (mode 0660), replacing a stale socket file.
pub fn bind_socket(path: &Path) -> Result<tokio::net::UnixListener, InstanceError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(InstanceError::NotASocket {
                path: path.to_owned(),
            })
        }
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(InstanceError::SocketLive {
                    path: path.to_owned(),
                });
            }
            tracing::info!(path = %path.display(), "replacing stale socket");
            std::fs::remove_file(path).map_err(io("cannot remove stale socket", path))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("cannot inspect", path)(e)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(io("cannot bind", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(io("cannot chmod", path))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/vesseld.lock");
        let first = InstanceLock::acquire(&path).unwrap();
        let e = InstanceLock::acquire(&path).err().unwrap().to_string();
        assert!(e.contains(&std::process::id().to_string()), "{e}");
        drop(first);
        InstanceLock::acquire(&path).unwrap();
    }

    #[tokio::test]
    async fn live_socket_is_kept_and_stale_one_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/v.sock");
        let live = bind_socket(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        assert!(matches!(
            bind_socket(&path),
            Err(InstanceError::SocketLive { .. })
        ));
        assert!(path.exists());
        drop(live); // the file stays, nobody listens: stale
        assert!(path.exists());
        bind_socket(&path).unwrap();

        let file = dir.path().join("plain");
        std::fs::write(&file, "x").unwrap();
        assert!(matches!(
            bind_socket(&file),
            Err(InstanceError::NotASocket { .. })
        ));
    }
}
