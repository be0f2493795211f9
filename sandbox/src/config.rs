//! What a pod VM is made of.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::accel::Accel;
pub use crate::jail::JailConfig;

/// Everything needed to start one pod VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Pod id; names the QEMU process (`-name`) and appears in logs.
    pub id: String,
    /// Directory owned by this VM alone (sockets, logs, state file). Created by
    /// `start` and removed entirely by `stop`/cleanup. Keep it short: unix socket
    /// paths inside it must fit in 108 bytes.
    pub run_dir: PathBuf,
    /// Host directory exported to the guest over virtiofs (tag `vessel`, mounted at
    /// `vessel_proto::GUEST_SHARE_DIR`). Not removed by this crate.
    pub share_dir: PathBuf,
    /// Uncompressed PVH `vmlinux`.
    pub kernel: PathBuf,
    /// Initramfs whose /init is vessel-agent.
    pub initrd: PathBuf,
    /// Guest vCPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Accelerator wanted.
    pub accel: Accel,
    /// Where the `auto` accel verdict is cached (e.g. /run/vessel).
    pub accel_cache_dir: PathBuf,
    /// Extra kernel command-line arguments (appended last).
    pub extra_cmdline: Vec<String>,
    /// Optional NIC backed by an open tap device.
    pub net: Option<NetConfig>,
    /// Optional scratch disk (virtio-blk, serial `vessel_proto::SCRATCH_DISK_SERIAL`)
    /// for the containers' writable layers.
    pub scratch_disk: Option<DiskConfig>,
    /// Network namespace file QEMU runs in (e.g. /run/vessel/netns/<pod>).
    pub netns: Option<PathBuf>,
    /// Host programs.
    pub binaries: Binaries,
    /// Time limits.
    pub timeouts: Timeouts,
    /// The unprivileged uid range QEMU and vhost-device-vsock run from (one uid per
    /// VM). `None` runs them as vesseld's own user (tests and tools only).
    pub jail: Option<JailConfig>,
    /// The pod's cgroup parent (CRI `cgroup_parent`: a cgroupfs path or a systemd
    /// slice); `None` → `/vessel`. The VM's processes go into `vessel-<id>` below it.
    pub cgroup_parent: Option<String>,
    /// CPU weight of the pod cgroup from the start (see
    /// [`crate::cgroup::PodCgroup::set_cpu_weight`]); `None` keeps the kernel's default.
    pub cpu_weight: Option<u64>,
    /// OOM score adjustment of every host process of the VM from birth (the pod's
    /// QoS; see docs/design.md); `None` inherits vesseld's.
    pub oom_score_adj: Option<i32>,
}

impl VmConfig {
    /// A config with the defaults for everything but the paths.
    pub fn new(
        id: impl Into<String>,
        run_dir: impl Into<PathBuf>,
        share_dir: impl Into<PathBuf>,
        kernel: impl Into<PathBuf>,
        initrd: impl Into<PathBuf>,
    ) -> Self {
        Self {
            id: id.into(),
            run_dir: run_dir.into(),
            share_dir: share_dir.into(),
            kernel: kernel.into(),
            initrd: initrd.into(),
            vcpus: 1,
            memory_mib: 512,
            accel: Accel::Auto,
            accel_cache_dir: PathBuf::from("/run/vessel"),
            extra_cmdline: Vec::new(),
            net: None,
            scratch_disk: None,
            netns: None,
            binaries: Binaries::default(),
            timeouts: Timeouts::default(),
            jail: Some(JailConfig::default()),
            cgroup_parent: None,
            cpu_weight: None,
            oom_score_adj: None,
        }
    }
}

/// A tap-backed NIC.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// The open tap device (opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR); QEMU
    /// inherits it. The caller may close its copy once `start` returned.
    pub tap: Arc<OwnedFd>,
    /// Guest MAC, "aa:bb:cc:dd:ee:ff".
    pub mac: String,
}

/// A raw disk image the VMM gets as an open descriptor (it never opens the path,
/// so the file may live where the VM's unprivileged uid cannot reach).
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// The file, opened read-write; QEMU inherits it. The caller may close its copy
    /// once `start` returned.
    pub file: Arc<OwnedFd>,
    /// The same file opened read-only: QEMU opens a disk read-only first (probing,
    /// locking) and takes from the fd set only a descriptor of the matching mode.
    pub file_ro: Arc<OwnedFd>,
    /// The file's path: only a label in QEMU's command line (`opaque=`).
    pub path: PathBuf,
}

/// Paths of the host programs (bare names are looked up in PATH).
#[derive(Debug, Clone)]
pub struct Binaries {
    /// qemu-system-x86_64.
    pub qemu: PathBuf,
    /// virtiofsd.
    pub virtiofsd: PathBuf,
    /// vhost-device-vsock (used when /dev/vhost-vsock is missing).
    pub vhost_device_vsock: PathBuf,
}

impl Default for Binaries {
    fn default() -> Self {
        Self {
            qemu: "qemu-system-x86_64".into(),
            virtiofsd: "virtiofsd".into(),
            vhost_device_vsock: "vhost-device-vsock".into(),
        }
    }
}

/// Time limits of the lifecycle.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// QEMU start until the agent answers Health.
    pub boot: Duration,
    /// A helper's socket appearing.
    pub helper_ready: Duration,
    /// Each unary agent call (streams and WaitProcess excluded).
    pub agent_call: Duration,
    /// Agent Shutdown until QEMU exits, before QMP quit and then SIGKILL.
    pub shutdown: Duration,
    /// Between liveness checks (agent Health) of a running VM.
    pub health_interval: Duration,
    /// How long the agent may go without answering Health while the VMM lives. Then
    /// the VM counts as dead: it is killed and its exit is unexpected. Generous: a
    /// guest whose containers hog its CPUs (slow under TCG) must not be killed.
    pub unresponsive: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            boot: Duration::from_secs(60),
            helper_ready: Duration::from_secs(10),
            agent_call: Duration::from_secs(30),
            shutdown: Duration::from_secs(10),
            health_interval: Duration::from_secs(5),
            unresponsive: Duration::from_secs(30),
        }
    }
}
