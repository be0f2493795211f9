//! Reading files of an image's merged view on the host (e.g. `/etc/passwd`)
//! straight from its layer snapshots, without mounting anything.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// True for an overlay whiteout (a 0/0 character device).
fn is_whiteout(meta: &std::fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

/// Largest file [`read_merged_file`] reads (an image's /etc/passwd or /etc/group):
/// a group file listing a user in 200,000 groups takes ~5 MiB, and must be read to
/// be refused rather than silently ignored.
pub const MAX_MERGED_FILE: u64 = 16 << 20;

/// Reads `rel` (e.g. "etc/passwd") from the merged view of `layers` (bottom→top):
/// the top-most layer that has it wins, a whiteout or a non-directory parent above
/// hides it. Symlinks are not followed. None when absent or larger than
/// [`MAX_MERGED_FILE`].
pub fn read_merged_file(layers: &[PathBuf], rel: &str) -> Option<Vec<u8>> {
    let rel = Path::new(rel.trim_start_matches('/'));
    for layer in layers.iter().rev() {
        // A parent replaced by a file, or whited out, in this layer hides lower ones.
        let mut hidden = false;
        for parent in rel
            .ancestors()
            .skip(1)
            .filter(|p| !p.as_os_str().is_empty())
        {
            if let Ok(m) = std::fs::symlink_metadata(layer.join(parent)) {
                if !m.is_dir() {
                    hidden = true;
                }
            }
        }
        if hidden {
            return None;
        }
        match std::fs::symlink_metadata(layer.join(rel)) {
            Ok(m) if is_whiteout(&m) => return None,
            // Layers come from registries: a huge file is refused, not read whole.
            Ok(m) if m.is_file() && m.len() <= MAX_MERGED_FILE => {
                return std::fs::read(layer.join(rel)).ok()
            }
            Ok(_) => return None,
            Err(_) => continue,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_reads_honour_order_and_whiteouts() {
        let tmp = tempfile::tempdir().unwrap();
        let l = |n: &str| tmp.path().join(n);
        for (layer, content) in [("a", "bottom"), ("b", "top")] {
            std::fs::create_dir_all(l(layer).join("etc")).unwrap();
            std::fs::write(l(layer).join("etc/passwd"), content).unwrap();
        }
        std::fs::create_dir_all(l("c")).unwrap();
        let layers = vec![l("a"), l("b"), l("c")];
        assert_eq!(read_merged_file(&layers, "/etc/passwd").unwrap(), b"top");
        assert_eq!(
            read_merged_file(&layers[..1], "etc/passwd").unwrap(),
            b"bottom"
        );
        assert!(read_merged_file(&layers, "etc/group").is_none());
        // A file where a parent dir was hides everything below.
        std::fs::write(l("c").join("etc"), "not a dir").unwrap();
        assert!(read_merged_file(&layers, "etc/passwd").is_none());
        if rustix::process::geteuid().is_root() {
            std::fs::remove_file(l("c").join("etc")).unwrap();
            std::fs::create_dir_all(l("c").join("etc")).unwrap();
            rustix::fs::mknodat(
                rustix::fs::CWD,
                l("c").join("etc/passwd"),
                rustix::fs::FileType::CharacterDevice,
                rustix::fs::Mode::from_raw_mode(0o600),
                0,
            )
            .unwrap();
            assert!(read_merged_file(&layers, "etc/passwd").is_none());
        }
    }
}
