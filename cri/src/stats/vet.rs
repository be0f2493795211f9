//! The guest's PodStats reply, bounded and matched against what vesseld knows.
//! Every number and name in it is the guest's to choose: container ids are kept
//! only when they name a container of this pod, interface names only when they are
//! short printable names, and numbers are capped.

use std::collections::{HashMap, HashSet};

use vessel_proto::agent as pb;

/// Interfaces kept per pod.
pub const MAX_INTERFACES: usize = 16;
/// Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;
/// Above Linux's pid_max limit.
const MAX_PIDS: u64 = 1 << 22;
/// Cap for counters that have no natural bound (bytes written, packets, faults).
const MAX_COUNTER: u64 = 1 << 62;

/// What is kept of one reply.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GuestSample {
    pub containers: HashMap<String, pb::ContainerStatsResponse>,
    pub interfaces: Vec<pb::InterfaceStats>,
    pub memory_total: u64,
    pub memory_available: u64,
}

fn ifname_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
}

fn container(s: pb::ContainerStatsResponse, memory_cap: u64) -> pb::ContainerStatsResponse {
    let mem = |v: u64| v.min(memory_cap);
    let n = |v: u64| v.min(MAX_COUNTER);
    pb::ContainerStatsResponse {
        timestamp_unix_ns: s.timestamp_unix_ns,
        cpu_usage_usec: n(s.cpu_usage_usec),
        memory_usage_bytes: mem(s.memory_usage_bytes),
        memory_working_set_bytes: mem(s.memory_working_set_bytes),
        memory_rss_bytes: mem(s.memory_rss_bytes),
        memory_limit_bytes: mem(s.memory_limit_bytes),
        pids_current: s.pids_current.min(MAX_PIDS),
        oom_events: n(s.oom_events),
        rootfs_used_bytes: n(s.rootfs_used_bytes),
        rootfs_inodes_used: n(s.rootfs_inodes_used),
        memory_page_faults: n(s.memory_page_faults),
        memory_major_page_faults: n(s.memory_major_page_faults),
    }
}

/// Keeps what can be trusted to mean something: `known` are the pod's container
/// ids, `memory_cap` the VM's memory size (no guest figure can exceed it).
pub fn vet(reply: pb::PodStatsResponse, known: &HashSet<String>, memory_cap: u64) -> GuestSample {
    let mut containers = HashMap::new();
    for entry in reply.containers {
        if containers.len() >= known.len() {
            break;
        }
        if let (true, Some(stats)) = (known.contains(&entry.container_id), entry.stats) {
            containers.insert(entry.container_id, container(stats, memory_cap));
        }
    }
    let mut interfaces: Vec<pb::InterfaceStats> = Vec::new();
    for i in reply.interfaces {
        if interfaces.len() >= MAX_INTERFACES {
            break;
        }
        if ifname_ok(&i.name) && !interfaces.iter().any(|k| k.name == i.name) {
            interfaces.push(pb::InterfaceStats {
                name: i.name,
                rx_bytes: i.rx_bytes.min(MAX_COUNTER),
                rx_errors: i.rx_errors.min(MAX_COUNTER),
                tx_bytes: i.tx_bytes.min(MAX_COUNTER),
                tx_errors: i.tx_errors.min(MAX_COUNTER),
            });
        }
    }
    let guest = reply.guest.unwrap_or_default();
    GuestSample {
        containers,
        interfaces,
        memory_total: guest.memory_total_bytes.min(memory_cap),
        memory_available: guest.memory_available_bytes.min(memory_cap),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, mem: u64) -> pb::ContainerStatsEntry {
        pb::ContainerStatsEntry {
            container_id: id.into(),
            stats: Some(pb::ContainerStatsResponse {
                memory_usage_bytes: mem,
                pids_current: u64::MAX,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn unknown_ids_bad_names_and_huge_numbers_are_dropped_or_capped() {
        let known: HashSet<String> = ["a".to_owned()].into();
        let mut interfaces: Vec<_> = (0..100)
            .map(|i| pb::InterfaceStats {
                name: format!("eth{i}"),
                rx_bytes: u64::MAX,
                ..Default::default()
            })
            .collect();
        for bad in ["", "../../etc", "a-very-long-interface-name", "eth0"] {
            interfaces.insert(
                0,
                pb::InterfaceStats {
                    name: bad.into(),
                    ..Default::default()
                },
            );
        }
        let reply = pb::PodStatsResponse {
            containers: vec![entry("a", u64::MAX), entry("b", 1), entry("a", 5)],
            interfaces,
            guest: Some(pb::GuestStatsResponse {
                memory_total_bytes: u64::MAX,
                ..Default::default()
            }),
            ..Default::default()
        };
        let s = vet(reply, &known, 1 << 30);
        assert_eq!(s.containers.len(), 1);
        assert_eq!(s.containers["a"].memory_usage_bytes, 1 << 30);
        assert_eq!(s.containers["a"].pids_current, MAX_PIDS);
        assert_eq!(s.interfaces.len(), MAX_INTERFACES);
        assert_eq!(s.interfaces[0].name, "eth0");
        assert_eq!(s.interfaces[0].rx_bytes, 0, "the first eth0 wins");
        assert_eq!(s.interfaces[1].rx_bytes, MAX_COUNTER);
        assert_eq!(s.memory_total, 1 << 30);
    }
}
