//! Rootfs overlay mounts the agent makes for containers.

use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Overlay option string: lowerdirs top-most first, as overlayfs wants them.
pub fn overlay_options(lower: &[String], upper: &str, work: &str) -> String {
    let mut o = format!("lowerdir={}", lower.join(":"));
    if !upper.is_empty() {
        o.push_str(&format!(",upperdir={upper},workdir={work}"));
    }
    o
}

pub fn mount_overlay(
    target: &str,
    lower: &[String],
    upper: &str,
    work: &str,
) -> std::io::Result<()> {
    if !upper.is_empty() && work.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "overlay upper without work dir",
        ));
    }
    std::fs::create_dir_all(target)?;
    for d in [upper, work].iter().filter(|d| !d.is_empty()) {
        std::fs::create_dir_all(d)?;
    }
    // An image's rootfs is its own mount on the host, which virtiofs announces as
    // a submount: an automount point until something opens it. overlayfs looks its
    // lowerdirs up without triggering automounts and refuses such a dentry
    // ("filesystem ... not supported"), so open each one first.
    for l in lower {
        std::fs::read_dir(l)
            .map_err(|e| std::io::Error::new(e.kind(), format!("layer {l}: {e}")))?;
    }
    let opts = overlay_options(lower, upper, work);
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    // The cause first: the host caps the message it reads, and the options can be
    // long.
    .map_err(|e| {
        std::io::Error::other(format!(
            "{e}: overlay on {target} of {} lower dir(s) ({opts})",
            lower.len()
        ))
    })
}

/// Creates, as the agent (the VM's root), the mount points of `mounts` that the
/// rootfs lacks: a container in the pod's user namespace cannot, since the image's
/// directories belong to ids its namespace does not map (no id-mapped rootfs on
/// this kernel). Paths resolve inside the rootfs (a symlink in the image cannot
/// lead out). A point under an earlier mount's destination is skipped: that mount
/// provides it (e.g. /dev/pts on the /dev tmpfs).
pub fn create_mount_points(
    rootfs: &Path,
    mounts: &[oci_spec::runtime::Mount],
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let err = |what: &Path, e: pathrs::error::Error| {
        std::io::Error::other(format!("mount point {}: {e}", what.display()))
    };
    let root = pathrs::Root::open(rootfs).map_err(|e| err(rootfs, e))?;
    let dir_mode = std::fs::Permissions::from_mode(0o755);
    for (i, m) in mounts.iter().enumerate() {
        let dest = m.destination();
        let covered = mounts[..i]
            .iter()
            .any(|e| dest != e.destination() && dest.starts_with(e.destination()));
        if covered || root.resolve(dest).is_ok() {
            continue;
        }
        let bind = m.typ().as_deref() == Some("bind")
            || m.options()
                .as_ref()
                .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"));
        let file_source = bind
            && m.source()
                .as_deref()
                .and_then(|s| std::fs::metadata(s).ok())
                .is_some_and(|md| !md.is_dir());
        if file_source {
            if let Some(parent) = dest.parent() {
                root.mkdir_all(parent, &dir_mode)
                    .map_err(|e| err(dest, e))?;
            }
            root.create_file(
                dest,
                pathrs::flags::OpenFlags::O_CREAT | pathrs::flags::OpenFlags::O_CLOEXEC,
                &std::fs::Permissions::from_mode(0o644),
            )
            .map_err(|e| err(dest, e))?;
        } else {
            root.mkdir_all(dest, &dir_mode).map_err(|e| err(dest, e))?;
        }
    }
    Ok(())
}

pub fn unmount(target: &Path) {
    if let Err(e) = umount2(target, MntFlags::MNT_DETACH) {
        crate::log::warn(&format!("umount {}: {e}", target.display()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        assert_eq!(
            overlay_options(&["/a".into(), "/b".into()], "/u", "/w"),
            "lowerdir=/a:/b,upperdir=/u,workdir=/w"
        );
        assert_eq!(overlay_options(&["/a".into()], "", ""), "lowerdir=/a");
    }

    #[test]
    fn mount_points_inside_the_rootfs() {
        use oci_spec::runtime::MountBuilder;
        let tmp = tempfile::tempdir().unwrap();
        let rootfs = tmp.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("etc")).unwrap();
        // A symlink that points out of the rootfs stays inside it.
        std::os::unix::fs::symlink("/", rootfs.join("escape")).unwrap();
        let file = tmp.path().join("hosts");
        std::fs::write(&file, "x").unwrap();
        let m = |dest: &str, typ: &str, src: &Path| {
            MountBuilder::default()
                .destination(dest)
                .typ(typ)
                .source(src)
                .options(vec!["rbind".to_string()])
                .build()
                .unwrap()
        };
        let mounts = [
            m("/dev", "tmpfs", Path::new("tmpfs")),
            m("/dev/pts", "devpts", Path::new("devpts")),
            m("/etc/hosts", "bind", &file),
            m("/data/vol", "bind", tmp.path()),
            m("/escape/vessel-mount-point-test", "bind", tmp.path()),
        ];
        create_mount_points(&rootfs, &mounts).unwrap();
        assert!(rootfs.join("dev").is_dir());
        assert!(!rootfs.join("dev/pts").exists(), "covered by /dev");
        assert!(rootfs.join("etc/hosts").is_file());
        assert!(rootfs.join("data/vol").is_dir());
        assert!(!Path::new("/vessel-mount-point-test").exists());
        // Again: everything exists, nothing fails.
        create_mount_points(&rootfs, &mounts).unwrap();
    }
}
