//! A read-only overlay of an image's layer snapshots, mounted on the host: the one
//! merged view of an image that a pod's share dir exposes (see docs/design.md,
//! "Image rootfs").
//!
//! `mount(2)` takes its options in one page, and overlayfs' `lowerdir=` with full
//! snapshot paths (~90 bytes each) passes it at ~43 layers. Each layer is opened
//! here as an `O_PATH` descriptor and named by its number relative to
//! `/proc/self/fd`, the working directory of a thread that has its own (so the
//! daemon's other threads keep theirs): ~4 bytes a layer, which fits overlayfs' own
//! stack limit of 500 ([`MAX_LAYERS`]). The descriptors are closed once mounted:
//! overlayfs holds the directories, not the names.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::mount::MountFlags;

use crate::StorageError;

/// Most lower layers overlayfs stacks (`OVL_MAX_STACK` in the kernel).
pub const MAX_LAYERS: usize = 500;

/// The largest `mount(2)` data the kernel copies (one page, its NUL included).
const MOUNT_DATA_MAX: usize = 4095;

/// Mounts `layers` (bottom→top) at `target` as one read-only overlay with
/// `nosuid,nodev`. Mounted with those flags from the start, the copies that
/// propagate from `target` (the share's export tree, virtiofsd's namespace) carry
/// them too.
pub fn mount_readonly(layers: &[PathBuf], target: &Path) -> Result<(), StorageError> {
    if layers.len() < 2 || layers.len() > MAX_LAYERS {
        return Err(StorageError::Invalid(format!(
            "overlay of {} layers: between 2 and {MAX_LAYERS} can be stacked",
            layers.len()
        )));
    }
    let fds = layers
        .iter()
        .rev()
        .map(|l| {
            rustix::fs::open(
                l,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| StorageError::io("open layer", l)(e.into()))
        })
        .collect::<Result<Vec<OwnedFd>, _>>()?;
    let data = lowerdir_option(&fds);
    if data.len() > MOUNT_DATA_MAX {
        return Err(StorageError::Invalid(format!(
            "overlay options of {} layers take {} bytes, more than mount(2)'s {MOUNT_DATA_MAX}",
            layers.len(),
            data.len()
        )));
    }
    let data = std::ffi::CString::new(data).expect("digits and separators have no NUL");
    let flags = MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV;
    // A thread of its own: its working directory is changed, which must not be
    // the daemon's (every other thread resolves relative paths against it).
    let res = std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: FS unshares only this thread's root, cwd and umask; no file
            // descriptor table is unshared, so `fds` stay valid here.
            unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::FS) }?;
            rustix::process::chdir("/proc/self/fd")?;
            rustix::mount::mount("overlay", target, "overlay", flags, data.as_c_str())
        })
        .join()
    });
    drop(fds);
    match res {
        Ok(r) => r.map_err(|e| StorageError::io("mount overlay", target)(e.into())),
        Err(_) => Err(StorageError::io("mount overlay", target)(
            std::io::Error::other("the mounting thread panicked"),
        )),
    }
}

/// `lowerdir=` naming each descriptor (top-most first) relative to `/proc/self/fd`.
fn lowerdir_option(fds: &[OwnedFd]) -> String {
    let names: Vec<String> = fds.iter().map(|fd| fd.as_raw_fd().to_string()).collect();
    format!("lowerdir={}", names.join(":"))
}
