//! Reading and writing a container's cgroup v2 files.

use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxResources;

use crate::boot::CGROUP_ROOT;

pub fn path(container_id: &str) -> PathBuf {
    PathBuf::from(CGROUP_ROOT).join(crate::spec::cgroup_path(container_id).trim_start_matches('/'))
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file)).unwrap_or_default()
}

/// A `key value` line's value from a flat-keyed file (memory.stat, cpu.stat, ...).
pub fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// A single-value file: a number, or 0 for "max"/missing.
pub fn single(text: &str) -> u64 {
    text.trim().parse().unwrap_or(0)
}

pub fn oom_kills(dir: &Path) -> u64 {
    keyed(&read(dir, "memory.events"), "oom_kill").unwrap_or(0)
}

pub fn procs(dir: &Path) -> Vec<i32> {
    read(dir, "cgroup.procs")
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// SIGKILLs every process in the cgroup (cgroup.kill, kernel ≥ 5.14).
pub fn kill_all(dir: &Path) {
    if std::fs::write(dir.join("cgroup.kill"), "1").is_err() {
        for pid in procs(dir) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub cpu_usage_usec: u64,
    pub memory_current: u64,
    pub memory_working_set: u64,
    pub memory_anon: u64,
    pub memory_max: u64,
    pub pids_current: u64,
    pub oom_kills: u64,
    pub page_faults: u64,
    pub major_page_faults: u64,
}

pub fn stats(dir: &Path) -> Stats {
    let mem_stat = read(dir, "memory.stat");
    let current = single(&read(dir, "memory.current"));
    let inactive_file = keyed(&mem_stat, "inactive_file").unwrap_or(0);
    Stats {
        cpu_usage_usec: keyed(&read(dir, "cpu.stat"), "usage_usec").unwrap_or(0),
        memory_current: current,
        memory_working_set: current.saturating_sub(inactive_file),
        memory_anon: keyed(&mem_stat, "anon").unwrap_or(0),
        memory_max: single(&read(dir, "memory.max")),
        pids_current: single(&read(dir, "pids.current")),
        oom_kills: oom_kills(dir),
        page_faults: keyed(&mem_stat, "pgfault").unwrap_or(0),
        major_page_faults: keyed(&mem_stat, "pgmajfault").unwrap_or(0),
    }
}

/// OCI cpu shares (2..262144) to cgroup v2 cpu.weight (1..10000), as runc/crun do.
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    1 + ((shares.clamp(2, 262_144) - 2) * 9999) / 262_142
}

/// The cgroup v2 file writes that apply `r`, in order.
pub fn resource_writes(r: &LinuxResources) -> Vec<(String, String)> {
    let mut w = Vec::new();
    if let Some(cpu) = r.cpu() {
        if let Some(shares) = cpu.shares() {
            if shares > 0 {
                w.push(("cpu.weight".into(), shares_to_weight(shares).to_string()));
            }
        }
        if cpu.quota().is_some() || cpu.period().is_some() {
            let period = cpu.period().filter(|p| *p > 0).unwrap_or(100_000);
            let quota = match cpu.quota() {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".into(),
            };
            w.push(("cpu.max".into(), format!("{quota} {period}")));
        }
        if let Some(cpus) = cpu.cpus().as_ref().filter(|s| !s.is_empty()) {
            w.push(("cpuset.cpus".into(), cpus.clone()));
        }
        if let Some(mems) = cpu.mems().as_ref().filter(|s| !s.is_empty()) {
            w.push(("cpuset.mems".into(), mems.clone()));
        }
    }
    if let Some(mem) = r.memory() {
        if let Some(limit) = mem.limit() {
            let v = if limit > 0 {
                limit.to_string()
            } else {
                "max".into()
            };
            w.push(("memory.max".into(), v));
            if let Some(swap) = mem.swap() {
                // OCI swap is memory+swap; v2 swap.max is swap alone.
                let s = if swap > 0 && limit > 0 {
                    swap.saturating_sub(limit).to_string()
                } else {
                    "max".into()
                };
                w.push(("memory.swap.max".into(), s));
            }
        }
        if let Some(res) = mem.reservation().filter(|r| *r > 0) {
            w.push(("memory.low".into(), res.to_string()));
        }
    }
    if let Some(p) = r.pids() {
        let v = if p.limit() > 0 {
            p.limit().to_string()
        } else {
            "max".into()
        };
        w.push(("pids.max".into(), v));
    }
    for h in r.hugepage_limits().iter().flatten() {
        w.push((
            format!("hugetlb.{}.max", h.page_size()),
            h.limit().to_string(),
        ));
    }
    for (k, v) in r.unified().iter().flatten() {
        if !k.contains('/') && !k.starts_with('.') {
            w.push((k.clone(), v.clone()));
        }
    }
    w
}

/// Applies `r` to the cgroup at `dir`.
pub fn apply(dir: &Path, r: &LinuxResources) -> std::io::Result<()> {
    for (file, value) in resource_writes(r) {
        // The pod VM's kernel has no swap, so no `memory.swap.max`: nothing to limit.
        if file == "memory.swap.max" && !dir.join(&file).exists() {
            continue;
        }
        std::fs::write(dir.join(&file), &value)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{file} = {value}: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keyed_files() {
        let t = "anon 4096\nfile 100\ninactive_file 50\n";
        assert_eq!(keyed(t, "anon"), Some(4096));
        assert_eq!(keyed(t, "inactive_file"), Some(50));
        assert_eq!(keyed(t, "nope"), None);
        assert_eq!(single("max\n"), 0);
        assert_eq!(single("123\n"), 123);
    }

    #[test]
    fn stats_from_files() {
        let d = std::env::temp_dir().join(format!("vessel-cg-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("memory.current"), "1000\n").unwrap();
        std::fs::write(
            d.join("memory.stat"),
            "anon 300\ninactive_file 200\npgfault 9\npgmajfault 1\n",
        )
        .unwrap();
        std::fs::write(d.join("memory.max"), "max\n").unwrap();
        std::fs::write(d.join("cpu.stat"), "usage_usec 77\nuser_usec 50\n").unwrap();
        std::fs::write(d.join("pids.current"), "3\n").unwrap();
        std::fs::write(d.join("memory.events"), "low 0\noom 1\noom_kill 2\n").unwrap();
        let s = stats(&d);
        std::fs::remove_dir_all(&d).unwrap();
        assert_eq!(
            s,
            Stats {
                cpu_usage_usec: 77,
                memory_current: 1000,
                memory_working_set: 800,
                memory_anon: 300,
                memory_max: 0,
                pids_current: 3,
                oom_kills: 2,
                page_faults: 9,
                major_page_faults: 1,
            }
        );
    }

    #[test]
    fn resources_to_files() {
        let r: LinuxResources = serde_json::from_str(
            r#"{"cpu":{"shares":1024,"quota":50000,"period":100000,"cpus":"0"},
                "memory":{"limit":104857600,"swap":104857600},
                "pids":{"limit":100},
                "unified":{"memory.high":"90000000"}}"#,
        )
        .unwrap();
        let w = resource_writes(&r);
        let get = |k: &str| w.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_str());
        assert_eq!(get("cpu.weight"), Some("39"));
        assert_eq!(get("cpu.max"), Some("50000 100000"));
        assert_eq!(get("cpuset.cpus"), Some("0"));
        assert_eq!(get("memory.max"), Some("104857600"));
        assert_eq!(get("memory.swap.max"), Some("0"));
        assert_eq!(get("pids.max"), Some("100"));
        assert_eq!(get("memory.high"), Some("90000000"));
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262_144), 10_000);
    }

    #[test]
    fn swap_limit_is_skipped_without_swap_accounting() {
        let r: LinuxResources =
            serde_json::from_str(r#"{"memory":{"limit":104857600,"swap":104857600}}"#).unwrap();
        let dir = tempfile::tempdir().unwrap();
        apply(dir.path(), &r).unwrap();
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).ok();
        assert_eq!(read("memory.max").as_deref(), Some("104857600"));
        assert_eq!(read("memory.swap.max"), None);
        // Where the kernel has the file, the limit is written.
        std::fs::write(dir.path().join("memory.swap.max"), "max").unwrap();
        apply(dir.path(), &r).unwrap();
        assert_eq!(read("memory.swap.max").as_deref(), Some("0"));
    }
}
