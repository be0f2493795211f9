//! The guest's containers and their processes: create/start/exec via the libcontainer
//! helper (see `oci`), exits from the reaper, stdio, signals, removal.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::LinuxNamespaceType;
use tokio::sync::watch;

use crate::cgroup;
use crate::oci;
use crate::reaper::{Exit, Reaper};
use crate::spec;
use crate::stdio::{self, Stdio};

/// Per-container working dirs (bundle, pid files).
const RUN_DIR: &str = "/run/vessel/containers";
/// Console sockets: apart from RUN_DIR, whose paths (64-character container ids plus
/// exec ids) can pass the 108 bytes a unix socket path may have.
const CONSOLE_DIR: &str = "/run/vessel/console";

/// A fresh, short console socket path.
fn console_socket_path() -> std::io::Result<PathBuf> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    std::fs::create_dir_all(CONSOLE_DIR)?;
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(Path::new(CONSOLE_DIR).join(format!("{n}.sock")))
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("container {0} not found")]
    NoContainer(String),
    #[error("process {1:?} of container {0} not found")]
    NoProcess(String, String),
    #[error("container {0} already exists")]
    Exists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("container {0} is not in a state for this ({1})")]
    State(String, &'static str),
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    #[error(transparent)]
    Sysctl(#[from] crate::sysctl::SysctlError),
    #[error("runtime: {0}")]
    Runtime(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl From<nix::Error> for Error {
    fn from(e: nix::Error) -> Self {
        Error::Io(e.into())
    }
}

/// One process (the main one or an exec).
pub struct Process {
    pub pid: i32,
    pub stdio: Stdio,
    pub started_at_ns: Mutex<i64>,
    exit: watch::Receiver<Option<(Exit, bool)>>,
}

impl Process {
    /// Waits for the exit: (exit, oom_killed).
    pub async fn wait(&self) -> (Exit, bool) {
        let mut rx = self.exit.clone();
        loop {
            if let Some(e) = *rx.borrow_and_update() {
                return e;
            }
            if rx.changed().await.is_err() {
                // Sender gone without an exit: cannot happen (the task sends first).
                return (
                    Exit {
                        code: 255,
                        signal: None,
                        at_unix_ns: crate::clock::unix_ns(),
                    },
                    false,
                );
            }
        }
    }

    pub fn exited(&self) -> bool {
        self.exit.borrow().is_some()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Created,
    Running,
    Exited,
}

pub struct Container {
    pub id: String,
    dir: PathBuf,
    pub cgroup: PathBuf,
    /// Rootfs overlay the agent mounted (unmounted on removal).
    overlay: Option<PathBuf>,
    pub rootfs_upper: Option<PathBuf>,
    /// Overlay upper and work dirs as asked ("" without overlay), removed with the
    /// container: on the scratch disk they hold everything it wrote.
    overlay_upper: String,
    overlay_work: String,
    started: Mutex<bool>,
    pub main: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
}

impl Container {
    pub fn state(&self) -> State {
        if self.main.exited() {
            State::Exited
        } else if *self.started.lock().unwrap_or_else(|e| e.into_inner()) {
            State::Running
        } else {
            State::Created
        }
    }
}

/// What CreateContainer asks for.
pub struct CreateRequest {
    pub id: String,
    pub spec_json: Vec<u8>,
    pub rootfs: String,
    pub overlay_lower: Vec<String>,
    pub overlay_upper: String,
    pub overlay_work: String,
    pub stdin: bool,
    pub stdin_once: bool,
    pub share_pid_with: String,
    pub share_ipc_with: String,
    /// Join the pod-level PID namespace (see `podinit`).
    pub pod_pid_ns: bool,
}

#[derive(Clone)]
pub struct Containers {
    map: Arc<Mutex<HashMap<String, Arc<Container>>>>,
    reaper: Reaper,
    /// Serializes libcontainer helpers (they share its state dir).
    helper_lock: Arc<tokio::sync::Mutex<()>>,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+-.".contains(c))
}

impl Containers {
    pub fn new(reaper: Reaper) -> Self {
        Self {
            map: Arc::default(),
            reaper,
            helper_lock: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, id: &str) -> Result<Arc<Container>, Error> {
        self.lock()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NoContainer(id.to_string()))
    }

    pub fn list(&self) -> Vec<Arc<Container>> {
        let mut v: Vec<_> = self.lock().values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    pub fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>, Error> {
        let c = self.get(id)?;
        if exec_id.is_empty() {
            return Ok(c.main.clone());
        }
        let execs = c.execs.lock().unwrap_or_else(|e| e.into_inner());
        execs
            .get(exec_id)
            .cloned()
            .ok_or_else(|| Error::NoProcess(id.into(), exec_id.into()))
    }

    /// Runs the libcontainer helper to completion; its stderr becomes the error text.
    async fn helper(
        &self,
        args: &[&str],
        stdio: Option<[OwnedFd; 3]>,
        log: &Path,
    ) -> Result<Instant, Error> {
        let _guard = self.helper_lock.lock().await;
        let exe = std::env::current_exe()?;
        let logf = std::fs::File::create(log)?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg(oci::HELPER_ARG)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(logf);
        if let Some(fds) = &stdio {
            let raw = fds.each_ref().map(|f| f.as_raw_fd());
            // SAFETY: the closure only calls dup2/fcntl, async-signal-safe, on fds that
            // stay open until spawn returns.
            unsafe {
                cmd.pre_exec(move || {
                    // Move the sources above the targets first so no dup2 clobbers one.
                    let mut high = [0; 3];
                    for (i, fd) in raw.iter().enumerate() {
                        high[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10);
                        if high[i] < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    for (i, target) in oci::STDIO_FDS.iter().enumerate() {
                        if libc::dup2(high[i], *target) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let since = Instant::now();
        let (_child, rx) = self.reaper.spawn(&mut cmd)?;
        // Our copies of the child's ends must close, or readers never see EOF.
        // Our copies of the child's ends must close, or readers never see EOF.
        drop(stdio);
        let exit = rx
            .await
            .map_err(|_| Error::Runtime("helper exit lost".into()))?;
        if exit.code != 0 {
            let msg = std::fs::read_to_string(log).unwrap_or_default();
            return Err(Error::Runtime(format!(
                "{} failed ({}): {}",
                args[0],
                exit.code,
                msg.trim()
            )));
        }
        Ok(since)
    }

    /// Watches `pid` (created at/after `since`) and publishes its exit.
    fn watch_exit(
        &self,
        pid: i32,
        since: Instant,
        cgroup: Option<PathBuf>,
    ) -> watch::Receiver<Option<(Exit, bool)>> {
        let rx = self.reaper.lock().register(pid, since);
        let (tx, wrx) = watch::channel(None);
        let oom_before = cgroup.as_deref().map(cgroup::oom_kills).unwrap_or(0);
        tokio::spawn(async move {
            let exit = rx.await.unwrap_or(Exit {
                code: 255,
                signal: None,
                at_unix_ns: crate::clock::unix_ns(),
            });
            let oom = cgroup
                .as_deref()
                .map(|c| cgroup::oom_kills(c) > oom_before)
                .unwrap_or(false);
            let _ = tx.send(Some((exit, oom)));
        });
        wrx
    }

    pub async fn create(&self, req: CreateRequest) -> Result<(), Error> {
        if !valid_id(&req.id) {
            return Err(Error::InvalidArgument(format!(
                "bad container id {:?}",
                req.id
            )));
        }
        if self.lock().contains_key(&req.id) {
            return Err(Error::Exists(req.id));
        }
        if req.rootfs.is_empty() {
            return Err(Error::InvalidArgument("rootfs.path is empty".into()));
        }
        let ns_path = |other: &str, kind: &str| -> Result<Option<String>, Error> {
            if other.is_empty() {
                return Ok(None);
            }
            let c = self.get(other)?;
            Ok(Some(format!("/proc/{}/ns/{kind}", c.main.pid)))
        };
        let mut spec = spec::parse(&req.spec_json)?;
        let userns = spec::requested_userns(&spec)?;
        // The pod init holds the pod's PID namespace and, when asked, its user
        // namespace (with the PID and IPC namespaces it owns).
        let pod_init = if req.pod_pid_ns || userns.is_some() {
            Some(crate::podinit::ensure(&self.reaper, userns.as_ref()).await?)
        } else {
            None
        };
        let pod_ns = |kind: &str| pod_init.map(|init| format!("/proc/{init}/ns/{kind}"));
        let pid_ns_path = if req.pod_pid_ns {
            pod_ns("pid")
        } else {
            ns_path(&req.share_pid_with, "pid")?
        };
        // No IPC namespace in the spec means the pod's: with a user namespace that is
        // the one the pod init holds, not the VM's (which the container could not use).
        let ipc_ns_path = match ns_path(&req.share_ipc_with, "ipc")? {
            None if userns.is_some() && !spec::has_namespace(&spec, LinuxNamespaceType::Ipc) => {
                pod_ns("ipc")
            }
            other => other,
        };
        let adj = spec::Adjust {
            container_id: req.id.clone(),
            rootfs: req.rootfs.clone(),
            pid_ns_path,
            ipc_ns_path,
            user_ns_path: userns.as_ref().and_then(|_| pod_ns("user")),
        };
        crate::podfiles::ensure()?;
        spec::adjust(&mut spec, &adj)?;
        // Pod-wide: set (again, harmlessly) by every container of the pod.
        crate::sysctl::apply(&crate::sysctl::take_guest_sysctls(&mut spec))?;
        let tty = spec::tty_size(spec.process().as_ref());

        let dir = PathBuf::from(RUN_DIR).join(&req.id);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let overlay = if req.overlay_lower.is_empty() {
            None
        } else {
            crate::mounts::mount_overlay(
                &req.rootfs,
                &req.overlay_lower,
                &req.overlay_upper,
                &req.overlay_work,
            )?;
            Some(PathBuf::from(&req.rootfs))
        };
        let result = match (&adj.user_ns_path, spec.mounts()) {
            (Some(_), Some(mounts)) => {
                crate::mounts::create_mount_points(Path::new(&req.rootfs), mounts)
                    .map_err(Error::from)
            }
            _ => Ok(()),
        };
        let result = match result {
            Ok(()) => self.create_inner(&req, &dir, spec, tty).await,
            Err(e) => Err(e),
        };
        match result {
            Ok((main, since)) => {
                let cgroup = cgroup::path(&req.id);
                let exit = self.watch_exit(main.0, since, Some(cgroup.clone()));
                let process = Arc::new(Process {
                    pid: main.0,
                    stdio: main.1,
                    started_at_ns: Mutex::new(0),
                    exit,
                });
                let c = Arc::new(Container {
                    id: req.id.clone(),
                    dir,
                    cgroup,
                    overlay,
                    rootfs_upper: (!req.overlay_upper.is_empty())
                        .then(|| PathBuf::from(&req.overlay_upper)),
                    overlay_upper: req.overlay_upper.clone(),
                    overlay_work: req.overlay_work.clone(),
                    started: Mutex::new(false),
                    main: process,
                    execs: Mutex::default(),
                });
                self.lock().insert(req.id, c);
                Ok(())
            }
            Err(e) => {
                let _ = self
                    .helper(&["delete", &req.id], None, &dir.join("delete.log"))
                    .await;
                if let Some(o) = &overlay {
                    crate::mounts::unmount(o);
                }
                remove_writable_layer(&req.overlay_upper, &req.overlay_work);
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    async fn create_inner(
        &self,
        req: &CreateRequest,
        dir: &Path,
        spec: oci_spec::runtime::Spec,
        tty: Option<(u16, u16)>,
    ) -> Result<((i32, Stdio), Instant), Error> {
        let bundle = dir.join("bundle");
        std::fs::create_dir_all(&bundle)?;
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec(&spec).map_err(spec::SpecError::Json)?,
        )?;
        let pid_file = dir.join("main.pid");
        self.launch(
            &["create", &req.id, path_str(&bundle)?, path_str(&pid_file)?],
            dir,
            "main",
            tty,
            req.stdin,
            req.stdin_once,
        )
        .await
    }

    /// Runs a create/exec helper with the right stdio; returns (pid, stdio), since.
    async fn launch(
        &self,
        args: &[&str],
        dir: &Path,
        name: &str,
        tty: Option<(u16, u16)>,
        stdin: bool,
        stdin_once: bool,
    ) -> Result<((i32, Stdio), Instant), Error> {
        let pid_file = PathBuf::from(args[3]);
        let log = dir.join(format!("{name}.log"));
        if let Some((width, height)) = tty {
            let sock = console_socket_path()?;
            let listener = stdio::console_listener(&sock)?;
            let mut a: Vec<&str> = args.to_vec();
            a.push(path_str(&sock)?);
            a.push("0");
            // Take the pty master while the helper still runs: an exec'd process starts
            // as soon as the helper returns, and must find its console size already set.
            let receiver = tokio::spawn(stdio::receive_pty(listener, width, height));
            let since = match self.helper(&a, None, &log).await {
                Ok(since) => since,
                Err(e) => {
                    receiver.abort();
                    let _ = std::fs::remove_file(&sock);
                    return Err(e);
                }
            };
            let master = receiver
                .await
                .map_err(|e| std::io::Error::other(format!("pty receiver: {e}")))??;
            let _ = std::fs::remove_file(&sock);
            let pid = read_pid(&pid_file)?;
            Ok(((pid, Stdio::pty(master, stdin, stdin_once)?), since))
        } else {
            let (s, ends) = Stdio::pipes(stdin, stdin_once)?;
            let mut a: Vec<&str> = args.to_vec();
            a.push("");
            a.push("1");
            let since = self.helper(&a, Some(ends.fds), &log).await?;
            let pid = read_pid(&pid_file)?;
            Ok(((pid, s), since))
        }
    }

    pub async fn start(&self, id: &str) -> Result<(), Error> {
        let c = self.get(id)?;
        if c.state() != State::Created {
            return Err(Error::State(id.into(), "start"));
        }
        self.helper(&["start", id], None, &c.dir.join("start.log"))
            .await?;
        *c.main
            .started_at_ns
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = crate::clock::unix_ns();
        *c.started.lock().unwrap_or_else(|e| e.into_inner()) = true;
        Ok(())
    }

    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        stdin: bool,
    ) -> Result<(), Error> {
        let c = self.get(id)?;
        if !valid_id(exec_id) {
            return Err(Error::InvalidArgument(format!("bad exec id {exec_id:?}")));
        }
        if c.state() != State::Running {
            return Err(Error::State(id.into(), "exec"));
        }
        if c.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(exec_id)
        {
            return Err(Error::Exists(format!("{id}/{exec_id}")));
        }
        let process = spec::parse_process(process_json)?;
        let tty = spec::tty_size(Some(&process));
        let name = format!("exec-{exec_id}");
        let pjson = c.dir.join(format!("{name}.json"));
        std::fs::write(&pjson, process_json)?;
        let pid_file = c.dir.join(format!("{name}.pid"));
        let ((pid, s), since) = self
            .launch(
                &["exec", id, path_str(&pjson)?, path_str(&pid_file)?],
                &c.dir,
                &name,
                tty,
                stdin,
                false,
            )
            .await?;
        let exit = self.watch_exit(pid, since, None);
        let p = Arc::new(Process {
            pid,
            stdio: s,
            started_at_ns: Mutex::new(crate::clock::unix_ns()),
            exit,
        });
        c.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(exec_id.to_string(), p);
        Ok(())
    }

    /// [`Containers::signal`], waiting first (briefly) for a process that is still
    /// starting to be able to receive it (see `startsig`).
    pub async fn signal_when_catchable(
        &self,
        id: &str,
        exec_id: &str,
        sig: i32,
        all: bool,
    ) -> Result<(), Error> {
        if !all {
            if let Ok(p) = self.process(id, exec_id) {
                let started = *p.started_at_ns.lock().unwrap_or_else(|e| e.into_inner());
                let age = || {
                    let ns = crate::clock::unix_ns().saturating_sub(started).max(0);
                    Duration::from_nanos(ns as u64)
                };
                if started > 0 && !p.exited() {
                    crate::startsig::wait_catchable(p.pid, sig, age).await;
                }
            }
        }
        self.signal(id, exec_id, sig, all)
    }

    pub fn signal(&self, id: &str, exec_id: &str, sig: i32, all: bool) -> Result<(), Error> {
        let c = self.get(id)?;
        let signal = Signal::try_from(sig)
            .map_err(|_| Error::InvalidArgument(format!("bad signal {sig}")))?;
        if all {
            for pid in cgroup::procs(&c.cgroup) {
                let _ = kill(Pid::from_raw(pid), signal);
            }
            return Ok(());
        }
        let p = self.process(id, exec_id)?;
        if p.exited() {
            return Ok(());
        }
        match kill(Pid::from_raw(p.pid), signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Kills everything in the container and frees it. Unknown ids succeed (idempotent).
    pub async fn remove(&self, id: &str) -> Result<(), Error> {
        let Ok(c) = self.get(id) else { return Ok(()) };
        cgroup::kill_all(&c.cgroup);
        if !c.main.exited() {
            let _ = kill(Pid::from_raw(c.main.pid), Signal::SIGKILL);
            let _ = tokio::time::timeout(Duration::from_secs(10), c.main.wait()).await;
        }
        self.helper(&["delete", id], None, &c.dir.join("delete.log"))
            .await?;
        if let Some(o) = &c.overlay {
            crate::mounts::unmount(o);
            // The mount point and its parent (`<rootfs dir>/<id>/merged`).
            let _ = std::fs::remove_dir(o);
            if let Some(parent) = o.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
        remove_writable_layer(&c.overlay_upper, &c.overlay_work);
        let _ = std::fs::remove_dir_all(&c.dir);
        self.lock().remove(id);
        Ok(())
    }

    /// SIGKILLs every container's processes (shutdown).
    pub fn kill_all(&self) {
        for c in self.list() {
            cgroup::kill_all(&c.cgroup);
            let _ = kill(Pid::from_raw(c.main.pid), Signal::SIGKILL);
        }
    }
}

/// Frees a container's writable layer: its upper and work dirs, then their common
/// parent (`<scratch>/<id>`) when that is left empty.
fn remove_writable_layer(upper: &str, work: &str) {
    for d in [upper, work].into_iter().filter(|d| !d.is_empty()) {
        let d = Path::new(d);
        if let Err(e) = std::fs::remove_dir_all(d) {
            if e.kind() != std::io::ErrorKind::NotFound {
                crate::log::warn(&format!("remove {}: {e}", d.display()));
            }
        }
        if let Some(parent) = d.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

fn path_str(p: &Path) -> Result<&str, Error> {
    p.to_str()
        .ok_or_else(|| Error::InvalidArgument(format!("non-UTF-8 path {}", p.display())))
}

fn read_pid(path: &Path) -> Result<i32, Error> {
    let s = std::fs::read_to_string(path)?;
    s.trim()
        .parse()
        .map_err(|_| Error::Runtime(format!("bad pid file {}: {s:?}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writable_layer_is_removed_with_its_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let ctr = tmp.path().join("c1");
        let (upper, work) = (ctr.join("upper"), ctr.join("work"));
        std::fs::create_dir_all(upper.join("etc")).unwrap();
        std::fs::write(upper.join("etc/big"), b"data").unwrap();
        std::fs::create_dir_all(work.join("work")).unwrap();
        remove_writable_layer(upper.to_str().unwrap(), work.to_str().unwrap());
        assert!(!ctr.exists());
        // The scratch dir itself stays; no overlay: nothing to do.
        assert!(tmp.path().exists());
        remove_writable_layer("", "");
    }

    #[test]
    fn ids() {
        assert!(valid_id("abc-1_2.3+x"));
        assert!(!valid_id(""));
        assert!(!valid_id(".."));
        assert!(!valid_id("a/b"));
    }
}
