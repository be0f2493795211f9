//! Records → CRI messages, and the List* filters.

use k8s_cri::v1 as cri;
use prost::Message as _;

use crate::store::{ContainerRecord, ContainerState, PodRecord, PodState};

fn pod_state(s: PodState) -> i32 {
    match s {
        PodState::Ready => cri::PodSandboxState::SandboxReady as i32,
        PodState::NotReady => cri::PodSandboxState::SandboxNotready as i32,
    }
}

fn container_state(s: ContainerState) -> i32 {
    match s {
        ContainerState::Created => cri::ContainerState::ContainerCreated as i32,
        ContainerState::Running => cri::ContainerState::ContainerRunning as i32,
        ContainerState::Exited => cri::ContainerState::ContainerExited as i32,
        ContainerState::Unknown => cri::ContainerState::ContainerUnknown as i32,
    }
}

pub fn pod_meta(p: &PodRecord) -> cri::PodSandboxMetadata {
    cri::PodSandboxMetadata {
        name: p.name.clone(),
        uid: p.uid.clone(),
        namespace: p.namespace.clone(),
        attempt: p.attempt,
    }
}

pub fn labels_match(
    have: &std::collections::BTreeMap<String, String>,
    want: &std::collections::HashMap<String, String>,
) -> bool {
    want.iter().all(|(k, v)| have.get(k) == Some(v))
}

pub fn pod_sandbox(p: &PodRecord) -> cri::PodSandbox {
    cri::PodSandbox {
        id: p.id.clone(),
        metadata: Some(pod_meta(p)),
        state: pod_state(p.state),
        created_at: p.created_at_ns,
        labels: p.labels.clone().into_iter().collect(),
        annotations: p.annotations.clone().into_iter().collect(),
        runtime_handler: p.runtime_handler.clone(),
    }
}

pub fn pod_status(p: &PodRecord) -> cri::PodSandboxStatus {
    let config = cri::PodSandboxConfig::decode(p.config.as_slice()).unwrap_or_default();
    let namespace_options = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone());
    cri::PodSandboxStatus {
        id: p.id.clone(),
        metadata: Some(pod_meta(p)),
        state: pod_state(p.state),
        created_at: p.created_at_ns,
        network: Some(cri::PodSandboxNetworkStatus {
            ip: p.ips.first().cloned().unwrap_or_default(),
            additional_ips: p
                .ips
                .iter()
                .skip(1)
                .map(|ip| cri::PodIp { ip: ip.clone() })
                .collect(),
        }),
        linux: Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace {
                options: namespace_options,
            }),
        }),
        labels: p.labels.clone().into_iter().collect(),
        annotations: p.annotations.clone().into_iter().collect(),
        runtime_handler: p.runtime_handler.clone(),
    }
}

/// The verbose `info` of PodSandboxStatus.
pub fn pod_info(p: &PodRecord) -> serde_json::Value {
    let vm = p.vm.as_ref();
    serde_json::json!({
        "id": p.id,
        "runtimeHandler": p.runtime_handler,
        "vmPid": vm.map(|v| v.pid),
        "accel": vm.map(|v| v.accel.clone()),
        "vcpus": vm.map(|v| v.vcpus),
        "memoryMib": vm.map(|v| v.memory_mib),
        "startupMs": vm.map(|v| serde_json::json!({
            "network": v.startup.network_ms,
            "share": v.startup.share_ms,
            "scratchDisk": v.startup.scratch_disk_ms,
            "helpers": v.startup.helpers_ms,
            "vmToAgent": v.startup.vm_to_agent_ms,
            "guestNetwork": v.startup.guest_network_ms,
            "total": v.startup.total_ms,
            "pooled": v.startup.pooled,
            "cgroup": v.startup.cgroup_ms,
        })),
    })
}

pub fn pod_matches(p: &PodRecord, f: Option<&cri::PodSandboxFilter>) -> bool {
    let Some(f) = f else { return true };
    if !f.id.is_empty() && !p.id.starts_with(&f.id) {
        return false;
    }
    if let Some(s) = &f.state {
        if s.state != pod_state(p.state) {
            return false;
        }
    }
    labels_match(&p.labels, &f.label_selector)
}

pub fn container_meta(c: &ContainerRecord) -> cri::ContainerMetadata {
    cri::ContainerMetadata {
        name: c.name.clone(),
        attempt: c.attempt,
    }
}

fn image_spec(c: &ContainerRecord) -> cri::ImageSpec {
    cri::ImageSpec {
        image: c.image.clone(),
        ..Default::default()
    }
}

pub fn container(c: &ContainerRecord) -> cri::Container {
    cri::Container {
        id: c.id.clone(),
        pod_sandbox_id: c.pod_id.clone(),
        metadata: Some(container_meta(c)),
        image: Some(image_spec(c)),
        image_ref: c.image_ref.clone(),
        state: container_state(c.state),
        created_at: c.created_at_ns,
        labels: c.labels.clone().into_iter().collect(),
        annotations: c.annotations.clone().into_iter().collect(),
        image_id: c.image_id.clone(),
    }
}

pub fn container_status(c: &ContainerRecord) -> cri::ContainerStatus {
    let config = cri::ContainerConfig::decode(c.config.as_slice()).unwrap_or_default();
    cri::ContainerStatus {
        id: c.id.clone(),
        metadata: Some(container_meta(c)),
        state: container_state(c.state),
        created_at: c.created_at_ns,
        started_at: c.started_at_ns,
        finished_at: c.finished_at_ns,
        exit_code: c.exit_code,
        image: Some(image_spec(c)),
        image_ref: c.image_ref.clone(),
        reason: c.reason.clone(),
        message: c.message.clone(),
        labels: c.labels.clone().into_iter().collect(),
        annotations: c.annotations.clone().into_iter().collect(),
        mounts: config.mounts.clone(),
        log_path: c.log_path.clone(),
        resources: config
            .linux
            .and_then(|l| l.resources)
            .map(|linux| cri::ContainerResources {
                linux: Some(linux),
                ..Default::default()
            }),
        image_id: c.image_id.clone(),
        user: container_user(&c.process_json),
    }
}

/// The identity the main process started with (CRI `ContainerUser`): its uid, gid
/// and groups, the primary one included (as `id -G` shows them).
fn container_user(process_json: &str) -> Option<cri::ContainerUser> {
    let process: serde_json::Value = serde_json::from_str(process_json).ok()?;
    let user = process.get("user")?;
    let id = |key: &str| user.get(key).and_then(serde_json::Value::as_i64);
    let (uid, gid) = (id("uid")?, id("gid")?);
    let mut groups = vec![gid];
    for g in user
        .get("additionalGids")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_i64)
    {
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    Some(cri::ContainerUser {
        linux: Some(cri::LinuxContainerUser {
            uid,
            gid,
            supplemental_groups: groups,
        }),
    })
}

/// The verbose `info` of ContainerStatus.
pub fn container_info(c: &ContainerRecord) -> serde_json::Value {
    serde_json::json!({
        "id": c.id,
        "sandboxID": c.pod_id,
        "stopSignal": c.stop_signal,
        "process": serde_json::from_str::<serde_json::Value>(&c.process_json).unwrap_or_default(),
    })
}

pub fn container_matches(c: &ContainerRecord, f: Option<&cri::ContainerFilter>) -> bool {
    let Some(f) = f else { return true };
    if !f.id.is_empty() && !c.id.starts_with(&f.id) {
        return false;
    }
    if !f.pod_sandbox_id.is_empty() && !c.pod_id.starts_with(&f.pod_sandbox_id) {
        return false;
    }
    if let Some(s) = &f.state {
        if s.state != container_state(c.state) {
            return false;
        }
    }
    labels_match(&c.labels, &f.label_selector)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn container_user_lists_the_primary_group_first() {
        let user = |json: &str| container_user(json).and_then(|u| u.linux);
        let u =
            user(r#"{"user":{"uid":1000,"gid":1000,"additionalGids":[1234,1000,50000]}}"#).unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.supplemental_groups, [1000, 1234, 50000]);
        let u = user(r#"{"user":{"uid":0,"gid":0}}"#).unwrap();
        assert_eq!(u.supplemental_groups, [0]);
        assert!(user("").is_none(), "no process recorded: no user");
    }

    fn pod() -> PodRecord {
        PodRecord {
            id: "abcdef".into(),
            name: "web".into(),
            namespace: "ns".into(),
            uid: "u".into(),
            attempt: 1,
            labels: BTreeMap::from([("app".into(), "web".into()), ("tier".into(), "fe".into())]),
            annotations: BTreeMap::new(),
            runtime_handler: "default".into(),
            state: PodState::Ready,
            created_at_ns: 7,
            config: vec![],
            vm: Some(crate::store::VmFacts {
                pid: 42,
                accel: "tcg".into(),
                vcpus: 1,
                memory_mib: 256,
                startup: crate::store::StartupTimings {
                    vm_to_agent_ms: 2100,
                    ..Default::default()
                },
            }),
            ips: vec!["10.88.0.7".into(), "fd00::7".into()],
        }
    }

    #[test]
    fn pod_filters() {
        let p = pod();
        assert!(pod_matches(&p, None));
        let mut f = cri::PodSandboxFilter {
            id: "abc".into(),
            ..Default::default()
        };
        assert!(pod_matches(&p, Some(&f)));
        f.state = Some(cri::PodSandboxStateValue {
            state: cri::PodSandboxState::SandboxNotready as i32,
        });
        assert!(!pod_matches(&p, Some(&f)));
        f.state = None;
        f.label_selector = [("app".to_string(), "web".to_string())].into();
        assert!(pod_matches(&p, Some(&f)));
        f.label_selector = [("app".to_string(), "db".to_string())].into();
        assert!(!pod_matches(&p, Some(&f)));
        f.label_selector.clear();
        f.id = "x".into();
        assert!(!pod_matches(&p, Some(&f)));
        let info = pod_info(&p);
        assert_eq!(info["vmPid"], 42);
        assert_eq!(info["accel"], "tcg");
        assert_eq!(info["startupMs"]["vmToAgent"], 2100);
        assert_eq!(
            pod_sandbox(&p).state,
            cri::PodSandboxState::SandboxReady as i32
        );
        let net = pod_status(&p).network.unwrap();
        assert_eq!(net.ip, "10.88.0.7");
        assert_eq!(
            net.additional_ips,
            [cri::PodIp {
                ip: "fd00::7".into()
            }]
        );
    }

    #[test]
    fn container_filters_and_status() {
        let config = cri::ContainerConfig {
            mounts: vec![cri::Mount {
                container_path: "/data".into(),
                host_path: "/tmp".into(),
                readonly: true,
                ..Default::default()
            }],
            ..Default::default()
        };
        let c = ContainerRecord {
            id: "c123".into(),
            pod_id: "abcdef".into(),
            name: "app".into(),
            attempt: 0,
            labels: BTreeMap::from([("k".into(), "v".into())]),
            annotations: BTreeMap::new(),
            image: "busybox:latest".into(),
            image_id: "sha256:1".into(),
            image_ref: "busybox@sha256:2".into(),
            log_path: "/logs/app/0.log".into(),
            state: ContainerState::Exited,
            created_at_ns: 1,
            started_at_ns: 2,
            finished_at_ns: 3,
            exit_code: 3,
            reason: "Error".into(),
            message: String::new(),
            config: config.encode_to_vec(),
            stop_signal: String::new(),
            process_json: String::new(),
        };
        let mut f = cri::ContainerFilter {
            pod_sandbox_id: "abc".into(),
            ..Default::default()
        };
        assert!(container_matches(&c, Some(&f)));
        f.state = Some(cri::ContainerStateValue {
            state: cri::ContainerState::ContainerRunning as i32,
        });
        assert!(!container_matches(&c, Some(&f)));
        f.state = Some(cri::ContainerStateValue {
            state: cri::ContainerState::ContainerExited as i32,
        });
        f.label_selector = [("k".to_string(), "v".to_string())].into();
        assert!(container_matches(&c, Some(&f)));
        f.pod_sandbox_id = "zzz".into();
        assert!(!container_matches(&c, Some(&f)));

        let s = container_status(&c);
        assert_eq!(s.exit_code, 3);
        assert_eq!(s.reason, "Error");
        assert_eq!(s.image_ref, "busybox@sha256:2");
        assert_eq!(s.image.unwrap().image, "busybox:latest");
        assert_eq!(s.mounts.len(), 1);
        assert_eq!(s.log_path, "/logs/app/0.log");
        assert_eq!((s.created_at, s.started_at, s.finished_at), (1, 2, 3));
    }
}
