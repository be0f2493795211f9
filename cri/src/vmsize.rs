//! The pod VM's size. The runtime handler gives the base (what the guest itself and
//! small pods need); when the kubelet passes the pod's resources (the sum of its
//! containers' limits, `LinuxPodSandboxConfig.resources`), the VM grows by them, as
//! Kata's static sandbox sizing does: the containers' limits are then enforced inside
//! a guest that can actually hold them.

use k8s_cri::v1 as cri;

const MIB: i64 = 1024 * 1024;

/// vCPUs and memory of a pod VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// The handler's size plus the pod's CPU limit (rounded up to whole vCPUs, at most
/// `host_cpus` in all) and memory limit (rounded up to MiB).
pub fn vm_size(
    base_vcpus: u32,
    base_memory_mib: u64,
    config: &cri::PodSandboxConfig,
    host_cpus: u32,
) -> VmSize {
    let resources = config.linux.as_ref().and_then(|l| l.resources.as_ref());
    let (mut vcpus, mut memory_mib) = (base_vcpus, base_memory_mib);
    if let Some(r) = resources {
        if r.cpu_quota > 0 && r.cpu_period > 0 {
            let cpus = (r.cpu_quota + r.cpu_period - 1) / r.cpu_period;
            let cpus = u32::try_from(cpus).unwrap_or(u32::MAX);
            vcpus = vcpus.saturating_add(cpus).min(host_cpus.max(base_vcpus));
        }
        if r.memory_limit_in_bytes > 0 {
            let mib = (r.memory_limit_in_bytes + MIB - 1) / MIB;
            memory_mib = memory_mib.saturating_add(u64::try_from(mib).unwrap_or(0));
        }
    }
    VmSize { vcpus, memory_mib }
}

/// CPUs this host can give one VM.
pub fn host_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(resources: Option<cri::LinuxContainerResources>) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            linux: Some(cri::LinuxPodSandboxConfig {
                resources,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn handler_size_without_pod_resources() {
        let want = VmSize {
            vcpus: 1,
            memory_mib: 256,
        };
        assert_eq!(vm_size(1, 256, &pod(None), 8), want);
        assert_eq!(vm_size(1, 256, &cri::PodSandboxConfig::default(), 8), want);
        let unlimited = cri::LinuxContainerResources {
            cpu_shares: 1024,
            ..Default::default()
        };
        assert_eq!(vm_size(1, 256, &pod(Some(unlimited)), 8), want);
    }

    #[test]
    fn pod_limits_are_added_and_rounded_up() {
        let r = cri::LinuxContainerResources {
            cpu_period: 100_000,
            cpu_quota: 150_000,
            memory_limit_in_bytes: 300 * MIB + 1,
            ..Default::default()
        };
        assert_eq!(
            vm_size(1, 256, &pod(Some(r)), 8),
            VmSize {
                vcpus: 3,
                memory_mib: 557
            }
        );
    }

    #[test]
    fn vcpus_are_capped_at_the_host_but_never_below_the_handler() {
        let r = cri::LinuxContainerResources {
            cpu_period: 100_000,
            cpu_quota: 6_400_000,
            ..Default::default()
        };
        assert_eq!(vm_size(1, 256, &pod(Some(r.clone())), 2).vcpus, 2);
        assert_eq!(vm_size(4, 256, &pod(Some(r)), 2).vcpus, 4);
    }
}
