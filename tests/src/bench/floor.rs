//! The floor: the pod VM's QEMU, with the same kernel, initrd, size and devices,
//! started by hand (no vesseld, no CRI, no state files) until the agent answers
//! Health. What RunPodSandbox costs above this is vessel's own overhead.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use vessel_sandbox::helpers::{start_virtiofsd, start_vsock_helper};
use vessel_sandbox::hypervisor::{LaunchSpec, VsockDevice};
use vessel_sandbox::layout::RunDir;
use vessel_sandbox::process::{spawn_detached, Proc, SpawnSpec};
use vessel_sandbox::qemu::qemu_args;
use vessel_sandbox::ready::ReadyListener;
use vessel_sandbox::{AgentClient, ResolvedAccel, VmConfig, VsockAddr};

const HELPER_READY: Duration = Duration::from_secs(10);
const BOOT_LIMIT: Duration = Duration::from_secs(120);

/// Times of one direct boot.
#[derive(Debug, Clone, Copy)]
pub struct FloorBoot {
    /// virtiofsd and the vsock helper serving.
    pub helpers: Duration,
    /// QEMU spawned until Health answered.
    pub vmm_to_agent: Duration,
    /// CPU time QEMU used until then (all its threads): unlike wall time, barely
    /// moved by other load on a shared machine.
    pub vmm_cpu: Option<Duration>,
}

/// User + system CPU time of `pid` so far, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: i32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces: state is field 3,
    // utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok()?;
    (hz > 0).then(|| Duration::from_millis((utime + stime) * 1000 / hz))
}

/// One boot in `work/<name>`; everything it started is gone when it returns.
pub async fn boot_once(
    work: &Path,
    name: &str,
    kernel: &Path,
    initrd: &Path,
    memory_mib: u32,
    accel: ResolvedAccel,
) -> anyhow::Result<FloorBoot> {
    let root = work.join(name);
    let share = root.join("share");
    std::fs::create_dir_all(&share)?;
    let mut cfg = VmConfig::new(name, root.join("vm"), &share, kernel, initrd);
    cfg.memory_mib = memory_mib;
    cfg.vcpus = 1;
    let dir = RunDir::new(&cfg.run_dir)?;
    std::fs::create_dir_all(dir.root())?;
    let mut procs: Vec<Proc> = Vec::new();
    let result = boot(&mut cfg, &dir, accel, &mut procs).await;
    for p in procs.iter().rev() {
        p.kill().await;
    }
    let _ = std::fs::remove_dir_all(&root);
    result
}

async fn boot(
    cfg: &mut VmConfig,
    dir: &RunDir,
    accel: ResolvedAccel,
    procs: &mut Vec<Proc>,
) -> anyhow::Result<FloorBoot> {
    let t0 = Instant::now();
    let port = vessel_proto::AGENT_VSOCK_PORT;
    // The same choice the sandbox crate makes.
    let kernel_vsock = accel == ResolvedAccel::Kvm && Path::new("/dev/vhost-vsock").exists();
    let (vsock, addr) = if kernel_vsock {
        let cid = 3 + rand::random::<u32>() % 1_000_000;
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
    procs.push(start_virtiofsd(&cfg.binaries, dir, &cfg.share_dir, HELPER_READY).await?);
    if !kernel_vsock {
        procs.push(start_vsock_helper(&cfg.binaries, dir, HELPER_READY).await?);
    }
    let ready = ReadyListener::bind(&addr).context("readiness listener")?;
    cfg.extra_cmdline.extend(ready.kernel_args());
    let helpers = t0.elapsed();

    let fs_socket: PathBuf = dir.fs_socket();
    let spec = LaunchSpec {
        config: cfg,
        accel,
        dir,
        vsock,
        fs_socket: &fs_socket,
        tsc_khz: vessel_sandbox::tsc::host_tsc_khz(),
        confine: None,
    };
    let t_vmm = Instant::now();
    let qemu = spawn_detached(&SpawnSpec {
        program: &cfg.binaries.qemu,
        args: qemu_args(&spec, false),
        log: &dir.qemu_log(),
        netns: None,
        keep_fds: vec![],
    })?;
    procs.push(qemu.clone());
    tokio::select! {
        r = tokio::time::timeout(BOOT_LIMIT, ready.wait()) => {
            r.context("the agent did not announce itself")??;
        }
        () = qemu.exited() => {
            let console = std::fs::read_to_string(dir.console_log()).unwrap_or_default();
            bail!("QEMU exited during the floor boot; console:\n{console}");
        }
    }
    AgentClient::new(addr, Duration::from_secs(10))
        .health()
        .await
        .context("agent Health")?;
    let vmm_to_agent = t_vmm.elapsed();
    Ok(FloorBoot {
        helpers,
        vmm_to_agent,
        vmm_cpu: cpu_time(qemu.pid()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cpu_time_is_read() {
        // Burn a little CPU so the count is not zero at a 10 ms tick.
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let cpu = cpu_time(std::process::id() as i32).expect("own /proc stat");
        assert!(cpu > Duration::ZERO, "{cpu:?}");
    }
}
