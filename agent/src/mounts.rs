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
    // Each layer is its own bind mount on the host, which virtiofs announces as a
    // submount: an automount point until something opens it. overlayfs looks its
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
    .map_err(|e| std::io::Error::other(format!("overlay on {target} ({opts}): {e}")))
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
}
