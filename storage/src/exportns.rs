//! Mounts made only inside the mount namespace of the process that exports a share
//! dir (virtiofsd), never in vesseld's own.
//!
//! A copy of a volume in the host's mount namespace would pin the host mounts it
//! holds: a filesystem mounted below a hostPath could then not be removed on the
//! host (rmdir gets EBUSY while its dentry is a mount point in the caller's
//! namespace). Mount points in other namespaces do not block that; the kernel
//! detaches them instead.
//!
//! The work runs on a short-lived thread of our own that leaves vesseld's
//! filesystem context (`unshare(CLONE_FS)`, the condition `setns` puts on joining a
//! mount namespace from a multi-threaded process) and then joins the exporter's
//! namespace through its pidfd (no pid reuse race). Nothing else runs on that
//! thread, and the namespace goes with it when it ends.
//!
//! Inside, paths are resolved from the namespace root (virtiofsd pivots into the
//! exported tree) without following any symlink and without crossing any mount:
//! every directory on the way is in the exported tree's read-only top mount, which
//! the guest cannot change, so nothing it writes can redirect a mount.

use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{openat2, stat, Mode, OFlags, ResolveFlags};
use rustix::mount::{move_mount, unmount, MoveMountFlags, UnmountFlags};
use rustix::thread::{move_into_thread_name_spaces, ThreadNameSpaceType, UnshareFlags};

use crate::StorageError;

/// Identity (device, inode) of the exported tree's root dir, as seen from the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RootId {
    dev: u64,
    ino: u64,
}

impl RootId {
    pub(crate) fn of(path: &std::path::Path) -> Result<Self, StorageError> {
        let st = stat(path).map_err(|e| StorageError::io("stat", path)(e.into()))?;
        Ok(Self {
            dev: st.st_dev,
            ino: st.st_ino,
        })
    }
}

fn err(what: &'static str) -> impl FnOnce(rustix::io::Errno) -> StorageError {
    move |e| StorageError::Exporter {
        what,
        source: e.into(),
    }
}

/// Runs `work` on a fresh thread inside the mount namespace of the process behind
/// `exporter` (a pidfd), after checking that namespace is not ours and that its
/// root is the exported tree (`root`).
pub(crate) fn in_exporter_ns<T: Send>(
    exporter: BorrowedFd<'_>,
    root: RootId,
    work: impl FnOnce() -> Result<T, StorageError> + Send,
) -> Result<T, StorageError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: only the filesystem context (root, cwd, umask) is unshared, not
            // the descriptor table, so no thread loses access to a descriptor.
            unsafe { rustix::thread::unshare_unsafe(UnshareFlags::FS) }
                .map_err(err("unshare the filesystem context"))?;
            move_into_thread_name_spaces(exporter, ThreadNameSpaceType::MOUNT)
                .map_err(err("enter virtiofsd's mount namespace"))?;
            // Ours still (virtiofsd not sandboxed yet) or some other tree: refuse.
            let top = stat("/").map_err(err("stat virtiofsd's root"))?;
            if (top.st_dev, top.st_ino) != (root.dev, root.ino) {
                return Err(StorageError::Exporter {
                    what: "virtiofsd's root is not the share dir",
                    source: std::io::Error::other("virtiofsd has not set up its sandbox"),
                });
            }
            work()
        })
        .join()
        .unwrap_or_else(|_| {
            Err(StorageError::Exporter {
                what: "mount thread",
                source: std::io::Error::other("panicked"),
            })
        })
    })
}

/// Opens `rel` (relative to the namespace root) as an `O_PATH` descriptor,
/// following no symlink and crossing no mount.
fn open_beneath_root(rel: &str, dir: bool) -> Result<OwnedFd, StorageError> {
    let root = rustix::fs::open(
        "/",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(err("open virtiofsd's root"))?;
    let mut flags = OFlags::PATH | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    if dir {
        flags |= OFlags::DIRECTORY;
    }
    openat2(
        root.as_fd(),
        rel,
        flags,
        Mode::empty(),
        ResolveFlags::BENEATH
            | ResolveFlags::NO_SYMLINKS
            | ResolveFlags::NO_MAGICLINKS
            | ResolveFlags::NO_XDEV,
    )
    .map_err(|e| StorageError::Io {
        op: "open in virtiofsd's namespace",
        path: rel.into(),
        source: e.into(),
    })
}

/// Attaches the detached mount `tree` at `rel` (an existing, empty mount point
/// vesseld made in the exported tree) in the exporter's namespace only.
pub(crate) fn attach(
    exporter: BorrowedFd<'_>,
    root: RootId,
    tree: OwnedFd,
    rel: &str,
) -> Result<(), StorageError> {
    in_exporter_ns(exporter, root, || {
        let target = open_beneath_root(rel, false)?;
        move_mount(
            tree.as_fd(),
            "",
            target.as_fd(),
            "",
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
        )
        .map_err(|e| StorageError::Io {
            op: "attach mount in virtiofsd's namespace",
            path: rel.into(),
            source: e.into(),
        })
    })
}

/// Detaches every mount on each of `names` inside directory `rel_dir`, in the
/// exporter's namespace. A name with nothing mounted is skipped.
pub(crate) fn detach(
    exporter: BorrowedFd<'_>,
    root: RootId,
    rel_dir: &str,
    names: &[OsString],
) -> Result<(), StorageError> {
    in_exporter_ns(exporter, root, || {
        let dir = match open_beneath_root(rel_dir, true) {
            Ok(d) => d,
            Err(StorageError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        // Relative names from here: the thread's cwd is its own (CLONE_FS).
        rustix::process::fchdir(dir.as_fd()).map_err(err("enter the volumes' dir"))?;
        for name in names {
            loop {
                match unmount(
                    name.as_os_str(),
                    UnmountFlags::DETACH | UnmountFlags::NOFOLLOW,
                ) {
                    Ok(()) => continue,
                    Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => break,
                    Err(e) => {
                        return Err(StorageError::Io {
                            op: "unmount in virtiofsd's namespace",
                            path: std::path::Path::new(rel_dir).join(name),
                            source: e.into(),
                        })
                    }
                }
            }
        }
        Ok(())
    })
}

/// Whether `rel` is a mount point in the exporter's namespace: true when resolving
/// it crosses into another mount.
pub(crate) fn is_mounted_in(
    exporter: BorrowedFd<'_>,
    root: RootId,
    rel: &str,
) -> Result<bool, StorageError> {
    in_exporter_ns(exporter, root, || match open_beneath_root(rel, false) {
        Ok(_) => Ok(false),
        Err(StorageError::Io { source, .. }) if source.raw_os_error() == Some(libc::EXDEV) => {
            Ok(true)
        }
        Err(StorageError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(false)
        }
        Err(e) => Err(e),
    })
}
