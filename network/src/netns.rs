//! Named network namespaces: `<dir>/<name>` bind-mounted from a namespace made by a
//! short-lived thread, so the caller's own threads never change namespace.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

use crate::error::{io, sys, Error, Result};

/// A named network namespace, pinned by a bind mount at [`NetNs::path`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetNs {
    path: PathBuf,
}

impl NetNs {
    /// Creates a new, empty network namespace pinned at `<dir>/<name>`.
    /// Fails with [`Error::NetnsExists`] if that path is already there.
    pub fn create(dir: &Path, name: &str) -> Result<NetNs> {
        check_name(name)?;
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let path = dir.join(name);
        // The mount point: an empty file, created exclusively so two pods never share it.
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(&path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::NetnsExists(path))
            }
            Err(e) => return Err(io("create", &path)(e)),
        }
        let target = path.clone();
        // unshare(CLONE_NEWNET) moves only the calling thread: do it on a throwaway one.
        let made = std::thread::spawn(move || -> Result<()> {
            unshare(CloneFlags::CLONE_NEWNET).map_err(sys("unshare(CLONE_NEWNET)"))?;
            let source = format!("/proc/self/task/{}/ns/net", nix::unistd::gettid());
            mount(
                Some(source.as_str()),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(sys("bind-mount netns"))
        })
        .join()
        .map_err(|_| Error::ThreadPanicked)
        .and_then(|r| r);
        let ns = NetNs { path };
        if let Err(e) = made {
            let _ = ns.remove();
            return Err(e);
        }
        Ok(ns)
    }

    /// Refers to an existing namespace path (for example after a restart).
    pub fn at(path: impl Into<PathBuf>) -> NetNs {
        NetNs { path: path.into() }
    }

    /// Where the namespace is pinned; this is what CNI gets as `CNI_NETNS`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the pin file is still there.
    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    /// Opens the namespace (the fd keeps it alive even after [`NetNs::remove`]).
    pub fn open(&self) -> Result<File> {
        File::open(&self.path).map_err(io("open", &self.path))
    }

    /// Moves the *calling thread* into the namespace. Only for threads that are
    /// dedicated to this namespace; prefer [`NetNs::run`].
    pub fn enter(&self) -> Result<()> {
        let f = self.open()?;
        setns(&f, CloneFlags::CLONE_NEWNET).map_err(sys("setns"))
    }

    /// Runs `f` on a fresh thread inside the namespace and returns its value. Blocks;
    /// from async code call it through `spawn_blocking`.
    pub fn run<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let file = self.open()?;
        std::thread::scope(|s| {
            s.spawn(move || -> Result<R> {
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(sys("setns"))?;
                Ok(f())
            })
            .join()
            .map_err(|_| Error::ThreadPanicked)?
        })
    }

    /// Unmounts and deletes the pin. Idempotent: a missing or unmounted path is fine.
    /// The namespace itself dies once nothing else (process, fd, tap fd) holds it.
    pub fn remove(&self) -> Result<()> {
        match umount2(&self.path, MntFlags::MNT_DETACH) {
            // EINVAL: not a mount point (half-made namespace); ENOENT: already gone.
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
            Err(e) => return Err(sys("umount netns")(e)),
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove", &self.path)(e)),
        }
    }
}

/// A netns name (and CNI container id) must be one plain path component.
pub(crate) fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains(['/', '\0']);
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_single_components() {
        assert!(check_name("abc-123").is_ok());
        for bad in ["", ".", "..", "a/b", "/x", "a\0b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn remove_of_missing_namespace_is_ok() {
        let dir = tempfile::tempdir().unwrap();
        let ns = NetNs::at(dir.path().join("nope"));
        ns.remove().unwrap();
        ns.remove().unwrap();
    }
}
