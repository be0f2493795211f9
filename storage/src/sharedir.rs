//! The per-pod share dir: the host directory a pod VM sees over virtiofs.
//!
//! The dir is bind-mounted onto itself and made a shared mount before the VM's
//! virtiofsd starts; virtiofsd's private mount namespace is then a slave of it, so
//! volumes bind-mounted under it later (when containers are created) reach the guest.
//!
//! Layout (relative to the share dir):
//! - `pod/`: pod-wide files (hosts, resolv.conf, hostname)
//! - `layers/<chain id>`: a read-only bind of each image layer a container of this pod
//!   uses; a pod VM sees no other image's content (images may be private to another
//!   tenant)
//! - `ctr/<container id>/<n>`: one bind mount per container volume

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rustix::mount::{
    mount_bind, mount_bind_recursive, mount_change, mount_remount, unmount, MountFlags,
    MountPropagationFlags, UnmountFlags,
};

use crate::StorageError;

/// A pod's share dir on the host.
#[derive(Debug, Clone)]
pub struct ShareDir {
    path: PathBuf,
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(rustix::io::Errno) -> StorageError {
    let path = path.to_owned();
    move |e| StorageError::Io {
        op,
        path,
        source: e.into(),
    }
}

/// Every mount point in /proc/self/mountinfo (none if it cannot be read).
fn mount_points() -> HashSet<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .collect()
}

/// Whether `path` appears as a mount point in /proc/self/mountinfo.
fn is_mount_point(path: &Path) -> bool {
    mount_points().contains(path.to_string_lossy().as_ref())
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

impl ShareDir {
    /// Creates the dir (if needed) and makes it a shared mount of itself.
    pub fn create(path: &Path) -> Result<Self, StorageError> {
        std::fs::create_dir_all(path).map_err(StorageError::io("create", path))?;
        if !is_mount_point(path) {
            mount_bind(path, path).map_err(io_err("bind-mount", path))?;
        }
        // Private first: a fresh peer group, not the parent's.
        mount_change(path, MountPropagationFlags::PRIVATE).map_err(io_err("make-private", path))?;
        mount_change(path, MountPropagationFlags::SHARED).map_err(io_err("make-shared", path))?;
        for sub in ["pod", "ctr"] {
            let d = path.join(sub);
            std::fs::create_dir_all(&d).map_err(StorageError::io("create", &d))?;
        }
        Ok(ShareDir {
            path: path.to_owned(),
        })
    }

    /// A handle on a share dir made earlier (after a daemon restart).
    pub fn existing(path: &Path) -> Self {
        ShareDir {
            path: path.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a pod-wide file; returns its path relative to the share dir.
    pub fn write_pod_file(&self, name: &str, contents: &[u8]) -> Result<String, StorageError> {
        let p = self.path.join("pod").join(name);
        std::fs::write(&p, contents).map_err(StorageError::io("write", &p))?;
        Ok(format!("pod/{name}"))
    }

    /// Exposes one layer snapshot dir read-only at `layers/<its name>`; idempotent.
    /// Callers serialize calls for one share dir. Returns the path relative to the
    /// share dir.
    pub fn expose_layer(&self, layer_dir: &Path) -> Result<String, StorageError> {
        self.expose_layer_in(layer_dir, &mount_points())
    }

    /// [`ShareDir::expose_layer`] for each of an image's layers, reading the mount
    /// table once.
    pub fn expose_layers(&self, layer_dirs: &[PathBuf]) -> Result<(), StorageError> {
        let mounted = mount_points();
        for dir in layer_dirs {
            self.expose_layer_in(dir, &mounted)?;
        }
        Ok(())
    }

    fn expose_layer_in(
        &self,
        layer_dir: &Path,
        mounted: &HashSet<String>,
    ) -> Result<String, StorageError> {
        let name = layer_dir
            .file_name()
            .ok_or_else(|| StorageError::Io {
                op: "expose layer",
                path: layer_dir.to_owned(),
                source: std::io::Error::other("a layer dir has a name"),
            })?
            .to_owned();
        let rel = Path::new("layers").join(&name);
        let target = self.path.join(&rel);
        if !mounted.contains(target.to_string_lossy().as_ref()) {
            std::fs::create_dir_all(&target).map_err(StorageError::io("create", &target))?;
            mount_bind(layer_dir, &target).map_err(io_err("bind-mount", &target))?;
            if let Err(e) = mount_remount(&target, MountFlags::BIND | MountFlags::RDONLY, "") {
                let _ = unmount(&target, UnmountFlags::DETACH);
                return Err(io_err("remount read-only", &target)(e));
            }
        }
        Ok(rel.to_string_lossy().into_owned())
    }

    /// Bind-mounts a container volume; returns its path relative to the share dir.
    /// A missing source is an error (nothing is created on the host).
    pub fn bind_volume(
        &self,
        container_id: &str,
        index: usize,
        source: &Path,
        readonly: bool,
    ) -> Result<String, StorageError> {
        let meta = std::fs::metadata(source).map_err(StorageError::io("stat", source))?;
        let dir = self.path.join("ctr").join(container_id);
        std::fs::create_dir_all(&dir).map_err(StorageError::io("create", &dir))?;
        let target = dir.join(index.to_string());
        if meta.is_dir() {
            std::fs::create_dir_all(&target).map_err(StorageError::io("create", &target))?;
        } else {
            std::fs::write(&target, b"").map_err(StorageError::io("create", &target))?;
        }
        mount_bind_recursive(source, &target).map_err(io_err("bind-mount", &target))?;
        if readonly {
            if let Err(e) = mount_remount(&target, MountFlags::BIND | MountFlags::RDONLY, "") {
                let _ = unmount(&target, UnmountFlags::DETACH);
                return Err(io_err("remount read-only", &target)(e));
            }
        }
        Ok(format!("ctr/{container_id}/{index}"))
    }

    /// Unmounts and removes a container's volumes; what is gone is not an error.
    pub fn release_container(&self, container_id: &str) -> Result<(), StorageError> {
        let dir = self.path.join("ctr").join(container_id);
        release_tree(&dir)
    }

    /// Unmounts everything and removes the share dir; safe to repeat.
    pub fn destroy(&self) -> Result<(), StorageError> {
        if self.path.exists() {
            release_tree(&self.path)?;
        }
        Ok(())
    }
}

/// Detaches every mount at or under `dir` (deepest first), then removes it.
fn release_tree(dir: &Path) -> Result<(), StorageError> {
    let prefix = dir.to_string_lossy().into_owned();
    let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .filter(|mp| mp == &prefix || mp.starts_with(&format!("{prefix}/")))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    mounts.dedup();
    for m in &mounts {
        // Stacked mounts show up once per layer; repeat until none is left.
        while is_mount_point(Path::new(m)) {
            if let Err(e) = unmount(Path::new(m), UnmountFlags::DETACH) {
                return Err(io_err("unmount", Path::new(m))(e));
            }
        }
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StorageError::Io {
            op: "remove",
            path: dir.to_owned(),
            source: e,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    #[test]
    fn volumes_layers_and_teardown() {
        if !is_root() {
            eprintln!("skipped: needs root for mounts");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let share = ShareDir::create(&tmp.path().join("share")).unwrap();
        assert!(is_mount_point(share.path()));
        // Repeating create on a live share dir is fine.
        ShareDir::create(share.path()).unwrap();

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
            std::fs::read_to_string(share.path().join("layers/abc/f")).unwrap(),
            "layer"
        );
        assert!(std::fs::write(share.path().join("layers/abc/g"), "x").is_err());
        // Only the layers asked for are there.
        assert!(!share.path().join("layers/other").exists());

        let vol = tmp.path().join("vol");
        std::fs::create_dir_all(&vol).unwrap();
        std::fs::write(vol.join("data"), "v").unwrap();
        let file = tmp.path().join("file");
        std::fs::write(&file, "f").unwrap();
        let rel = share.bind_volume("c1", 0, &vol, true).unwrap();
        assert_eq!(rel, "ctr/c1/0");
        let rel_f = share.bind_volume("c1", 1, &file, false).unwrap();
        assert_eq!(
            std::fs::read_to_string(share.path().join(&rel).join("data")).unwrap(),
            "v"
        );
        assert!(std::fs::write(share.path().join(&rel).join("new"), "x").is_err());
        std::fs::write(share.path().join(&rel_f), "changed").unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "changed");
        assert!(share
            .bind_volume("c1", 2, &tmp.path().join("missing"), false)
            .is_err());
        assert_eq!(share.write_pod_file("hosts", b"h").unwrap(), "pod/hosts");

        share.release_container("c1").unwrap();
        assert!(!share.path().join("ctr/c1").exists());
        share.release_container("c1").unwrap();
        // The host data behind the volumes is untouched.
        assert!(vol.join("data").exists());

        share.destroy().unwrap();
        assert!(!share.path().exists());
        assert!(snaps.join("abc/f").exists());
        share.destroy().unwrap();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!info.contains(&*tmp.path().to_string_lossy()), "{info}");
    }
}
