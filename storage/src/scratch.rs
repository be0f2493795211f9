//! Per-pod scratch disks: the node-disk home of a pod's container writable layers.
//!
//! Each pod gets one sparse raw file, `<dir>/<pod id>.img`, formatted ext4 here and
//! handed to its VM as a virtio-blk disk, which the guest mounts for its overlay
//! upper/work dirs. Its size bounds what the pod's containers can write; the blocks
//! the guest really wrote are what the node pays (`st_blocks`); deletes in the guest
//! punch holes back (discard).
//!
//! The host never mounts, reads or fscks a disk once a VM had it: its contents are
//! guest-written and ext4 parsing in the host kernel is not a boundary. vesseld only
//! creates, stats and unlinks the file, in a directory only it can write.

use std::fs::{DirBuilder, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::StorageError;

/// Smallest disk accepted: ext4 with its metadata needs a few MiB to hold anything.
pub const MIN_SIZE_MIB: u64 = 16;

/// The directory of every pod's scratch disk.
#[derive(Debug, Clone)]
pub struct ScratchDisks {
    dir: PathBuf,
    mkfs: PathBuf,
    /// How many times the free space the disks may promise (they are sparse).
    overcommit: f64,
    /// Held across the room check and the file's creation, so two creations
    /// never both count on the same free space.
    creating: std::sync::Arc<std::sync::Mutex<()>>,
}

/// A created scratch disk, open read-write for the VMM.
#[derive(Debug)]
pub struct ScratchDisk {
    /// The file (for logs and the VMM's command line; never reopened by path).
    pub path: PathBuf,
    /// Opened read-write: the VMM gets this descriptor, not the path.
    pub file: OwnedFd,
    /// The same file opened read-only (QEMU wants both modes in its fd set).
    pub file_ro: OwnedFd,
}

/// What the scratch disks take on the node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScratchUsage {
    /// Allocated bytes (`st_blocks * 512`) of every disk: what the guests wrote.
    pub used_bytes: u64,
    /// Host inodes: one per disk.
    pub inodes_used: u64,
}

/// Default of [`ScratchDisks::with_overcommit`]: sparse disks that all filled up
/// at once could take ten times the free space; past that a pod is refused.
pub const DEFAULT_OVERCOMMIT: f64 = 10.0;

impl ScratchDisks {
    /// Disks live in `dir` (created 0700 on first use); `mkfs` is `mkfs.ext4`.
    pub fn new(dir: impl Into<PathBuf>, mkfs: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            mkfs: mkfs.into(),
            overcommit: DEFAULT_OVERCOMMIT,
            creating: Default::default(),
        }
    }

    /// Lets the disks promise `ratio` times the filesystem's free space.
    pub fn with_overcommit(mut self, ratio: f64) -> Self {
        self.overcommit = ratio;
        self
    }

    /// Refuses a disk of `need` bytes when what the disks may still grow by, plus
    /// `need`, passes the free space times the overcommit ratio: a disk that can
    /// never be backed fails its writer's pod later, and fills the node for all.
    fn check_room(&self, need: u64) -> Result<(), StorageError> {
        let st = rustix::fs::statvfs(&self.dir)
            .map_err(|e| StorageError::io("statvfs", &self.dir)(e.into()))?;
        let available = st.f_bavail.saturating_mul(st.f_frsize);
        let mut promised = 0u64;
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for entry in rd.flatten() {
                if let Ok(m) = std::fs::symlink_metadata(entry.path()) {
                    if m.is_file() {
                        promised += m.len().saturating_sub(m.blocks() * 512);
                    }
                }
            }
        }
        let allowed = available as f64 * self.overcommit;
        if (promised.saturating_add(need)) as f64 > allowed {
            return Err(StorageError::NoRoom {
                need,
                promised,
                available,
                ratio: self.overcommit,
                dir: self.dir.clone(),
            });
        }
        Ok(())
    }

    /// The directory holding the disks.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where `pod_id`'s disk lives. `pod_id` is vesseld's own hex id.
    pub fn path(&self, pod_id: &str) -> PathBuf {
        self.dir.join(format!("{pod_id}.img"))
    }

    /// Creates `pod_id`'s disk: a sparse file of `size_mib` MiB, formatted ext4.
    /// Blocking (runs mkfs): call it off the async workers. Nothing is left behind
    /// on failure.
    pub fn create(&self, pod_id: &str, size_mib: u64) -> Result<ScratchDisk, StorageError> {
        if !valid_id(pod_id) {
            return Err(StorageError::Invalid(format!(
                "scratch disk name {pod_id:?}"
            )));
        }
        if size_mib < MIN_SIZE_MIB {
            return Err(StorageError::Invalid(format!(
                "scratch disk of {size_mib} MiB (at least {MIN_SIZE_MIB})"
            )));
        }
        let bytes = size_mib
            .checked_mul(1024 * 1024)
            .ok_or_else(|| StorageError::Invalid(format!("scratch disk of {size_mib} MiB")))?;
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(StorageError::io("create", &self.dir))?;
        let path = self.path(pod_id);
        let _creating = self.creating.lock().unwrap_or_else(|p| p.into_inner());
        self.check_room(bytes)?;
        // create_new + O_NOFOLLOW: never reuse or follow anything already there.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(StorageError::io("create", &path))?;
        let sized = file
            .set_len(bytes)
            .map_err(StorageError::io("truncate", &path));
        // Counted by the next room check from here (its apparent size).
        drop(_creating);
        let made = sized.and_then(|()| self.format(&path));
        // Reopened through the descriptor, not the path: the very same file.
        let made = made.and_then(|()| {
            let proc_path = format!("/proc/self/fd/{}", file.as_raw_fd());
            std::fs::File::open(&proc_path).map_err(StorageError::io("reopen", &path))
        });
        match made {
            Ok(ro) => Ok(ScratchDisk {
                path,
                file: file.into(),
                file_ro: ro.into(),
            }),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// ext4 without a journal (the disk dies with its VM: nothing to recover), no
    /// reserved blocks, lazy inode tables (formatting a 10 GiB file takes ~30 ms
    /// and allocates ~4 MiB), no discard pass (the file is already all holes).
    fn format(&self, path: &Path) -> Result<(), StorageError> {
        let out = Command::new(&self.mkfs)
            .args([
                "-q",
                "-F",
                "-m",
                "0",
                "-O",
                "^has_journal",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
            ])
            .arg(path)
            .output()
            .map_err(StorageError::io("run mkfs.ext4 on", path))?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(StorageError::Mkfs {
            path: path.to_path_buf(),
            message: format!("{}: {}", out.status, stderr.trim()),
        })
    }

    /// Removes `pod_id`'s disk; gone already is fine.
    pub fn remove(&self, pod_id: &str) -> Result<(), StorageError> {
        if !valid_id(pod_id) {
            return Ok(());
        }
        let path = self.path(pod_id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StorageError::io("remove", path)(e)),
        }
    }

    /// Removes every disk whose pod `keep` rejects (left by a crash between create
    /// and the pod's record going away). Returns how many were removed.
    pub fn sweep(&self, keep: impl Fn(&str) -> bool) -> Result<usize, StorageError> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(StorageError::io("read dir", &self.dir)(e)),
        };
        let mut removed = 0;
        for entry in rd.flatten() {
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".img")) else {
                continue;
            };
            if valid_id(id) && !keep(id) && self.remove(id).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Allocated bytes and count of every disk (sparse: what was written, less
    /// what the guests discarded). Stats only files vesseld made; never opens them.
    pub fn usage(&self) -> Result<ScratchUsage, StorageError> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(ScratchUsage::default())
            }
            Err(e) => return Err(StorageError::io("read dir", &self.dir)(e)),
        };
        let mut u = ScratchUsage::default();
        for entry in rd.flatten() {
            // Entries may vanish as pods go: skip those.
            if let Ok(m) = std::fs::symlink_metadata(entry.path()) {
                if m.is_file() {
                    u.used_bytes += m.blocks() * 512;
                    u.inodes_used += 1;
                }
            }
        }
        Ok(u)
    }
}

/// Pod ids are vesseld's lowercase hex; anything else never names a file here.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disks(dir: &Path) -> ScratchDisks {
        ScratchDisks::new(dir.join("scratch"), "mkfs.ext4")
    }

    #[test]
    fn creates_a_sparse_ext4_disk_and_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let d = disks(dir.path());
        let disk = d.create("abc123", 1024).unwrap();
        let m = std::fs::metadata(&disk.path).unwrap();
        assert_eq!(m.len(), 1024 * 1024 * 1024);
        assert_eq!(m.mode() & 0o777, 0o600);
        // Sparse: formatting wrote a few MiB, not the whole GiB.
        assert!(
            m.blocks() * 512 < 64 * 1024 * 1024,
            "{} bytes",
            m.blocks() * 512
        );
        // The ext4 superblock magic (0xEF53 at byte 1024 + 56).
        let mut magic = [0u8; 2];
        std::os::unix::fs::FileExt::read_exact_at(
            &std::fs::File::open(&disk.path).unwrap(),
            &mut magic,
            1080,
        )
        .unwrap();
        assert_eq!(magic, [0x53, 0xef]);
        let u = d.usage().unwrap();
        assert_eq!(u.inodes_used, 1);
        assert_eq!(u.used_bytes, m.blocks() * 512);
        d.remove("abc123").unwrap();
        d.remove("abc123").unwrap();
        assert!(!disk.path.exists());
        assert_eq!(d.usage().unwrap(), ScratchUsage::default());
    }

    #[test]
    fn refuses_bad_names_sizes_and_existing_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = disks(dir.path());
        assert!(d.create("../x", 64).is_err());
        assert!(d.create("ABC", 64).is_err());
        assert!(d.create("ab", 1).is_err());
        d.create("ab", 64).unwrap();
        // Never reused: a second create of the same pod fails and keeps the first.
        assert!(d.create("ab", 64).is_err());
        assert!(d.path("ab").exists());
    }

    #[test]
    fn a_disk_the_filesystem_cannot_back_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sdir = dir.path().join("s");
        std::fs::create_dir(&sdir).unwrap();
        let st = rustix::fs::statvfs(&sdir).unwrap();
        let free_mib = (st.f_bavail * st.f_frsize) >> 20;
        // Half the free space, without overcommit: one fits, a second does not.
        let d = disks(dir.path()).with_overcommit(1.0);
        let half = (free_mib / 2).max(64);
        let d = ScratchDisks {
            dir: sdir.clone(),
            ..d
        };
        d.create("aa", half).unwrap();
        let e = d.create("bb", half + 64).unwrap_err();
        assert!(matches!(e, StorageError::NoRoom { .. }), "{e}");
        assert!(e.to_string().contains("scratch_overcommit"), "{e}");
        assert!(!d.path("bb").exists(), "a refused disk leaves nothing");
        // With room to overcommit, it is made.
        let d = d.with_overcommit(4.0);
        d.create("bb", half + 64).unwrap();
    }

    #[test]
    fn failed_mkfs_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let d = ScratchDisks::new(dir.path().join("s"), "/bin/false");
        let e = d.create("ab", 64).unwrap_err();
        assert!(matches!(e, StorageError::Mkfs { .. }), "{e}");
        assert_eq!(std::fs::read_dir(d.dir()).unwrap().count(), 0);
    }

    #[test]
    fn sweep_keeps_only_known_pods() {
        let dir = tempfile::tempdir().unwrap();
        let d = disks(dir.path());
        d.create("aa", 64).unwrap();
        d.create("bb", 64).unwrap();
        std::fs::write(d.dir().join("notes.txt"), "x").unwrap();
        assert_eq!(d.sweep(|id| id == "aa").unwrap(), 1);
        assert!(d.path("aa").exists());
        assert!(!d.path("bb").exists());
        assert!(d.dir().join("notes.txt").exists());
    }
}
