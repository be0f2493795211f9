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
//! - `images/<top chain id>`: the merged, read-only rootfs of each image a
//!   container of this pod uses: one overlayfs mount of the image's layers (a bind
//!   of the layer for a one-layer image). A pod VM sees no other image's content,
//!   and an image costs the same mounts whatever its layer count.
//! - `layers/<chain id>`: one read-only bind per layer, made by older vesselds for
//!   pods that still run; only torn down now.
//! - `ctr/<container id>/<n>`: one bind mount per container volume, attached only
//!   in virtiofsd's mount namespace ([`crate::exportns`]): a copy in the host's
//!   would pin the host mounts below the volume's source. Here it is an empty
//!   mount point.
//!
//! Every mount is built detached (`open_tree`), given its flags
//! (`mount_setattr`), then attached (`move_mount`): a bind followed by a read-only
//! remount would reach virtiofsd's mount namespace read-write, because remounts do
//! not propagate. Mounts also get `nosuid,nodev`, so virtiofsd never opens a device
//! node on the guest's behalf.

use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use rustix::fs::{statx, AtFlags, StatxAttributes, StatxFlags, CWD};
use rustix::mount::{
    mount_bind, mount_bind_recursive, mount_change, mount_remount, move_mount, open_tree, unmount,
    MountFlags, MountPropagationFlags, MoveMountFlags, OpenTreeFlags, UnmountFlags,
};

use crate::exportns::{self, RootId};
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
/// Propagation types of `mount_attr.propagation` (linux/mount.h `MS_*`).
const PROPAGATION_PRIVATE: u64 = 1 << 18;
const PROPAGATION_SLAVE: u64 = 1 << 19;

/// `mount_setattr(2)` on a detached mount tree (rustix has no wrapper yet).
/// `propagation` is 0 (unchanged) or one of the `PROPAGATION_*` types.
fn set_attrs(
    tree: &OwnedFd,
    attrs: u64,
    propagation: u64,
    recursive: bool,
) -> rustix::io::Result<()> {
    let attr = libc::mount_attr {
        attr_set: attrs,
        attr_clr: 0,
        propagation,
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

/// How a volume follows what the host mounts below its source later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Propagation {
    /// Not at all (CRI `PROPAGATION_PRIVATE`).
    #[default]
    Private,
    /// New host mounts appear in it (CRI `PROPAGATION_HOST_TO_CONTAINER`, rslave).
    HostToContainer,
}

/// How a container volume is bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VolumeOptions {
    /// The volume's top mount is read-only (submounts stay writable).
    pub readonly: bool,
    /// Every mount of the volume is read-only.
    pub recursive_readonly: bool,
    /// Propagation from the host.
    pub propagation: Propagation,
}

/// A detached copy of `source` with its flags set, so that wherever it is attached
/// (and wherever that propagates) it carries them. `recursive` brings `source`'s
/// submounts along (volumes).
fn clone_tree(
    source: &Path,
    recursive: bool,
    readonly: ReadOnly,
    propagation: u64,
) -> Result<OwnedFd, StorageError> {
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
    if recursive {
        flags |= OpenTreeFlags::AT_RECURSIVE;
    }
    let tree = open_tree(CWD, source, flags).map_err(io_err("clone mount", source))?;
    set_attrs(
        &tree,
        MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        propagation,
        recursive,
    )
    .map_err(io_err("set mount attributes", source))?;
    if readonly != ReadOnly::No {
        set_attrs(&tree, MOUNT_ATTR_RDONLY, 0, readonly == ReadOnly::Recursive)
            .map_err(io_err("set mount read-only", source))?;
    }
    Ok(tree)
}

/// Attaches a bind of `source` at `target` (in our namespace) with its flags
/// already set, so that the copies propagated to virtiofsd carry them too.
fn attach_bind(source: &Path, target: &Path, readonly: ReadOnly) -> Result<(), StorageError> {
    let tree = clone_tree(source, false, readonly, 0)?;
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

/// Names of the entries of `dir` (none if it is gone).
fn entry_names(dir: &Path) -> Result<Vec<OsString>, StorageError> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(StorageError::io("read", dir)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(StorageError::io("read", dir)(e)),
    }
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
        for sub in ["pod", "images", "layers", "ctr"] {
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

    /// Exposes an image's merged rootfs read-only at `images/<top layer's name>`
    /// from its layer snapshot dirs (bottom→top); idempotent. Whatever the layer
    /// count, that is one mount here (with its copy in the export tree and in
    /// virtiofsd's namespace). Callers serialize calls for one share dir. Returns
    /// the path relative to the exported tree, None for an image without layers.
    pub fn expose_image(&self, layer_dirs: &[PathBuf]) -> Result<Option<String>, StorageError> {
        let Some(top) = layer_dirs.last() else {
            return Ok(None);
        };
        let name = top
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| StorageError::Io {
                op: "expose image",
                path: top.to_owned(),
                source: std::io::Error::other("a layer dir has a UTF-8 name"),
            })?;
        check_name(name)?;
        let rel = format!("images/{name}");
        let target = self.host().join(&rel);
        if !is_mount_root(&target) {
            private_dir(&target)?;
            let mounted = if layer_dirs.len() == 1 {
                attach_bind(top, &target, ReadOnly::Top)
            } else {
                crate::overlay::mount_readonly(layer_dirs, &target)
            };
            if let Err(e) = mounted {
                let _ = std::fs::remove_dir(&target);
                return Err(e);
            }
        }
        Ok(Some(rel))
    }

    /// Takes back what [`ShareDir::expose_image`] made for an image (named by
    /// its top layer dir), e.g. after a CreateContainer that failed; what is gone
    /// is not an error.
    pub fn release_image(&self, top_layer_dir: &Path) -> Result<(), StorageError> {
        let Some(name) = top_layer_dir.file_name().and_then(|n| n.to_str()) else {
            return Ok(());
        };
        check_name(name)?;
        let target = self.host().join("images").join(name);
        detach_all(&target)?;
        match std::fs::remove_dir(&target) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StorageError::io("remove", &target)(e)),
        }
    }

    /// Bind-mounts a container volume in the mount namespace of `exporter` (a pidfd
    /// of the virtiofsd serving this share dir) only; returns its path relative to
    /// the exported tree. A missing source is an error (nothing is created on the
    /// host).
    pub fn bind_volume(
        &self,
        exporter: BorrowedFd<'_>,
        container_id: &str,
        index: usize,
        source: &Path,
        opts: VolumeOptions,
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
        let readonly = match (opts.readonly, opts.recursive_readonly) {
            (_, true) => ReadOnly::Recursive,
            (true, false) => ReadOnly::Top,
            (false, false) => ReadOnly::No,
        };
        let propagation = match opts.propagation {
            Propagation::Private => PROPAGATION_PRIVATE,
            // A slave receives what the host mounts below the source, sends nothing.
            Propagation::HostToContainer => PROPAGATION_SLAVE,
        };
        let tree = clone_tree(source, true, readonly, propagation)?;
        let rel = format!("ctr/{container_id}/{index}");
        exportns::attach(exporter, RootId::of(&self.host())?, tree, &rel)?;
        Ok(rel)
    }

    /// Whether the volume at `rel` (as [`ShareDir::bind_volume`] returned it) is
    /// mounted in `exporter`'s namespace.
    pub fn volume_is_bound(
        &self,
        exporter: BorrowedFd<'_>,
        rel: &str,
    ) -> Result<bool, StorageError> {
        exportns::is_mounted_in(exporter, RootId::of(&self.host())?, rel)
    }

    /// Unmounts and removes a container's volumes; what is gone is not an error.
    /// With `exporter` (virtiofsd's pidfd; None once it is gone) the binds in its
    /// namespace are detached first. Removing their (host-side, unmounted) mount
    /// points detaches whatever is left there too.
    pub fn release_container(
        &self,
        exporter: Option<BorrowedFd<'_>>,
        container_id: &str,
    ) -> Result<(), StorageError> {
        check_name(container_id)?;
        let dir = self.host().join("ctr").join(container_id);
        if let Some(exporter) = exporter {
            let names = entry_names(&dir)?;
            if !names.is_empty() {
                let rel = format!("ctr/{container_id}");
                match exportns::detach(exporter, RootId::of(&self.host())?, &rel, &names) {
                    // Its namespace cannot be entered (virtiofsd gone, or not the
                    // one we started): removing the mount points below still
                    // detaches whatever is there.
                    Ok(()) | Err(StorageError::Exporter { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        // Binds made in our namespace by an older vesseld.
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
        detach_entries(&host.join("images"))?;
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
    use std::os::fd::AsFd;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    /// Whether a process in a fresh mount namespace that is a slave of ours can
    /// create `file`.
    fn writable_from_slave_ns(file: &Path) -> bool {
        let status = Command::new("unshare")
            .args(["-m", "--propagation", "slave", "sh", "-c"])
            .arg(format!("echo x > '{}'", file.display()))
            .stderr(Stdio::null())
            .status()
            .unwrap();
        status.success()
    }

    /// A real virtiofsd exporting a share dir, sandboxed the way vessel-sandbox
    /// starts it (its own mount namespace rooted at the exported tree).
    struct Exporter {
        child: Child,
        pidfd: OwnedFd,
        root: RootId,
    }

    impl Exporter {
        /// None (test skipped) only with VESSEL_SKIP_VM=1 and no virtiofsd.
        fn start(share: &ShareDir, scratch: &Path) -> Option<Self> {
            let bin = std::env::var_os("VESSEL_VIRTIOFSD").unwrap_or_else(|| "virtiofsd".into());
            let mut share_arg = OsString::from("--shared-dir=");
            share_arg.push(share.export_path());
            let mut sock = OsString::from("--socket-path=");
            sock.push(scratch.join("fs.sock"));
            let spawned = Command::new(&bin)
                .arg(sock)
                .arg(share_arg)
                .args([
                    "--sandbox=namespace",
                    "--seccomp=kill",
                    "--modcaps=-mknod:-setfcap",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let child = match spawned {
                Ok(c) => c,
                Err(e) if std::env::var("VESSEL_SKIP_VM").as_deref() == Ok("1") => {
                    eprintln!("skipped: cannot run {bin:?}: {e}");
                    return None;
                }
                Err(e) => panic!("cannot run {bin:?} (set VESSEL_VIRTIOFSD): {e}"),
            };
            let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
            let pidfd =
                rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).unwrap();
            let root = RootId::of(&share.host()).unwrap();
            // Ready once it has pivoted into the exported tree.
            let deadline = Instant::now() + Duration::from_secs(10);
            while RootId::of(Path::new(&format!("/proc/{}/root/", child.id()))).ok() != Some(root) {
                assert!(
                    Instant::now() < deadline,
                    "virtiofsd did not set up its sandbox"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Some(Exporter { child, pidfd, root })
        }

        fn fd(&self) -> BorrowedFd<'_> {
            self.pidfd.as_fd()
        }

        /// Runs `f` with virtiofsd's view: `/` is the exported tree.
        fn inside<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
            exportns::in_exporter_ns(self.fd(), self.root, || Ok(f())).unwrap()
        }

        fn can_write(&self, rel: &str) -> bool {
            let p = format!("/{rel}");
            self.inside(move || std::fs::write(p, "x").is_ok())
        }

        fn read(&self, rel: &str) -> Option<String> {
            let p = format!("/{rel}");
            self.inside(move || std::fs::read_to_string(p).ok())
        }
    }

    /// Tears a share dir down even when a test fails halfway (no mounts left over).
    struct DestroyOnDrop(ShareDir);

    /// A share dir in a temp dir, exported by a real virtiofsd. Fields drop in
    /// order: virtiofsd, then the share dir's mounts, then the temp dir.
    struct Exported {
        fs: Exporter,
        _teardown: DestroyOnDrop,
        share: ShareDir,
        tmp: tempfile::TempDir,
    }

    impl Exported {
        /// None (test skipped) only with VESSEL_SKIP_VM=1 and no virtiofsd.
        fn start() -> Option<Self> {
            let tmp = tempfile::tempdir().unwrap();
            let share = ShareDir::create(&tmp.path().join("share")).unwrap();
            let teardown = DestroyOnDrop(share.clone());
            let fs = Exporter::start(&share, tmp.path())?;
            Some(Exported {
                fs,
                _teardown: teardown,
                share,
                tmp,
            })
        }
    }

    impl Drop for DestroyOnDrop {
        fn drop(&mut self) {
            let _ = self.0.destroy();
        }
    }

    impl Drop for Exporter {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[test]
    fn names_are_single_components() {
        for bad in ["", ".", "..", "a/b", "/abs", "nul\0"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        check_name("abc123").unwrap();
    }

    const RO: VolumeOptions = VolumeOptions {
        readonly: true,
        recursive_readonly: false,
        propagation: Propagation::Private,
    };
    const RW: VolumeOptions = VolumeOptions {
        readonly: false,
        recursive_readonly: false,
        propagation: Propagation::Private,
    };

    #[test]
    fn volumes_layers_and_teardown() {
        assert!(is_root(), "this test needs root (mounts)");
        let tmp = tempfile::tempdir().unwrap();
        let share = ShareDir::create(&tmp.path().join("share")).unwrap();
        let _teardown = DestroyOnDrop(share.clone());
        let export = share.export_path();
        assert!(is_mount_root(&export));
        // Repeating create on a live share dir is fine.
        ShareDir::create(&tmp.path().join("share")).unwrap();
        let Some(fs) = Exporter::start(&share, tmp.path()) else {
            return;
        };

        let snaps = tmp.path().join("snapshots");
        for layer in ["abc", "other"] {
            std::fs::create_dir_all(snaps.join(layer)).unwrap();
            std::fs::write(snaps.join(layer).join("f"), "layer").unwrap();
        }
        let abc = [snaps.join("abc")];
        assert_eq!(
            share.expose_image(&abc).unwrap().as_deref(),
            Some("images/abc")
        );
        share.expose_image(&abc).unwrap();
        assert_eq!(share.expose_image(&[]).unwrap(), None);
        assert_eq!(
            std::fs::read_to_string(export.join("images/abc/f")).unwrap(),
            "layer"
        );
        // Read-only in ours and in virtiofsd's namespace.
        assert_eq!(fs.read("images/abc/f").as_deref(), Some("layer"));
        assert!(std::fs::write(export.join("images/abc/g"), "x").is_err());
        assert!(!writable_from_slave_ns(&export.join("images/abc/g")));
        assert!(!fs.can_write("images/abc/g"));
        assert!(!snaps.join("abc/g").exists());
        // Only the images asked for are there.
        assert!(!export.join("images/other").exists());

        // The exported tree itself takes no writes.
        assert!(std::fs::write(export.join("planted"), "x").is_err());
        assert!(!fs.can_write("planted"));
        assert!(!fs.can_write("pod/planted"));
        assert!(!fs.can_write("ctr/planted"));

        let vol = tmp.path().join("vol");
        std::fs::create_dir_all(&vol).unwrap();
        std::fs::write(vol.join("data"), "v").unwrap();
        let rw_vol = tmp.path().join("rwvol");
        std::fs::create_dir_all(&rw_vol).unwrap();
        let file = tmp.path().join("file");
        std::fs::write(&file, "f").unwrap();
        let rel = share.bind_volume(fs.fd(), "c1", 0, &vol, RO).unwrap();
        assert_eq!(rel, "ctr/c1/0");
        let rel_f = share.bind_volume(fs.fd(), "c1", 1, &file, RW).unwrap();
        let rel_rw = share.bind_volume(fs.fd(), "c1", 2, &rw_vol, RW).unwrap();
        for r in [&rel, &rel_f, &rel_rw] {
            assert!(share.volume_is_bound(fs.fd(), r).unwrap(), "{r}");
        }
        // Only virtiofsd sees the volumes; the host's namespace has no copy.
        assert!(mounts_under(&share.host().join("ctr")).is_empty());
        assert!(mounts_under(&export.join("ctr")).is_empty());
        assert!(!export.join(&rel).join("data").exists());
        assert_eq!(fs.read(&format!("{rel}/data")).as_deref(), Some("v"));
        assert!(!fs.can_write(&format!("{rel}/new")));
        assert!(fs.can_write(&format!("{rel_rw}/new")));
        assert!(rw_vol.join("new").exists());
        assert!(fs.can_write(&rel_f));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
        assert!(share
            .bind_volume(fs.fd(), "c1", 3, &tmp.path().join("missing"), RW)
            .is_err());
        assert!(share.bind_volume(fs.fd(), "../x", 0, &vol, RW).is_err());
        assert_eq!(share.write_pod_file("hosts", b"h").unwrap(), "pod/hosts");
        assert_eq!(fs.read("pod/hosts").as_deref(), Some("h"));
        assert!(!fs.can_write("pod/hosts"));

        share.release_container(Some(fs.fd()), "c1").unwrap();
        assert!(!export.join("ctr/c1").exists());
        assert!(fs.read(&format!("{rel}/data")).is_none());
        share.release_container(Some(fs.fd()), "c1").unwrap();
        // The host data behind the volumes is untouched.
        assert!(vol.join("data").exists());
        assert!(rw_vol.join("new").exists());

        share.destroy().unwrap();
        assert!(!tmp.path().join("share").exists());
        assert!(snaps.join("abc/f").exists());
        share.destroy().unwrap();
        assert!(mounts_under(tmp.path()).is_empty());
    }

    /// critest's read-only volume specs: a hostPath with a tmpfs below it, bound
    /// read-only (plain and recursive). CRI read-only leaves the submount writable,
    /// recursive read-only does not; and the host can unmount the tmpfs and remove
    /// its dir while the volumes are bound.
    /// Mount points under `dir` in our namespace.
    fn mounts_at_or_under(dir: &Path) -> usize {
        mounts_under(&std::fs::canonicalize(dir).unwrap()).len()
    }

    #[test]
    fn a_many_layer_image_is_one_overlay() {
        assert!(is_root(), "this test needs root (mounts)");
        let tmp = tempfile::tempdir().unwrap();
        let share = ShareDir::create(&tmp.path().join("share")).unwrap();
        let _teardown = DestroyOnDrop(share.clone());
        let export = share.export_path();
        let Some(fs) = Exporter::start(&share, tmp.path()) else {
            return;
        };
        // Layer i writes its number to `n`, and `f<i>`; the names are as long as a
        // real snapshot's (64 hex), which passed mount(2)'s page at 44 layers.
        let snaps = tmp.path().join("snapshots");
        let layers: Vec<PathBuf> = (0..crate::overlay::MAX_LAYERS)
            .map(|i| {
                let d = snaps.join(format!("{i:064x}"));
                std::fs::create_dir_all(d.join("dir")).unwrap();
                std::fs::write(d.join("n"), i.to_string()).unwrap();
                std::fs::write(d.join(format!("f{i}")), "").unwrap();
                d
            })
            .collect();
        // Layer 2 whites out f0 and makes dir/ opaque over layer 1's dir/old.
        std::fs::write(layers[1].join("dir/old"), "").unwrap();
        rustix::fs::mknodat(
            CWD,
            layers[2].join("f0"),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        rustix::fs::setxattr(
            layers[2].join("dir"),
            "trusted.overlay.opaque",
            b"y",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        let before = mounts_at_or_under(tmp.path());
        for count in [3, 44, 127, crate::overlay::MAX_LAYERS] {
            let image = &layers[..count];
            let rel = share.expose_image(image).unwrap().unwrap();
            let merged = export.join(&rel);
            let top = (count - 1).to_string();
            assert_eq!(std::fs::read_to_string(merged.join("n")).unwrap(), top);
            assert!(merged.join("f1").exists() && merged.join(format!("f{top}")).exists());
            assert!(!merged.join("f0").exists(), "f0 is whited out");
            assert!(!merged.join("dir/old").exists(), "dir/ is opaque");
            assert_eq!(fs.read(&format!("{rel}/n")).as_deref(), Some(top.as_str()));
            assert!(!fs.can_write(&format!("{rel}/planted")));
            assert!(std::fs::write(merged.join("planted"), "x").is_err());
            // One mount in our tree and its copy in the export tree, at any count.
            assert_eq!(mounts_at_or_under(tmp.path()), before + 2, "{count} layers");
            share.release_image(image.last().unwrap()).unwrap();
            assert_eq!(mounts_at_or_under(tmp.path()), before);
        }
        let too_many: Vec<PathBuf> = std::iter::repeat_n(layers[0].clone(), 501).collect();
        assert!(share.expose_image(&too_many).is_err());
        assert_eq!(mounts_at_or_under(tmp.path()), before);
    }

    #[test]
    fn read_only_volumes_do_not_pin_host_submounts() {
        assert!(is_root(), "this test needs root (mounts)");
        let Some(x) = Exported::start() else {
            return;
        };
        let (tmp, share, fs) = (&x.tmp, &x.share, &x.fs);
        let vol = tmp.path().join("vol");
        let sub = vol.join("tmpfs");
        std::fs::create_dir_all(&sub).unwrap();
        rustix::mount::mount("none", &sub, "tmpfs", MountFlags::empty(), None).unwrap();
        assert!(!has_submounts(&sub));
        assert!(has_submounts(&vol));
        let rro = VolumeOptions {
            recursive_readonly: true,
            ..RO
        };
        let top = share.bind_volume(fs.fd(), "c1", 0, &vol, RO).unwrap();
        let all = share.bind_volume(fs.fd(), "c1", 1, &vol, rro).unwrap();
        assert!(!fs.can_write(&format!("{top}/top")));
        assert!(fs.can_write(&format!("{top}/tmpfs/sub")));
        assert!(!fs.can_write(&format!("{all}/top")));
        assert!(!fs.can_write(&format!("{all}/tmpfs/sub2")));
        // No copy in the host's namespace: the host's own mount is the only one.
        assert_eq!(mounts_under(&vol), vec![sub.to_string_lossy().into_owned()]);
        assert!(mounts_under(&share.base)
            .iter()
            .all(|m| !m.contains("/ctr")));

        // Plain (not lazy) unmount and removal while both volumes are bound.
        rustix::mount::unmount(&sub, UnmountFlags::empty()).unwrap();
        std::fs::remove_dir(&sub).unwrap();
        std::fs::remove_dir(&vol).unwrap();

        share.release_container(Some(fs.fd()), "c1").unwrap();
        assert!(!share.volume_is_bound(fs.fd(), &top).unwrap());
        share.destroy().unwrap();
        assert!(mounts_under(tmp.path()).is_empty());
    }

    /// HOST_TO_CONTAINER: a mount made on the host below the source after the bind
    /// appears in the volume; PRIVATE: it does not. The volume's own mounts never
    /// reach the host.
    #[test]
    fn propagation_from_the_host() {
        assert!(is_root(), "this test needs root (mounts)");
        let Some(x) = Exported::start() else {
            return;
        };
        let (tmp, share, fs) = (&x.tmp, &x.share, &x.fs);
        // A shared source, as a kubelet's hostPath for propagation would be.
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("later")).unwrap();
        mount_bind(&src, &src).unwrap();
        mount_change(&src, MountPropagationFlags::PRIVATE).unwrap();
        mount_change(&src, MountPropagationFlags::SHARED).unwrap();
        let slave = VolumeOptions {
            propagation: Propagation::HostToContainer,
            ..RW
        };
        let follows = share.bind_volume(fs.fd(), "c1", 0, &src, slave).unwrap();
        let private = share.bind_volume(fs.fd(), "c1", 1, &src, RW).unwrap();

        let later = src.join("later");
        rustix::mount::mount("none", &later, "tmpfs", MountFlags::empty(), None).unwrap();
        std::fs::write(later.join("flag"), "new").unwrap();
        assert_eq!(
            fs.read(&format!("{follows}/later/flag")).as_deref(),
            Some("new")
        );
        assert!(fs.read(&format!("{private}/later/flag")).is_none());
        // Unmounting on the host takes the propagated copy away too.
        rustix::mount::unmount(&later, UnmountFlags::empty()).unwrap();
        assert!(fs.read(&format!("{follows}/later/flag")).is_none());

        share.release_container(Some(fs.fd()), "c1").unwrap();
        rustix::mount::unmount(&src, UnmountFlags::empty()).unwrap();
        share.destroy().unwrap();
        assert!(mounts_under(tmp.path()).is_empty());
    }

    /// Without virtiofsd's pidfd (after it is gone, or a failed create), removing
    /// the mount points on the host detaches the binds in its namespace.
    #[test]
    fn release_without_the_exporter_still_detaches() {
        assert!(is_root(), "this test needs root (mounts)");
        let Some(x) = Exported::start() else {
            return;
        };
        let (tmp, share, fs) = (&x.tmp, &x.share, &x.fs);
        let vol = tmp.path().join("vol");
        std::fs::create_dir_all(vol.join("sub")).unwrap();
        std::fs::write(vol.join("sub/data"), "keep").unwrap();
        let rel = share.bind_volume(fs.fd(), "c1", 0, &vol, RW).unwrap();
        assert!(share.volume_is_bound(fs.fd(), &rel).unwrap());
        share.release_container(None, "c1").unwrap();
        assert!(fs.read(&format!("{rel}/sub/data")).is_none());
        assert_eq!(
            std::fs::read_to_string(vol.join("sub/data")).unwrap(),
            "keep"
        );
        // An exporter that is not sandboxed in the share dir is refused.
        let me = rustix::process::pidfd_open(
            rustix::process::getpid(),
            rustix::process::PidfdFlags::empty(),
        )
        .unwrap();
        let e = share
            .bind_volume(me.as_fd(), "c2", 0, &vol, RW)
            .unwrap_err();
        assert!(matches!(e, StorageError::Exporter { .. }), "{e}");
        share.destroy().unwrap();
        assert!(mounts_under(tmp.path()).is_empty());
    }

    #[test]
    fn destroy_with_volumes_still_bound_keeps_their_data() {
        assert!(is_root(), "this test needs root (mounts)");
        let tmp = tempfile::tempdir().unwrap();
        let share = ShareDir::create(&tmp.path().join("share")).unwrap();
        let _teardown = DestroyOnDrop(share.clone());
        // Owned here: the test stops virtiofsd halfway.
        let Some(fs) = Exporter::start(&share, tmp.path()) else {
            return;
        };
        let vol = tmp.path().join("vol");
        std::fs::create_dir_all(vol.join("sub")).unwrap();
        std::fs::write(vol.join("sub/data"), "keep").unwrap();
        share.bind_volume(fs.fd(), "c1", 0, &vol, RW).unwrap();
        share.destroy().unwrap();
        drop(fs);
        assert_eq!(
            std::fs::read_to_string(vol.join("sub/data")).unwrap(),
            "keep"
        );
        assert!(mounts_under(tmp.path()).is_empty());
    }
}
