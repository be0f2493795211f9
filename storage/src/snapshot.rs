//! Layer snapshots keyed by chain id: `root/<chain-id hex>/` holds one layer's diff.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{disk_usage, StorageError};

/// Prefix of in-progress (or abandoned) directories; never a valid snapshot name.
const TMP_PREFIX: &str = ".tmp-";

/// Distinguishes temporary dirs made by one process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Store of committed layer snapshots in one directory.
#[derive(Debug, Clone)]
pub struct Snapshotter {
    root: PathBuf,
}

/// A snapshot being filled. Dropping it without [`commit`](Self::commit) removes
/// everything written so far.
#[derive(Debug)]
pub struct PendingSnapshot {
    tmp: PathBuf,
    target: PathBuf,
    committed: bool,
}

/// Splits `"sha256:<hex>"` (or bare hex) into `(algorithm, hex)` after checking that
/// the hex can be used as a file name (this is what keeps ids from naming other paths).
fn parse_chain_id(chain_id: &str) -> Result<(&str, &str), StorageError> {
    let (algo, hex) = chain_id.split_once(':').unwrap_or(("sha256", chain_id));
    let len_ok = match algo {
        "sha256" => hex.len() == 64,
        "sha512" => hex.len() == 128,
        _ => false,
    };
    if !len_ok
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(StorageError::InvalidChainId(chain_id.to_owned()));
    }
    Ok((algo, hex))
}

fn fsync_dir(path: &Path) -> Result<(), StorageError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(StorageError::io("fsync", path))
}

fn remove_tree(path: &Path) -> Result<(), StorageError> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(StorageError::io("remove", path)(e))
        }
        _ => Ok(()),
    }
}

impl Snapshotter {
    /// Opens (creating if needed) the store in `dir` and removes `.tmp-*` leftovers of
    /// unpacks or removals interrupted by a crash.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        std::fs::create_dir_all(dir).map_err(StorageError::io("create", dir))?;
        let entries = std::fs::read_dir(dir).map_err(StorageError::io("read dir", dir))?;
        for entry in entries {
            let entry = entry.map_err(StorageError::io("read dir", dir))?;
            if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                remove_tree(&entry.path())?;
            }
        }
        Ok(Self {
            root: dir.to_path_buf(),
        })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether a committed snapshot exists for `chain_id`.
    pub fn exists(&self, chain_id: &str) -> bool {
        parse_chain_id(chain_id).is_ok() && self.path(chain_id).is_dir()
    }

    /// Directory of the snapshot `chain_id` (whether or not it exists). An invalid id
    /// maps to a name the store never creates, so it never aliases another path.
    pub fn path(&self, chain_id: &str) -> PathBuf {
        match parse_chain_id(chain_id) {
            Ok((_, hex)) => self.root.join(hex),
            Err(_) => self.root.join(".invalid-chain-id"),
        }
    }

    /// Starts a new snapshot for `chain_id` in a fresh temporary directory.
    pub fn prepare(&self, chain_id: &str) -> Result<PendingSnapshot, StorageError> {
        let (_, hex) = parse_chain_id(chain_id)?;
        let tmp = self.tmp_path(hex);
        std::fs::create_dir(&tmp).map_err(StorageError::io("create", &tmp))?;
        Ok(PendingSnapshot {
            tmp,
            target: self.root.join(hex),
            committed: false,
        })
    }

    /// Removes the snapshot `chain_id`; removing an absent one succeeds.
    ///
    /// The directory is first renamed away, so the snapshot disappears atomically
    /// and a crash mid-removal leaves only a `.tmp-*` dir that `open` cleans.
    pub fn remove(&self, chain_id: &str) -> Result<(), StorageError> {
        let (_, hex) = parse_chain_id(chain_id)?;
        let path = self.root.join(hex);
        let doomed = self.tmp_path(&format!("rm-{hex}"));
        match std::fs::rename(&path, &doomed) {
            Ok(()) => remove_tree(&doomed),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StorageError::io("rename", &path)(e)),
        }
    }

    /// Chain ids (`"sha256:<hex>"`) of all committed snapshots, sorted.
    pub fn list(&self) -> Result<Vec<String>, StorageError> {
        let entries =
            std::fs::read_dir(&self.root).map_err(StorageError::io("read dir", &self.root))?;
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(StorageError::io("read dir", &self.root))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let algo = match name.len() {
                64 => "sha256",
                128 => "sha512",
                _ => continue,
            };
            let id = format!("{algo}:{name}");
            if parse_chain_id(&id).is_ok() && entry.path().is_dir() {
                ids.push(id);
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// `(bytes, inodes)` used by the whole store, pending snapshots included.
    pub fn usage(&self) -> Result<(u64, u64), StorageError> {
        disk_usage(&self.root)
    }

    fn tmp_path(&self, tag: &str) -> PathBuf {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        self.root
            .join(format!("{TMP_PREFIX}{tag}-{}-{n}", std::process::id()))
    }
}

impl PendingSnapshot {
    /// The directory to fill.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Makes the snapshot durable and visible under its chain id, returning its path.
    ///
    /// Flushes the filesystem (one `syncfs` instead of an fsync per file), then renames
    /// the temporary dir into place and fsyncs the store dir. If another unpack of the
    /// same chain id committed first, its snapshot is kept and this one discarded: both
    /// hold the same content.
    pub fn commit(mut self) -> Result<PathBuf, StorageError> {
        let dir = File::open(&self.tmp).map_err(StorageError::io("open", &self.tmp))?;
        rustix::fs::syncfs(&dir).map_err(|e| StorageError::io("syncfs", &self.tmp)(e.into()))?;
        drop(dir);
        match std::fs::rename(&self.tmp, &self.target) {
            Ok(()) => {}
            // rename(2) onto a non-empty dir: ENOTEMPTY or EEXIST.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::DirectoryNotEmpty | std::io::ErrorKind::AlreadyExists
                ) && self.target.is_dir() =>
            {
                remove_tree(&self.tmp)?;
            }
            Err(e) => return Err(StorageError::io("rename", &self.tmp)(e)),
        }
        self.committed = true;
        if let Some(parent) = self.target.parent() {
            fsync_dir(parent)?;
        }
        Ok(self.target.clone())
    }
}

impl Drop for PendingSnapshot {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: a leftover is removed by the next `Snapshotter::open`.
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const HEX: &str = "1111111111111111111111111111111111111111111111111111111111111111";

    fn store() -> (tempfile::TempDir, Snapshotter) {
        let dir = tempfile::tempdir().unwrap();
        let s = Snapshotter::open(&dir.path().join("snapshots")).unwrap();
        (dir, s)
    }

    fn entries(s: &Snapshotter) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(s.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn commit_publishes_under_chain_id() {
        let (_d, s) = store();
        assert!(!s.exists(ID));
        let p = s.prepare(ID).unwrap();
        assert!(p
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".tmp-"));
        std::fs::write(p.path().join("f"), b"hello").unwrap();
        let path = p.commit().unwrap();
        assert_eq!(path, s.root().join(HEX));
        assert_eq!(path, s.path(ID));
        assert!(s.exists(ID));
        assert_eq!(std::fs::read(path.join("f")).unwrap(), b"hello");
        assert_eq!(s.list().unwrap(), vec![ID.to_string()]);
        assert_eq!(entries(&s), vec![HEX.to_string()]);
    }

    #[test]
    fn drop_without_commit_leaves_nothing() {
        let (_d, s) = store();
        let p = s.prepare(ID).unwrap();
        std::fs::create_dir_all(p.path().join("a/b")).unwrap();
        std::fs::write(p.path().join("a/b/c"), b"x").unwrap();
        drop(p);
        assert!(entries(&s).is_empty());
        assert!(!s.exists(ID));
    }

    #[test]
    fn open_removes_tmp_leftovers_only() {
        let (_d, s) = store();
        s.prepare(ID).unwrap().commit().unwrap();
        let p = s.prepare(ID).unwrap();
        std::fs::write(p.path().join("partial"), b"x").unwrap();
        std::mem::forget(p); // simulates a crash mid-unpack
        assert_eq!(entries(&s).len(), 2);
        let s = Snapshotter::open(s.root()).unwrap();
        assert_eq!(entries(&s), vec![HEX.to_string()]);
    }

    #[test]
    fn second_commit_of_same_id_keeps_first() {
        let (_d, s) = store();
        let a = s.prepare(ID).unwrap();
        let b = s.prepare(ID).unwrap();
        std::fs::write(a.path().join("who"), b"a").unwrap();
        std::fs::write(b.path().join("who"), b"b").unwrap();
        let pa = a.commit().unwrap();
        let pb = b.commit().unwrap();
        assert_eq!(pa, pb);
        assert_eq!(std::fs::read(pa.join("who")).unwrap(), b"a");
        assert_eq!(entries(&s), vec![HEX.to_string()]);
    }

    #[test]
    fn remove_is_idempotent() {
        let (_d, s) = store();
        s.prepare(ID).unwrap().commit().unwrap();
        s.remove(ID).unwrap();
        assert!(!s.exists(ID));
        s.remove(ID).unwrap();
        assert!(entries(&s).is_empty());
        assert!(s.list().unwrap().is_empty());
    }

    #[test]
    fn rejects_ids_that_could_name_other_paths() {
        let (_d, s) = store();
        for bad in [
            "../etc",
            "sha256:..",
            "sha256:ABC",
            "",
            "md5:00",
            &format!("sha256:{HEX}/.."),
        ] {
            assert!(
                matches!(s.prepare(bad), Err(StorageError::InvalidChainId(_))),
                "{bad}"
            );
            assert!(s.remove(bad).is_err(), "{bad}");
            assert!(!s.exists(bad));
            assert!(s.path(bad).starts_with(s.root()));
        }
        // bare hex is accepted as sha256
        assert_eq!(s.path(HEX), s.path(ID));
    }

    #[test]
    fn usage_counts_snapshots() {
        let (_d, s) = store();
        let (b0, i0) = s.usage().unwrap();
        let p = s.prepare(ID).unwrap();
        std::fs::write(p.path().join("f"), vec![1u8; 100_000]).unwrap();
        p.commit().unwrap();
        let (b1, i1) = s.usage().unwrap();
        assert_eq!(i1, i0 + 2);
        assert!(b1 >= b0 + 100_000);
    }
}
