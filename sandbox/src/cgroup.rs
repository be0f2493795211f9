//! The pod's host cgroup. Every host process of a pod VM (QEMU, virtiofsd and its
//! sandbox child, vhost-device-vsock) runs in one cgroup under the pod's
//! `cgroup_parent`, so the kubelet accounts the VM to the pod.
//!
//! cgroup v2: `<mount>/<parent>/vessel-<id>`. cgroup v1 (and hybrid hosts, whose
//! controllers live in v1 hierarchies): the same relative path in each mounted
//! hierarchy of [`V1_CONTROLLERS`]. Processes join from `pre_exec` by writing "0" to
//! `cgroup.procs` files opened before the fork, so their children are born inside.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Parent used when the caller gives none.
pub const DEFAULT_PARENT: &str = "/vessel";
/// v1 hierarchies the pod cgroup is created in (those mounted).
pub const V1_CONTROLLERS: &[&str] = &["cpu", "cpuacct", "memory", "pids"];
/// Controllers enabled for children on the v2 path down to the pod cgroup.
const V2_CONTROLLERS: &[&str] = &["cpu", "memory", "pids", "io"];
/// Passes over a cgroup's processes when moving them (a fork between two passes
/// adds one).
const MOVE_PASSES: usize = 8;
/// How long removal waits for exiting processes to leave.
const REMOVE_PATIENCE: Duration = Duration::from_secs(3);

/// A pod cgroup: its path relative to the hierarchy roots and one directory per
/// hierarchy (persisted in the VM's state so a restarted vesseld can remove it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodCgroup {
    /// Path below each hierarchy root, without a leading '/'.
    pub rel: String,
    /// The cgroup directory in each hierarchy.
    pub dirs: Vec<PathBuf>,
    /// True on a cgroup v2 (unified) host.
    pub unified: bool,
}

/// The cgroup hierarchies of this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchies {
    /// cgroup v2 mounted here.
    Unified(PathBuf),
    /// v1 controller hierarchies (mount points, without duplicates).
    V1(Vec<PathBuf>),
}

fn bad(m: impl Into<String>) -> Error {
    Error::InvalidConfig(m.into())
}

/// Expands a systemd slice name as runc does:
/// `kubepods-besteffort-pod1.slice` → `kubepods.slice/kubepods-besteffort.slice/
/// kubepods-besteffort-pod1.slice`; `-.slice` is the root (empty path).
pub fn expand_slice(slice: &str) -> Result<String> {
    let name = slice
        .strip_suffix(".slice")
        .ok_or_else(|| bad(format!("{slice:?} is not a systemd slice")))?;
    if name == "-" {
        return Ok(String::new());
    }
    if name.is_empty() || name.contains('/') {
        return Err(bad(format!("invalid slice name {slice:?}")));
    }
    let mut out = Vec::new();
    let mut prefix = String::new();
    for part in name.split('-') {
        if part.is_empty() {
            return Err(bad(format!("invalid slice name {slice:?}")));
        }
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        out.push(format!("{prefix}.slice"));
    }
    Ok(out.join("/"))
}

/// The pod cgroup's path relative to each hierarchy root, from the CRI
/// `cgroup_parent` (cgroupfs path or systemd slice; none → [`DEFAULT_PARENT`]).
pub fn pod_cgroup_path(parent: Option<&str>, id: &str) -> Result<String> {
    if id.is_empty()
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(bad(format!("pod id {id:?} cannot name a cgroup")));
    }
    let parent = parent.filter(|p| !p.is_empty()).unwrap_or(DEFAULT_PARENT);
    let parent = if parent.ends_with(".slice") && !parent.contains('/') {
        expand_slice(parent)?
    } else {
        let mut parts = Vec::new();
        for c in parent.split('/').filter(|c| !c.is_empty()) {
            if c == "." || c == ".." {
                return Err(bad(format!("cgroup parent {parent:?} is not a plain path")));
            }
            parts.push(c);
        }
        parts.join("/")
    };
    Ok(if parent.is_empty() {
        format!("vessel-{id}")
    } else {
        format!("{parent}/vessel-{id}")
    })
}

/// Finds the hierarchies in `/proc/self/mountinfo` text: the v1 controllers of
/// [`V1_CONTROLLERS`] when any is mounted (v1 and hybrid hosts), else cgroup v2.
pub fn parse_mountinfo(mountinfo: &str) -> Option<Hierarchies> {
    let mut v1: Vec<PathBuf> = Vec::new();
    let mut unified = None;
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount_point) = pre.split(' ').nth(4) else {
            continue;
        };
        let mut post = post.split(' ');
        let (fstype, _source, opts) = (post.next(), post.next(), post.next().unwrap_or(""));
        let mount_point = PathBuf::from(unescape(mount_point));
        match fstype {
            Some("cgroup")
                if opts.split(',').any(|o| V1_CONTROLLERS.contains(&o))
                    && !v1.contains(&mount_point) =>
            {
                v1.push(mount_point);
            }
            Some("cgroup2") if unified.is_none() => unified = Some(mount_point),
            _ => {}
        }
    }
    if !v1.is_empty() {
        Some(Hierarchies::V1(v1))
    } else {
        unified.map(Hierarchies::Unified)
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// This host's hierarchies.
pub fn host_hierarchies() -> Result<Hierarchies> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("/proc/self/mountinfo", e))?;
    parse_mountinfo(&text).ok_or_else(|| bad("no cgroup hierarchy is mounted"))
}

/// The pids in cgroup directory `dir` (none when it cannot be read).
fn read_pids(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Writes `score` to `pid`'s `oom_score_adj` through a descriptor of its /proc dir,
/// and only if that process is in the cgroup `rel` (when given): a pid read from
/// `cgroup.procs` may exit and be reused by another process before the write, and
/// the descriptor then reads another process's files not at all (ESRCH). A process
/// gone meanwhile is skipped. Blocking.
pub(crate) fn write_oom_score_adj(pid: i32, rel: Option<&str>, score: i32) -> Result<()> {
    use rustix::fs::{Mode, OFlags};
    let path = PathBuf::from(format!("/proc/{pid}"));
    let gone = |e: rustix::io::Errno| e == rustix::io::Errno::SRCH || e == rustix::io::Errno::NOENT;
    let dir = match rustix::fs::open(&path, OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()) {
        Ok(d) => d,
        Err(e) if gone(e) => return Ok(()),
        Err(e) => return Err(Error::io(&path, e.into())),
    };
    if let Some(rel) = rel {
        let member = rustix::fs::openat(
            &dir,
            "cgroup",
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()
        .and_then(|f| std::io::read_to_string(std::fs::File::from(f)).ok())
        .is_some_and(|text| {
            let want = format!("/{rel}");
            text.lines()
                .any(|l| l.splitn(3, ':').nth(2) == Some(want.as_str()))
        });
        if !member {
            return Ok(());
        }
    }
    let written = rustix::fs::openat(
        &dir,
        "oom_score_adj",
        OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .and_then(|f| rustix::io::write(&f, score.clamp(-1000, 1000).to_string().as_bytes()));
    match written {
        Ok(_) => Ok(()),
        Err(e) if gone(e) => Ok(()),
        Err(e) => Err(Error::io(path.join("oom_score_adj"), e.into())),
    }
}

impl PodCgroup {
    /// Where the pod cgroup of `id` under `parent` goes on this host (nothing is
    /// created yet).
    pub fn plan(parent: Option<&str>, id: &str) -> Result<Self> {
        let rel = pod_cgroup_path(parent, id)?;
        Ok(match host_hierarchies()? {
            Hierarchies::Unified(root) => Self {
                dirs: vec![root.join(&rel)],
                rel,
                unified: true,
            },
            Hierarchies::V1(roots) => Self {
                dirs: roots.iter().map(|r| r.join(&rel)).collect(),
                rel,
                unified: false,
            },
        })
    }

    /// Creates the cgroup (and missing parents) in every hierarchy. Blocking.
    pub fn create(&self) -> Result<()> {
        for dir in &self.dirs {
            if self.unified {
                self.enable_v2_controllers(dir);
            }
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        Ok(())
    }

    /// cgroup v2 gives a child only the controllers its parent enables: enable ours
    /// on every level from the root down to the pod cgroup's parent. Best effort (the
    /// kubelet's pod cgroups already have them; a missing one only loses accounting).
    fn enable_v2_controllers(&self, dir: &Path) {
        let depth = self.rel.split('/').count();
        let mut levels: Vec<&Path> = dir.ancestors().skip(1).take(depth).collect();
        levels.reverse();
        for level in levels {
            if !level.exists() {
                let _ = std::fs::create_dir(level);
            }
            for c in V2_CONTROLLERS {
                let _ = std::fs::write(level.join("cgroup.subtree_control"), format!("+{c}"));
            }
        }
    }

    /// Sets the cgroup's CPU weight (cgroup v2 `cpu.weight`, 1..=10000, 100 the
    /// kernel's default; v1 `cpu.shares` scaled to match). A pooled VM idles at a low
    /// weight so it never slows the node's running pods. Blocking.
    pub fn set_cpu_weight(&self, weight: u64) -> Result<()> {
        let weight = weight.clamp(1, 10_000);
        for dir in &self.dirs {
            let (file, value) = if self.unified {
                (dir.join("cpu.weight"), weight)
            } else {
                // v1 default 1024 ↔ v2 default 100; shares start at 2.
                (dir.join("cpu.shares"), (weight * 1024 / 100).max(2))
            };
            if !self.unified && !file.exists() {
                continue; // not the cpu hierarchy
            }
            std::fs::write(&file, value.to_string()).map_err(|e| Error::io(&file, e))?;
        }
        Ok(())
    }

    /// Moves every process of this cgroup into `to` (created first) and removes
    /// this one: how a pooled VM joins the cgroup of the pod that claims it. cgroup
    /// v2 moves a process with all its threads; a child forked meanwhile is born here
    /// and is caught by the next pass. Both must be planned on this host (same
    /// hierarchies, in the same order). Blocking.
    pub fn move_to(&self, to: &PodCgroup) -> Result<()> {
        if self.dirs.len() != to.dirs.len() {
            return Err(bad(format!(
                "cannot move cgroup {} to {}: different hierarchies",
                self.rel, to.rel
            )));
        }
        to.create()?;
        if !self.unified {
            // cgroup v1 can take the memory charged so far along (anonymous and page
            // cache); v2 cannot, and leaves it charged to the old cgroup's parent.
            for dir in &to.dirs {
                let file = dir.join("memory.move_charge_at_immigrate");
                if file.exists() {
                    let _ = std::fs::write(file, "3");
                }
            }
        }
        for (from, into) in self.dirs.iter().zip(&to.dirs) {
            let procs = into.join("cgroup.procs");
            for _ in 0..MOVE_PASSES {
                let pids = read_pids(from);
                if pids.is_empty() {
                    break;
                }
                for pid in pids {
                    match std::fs::write(&procs, pid.to_string()) {
                        Ok(()) => {}
                        // Exited in between.
                        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                        Err(e) => return Err(Error::io(&procs, e)),
                    }
                }
            }
        }
        self.remove()
    }

    /// Gives every process of the cgroup the OOM score adjustment `score`. Blocking.
    pub fn set_oom_score_adj(&self, score: i32) -> Result<()> {
        self.pids()
            .into_iter()
            .try_for_each(|pid| write_oom_score_adj(pid, Some(&self.rel), score))
    }

    /// `cgroup.procs` of each hierarchy, opened for a `pre_exec` to write "0" to.
    pub fn open_procs(&self) -> Result<Vec<OwnedFd>> {
        self.dirs
            .iter()
            .map(|d| {
                let p = d.join("cgroup.procs");
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .map(OwnedFd::from)
                    .map_err(|e| Error::io(&p, e))
            })
            .collect()
    }

    /// Pids in the cgroup (first hierarchy).
    pub fn pids(&self) -> Vec<i32> {
        self.dirs.first().map(|d| read_pids(d)).unwrap_or_default()
    }

    /// Memory charged to the cgroup (`memory.current` or `memory.usage_in_bytes`).
    pub fn memory_bytes(&self) -> Option<u64> {
        let file = if self.unified {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        };
        self.dirs
            .iter()
            .find_map(|d| std::fs::read_to_string(d.join(file)).ok())
            .and_then(|s| s.trim().parse().ok())
    }

    /// Removes the cgroup from every hierarchy. Waits briefly for exiting processes;
    /// what still lives in it then is the pod's and is SIGKILLed. Blocking; a cgroup
    /// already gone is not an error.
    pub fn remove(&self) -> Result<()> {
        let start = Instant::now();
        let mut killed = false;
        for dir in &self.dirs {
            loop {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        if start.elapsed() > REMOVE_PATIENCE / 2 && !killed {
                            // Only pod processes can be in here.
                            for pid in self.pids() {
                                if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                                    let _ = rustix::process::kill_process(
                                        pid,
                                        rustix::process::Signal::KILL,
                                    );
                                }
                            }
                            killed = true;
                        }
                        if start.elapsed() > REMOVE_PATIENCE {
                            return Err(Error::io(dir, e));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(Error::io(dir, e)),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_slices_expand_like_runc() {
        assert_eq!(
            expand_slice("kubepods-besteffort-pod12ab.slice").unwrap(),
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12ab.slice"
        );
        assert_eq!(expand_slice("kubepods.slice").unwrap(), "kubepods.slice");
        assert_eq!(expand_slice("-.slice").unwrap(), "");
        for bad in ["a--b.slice", "-a.slice", "a-.slice", "a", ".slice"] {
            assert!(expand_slice(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pod_paths_for_both_drivers() {
        assert_eq!(
            pod_cgroup_path(Some("/kubepods/besteffort/pod1234"), "abc").unwrap(),
            "kubepods/besteffort/pod1234/vessel-abc"
        );
        assert_eq!(
            pod_cgroup_path(Some("kubepods-burstable-pod1_2.slice"), "abc").unwrap(),
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1_2.slice/vessel-abc"
        );
        assert_eq!(pod_cgroup_path(None, "x").unwrap(), "vessel/vessel-x");
        assert_eq!(pod_cgroup_path(Some(""), "x").unwrap(), "vessel/vessel-x");
        assert_eq!(pod_cgroup_path(Some("/"), "x").unwrap(), "vessel-x");
        assert!(pod_cgroup_path(Some("/kubepods/../etc"), "x").is_err());
        assert!(pod_cgroup_path(None, "../x").is_err());
        assert!(pod_cgroup_path(None, "").is_err());
    }

    /// v2: controllers are enabled on every level above the pod cgroup (a plain
    /// directory tree stands in for cgroupfs here).
    #[test]
    fn v2_create_enables_controllers_above_and_remove_takes_the_leaf() {
        let tmp = tempfile::tempdir().unwrap();
        let rel = pod_cgroup_path(Some("/kubepods/pod1"), "x").unwrap();
        let cg = PodCgroup {
            dirs: vec![tmp.path().join(&rel)],
            rel,
            unified: true,
        };
        cg.create().unwrap();
        assert!(cg.dirs[0].is_dir());
        for level in ["", "kubepods", "kubepods/pod1"] {
            let f = tmp.path().join(level).join("cgroup.subtree_control");
            assert!(f.exists(), "{}", f.display());
        }
        assert!(!cg.dirs[0].join("cgroup.subtree_control").exists());
        std::fs::write(cg.dirs[0].join("cgroup.procs"), b"").unwrap();
        assert_eq!(cg.open_procs().unwrap().len(), 1);
        std::fs::remove_file(cg.dirs[0].join("cgroup.procs")).unwrap();
        cg.remove().unwrap();
        assert!(!cg.dirs[0].exists());
        assert!(tmp.path().join("kubepods/pod1").is_dir(), "parents stay");
        cg.remove().unwrap();
    }

    #[test]
    fn finds_v1_v2_and_hybrid_hierarchies() {
        let hybrid = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            parse_mountinfo(hybrid),
            Some(Hierarchies::V1(vec![
                "/sys/fs/cgroup/cpu,cpuacct".into(),
                "/sys/fs/cgroup/memory".into(),
                "/sys/fs/cgroup/pids".into(),
            ]))
        );
        let v2 = "\
25 22 0:5 / /proc rw - proc proc rw
30 24 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
";
        assert_eq!(
            parse_mountinfo(v2),
            Some(Hierarchies::Unified("/sys/fs/cgroup".into()))
        );
        assert_eq!(
            parse_mountinfo("25 22 0:5 / /proc rw - proc proc rw\n"),
            None
        );
        assert_eq!(unescape("/a\\040b"), "/a b");
    }
}
