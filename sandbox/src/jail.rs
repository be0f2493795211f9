//! Confinement of a VM's host processes (in the spirit of Firecracker's jailer): the
//! bounded run dir (a small tmpfs of its own), a per-VM unprivileged uid/gid for
//! QEMU and vhost-device-vsock, the jail dir they may write, and connecting to
//! sockets in that dir without following anything the uid planted.
//!
//! Run dir layout (all on the VM's tmpfs):
//! - `<run dir>/` root:root 0711: `state.json`, the helper and QEMU logs and the
//!   console log (opened by vesseld and handed over as descriptors).
//! - `<run dir>/j/` uid:gid 0700: what the unprivileged processes create (QMP socket,
//!   vsock sockets) plus the sockets vesseld binds for them before the chown
//!   (virtiofsd's listener, the readiness listener).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, CWD};
use tokio::net::UnixStream;

use crate::error::{Error, Result};

/// Size cap of a VM's run dir (console, logs, sockets, state).
pub const RUN_DIR_TMPFS: &str = "size=8m,nr_inodes=256,mode=0711";

pub use crate::uids::{JailConfig, JailIds};

/// Name of the jail dir inside a run dir.
pub const JAIL_DIR: &str = "j";

/// Gives a socket vesseld bound inside the (still root-owned) jail dir to the VM's
/// uid, without following a symlink.
pub fn chown_socket(path: &Path, ids: JailIds) -> Result<()> {
    rustix::fs::chownat(
        CWD,
        path,
        Some(uid(ids.uid)),
        Some(gid(ids.gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| Error::io(path, e.into()))
}

/// Hands the jail dir to the VM's uid (mode 0700). Last step of its preparation:
/// from here on vesseld never resolves a path inside it except by
/// [`connect_unix`].
pub fn chown_jail_dir(dir: &Path, ids: JailIds) -> Result<()> {
    rustix::fs::chownat(
        CWD,
        dir,
        Some(uid(ids.uid)),
        Some(gid(ids.gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| Error::io(dir, e.into()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(dir, e))
}

fn uid(u: u32) -> rustix::process::Uid {
    rustix::process::Uid::from_raw_unchecked(u)
}

fn gid(g: u32) -> rustix::process::Gid {
    rustix::process::Gid::from_raw_unchecked(g)
}

/// Connects to the unix socket at `path` without trusting its directory: the last
/// component is opened `O_PATH|O_NOFOLLOW`, must be a socket owned by the owner of
/// the directory it is in (the VM's uid for a jail dir), and is connected through
/// `/proc/self/fd`. The directories above it must be ones only root can change.
pub async fn connect_unix(path: &Path) -> io::Result<UnixStream> {
    let fd = open_socket_node(path)?;
    let via = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    let s = UnixStream::connect(&via).await;
    drop(fd);
    s
}

fn open_socket_node(path: &Path) -> io::Result<OwnedFd> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no file name"));
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let dir = rustix::fs::open(
        parent,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let dir_owner = rustix::fs::fstat(&dir)?.st_uid;
    let fd = rustix::fs::openat(
        dir.as_fd(),
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let st = rustix::fs::fstat(&fd)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Socket {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} is not a socket", path.display()),
        ));
    }
    if st.st_uid != dir_owner {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is owned by uid {}, not by its directory's owner {dir_owner}",
                path.display(),
                st.st_uid
            ),
        ));
    }
    Ok(fd)
}

/// Mounts the VM's own small tmpfs on `root` (which must exist): whatever the VM's
/// processes write there (console, logs, sockets) can never use more host RAM than
/// its size.
pub fn mount_run_dir(root: &Path) -> Result<()> {
    use rustix::mount::MountFlags;
    let data = std::ffi::CString::new(RUN_DIR_TMPFS).expect("no NUL");
    rustix::mount::mount(
        "vessel-vm",
        root,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        Some(data.as_c_str()),
    )
    .map_err(|e| Error::Sys("mount run dir tmpfs", e.into()))
}

/// True when `dir` is a mount point (another device than its parent).
pub fn is_mount_point(dir: &Path) -> bool {
    let (Ok(m), Some(Ok(p))) = (
        std::fs::symlink_metadata(dir),
        dir.parent().map(std::fs::symlink_metadata),
    ) else {
        return false;
    };
    m.is_dir() && m.dev() != p.dev()
}

/// Detaches every mount on `root` and removes the directory. Blocking; a missing
/// dir is not an error.
pub fn unmount_and_remove(root: &Path) {
    for _ in 0..8 {
        if !is_mount_point(root) {
            break;
        }
        if let Err(e) = rustix::mount::unmount(root, rustix::mount::UnmountFlags::DETACH) {
            tracing::warn!(dir = %root.display(), "cannot unmount run dir: {e}");
            break;
        }
    }
    match std::fs::remove_dir_all(root) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(dir = %root.display(), "cannot remove run dir: {e}"),
    }
}

/// Checks that an unprivileged uid can read `file` itself, for the guest kernel and
/// initrd: QEMU opens them through descriptors vesseld passes (`/proc/self/fd`), so
/// the directories above need not be open to it.
pub fn check_world_readable(file: &Path) -> std::result::Result<(), String> {
    let real = std::fs::canonicalize(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let m = std::fs::metadata(&real).map_err(|e| format!("{}: {e}", real.display()))?;
    if m.permissions().mode() & 0o004 == 0 {
        return Err(format!(
            "{} is not world-readable (QEMU runs unprivileged; chmod o+r it)",
            real.display()
        ));
    }
    Ok(())
}

/// Checks that an unprivileged uid can pass through `dir` and every directory above.
pub fn check_world_searchable(dir: &Path) -> std::result::Result<(), String> {
    let real = std::fs::canonicalize(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for d in real.ancestors() {
        let m = std::fs::metadata(d).map_err(|e| format!("{}: {e}", d.display()))?;
        if m.permissions().mode() & 0o001 == 0 {
            return Err(format!(
                "{} is not searchable by others (QEMU runs unprivileged; chmod o+x it)",
                d.display()
            ));
        }
    }
    Ok(())
}

/// The supplementary group an unprivileged QEMU needs for /dev/kvm: none when anyone
/// may read and write it, else its group when that group may (and is not root's).
pub fn kvm_group(dev: &Path) -> Result<Option<u32>> {
    let m = std::fs::metadata(dev).map_err(|e| Error::io(dev, e))?;
    let mode = m.permissions().mode();
    if mode & 0o006 == 0o006 {
        return Ok(None);
    }
    if mode & 0o060 == 0o060 && m.gid() != 0 {
        return Ok(Some(m.gid()));
    }
    Err(Error::InvalidConfig(format!(
        "{} is not read-write for a non-root group (mode {:o}, gid {}); the unprivileged \
         QEMU cannot use KVM",
        dev.display(),
        mode & 0o777,
        m.gid()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn connect_refuses_symlinks_and_foreign_sockets() {
        let tmp = tempfile::tempdir().unwrap();
        let sock = tmp.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let accept = tokio::spawn(async move { listener.accept().await.map(drop) });
        connect_unix(&sock).await.expect("own socket connects");
        accept.await.unwrap().unwrap();
        // A symlink to it is refused (ELOOP from O_NOFOLLOW).
        let link = tmp.path().join("link.sock");
        std::os::unix::fs::symlink(&sock, &link).unwrap();
        assert!(connect_unix(&link).await.is_err());
        // A regular file is refused.
        let file = tmp.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(connect_unix(&file).await.is_err());
        // A socket owned by someone else than the dir's owner is refused.
        chown_socket(
            &sock,
            JailIds {
                uid: 4_000_000_100,
                gid: 4_000_000_100,
            },
        )
        .unwrap();
        let err = connect_unix(&sock).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
    }

    #[test]
    fn kvm_group_from_device_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let dev = tmp.path().join("kvm");
        std::fs::write(&dev, b"").unwrap();
        let mode = |m| std::fs::set_permissions(&dev, std::fs::Permissions::from_mode(m)).unwrap();
        mode(0o666);
        assert_eq!(kvm_group(&dev).unwrap(), None);
        mode(0o660);
        assert!(kvm_group(&dev).is_err(), "root's group");
        rustix::fs::chown(&dev, None, Some(gid(4_000_000_400))).unwrap();
        assert_eq!(kvm_group(&dev).unwrap(), Some(4_000_000_400));
        mode(0o640);
        assert!(kvm_group(&dev).is_err(), "group cannot write");
    }

    #[test]
    fn readability_checks() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let f = tmp.path().join("k");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        check_world_readable(&f).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(check_world_readable(&f)
            .unwrap_err()
            .contains("world-readable"));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        // A closed directory above is fine: QEMU reads the file by descriptor.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        check_world_readable(&f).unwrap();
        assert!(check_world_searchable(tmp.path())
            .unwrap_err()
            .contains("searchable"));
    }
}
