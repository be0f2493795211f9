//! The pod's own PID namespace init, for containers that share the pod's PID
//! namespace (CRI `pid: POD`), as the pause container is with runc: PID 1 of that
//! namespace is this small reaper, not the first container, so `/proc/1` is not a
//! workload and a container's exit never takes the others with it.
//!
//! The agent runs itself as `vessel-agent __podinit` in a fresh PID namespace
//! (`unshare` before exec: the namespace is for its children); that process forks
//! the init, prints its pid and exits. The init, orphaned, belongs to the agent (the
//! guest's PID 1), lives as long as the VM, and reaps what is orphaned in its
//! namespace.
//!
//! A pod with a user namespace (CRI userns mode POD) gets it here too: the init is
//! started in a new user namespace along with its PID and IPC namespaces, so those
//! are owned by the pod's user namespace. Containers join the user namespace first
//! and can then join (and mount /proc, /dev/mqueue for) namespaces it owns; the
//! VM's own PID and IPC namespaces are out of their reach. The agent writes the
//! maps from outside, as the privileged parent: no `setgroups` deny is needed.

use std::io::Read as _;
use std::sync::Mutex;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use crate::containers::Error;
use crate::reaper::Reaper;
use crate::spec::IdMaps;

/// The argv[1] that selects pod-init mode.
pub const PODINIT_ARG: &str = "__podinit";

/// The running pod init.
struct PodInit {
    /// Its pid in the agent's namespace.
    pid: i32,
    /// The maps of the user namespace it holds (`None`: the VM's own).
    userns: Option<IdMaps>,
}

/// The init, once started.
static POD_INIT: Mutex<Option<PodInit>> = Mutex::new(None);

/// Entry of `__podinit` mode (single-threaded: nothing else runs yet). Forks the
/// init, prints its pid, and returns the exit code.
pub fn main() -> i32 {
    // SAFETY: this process has one thread (no runtime started in this mode), so
    // the child may run arbitrary code.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { child }) => {
            println!("{child}");
            0
        }
        Ok(ForkResult::Child) => {
            // The agent reads the pid until EOF: the init must not hold the pipe.
            for fd in 0..3 {
                let _ = nix::unistd::close(fd);
            }
            reap_forever()
        }
        Err(e) => {
            eprintln!("fork: {e}");
            1
        }
    }
}

/// PID 1 of the pod namespace: reaps every child, forever. SIGCHLD is blocked and
/// waited for, so a zombie is reaped as soon as it appears; every other signal
/// from outside is dropped by the kernel (no handler), so a stray TERM cannot end
/// the pod's namespace.
fn reap_forever() -> ! {
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    let _ = chld.thread_block();
    loop {
        while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            if status == WaitStatus::StillAlive {
                break;
            }
        }
        let _ = chld.wait();
    }
}

/// The pod init's pid, started on first use, in a new user namespace with these
/// maps when `userns` is given. Fails if it cannot be started, or if it runs with
/// other user namespace settings (every container of a pod shares one).
pub async fn ensure(reaper: &Reaper, userns: Option<&IdMaps>) -> Result<i32, Error> {
    if let Some(init) = &*POD_INIT.lock().unwrap_or_else(|p| p.into_inner()) {
        if std::path::Path::new(&format!("/proc/{}", init.pid)).exists() {
            if init.userns.as_ref() != userns {
                return Err(Error::InvalidArgument(
                    "the pod's user namespace is already set up with other settings; \
                     every container of a pod must carry the pod's user namespace options"
                        .into(),
                ));
            }
            return Ok(init.pid);
        }
    }
    let pid = start(reaper, userns.is_some()).await?;
    if let Some(maps) = userns {
        if let Err(e) = write_maps(pid, maps) {
            // A holder without maps is useless (its ids are unmapped): end it.
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            return Err(e);
        }
    }
    *POD_INIT.lock().unwrap_or_else(|p| p.into_inner()) = Some(PodInit {
        pid,
        userns: userns.cloned(),
    });
    Ok(pid)
}

/// Starts the init (see the module doc) and returns its pid.
async fn start(reaper: &Reaper, new_userns: bool) -> Result<i32, Error> {
    use nix::sched::CloneFlags;
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg(PODINIT_ARG)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    // One unshare: the kernel makes the user namespace first, so the PID and IPC
    // namespaces made with it are owned by it.
    let flags = if new_userns {
        CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWIPC
    } else {
        CloneFlags::CLONE_NEWPID
    };
    // SAFETY: unshare(2) is async-signal-safe and touches no memory of ours.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            nix::sched::unshare(flags).map_err(std::io::Error::from)
        });
    }
    let (mut child, exited) = reaper.spawn(&mut cmd)?;
    let mut out = child
        .stdout
        .take()
        .ok_or_else(|| Error::Runtime("pod init: no stdout".into()))?;
    let text = tokio::task::spawn_blocking(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).map(|_| s)
    })
    .await
    .map_err(|e| Error::Runtime(format!("pod init: {e}")))??;
    let _ = exited.await;
    text.trim()
        .parse()
        .map_err(|_| Error::Runtime(format!("pod init: bad pid {text:?}")))
}

/// `container_id host_id size` lines, as /proc/<pid>/{uid,gid}_map take them.
fn map_text(maps: &[oci_spec::runtime::LinuxIdMapping]) -> String {
    maps.iter()
        .map(|m| format!("{} {} {}\n", m.container_id(), m.host_id(), m.size()))
        .collect()
}

/// Writes the holder's maps. Each map must be one write(2), and can be written once.
fn write_maps(pid: i32, maps: &IdMaps) -> Result<(), Error> {
    use std::io::Write as _;
    for (file, text) in [
        ("uid_map", map_text(&maps.uids)),
        ("gid_map", map_text(&maps.gids)),
    ] {
        let path = format!("/proc/{pid}/{file}");
        let mut f = std::fs::OpenOptions::new().write(true).open(&path)?;
        let n = f
            .write(text.as_bytes())
            .map_err(|e| Error::InvalidArgument(format!("user namespace {file} {text:?}: {e}")))?;
        if n != text.len() {
            return Err(Error::Runtime(format!("{path}: short write")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_lines() {
        let m = |c: u32, h: u32, n: u32| {
            oci_spec::runtime::LinuxIdMappingBuilder::default()
                .container_id(c)
                .host_id(h)
                .size(n)
                .build()
                .unwrap()
        };
        assert_eq!(map_text(&[m(0, 1000, 100000)]), "0 1000 100000\n");
        assert_eq!(map_text(&[m(0, 1, 2), m(5, 6, 7)]), "0 1 2\n5 6 7\n");
    }
}
