//! Detached daemon processes (QEMU and its helpers), named by pid + start time so a
//! restarted vesseld can find them again, and watched through pidfds so an exit is
//! noticed at once whether or not the process is our child.

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::process::{
    pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal, WaitId, WaitIdOptions,
};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use crate::error::{Error, Result};

/// A process identity that survives pid reuse: pid plus its kernel start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcId {
    /// Host pid.
    pub pid: i32,
    /// Field 22 of /proc/<pid>/stat (clock ticks since host boot).
    pub start_time: u64,
}

/// What to run, and how to detach it.
pub struct SpawnSpec<'a> {
    /// The program.
    pub program: &'a Path,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// stdout and stderr go here (appended).
    pub log: &'a Path,
    /// Network namespace to enter before exec (a /run/netns/<name>-style path).
    pub netns: Option<&'a Path>,
    /// Descriptors the program inherits under their current numbers.
    pub keep_fds: Vec<RawFd>,
}

/// How a spawned process is confined. Everything is prepared before the fork; the
/// child only makes raw syscalls with it.
#[derive(Debug, Default, Clone)]
pub struct Confine {
    /// `cgroup.procs` descriptors (held open by the caller across the spawn): the
    /// child writes "0" to each before anything else, so all it forks is inside.
    pub cgroup_procs: Vec<RawFd>,
    /// Run as this uid/gid, with `groups` as the only supplementary groups, and with
    /// no_new_privs (no setuid binary or file capability can give anything back).
    pub user: Option<(u32, u32)>,
    /// Supplementary groups kept with `user` (e.g. the group of /dev/kvm).
    pub groups: Vec<u32>,
    /// A seccomp filter installed right before exec (after the uid change).
    pub seccomp: Option<seccompiler::BpfProgram>,
    /// Working directory, entered as root before the uid change: the process then
    /// reaches its sockets by relative paths, whatever the dirs above allow.
    pub cwd: Option<std::path::PathBuf>,
    /// With `user`: run in a mount namespace of its own where the host's
    /// world-writable dirs (/tmp, /var/tmp, /dev/shm, ...) are covered by an empty
    /// read-only tmpfs, except those above these paths (run dir, guest files).
    pub private_tmp: Option<Vec<std::path::PathBuf>>,
    /// The OOM killer's score adjustment (-1000..=1000), set as root before the uid
    /// change: the process (and all it forks) is then killed in the order the pod's
    /// QoS asks, never with vesseld's own protection, and cannot lower it again.
    pub oom_score_adj: Option<i32>,
}

/// Host dirs anyone may write to, which an unprivileged VMM would otherwise use to
/// fill host disk or memory outside its run dir.
const WORLD_WRITABLE_CANDIDATES: &[&str] = &[
    "/tmp",
    "/var/tmp",
    "/dev/shm",
    "/run/lock",
    "/dev/mqueue",
    "/var/crash",
];

/// The world-writable dirs of [`WORLD_WRITABLE_CANDIDATES`] (real dirs, not
/// symlinks) that are not above any of `keep`.
pub fn world_writable_dirs(keep: &[std::path::PathBuf]) -> Vec<std::ffi::CString> {
    use std::os::unix::fs::PermissionsExt;
    let keep: Vec<std::path::PathBuf> = keep
        .iter()
        .map(|k| std::fs::canonicalize(k).unwrap_or_else(|_| k.clone()))
        .collect();
    WORLD_WRITABLE_CANDIDATES
        .iter()
        .map(Path::new)
        .filter(|d| {
            std::fs::symlink_metadata(d)
                .is_ok_and(|m| m.is_dir() && m.permissions().mode() & 0o002 != 0)
        })
        .filter(|d| !keep.iter().any(|k| k.starts_with(d)))
        .filter_map(|d| std::ffi::CString::new(d.as_os_str().as_encoded_bytes()).ok())
        .collect()
}

/// Starts a process in its own session (so signals to vesseld's group miss it and it
/// outlives vesseld), stdin on /dev/null, output to the log file.
pub fn spawn_detached(spec: &SpawnSpec<'_>) -> Result<Proc> {
    spawn_confined(spec, &Confine::default())
}

/// `spawn_detached`, confined as `confine` says. Order in the child: new session,
/// cgroup, network namespace (both need root), inherited fds, then groups, gid, uid,
/// no_new_privs, seccomp, exec.
pub fn spawn_confined(spec: &SpawnSpec<'_>, confine: &Confine) -> Result<Proc> {
    let log = File::options()
        .create(true)
        .append(true)
        .open(spec.log)
        .map_err(|e| Error::io(spec.log, e))?;
    let log2 = log.try_clone().map_err(|e| Error::io(spec.log, e))?;
    // Opened before fork: the child may only make async-signal-safe calls.
    let netns = spec
        .netns
        .map(|p| File::open(p).map_err(|e| Error::io(p, e)))
        .transpose()?;
    let keep_fds = spec.keep_fds.clone();
    let cgroup_procs = confine.cgroup_procs.clone();
    let user = confine
        .user
        .map(|(u, g)| (rustix::process::Uid::from_raw_unchecked(u), g));
    let groups: Vec<rustix::process::Gid> = confine
        .groups
        .iter()
        .map(|&g| rustix::process::Gid::from_raw_unchecked(g))
        .collect();
    let seccomp = confine.seccomp.clone();
    let oom_score_adj = confine
        .oom_score_adj
        .map(|v| v.clamp(-1000, 1000).to_string().into_bytes());
    let mask = match (&confine.private_tmp, confine.user) {
        (Some(keep), Some(_)) => {
            let mut keep = keep.clone();
            keep.extend(crate::preflight::find_program(spec.program));
            Some(world_writable_dirs(&keep))
        }
        _ => None,
    };
    // An unprivileged process may not be able to reach its own binary (e.g. under
    // /root/.cargo/bin): then vesseld opens it and the child execs the descriptor
    // (whose name, not the program's, becomes the process's comm).
    let exe = match confine.user {
        Some(_) => {
            let not_found = || Error::Spawn {
                program: spec.program.display().to_string(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            };
            let path = crate::preflight::find_program(spec.program).ok_or_else(not_found)?;
            let reachable = path
                .parent()
                .is_some_and(|d| crate::jail::check_world_searchable(d).is_ok());
            if reachable {
                None
            } else {
                Some(File::open(&path).map_err(|e| Error::io(&path, e))?)
            }
        }
        None => None,
    };
    let mut cmd = match &exe {
        Some(f) => {
            let mut c = Command::new(format!("/proc/self/fd/{}", f.as_raw_fd()));
            c.arg0(spec.program);
            c
        }
        None => Command::new(spec.program),
    };
    cmd.args(&spec.args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    // std changes directory in the child before running `pre_exec`, i.e. as root.
    if let Some(cwd) = &confine.cwd {
        cmd.current_dir(cwd);
    }
    // SAFETY: the closure runs between fork and exec and only makes raw syscalls
    // (setsid, open, write, setns, fcntl, setgroups/setgid/setuid, prctl, seccomp) on
    // descriptors and data prepared before the fork; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::setsid()?;
            for &fd in &cgroup_procs {
                // SAFETY: the caller keeps the cgroup.procs descriptors open.
                rustix::io::write(BorrowedFd::borrow_raw(fd), b"0")?;
            }
            if let Some(score) = &oom_score_adj {
                // Best effort: without CAP_SYS_RESOURCE a score below the inherited
                // minimum is refused, and the process then keeps the higher (less
                // protected) one it inherited; never a reason to fail the spawn.
                if let Ok(f) = rustix::fs::open(
                    c"/proc/self/oom_score_adj",
                    rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CLOEXEC,
                    rustix::fs::Mode::empty(),
                ) {
                    let _ = rustix::io::write(&f, score);
                }
            }
            if let Some(ns) = &netns {
                rustix::thread::move_into_link_name_space(
                    ns.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )?;
            }
            for &fd in &keep_fds {
                // SAFETY: the caller owns `fd` and keeps it open across this spawn.
                let fd = BorrowedFd::borrow_raw(fd);
                rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
            }
            if let Some(mask) = &mask {
                use rustix::mount::{MountFlags, MountPropagationFlags};
                // SAFETY: a mount namespace only (no fd table is unshared).
                rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS)?;
                // Host mount events (the run dir's unmount) still reach it; its
                // own never reach the host.
                rustix::mount::mount_change(
                    c"/",
                    MountPropagationFlags::DOWNSTREAM | MountPropagationFlags::REC,
                )?;
                for dir in mask {
                    rustix::mount::mount(
                        c"none",
                        dir.as_c_str(),
                        c"tmpfs",
                        MountFlags::RDONLY
                            | MountFlags::NOSUID
                            | MountFlags::NODEV
                            | MountFlags::NOEXEC,
                        Some(c"size=4k,nr_inodes=1,mode=0555"),
                    )?;
                }
            }
            if let Some((uid, gid)) = user {
                // Per-thread raw syscalls (not glibc's all-threads broadcast, which is
                // not async-signal-safe); the child has one thread.
                rustix::thread::set_thread_groups(&groups)?;
                rustix::thread::set_thread_gid(rustix::process::Gid::from_raw_unchecked(gid))?;
                rustix::thread::set_thread_uid(uid)?;
            }
            if user.is_some() || seccomp.is_some() {
                rustix::thread::set_no_new_privs(true)?;
            }
            if let Some(prog) = &seccomp {
                seccompiler::apply_filter(prog).map_err(|_| std::io::Error::last_os_error())?;
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| Error::Spawn {
        program: spec.program.display().to_string(),
        source,
    })?;
    drop(exe);
    // The std Child is dropped without waiting: the pidfd watcher reaps it.
    let pid = child.id() as i32;
    let pidfd = open_pidfd(pid).map_err(|e| Error::Sys("pidfd_open", e.into()))?;
    let start_time = start_time(pid)
        .ok_or_else(|| Error::died(&spec.program.display().to_string(), &[spec.log]))?;
    Ok(Proc::watch(ProcId { pid, start_time }, pidfd))
}

fn open_pidfd(pid: i32) -> rustix::io::Result<OwnedFd> {
    let pid = Pid::from_raw(pid).ok_or(rustix::io::Errno::SRCH)?;
    pidfd_open(pid, PidfdFlags::empty())
}

/// Start time of `pid` from /proc, or None if it does not exist.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parens: fields after the last ')' are fixed.
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts at field 3 (state); start time is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[derive(Debug)]
struct PidFd(Arc<OwnedFd>);

impl AsRawFd for PidFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// A live (or recently exited) process we watch.
#[derive(Debug, Clone)]
pub struct Proc {
    id: ProcId,
    pidfd: Arc<OwnedFd>,
    exited: watch::Receiver<bool>,
}

impl Proc {
    /// Finds a recorded process again; `None` when it is gone (or the pid was reused).
    pub fn find(id: ProcId) -> Option<Self> {
        let pidfd = open_pidfd(id.pid).ok()?;
        // Checked after the pidfd is held: a match proves the pidfd names that process.
        if start_time(id.pid)? != id.start_time {
            return None;
        }
        let p = Self::watch(id, pidfd);
        (!p.has_exited()).then_some(p)
    }

    /// Must run inside a tokio runtime: spawns the watcher task.
    fn watch(id: ProcId, pidfd: OwnedFd) -> Self {
        let pidfd = Arc::new(pidfd);
        let (tx, rx) = watch::channel(false);
        let fd = pidfd.clone();
        tokio::spawn(async move {
            // SAFETY: `PidFd` holds an Arc of the open pidfd, so the descriptor stays open
            // and names the same pidfd for as long as the AsyncFd owns it.
            let registered = unsafe {
                AsyncFd::register_with_interest(PidFd(fd.clone()), tokio::io::Interest::READABLE)
            };
            match registered {
                Ok(afd) => {
                    // A pidfd turns readable when the process exits.
                    let _ = afd.readable().await;
                }
                Err(e) => {
                    tracing::warn!(pid = id.pid, "cannot watch pidfd: {e}; polling");
                    while !exited_now(fd.as_fd()) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            reap(fd.as_fd());
            let _ = tx.send(true);
        });
        Self {
            id,
            pidfd,
            exited: rx,
        }
    }

    /// Its identity, for the state file.
    pub fn id(&self) -> ProcId {
        self.id
    }

    /// Host pid.
    pub fn pid(&self) -> i32 {
        self.id.pid
    }

    /// Its pidfd (names this process for as long as we hold it; no pid reuse).
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// True once the process has exited.
    pub fn has_exited(&self) -> bool {
        *self.exited.borrow() || exited_now(self.pidfd.as_fd())
    }

    /// A receiver that turns `true` when the process exits.
    pub fn exit_watch(&self) -> watch::Receiver<bool> {
        self.exited.clone()
    }

    /// Resolves when the process has exited.
    pub async fn exited(&self) {
        let mut rx = self.exited.clone();
        let _ = rx.wait_for(|e| *e).await;
    }

    /// Sends `sig`; a process that is already gone is not an error.
    pub fn signal(&self, sig: Signal) {
        if let Err(e) = pidfd_send_signal(self.pidfd.as_fd(), sig) {
            if e != rustix::io::Errno::SRCH {
                tracing::warn!(pid = self.id.pid, "signal {sig:?}: {e}");
            }
        }
    }

    /// SIGTERM to its process group, then SIGKILL after `grace`; returns once the
    /// process and everything it forked into its group (virtiofsd's sandbox child)
    /// are gone.
    pub async fn terminate(&self, grace: Duration) {
        if !self.has_exited() {
            self.signal_group(Signal::TERM);
            if tokio::time::timeout(grace, self.exited()).await.is_ok() {
                self.reap_group().await;
                return;
            }
        }
        self.kill().await;
    }

    /// SIGKILL to its process group; returns once all of it is gone.
    pub async fn kill(&self) {
        self.signal_group(Signal::KILL);
        self.exited().await;
        self.reap_group().await;
    }

    /// Signals the process group we gave it (`setsid` made it the leader).
    fn signal_group(&self, sig: Signal) {
        if let Some(pgid) = Pid::from_raw(self.id.pid) {
            // The group id stays reserved while any member lives, so this cannot hit
            // an unrelated group while stragglers exist.
            let _ = rustix::process::kill_process_group(pgid, sig);
        }
        self.signal(sig);
    }

    /// Kills members of its group that outlive the leader.
    async fn reap_group(&self) {
        for _ in 0..200 {
            if group_members(self.id.pid).is_empty() {
                return;
            }
            self.signal_group(Signal::KILL);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::warn!(pgid = self.id.pid, "process group members survive SIGKILL");
    }

    /// SIGKILL and wait without a runtime (for unwinding in `Drop`).
    pub fn kill_blocking(&self) {
        self.signal_group(Signal::KILL);
        let ts = Timespec {
            tv_sec: 5,
            tv_nsec: 0,
        };
        let mut fds = [PollFd::new(&*self.pidfd, PollFlags::IN)];
        let _ = poll(&mut fds, Some(&ts));
        reap(self.pidfd.as_fd());
        for _ in 0..200 {
            if group_members(self.id.pid).is_empty() {
                break;
            }
            self.signal_group(Signal::KILL);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Live (non-zombie) processes in process group `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                return false;
            };
            let mut f = rest.split_whitespace();
            // Fields 3 (state), 4 (ppid), 5 (pgrp).
            let state = f.next();
            let pgrp = f.nth(1).and_then(|v| v.parse::<i32>().ok());
            state != Some("Z") && pgrp == Some(pgid)
        })
        .collect()
}

fn exited_now(pidfd: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
    let ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(poll(&mut fds, Some(&ts)), Ok(n) if n > 0)
}

/// Collects the exit status of our own children; others are reaped by their parent.
fn reap(pidfd: BorrowedFd<'_>) {
    let _ = rustix::process::waitid(
        WaitId::PidFd(pidfd),
        WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn watches_and_kills_detached_process() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sleep.log");
        let p = spawn_detached(&SpawnSpec {
            program: Path::new("/bin/sh"),
            args: vec!["-c".into(), "echo started; exec sleep 60".into()],
            log: &log,
            netns: None,
            keep_fds: vec![],
        })
        .unwrap();
        // Its own session: the session id is its own pid.
        let sid = rustix::process::getsid(Pid::from_raw(p.pid())).unwrap();
        assert_eq!(sid.as_raw_nonzero().get(), p.pid());
        let again = Proc::find(p.id()).expect("found by pid + start time");
        assert!(Proc::find(ProcId {
            start_time: p.id().start_time + 1,
            ..p.id()
        })
        .is_none());
        assert!(!again.has_exited());
        while !std::fs::read_to_string(&log).unwrap().contains("started") {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let t = std::time::Instant::now();
        again.kill().await;
        tokio::time::timeout(Duration::from_secs(1), p.exited())
            .await
            .unwrap();
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(p.has_exited());
        // Reaped: no zombie left.
        assert!(start_time(p.pid()).is_none());
    }

    /// The child runs as the given ids, with no groups, no capabilities,
    /// no_new_privs and the seccomp filter, in the given directory.
    #[tokio::test]
    async fn confined_spawn_drops_privileges() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("c.log");
        let uid = 4_000_000_300;
        let p = spawn_confined(
            &SpawnSpec {
                program: Path::new("sh"),
                args: vec![
                    "-c".into(),
                    "pwd; ls -A /var/tmp | wc -l; touch /var/tmp/x || echo ro; exec sleep 60"
                        .into(),
                ],
                log: &log,
                netns: None,
                keep_fds: vec![],
            },
            &Confine {
                user: Some((uid, uid + 1)),
                seccomp: Some(crate::seccomp::vsock_helper_filter().unwrap()),
                cwd: Some("/proc".into()),
                private_tmp: Some(vec![]),
                ..Confine::default()
            },
        )
        .unwrap();
        let status = loop {
            let s = std::fs::read_to_string(format!("/proc/{}/status", p.pid())).unwrap();
            // Until exec, the child is still a copy of this test (Name: the test's).
            if s.starts_with("Name:\tsleep") {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap()
                .trim()
                .to_string()
        };
        assert_eq!(field("Uid:"), format!("{uid}\t{uid}\t{uid}\t{uid}"));
        let gid = uid + 1;
        assert_eq!(field("Gid:"), format!("{gid}\t{gid}\t{gid}\t{gid}"));
        assert_eq!(field("Groups:"), "");
        assert_eq!(field("CapEff:"), "0000000000000000");
        assert_eq!(field("NoNewPrivs:"), "1");
        assert_eq!(field("Seccomp:"), "2");
        // Its /var/tmp is an empty read-only tmpfs; the host's is untouched.
        let out = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = out.lines().filter(|l| !l.contains("touch")).collect();
        assert_eq!(lines, ["/proc", "0", "ro"], "{out}");
        assert!(!Path::new("/var/tmp/x").exists());
        assert!(world_writable_dirs(&[])
            .iter()
            .any(|d| d.as_bytes() == b"/var/tmp"));
        assert!(!world_writable_dirs(&["/var/tmp/a/b".into()])
            .iter()
            .any(|d| d.as_bytes() == b"/var/tmp"));
        p.kill().await;
    }

    #[tokio::test]
    async fn terminate_reaches_forked_children() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("fork.log");
        let p = spawn_detached(&SpawnSpec {
            program: Path::new("/bin/sh"),
            // The forked child ignores SIGTERM, so only the group SIGKILL ends it.
            args: vec![
                "-c".into(),
                "(trap '' TERM; exec sleep 60) & echo $!; exec sleep 61".into(),
            ],
            log: &log,
            netns: None,
            keep_fds: vec![],
        })
        .unwrap();
        let child: i32 = loop {
            if let Ok(pid) = std::fs::read_to_string(&log)
                .unwrap_or_default()
                .trim()
                .parse()
            {
                break pid;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        while group_members(p.pid()).len() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(group_members(p.pid()).contains(&child));
        p.terminate(Duration::from_millis(200)).await;
        assert!(group_members(p.pid()).is_empty());
    }
}
