//! Leaves nothing behind: whatever a run started (vesseld, pod VMs and their helpers,
//! containerd, mounts, network namespaces) is found again from the directories and
//! namespaces registered here and removed, also after an interrupt or a panic cut the
//! orderly teardown short.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[derive(Debug, Default)]
pub struct Janitor {
    dirs: Mutex<Vec<PathBuf>>,
    netns: Mutex<Vec<String>>,
    cgroups: Mutex<Vec<String>>,
}

impl Janitor {
    /// A directory whose processes, mounts and files all belong to the run.
    pub fn own_dir(&self, dir: &Path) {
        self.dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(dir.to_owned());
    }

    /// A network namespace (`ip netns` name) the run created.
    pub fn own_netns(&self, name: &str) {
        self.netns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(name.to_owned());
    }

    /// A cgroup parent (e.g. `/vbench-peer-…`) whose processes are the run's: the
    /// containerd peer's runc containers, which name no owned dir.
    pub fn own_cgroup(&self, parent: &str) {
        self.cgroups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(parent.to_owned());
    }

    /// Kills every process that names an owned dir on its command line, detaches
    /// the mounts under them, removes them, and deletes the owned namespaces.
    pub fn sweep(&self) {
        let dirs = std::mem::take(&mut *self.dirs.lock().unwrap_or_else(|p| p.into_inner()));
        for dir in &dirs {
            kill_processes_naming(dir);
        }
        let cgroups = std::mem::take(&mut *self.cgroups.lock().unwrap_or_else(|p| p.into_inner()));
        for parent in &cgroups {
            remove_cgroup(parent);
        }
        for dir in &dirs {
            unmount_under(dir);
            let _ = std::fs::remove_dir_all(dir);
        }
        let names = std::mem::take(&mut *self.netns.lock().unwrap_or_else(|p| p.into_inner()));
        for name in names {
            if Path::new("/run/netns").join(&name).exists() {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
            }
        }
    }
}

/// Pids (not this process) whose command line contains `needle`.
pub fn pids_naming(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

fn kill_processes_naming(dir: &Path) {
    let needle = dir.display().to_string();
    let pids = pids_naming(&needle);
    for &pid in &pids {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    // Our own children would stay zombies (and keep /proc entries): reap them.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline
        && pids
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}/cmdline")).exists() && !is_zombie(*p))
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    for &pid in &pids {
        let _ = nix::sys::wait::waitpid(
            Pid::from_raw(pid),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        );
    }
}

/// The directories of cgroup `parent` in every mounted hierarchy (v1 controllers
/// and the v2 tree), and those under them, deepest first.
fn cgroup_dirs(parent: &str) -> Vec<PathBuf> {
    let rel = parent.trim_start_matches('/');
    if rel.is_empty() || rel.contains("..") {
        return Vec::new();
    }
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut dirs = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let fstype = fields
            .iter()
            .position(|f| *f == "-")
            .and_then(|i| fields.get(i + 1));
        if !matches!(fstype, Some(&"cgroup") | Some(&"cgroup2")) {
            continue;
        }
        let Some(point) = fields.get(4) else { continue };
        collect_dirs(&Path::new(point).join(rel), &mut dirs);
    }
    dirs.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    dirs
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    if !dir.is_dir() {
        return;
    }
    out.push(dir.to_owned());
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            collect_dirs(&e.path(), out);
        }
    }
}

/// Pids in cgroup `parent` or below it, in any hierarchy.
pub fn cgroup_pids(parent: &str) -> Vec<i32> {
    let mut pids: Vec<i32> = cgroup_dirs(parent)
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// SIGKILLs what runs in cgroup `parent` and removes its directories.
pub fn remove_cgroup(parent: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = cgroup_pids(parent);
        if pids.is_empty() || Instant::now() > deadline {
            break;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for dir in cgroup_dirs(parent) {
        let _ = std::fs::remove_dir(&dir);
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Mount points at or under `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points
}

/// Detaches every mount at or under `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    for point in mounts_under(dir) {
        let _ = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH);
    }
}
