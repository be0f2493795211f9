//! The host-side cost of a pod VM: QEMU and its helpers (virtiofsd, the vsock
//! backend). Read from the pod's cgroup v2 when it has one (it holds every helper
//! and their children), else summed over the VM's known pids from /proc. These are
//! host kernel files under vesseld's own paths, not guest data.

use std::path::Path;

/// Cumulative CPU and current memory of the VM's host processes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostUsage {
    pub cpu_ns: u64,
    pub memory_bytes: u64,
}

/// `usage_usec` of a cgroup v2 `cpu.stat`.
fn cpu_stat_usec(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
}

/// From a cgroup v2 directory.
pub fn from_cgroup(dir: &Path) -> Option<HostUsage> {
    let cpu = cpu_stat_usec(&std::fs::read_to_string(dir.join("cpu.stat")).ok()?)?;
    let mem = std::fs::read_to_string(dir.join("memory.current"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    Some(HostUsage {
        cpu_ns: cpu.saturating_mul(1000),
        memory_bytes: mem,
    })
}

/// utime + stime (clock ticks) from `/proc/<pid>/stat` text; the command name may
/// hold spaces and parentheses, so fields are counted after its last ')'.
pub fn proc_stat_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state(3) ... utime is field 14, stime 15 (1-based over the whole line).
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS from `/proc/<pid>/status` text, in bytes.
pub fn proc_status_rss(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Summed over `pids` from /proc.
pub fn from_pids(pids: &[i32]) -> HostUsage {
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .ok()
        .filter(|h| *h > 0)
        .unwrap_or(100);
    let mut u = HostUsage::default();
    for pid in pids {
        let dir = Path::new("/proc").join(pid.to_string());
        if let Some(t) = std::fs::read_to_string(dir.join("stat"))
            .ok()
            .and_then(|s| proc_stat_ticks(&s))
        {
            u.cpu_ns = u
                .cpu_ns
                .saturating_add(t.saturating_mul(1_000_000_000 / hz));
        }
        if let Some(r) = std::fs::read_to_string(dir.join("status"))
            .ok()
            .and_then(|s| proc_status_rss(&s))
        {
            u.memory_bytes = u.memory_bytes.saturating_add(r);
        }
    }
    u
}

/// The VM's usage: its cgroup v2 when there is one, else its pids. Blocking.
pub fn usage(cgroup_v2: Option<&Path>, pids: &[i32]) -> HostUsage {
    cgroup_v2
        .and_then(from_cgroup)
        .unwrap_or_else(|| from_pids(pids))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat =
            "1234 (qemu (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 70 30 0 0 20 0 5 0 1000 0 0";
        assert_eq!(proc_stat_ticks(stat), Some(100));
        assert_eq!(
            proc_status_rss("Name:\tq\nVmRSS:\t  2048 kB\n"),
            Some(2_097_152)
        );
        assert_eq!(cpu_stat_usec("usage_usec 15\nuser_usec 10\n"), Some(15));
    }

    #[test]
    fn own_process_has_usage() {
        let u = from_pids(&[std::process::id() as i32]);
        assert!(u.memory_bytes > 0);
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("cpu.stat"), "usage_usec 7\n").unwrap();
        std::fs::write(tmp.path().join("memory.current"), "4096\n").unwrap();
        assert_eq!(
            usage(Some(tmp.path()), &[]),
            HostUsage {
                cpu_ns: 7000,
                memory_bytes: 4096
            }
        );
    }
}
