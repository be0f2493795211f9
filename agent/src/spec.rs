//! Turns the host's OCI spec into the one the guest runs: the rootfs per the request,
//! the container's cgroup under /vessel, namespaces adjusted for the VM.
//!
//! Network: the pod network *is* the VM, so every container shares the guest's network
//! namespace; a `network` namespace in the spec is dropped (with its path).
//!
//! User namespace: the host asks for one (a `user` namespace without a path, with
//! the pod's mappings); the agent makes it once per pod (see `podinit`) and every
//! container joins it by path.

use oci_spec::runtime::{
    LinuxIdMapping, LinuxNamespace, LinuxNamespaceType, MountBuilder, Process, RootBuilder, Spec,
};

/// Parent cgroup (under the cgroup2 root) of every container's cgroup.
pub const CGROUP_PARENT: &str = "/vessel";

/// What the request says beyond the spec itself.
#[derive(Debug, Default, Clone)]
pub struct Adjust {
    pub container_id: String,
    pub rootfs: String,
    /// `/proc/<pid>/ns/pid` of the container whose PID namespace to join.
    pub pid_ns_path: Option<String>,
    pub ipc_ns_path: Option<String>,
    /// `/proc/<pid>/ns/user` of the pod's user namespace holder, when the pod has one.
    pub user_ns_path: Option<String>,
}

/// The id mappings of the pod's user namespace, as the host asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdMaps {
    pub uids: Vec<LinuxIdMapping>,
    pub gids: Vec<LinuxIdMapping>,
}

/// The kernel takes at most this many lines per map (since Linux 4.15).
const MAX_MAP_LINES: usize = 340;

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("invalid OCI spec JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid OCI spec: {0}")]
    Oci(#[from] oci_spec::OciSpecError),
    #[error("the spec has no process")]
    NoProcess,
    #[error("user namespace: {0}")]
    UserNamespace(&'static str),
}

pub fn cgroup_path(container_id: &str) -> String {
    format!("{CGROUP_PARENT}/{container_id}")
}

/// Parses and adjusts a container spec.
#[cfg(test)]
pub fn prepare(json: &[u8], adj: &Adjust) -> Result<Spec, SpecError> {
    let mut spec = parse(json)?;
    adjust(&mut spec, adj)?;
    Ok(spec)
}

/// Parses a container spec (it must have a process).
pub fn parse(json: &[u8]) -> Result<Spec, SpecError> {
    let spec: Spec = serde_json::from_slice(json)?;
    if spec.process().is_none() {
        return Err(SpecError::NoProcess);
    }
    Ok(spec)
}

fn namespace(spec: &Spec, typ: LinuxNamespaceType) -> Option<&LinuxNamespace> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == typ)
}

/// Whether the spec asks for a namespace of this type (new or joined).
pub fn has_namespace(spec: &Spec, typ: LinuxNamespaceType) -> bool {
    namespace(spec, typ).is_some()
}

/// The pod user namespace the spec asks for: `None` without a `user` namespace.
/// The host names no path (the agent chooses where the namespace lives) and gives
/// both maps.
pub fn requested_userns(spec: &Spec) -> Result<Option<IdMaps>, SpecError> {
    let Some(ns) = namespace(spec, LinuxNamespaceType::User) else {
        return Ok(None);
    };
    if ns.path().is_some() {
        return Err(SpecError::UserNamespace(
            "a path is not accepted; the agent keeps the pod's namespace",
        ));
    }
    let linux = spec
        .linux()
        .as_ref()
        .ok_or(SpecError::UserNamespace("the spec has no linux section"))?;
    let maps = |m: &Option<Vec<LinuxIdMapping>>| m.clone().unwrap_or_default();
    let ids = IdMaps {
        uids: maps(linux.uid_mappings()),
        gids: maps(linux.gid_mappings()),
    };
    for m in [&ids.uids, &ids.gids] {
        if m.is_empty() {
            return Err(SpecError::UserNamespace(
                "both uid and gid mappings are needed",
            ));
        }
        if m.len() > MAX_MAP_LINES {
            return Err(SpecError::UserNamespace("too many mappings"));
        }
    }
    Ok(Some(ids))
}

/// Adjusts a parsed spec for the guest.
pub fn adjust(spec: &mut Spec, adj: &Adjust) -> Result<(), SpecError> {
    let readonly = spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false);
    spec.set_root(Some(
        RootBuilder::default()
            .path(&adj.rootfs)
            .readonly(readonly)
            .build()?,
    ));
    // Hooks would run guest binaries the host named: not supported in the guest.
    spec.set_hooks(None);

    let mut linux = spec.linux().clone().unwrap_or_default();
    linux.set_cgroups_path(Some(cgroup_path(&adj.container_id).into()));
    let mut namespaces: Vec<LinuxNamespace> = linux
        .namespaces()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.typ() != LinuxNamespaceType::Network)
        .collect();
    for (typ, path) in [
        (LinuxNamespaceType::User, &adj.user_ns_path),
        (LinuxNamespaceType::Pid, &adj.pid_ns_path),
        (LinuxNamespaceType::Ipc, &adj.ipc_ns_path),
    ] {
        if let Some(path) = path {
            namespaces.retain(|n| n.typ() != typ);
            let mut ns = LinuxNamespace::default();
            ns.set_typ(typ);
            ns.set_path(Some(path.into()));
            namespaces.push(ns);
        }
    }
    linux.set_namespaces(Some(namespaces));
    spec.set_linux(Some(linux));
    if adj.user_ns_path.is_some() {
        bind_sysfs(spec)?;
    }
    Ok(())
}

/// Replaces a `sysfs` mount with a read-only bind of the guest's /sys. A new sysfs
/// needs privilege over the network namespace, which is the VM's (owned by the
/// initial user namespace), so a container in the pod's user namespace cannot
/// mount one; the VM's own /sys shows that same network namespace.
fn bind_sysfs(spec: &mut Spec) -> Result<(), SpecError> {
    let Some(mounts) = spec.mounts().clone() else {
        return Ok(());
    };
    let mut out = Vec::with_capacity(mounts.len());
    for m in mounts {
        if m.typ().as_deref() != Some("sysfs") {
            out.push(m);
            continue;
        }
        out.push(
            MountBuilder::default()
                .destination(m.destination().clone())
                .typ("bind")
                .source("/sys")
                .options(
                    ["rbind", "nosuid", "noexec", "nodev", "ro"]
                        .map(String::from)
                        .to_vec(),
                )
                .build()?,
        );
    }
    spec.set_mounts(Some(out));
    Ok(())
}

/// Parses an exec's OCI `process` object.
pub fn parse_process(json: &[u8]) -> Result<Process, SpecError> {
    Ok(serde_json::from_slice(json)?)
}

/// `Some(console size as (width, height))` when the process wants a TTY; (0, 0) when the
/// spec gives no size.
pub fn tty_size(p: Option<&Process>) -> Option<(u16, u16)> {
    let p = p?;
    if !p.terminal().unwrap_or(false) {
        return None;
    }
    let size = p.console_size().map_or((0, 0), |b| {
        (
            u16::try_from(b.width()).unwrap_or(u16::MAX),
            u16::try_from(b.height()).unwrap_or(u16::MAX),
        )
    });
    Some(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Vec<u8> {
        serde_json::to_vec(&Spec::default()).unwrap()
    }

    #[test]
    fn root_cgroup_and_no_netns() {
        let adj = Adjust {
            container_id: "c1".into(),
            rootfs: "/run/r/c1".into(),
            ..Default::default()
        };
        let spec = prepare(&base(), &adj).unwrap();
        assert_eq!(
            spec.root().as_ref().unwrap().path().to_str(),
            Some("/run/r/c1")
        );
        let linux = spec.linux().as_ref().unwrap();
        assert_eq!(
            linux.cgroups_path().as_ref().unwrap().to_str(),
            Some("/vessel/c1")
        );
        let ns = linux.namespaces().as_ref().unwrap();
        assert!(ns.iter().all(|n| n.typ() != LinuxNamespaceType::Network));
        assert!(ns.iter().any(|n| n.typ() == LinuxNamespaceType::Mount));
    }

    #[test]
    fn shared_pid_and_ipc() {
        let adj = Adjust {
            container_id: "c2".into(),
            rootfs: "/r".into(),
            pid_ns_path: Some("/proc/42/ns/pid".into()),
            ipc_ns_path: Some("/proc/42/ns/ipc".into()),
            user_ns_path: None,
        };
        let spec = prepare(&base(), &adj).unwrap();
        let ns = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        let pid: Vec<_> = ns
            .iter()
            .filter(|n| n.typ() == LinuxNamespaceType::Pid)
            .collect();
        assert_eq!(pid.len(), 1);
        assert_eq!(
            pid[0].path().as_ref().unwrap().to_str(),
            Some("/proc/42/ns/pid")
        );
        let ipc: Vec<_> = ns
            .iter()
            .filter(|n| n.typ() == LinuxNamespaceType::Ipc)
            .collect();
        assert_eq!(
            ipc[0].path().as_ref().unwrap().to_str(),
            Some("/proc/42/ns/ipc")
        );
    }

    fn with_userns(path: Option<&str>, maps: bool) -> Spec {
        let mut s = Spec::default();
        let mut linux = s.linux().clone().unwrap();
        let mut ns = linux.namespaces().clone().unwrap();
        let mut user = LinuxNamespace::default();
        user.set_typ(LinuxNamespaceType::User);
        user.set_path(path.map(Into::into));
        ns.push(user);
        linux.set_namespaces(Some(ns));
        if maps {
            let m = oci_spec::runtime::LinuxIdMappingBuilder::default()
                .container_id(0u32)
                .host_id(1000u32)
                .size(65536u32)
                .build()
                .unwrap();
            linux.set_uid_mappings(Some(vec![m]));
            linux.set_gid_mappings(Some(vec![m]));
        }
        s.set_linux(Some(linux));
        s
    }

    #[test]
    fn user_namespace_request() {
        assert_eq!(requested_userns(&Spec::default()).unwrap(), None);
        let ids = requested_userns(&with_userns(None, true)).unwrap().unwrap();
        assert_eq!(ids.uids[0].host_id(), 1000);
        assert_eq!(ids.gids[0].size(), 65536);
        assert!(requested_userns(&with_userns(None, false)).is_err());
        assert!(requested_userns(&with_userns(Some("/proc/1/ns/user"), true)).is_err());
    }

    #[test]
    fn joins_pod_userns_and_binds_sysfs() {
        let adj = Adjust {
            container_id: "c3".into(),
            rootfs: "/r".into(),
            user_ns_path: Some("/proc/7/ns/user".into()),
            ..Default::default()
        };
        let mut spec = with_userns(None, true);
        adjust(&mut spec, &adj).unwrap();
        let ns = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        let user: Vec<_> = ns
            .iter()
            .filter(|n| n.typ() == LinuxNamespaceType::User)
            .collect();
        assert_eq!(user.len(), 1);
        assert_eq!(
            user[0].path().as_ref().unwrap().to_str(),
            Some("/proc/7/ns/user")
        );
        let mounts = spec.mounts().as_ref().unwrap();
        assert!(mounts.iter().all(|m| m.typ().as_deref() != Some("sysfs")));
        let sys = mounts
            .iter()
            .find(|m| m.destination().to_str() == Some("/sys"))
            .unwrap();
        assert_eq!(sys.typ().as_deref(), Some("bind"));
        assert!(sys.options().as_ref().unwrap().contains(&"ro".to_string()));
        // Without a user namespace, sysfs stays.
        let plain = prepare(&base(), &Adjust::default()).unwrap();
        assert!(plain
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.typ().as_deref() == Some("sysfs")));
    }

    #[test]
    fn rejects_garbage_and_missing_process() {
        assert!(prepare(b"{not json", &Adjust::default()).is_err());
        let mut s = Spec::default();
        s.set_process(None);
        assert!(matches!(
            prepare(&serde_json::to_vec(&s).unwrap(), &Adjust::default()),
            Err(SpecError::NoProcess)
        ));
    }

    #[test]
    fn exec_process_terminal() {
        let p =
            parse_process(br#"{"args":["sh"],"cwd":"/","terminal":true,"user":{"uid":0,"gid":0}}"#)
                .unwrap();
        assert_eq!(tty_size(Some(&p)), Some((0, 0)));
        assert_eq!(tty_size(None), None);
        let sized = parse_process(
            br#"{"args":["sh"],"cwd":"/","terminal":true,"consoleSize":{"height":24,"width":80},"user":{"uid":0,"gid":0}}"#,
        )
        .unwrap();
        assert_eq!(tty_size(Some(&sized)), Some((80, 24)));
        let piped =
            parse_process(br#"{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}}"#).unwrap();
        assert_eq!(tty_size(Some(&piped)), None);
    }
}
