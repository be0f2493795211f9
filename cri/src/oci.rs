//! CRI `ContainerConfig` (+ pod config + image config) → OCI runtime spec.
//!
//! Paths in the result are guest paths: bind-mount sources are already translated
//! into the pod share dir by the caller ([`GuestMount`]).

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use k8s_cri::v1 as cri;
use oci_spec::image::Config as ImageConfig;
use oci_spec::runtime::{
    Capability, LinuxCapabilities, LinuxCpu, LinuxDeviceCgroup, LinuxMemory, LinuxNamespace,
    LinuxNamespaceType, LinuxResources, LinuxSeccomp, Mount, Process, Root, Spec, User,
};

use crate::passwd::{self, UserError};
use crate::userns::{self, PodUserns};

/// A bind mount whose source is a guest path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestMount {
    pub destination: String,
    pub source: String,
    pub readonly: bool,
}

/// Everything the conversion reads.
pub struct SpecInput<'a> {
    pub container: &'a cri::ContainerConfig,
    pub pod: &'a cri::PodSandboxConfig,
    pub image: Option<&'a ImageConfig>,
    /// The image's /etc/passwd and /etc/group ("" when absent).
    pub passwd: &'a str,
    pub group: &'a str,
    /// CRI mounts, translated.
    pub mounts: Vec<GuestMount>,
    /// Pod-wide files (hosts, resolv.conf, hostname), used unless a CRI mount
    /// already provides that destination.
    pub pod_files: Vec<GuestMount>,
    /// Contents of a `Localhost` seccomp profile, read by the caller.
    pub localhost_seccomp: Option<String>,
    /// The pod's user namespace (POD mode), validated by the caller.
    pub userns: Option<PodUserns>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("no command: the container config and the image give neither command nor args")]
    NoCommand,
    #[error("unknown capability {0:?}")]
    Capability(String),
    #[error(transparent)]
    User(#[from] UserError),
    #[error("invalid seccomp profile: {0}")]
    Seccomp(String),
    #[error("run_as_group is set without run_as_user or run_as_username: a group needs a user")]
    GroupWithoutUser,
    #[error("invalid OCI spec: {0}")]
    Oci(#[from] oci_spec::OciSpecError),
}

/// Every capability Linux has; privileged containers and "ALL" get these.
const ALL_CAPS: &[&str] = &[
    "AUDIT_CONTROL",
    "AUDIT_READ",
    "AUDIT_WRITE",
    "BLOCK_SUSPEND",
    "BPF",
    "CHECKPOINT_RESTORE",
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "IPC_LOCK",
    "IPC_OWNER",
    "KILL",
    "LEASE",
    "LINUX_IMMUTABLE",
    "MAC_ADMIN",
    "MAC_OVERRIDE",
    "MKNOD",
    "NET_ADMIN",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_RAW",
    "PERFMON",
    "SETGID",
    "SETFCAP",
    "SETPCAP",
    "SETUID",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_CHROOT",
    "SYS_MODULE",
    "SYS_NICE",
    "SYS_PACCT",
    "SYS_PTRACE",
    "SYS_RAWIO",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "SYSLOG",
    "WAKE_ALARM",
];

/// What an unprivileged container gets (the set Docker and containerd use).
const DEFAULT_CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// Syscalls the RuntimeDefault profile refuses (EPERM): kernel-wide or
/// namespace-escaping operations that a pod container has no business making.
const RUNTIME_DEFAULT_DENY: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "get_kernel_syms",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "move_pages",
    "nfsservctl",
    "open_by_handle_at",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "sysfs",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
];

fn capability(name: &str) -> Result<Capability, SpecError> {
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    Capability::from_str(bare).map_err(|_| SpecError::Capability(name.to_owned()))
}

fn cap_set(names: &[&str]) -> HashSet<Capability> {
    names.iter().filter_map(|n| capability(n).ok()).collect()
}

/// The capability set after CRI add/drop ("ALL" allowed in both).
fn capabilities(
    privileged: bool,
    caps: Option<&cri::Capability>,
) -> Result<HashSet<Capability>, SpecError> {
    if privileged {
        return Ok(cap_set(ALL_CAPS));
    }
    let mut set = cap_set(DEFAULT_CAPS);
    let Some(caps) = caps else { return Ok(set) };
    let is_all = |s: &String| s.eq_ignore_ascii_case("ALL");
    if caps.drop_capabilities.iter().any(is_all) {
        set.clear();
    }
    if caps.add_capabilities.iter().any(is_all) {
        set = cap_set(ALL_CAPS);
    }
    for name in caps.add_capabilities.iter().filter(|s| !is_all(s)) {
        set.insert(capability(name)?);
    }
    for name in caps.drop_capabilities.iter().filter(|s| !is_all(s)) {
        set.remove(&capability(name)?);
    }
    Ok(set)
}

/// The process arguments: CRI command replaces the image entrypoint, CRI args
/// replace the image cmd (the image cmd is dropped when a command is given).
pub fn process_args(
    container: &cri::ContainerConfig,
    image: Option<&ImageConfig>,
) -> Result<Vec<String>, SpecError> {
    let mut args = if container.command.is_empty() {
        image
            .and_then(|i| i.entrypoint().clone())
            .unwrap_or_default()
    } else {
        container.command.clone()
    };
    if !container.args.is_empty() {
        args.extend(container.args.iter().cloned());
    } else if container.command.is_empty() {
        args.extend(image.and_then(|i| i.cmd().clone()).unwrap_or_default());
    }
    if args.is_empty() {
        return Err(SpecError::NoCommand);
    }
    Ok(args)
}

/// Image env, then CRI envs (a later key replaces an earlier one in place).
fn environment(container: &cri::ContainerConfig, image: Option<&ImageConfig>) -> Vec<String> {
    let mut env: Vec<String> = image.and_then(|i| i.env().clone()).unwrap_or_default();
    for kv in &container.envs {
        let entry = format!("{}={}", kv.key, kv.value);
        match env
            .iter_mut()
            .find(|e| e.split_once('=').map(|(k, _)| k) == Some(kv.key.as_str()))
        {
            Some(slot) => *slot = entry,
            None => env.push(entry),
        }
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(
            0,
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
    }
    env
}

/// The container user, from the security context or else the image's USER.
pub fn user(
    sc: Option<&cri::LinuxContainerSecurityContext>,
    image: Option<&ImageConfig>,
    passwd: &str,
    group: &str,
) -> Result<passwd::ResolvedUser, SpecError> {
    let image_user = image.and_then(|i| i.user().clone()).unwrap_or_default();
    // As containerd: a group alone would silently mix with the image's user.
    if sc.is_some_and(|s| {
        s.run_as_group.is_some() && s.run_as_user.is_none() && s.run_as_username.is_empty()
    }) {
        return Err(SpecError::GroupWithoutUser);
    }
    // Strict: only the groups the pod spec names, none from the image's /etc/group;
    // its memberships are then not gathered at all, so their count cannot fail.
    let strict = sc.is_some_and(|s| {
        s.supplemental_groups_policy == cri::SupplementalGroupsPolicy::Strict as i32
    });
    let resolve = if strict {
        passwd::resolve_without_memberships
    } else {
        passwd::resolve
    };
    let mut resolved = match sc {
        Some(sc) if sc.run_as_user.is_some() => {
            let uid = sc.run_as_user.as_ref().map(|v| v.value).unwrap_or(0);
            resolve(&uid.to_string(), passwd, group)?
        }
        Some(sc) if !sc.run_as_username.is_empty() => resolve(&sc.run_as_username, passwd, group)?,
        _ => resolve(&image_user, passwd, group)?,
    };
    if let Some(sc) = sc {
        if let Some(g) = &sc.run_as_group {
            resolved.gid = g.value as u32;
        }
        let mut seen: HashSet<u32> = resolved.additional_gids.iter().copied().collect();
        for g in &sc.supplemental_groups {
            let g = *g as u32;
            if seen.insert(g) {
                resolved.additional_gids.push(g);
            }
        }
        if resolved.additional_gids.len() > passwd::NGROUPS_MAX {
            return Err(UserError::TooManyGroups {
                user: format!("uid {}", resolved.uid),
            }
            .into());
        }
    }
    Ok(resolved)
}

/// CRI resources → OCI resources (also used by UpdateContainerResources).
pub fn resources(r: &cri::LinuxContainerResources) -> LinuxResources {
    let mut out = LinuxResources::default();
    let mut cpu = LinuxCpu::default();
    if r.cpu_shares > 0 {
        cpu.set_shares(Some(r.cpu_shares as u64));
    }
    if r.cpu_quota > 0 {
        cpu.set_quota(Some(r.cpu_quota));
    }
    if r.cpu_period > 0 {
        cpu.set_period(Some(r.cpu_period as u64));
    }
    if !r.cpuset_cpus.is_empty() {
        cpu.set_cpus(Some(r.cpuset_cpus.clone()));
    }
    if !r.cpuset_mems.is_empty() {
        cpu.set_mems(Some(r.cpuset_mems.clone()));
    }
    out.set_cpu(Some(cpu));
    let mut mem = LinuxMemory::default();
    if r.memory_limit_in_bytes > 0 {
        mem.set_limit(Some(r.memory_limit_in_bytes));
        // Guests have no swap; an equal swap limit keeps cgroup v2 from adding any.
        let swap = if r.memory_swap_limit_in_bytes > 0 {
            r.memory_swap_limit_in_bytes
        } else {
            r.memory_limit_in_bytes
        };
        mem.set_swap(Some(swap));
    }
    out.set_memory(Some(mem));
    if !r.unified.is_empty() {
        out.set_unified(Some(r.unified.clone()));
    }
    out
}

fn bind(m: &GuestMount) -> Mount {
    let mut mount = Mount::default();
    mount.set_destination(m.destination.clone().into());
    mount.set_typ(Some("bind".into()));
    mount.set_source(Some(m.source.clone().into()));
    let mode = if m.readonly { "ro" } else { "rw" };
    mount.set_options(Some(vec!["rbind".into(), "rprivate".into(), mode.into()]));
    mount
}

fn seccomp_runtime_default() -> Result<LinuxSeccomp, SpecError> {
    let json = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{
            "names": RUNTIME_DEFAULT_DENY,
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": libc::EPERM,
        }],
    });
    serde_json::from_value(json).map_err(|e| SpecError::Seccomp(e.to_string()))
}

fn seccomp(
    sc: Option<&cri::LinuxContainerSecurityContext>,
    localhost: Option<&str>,
) -> Result<Option<LinuxSeccomp>, SpecError> {
    let Some(profile) = sc.and_then(|sc| sc.seccomp.as_ref()) else {
        return Ok(None);
    };
    use cri::security_profile::ProfileType;
    match ProfileType::try_from(profile.profile_type) {
        Ok(ProfileType::RuntimeDefault) => Ok(Some(seccomp_runtime_default()?)),
        Ok(ProfileType::Unconfined) => Ok(None),
        Ok(ProfileType::Localhost) => {
            let text = localhost.ok_or_else(|| {
                SpecError::Seccomp(format!(
                    "localhost profile {} was not read",
                    profile.localhost_ref
                ))
            })?;
            serde_json::from_str(text)
                .map(Some)
                .map_err(|e| SpecError::Seccomp(format!("{}: {e}", profile.localhost_ref)))
        }
        Err(_) => Err(SpecError::Seccomp(format!(
            "unknown profile type {}",
            profile.profile_type
        ))),
    }
}

/// Builds the OCI spec of one container.
pub fn build(input: &SpecInput<'_>) -> Result<Spec, SpecError> {
    let c = input.container;
    let lc = c.linux.as_ref();
    let sc = lc.and_then(|l| l.security_context.as_ref());
    let privileged = sc.is_some_and(|s| s.privileged);
    let pod_sc = input
        .pod
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref());

    let mut spec = Spec::default();

    // Process.
    let mut process = Process::default();
    process.set_args(Some(process_args(c, input.image)?));
    let mut env = environment(c, input.image);
    let resolved = user(sc, input.image, input.passwd, input.group)?;
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!(
            "HOME={}",
            resolved.home.clone().unwrap_or_else(|| "/".into())
        ));
    }
    process.set_env(Some(env));
    let cwd = if !c.working_dir.is_empty() {
        c.working_dir.clone()
    } else {
        input
            .image
            .and_then(|i| i.working_dir().clone())
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into())
    };
    process.set_cwd(cwd.into());
    let mut u = User::default();
    u.set_uid(resolved.uid);
    u.set_gid(resolved.gid);
    if !resolved.additional_gids.is_empty() {
        u.set_additional_gids(Some(resolved.additional_gids.clone()));
    }
    process.set_user(u);
    process.set_terminal(Some(c.tty));
    // Absent rather than false when not asked for: libcontainer loads the seccomp
    // filter after dropping capabilities whenever the field is set, which needs
    // no_new_privs; absent, it loads it before the drop (as runc does).
    process.set_no_new_privileges(sc.is_some_and(|s| s.no_new_privs).then_some(true));
    let caps = capabilities(privileged, sc.and_then(|s| s.capabilities.as_ref()))?;
    let mut lcaps = LinuxCapabilities::default();
    lcaps.set_bounding(Some(caps.clone()));
    lcaps.set_effective(Some(caps.clone()));
    lcaps.set_permitted(Some(caps));
    lcaps.set_inheritable(None);
    lcaps.set_ambient(None);
    process.set_capabilities(Some(lcaps));
    if let Some(r) = lc.and_then(|l| l.resources.as_ref()) {
        if r.oom_score_adj != 0 {
            process.set_oom_score_adj(Some(r.oom_score_adj as i32));
        }
    }
    spec.set_process(Some(process));

    // Root and hostname.
    let mut root = Root::default();
    root.set_path("rootfs".into());
    root.set_readonly(Some(sc.is_some_and(|s| s.readonly_rootfs)));
    spec.set_root(Some(root));
    spec.set_hostname(Some(crate::hostname::pod_hostname(input.pod)));

    // Mounts: defaults, cgroupfs, then pod files, then CRI mounts (last wins).
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    if privileged {
        for m in mounts.iter_mut() {
            if m.destination().to_str() == Some("/sys") {
                m.set_options(Some(vec!["nosuid".into(), "noexec".into(), "nodev".into()]));
            }
        }
    }
    let mut cgroup = Mount::default();
    cgroup.set_destination("/sys/fs/cgroup".into());
    cgroup.set_typ(Some("cgroup".into()));
    cgroup.set_source(Some("cgroup".into()));
    let cg_mode = if privileged { "rw" } else { "ro" };
    cgroup.set_options(Some(vec![
        "nosuid".into(),
        "noexec".into(),
        "nodev".into(),
        "relatime".into(),
        cg_mode.into(),
    ]));
    mounts.push(cgroup);
    let taken: HashSet<&str> = input
        .mounts
        .iter()
        .map(|m| m.destination.as_str())
        .collect();
    for f in input
        .pod_files
        .iter()
        .filter(|f| !taken.contains(f.destination.as_str()))
    {
        mounts.push(bind(f));
    }
    for m in &input.mounts {
        mounts.retain(|x| x.destination().to_str() != Some(m.destination.as_str()));
        mounts.push(bind(m));
    }
    spec.set_mounts(Some(mounts));

    // Linux.
    let mut linux = spec.linux().clone().unwrap_or_default();
    let mut res = lc
        .and_then(|l| l.resources.as_ref())
        .map(resources)
        .unwrap_or_default();
    if privileged {
        let mut all = LinuxDeviceCgroup::default();
        all.set_allow(true);
        all.set_access(Some("rwm".into()));
        res.set_devices(Some(vec![all]));
    }
    linux.set_resources(Some(res));
    if privileged {
        linux.set_masked_paths(None);
        linux.set_readonly_paths(None);
    } else if let Some(sc) = sc {
        if !sc.masked_paths.is_empty() {
            linux.set_masked_paths(Some(sc.masked_paths.clone()));
        }
        if !sc.readonly_paths.is_empty() {
            linux.set_readonly_paths(Some(sc.readonly_paths.clone()));
        }
    }
    if !privileged {
        linux.set_seccomp(seccomp(sc, input.localhost_seccomp.as_deref())?);
    }
    let sysctls: HashMap<String, String> = input
        .pod
        .linux
        .as_ref()
        .map(|l| l.sysctls.clone().into_iter().collect())
        .unwrap_or_default();
    if !sysctls.is_empty() {
        linux.set_sysctl(Some(sysctls));
    }
    // NODE namespaces mean the VM's own: the container does not get a new one.
    // POD IPC (the default) is the VM's too: the VM is the pod, and joining another
    // container's namespace would fail once that container exited.
    let ns_opts = sc
        .and_then(|s| s.namespace_options.as_ref())
        .or_else(|| pod_sc.and_then(|s| s.namespace_options.as_ref()));
    let (node, pod) = (
        cri::NamespaceMode::Node as i32,
        cri::NamespaceMode::Pod as i32,
    );
    let (pid_mode, ipc_mode) = ns_opts.map_or((pod, pod), |o| (o.pid, o.ipc));
    let ipc_shared = ipc_mode == node || ipc_mode == pod;
    let mut namespaces = linux.namespaces().clone().unwrap_or_default();
    namespaces.retain(|n| {
        !(n.typ() == LinuxNamespaceType::Pid && pid_mode == node
            || n.typ() == LinuxNamespaceType::Ipc && ipc_shared)
    });
    // The pod's one user namespace: the agent creates it (with the pod's PID and
    // IPC namespaces inside it) from these mappings, and joins every container to it.
    if let Some(u) = input.userns {
        let mut user = LinuxNamespace::default();
        user.set_typ(LinuxNamespaceType::User);
        namespaces.push(user);
        linux.set_uid_mappings(Some(vec![userns::oci_mapping(u.uids)?]));
        linux.set_gid_mappings(Some(vec![userns::oci_mapping(u.gids)?]));
    }
    linux.set_namespaces(Some(namespaces));
    spec.set_linux(Some(linux));

    let mut annotations: HashMap<String, String> = c.annotations.clone().into_iter().collect();
    annotations.insert(
        "io.kubernetes.cri.container-type".into(),
        "container".into(),
    );
    spec.set_annotations(Some(annotations));
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::image::ConfigBuilder;

    fn image() -> ImageConfig {
        ConfigBuilder::default()
            .entrypoint(vec!["/entry".to_string()])
            .cmd(vec!["serve".to_string(), "--port=80".to_string()])
            .env(vec!["PATH=/bin".to_string(), "A=image".to_string()])
            .working_dir("/srv".to_string())
            .user("app".to_string())
            .build()
            .unwrap()
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nextra:x:7:app\n";

    fn pod() -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "web".into(),
                ..Default::default()
            }),
            linux: Some(cri::LinuxPodSandboxConfig {
                sysctls: [("net.ipv4.ip_forward".to_string(), "1".to_string())].into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn build_with(c: &cri::ContainerConfig, img: Option<&ImageConfig>) -> Result<Spec, SpecError> {
        let pod = pod();
        build(&SpecInput {
            container: c,
            pod: &pod,
            image: img,
            passwd: PASSWD,
            group: GROUP,
            mounts: vec![GuestMount {
                destination: "/data".into(),
                source: "/run/vessel/share/v/data".into(),
                readonly: true,
            }],
            pod_files: vec![
                GuestMount {
                    destination: "/etc/hosts".into(),
                    source: "/run/vessel/share/hosts".into(),
                    readonly: false,
                },
                GuestMount {
                    destination: "/data".into(),
                    source: "/elsewhere".into(),
                    readonly: false,
                },
            ],
            localhost_seccomp: None,
            userns: None,
        })
    }

    fn sc(c: &mut cri::ContainerConfig) -> &mut cri::LinuxContainerSecurityContext {
        c.linux
            .get_or_insert_with(Default::default)
            .security_context
            .get_or_insert_with(Default::default)
    }

    #[test]
    fn image_defaults_and_overrides() {
        let img = image();
        let mut c = cri::ContainerConfig::default();
        let spec = build_with(&c, Some(&img)).unwrap();
        let p = spec.process().as_ref().unwrap();
        assert_eq!(
            p.args().as_ref().unwrap(),
            &["/entry", "serve", "--port=80"]
        );
        // Unset, not false: see the seccomp ordering note in `build`.
        assert_eq!(p.no_new_privileges(), None);
        assert_eq!(p.cwd().to_str(), Some("/srv"));
        assert_eq!((p.user().uid(), p.user().gid()), (1000, 1000));
        assert_eq!(p.user().additional_gids().as_ref().unwrap(), &[7]);
        let env = p.env().as_ref().unwrap();
        assert!(env.contains(&"HOME=/home/app".to_string()), "{env:?}");
        assert_eq!(spec.hostname().as_deref(), Some("web"));

        // args alone replace the cmd; command replaces entrypoint and drops cmd.
        c.args = vec!["other".into()];
        let spec = build_with(&c, Some(&img)).unwrap();
        assert_eq!(
            spec.process().as_ref().unwrap().args().as_ref().unwrap(),
            &["/entry", "other"]
        );
        c.args.clear();
        c.command = vec!["sh".into()];
        let spec = build_with(&c, Some(&img)).unwrap();
        assert_eq!(
            spec.process().as_ref().unwrap().args().as_ref().unwrap(),
            &["sh"]
        );

        c.envs = vec![
            cri::KeyValue {
                key: "A".into(),
                value: "cri".into(),
            },
            cri::KeyValue {
                key: "B".into(),
                value: "x=y".into(),
            },
        ];
        c.working_dir = "/w".into();
        let spec = build_with(&c, Some(&img)).unwrap();
        let p = spec.process().as_ref().unwrap();
        let env = p.env().as_ref().unwrap();
        assert_eq!(&env[..3], &["PATH=/bin", "A=cri", "B=x=y"]);
        assert_eq!(p.cwd().to_str(), Some("/w"));

        assert!(matches!(
            build_with(&cri::ContainerConfig::default(), None),
            Err(SpecError::NoCommand)
        ));
    }

    #[test]
    fn users_and_groups() {
        let img = image();
        let mut c = cri::ContainerConfig {
            command: vec!["x".into()],
            ..Default::default()
        };
        sc(&mut c).run_as_user = Some(cri::Int64Value { value: 0 });
        sc(&mut c).supplemental_groups = vec![42];
        let p = build_with(&c, Some(&img))
            .unwrap()
            .process()
            .clone()
            .unwrap();
        assert_eq!((p.user().uid(), p.user().gid()), (0, 0));
        assert_eq!(p.user().additional_gids().as_ref().unwrap(), &[42]);
        sc(&mut c).run_as_user = None;
        sc(&mut c).run_as_username = "app".into();
        sc(&mut c).run_as_group = Some(cri::Int64Value { value: 5 });
        let p = build_with(&c, Some(&img))
            .unwrap()
            .process()
            .clone()
            .unwrap();
        assert_eq!((p.user().uid(), p.user().gid()), (1000, 5));
        // Merge (the default) adds the image's memberships; Strict only what is named.
        sc(&mut c).run_as_group = None;
        let groups = |c: &cri::ContainerConfig| {
            let spec = build_with(c, Some(&img)).unwrap();
            spec.process()
                .as_ref()
                .unwrap()
                .user()
                .additional_gids()
                .clone()
        };
        assert_eq!(groups(&c), Some(vec![7, 42]));
        sc(&mut c).supplemental_groups_policy = cri::SupplementalGroupsPolicy::Strict as i32;
        assert_eq!(groups(&c), Some(vec![42]));
        sc(&mut c).supplemental_groups.clear();
        assert_eq!(groups(&c), None);
        sc(&mut c).supplemental_groups_policy = 0;
        sc(&mut c).run_as_group = Some(cri::Int64Value { value: 5 });
        sc(&mut c).run_as_username = "ghost".into();
        assert!(matches!(
            build_with(&c, Some(&img)),
            Err(SpecError::User(_))
        ));
        sc(&mut c).run_as_username = String::new();
        assert!(matches!(
            build_with(&c, Some(&img)),
            Err(SpecError::GroupWithoutUser)
        ));
        sc(&mut c).run_as_username = "ghost".into();
        // Image user by name, no passwd entry: error.
        let c = cri::ContainerConfig {
            command: vec!["x".into()],
            ..Default::default()
        };
        let pod = pod();
        let e = build(&SpecInput {
            container: &c,
            pod: &pod,
            image: Some(&img),
            passwd: "",
            group: "",
            mounts: vec![],
            pod_files: vec![],
            localhost_seccomp: None,
            userns: None,
        });
        assert!(matches!(e, Err(SpecError::User(_))));
    }

    #[test]
    fn image_groups_past_the_kernel_limit() {
        let img = image();
        let many = |n: usize| -> String {
            (0..n)
                .map(|i| format!("g{i}:x:{}:app\n", 10_000 + i))
                .collect()
        };
        let group = many(200_000);
        // Merge (the default): refused, as a user error (InvalidArgument).
        let e = user(None, Some(&img), PASSWD, &group).unwrap_err();
        assert!(
            matches!(e, SpecError::User(UserError::TooManyGroups { .. })),
            "{e}"
        );
        // Strict: the image's memberships are not read, so it runs.
        let strict = cri::LinuxContainerSecurityContext {
            supplemental_groups_policy: cri::SupplementalGroupsPolicy::Strict as i32,
            supplemental_groups: vec![42],
            ..Default::default()
        };
        let r = user(Some(&strict), Some(&img), PASSWD, &group).unwrap();
        assert_eq!((r.uid, r.gid, r.additional_gids), (1000, 1000, vec![42]));
        // The image at the limit plus one named group crosses it.
        let merge = cri::LinuxContainerSecurityContext {
            supplemental_groups: vec![42],
            ..Default::default()
        };
        let group = many(passwd::NGROUPS_MAX);
        assert!(user(None, Some(&img), PASSWD, &group).is_ok());
        assert!(matches!(
            user(Some(&merge), Some(&img), PASSWD, &group),
            Err(SpecError::User(UserError::TooManyGroups { .. }))
        ));
    }

    #[test]
    fn mounts_and_security() {
        let mut c = cri::ContainerConfig {
            command: vec!["x".into()],
            tty: true,
            ..Default::default()
        };
        {
            let s = sc(&mut c);
            s.readonly_rootfs = true;
            s.no_new_privs = true;
            s.capabilities = Some(cri::Capability {
                add_capabilities: vec!["NET_ADMIN".into(), "CAP_SYS_TIME".into()],
                drop_capabilities: vec!["KILL".into()],
                ..Default::default()
            });
            s.masked_paths = vec!["/proc/kcore".into()];
            s.seccomp = Some(cri::SecurityProfile {
                profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
                localhost_ref: String::new(),
            });
        }
        c.linux.as_mut().unwrap().resources = Some(cri::LinuxContainerResources {
            cpu_shares: 512,
            cpu_quota: 50_000,
            cpu_period: 100_000,
            memory_limit_in_bytes: 64 << 20,
            oom_score_adj: 500,
            ..Default::default()
        });
        let spec = build_with(&c, None).unwrap();
        let p = spec.process().as_ref().unwrap();
        assert_eq!(p.terminal(), Some(true));
        assert_eq!(p.no_new_privileges(), Some(true));
        assert_eq!(p.oom_score_adj(), Some(500));
        let caps = p
            .capabilities()
            .as_ref()
            .unwrap()
            .bounding()
            .clone()
            .unwrap();
        assert!(caps.contains(&Capability::NetAdmin));
        assert!(caps.contains(&Capability::SysTime));
        assert!(caps.contains(&Capability::Chown));
        assert!(!caps.contains(&Capability::Kill));
        assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(true));

        let mounts = spec.mounts().as_ref().unwrap();
        let data: Vec<_> = mounts
            .iter()
            .filter(|m| m.destination().to_str() == Some("/data"))
            .collect();
        assert_eq!(data.len(), 1, "the CRI mount wins over a pod file");
        assert_eq!(
            data[0].source().as_ref().unwrap().to_str(),
            Some("/run/vessel/share/v/data")
        );
        assert!(data[0].options().as_ref().unwrap().contains(&"ro".into()));
        assert!(mounts
            .iter()
            .any(|m| m.destination().to_str() == Some("/etc/hosts")));

        let linux = spec.linux().as_ref().unwrap();
        assert_eq!(linux.masked_paths().as_ref().unwrap(), &["/proc/kcore"]);
        let seccomp = linux.seccomp().as_ref().unwrap();
        let denied = seccomp.syscalls().as_ref().unwrap()[0].names().clone();
        assert!(denied.contains(&"kexec_load".to_string()));
        assert_eq!(linux.sysctl().as_ref().unwrap()["net.ipv4.ip_forward"], "1");
        let r = linux.resources().as_ref().unwrap();
        let cpu = r.cpu().as_ref().unwrap();
        assert_eq!(
            (cpu.shares(), cpu.quota(), cpu.period()),
            (Some(512), Some(50_000), Some(100_000))
        );
        assert_eq!(r.memory().as_ref().unwrap().limit(), Some(64 << 20));

        let mut bad = c.clone();
        sc(&mut bad).capabilities = Some(cri::Capability {
            add_capabilities: vec!["FLY".into()],
            ..Default::default()
        });
        assert!(matches!(
            build_with(&bad, None),
            Err(SpecError::Capability(_))
        ));
    }

    #[test]
    fn privileged_and_unconfined() {
        let mut c = cri::ContainerConfig {
            command: vec!["x".into()],
            ..Default::default()
        };
        sc(&mut c).privileged = true;
        let spec = build_with(&c, None).unwrap();
        let caps = spec
            .process()
            .as_ref()
            .unwrap()
            .capabilities()
            .as_ref()
            .unwrap()
            .bounding()
            .clone()
            .unwrap();
        assert_eq!(caps.len(), ALL_CAPS.len(), "every name parses");
        let linux = spec.linux().as_ref().unwrap();
        assert!(linux.masked_paths().is_none() && linux.seccomp().is_none());

        let mut c = cri::ContainerConfig {
            command: vec!["x".into()],
            ..Default::default()
        };
        sc(&mut c).seccomp = Some(cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::Unconfined as i32,
            localhost_ref: String::new(),
        });
        sc(&mut c).namespace_options = Some(cri::NamespaceOption {
            pid: cri::NamespaceMode::Node as i32,
            ..Default::default()
        });
        let spec = build_with(&c, None).unwrap();
        let linux = spec.linux().as_ref().unwrap();
        assert!(linux.seccomp().is_none());
        assert!(linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .all(|n| n.typ() != LinuxNamespaceType::Pid));
    }

    #[test]
    fn pod_ipc_is_the_vms_and_container_ipc_is_new() {
        let has_ipc = |c: &cri::ContainerConfig| {
            let spec = build_with(c, None).unwrap();
            let linux = spec.linux().as_ref().unwrap();
            linux
                .namespaces()
                .as_ref()
                .unwrap()
                .iter()
                .any(|n| n.typ() == LinuxNamespaceType::Ipc)
        };
        let mut c = cri::ContainerConfig {
            command: vec!["x".into()],
            ..Default::default()
        };
        assert!(!has_ipc(&c), "no namespace options: POD");
        sc(&mut c).namespace_options = Some(cri::NamespaceOption {
            ipc: cri::NamespaceMode::Container as i32,
            ..Default::default()
        });
        assert!(has_ipc(&c));
    }

    #[test]
    fn pod_user_namespace_and_mappings() {
        let c = cri::ContainerConfig {
            command: vec!["x".into()],
            ..Default::default()
        };
        let pod = pod();
        let range = |host_id| crate::userns::IdRange {
            container_id: 0,
            host_id,
            length: 65536,
        };
        let spec = build(&SpecInput {
            container: &c,
            pod: &pod,
            image: None,
            passwd: "",
            group: "",
            mounts: vec![],
            pod_files: vec![],
            localhost_seccomp: None,
            userns: Some(PodUserns {
                uids: range(1000),
                gids: range(2000),
            }),
        })
        .unwrap();
        let linux = spec.linux().as_ref().unwrap();
        let user: Vec<_> = linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .filter(|n| n.typ() == LinuxNamespaceType::User)
            .collect();
        assert_eq!(user.len(), 1);
        assert!(user[0].path().is_none());
        let uid = &linux.uid_mappings().as_ref().unwrap()[..];
        let gid = &linux.gid_mappings().as_ref().unwrap()[..];
        assert_eq!((uid[0].host_id(), uid[0].size()), (1000, 65536));
        assert_eq!((gid[0].host_id(), gid[0].container_id()), (2000, 0));
        // Without: no user namespace, no mappings.
        let plain = build_with(&c, None).unwrap();
        let linux = plain.linux().as_ref().unwrap();
        assert!(linux.uid_mappings().is_none());
        assert!(linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .all(|n| n.typ() != LinuxNamespaceType::User));
    }

    #[test]
    fn localhost_seccomp_is_parsed() {
        let mut c = cri::ContainerConfig {
            command: vec!["x".into()],
            ..Default::default()
        };
        sc(&mut c).seccomp = Some(cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::Localhost as i32,
            localhost_ref: "/p.json".into(),
        });
        let pod = pod();
        let input = |text: Option<&str>| SpecInput {
            container: &c,
            pod: &pod,
            image: None,
            passwd: "",
            group: "",
            mounts: vec![],
            pod_files: vec![],
            localhost_seccomp: text.map(str::to_owned),
            userns: None,
        };
        let spec = build(&input(Some(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["read"],"action":"SCMP_ACT_ALLOW"}]}"#,
        )))
        .unwrap();
        assert!(spec.linux().as_ref().unwrap().seccomp().is_some());
        assert!(matches!(
            build(&input(Some("{nope"))),
            Err(SpecError::Seccomp(_))
        ));
    }
}
