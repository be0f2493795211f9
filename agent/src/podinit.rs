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

use std::io::Read as _;
use std::sync::Mutex;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use crate::containers::Error;
use crate::reaper::Reaper;

/// The argv[1] that selects pod-init mode.
pub const PODINIT_ARG: &str = "__podinit";

/// The init's pid (in the agent's namespace), once started.
static POD_INIT: Mutex<Option<i32>> = Mutex::new(None);

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

/// The pod init's pid, started on first use. Fails if it cannot be started.
pub async fn ensure(reaper: &Reaper) -> Result<i32, Error> {
    if let Some(pid) = *POD_INIT.lock().unwrap_or_else(|p| p.into_inner()) {
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return Ok(pid);
        }
    }
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg(PODINIT_ARG)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    // SAFETY: unshare(2) is async-signal-safe and touches no memory of ours.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID).map_err(std::io::Error::from)
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
    let pid: i32 = text
        .trim()
        .parse()
        .map_err(|_| Error::Runtime(format!("pod init: bad pid {text:?}")))?;
    *POD_INIT.lock().unwrap_or_else(|p| p.into_inner()) = Some(pid);
    Ok(pid)
}
