//! Samples → CRI stats messages.
//!
//! Containers: the guest's cgroup v2 numbers. Pods: CPU and memory are the VM's
//! host-side totals (QEMU, whose vCPU threads run the guest, plus its helpers):
//! what the node really pays for the pod, which is more than the sum of its
//! containers. Network and process counts come from the guest.

use k8s_cri::v1 as cri;

use super::PodSample;
use crate::store::{ContainerRecord, PodRecord};
use crate::views;

fn v(value: u64) -> Option<cri::UInt64Value> {
    Some(cri::UInt64Value { value })
}

fn opt(value: Option<u64>) -> Option<cri::UInt64Value> {
    value.map(|value| cri::UInt64Value { value })
}

pub fn container_attributes(c: &ContainerRecord) -> cri::ContainerAttributes {
    cri::ContainerAttributes {
        id: c.id.clone(),
        metadata: Some(views::container_meta(c)),
        labels: c.labels.clone().into_iter().collect(),
        annotations: c.annotations.clone().into_iter().collect(),
    }
}

/// A container's stats; without a sample of it (pod not running, container not in
/// the guest) only the attributes. `writable_fs` is the host mount point its
/// writable layer is accounted to.
pub fn container_stats(
    c: &ContainerRecord,
    sample: Option<&PodSample>,
    writable_fs: &str,
) -> cri::ContainerStats {
    let mut out = cri::ContainerStats {
        attributes: Some(container_attributes(c)),
        ..Default::default()
    };
    let Some((sample, s)) = sample.and_then(|p| Some((p, p.container(&c.id)?))) else {
        return out;
    };
    let timestamp = sample.taken_ns;
    out.cpu = Some(cri::CpuUsage {
        timestamp,
        usage_core_nano_seconds: v(s.cpu_usage_usec.saturating_mul(1000)),
        usage_nano_cores: opt(sample.container_nano_cores.get(&c.id).copied()),
    });
    let guest_available = sample.guest.as_ref().map(|g| g.memory_available);
    let available = if s.memory_limit_bytes > 0 {
        Some(
            s.memory_limit_bytes
                .saturating_sub(s.memory_working_set_bytes),
        )
    } else {
        guest_available
    };
    out.memory = Some(cri::MemoryUsage {
        timestamp,
        working_set_bytes: v(s.memory_working_set_bytes),
        available_bytes: opt(available),
        usage_bytes: v(s.memory_usage_bytes),
        rss_bytes: v(s.memory_rss_bytes),
        page_faults: v(s.memory_page_faults),
        major_page_faults: v(s.memory_major_page_faults),
    });
    out.writable_layer = Some(cri::FilesystemUsage {
        timestamp,
        fs_id: Some(cri::FilesystemIdentifier {
            mountpoint: writable_fs.to_owned(),
        }),
        used_bytes: v(s.rootfs_used_bytes),
        inodes_used: v(s.rootfs_inodes_used),
    });
    out
}

pub fn network(sample: &PodSample) -> Option<cri::NetworkUsage> {
    let g = sample.guest.as_ref()?;
    let usage = |i: &vessel_proto::agent::InterfaceStats| cri::NetworkInterfaceUsage {
        name: i.name.clone(),
        rx_bytes: v(i.rx_bytes),
        rx_errors: v(i.rx_errors),
        tx_bytes: v(i.tx_bytes),
        tx_errors: v(i.tx_errors),
    };
    let default = g
        .interfaces
        .iter()
        .find(|i| i.name == "eth0")
        .or(g.interfaces.first())
        .map(usage);
    Some(cri::NetworkUsage {
        timestamp: sample.taken_ns,
        default_interface: default,
        interfaces: g.interfaces.iter().map(usage).collect(),
    })
}

/// A pod's stats with its containers'.
pub fn pod_stats(
    p: &PodRecord,
    containers: &[ContainerRecord],
    sample: Option<&PodSample>,
    writable_fs: &str,
) -> cri::PodSandboxStats {
    let attributes = Some(cri::PodSandboxAttributes {
        id: p.id.clone(),
        metadata: Some(views::pod_meta(p)),
        labels: p.labels.clone().into_iter().collect(),
        annotations: p.annotations.clone().into_iter().collect(),
    });
    let Some(sample) = sample else {
        return cri::PodSandboxStats {
            attributes,
            linux: Some(cri::LinuxPodSandboxStats {
                containers: containers
                    .iter()
                    .map(|c| container_stats(c, None, writable_fs))
                    .collect(),
                ..Default::default()
            }),
            windows: None,
        };
    };
    let timestamp = sample.taken_ns;
    let processes: u64 = sample
        .guest
        .as_ref()
        .map(|g| g.containers.values().map(|c| c.pids_current).sum())
        .unwrap_or(0);
    let linux = cri::LinuxPodSandboxStats {
        cpu: Some(cri::CpuUsage {
            timestamp,
            usage_core_nano_seconds: v(sample.host.cpu_ns),
            usage_nano_cores: opt(sample.host_nano_cores),
        }),
        memory: Some(cri::MemoryUsage {
            timestamp,
            working_set_bytes: v(sample.host.memory_bytes),
            usage_bytes: v(sample.host.memory_bytes),
            available_bytes: opt(sample.guest.as_ref().map(|g| g.memory_available)),
            ..Default::default()
        }),
        network: network(sample),
        process: Some(cri::ProcessUsage {
            timestamp,
            process_count: v(processes),
        }),
        containers: containers
            .iter()
            .map(|c| container_stats(c, Some(sample), writable_fs))
            .collect(),
    };
    cri::PodSandboxStats {
        attributes,
        linux: Some(linux),
        windows: None,
    }
}
