//! Which mount a path lives on, from `/proc/self/mountinfo`.

use std::path::{Path, PathBuf};

/// Undoes mountinfo's octal escapes (`\040` for space, etc.).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("-"), 8)
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The longest mount point in `mountinfo` text that contains `path` (absolute,
/// canonical). Falls back to `/`.
pub(crate) fn mount_point_in(mountinfo: &str, path: &Path) -> PathBuf {
    let mut best = PathBuf::from("/");
    for line in mountinfo.lines() {
        // Field 5 (index 4) is the mount point.
        let Some(mp) = line.split(' ').nth(4) else {
            continue;
        };
        let mp = PathBuf::from(unescape(mp));
        if path.starts_with(&mp) && mp.components().count() > best.components().count() {
            best = mp;
        }
    }
    best
}

/// The mount point of the filesystem holding `path`.
pub fn mount_point(path: &Path) -> std::io::Result<PathBuf> {
    let path = path.canonicalize()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(mount_point_in(&info, &path))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:25 / /var/lib rw shared:2 - tmpfs tmpfs rw
31 30 0:26 / /var/lib/vessel\\040data rw shared:3 - tmpfs tmpfs rw
32 22 0:27 / /var/lib2 rw shared:4 - tmpfs tmpfs rw
";

    #[test]
    fn longest_containing_mount_wins() {
        assert_eq!(
            mount_point_in(INFO, Path::new("/var/lib/vessel")),
            PathBuf::from("/var/lib")
        );
        assert_eq!(
            mount_point_in(INFO, Path::new("/var/lib/vessel data/x")),
            PathBuf::from("/var/lib/vessel data")
        );
        assert_eq!(
            mount_point_in(INFO, Path::new("/var/lib2x")),
            PathBuf::from("/")
        );
        assert_eq!(
            mount_point_in(INFO, Path::new("/var/lib2/a")),
            PathBuf::from("/var/lib2")
        );
        assert_eq!(mount_point_in("", Path::new("/x")), PathBuf::from("/"));
    }

    #[test]
    fn real_mountinfo_has_root() {
        let mp = mount_point(Path::new("/proc/self")).unwrap();
        assert_eq!(mp, PathBuf::from("/proc"));
    }
}
