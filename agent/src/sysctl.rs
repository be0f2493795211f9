//! Pod sysctls. The VM is the pod: its kernel belongs to this one pod, and every
//! container shares the guest's network namespace. So a sysctl that is not private to
//! a namespace the container gets of its own (`net.*`, IPC ones without an IPC
//! namespace, or one no namespace covers such as `vm.*`) is set on the guest kernel by
//! the agent, rather than refused as libcontainer refuses it on a shared host.

use std::collections::HashMap;
use std::path::PathBuf;

use oci_spec::runtime::{LinuxNamespaceType, Spec};

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    /// The name is not a sysctl path (empty part, `..`, or odd characters).
    #[error("invalid sysctl name {0:?}")]
    InvalidName(String),
    /// The guest kernel has no such sysctl.
    #[error("sysctl {0} does not exist in the pod VM's kernel")]
    Unknown(String),
    /// Writing the value failed (e.g. out of range).
    #[error("cannot set sysctl {name}={value} in the pod VM: {source}")]
    Write {
        name: String,
        value: String,
        source: std::io::Error,
    },
}

/// IPC sysctls: namespaced by an IPC namespace (the same list as the kernel's ipc ns).
const IPC_SYSCTLS: &[&str] = &[
    "kernel.msgmax",
    "kernel.msgmnb",
    "kernel.msgmni",
    "kernel.sem",
    "kernel.shmall",
    "kernel.shmmax",
    "kernel.shmmni",
    "kernel.shm_rmid_forced",
];

/// Removes from `spec` the sysctls the container runtime would refuse because the
/// container has no namespace of its own for them, and returns them (sorted by name)
/// for the agent to set on the guest kernel.
pub fn take_guest_sysctls(spec: &mut Spec) -> Vec<(String, String)> {
    let Some(mut linux) = spec.linux().clone() else {
        return Vec::new();
    };
    let Some(all) = linux.sysctl().clone() else {
        return Vec::new();
    };
    let has = |typ: LinuxNamespaceType| {
        linux
            .namespaces()
            .as_ref()
            .is_some_and(|ns| ns.iter().any(|n| n.typ() == typ))
    };
    let (ipc, uts, user, net) = (
        has(LinuxNamespaceType::Ipc),
        has(LinuxNamespaceType::Uts),
        has(LinuxNamespaceType::User),
        has(LinuxNamespaceType::Network),
    );
    let mut keep = HashMap::new();
    let mut guest = Vec::new();
    for (name, value) in all {
        let dotted = name.replace('/', ".");
        let private = if IPC_SYSCTLS.contains(&dotted.as_str()) || dotted.starts_with("fs.mqueue.")
        {
            ipc
        } else if dotted.starts_with("net.") {
            net
        } else if dotted == "kernel.domainname" {
            uts
        } else if dotted.starts_with("user.") {
            user
        } else {
            false
        };
        if private {
            keep.insert(name, value);
        } else {
            guest.push((name, value));
        }
    }
    linux.set_sysctl((!keep.is_empty()).then_some(keep));
    spec.set_linux(Some(linux));
    guest.sort();
    guest
}

/// `/proc/sys/...` for a sysctl name: dotted, or slashed (where a part may hold a
/// dot, as in `net/ipv4/conf/eth0.100/forwarding`).
pub fn proc_path(name: &str) -> Result<PathBuf, SysctlError> {
    let slashed = name.contains('/');
    let parts: Vec<&str> = if slashed {
        name.split('/').collect()
    } else {
        name.split('.').collect()
    };
    let ok = parts.iter().all(|p| {
        !p.is_empty()
            && *p != "."
            && *p != ".."
            && p.bytes().all(|b| {
                b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (slashed && b == b'.')
            })
    });
    if !ok {
        return Err(SysctlError::InvalidName(name.to_owned()));
    }
    let mut path = PathBuf::from("/proc/sys");
    path.extend(parts);
    Ok(path)
}

/// Sets each sysctl on the guest kernel.
pub fn apply(sysctls: &[(String, String)]) -> Result<(), SysctlError> {
    for (name, value) in sysctls {
        let path = proc_path(name)?;
        if !path.exists() {
            return Err(SysctlError::Unknown(name.clone()));
        }
        std::fs::write(&path, value).map_err(|source| SysctlError::Write {
            name: name.clone(),
            value: value.clone(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{LinuxBuilder, LinuxNamespaceBuilder};

    fn spec_with(namespaces: &[LinuxNamespaceType], sysctls: &[(&str, &str)]) -> Spec {
        let ns: Vec<_> = namespaces
            .iter()
            .map(|t| LinuxNamespaceBuilder::default().typ(*t).build().unwrap())
            .collect();
        let linux = LinuxBuilder::default()
            .namespaces(ns)
            .sysctl(
                sysctls
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<HashMap<_, _>>(),
            )
            .build()
            .unwrap();
        let mut spec = Spec::default();
        spec.set_linux(Some(linux));
        spec
    }

    #[test]
    fn shared_namespaces_move_sysctls_to_the_guest() {
        let mut spec = spec_with(
            &[LinuxNamespaceType::Mount, LinuxNamespaceType::Pid],
            &[
                ("net.ipv4.ip_unprivileged_port_start", "0"),
                ("kernel.shm_rmid_forced", "1"),
                ("vm.overcommit_memory", "1"),
            ],
        );
        let guest = take_guest_sysctls(&mut spec);
        assert_eq!(
            guest,
            vec![
                ("kernel.shm_rmid_forced".to_string(), "1".to_string()),
                ("net.ipv4.ip_unprivileged_port_start".into(), "0".into()),
                ("vm.overcommit_memory".into(), "1".into()),
            ]
        );
        assert!(spec.linux().as_ref().unwrap().sysctl().is_none());
    }

    #[test]
    fn private_namespaces_keep_theirs_in_the_spec() {
        let mut spec = spec_with(
            &[LinuxNamespaceType::Ipc, LinuxNamespaceType::Uts],
            &[
                ("kernel/msgmax", "9000"),
                ("fs.mqueue.msg_max", "20"),
                ("kernel.domainname", "example"),
                ("net.core.somaxconn", "1024"),
            ],
        );
        let guest = take_guest_sysctls(&mut spec);
        assert_eq!(
            guest,
            vec![("net.core.somaxconn".to_string(), "1024".to_string())]
        );
        let kept = spec.linux().as_ref().unwrap().sysctl().clone().unwrap();
        assert_eq!(kept.len(), 3);
        assert_eq!(kept["kernel/msgmax"], "9000");
    }

    #[test]
    fn no_sysctls_is_a_no_op() {
        let mut spec = Spec::default();
        assert!(take_guest_sysctls(&mut spec).is_empty());
    }

    #[test]
    fn names_map_to_proc_sys_and_escapes_are_refused() {
        assert_eq!(
            proc_path("net.ipv4.ip_forward").unwrap(),
            PathBuf::from("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            proc_path("net/ipv4/conf/eth0.100/forwarding").unwrap(),
            PathBuf::from("/proc/sys/net/ipv4/conf/eth0.100/forwarding")
        );
        for bad in [
            "",
            "net..x",
            "../etc/passwd",
            "net.ipv4/../../x",
            "a b",
            "x.\n",
        ] {
            assert!(proc_path(bad).is_err(), "{bad:?}");
        }
    }
}
