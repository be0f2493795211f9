//! Turns the host's OCI spec into the one the guest runs: the rootfs per the request,
//! the container's cgroup under /vessel, namespaces adjusted for the VM.
//!
//! Network: the pod network *is* the VM, so every container shares the guest's network
//! namespace; a `network` namespace in the spec is dropped (with its path).

use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType, Process, RootBuilder, Spec};

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
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("invalid OCI spec JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid OCI spec: {0}")]
    Oci(#[from] oci_spec::OciSpecError),
    #[error("the spec has no process")]
    NoProcess,
}

pub fn cgroup_path(container_id: &str) -> String {
    format!("{CGROUP_PARENT}/{container_id}")
}

/// Parses and adjusts a container spec.
pub fn prepare(json: &[u8], adj: &Adjust) -> Result<Spec, SpecError> {
    let mut spec: Spec = serde_json::from_slice(json)?;
    if spec.process().is_none() {
        return Err(SpecError::NoProcess);
    }
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
    Ok(spec)
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
