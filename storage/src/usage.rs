//! Disk usage of a directory tree, the way `du` counts it.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::StorageError;

/// Returns `(bytes, inodes)` used by the tree at `root` (itself included).
///
/// Bytes are allocated blocks (`st_blocks * 512`), so sparse files count what they
/// occupy. Hard-linked files count once. Symlinks are not followed. A missing `root`
/// uses nothing. Entries that vanish during the walk are skipped: the walk may race
/// with removals of other snapshots.
pub fn disk_usage(root: &Path) -> Result<(u64, u64), StorageError> {
    let mut seen = HashSet::new();
    let mut totals = (0u64, 0u64);
    let meta = match std::fs::symlink_metadata(root) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(totals),
        Err(e) => return Err(StorageError::io("stat", root)(e)),
    };
    let mut stack = vec![(root.to_path_buf(), meta)];
    while let Some((path, meta)) = stack.pop() {
        if seen.insert((meta.dev(), meta.ino())) {
            totals.0 += meta.blocks() * 512;
            totals.1 += 1;
        }
        if !meta.is_dir() {
            continue;
        }
        let entries = match std::fs::read_dir(&path) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(StorageError::io("read dir", &path)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(StorageError::io("read dir", &path))?;
            let child = entry.path();
            match std::fs::symlink_metadata(&child) {
                Ok(m) => stack.push((child, m)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StorageError::io("stat", &child)(e)),
            }
        }
    }
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_files_dirs_and_hardlinks_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("d")).unwrap();
        std::fs::write(root.join("d/f"), vec![7u8; 64 * 1024]).unwrap();
        std::fs::hard_link(root.join("d/f"), root.join("link")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("sym")).unwrap();
        let (bytes, inodes) = disk_usage(root).unwrap();
        // root, d, f (twice linked), sym
        assert_eq!(inodes, 4);
        assert!(bytes >= 64 * 1024, "bytes {bytes}");
        assert!(bytes < 64 * 1024 * 4, "hard link counted twice? {bytes}");
    }

    #[test]
    fn missing_root_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(disk_usage(&dir.path().join("nope")).unwrap(), (0, 0));
    }
}
