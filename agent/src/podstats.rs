//! PodStats: the guest, every container and every interface in one reply, so the
//! host pays one vsock round trip per pod however many containers it has.

use std::sync::Arc;

use vessel_proto::agent as pb;

use crate::containers::Container;

/// At most this many interfaces are reported (the host bounds it again).
const MAX_INTERFACES: usize = 64;

/// One container's cgroup and writable-layer numbers.
pub fn container(c: &Container) -> pb::ContainerStatsResponse {
    let s = crate::cgroup::stats(&c.cgroup);
    // Only a guest-side writable layer is measured here; a plain-dir rootfs lives
    // on the host (virtiofs share).
    let (bytes, inodes) = c
        .rootfs_upper
        .as_deref()
        .map(crate::stats::disk_usage)
        .unwrap_or((0, 0));
    pb::ContainerStatsResponse {
        timestamp_unix_ns: crate::clock::unix_ns() as u64,
        cpu_usage_usec: s.cpu_usage_usec,
        memory_usage_bytes: s.memory_current,
        memory_working_set_bytes: s.memory_working_set,
        memory_rss_bytes: s.memory_anon,
        memory_limit_bytes: s.memory_max,
        pids_current: s.pids_current,
        oom_events: s.oom_kills,
        rootfs_used_bytes: bytes,
        rootfs_inodes_used: inodes,
        memory_page_faults: s.page_faults,
        memory_major_page_faults: s.major_page_faults,
    }
}

/// Interface counters from `/proc/net/dev` text, loopback left out.
pub fn parse_net_dev(text: &str) -> Vec<pb::InterfaceStats> {
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let (name, rest) = line.split_once(':')?;
            let name = name.trim();
            if name == "lo" || name.is_empty() {
                return None;
            }
            let v: Vec<u64> = rest
                .split_whitespace()
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes packets errs ...
            if v.len() < 11 {
                return None;
            }
            Some(pb::InterfaceStats {
                name: name.to_owned(),
                rx_bytes: v[0],
                rx_errors: v[2],
                tx_bytes: v[8],
                tx_errors: v[10],
            })
        })
        .take(MAX_INTERFACES)
        .collect()
}

/// Samples everything. Blocking (cgroup files, a walk of each writable layer).
pub fn sample(containers: &[Arc<Container>]) -> pb::PodStatsResponse {
    let g = crate::stats::guest();
    let net = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
    pb::PodStatsResponse {
        timestamp_unix_ns: crate::clock::unix_ns() as u64,
        guest: Some(pb::GuestStatsResponse {
            timestamp_unix_ns: crate::clock::unix_ns() as u64,
            memory_total_bytes: g.memory_total,
            memory_available_bytes: g.memory_available,
            cpu_usage_usec: g.cpu_usage_usec,
            uptime_ms: g.uptime_ms,
        }),
        containers: containers
            .iter()
            .map(|c| pb::ContainerStatsEntry {
                container_id: c.id.clone(),
                stats: Some(container(c)),
            })
            .collect(),
        interfaces: parse_net_dev(&net)
            .into_iter()
            .filter(|i| is_up(&i.name))
            .collect(),
    }
}

/// Whether an interface is up. Down ones carry no pod traffic; the guest kernel's
/// built-in fallback devices (`dummy0`, `sit0`) stay down and are left out.
fn is_up(name: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{name}/flags")).is_ok_and(|f| flags_up(&f))
}

/// IFF_UP in a sysfs `flags` value (`0x1003`).
fn flags_up(flags: &str) -> bool {
    let hex = flags.trim().trim_start_matches("0x");
    u32::from_str_radix(hex, 16).is_ok_and(|f| f & 0x1 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_flag() {
        assert!(flags_up("0x1003\n"));
        assert!(!flags_up("0x1002\n"));
        assert!(!flags_up("garbage"));
    }

    #[test]
    fn net_dev_without_loopback() {
        let text = "\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    1000      10    0    0    0     0          0         0     1000      10    0    0    0     0       0          0
  eth0:  123456     100    2    0    0     0          0         0    65432      50    1    0    0     0       0          0
";
        let v = parse_net_dev(text);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].name, "eth0");
        assert_eq!(v[0].rx_bytes, 123_456);
        assert_eq!(v[0].rx_errors, 2);
        assert_eq!(v[0].tx_bytes, 65_432);
        assert_eq!(v[0].tx_errors, 1);
    }
}
