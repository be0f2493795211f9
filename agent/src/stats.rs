//! Guest-wide stats from /proc, and disk usage of a container's writable layer.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// USER_HZ: /proc/stat counts in 1/100 s on every Linux ABI.
const USER_HZ: u64 = 100;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Guest {
    pub memory_total: u64,
    pub memory_available: u64,
    pub cpu_usage_usec: u64,
    pub uptime_ms: u64,
}

fn meminfo_kb(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Busy CPU time from the aggregate `cpu` line: everything but idle and iowait.
fn cpu_busy_usec(stat: &str) -> u64 {
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let busy: u64 = v
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .map(|(_, x)| x)
        .sum();
    busy * (1_000_000 / USER_HZ)
}

pub fn parse_guest(meminfo: &str, stat: &str, uptime: &str) -> Guest {
    let up: f64 = uptime
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    Guest {
        memory_total: meminfo_kb(meminfo, "MemTotal") * 1024,
        memory_available: meminfo_kb(meminfo, "MemAvailable") * 1024,
        cpu_usage_usec: cpu_busy_usec(stat),
        uptime_ms: (up * 1000.0) as u64,
    }
}

pub fn guest() -> Guest {
    let r = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    parse_guest(&r("/proc/meminfo"), &r("/proc/stat"), &r("/proc/uptime"))
}

/// (bytes, inodes) used under `root`, staying on its filesystem.
pub fn disk_usage(root: &Path) -> (u64, u64) {
    let Ok(meta) = std::fs::symlink_metadata(root) else {
        return (0, 0);
    };
    let dev = meta.dev();
    let (mut bytes, mut inodes) = (0u64, 0u64);
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.dev() != dev {
                continue;
            }
            inodes += 1;
            bytes += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    (bytes, inodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_from_proc_text() {
        let g = parse_guest(
            "MemTotal:        1000 kB\nMemFree:  10 kB\nMemAvailable:     500 kB\n",
            "cpu  10 1 5 1000 7 2 3 4 0 0\ncpu0 10 1 5 1000 7 2 3 4 0 0\n",
            "12.34 10.00\n",
        );
        assert_eq!(g.memory_total, 1_024_000);
        assert_eq!(g.memory_available, 512_000);
        // user+nice+system+irq+softirq+steal = 10+1+5+2+3+4 = 25 ticks
        assert_eq!(g.cpu_usage_usec, 250_000);
        assert_eq!(g.uptime_ms, 12_340);
    }

    #[test]
    fn usage_of_a_tree() {
        let d = std::env::temp_dir().join(format!("vessel-du-{}", std::process::id()));
        std::fs::create_dir_all(d.join("sub")).unwrap();
        std::fs::write(d.join("sub/f"), vec![1u8; 10_000]).unwrap();
        let (bytes, inodes) = disk_usage(&d);
        std::fs::remove_dir_all(&d).unwrap();
        assert_eq!(inodes, 2);
        assert!(bytes >= 8192, "{bytes}");
    }
}
