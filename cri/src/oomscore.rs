//! Who the host's OOM killer takes first: a pod VM's host processes (QEMU,
//! virtiofsd, vhost-device-vsock) carry the score the kubelet asks for the pod's
//! containers, never vesseld's own protection (the unit's `OOMScoreAdjust=-999`,
//! which children would otherwise inherit).
//!
//! The rule: the highest `oom_score_adj` among the pod's containers (the kubelet
//! gives each the score of the pod's QoS class: BestEffort 1000, Burstable 2..999
//! by request, Guaranteed -997); before the pod has a container, the score of the
//! QoS class its cgroup parent names (Burstable: 999, as its request is not known
//! yet), or 0 when the parent names none. Never below -997, so no pod VM outranks
//! the node's daemons (kubelet and vesseld at -999). An idle pool VM holds nothing
//! of a tenant's and is taken first (1000).

use k8s_cri::v1 as cri;

/// The kubelet's score for BestEffort pods, and the idle pool's.
pub const BEST_EFFORT: i32 = 1000;
/// The highest Burstable score (the kubelet's range is 2..=999).
pub const BURSTABLE: i32 = 999;
/// The kubelet's score for Guaranteed pods: also the floor of every pod VM.
pub const GUARANTEED: i32 = -997;
/// A pool VM that no pod has claimed.
pub const IDLE_POOL: i32 = BEST_EFFORT;
/// A pod whose cgroup parent names no QoS class (crictl, tests).
pub const NO_QOS: i32 = 0;

/// The QoS class score a kubelet cgroup parent names: cgroupfs
/// `/kubepods/besteffort/pod<uid>`, `/kubepods/burstable/pod<uid>`,
/// `/kubepods/pod<uid>` (Guaranteed), or their systemd slices
/// (`kubepods-besteffort-pod<uid>.slice`, ...).
pub fn qos_of_parent(parent: &str) -> Option<i32> {
    let mut kubepods = false;
    for part in parent.split('/').filter(|p| !p.is_empty()) {
        let words: Vec<&str> = part.trim_end_matches(".slice").split('-').collect();
        if words.contains(&"besteffort") {
            return Some(BEST_EFFORT);
        }
        if words.contains(&"burstable") {
            return Some(BURSTABLE);
        }
        kubepods |= words.first() == Some(&"kubepods");
    }
    kubepods.then_some(GUARANTEED)
}

/// The score of a pod before it has containers.
pub fn for_sandbox(config: &cri::PodSandboxConfig) -> i32 {
    config
        .linux
        .as_ref()
        .and_then(|l| qos_of_parent(&l.cgroup_parent))
        .unwrap_or(NO_QOS)
}

/// The score of a pod with `sandbox` as its QoS score and these containers' asks.
pub fn for_pod(sandbox: i32, containers: impl IntoIterator<Item = i64>) -> i32 {
    containers
        .into_iter()
        .max()
        .map(|s| s.clamp(i64::from(GUARANTEED), i64::from(BEST_EFFORT)) as i32)
        .unwrap_or(sandbox)
        .max(GUARANTEED)
}

/// What a container's CRI config asks for (0 when unset, as in the kubelet's
/// proto3 messages).
pub fn of_container(config: &cri::ContainerConfig) -> i64 {
    config
        .linux
        .as_ref()
        .and_then(|l| l.resources.as_ref())
        .map_or(0, |r| r.oom_score_adj)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qos_from_kubelet_parents() {
        for (parent, want) in [
            ("/kubepods/besteffort/pod1", Some(BEST_EFFORT)),
            ("/kubepods/burstable/pod1", Some(BURSTABLE)),
            ("/kubepods/pod1", Some(GUARANTEED)),
            ("kubepods-besteffort-pod1_2.slice", Some(BEST_EFFORT)),
            ("kubepods-burstable-pod1.slice", Some(BURSTABLE)),
            ("kubepods-pod1.slice", Some(GUARANTEED)),
            (
                "/kubepods.slice/kubepods-besteffort.slice/x.slice",
                Some(BEST_EFFORT),
            ),
            ("/vessel", None),
            ("", None),
            ("/besteffortish/pod", None),
        ] {
            assert_eq!(qos_of_parent(parent), want, "{parent}");
        }
    }

    #[test]
    fn highest_container_wins_within_bounds() {
        assert_eq!(for_pod(BURSTABLE, []), BURSTABLE);
        assert_eq!(for_pod(NO_QOS, [1000, -997]), 1000);
        assert_eq!(for_pod(NO_QOS, [-997, -997]), -997);
        // A client asking for more protection than the node's daemons gets the floor.
        assert_eq!(for_pod(NO_QOS, [-1000]), GUARANTEED);
        assert_eq!(for_pod(NO_QOS, [5000]), BEST_EFFORT);
        assert_eq!(for_pod(-1000, []), GUARANTEED);
    }
}
