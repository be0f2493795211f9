//! The per-pod share dir: what a pod VM sees over virtiofs, built so that the guest
//! can never choose a host path that vesseld resolves.
//!
//! Two trees under the share dir's base (`<run_root>/pods/<pod>/share`):
//! - `host/`: vesseld's working tree. Only vesseld writes it and only vesseld
//!   resolves paths in it; it is never exported. It is a bind mount of itself, made
//!   a shared mount, so mounts made under it propagate to `export/`.
//! - `export/`: what virtiofsd serves. A recursive bind of `host/`, made a slave of
//!   it (it receives mounts, sends none back) and read-only. The guest can write
//!   only inside the writable volumes mounted in it, never in a directory vesseld
//!   creates or mounts on, so it cannot plant a symlink, fifo or file where vesseld
//!   will later look.
//!
//! Layout of both trees:
//! - `pod/`: pod-wide files (hosts, resolv.conf, hostname), read-only to the guest
//!   (the agent copies them into guest memory for containers to write).
//! - `layers/<chain id>`: a read-only bind of each image layer a container of this
//!   pod uses; a pod VM sees no other image's content.
//! - `ctr/<container id>/<n>`: one bind mount per container volume.
//!
//! Every mount under `host/` is built detached (`open_tree`), given its flags
//! (`mount_setattr`), then attached (`move_mount`): a bind followed by a read-only
//! remount would reach virtiofsd's mount namespace read-write, because remounts do
//! not propagate. Mounts also get `nosuid,nodev`, so virtiofsd never opens a device
//! node on the guest's behalf.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use rustix::fs::{statx, AtFlags, StatxAttributes, StatxFlags, CWD};
use rustix::mount::{
    mount_bind, mount_bind_recursive, mount_change, mount_remount, move_mount, open_tree, unmount,
    MountFlags, MountPropagationFlags, MoveMountFlags, OpenTreeFlags, UnmountFlags,
};

use crate::StorageError;

/// A pod's share dir on the host.
#[derive(Debug, Clone)]
pub struct ShareDir {
    base: PathBuf,
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(rustix::io::Errno) -> StorageError {
    let path = path.to_owned();
    move |e| StorageError::Io {
        op,
        path,
        source: e.into(),
    }
}

/// Whether `path` is the root of a mount (without following a final symlink).
fn is_mount_root(path: &Path) -> bool {
    statx(
        CWD,
        path,
        AtFlags::SYMLINK_NOFOLLOW,
        StatxFlags::BASIC_STATS,
    )
    .map(|s| {
        s.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT)
            && s.stx_attributes.contains(StatxAttributes::MOUNT_ROOT)
    })
    .unwrap_or(false)
}

/// A private dir vesseld alone uses (0700); an existing one is kept.
fn private_dir(path: &Path) -> Result<(), StorageError> {
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StorageError::io("create", path)(e)),
    }
}

/// Mount attributes for [`set_attrs`] (linux/mount.h).
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;

/// `mount_setattr(2)` on a detached mount tree (rustix has no wrapper yet).
fn set_attrs(tree: &OwnedFd, attrs: u64, recursive: bool) -> rustix::io::Result<()> {
    let attr = libc::mount_attr {
        attr_set: attrs,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let mut flags = libc::AT_EMPTY_PATH;
    if recursive {
        flags |= libc::AT_RECURSIVE;
    }
    // SAFETY: the path is a valid NUL-terminated empty string, `attr` is a valid
    // `mount_attr` of the size passed, and `tree` is an open descriptor we own.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            flags as libc::c_uint,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(
            rustix::io::Errno::from_io_error(&std::io::Error::last_os_error())
                .unwrap_or(rustix::io::Errno::INVAL),
        )
    }
}

/// How read-only a bind is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadOnly {
    No,
    /// The top mount only: submounts stay writable (CRI's plain `readonly`).
    Top,
    /// Every mount of the tree (CRI's `recursive_read_only`).
    Recursive,
}

/// Attaches a bind of `source` at `target` with its flags already set, so that the
/// copies propagated to virtiofsd carry them too. `recursive` brings `source`'s
/// submounts along (volumes).
fn attach_bind(
    source: &Path,
    target: &Path,
    recursive: bool,
    readonly: ReadOnly,
) -> Result<(), StorageError> {
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
    if recursive {
        flags |= OpenTreeFlags::AT_RECURSIVE;
    }
    let tree = open_tree(CWD, source, flags).map_err(io_err("clone mount", source))?;
    set_attrs(&tree, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, recursive)
        .map_err(io_err("set mount attributes", source))?;
    if readonly != ReadOnly::No {
        set_attrs(&tree, MOUNT_ATTR_RDONLY, readonly == ReadOnly::Recursive)
            .map_err(io_err("set mount read-only", source))?;
    }
    move_mount(
        &tree,
        "",
        CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(io_err("attach mount", target))
}

/// Detaches whatever is mounted at `path` (with everything below it), stacked
/// mounts included. Never follows a symlink; "not a mount point" ends the loop.
fn detach_all(path: &Path) -> Result<(), StorageError> {
    loop {
        match unmount(path, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW) {
            Ok(()) => continue,
            Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => return Ok(()),
            Err(e) => return Err(io_err("unmount", path)(e)),
        }
    }
}

/// Detaches the mount on every entry of `dir` (one level: each entry is a mount
/// point vesseld made; what is below goes with it).
fn detach_entries(dir: &Path) -> Result<(), StorageError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StorageError::io("read", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(StorageError::io("read", dir))?;
        detach_all(&entry.path())?;
    }
    Ok(())
}

/// Mount points at or under `dir`, from /proc/self/mountinfo.
/// Whether a filesystem is mounted somewhere below `path` (not at it). A guest
/// automounts such a submount (virtiofs announces it) on first use with the flags of
/// the mount it crosses, so a read-only bind in the guest makes it read-only too.
pub fn has_submounts(path: &Path) -> bool {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    mounts_under(&path).iter().any(|m| Path::new(m) != path)
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .filter(|mp| mp == &prefix || mp.starts_with(&format!("{prefix}/")))
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Removes `dir`, refusing while anything is still mounted under it (a recursive
/// removal would otherwise delete a volume's host data through its mount).
fn remove_unmounted(dir: &Path) -> Result<(), StorageError> {
    let left = mounts_under(dir);
    if !left.is_empty() {
        return Err(StorageError::Io {
            op: "remove",
            path: dir.to_owned(),
            source: std::io::Error::other(format!("still mounted: {}", left.join(", "))),
        });
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StorageError::io("remove", dir)(e)),
    }
}

/// A single path component that names something vesseld made (a chain id, a
/// container id, a pod file name): no separator, not `.`/`..`, no NUL.
fn check_name(name: &str) -> Result<(), StorageError> {
    let bad = name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
        || CString::new(name.as_bytes()).is_err();
    if bad {
        return Err(StorageError::Io {
            op: "name",
            path: PathBuf::from(name),
            source: std::io::Error::other("not a single path component"),
        });
    }
    Ok(())
}

impl ShareDir {
    /// Creates both trees (if needed): `host/` shared, `export/` its read-only slave.
    pub fn create(base: &Path) -> Result<Self, StorageError> {
        let share = ShareDir {
            base: base.to_owned(),
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(base)
            .map_err(StorageError::io("create", base))?;
        let host = share.host();
        private_dir(&host)?;
        // Set up once: changing `host`'s propagation later would cut `export` off.
        if !is_mount_root(&host) {
            mount_bind(&host, &host).map_err(io_err("bind-mount", &host))?;
            // Private first: a fresh peer group, not the parent's.
            mount_change(&host, MountPropagationFlags::PRIVATE)
                .map_err(io_err("make-private", &host))?;
            mount_change(&host, MountPropagationFlags::SHARED)
                .map_err(io_err("make-shared", &host))?;
        }
        for sub in ["pod", "layers", "ctr"] {
            private_dir(&host.join(sub))?;
        }
        let export = share.export_path();
        private_dir(&export)?;
        if !is_mount_root(&export) {
            mount_bind_recursive(&host, &export).map_err(io_err("bind-mount", &export))?;
            mount_change(&export, MountPropagationFlags::DOWNSTREAM)
                .map_err(io_err("make-slave", &export))?;
            // The top mount only: volumes below keep their own flags. Made before
            // virtiofsd exists, so its copy is read-only from the start.
            let ro = MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV;
            mount_remount(&export, ro, "").map_err(io_err("remount read-only", &export))?;
        }
        Ok(share)
    }

    /// A handle on a share dir made earlier (after a daemon restart).
    pub fn existing(base: &Path) -> Self {
        ShareDir {
            base: base.to_owned(),
        }
    }

    /// vesseld's own tree.
    fn host(&self) -> PathBuf {
        self.base.join("host")
    }

    /// The read-only tree virtiofsd exports to the guest.
    pub fn export_path(&self) -> PathBuf {
        self.base.join("export")
    }

    /// Writes a pod-wide file (read-only to the guest); returns its path relative
    /// to the exported tree.
    pub fn write_pod_file(&self, name: &str, contents: &[u8]) -> Result<String, StorageError> {
        check_name(name)?;
        let p = self.host().join("pod").join(name);
        std::fs::write(&p, contents).map_err(StorageError::io("write", &p))?;
        Ok(format!("pod/{name}"))
    }

    /// Exposes one layer snapshot dir read-only at `layers/<its name>`; idempotent.
    /// Callers serialize calls for one share dir. Returns the path relative to the
    /// exported tree.
    pub fn expose_layer(&self, layer_dir: &Path) -> Result<String, StorageError> {
        let name = layer_dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| StorageError::Io {
                op: "expose layer",
                path: layer_dir.to_owned(),
                source: std::io::Error::other("a layer dir has a UTF-8 name"),
            })?;
        check_name(name)?;
        let rel = format!("layers/{name}");
        let target = self.host().join(&rel);
        if !is_mount_root(&target) {
            private_dir(&target)?;
            attach_bind(layer_dir, &target, false, ReadOnly::Top)?;
        }
        Ok(rel)
    }

    /// [`ShareDir::expose_layer`] for each of an image's layers.
    pub fn expose_layers(&self, layer_dirs: &[PathBuf]) -> Result<(), StorageError> {
        for dir in layer_dirs {
            self.expose_layer(dir)?;
        }
        Ok(())
    }

    /// Bind-mounts a container volume; returns its path relative to the exported
    /// tree. A missing source is an error (nothing is created on the host).
    /// `readonly` makes the volume's top mount read-only, `recursive_readonly` every
    /// mount below it too.
    pub fn bind_volume(
        &self,
        container_id: &str,
        index: usize,
        source: &Path,
        readonly: bool,
        recursive_readonly: bool,
    ) -> Result<String, StorageError> {
        check_name(container_id)?;
        let meta = std::fs::metadata(source).map_err(StorageError::io("stat", source))?;
        let dir = self.host().join("ctr").join(container_id);
        private_dir(&dir)?;
        let target = dir.join(index.to_string());
        if meta.is_dir() {
            private_dir(&target)?;
        } else {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&target)
                .map_err(StorageError::io("create", &target))?;
        }
        let readonly = match (readonly, recursive_readonly) {
            (_, true) => ReadOnly::Recursive,
            (true, false) => ReadOnly::Top,
            (false, false) => ReadOnly::No,
        };
        attach_bind(source, &target, true, readonly)?;
        Ok(format!("ctr/{container_id}/{index}"))
    }

    /// Unmounts and removes a container's volumes; what is gone is not an error.
    pub fn release_container(&self, container_id: &str) -> Result<(), StorageError> {
        check_name(container_id)?;
        let dir = self.host().join("ctr").join(container_id);
        detach_entries(&dir)?;
        remove_unmounted(&dir)
    }

    /// Unmounts everything and removes the share dir; safe to repeat.
    pub fn destroy(&self) -> Result<(), StorageError> {
        if !self.base.exists() {
            return Ok(());
        }
        let host = self.host();
        if let Ok(ctrs) = std::fs::read_dir(host.join("ctr")) {
            for c in ctrs.flatten() {
                detach_entries(&c.path())?;
            }
        }
        detach_entries(&host.join("layers"))?;
        // Detaching each top mount takes every mount below it along.
        detach_all(&self.export_path())?;
        detach_all(&host)?;
        // A share dir of an older layout was a mount itself.
        detach_all(&self.base)?;
        remove_unmounted(&self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    /// Whether a process in a fresh mount namespace that is a slave of ours (as
    /// virtiofsd's is) can create `file`.
    fn writable_from_slave_ns(file: &Path) -> bool {
        let status = Command::new("unshare")
            .args(["-m", "--propagation", "slave", "sh", "-c"])
            .arg(format!("echo x > '{}'", file.display()))
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        status.success()
    }

    #[test]
    fn names_are_single_components() {
        for bad in ["", ".", "..", "a/b", "/abs", "nul\0"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        check_name("abc123").unwrap();
    }

    #[test]
    fn volumes_layers_and_teardown() {
        assert!(is_root(), "this test needs root (mounts)");
        let tmp = tempfile::tempdir().unwrap();
        let share = ShareDir::create(&tmp.path().join("share")).unwrap();
        let export = share.export_path();
        assert!(is_mount_root(&export));
        // Repeating create on a live share dir is fine.
        ShareDir::create(&tmp.path().join("share")).unwrap();

        let snaps = tmp.path().join("snapshots");
        for layer in ["abc", "other"] {
            std::fs::create_dir_all(snaps.join(layer)).unwrap();
            std::fs::write(snaps.join(layer).join("f"), "layer").unwrap();
        }
        assert_eq!(
            share.expose_layer(&snaps.join("abc")).unwrap(),
            "layers/abc"
        );
        share.expose_layer(&snaps.join("abc")).unwrap();
        assert_eq!(
            std::fs::read_to_string(export.join("layers/abc/f")).unwrap(),
            "layer"
        );
        // Read-only in ours and in a namespace made like virtiofsd's.
        assert!(std::fs::write(export.join("layers/abc/g"), "x").is_err());
        assert!(!writable_from_slave_ns(&export.join("layers/abc/g")));
        assert!(!snaps.join("abc/g").exists());
        // Only the layers asked for are there.
        assert!(!export.join("layers/other").exists());

        // The exported tree itself takes no writes.
        assert!(std::fs::write(export.join("planted"), "x").is_err());
        assert!(!writable_from_slave_ns(&export.join("pod/planted")));
        assert!(!writable_from_slave_ns(&export.join("ctr/planted")));

        let vol = tmp.path().join("vol");
        std::fs::create_dir_all(&vol).unwrap();
        std::fs::write(vol.join("data"), "v").unwrap();
        let rw_vol = tmp.path().join("rwvol");
        std::fs::create_dir_all(&rw_vol).unwrap();
        let file = tmp.path().join("file");
        std::fs::write(&file, "f").unwrap();
        let rel = share.bind_volume("c1", 0, &vol, true, false).unwrap();
        assert_eq!(rel, "ctr/c1/0");
        let rel_f = share.bind_volume("c1", 1, &file, false, false).unwrap();
        let rel_rw = share.bind_volume("c1", 2, &rw_vol, false, false).unwrap();
        assert_eq!(
            std::fs::read_to_string(export.join(&rel).join("data")).unwrap(),
            "v"
        );
        assert!(std::fs::write(export.join(&rel).join("new"), "x").is_err());
        assert!(!writable_from_slave_ns(&export.join(&rel).join("new")));
        assert!(writable_from_slave_ns(&export.join(&rel_rw).join("new")));
        assert!(rw_vol.join("new").exists());
        std::fs::write(export.join(&rel_f), "changed").unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "changed");
        assert!(share
            .bind_volume("c1", 3, &tmp.path().join("missing"), false, false)
            .is_err());
        assert!(share.bind_volume("../x", 0, &vol, false, false).is_err());
        assert_eq!(share.write_pod_file("hosts", b"h").unwrap(), "pod/hosts");
        assert_eq!(
            std::fs::read_to_string(export.join("pod/hosts")).unwrap(),
            "h"
        );
        assert!(std::fs::write(export.join("pod/hosts"), "x").is_err());

        share.release_container("c1").unwrap();
        assert!(!export.join("ctr/c1").exists());
        share.release_container("c1").unwrap();
        // The host data behind the volumes is untouched.
        assert!(vol.join("data").exists());
        assert!(rw_vol.join("new").exists());

        share.destroy().unwrap();
        assert!(!tmp.path().join("share").exists());
        assert!(snaps.join("abc/f").exists());
        share.destroy().unwrap();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!info.contains(&*tmp.path().to_string_lossy()), "{info}");
    }

    /// CRI read-only: the volume's own files take no writes, a filesystem mounted
    /// below it does; recursive read-only: neither does.
    #[test]
    fn read_only_volumes_and_their_submounts() {
        assert!(is_root(), "this test needs root (mounts)");
        let tmp = tempfile::tempdir().unwrap();
        let share = ShareDir::create(&tmp.path().join("share")).unwrap();
        let export = share.export_path();
        let vol = tmp.path().join("vol");
        std::fs::create_dir_all(vol.join("tmpfs")).unwrap();
        rustix::mount::mount(
            "none",
            vol.join("tmpfs"),
            "tmpfs",
            MountFlags::empty(),
            None,
        )
        .unwrap();
        assert!(!has_submounts(&vol.join("tmpfs")));
        assert!(has_submounts(&vol));
        let top = share.bind_volume("c1", 0, &vol, true, false).unwrap();
        let all = share.bind_volume("c1", 1, &vol, true, true).unwrap();
        assert!(!writable_from_slave_ns(&export.join(&top).join("top")));
        assert!(writable_from_slave_ns(&export.join(&top).join("tmpfs/sub")));
        assert!(!writable_from_slave_ns(&export.join(&all).join("top")));
        assert!(!writable_from_slave_ns(
            &export.join(&all).join("tmpfs/sub2")
        ));
        share.release_container("c1").unwrap();
        rustix::mount::unmount(vol.join("tmpfs"), UnmountFlags::DETACH).unwrap();
        share.destroy().unwrap();
        assert!(mounts_under(tmp.path()).is_empty());
    }

    #[test]
    fn destroy_with_volumes_still_bound_keeps_their_data() {
        assert!(is_root(), "this test needs root (mounts)");
        let tmp = tempfile::tempdir().unwrap();
        let share = ShareDir::create(&tmp.path().join("share")).unwrap();
        let vol = tmp.path().join("vol");
        std::fs::create_dir_all(vol.join("sub")).unwrap();
        std::fs::write(vol.join("sub/data"), "keep").unwrap();
        share.bind_volume("c1", 0, &vol, false, false).unwrap();
        share.destroy().unwrap();
        assert_eq!(
            std::fs::read_to_string(vol.join("sub/data")).unwrap(),
            "keep"
        );
        assert!(mounts_under(tmp.path()).is_empty());
    }
}
