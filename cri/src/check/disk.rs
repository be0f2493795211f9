//! Free space for images where `root` lives.

use std::path::Path;

use super::Verdict;

const GIB: u64 = 1 << 30;
/// Under this, pulls soon fail: fail.
pub const FAIL_BELOW: u64 = GIB;
/// Under this, a few images fill the disk: warn.
pub const WARN_BELOW: u64 = 5 * GIB;

/// statvfs of `root`, or of its nearest existing parent before it is created.
pub fn free_space(root: &Path) -> Verdict {
    let existing = root
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    match nix::sys::statvfs::statvfs(existing) {
        Ok(s) => verdict(root, s.blocks_available().saturating_mul(s.fragment_size())),
        Err(e) => Verdict::fail("disk", format!("statvfs {}: {e}", existing.display())),
    }
}

/// The verdict for `free` bytes available under `root`.
pub fn verdict(root: &Path, free: u64) -> Verdict {
    let shown = format!(
        "{:.1} GiB free for images under {}",
        free as f64 / GIB as f64,
        root.display()
    );
    if free < FAIL_BELOW {
        Verdict::fail(
            "disk",
            format!("{shown} (under 1 GiB): pulls will fail; free space or move root"),
        )
    } else if free < WARN_BELOW {
        Verdict::warn(
            "disk",
            format!("{shown} (under 5 GiB): a few images fill it"),
        )
    } else {
        Verdict::ok("disk", shown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Level;

    #[test]
    fn thresholds() {
        let root = Path::new("/var/lib/vessel");
        assert_eq!(verdict(root, GIB / 2).level, Level::Fail);
        assert_eq!(verdict(root, 2 * GIB).level, Level::Warn);
        let v = verdict(root, 10 * GIB);
        assert_eq!(v.level, Level::Ok);
        assert_eq!(v.message, "10.0 GiB free for images under /var/lib/vessel");
        assert_ne!(
            free_space(Path::new("/nonexistent/vessel/root")).message,
            ""
        );
    }
}
