//! Lifecycle of one pod VM: start (helpers → VMM → agent ready), stop (agent
//! Shutdown → QMP quit → SIGKILL → helpers), crash detection, reconnect after a
//! vesseld restart, and cleanup that leaves nothing behind.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use vessel_proto::agent as pb;

use crate::accel::{self, ResolvedAccel};
use crate::agent::{AgentClient, VsockAddr};
use crate::cgroup::PodCgroup;
use crate::config::VmConfig;
use crate::error::{Error, Result};
use crate::helpers;
use crate::hypervisor::{self, Hypervisor, LaunchSpec, VmmConfinement, VsockDevice};
use crate::jail::{self, JailIds};
use crate::layout::RunDir;
use crate::process::{Confine, Proc, ProcId};
use crate::qemu::Qemu;
use crate::ready::ReadyListener;
use crate::state::{VmState, STATE_VERSION};

/// How a VM's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    /// Through `stop`.
    Requested,
    /// On its own: guest panic/poweroff, QEMU crash, or killed from outside.
    Unexpected,
}

/// Durations measured during `start`.
#[derive(Debug, Clone, Copy)]
pub struct BootTiming {
    /// Accel choice and helper startup, before the VMM is spawned.
    pub helpers: Duration,
    /// VMM spawn until the agent answered Health.
    pub vmm_to_agent: Duration,
    /// The whole `start`.
    pub total: Duration,
}

/// Pause between Health attempts after the agent announced itself (a failure there
/// is unexpected; each attempt is a fresh connection).
const HEALTH_RETRY: Duration = Duration::from_millis(200);
/// How long helpers get to exit on SIGTERM.
const HELPER_GRACE: Duration = Duration::from_secs(2);
/// How long QEMU gets to exit after QMP `quit`.
const QUIT_GRACE: Duration = Duration::from_secs(3);

/// A running (or exited, not yet cleaned up) pod VM.
#[derive(Debug)]
pub struct PodVm {
    id: String,
    dir: RunDir,
    hypervisor: Arc<dyn Hypervisor>,
    accel: ResolvedAccel,
    vmm: Proc,
    virtiofsd: Option<Proc>,
    vsock_helper: Option<Proc>,
    agent: AgentClient,
    shutdown_timeout: Duration,
    stopping: Arc<AtomicBool>,
    exit: watch::Receiver<Option<VmExit>>,
    supervisor: tokio::task::JoinHandle<()>,
    boot_timing: Option<BootTiming>,
    /// Changes only when a pooled VM moves to its pod's cgroup.
    confined: std::sync::Mutex<Confined>,
}

/// How a VM's processes are confined (what cleanup must undo).
#[derive(Debug, Clone, Default)]
struct Confined {
    jail_uid: Option<u32>,
    cgroup: Option<PodCgroup>,
}

/// Resolves with the name of the first helper to exit (never, without helpers).
async fn first_exit(helpers: &[(&'static str, Proc)]) -> &'static str {
    match helpers {
        [] => std::future::pending().await,
        [(name, p)] => {
            p.exited().await;
            name
        }
        [(a, p), (b, q), ..] => tokio::select! {
            _ = p.exited() => a,
            _ = q.exited() => b,
        },
    }
}

/// How the supervisor tells a live VM whose agent no longer answers.
#[derive(Debug, Clone, Copy)]
struct Liveness {
    interval: Duration,
    unresponsive: Duration,
}

impl Liveness {
    fn of(t: &crate::config::Timeouts) -> Self {
        Liveness {
            interval: t.health_interval,
            unresponsive: t.unresponsive,
        }
    }

    /// Resolves, with how long it has been silent, once `agent` has answered no
    /// Health for `unresponsive`. Each check gets at most what is left of that
    /// window (and at least one interval), so a hung call cannot stretch it much.
    ///
    /// A failed check first asks the VMM whether it stopped the VM on its own and
    /// resumes it: a stopped VM must not stay READY and silent.
    async fn silent(self, agent: &AgentClient, hv: &dyn Hypervisor, dir: &RunDir) -> Duration {
        let mut last_answer = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.interval).await;
            let left = self.unresponsive.saturating_sub(last_answer.elapsed());
            match agent.health_within(left.max(self.interval)).await {
                Ok(_) => last_answer = tokio::time::Instant::now(),
                Err(e) => {
                    let silent = last_answer.elapsed();
                    if silent >= self.unresponsive {
                        return silent;
                    }
                    tracing::debug!(?silent, "agent Health failed: {e}");
                    if let Ok(false) = hv.is_running(dir).await {
                        match hv.resume(dir).await {
                            Ok(()) => tracing::warn!(
                                "the VMM had stopped the pod VM (an I/O error or guest panic); \
                                 resumed it"
                            ),
                            Err(e) => tracing::warn!("cannot resume the stopped pod VM: {e}"),
                        }
                    }
                }
            }
        }
    }
}

/// Undoes a partial start in reverse order unless disarmed.
struct StartGuard {
    dir: PathBuf,
    procs: Vec<Proc>,
    cgroup: Option<PodCgroup>,
    armed: bool,
}

impl StartGuard {
    /// The undo, if still armed (the guard is disarmed). It blocks for up to seconds
    /// per process (kill, reap), so callers run it on the blocking pool.
    fn take_undo(&mut self) -> Option<impl FnOnce() + Send + 'static> {
        if !self.armed {
            return None;
        }
        self.armed = false;
        let procs = std::mem::take(&mut self.procs);
        let cgroup = self.cgroup.take();
        let dir = self.dir.clone();
        Some(move || {
            for p in procs.iter().rev() {
                p.kill_blocking();
            }
            remove_host_state(&dir, cgroup.as_ref());
        })
    }
}

impl Drop for StartGuard {
    /// Reached only when the start's future is dropped mid-way (a failed start is
    /// undone in `start_with`): the undo goes to the blocking pool, not a worker.
    fn drop(&mut self) {
        let Some(undo) = self.take_undo() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(undo)),
            Err(_) => undo(),
        }
    }
}

/// Removes the pod cgroup, unmounts the run dir's tmpfs and removes the dir (which
/// takes the jail dir with it). Blocking; what is already gone is skipped.
fn remove_host_state(dir: &Path, cgroup: Option<&PodCgroup>) {
    if let Some(cg) = cgroup {
        if let Err(e) = cg.remove() {
            tracing::warn!(cgroup = %cg.rel, "cannot remove the pod cgroup: {e}");
        }
    }
    jail::unmount_and_remove(dir);
}

/// Runs blocking host work off the async workers.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Sys(what, std::io::Error::other(e)))?
}

/// Creates the run dir and mounts its tmpfs (a leftover mount from a crashed start is
/// detached first). The unprivileged processes start in its jail dir, so the dirs
/// above need not be searchable by them.
fn prepare_run_dir(root: &Path) -> Result<()> {
    if jail::is_mount_point(root) {
        jail::unmount_and_remove(root);
    }
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    jail::mount_run_dir(root).inspect_err(|_| {
        let _ = std::fs::remove_dir(root);
    })
}

/// The console log, in the root-owned run dir: QEMU gets the descriptor only.
fn open_console(path: &Path) -> Result<OwnedFd> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
        .map(OwnedFd::from)
        .map_err(|e| Error::io(path, e))
}

fn open_dev(path: &str) -> Result<OwnedFd> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map(OwnedFd::from)
        .map_err(|e| Error::io(path, e))
}

const VHOST_NET_DEV: &str = "/dev/vhost-net";

/// A guest CID for kernel vhost-vsock, host-wide unique in practice: derived from
/// the pod id (CIDs 0-2 are reserved; u32::MAX is "any").
fn cid_for(id: &str) -> u32 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    3 + (h.finish() % u64::from(u32::MAX - 4)) as u32
}

fn check_config(cfg: &VmConfig) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidConfig(m));
    if cfg.id.is_empty() {
        return bad("empty VM id".into());
    }
    if cfg.vcpus == 0 {
        return bad("vcpus must be at least 1".into());
    }
    if cfg.memory_mib < 64 {
        return bad(format!(
            "{} MiB of memory is too little (min 64)",
            cfg.memory_mib
        ));
    }
    for (what, p) in [("kernel", &cfg.kernel), ("initrd", &cfg.initrd)] {
        if !p.is_file() {
            return bad(format!("{what} {} is not a file", p.display()));
        }
        if cfg.jail.is_some() {
            jail::check_world_readable(p).or_else(|m| bad(format!("{what}: {m}")))?;
        }
    }
    if !cfg.share_dir.is_dir() {
        return bad(format!(
            "share dir {} is not a directory",
            cfg.share_dir.display()
        ));
    }
    Ok(())
}

impl PodVm {
    /// Starts the VM with QEMU and waits until its agent answers. On any failure
    /// everything started so far is stopped and the run dir removed.
    pub async fn start(cfg: VmConfig) -> Result<Self> {
        let qemu = Arc::new(Qemu {
            binary: cfg.binaries.qemu.clone(),
        });
        Self::start_with(cfg, qemu).await
    }

    /// Like `start`, with a chosen backend.
    pub async fn start_with(cfg: VmConfig, hv: Arc<dyn Hypervisor>) -> Result<Self> {
        let mut guard = None;
        let res = Self::start_guarded(cfg, hv, &mut guard).await;
        if let Some(undo) = guard.as_mut().and_then(StartGuard::take_undo) {
            // Awaited: the caller's own unwind (the tap, which QEMU holds) comes after.
            if let Err(e) = tokio::task::spawn_blocking(undo).await {
                tracing::warn!(error = %e, "undoing a failed VM start failed");
            }
        }
        res
    }

    async fn start_guarded(
        mut cfg: VmConfig,
        hv: Arc<dyn Hypervisor>,
        slot: &mut Option<StartGuard>,
    ) -> Result<Self> {
        let t0 = Instant::now();
        check_config(&cfg)?;
        let dir = RunDir::new(&cfg.run_dir)?;
        if dir.state().exists() {
            return Err(Error::InvalidConfig(format!(
                "run dir {} already holds a VM",
                dir.root().display()
            )));
        }
        let guard = slot.insert(StartGuard {
            dir: dir.root().to_path_buf(),
            procs: Vec::new(),
            cgroup: None,
            armed: true,
        });
        let root = dir.root().to_path_buf();
        blocking("run dir", move || prepare_run_dir(&root)).await?;

        let (want, cache) = (cfg.accel, cfg.accel_cache_dir.clone());
        let accel = tokio::task::spawn_blocking(move || accel::resolve(want, &cache))
            .await
            .map_err(|e| Error::Sys("accel probe", std::io::Error::other(e)))??;
        let kernel_vsock =
            accel == ResolvedAccel::Kvm && Path::new(crate::preflight::VHOST_VSOCK_DEV).exists();
        let port = vessel_proto::AGENT_VSOCK_PORT;
        let (vsock, agent_addr) = if kernel_vsock {
            let cid = cid_for(&cfg.id);
            (VsockDevice::Kernel { cid }, VsockAddr::Kernel { cid, port })
        } else {
            (
                VsockDevice::VhostUser {
                    socket: dir.vsock_socket(),
                },
                VsockAddr::Hybrid {
                    path: dir.vsock_hybrid(),
                    port,
                },
            )
        };
        let cgroup = PodCgroup::plan(cfg.cgroup_parent.as_deref(), &cfg.id)?;
        let mut state = VmState {
            version: STATE_VERSION,
            id: cfg.id.clone(),
            hypervisor: hv.name().into(),
            accel,
            agent: agent_addr.clone(),
            vmm: None,
            virtiofsd: None,
            vsock_helper: None,
            agent_call_timeout_ms: cfg.timeouts.agent_call.as_millis() as u64,
            shutdown_timeout_ms: cfg.timeouts.shutdown.as_millis() as u64,
            jail_uid: None,
            cgroup: Some(cgroup.clone()),
        };
        // Recorded before it exists, so a crash from here on still removes it.
        state.save(&dir.state())?;
        guard.cgroup = Some(cgroup.clone());
        let cg = cgroup.clone();
        let cpu_weight = cfg.cpu_weight;
        let cgroup_procs = blocking("pod cgroup", move || {
            cg.create()?;
            if let Some(w) = cpu_weight {
                cg.set_cpu_weight(w)?;
            }
            cg.open_procs()
        })
        .await?;

        // The sockets vesseld binds for the unprivileged processes exist (and are
        // theirs) before the jail dir is handed over: the readiness listener
        // (vhost-device-vsock delivers the agent's announcement to it; listening
        // before the guest runs, as the agent connects out once it serves) and
        // virtiofsd's listener (QEMU connects to it; virtiofsd gets it as --fd).
        let prepare = |ids: Option<JailIds>| -> Result<(UnixListener, ReadyListener)> {
            let j = dir.jail();
            std::fs::create_dir(&j).map_err(|e| Error::io(&j, e))?;
            std::fs::set_permissions(&j, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io(&j, e))?;
            let fs =
                UnixListener::bind(dir.fs_socket()).map_err(|e| Error::io(dir.fs_socket(), e))?;
            let ready = ReadyListener::bind(&agent_addr)
                .map_err(|e| Error::Sys("readiness listener", e))?;
            if let Some(ids) = ids {
                jail::chown_socket(&dir.fs_socket(), ids)?;
                if !kernel_vsock {
                    jail::chown_socket(&dir.vsock_ready(), ids)?;
                }
                jail::chown_jail_dir(&j, ids)?;
            }
            Ok((fs, ready))
        };
        let (ids, (fs_listener, ready)) = match &cfg.jail {
            Some(range) => {
                let (ids, out) =
                    crate::uids::allocate(range, dir.root(), |ids| prepare(Some(ids)))?;
                (Some(ids), out)
            }
            None => (None, prepare(None)?),
        };
        cfg.extra_cmdline.extend(ready.kernel_args());
        state.jail_uid = ids.map(|i| i.uid);
        state.save(&dir.state())?;

        let vmm_confine = VmmConfinement {
            ids,
            cgroup_procs,
            console: Some(open_console(&dir.console_log())?),
            vhost_vsock: (ids.is_some() && kernel_vsock)
                .then(|| open_dev(crate::preflight::VHOST_VSOCK_DEV))
                .transpose()?,
            vhost_net: (ids.is_some() && cfg.net.is_some() && Path::new(VHOST_NET_DEV).exists())
                .then(|| open_dev(VHOST_NET_DEV))
                .transpose()?,
            oom_score_adj: cfg.oom_score_adj,
        };
        let in_cgroup = Confine {
            cgroup_procs: vmm_confine
                .cgroup_procs
                .iter()
                .map(|f| f.as_raw_fd())
                .collect(),
            oom_score_adj: cfg.oom_score_adj,
            ..Confine::default()
        };

        let ready_limit = cfg.timeouts.helper_ready;
        // Each process is recorded (guard + state file) before anything waits on it,
        // so a cancelled or failed start never loses track of one.
        let virtiofsd = helpers::spawn_virtiofsd_on(
            &cfg.binaries,
            &dir,
            &cfg.share_dir,
            fs_listener.as_raw_fd(),
            &in_cgroup,
        )?;
        drop(fs_listener);
        guard.procs.push(virtiofsd.clone());
        state.virtiofsd = Some(virtiofsd.id());
        state.save(&dir.state())?;

        let vsock_helper = if kernel_vsock {
            None
        } else {
            let confine = Confine {
                user: ids.map(|i| (i.uid, i.gid)),
                seccomp: Some(crate::seccomp::vsock_helper_filter()?),
                cwd: Some(dir.jail()),
                private_tmp: Some(vec![dir.root().to_path_buf()]),
                ..in_cgroup.clone()
            };
            let p = helpers::spawn_vsock_helper_confined(&cfg.binaries, &dir, &confine)?;
            guard.procs.push(p.clone());
            state.vsock_helper = Some(p.id());
            state.save(&dir.state())?;
            let (sock, log) = (dir.vsock_socket(), dir.vsock_log());
            helpers::wait_for_socket(&p, &sock, "vhost-device-vsock", &log, ready_limit).await?;
            Some(p)
        };

        let t_vmm = Instant::now();
        let spec = LaunchSpec {
            config: &cfg,
            accel,
            dir: &dir,
            vsock,
            fs_socket: &dir.fs_socket(),
            tsc_khz: crate::tsc::host_tsc_khz(),
            confine: Some(&vmm_confine),
        };
        let vmm = hv.spawn(&spec)?;
        guard.procs.push(vmm.clone());
        state.vmm = Some(vmm.id());
        state.save(&dir.state())?;
        hv.wait_ready(&spec, &vmm).await?;
        drop(vmm_confine);
        if virtiofsd.has_exited() {
            return Err(Error::died("virtiofsd", &[&dir.fs_log()]));
        }

        let agent = wait_for_agent(
            &ready,
            &agent_addr,
            cfg.timeouts.agent_call,
            &vmm,
            &dir,
            cfg.timeouts.boot,
        )
        .await?;
        drop(ready);
        let boot_timing = BootTiming {
            helpers: t_vmm - t0,
            vmm_to_agent: t_vmm.elapsed(),
            total: t0.elapsed(),
        };
        tracing::info!(id = %cfg.id, ?accel, ?boot_timing, uid = ?state.jail_uid, "pod VM ready");
        guard.armed = false;
        Ok(Self::assemble(
            cfg.id,
            dir,
            hv,
            accel,
            vmm,
            Some(virtiofsd),
            vsock_helper,
            agent,
            cfg.timeouts.shutdown,
            Liveness::of(&cfg.timeouts),
            Some(boot_timing),
            Confined {
                jail_uid: state.jail_uid,
                cgroup: Some(cgroup),
            },
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        id: String,
        dir: RunDir,
        hypervisor: Arc<dyn Hypervisor>,
        accel: ResolvedAccel,
        vmm: Proc,
        virtiofsd: Option<Proc>,
        vsock_helper: Option<Proc>,
        agent: AgentClient,
        shutdown_timeout: Duration,
        liveness: Liveness,
        boot_timing: Option<BootTiming>,
        confined: Confined,
    ) -> Self {
        let stopping = Arc::new(AtomicBool::new(false));
        let (tx, exit) = watch::channel(None);
        let supervisor = {
            let (vmm, stopping, id) = (vmm.clone(), stopping.clone(), id.clone());
            let agent = agent.clone();
            let (hv, run_dir) = (hypervisor.clone(), dir.clone());
            let helpers: Vec<(&'static str, Proc)> = vsock_helper
                .iter()
                .map(|p| ("vhost-device-vsock", p.clone()))
                .chain(virtiofsd.iter().map(|p| ("virtiofsd", p.clone())))
                .collect();
            tokio::spawn(async move {
                let mut cause = "the VMM (QEMU) exited";
                tokio::select! {
                    _ = vmm.exited() => {}
                    name = first_exit(&helpers) => {
                        // Without its files or its agent channel the VM is useless: a
                        // dead helper is the pod's death, seen now rather than at the
                        // next call that hangs.
                        if !stopping.load(Ordering::SeqCst) {
                            cause = name;
                            vmm.kill().await;
                        }
                        vmm.exited().await;
                    }
                    silent = liveness.silent(&agent, hv.as_ref(), &run_dir) => {
                        // QEMU runs but the guest is hung or its agent gone: as
                        // useless as a dead VM, and only a kill frees what it holds.
                        if !stopping.load(Ordering::SeqCst) {
                            tracing::warn!(%id, ?silent, "the pod VM's agent stopped answering; killing the VM");
                            cause = "its agent stopped answering";
                            vmm.kill().await;
                        }
                        vmm.exited().await;
                    }
                }
                if stopping.load(Ordering::SeqCst) {
                    let _ = tx.send(Some(VmExit::Requested));
                    return;
                }
                tracing::warn!(%id, pid = vmm.pid(), cause, "pod VM exited unexpectedly");
                // Reported first: stopping a helper may take its whole grace period.
                let _ = tx.send(Some(VmExit::Unexpected));
                // The helpers are useless without the VM (and vhost-device-vsock
                // would linger forever): stop them now.
                for (_, h) in &helpers {
                    h.terminate(HELPER_GRACE).await;
                }
            })
        };
        Self {
            id,
            dir,
            hypervisor,
            accel,
            vmm,
            virtiofsd,
            vsock_helper,
            agent,
            shutdown_timeout,
            stopping,
            exit,
            supervisor,
            boot_timing,
            confined: std::sync::Mutex::new(confined),
        }
    }

    /// Finds a VM started earlier (possibly by another vesseld process) from its run
    /// dir and checks that its agent answers.
    pub async fn reconnect(run_dir: impl AsRef<Path>) -> Result<Self> {
        let dir = RunDir::new(run_dir.as_ref())?;
        let state = VmState::load(&dir.state())?;
        let hv = hypervisor::by_name(&state.hypervisor).ok_or_else(|| Error::State {
            path: dir.state(),
            reason: format!("unknown hypervisor {:?}", state.hypervisor),
        })?;
        let vmm = state.vmm.and_then(Proc::find).ok_or(Error::NotRunning)?;
        let find_helper = |id: Option<ProcId>, name: &str| -> Result<Option<Proc>> {
            match id {
                None => Ok(None),
                Some(id) => Proc::find(id)
                    .map(Some)
                    .ok_or_else(|| Error::died(name, &[])),
            }
        };
        let virtiofsd = find_helper(state.virtiofsd, "virtiofsd")?;
        let vsock_helper = find_helper(state.vsock_helper, "vhost-device-vsock")?;
        let agent = AgentClient::new(
            state.agent.clone(),
            Duration::from_millis(state.agent_call_timeout_ms),
        );
        agent.health().await?;
        Ok(Self::assemble(
            state.id,
            dir,
            hv,
            state.accel,
            vmm,
            virtiofsd,
            vsock_helper,
            agent,
            Duration::from_millis(state.shutdown_timeout_ms),
            // Not in the state file: a reconnected VM is checked with the defaults.
            Liveness::of(&crate::config::Timeouts::default()),
            None,
            Confined {
                jail_uid: state.jail_uid,
                cgroup: state.cgroup,
            },
        ))
    }

    /// Kills whatever a run dir's state file records and removes the dir. For VMs
    /// that cannot be reconnected (or a start interrupted by a vesseld crash).
    /// A missing dir is not an error.
    pub async fn destroy(run_dir: impl AsRef<Path>) -> Result<()> {
        let root = run_dir.as_ref();
        let dir = RunDir::new(root)?;
        let mut cgroup = None;
        if let Ok(state) = VmState::load(&dir.state()) {
            for id in [state.vmm, state.vsock_helper, state.virtiofsd]
                .into_iter()
                .flatten()
            {
                if let Some(p) = Proc::find(id) {
                    p.kill().await;
                }
            }
            cgroup = state.cgroup;
        }
        let root = root.to_path_buf();
        blocking("VM cleanup", move || {
            remove_host_state(&root, cgroup.as_ref());
            Ok(())
        })
        .await
    }

    /// Pod id.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// The run dir.
    pub fn run_dir(&self) -> &Path {
        self.dir.root()
    }
    /// Guest serial console log (inside the run dir).
    pub fn console_log(&self) -> PathBuf {
        self.dir.console_log()
    }
    /// The accelerator in use.
    pub fn accel(&self) -> ResolvedAccel {
        self.accel
    }
    /// Host pid of the VMM.
    pub fn vmm_pid(&self) -> i32 {
        self.vmm.pid()
    }
    /// A pidfd of virtiofsd, whose mount namespace holds the pod's volume binds.
    pub fn share_exporter(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.virtiofsd.as_ref().map(Proc::pidfd)
    }
    /// Host pids: the VMM, virtiofsd, then vhost-device-vsock (when used).
    pub fn pids(&self) -> Vec<i32> {
        std::iter::once(&self.vmm)
            .chain(self.virtiofsd.iter())
            .chain(self.vsock_helper.iter())
            .map(Proc::pid)
            .collect()
    }
    /// The uid (= gid) QEMU and vhost-device-vsock run as (None: unconfined).
    pub fn jail_uid(&self) -> Option<u32> {
        self.confined().jail_uid
    }
    /// The pod cgroup every host process of the VM runs in.
    pub fn cgroup(&self) -> Option<PodCgroup> {
        self.confined().cgroup
    }

    /// What [`set_oom_score_adj`] needs to reach every host process of this VM.
    pub fn oom_targets(&self) -> (Vec<i32>, Option<PodCgroup>) {
        (self.pids(), self.cgroup())
    }

    fn confined(&self) -> Confined {
        self.confined
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Moves the VM's host processes into the pod cgroup under `parent` (a pooled VM
    /// booted under vesseld's own parent; the pod that claims it has the kubelet's)
    /// and records it in the state file, so cleanup after a restart finds it.
    pub async fn move_cgroup(&self, parent: &str) -> Result<()> {
        let Some(from) = self.cgroup() else {
            return Ok(()); // unconfined (tests' fakes, no cgroup support)
        };
        let to = PodCgroup::plan(Some(parent), &self.id)?;
        if to == from {
            return Ok(());
        }
        let state_path = self.dir.state();
        let target = to.clone();
        blocking("pod cgroup move", move || {
            // The state names the new cgroup first, so the one under the kubelet's
            // parent is always found and removed; a crash mid-move can only leave
            // the old (vesseld's own) cgroup dir behind.
            let mut state = VmState::load(&state_path)?;
            state.cgroup = Some(target.clone());
            state.save(&state_path)?;
            from.move_to(&target)
        })
        .await?;
        self.confined
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .cgroup = Some(to);
        Ok(())
    }
    /// The agent client.
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }
    /// Timings of `start` (None after `reconnect`).
    pub fn boot_timing(&self) -> Option<BootTiming> {
        self.boot_timing
    }
    /// True while the VMM process lives.
    pub fn is_running(&self) -> bool {
        !self.vmm.has_exited()
    }
    /// Turns `Some` when the VMM exits (noticed within milliseconds via its pidfd).
    pub fn exit_watch(&self) -> watch::Receiver<Option<VmExit>> {
        self.exit.clone()
    }
    /// Resolves when the VMM has exited (and, for an unexpected exit, the helpers
    /// have been stopped).
    pub async fn wait_exit(&self) -> VmExit {
        let mut rx = self.exit.clone();
        let how = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.unwrap_or(VmExit::Unexpected),
            Err(_) => VmExit::Unexpected,
        };
        how
    }
    /// True while the guest CPU runs, per the hypervisor (QMP query-status).
    pub async fn guest_running(&self) -> Result<bool> {
        self.hypervisor.is_running(&self.dir).await
    }

    /// Stops the VM and removes everything it left on the host. Graceful first
    /// (agent Shutdown, `shutdown` timeout), then the hypervisor's quit, then
    /// SIGKILL; then the helpers. Safe to call again and after a crash.
    pub async fn stop(&self) -> Result<()> {
        self.stopping.store(true, Ordering::SeqCst);
        if !self.vmm.has_exited() {
            let grace = self.shutdown_timeout;
            let graceful = async {
                // The agent may power off before it answers: errors are expected.
                let _ = tokio::time::timeout(grace, self.agent.shutdown(pb::Empty {})).await;
                self.vmm.exited().await;
            };
            if tokio::time::timeout(grace, graceful).await.is_err() {
                tracing::warn!(id = %self.id, "guest did not power off in {grace:?}; quitting QEMU");
                if let Err(e) = self.hypervisor.quit(&self.dir).await {
                    tracing::warn!(id = %self.id, "quit: {e}");
                }
                if tokio::time::timeout(QUIT_GRACE, self.vmm.exited())
                    .await
                    .is_err()
                {
                    tracing::warn!(id = %self.id, "VMM still alive; SIGKILL");
                    self.vmm.kill().await;
                }
            }
        }
        for h in self.vsock_helper.iter().chain(self.virtiofsd.iter()) {
            h.terminate(HELPER_GRACE).await;
        }
        let _ = self.wait_exit().await;
        let (root, cgroup) = (self.dir.root().to_path_buf(), self.cgroup());
        blocking("VM cleanup", move || {
            remove_host_state(&root, cgroup.as_ref());
            Ok(())
        })
        .await
    }
}

impl Drop for PodVm {
    fn drop(&mut self) {
        // The VM itself is detached and outlives this handle (reconnect finds it).
        self.supervisor.abort();
    }
}

/// Waits for the agent's readiness announcement, then checks Health over one fresh
/// connection; gives up when the VMM exits or `limit` passes (measured from the call,
/// i.e. the VMM's start). No connection is made to the guest before it announced
/// itself, so nothing is ever refused or abandoned while it boots.
async fn wait_for_agent(
    ready: &ReadyListener,
    addr: &VsockAddr,
    call_timeout: Duration,
    vmm: &Proc,
    dir: &RunDir,
    limit: Duration,
) -> Result<AgentClient> {
    let deadline = tokio::time::Instant::now() + limit;
    let last_error = std::sync::Mutex::new(String::from("no readiness announcement"));
    let note = |e: String| *last_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    let wait = async {
        let version = ready
            .wait()
            .await
            .map_err(|e| Error::Sys("readiness listener", e))?;
        tracing::debug!(%version, "agent announced itself");
        note("announced, Health not answered yet".into());
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let agent = AgentClient::new(addr.clone(), call_timeout);
            match agent.health_within(call_timeout).await {
                Ok(_) => return Ok(agent),
                Err(e) => {
                    tracing::warn!(attempts, "agent announced itself but Health failed: {e}");
                    note(e.to_string());
                    tokio::time::sleep(HEALTH_RETRY).await;
                }
            }
        }
    };
    tokio::select! {
        r = wait => r,
        _ = vmm.exited() => Err(Error::died("the VM", &[&dir.qemu_log(), &dir.console_log()])),
        _ = tokio::time::sleep_until(deadline) => Err(Error::AgentNotReady {
            limit,
            last_error: last_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            log_tail: format!(
                "{}\n{}",
                crate::error::tail(&dir.console_log(), 30),
                crate::error::tail(&dir.vsock_log(), 10)
            ),
        }),
    }
}

/// Sets the OOM score adjustment of a VM's host processes: everything in its pod
/// cgroup (all they forked), or, for an unconfined VM (tests' tools), `pids`.
/// Blocking.
pub fn set_oom_score_adj(pids: Vec<i32>, cgroup: Option<&PodCgroup>, score: i32) -> Result<()> {
    match cgroup {
        Some(cg) => cg.set_oom_score_adj(score),
        None => pids
            .into_iter()
            .try_for_each(|pid| crate::cgroup::write_oom_score_adj(pid, None, score)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_shareable() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<PodVm>();
        send_sync::<AgentClient>();
    }

    #[test]
    fn cids_are_valid() {
        for id in ["a", "b", "pod-123", ""] {
            let c = cid_for(id);
            assert!((3..u32::MAX).contains(&c));
        }
        assert_eq!(cid_for("x"), cid_for("x"));
    }
}
