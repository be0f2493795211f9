//! Where the pods' scratch disks live and what formats them.

use std::path::{Path, PathBuf};

use vessel_storage::scratch::ScratchDisks;

use crate::config::Config;

/// The program that formats scratch disks (e2fsprogs).
pub const MKFS_EXT4: &str = "mkfs.ext4";

/// The scratch disks of `config`: `<root>/scratch/<pod>.img`.
pub fn scratch_disks(config: &Config) -> ScratchDisks {
    let mkfs = mkfs_ext4().unwrap_or_else(|| PathBuf::from(MKFS_EXT4));
    ScratchDisks::new(config.root.join("scratch"), mkfs)
        .with_overcommit(config.containers.scratch_overcommit)
}

/// The host mount point holding the scratch disks' dir (or its nearest existing
/// parent before the first pod): the filesystem the kubelet accounts containers'
/// writable layers to. Blocking (reads mountinfo).
pub fn scratch_mountpoint(dir: &Path) -> std::io::Result<PathBuf> {
    let dir = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    vessel_image::mount_point(dir)
}

/// `mkfs.ext4` on PATH, else in the sbin dirs a non-root PATH lacks.
pub fn mkfs_ext4() -> Option<PathBuf> {
    use vessel_sandbox::preflight::find_program;
    find_program(Path::new(MKFS_EXT4)).or_else(|| {
        ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
            .into_iter()
            .map(PathBuf::from)
            .find_map(|p| find_program(&p))
    })
}
