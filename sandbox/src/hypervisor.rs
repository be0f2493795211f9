//! The hypervisor abstraction: what the VM lifecycle needs from a backend.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

use crate::accel::ResolvedAccel;
use crate::config::VmConfig;
use crate::error::Result;
use crate::jail::JailIds;
use crate::layout::RunDir;
use crate::process::Proc;

/// How the guest's virtio-vsock device is provided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VsockDevice {
    /// Kernel vhost-vsock with this guest CID (host-wide unique).
    Kernel {
        /// Guest CID.
        cid: u32,
    },
    /// vhost-user-vsock served by a helper on this socket.
    VhostUser {
        /// The helper's vhost-user socket.
        socket: std::path::PathBuf,
    },
}

/// Everything a backend needs to launch one VM.
#[derive(Debug)]
pub struct LaunchSpec<'a> {
    /// The VM's config.
    pub config: &'a VmConfig,
    /// The accelerator chosen.
    pub accel: ResolvedAccel,
    /// The run dir.
    pub dir: &'a RunDir,
    /// The vsock device.
    pub vsock: VsockDevice,
    /// virtiofsd's vhost-user socket.
    pub fs_socket: &'a Path,
    /// Host TSC frequency, for the TCG kernel command line.
    pub tsc_khz: Option<u64>,
    /// How the VM process is confined (`None`: as vesseld, console by path).
    pub confine: Option<&'a VmmConfinement>,
}

/// What confines the VM process, prepared by the lifecycle before the spawn.
#[derive(Debug, Default)]
pub struct VmmConfinement {
    /// Run as this uid/gid (else as vesseld).
    pub ids: Option<JailIds>,
    /// `cgroup.procs` of the pod cgroup in each hierarchy.
    pub cgroup_procs: Vec<OwnedFd>,
    /// The console log, opened by vesseld in the root-owned run dir.
    pub console: Option<OwnedFd>,
    /// `/dev/vhost-vsock`, opened by vesseld (kernel vsock).
    pub vhost_vsock: Option<OwnedFd>,
    /// `/dev/vhost-net`, opened by vesseld (tap with vhost).
    pub vhost_net: Option<OwnedFd>,
    /// The OOM score adjustment the VM process starts with.
    pub oom_score_adj: Option<i32>,
}

/// A VM backend (QEMU today).
#[async_trait]
pub trait Hypervisor: Send + Sync + std::fmt::Debug {
    /// Backend name, stored in the state file to find the backend again.
    fn name(&self) -> &'static str;

    /// Starts the VM process detached (returns at once, so the caller can record it
    /// before waiting on anything).
    fn spawn(&self, spec: &LaunchSpec<'_>) -> Result<Proc>;

    /// Returns once the VM process's control channel is up (fails if it exits).
    async fn wait_ready(&self, spec: &LaunchSpec<'_>, vmm: &Proc) -> Result<()>;

    /// Asks the guest to power off (ACPI power button). Unused: the pod VM has no ACPI;
    /// vessel stops a guest through its agent, then by quitting QEMU.
    async fn power_down(&self, dir: &RunDir) -> Result<()>;

    /// Stops the VM process at once (no guest involvement).
    async fn quit(&self, dir: &RunDir) -> Result<()>;

    /// True while the guest runs (not paused, not shut down).
    async fn is_running(&self, dir: &RunDir) -> Result<bool>;

    /// Resumes a VM the backend stopped on its own (an I/O error policy, a guest
    /// panic action); vesseld pauses none itself.
    async fn resume(&self, dir: &RunDir) -> Result<()>;
}

/// The backend stored under `name` in a state file.
pub fn by_name(name: &str) -> Option<Arc<dyn Hypervisor>> {
    match name {
        crate::qemu::NAME => Some(Arc::new(crate::qemu::Qemu::default())),
        _ => None,
    }
}
