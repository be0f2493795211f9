//! The pod's user namespace (CRI `userns_options`): which requests vessel takes, and
//! the OCI mappings that ask the agent for one.
//!
//! Only NODE (no new namespace) and POD (one namespace for the whole pod, one uid and
//! one gid range, container id 0 mapped) are taken, as containerd does: the kubelet
//! never sends more, and a request it would not send is refused, not half-honoured.
//! The host ids are guest ids: the namespace lives inside the pod's VM.

use k8s_cri::v1 as cri;
use oci_spec::runtime::{LinuxIdMapping, LinuxIdMappingBuilder};

use crate::validate::InvalidInput;

/// One validated id range: `container_id..+length` ↔ `host_id..+length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub container_id: u32,
    pub host_id: u32,
    pub length: u32,
}

/// A POD-mode user namespace, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodUserns {
    pub uids: IdRange,
    pub gids: IdRange,
}

fn bad(reason: impl Into<String>) -> InvalidInput {
    InvalidInput::UserNamespace {
        reason: reason.into(),
    }
}

/// The pod's `userns_options`, if any.
pub fn pod_options(config: &cri::PodSandboxConfig) -> Option<&cri::UserNamespace> {
    config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref())
        .and_then(|n| n.userns_options.as_ref())
}

/// The container's own `userns_options`, if any.
pub fn container_options(config: &cri::ContainerConfig) -> Option<&cri::UserNamespace> {
    config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref())
        .and_then(|n| n.userns_options.as_ref())
}

/// Checks a pod's (or container's) user namespace options: `None` for NODE (or
/// none given), the mappings for POD.
pub fn validate(opts: Option<&cri::UserNamespace>) -> Result<Option<PodUserns>, InvalidInput> {
    let Some(opts) = opts else {
        return Ok(None);
    };
    match cri::NamespaceMode::try_from(opts.mode) {
        Ok(cri::NamespaceMode::Node) => {
            if !opts.uids.is_empty() || !opts.gids.is_empty() {
                return Err(bad(
                    "mode NODE uses the node's ids and takes no uids/gids mappings; \
                     drop the mappings or use mode POD",
                ));
            }
            Ok(None)
        }
        Ok(cri::NamespaceMode::Pod) => Ok(Some(PodUserns {
            uids: one_range("uids", &opts.uids)?,
            gids: one_range("gids", &opts.gids)?,
        })),
        Ok(cri::NamespaceMode::Container) => Err(bad(
            "mode CONTAINER is not supported; use POD (one namespace for the pod) or NODE",
        )),
        Ok(cri::NamespaceMode::Target) => Err(bad(
            "mode TARGET is not supported; use POD (one namespace for the pod) or NODE",
        )),
        Err(_) => Err(bad(format!("unknown mode {}; use POD or NODE", opts.mode))),
    }
}

fn one_range(what: &str, maps: &[cri::IdMapping]) -> Result<IdRange, InvalidInput> {
    let m = match maps {
        [] => {
            return Err(bad(format!(
                "mode POD needs one {what} mapping (container id 0 to a host range)"
            )))
        }
        [m] => m,
        _ => {
            return Err(bad(format!(
                "{} {what} mappings given; only one range per pod is supported",
                maps.len()
            )))
        }
    };
    if m.length == 0 {
        return Err(bad(format!("the {what} mapping has length 0")));
    }
    if m.container_id != 0 {
        return Err(bad(format!(
            "the {what} mapping must map container id 0 (the container's root); \
             it starts at {}",
            m.container_id
        )));
    }
    // Ids are 32-bit; the range's last id must be one too (u32::MAX itself is
    // the kernel's invalid id, so the end may reach it but not pass it).
    let end = u64::from(m.host_id) + u64::from(m.length);
    if end > u64::from(u32::MAX) {
        return Err(bad(format!(
            "the {what} mapping {}+{} runs past the largest id {}",
            m.host_id,
            m.length,
            u32::MAX - 1
        )));
    }
    Ok(IdRange {
        container_id: m.container_id,
        host_id: m.host_id,
        length: m.length,
    })
}

/// The pod's user namespace, checked with the pod's other namespace options: the
/// node's PID or IPC namespace belongs to the VM's initial user namespace, so a
/// container in the pod's namespace could neither join it nor mount its /proc or
/// /dev/mqueue (the kubelet refuses hostPID/hostIPC with user namespaces too).
pub fn for_pod(config: &cri::PodSandboxConfig) -> Result<Option<PodUserns>, InvalidInput> {
    let userns = validate(pod_options(config))?;
    let ns = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref());
    if let (Some(_), Some(ns)) = (userns, ns) {
        let node = cri::NamespaceMode::Node as i32;
        if ns.pid == node || ns.ipc == node {
            return Err(bad(
                "mode POD cannot be combined with the node's PID or IPC namespace \
                 (hostPID/hostIPC); use one or the other",
            ));
        }
    }
    Ok(userns)
}

/// Refuses a container whose user namespace options differ from its pod's: every
/// container of a pod shares the pod's one namespace (as with containerd).
pub fn check_container(
    pod: Option<PodUserns>,
    container: Option<&cri::UserNamespace>,
) -> Result<(), InvalidInput> {
    let wanted = validate(container)?;
    if wanted != pod {
        let say = |u: Option<PodUserns>| match u {
            None => "NODE".to_owned(),
            Some(u) => format!(
                "POD uids {}:{}:{} gids {}:{}:{}",
                u.uids.container_id,
                u.uids.host_id,
                u.uids.length,
                u.gids.container_id,
                u.gids.host_id,
                u.gids.length
            ),
        };
        return Err(bad(format!(
            "the container asks for {} but its pod has {}; a container must carry \
             its pod's user namespace options",
            say(wanted),
            say(pod)
        )));
    }
    Ok(())
}

/// The OCI form of one range.
pub fn oci_mapping(r: IdRange) -> Result<LinuxIdMapping, oci_spec::OciSpecError> {
    LinuxIdMappingBuilder::default()
        .container_id(r.container_id)
        .host_id(r.host_id)
        .size(r.length)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(container_id: u32, host_id: u32, length: u32) -> cri::IdMapping {
        cri::IdMapping {
            host_id,
            container_id,
            length,
        }
    }

    fn pod(uids: Vec<cri::IdMapping>, gids: Vec<cri::IdMapping>) -> cri::UserNamespace {
        cri::UserNamespace {
            mode: cri::NamespaceMode::Pod as i32,
            uids,
            gids,
        }
    }

    fn reason(r: Result<Option<PodUserns>, InvalidInput>) -> String {
        match r {
            Err(InvalidInput::UserNamespace { reason }) => reason,
            other => panic!("expected a user namespace refusal, got {other:?}"),
        }
    }

    #[test]
    fn pod_mode_with_one_range_each() {
        let o = pod(vec![map(0, 1000, 100000)], vec![map(0, 2000, 65536)]);
        let u = validate(Some(&o)).unwrap().unwrap();
        assert_eq!(
            u.uids,
            IdRange {
                container_id: 0,
                host_id: 1000,
                length: 100000
            }
        );
        assert_eq!(u.gids.host_id, 2000);
        assert_eq!(u.gids.length, 65536);
    }

    #[test]
    fn node_mode_and_absent_mean_no_namespace() {
        assert_eq!(validate(None).unwrap(), None);
        let node = cri::UserNamespace {
            mode: cri::NamespaceMode::Node as i32,
            ..Default::default()
        };
        assert_eq!(validate(Some(&node)).unwrap(), None);
        let with_maps = cri::UserNamespace {
            mode: cri::NamespaceMode::Node as i32,
            uids: vec![map(0, 1000, 10)],
            gids: vec![],
        };
        assert!(reason(validate(Some(&with_maps))).contains("NODE"));
    }

    #[test]
    fn refuses_what_cannot_be_honoured() {
        let ok = || vec![map(0, 1000, 100000)];
        let two = || vec![map(0, 1000, 100), map(100, 5000, 100)];
        assert!(reason(validate(Some(&pod(two(), ok())))).contains("only one range"));
        assert!(reason(validate(Some(&pod(ok(), two())))).contains("gids"));
        assert!(reason(validate(Some(&pod(vec![map(1, 1000, 100000)], ok())))).contains("id 0"));
        assert!(reason(validate(Some(&pod(ok(), vec![])))).contains("needs one gids"));
        assert!(reason(validate(Some(&pod(vec![], ok())))).contains("needs one uids"));
        assert!(reason(validate(Some(&pod(vec![], vec![])))).contains("mode POD"));
        assert!(reason(validate(Some(&pod(vec![map(0, 1000, 0)], ok())))).contains("length 0"));
        assert!(
            reason(validate(Some(&pod(vec![map(0, u32::MAX - 10, 11)], ok()))))
                .contains("past the largest id")
        );
        // The last valid id (u32::MAX - 1) may be the range's end.
        assert!(validate(Some(&pod(vec![map(0, u32::MAX - 10, 10)], ok()))).is_ok());
        for mode in [cri::NamespaceMode::Container, cri::NamespaceMode::Target] {
            let o = cri::UserNamespace {
                mode: mode as i32,
                uids: ok(),
                gids: ok(),
            };
            assert!(reason(validate(Some(&o))).contains("not supported"));
        }
        let unknown = cri::UserNamespace {
            mode: 42,
            ..Default::default()
        };
        assert!(reason(validate(Some(&unknown))).contains("unknown mode"));
    }

    #[test]
    fn pod_mode_refuses_node_pid_and_ipc() {
        let opts = |pid: cri::NamespaceMode, ipc: cri::NamespaceMode| cri::PodSandboxConfig {
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        pid: pid as i32,
                        ipc: ipc as i32,
                        userns_options: Some(pod(
                            vec![map(0, 1000, 100000)],
                            vec![map(0, 1000, 100000)],
                        )),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        use cri::NamespaceMode::{Container, Node, Pod};
        assert!(for_pod(&opts(Pod, Pod)).unwrap().is_some());
        assert!(for_pod(&opts(Container, Pod)).unwrap().is_some());
        assert!(for_pod(&opts(Node, Pod)).is_err());
        assert!(for_pod(&opts(Pod, Node)).is_err());
        assert_eq!(for_pod(&cri::PodSandboxConfig::default()).unwrap(), None);
    }

    #[test]
    fn containers_must_match_their_pod() {
        let o = pod(vec![map(0, 1000, 100000)], vec![map(0, 1000, 100000)]);
        let p = validate(Some(&o)).unwrap();
        assert!(check_container(p, Some(&o)).is_ok());
        assert!(check_container(None, None).is_ok());
        let err = check_container(p, None).unwrap_err().to_string();
        assert!(err.contains("asks for NODE"), "{err}");
        let other = pod(vec![map(0, 5000, 100000)], vec![map(0, 1000, 100000)]);
        assert!(check_container(p, Some(&other)).is_err());
        assert!(check_container(None, Some(&o)).is_err());
    }

    #[test]
    fn oci_form() {
        let m = oci_mapping(IdRange {
            container_id: 0,
            host_id: 1000,
            length: 5,
        })
        .unwrap();
        assert_eq!((m.container_id(), m.host_id(), m.size()), (0, 1000, 5));
    }
}
