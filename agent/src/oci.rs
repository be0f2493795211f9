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

/// libcontainer's state directory in the guest.
pub const STATE_ROOT: &str = "/run/vessel/oci";
/// The argv[1] that selects helper mode.
pub const HELPER_ARG: &str = "__oci";
/// fds at which the helper receives the container's stdin, stdout, stderr.
pub const STDIO_FDS: [i32; 3] = [3, 4, 5];

/// Entry of helper mode. Returns the process exit code.
pub fn helper_main(args: &[String]) -> i32 {
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
            let b = ContainerBuilder::new(id, SyscallType::default())
                .with_root_path(STATE_ROOT)?
                .with_pid_file(opt(args.get(3)))?
                .with_console_socket(opt(args.get(4)));
            let b = stdio_fds(b, args.get(5).map(String::as_str) == Some("1"));
            b.as_tenant()
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
