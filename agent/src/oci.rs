//! Containers are run with youki's `libcontainer` (namespaces, pivot_root, mounts,
//! cgroups v2, capabilities, seccomp, rlimits, masked paths, sysctls, users).
//!
//! libcontainer forks with raw clone(2), which is only safe from a single-threaded
//! process, while the agent runs a multi-threaded tokio runtime. So each libcontainer
//! operation runs in a short-lived helper: the agent re-executes itself as
//! `vessel-agent __oci <op> ...`. Container processes are created as siblings of the
//! helper (children of the agent), so the agent's reaper sees their exits. The
//! container's stdio arrives at the helper as fds 3, 4, 5 (see `STDIO_FDS`).

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{
    Executor, ExecutorError, ExecutorSetEnvsError, ExecutorValidationError,
};
use oci_spec::runtime::{LinuxSeccomp, Spec};

/// libcontainer's state directory in the guest.
pub const STATE_ROOT: &str = "/run/vessel/oci";
/// The argv[1] that selects helper mode.
pub const HELPER_ARG: &str = "__oci";
/// fds at which the helper receives the container's stdin, stdout, stderr.
pub const STDIO_FDS: [i32; 3] = [3, 4, 5];

/// Gives this process (and so the containers and execs it creates) the default
/// disposition of every signal and an empty signal mask, as runc's children get.
/// The Rust runtime ignores SIGPIPE at start, and an ignored signal stays ignored
/// across fork and exec: without this every container ran with SIGPIPE ignored.
fn default_signals() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow};
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for sig in nix::sys::signal::Signal::iterator() {
        if matches!(
            sig,
            nix::sys::signal::Signal::SIGKILL | nix::sys::signal::Signal::SIGSTOP
        ) {
            continue;
        }
        // SAFETY: installs SIG_DFL, not a handler; nothing runs on delivery.
        let _ = unsafe { sigaction(sig, &default) };
    }
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

/// Entry of helper mode. Returns the process exit code.
pub fn helper_main(args: &[String]) -> i32 {
    default_signals();
    // libcontainer reports the failing step through `tracing`; the agent puts the
    // helper's stderr into the RPC error.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
        .with_ansi(false)
        .without_time()
        .init();
    match run(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{e:#}");
            1
        }
    }
}

fn opt(s: Option<&String>) -> Option<PathBuf> {
    s.filter(|s| !s.is_empty()).map(PathBuf::from)
}

/// Takes fds 3..5 if the agent passed them (it passes all three or none).
fn stdio_fds(builder: ContainerBuilder, with_stdio: bool) -> ContainerBuilder {
    if !with_stdio {
        return builder;
    }
    // SAFETY: the agent set up fds 3, 4, 5 for this process (`with_stdio`); nothing
    // else in this process owns them.
    let [i, o, e] = STDIO_FDS.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
    builder.with_stdin(i).with_stdout(o).with_stderr(e)
}

/// The spec a container was created with.
fn container_spec(id: &str) -> anyhow::Result<Spec> {
    let c = Container::load(PathBuf::from(STATE_ROOT).join(id))?;
    Ok(Spec::load(c.bundle().join("config.json"))?)
}

/// The path of the user namespace a container joined (the pod's), if any.
fn container_userns(spec: &Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::User)?
        .path()
        .clone()
}

/// The exec'd process loads its filter in `SeccompExecutor`, after libcontainer's
/// capability drop. Without `noNewPrivileges` that needs CAP_SYS_ADMIN, so it is
/// kept in the effective and permitted sets only (a copy of the process file is
/// written next to it). execve(2) then recomputes the sets from bounding and
/// inheritable, which are untouched, so the program never holds it unless the
/// container grants it anyway.
fn process_able_to_load_seccomp(path: &std::path::Path) -> anyhow::Result<PathBuf> {
    let mut p: oci_spec::runtime::Process = serde_json::from_slice(&std::fs::read(path)?)?;
    if p.no_new_privileges() == Some(true) {
        return Ok(path.to_owned());
    }
    // No capabilities section: libcontainer drops nothing, CAP_SYS_ADMIN stays.
    let Some(mut caps) = p.capabilities().clone() else {
        return Ok(path.to_owned());
    };
    let add = |set: Option<&oci_spec::runtime::Capabilities>| {
        let mut set = set.cloned().unwrap_or_default();
        set.insert(oci_spec::runtime::Capability::SysAdmin);
        Some(set)
    };
    caps.set_effective(add(caps.effective().as_ref()));
    caps.set_permitted(add(caps.permitted().as_ref()));
    p.set_capabilities(Some(caps));
    let out = path.with_extension("seccomp.json");
    std::fs::write(&out, serde_json::to_vec(&p)?)?;
    Ok(out)
}

/// Runs the workload like the default executor, after loading the container's
/// seccomp filter. libcontainer's tenant (exec) path builds the process's
/// `linux` section without `seccomp`, but an OCI runtime must apply the container's
/// filter to exec'd processes too (runc does). The executor runs last, as close to
/// the program's execve as libcontainer's own late load.
/// In a pod with a user namespace it first joins that (see `execuserns`).
#[derive(Clone)]
struct SeccompExecutor {
    seccomp: Option<LinuxSeccomp>,
    userns: Option<crate::execuserns::Entry>,
}

impl Executor for SeccompExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        if let Some(u) = &self.userns {
            u.enter().map_err(ExecutorError::Other)?;
        }
        if let Some(seccomp) = &self.seccomp {
            if libcontainer::seccomp::is_notify(seccomp) {
                // A notify fd needs a listener handshake only init processes get.
                return Err(ExecutorError::Other(
                    "seccomp notify actions are not supported for exec".into(),
                ));
            }
            libcontainer::seccomp::initialize_seccomp(seccomp)
                .map_err(|e| ExecutorError::Other(format!("seccomp: {e}")))?;
        }
        if let Some(u) = &self.userns {
            u.drop_capabilities().map_err(ExecutorError::Other)?;
        }
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }

    fn setup_envs(
        &self,
        envs: std::collections::HashMap<String, String>,
    ) -> Result<(), ExecutorSetEnvsError> {
        DefaultExecutor {}.setup_envs(envs)
    }
}

fn run(args: &[String]) -> anyhow::Result<()> {
    let op = args.first().map(String::as_str).unwrap_or("");
    let id = args.get(1).cloned().unwrap_or_default();
    std::fs::create_dir_all(STATE_ROOT)?;
    match op {
        // create <id> <bundle> <pid_file> <console_socket|""> <stdio: 0|1>
        "create" => {
            let bundle = opt(args.get(2)).ok_or_else(|| anyhow::anyhow!("no bundle"))?;
            let b = ContainerBuilder::new(id, SyscallType::default())
                .with_root_path(STATE_ROOT)?
                .with_pid_file(opt(args.get(3)))?
                .with_console_socket(opt(args.get(4)));
            let b = stdio_fds(b, args.get(5).map(String::as_str) == Some("1"));
            b.validate_id()?
                .as_init(bundle)
                .with_systemd(false)
                .with_detach(true)
                .as_sibling(true)
                .build()?;
        }
        // start <id>
        "start" => {
            let mut c = Container::load(PathBuf::from(STATE_ROOT).join(&id))?;
            c.start()?;
        }
        // exec <id> <process.json> <pid_file> <console_socket|""> <stdio: 0|1>
        "exec" => {
            let process = opt(args.get(2)).ok_or_else(|| anyhow::anyhow!("no process"))?;
            let spec = container_spec(&id)?;
            let seccomp = spec.linux().as_ref().and_then(|l| l.seccomp().clone());
            // Held open until the exec is built: its number is the executor's.
            let mut _userns_fd = None;
            let (process, userns) = match container_userns(&spec) {
                Some(ns) => {
                    let (fd, process, entry) = crate::execuserns::prepare(&ns, &process)?;
                    _userns_fd = Some(fd);
                    (process, Some(entry))
                }
                None if seccomp.is_some() => (process_able_to_load_seccomp(&process)?, None),
                None => (process, None),
            };
            let b = ContainerBuilder::new(id, SyscallType::default())
                .with_root_path(STATE_ROOT)?
                .with_pid_file(opt(args.get(3)))?
                .with_console_socket(opt(args.get(4)));
            let b = stdio_fds(b, args.get(5).map(String::as_str) == Some("1"));
            b.with_executor(SeccompExecutor { seccomp, userns })
                .as_tenant()
                .with_process(Some(process))
                .with_detach(true)
                .as_sibling(true)
                .build()?;
        }
        // delete <id>
        "delete" => {
            let dir = PathBuf::from(STATE_ROOT).join(&id);
            if dir.exists() {
                let mut c = Container::load(dir)?;
                c.delete(true)?;
            }
        }
        other => anyhow::bail!("unknown helper op {other:?}"),
    }
    Ok(())
}
