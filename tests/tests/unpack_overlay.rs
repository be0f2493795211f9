//! Layer unpack into snapshots, checked the way it is used: stacked under overlayfs.
//! Needs root (mknod whiteouts, trusted.* xattrs, mount).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use vessel_image::unpack::{unpack_layer, Compression, UnpackError};
use vessel_storage::Snapshotter;
use vessel_tests::testimages::{self, sha256_digest, HostileKind, Layer, LayerCompression};

/// Unmounts on drop, so a failed assertion leaves no mount behind.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = umount2(&self.0, MntFlags::MNT_DETACH);
    }
}

/// Chain id of a layer on top of `parent` (OCI image spec).
fn chain_id(parent: Option<&str>, diff_id: &str) -> String {
    match parent {
        None => diff_id.to_owned(),
        Some(p) => sha256_digest(format!("{p} {diff_id}").as_bytes()),
    }
}

fn compression(l: &Layer) -> Compression {
    Compression::from_media_type(l.media_type).unwrap()
}

/// Unpacks layers into committed snapshots; returns their dirs bottom → top.
fn unpack_all(snaps: &Snapshotter, layers: &[Layer]) -> Vec<PathBuf> {
    let mut parent: Option<String> = None;
    let mut dirs = Vec::new();
    for l in layers {
        let id = chain_id(parent.as_deref(), &l.diff_id);
        let pending = snaps.prepare(&id).unwrap();
        unpack_layer(&l.data[..], compression(l), pending.path()).unwrap();
        dirs.push(pending.commit().unwrap());
        parent = Some(id);
    }
    dirs
}

fn overlay(lower_bottom_to_top: &[PathBuf], target: &Path) -> Mounted {
    let lowers: Vec<String> = lower_bottom_to_top
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    std::fs::create_dir_all(target).unwrap();
    let opts = format!("lowerdir={}", lowers.join(":"));
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::MS_RDONLY,
        Some(opts.as_str()),
    )
    .unwrap();
    Mounted(target.to_path_buf())
}

#[test]
fn whiteouts_hide_lower_files_under_overlayfs() {
    let tmp = tempfile::tempdir().unwrap();
    let snaps = Snapshotter::open(&tmp.path().join("snapshots")).unwrap();
    let dirs = unpack_all(&snaps, &testimages::whiteout_layers().unwrap());
    assert_eq!(snaps.list().unwrap().len(), 3);

    let root = tmp.path().join("rootfs");
    let _m = overlay(&dirs, &root);
    for p in testimages::WHITEOUT_PRESENT {
        assert!(root.join(&p[1..]).exists(), "{p} should be visible");
    }
    for p in testimages::WHITEOUT_ABSENT {
        assert!(
            std::fs::symlink_metadata(root.join(&p[1..])).is_err(),
            "{p} should be hidden"
        );
    }
    // The rootfs is runnable: busybox, applet symlinks and the image's passwd.
    let out = std::process::Command::new("chroot")
        .arg(&root)
        .args(["/bin/sh", "-c", "id -u vessel && ls /opaque"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "1000\nadded-in-l3\nnew-in-l2\n"
    );
    let home = std::fs::metadata(root.join("home/vessel")).unwrap();
    assert_eq!((home.uid(), home.gid()), (1000, 1000));
    assert_eq!(
        std::fs::metadata(root.join("tmp")).unwrap().mode() & 0o7777,
        0o1777
    );
}

#[test]
fn zstd_and_plain_layers_unpack_the_same_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let snaps = Snapshotter::open(tmp.path()).unwrap();
    let gz = testimages::busybox_layer(LayerCompression::Gzip).unwrap();
    let zst = testimages::busybox_layer(LayerCompression::Zstd).unwrap();
    let plain = testimages::busybox_layer(LayerCompression::None).unwrap();
    assert_eq!(gz.diff_id, zst.diff_id);
    assert_eq!(gz.diff_id, plain.diff_id);
    let mut sizes = Vec::new();
    for l in [&gz, &zst, &plain] {
        let pending = snaps
            .prepare(&sha256_digest(l.media_type.as_bytes()))
            .unwrap();
        let stats = unpack_layer(&l.data[..], compression(l), pending.path()).unwrap();
        let busybox = std::fs::read(pending.path().join("bin/busybox")).unwrap();
        assert_eq!(busybox, std::fs::read(testimages::BUSYBOX).unwrap());
        assert_eq!(
            std::fs::read_link(pending.path().join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        sizes.push((stats.entries, stats.bytes));
    }
    assert!(sizes.windows(2).all(|w| w[0] == w[1]), "{sizes:?}");
}

#[test]
fn hostile_layers_fail_and_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let snaps = Snapshotter::open(tmp.path()).unwrap();
    let passwd_links = std::fs::metadata("/etc/passwd").unwrap().nlink();
    for kind in HostileKind::ALL {
        let layer = testimages::hostile_layer(kind).unwrap();
        let pending = snaps.prepare(&layer.diff_id).unwrap();
        let err = unpack_layer(&layer.data[..], compression(&layer), pending.path()).unwrap_err();
        assert!(
            matches!(err, UnpackError::Unsafe { .. }),
            "{kind:?}: {err:?}"
        );
        drop(pending);
        assert!(
            std::fs::read_dir(tmp.path()).unwrap().next().is_none(),
            "{kind:?} left files"
        );
        if let Some(marker) = kind.host_marker() {
            assert!(!Path::new(marker).exists(), "{kind:?} wrote {marker}");
        }
    }
    assert_eq!(
        std::fs::metadata("/etc/passwd").unwrap().nlink(),
        passwd_links
    );
}

#[test]
fn unpack_throughput() {
    const SIZE: usize = 8 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let snaps = Snapshotter::open(tmp.path()).unwrap();
    for c in [
        LayerCompression::None,
        LayerCompression::Gzip,
        LayerCompression::Zstd,
    ] {
        let layer = testimages::random_layer("blob", SIZE, c).unwrap();
        let pending = snaps.prepare(&layer.digest).unwrap();
        let start = Instant::now();
        let stats = unpack_layer(&layer.data[..], compression(&layer), pending.path()).unwrap();
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(stats.bytes, SIZE as u64);
        eprintln!(
            "unpack {c:?}: {:.0} MiB/s ({SIZE} bytes in {secs:.3}s; debug builds are slower)",
            SIZE as f64 / secs / (1 << 20) as f64
        );
    }
}
