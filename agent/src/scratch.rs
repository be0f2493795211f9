//! The pod's scratch disk: a virtio-blk disk the host made (ext4, on node disk)
//! that holds the containers' writable layers, so that what a container writes to
//! its rootfs neither fills nor counts as guest memory.

use std::path::Path;

use nix::mount::{mount, MsFlags};
use vessel_proto::{GUEST_SCRATCH_DIR, SCRATCH_DISK_SERIAL};

use crate::log;

/// The block device (`vda`, ...) whose virtio serial is `serial`, from sysfs.
pub fn find_disk(sys_block: &Path, serial: &str) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(sys_block)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("vd"))
        .collect();
    names.sort();
    names.into_iter().find(|n| {
        std::fs::read_to_string(sys_block.join(n).join("serial"))
            .is_ok_and(|s| s.trim_end_matches(['\n', '\0']) == serial)
    })
}

/// Mounts the scratch disk at `GUEST_SCRATCH_DIR` when the VM has one. nodev and
/// nosuid: what containers write there is data, never a device or setuid binary
/// that counts outside their rootfs. `discard` hands deleted blocks back to the
/// host file; `noinit_itable` keeps the kernel from zeroing inode tables in the
/// background (the disk is fresh and dies with the VM; under TCG that zeroing
/// would cost CPU and host disk).
pub fn mount_scratch() {
    let _ = std::fs::create_dir_all(GUEST_SCRATCH_DIR);
    let Some(dev) = find_disk(Path::new("/sys/block"), SCRATCH_DISK_SERIAL) else {
        log::info("no scratch disk: writable layers stay in guest memory");
        return;
    };
    let source = format!("/dev/{dev}");
    match mount(
        Some(source.as_str()),
        GUEST_SCRATCH_DIR,
        Some("ext4"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("discard,noinit_itable"),
    ) {
        Ok(()) => log::info(&format!(
            "scratch disk {source} mounted at {GUEST_SCRATCH_DIR}"
        )),
        Err(e) => log::warn(&format!(
            "mount scratch disk {source} at {GUEST_SCRATCH_DIR}: {e}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_disk_by_serial() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path();
        for (name, serial) in [
            ("vda", "other\n"),
            ("vdb", "vessel-scratch\n"),
            ("sda", "vessel-scratch"),
        ] {
            std::fs::create_dir(sys.join(name)).unwrap();
            std::fs::write(sys.join(name).join("serial"), serial).unwrap();
        }
        std::fs::create_dir(sys.join("vdc")).unwrap();
        assert_eq!(find_disk(sys, "vessel-scratch").as_deref(), Some("vdb"));
        assert_eq!(find_disk(sys, "nope"), None);
        assert_eq!(find_disk(&sys.join("missing"), "vessel-scratch"), None);
    }
}
