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

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, CWD};
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

use crate::error::{Error, Result};

/// Size cap of a VM's run dir (console, logs, sockets, state).
pub const RUN_DIR_TMPFS: &str = "size=8m,nr_inodes=256,mode=0711";

/// Where the unprivileged uids of VMs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailConfig {
    /// First uid (and gid) of the range.
    pub uid_base: u32,
    /// How many uids the range holds (at most that many VMs at once).
    pub uid_count: u32,
}

impl Default for JailConfig {
    fn default() -> Self {
        // Above the usual /etc/subuid ranges' start; no passwd entry is needed.
        Self {
            uid_base: 200_000,
            uid_count: 65_536,
        }
    }
}

/// The identity a VM's unprivileged processes run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailIds {
    /// uid.
    pub uid: u32,
    /// gid (the same number as the uid).
    pub gid: u32,
}

/// uids handed out by this process and the jail dirs that hold them. Sibling run
/// dirs are the record across restarts; this covers VMs in other parent dirs.
static ALLOCATED: Mutex<Option<HashMap<u32, PathBuf>>> = Mutex::new(None);

/// Lowest uid of the range not in `used`.
pub fn lowest_free(cfg: &JailConfig, used: &HashSet<u32>) -> Option<u32> {
    (0..cfg.uid_count)
        .filter_map(|i| cfg.uid_base.checked_add(i))
        .find(|u| !used.contains(u))
}

fn owner_of(dir: &Path) -> Option<u32> {
    std::fs::symlink_metadata(dir)
        .ok()
        .filter(|m| m.is_dir())
        .map(|m| m.uid())
}

/// Picks the lowest uid of `cfg` that no sibling of `run_dir` (nor any VM of this
/// process) uses, and runs `prepare(uid)` — which must make `<run_dir>/j` owned by
/// it — under the allocation lock, so two starts never get the same uid.
pub fn allocate<T>(
    cfg: &JailConfig,
    run_dir: &Path,
    prepare: impl FnOnce(JailIds) -> Result<T>,
) -> Result<(JailIds, T)> {
    let mut guard = ALLOCATED.lock().unwrap_or_else(|p| p.into_inner());
    let allocated = guard.get_or_insert_with(HashMap::new);
    let in_range = |u: u32| u >= cfg.uid_base && u - cfg.uid_base < cfg.uid_count;
    // Forget uids whose jail dir is gone (or was given to another uid).
    allocated.retain(|uid, dir| owner_of(dir) == Some(*uid));
    let mut used: HashSet<u32> = allocated.keys().copied().collect();
    if let Some(parent) = run_dir.parent() {
        if let Ok(entries) = std::fs::read_dir(parent) {
            for e in entries.flatten() {
                if let Some(uid) = owner_of(&e.path().join(JAIL_DIR)) {
                    if in_range(uid) {
                        used.insert(uid);
                    }
                }
            }
        }
    }
    let uid = lowest_free(cfg, &used).ok_or_else(|| {
        Error::InvalidConfig(format!(
            "all {} VM uids from {} are in use",
            cfg.uid_count, cfg.uid_base
        ))
    })?;
    let ids = JailIds { uid, gid: uid };
    let out = prepare(ids)?;
    allocated.insert(uid, run_dir.join(JAIL_DIR));
    Ok((ids, out))
}

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

    #[test]
    fn lowest_free_skips_used() {
        let cfg = JailConfig {
            uid_base: 1000,
            uid_count: 3,
        };
        let mut used = HashSet::new();
        assert_eq!(lowest_free(&cfg, &used), Some(1000));
        used.insert(1000);
        used.insert(1002);
        assert_eq!(lowest_free(&cfg, &used), Some(1001));
        used.insert(1001);
        assert_eq!(lowest_free(&cfg, &used), None);
    }

    #[test]
    fn allocates_distinct_uids_from_sibling_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = JailConfig {
            uid_base: 4_000_000_000,
            uid_count: 10,
        };
        let prep = |run: &Path| {
            let run = run.to_path_buf();
            move |ids: JailIds| {
                let j = run.join(JAIL_DIR);
                std::fs::create_dir_all(&j).unwrap();
                chown_jail_dir(&j, ids)
            }
        };
        let (a_dir, b_dir, c_dir) = (
            tmp.path().join("a"),
            tmp.path().join("b"),
            tmp.path().join("c"),
        );
        let (a, _) = allocate(&cfg, &a_dir, prep(&a_dir)).unwrap();
        let (b, _) = allocate(&cfg, &b_dir, prep(&b_dir)).unwrap();
        assert_eq!(a.uid, 4_000_000_000);
        assert_eq!(b.uid, 4_000_000_001);
        assert_eq!(owner_of(&b_dir.join(JAIL_DIR)), Some(b.uid));
        let m = std::fs::metadata(b_dir.join(JAIL_DIR)).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o700);
        // A freed uid is reused (lowest first).
        std::fs::remove_dir_all(&a_dir).unwrap();
        let (c, _) = allocate(&cfg, &c_dir, prep(&c_dir)).unwrap();
        assert_eq!(c.uid, 4_000_000_000);
        // A failed preparation takes nothing.
        let d_dir = tmp.path().join("d");
        let err = allocate(&cfg, &d_dir, |_| -> Result<()> {
            Err(Error::InvalidConfig("no".into()))
        });
        assert!(err.is_err());
        let (d, _) = allocate(&cfg, &d_dir, prep(&d_dir)).unwrap();
        assert_eq!(d.uid, 4_000_000_002);
    }

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
