//! Node-wide allocation of the unprivileged uids VMs run as. Every vesseld
//! instance on a node (a second runtime-handler daemon, a test daemon, vessel-bench)
//! allocates from one registry dir under /run, under one lock, so two VMs never share
//! a uid: a VMM escape in one pod must not own another pod's QEMU.
//!
//! Registry layout (`JailConfig::registry`, root:root 0700): `.lock` (flock) and one
//! file per uid in use, named by the uid, holding the path of the jail dir that uid
//! owns. An entry is live while that path is a directory owned by the uid; otherwise
//! (the VM is gone, or its vesseld crashed before the jail dir was handed over) the
//! next allocation reclaims it.

use std::collections::HashSet;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::jail::JAIL_DIR;

/// The registry all instances share unless configured otherwise.
pub const DEFAULT_REGISTRY: &str = "/run/vessel-uids";
/// Files whose subordinate id ranges the VM uids must not overlap.
pub const DEFAULT_SUBID_FILES: &[&str] = &["/etc/subuid", "/etc/subgid"];

/// Where the unprivileged uids of VMs come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailConfig {
    /// First uid (and gid) of the range.
    pub uid_base: u32,
    /// How many uids the range holds (at most that many VMs at once, node-wide).
    pub uid_count: u32,
    /// The node-wide registry dir (see the module docs).
    pub registry: PathBuf,
}

impl Default for JailConfig {
    fn default() -> Self {
        // Above every range `useradd` hands out (login.defs SUB_UID_MAX 600,100,000)
        // and the kubelet's documented `kubelet:65536:7208960` user-namespace range,
        // below 2^31 (tools that treat uids as signed). A kubelet without a `kubelet`
        // entry in /etc/subuid may use any id from 65536: give it one.
        Self {
            uid_base: 1_000_000_000,
            uid_count: 65_536,
            registry: PathBuf::from(DEFAULT_REGISTRY),
        }
    }
}

/// The identity a VM's unprivileged processes run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailIds {
    /// uid.
    pub uid: u32,
    /// gid (the same number as the uid).
    pub gid: u32,
}

/// Lowest uid of the range not in `used`.
pub fn lowest_free(cfg: &JailConfig, used: &HashSet<u32>) -> Option<u32> {
    (0..cfg.uid_count)
        .filter_map(|i| cfg.uid_base.checked_add(i))
        .find(|u| !used.contains(u))
}

fn owner_of(dir: &Path) -> Option<u32> {
    std::fs::symlink_metadata(dir)
        .ok()
        .filter(|m| m.is_dir())
        .map(|m| m.uid())
}

/// Creates the registry dir if needed and checks that only root can change it
/// (an entry planted by anyone else would block or steal uids).
fn open_registry(dir: &Path) -> Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(dir, e)),
    }
    let m = std::fs::symlink_metadata(dir).map_err(|e| Error::io(dir, e))?;
    if !m.is_dir() || m.uid() != 0 || m.mode() & 0o022 != 0 {
        return Err(Error::InvalidConfig(format!(
            "the VM uid registry {} must be a directory owned by root and writable only \
             by it (remove it to have vesseld recreate it)",
            dir.display()
        )));
    }
    Ok(())
}

/// The uids the registry records as live; stale entries are removed.
fn live_entries(registry: &Path) -> Result<HashSet<u32>> {
    let mut used = HashSet::new();
    let entries = std::fs::read_dir(registry).map_err(|e| Error::io(registry, e))?;
    for e in entries.flatten() {
        let Some(uid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let path = e.path();
        let owner = std::fs::read(&path)
            .ok()
            .map(|b| PathBuf::from(std::ffi::OsStr::from_bytes(&b)))
            .and_then(|jail| owner_of(&jail));
        if owner == Some(uid) {
            used.insert(uid);
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
    Ok(used)
}

/// uids of jail dirs beside `run_dir` (VMs of this instance started before the
/// registry existed, e.g. across an upgrade).
fn sibling_owners(cfg: &JailConfig, run_dir: &Path) -> HashSet<u32> {
    let in_range = |u: u32| u >= cfg.uid_base && u - cfg.uid_base < cfg.uid_count;
    let mut used = HashSet::new();
    if let Some(entries) = run_dir.parent().and_then(|p| std::fs::read_dir(p).ok()) {
        for e in entries.flatten() {
            if let Some(uid) = owner_of(&e.path().join(JAIL_DIR)).filter(|u| in_range(*u)) {
                used.insert(uid);
            }
        }
    }
    used
}

/// Picks the lowest uid of `cfg` that no VM on this node uses, records it, and runs
/// `prepare(uid)` — which must make `<run_dir>/j` owned by it — under the node-wide
/// lock. The lock is held for a few file operations only, so the wait is short.
/// Blocking.
pub fn allocate<T>(
    cfg: &JailConfig,
    run_dir: &Path,
    prepare: impl FnOnce(JailIds) -> Result<T>,
) -> Result<(JailIds, T)> {
    open_registry(&cfg.registry)?;
    let lock_path = cfg.registry.join(".lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::io(&lock_path, e))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| Error::io(&lock_path, e.into()))?;
    let mut used = live_entries(&cfg.registry)?;
    used.extend(sibling_owners(cfg, run_dir));
    let uid = lowest_free(cfg, &used).ok_or_else(|| {
        Error::InvalidConfig(format!(
            "all {} VM uids from {} are in use on this node ([jail] uid_count)",
            cfg.uid_count, cfg.uid_base
        ))
    })?;
    // Recorded before the jail dir is handed over: a crash in between leaves an
    // entry whose jail dir is not the uid's, which the next allocation reclaims.
    let entry = cfg.registry.join(uid.to_string());
    let jail = run_dir.join(JAIL_DIR);
    std::fs::write(&entry, jail.as_os_str().as_bytes()).map_err(|e| Error::io(&entry, e))?;
    let ids = JailIds { uid, gid: uid };
    match prepare(ids) {
        Ok(out) => Ok((ids, out)),
        Err(e) => {
            let _ = std::fs::remove_file(&entry);
            Err(e)
        }
    }
    // The lock is released when `lock` closes.
}

/// One subordinate-id range (`name:start:count`) of a subuid/subgid file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubidRange {
    /// Login name or uid the range belongs to.
    pub owner: String,
    /// First id.
    pub start: u64,
    /// Number of ids.
    pub count: u64,
}

/// The ranges of a subuid/subgid file's text (malformed lines are skipped: the file
/// is the administrator's, and shadow's tools skip them too).
pub fn parse_subid(text: &str) -> Vec<SubidRange> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let mut f = l.trim().split(':');
            let owner = f.next()?.to_owned();
            let start = f.next()?.parse().ok()?;
            let count = f.next()?.parse().ok()?;
            (f.next().is_none() && !owner.is_empty()).then_some(SubidRange {
                owner,
                start,
                count,
            })
        })
        .collect()
}

/// Refuses a uid range that overlaps a subordinate-id range of `files` (missing
/// files have none): those ids belong to user namespaces (the kubelet's pods,
/// rootless containers), whose processes must never share a uid with a VMM.
pub fn check_subid_overlap(cfg: &JailConfig, files: &[PathBuf]) -> Result<()> {
    let (lo, hi) = (
        u64::from(cfg.uid_base),
        u64::from(cfg.uid_base) + u64::from(cfg.uid_count),
    );
    for file in files {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(file, e)),
        };
        for r in parse_subid(&text) {
            if r.start < hi && lo < r.start.saturating_add(r.count) {
                return Err(Error::InvalidConfig(format!(
                    "the VM uid range {lo}..{hi} ([jail] uid_base, uid_count) overlaps \
                     {}'s range {}..{} in {}; move [jail] uid_base above it",
                    r.owner,
                    r.start,
                    r.start.saturating_add(r.count),
                    file.display()
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jail::chown_jail_dir;
    use std::os::unix::fs::PermissionsExt;

    fn cfg(registry: &Path) -> JailConfig {
        JailConfig {
            uid_base: 4_000_000_000,
            uid_count: 10,
            registry: registry.to_path_buf(),
        }
    }

    fn prep(run: &Path) -> impl FnOnce(JailIds) -> Result<()> {
        let run = run.to_path_buf();
        move |ids: JailIds| {
            let j = run.join(JAIL_DIR);
            std::fs::create_dir_all(&j).unwrap();
            chown_jail_dir(&j, ids)
        }
    }

    #[test]
    fn lowest_free_skips_used() {
        let mut c = cfg(Path::new("/nonexistent"));
        c.uid_base = 1000;
        c.uid_count = 3;
        let mut used = HashSet::new();
        assert_eq!(lowest_free(&c, &used), Some(1000));
        used.insert(1000);
        used.insert(1002);
        assert_eq!(lowest_free(&c, &used), Some(1001));
        used.insert(1001);
        assert_eq!(lowest_free(&c, &used), None);
    }

    /// Two instances with unrelated run roots share the registry: distinct uids.
    #[test]
    fn instances_in_other_run_roots_get_distinct_uids() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cfg(&tmp.path().join("uids"));
        let a_dir = tmp.path().join("instance-a/pods/a");
        let b_dir = tmp.path().join("instance-b/pods/b");
        let (a, _) = allocate(&c, &a_dir, prep(&a_dir)).unwrap();
        let (b, _) = allocate(&c, &b_dir, prep(&b_dir)).unwrap();
        assert_eq!(a.uid, 4_000_000_000);
        assert_eq!(b.uid, 4_000_000_001);
        assert_eq!(owner_of(&b_dir.join(JAIL_DIR)), Some(b.uid));
        let m = std::fs::metadata(b_dir.join(JAIL_DIR)).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o700);
        let reg = std::fs::metadata(&c.registry).unwrap();
        assert_eq!(reg.permissions().mode() & 0o777, 0o700);
        // A freed uid is reused (lowest first) and its stale entry replaced.
        std::fs::remove_dir_all(&a_dir).unwrap();
        let c_dir = tmp.path().join("instance-c/c");
        let (cc, _) = allocate(&c, &c_dir, prep(&c_dir)).unwrap();
        assert_eq!(cc.uid, 4_000_000_000);
        let entry = std::fs::read(c.registry.join("4000000000")).unwrap();
        assert_eq!(entry, c_dir.join(JAIL_DIR).as_os_str().as_bytes());
        // A failed preparation takes nothing and leaves no entry.
        let d_dir = tmp.path().join("d");
        let err = allocate(&c, &d_dir, |_| -> Result<()> {
            Err(Error::InvalidConfig("no".into()))
        });
        assert!(err.is_err());
        assert!(!c.registry.join("4000000002").exists());
        let (d, _) = allocate(&c, &d_dir, prep(&d_dir)).unwrap();
        assert_eq!(d.uid, 4_000_000_002);
    }

    #[test]
    fn a_full_range_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = cfg(&tmp.path().join("uids"));
        c.uid_count = 1;
        let a = tmp.path().join("a");
        allocate(&c, &a, prep(&a)).unwrap();
        let b = tmp.path().join("b");
        let err = allocate(&c, &b, prep(&b)).unwrap_err().to_string();
        assert!(err.contains("all 1 VM uids"), "{err}");
    }

    #[test]
    fn a_registry_others_can_write_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cfg(&tmp.path().join("uids"));
        std::fs::create_dir(&c.registry).unwrap();
        std::fs::set_permissions(&c.registry, std::fs::Permissions::from_mode(0o777)).unwrap();
        let a = tmp.path().join("a");
        let err = allocate(&c, &a, prep(&a)).unwrap_err().to_string();
        assert!(err.contains("writable only by it"), "{err}");
    }

    #[test]
    fn subid_overlap() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("subuid");
        std::fs::write(
            &file,
            "# comment\nalice:100000:65536\nbroken line\nkubelet:65536:7208960\n",
        )
        .unwrap();
        let mut c = cfg(tmp.path());
        c.uid_base = 1_000_000_000;
        c.uid_count = 65_536;
        check_subid_overlap(&c, &[file.clone(), tmp.path().join("missing")]).unwrap();
        c.uid_base = 7_000_000;
        let err = check_subid_overlap(&c, std::slice::from_ref(&file))
            .unwrap_err()
            .to_string();
        assert!(err.contains("kubelet's range 65536..7274496"), "{err}");
        c.uid_base = 7_274_496; // right after it: no overlap
        check_subid_overlap(&c, &[file]).unwrap();
        assert_eq!(parse_subid("a:1:2:3\n:1:2\nb:x:1").len(), 0);
    }
}
