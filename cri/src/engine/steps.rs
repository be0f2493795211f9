//! The host-side steps of a pod's start and their undo, behind one trait: the
//! engine's seam. [`HostSteps`] does them for real (CNI, mounts, disks, QEMU);
//! the unit tests put a fake in its place to drive the lifecycle, its locking and
//! its unwind without root or a VM.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use k8s_cri::v1 as cri;
use vessel_network::{GuestNetworkPlan, NetworkManager};
use vessel_sandbox::{NetConfig, PodVm, VmConfig};
use vessel_storage::scratch::{ScratchDisk, ScratchDisks};
use vessel_storage::sharedir::ShareDir;

use super::{RunningVm, RuntimeError};

/// A set-up pod network, as the rest of the pod start uses it.
pub struct PodNet {
    /// The pod's network namespace, where QEMU runs.
    pub netns: PathBuf,
    /// What the guest configures to stand in for the pod's veth.
    pub plan: GuestNetworkPlan,
    /// The VM's NIC (its open tap).
    pub nic: NetConfig,
}

/// A pool VM's network before its pod is known: the netns QEMU runs in and the
/// NIC on the netns's unjoined tap.
pub struct PreparedNet {
    pub netns: PathBuf,
    pub nic: NetConfig,
}

#[tonic::async_trait]
pub trait PodSteps: Send + Sync + 'static {
    /// netns + CNI ADD, or None when networking is off.
    async fn setup_network(
        &self,
        id: &str,
        config: &cri::PodSandboxConfig,
    ) -> Result<Option<PodNet>, RuntimeError>;
    /// A pool VM's netns and tap (no CNI), or None when networking is off.
    async fn prepare_network(&self, id: &str) -> Result<Option<PreparedNet>, RuntimeError>;
    /// CNI ADD into the netns of [`Self::prepare_network`], joined to its tap.
    async fn attach_network(
        &self,
        id: &str,
        config: &cri::PodSandboxConfig,
    ) -> Result<GuestNetworkPlan, RuntimeError>;
    /// Tap, CNI DEL and netns; idempotent.
    async fn teardown_network(&self, id: &str) -> Result<(), RuntimeError>;
    /// The pod's share dir at `path`, with its pod files written.
    async fn create_share(
        &self,
        path: PathBuf,
        files: BTreeMap<&'static str, String>,
    ) -> Result<ShareDir, RuntimeError>;
    /// Writes the pod files into a share dir made earlier (a pool VM's).
    async fn write_pod_files(
        &self,
        share: ShareDir,
        files: BTreeMap<&'static str, String>,
    ) -> Result<(), RuntimeError>;
    /// Releases the share dir at `path`; idempotent.
    async fn destroy_share(&self, path: PathBuf) -> Result<(), RuntimeError>;
    async fn create_scratch(&self, id: &str, mib: u64) -> Result<ScratchDisk, RuntimeError>;
    /// Deletes the pod's scratch disk; idempotent.
    async fn remove_scratch(&self, id: &str) -> Result<(), RuntimeError>;
    /// Boots the VM and waits for its agent.
    async fn start_vm(&self, config: VmConfig) -> Result<Arc<dyn RunningVm>, RuntimeError>;
}

/// The real steps.
pub struct HostSteps {
    pub net: NetworkManager,
    pub scratch: ScratchDisks,
}

#[tonic::async_trait]
impl PodSteps for HostSteps {
    async fn setup_network(
        &self,
        id: &str,
        config: &cri::PodSandboxConfig,
    ) -> Result<Option<PodNet>, RuntimeError> {
        Ok(crate::podnet::setup(&self.net, id, config)
            .await?
            .map(|n| PodNet {
                netns: n.netns.path().to_path_buf(),
                plan: n.plan.clone(),
                nic: crate::podnet::vm_nic(n),
            }))
    }

    async fn prepare_network(&self, id: &str) -> Result<Option<PreparedNet>, RuntimeError> {
        Ok(crate::podnet::prepare(&self.net, id)
            .await?
            .map(|p| PreparedNet {
                netns: p.netns.path().to_path_buf(),
                nic: NetConfig {
                    tap: Arc::new(p.tap.into_fd()),
                    mac: crate::podnet::random_mac(),
                },
            }))
    }

    async fn attach_network(
        &self,
        id: &str,
        config: &cri::PodSandboxConfig,
    ) -> Result<GuestNetworkPlan, RuntimeError> {
        crate::podnet::attach(&self.net, id, config).await
    }

    async fn teardown_network(&self, id: &str) -> Result<(), RuntimeError> {
        crate::podnet::teardown(&self.net, id).await
    }

    async fn create_share(
        &self,
        path: PathBuf,
        files: BTreeMap<&'static str, String>,
    ) -> Result<ShareDir, RuntimeError> {
        // Mounts and file writes: off the async workers.
        tokio::task::spawn_blocking(move || {
            let share = ShareDir::create(&path)
                .map_err(|e| RuntimeError::internal(format!("pod share dir: {e}")))?;
            for (name, contents) in &files {
                share
                    .write_pod_file(name, contents.as_bytes())
                    .map_err(|e| RuntimeError::internal(format!("pod file {name}: {e}")))?;
            }
            Ok(share)
        })
        .await
        .map_err(|e| RuntimeError::task("share dir setup", e))?
    }

    async fn write_pod_files(
        &self,
        share: ShareDir,
        files: BTreeMap<&'static str, String>,
    ) -> Result<(), RuntimeError> {
        tokio::task::spawn_blocking(move || {
            for (name, contents) in &files {
                share
                    .write_pod_file(name, contents.as_bytes())
                    .map_err(|e| RuntimeError::internal(format!("pod file {name}: {e}")))?;
            }
            Ok(())
        })
        .await
        .map_err(|e| RuntimeError::task("pod files", e))?
    }

    async fn destroy_share(&self, path: PathBuf) -> Result<(), RuntimeError> {
        super::destroy_share(ShareDir::existing(&path)).await
    }

    async fn create_scratch(&self, id: &str, mib: u64) -> Result<ScratchDisk, RuntimeError> {
        let scratch = self.scratch.clone();
        let pod = id.to_owned();
        tokio::task::spawn_blocking(move || scratch.create(&pod, mib))
            .await
            .map_err(|e| RuntimeError::task("scratch disk creation", e))?
            .map_err(|e| {
                if let vessel_storage::StorageError::NoRoom { .. } = e {
                    return RuntimeError::ResourceExhausted(e.to_string());
                }
                RuntimeError::internal(format!(
                    "cannot create the pod's scratch disk (is mkfs.ext4 (e2fsprogs) \
                     installed, is there space under {}?): {e}",
                    self.scratch.dir().display()
                ))
            })
    }

    /// Unlinking a large sparse file walks its extents: off the async workers.
    async fn remove_scratch(&self, id: &str) -> Result<(), RuntimeError> {
        let scratch = self.scratch.clone();
        let pod = id.to_owned();
        tokio::task::spawn_blocking(move || scratch.remove(&pod))
            .await
            .map_err(|e| RuntimeError::task("scratch disk removal", e))?
            .map_err(|e| {
                RuntimeError::internal(format!(
                    "cannot remove the pod's scratch disk (check {}): {e}",
                    self.scratch.dir().display()
                ))
            })
    }

    async fn start_vm(&self, config: VmConfig) -> Result<Arc<dyn RunningVm>, RuntimeError> {
        match PodVm::start(config).await {
            Ok(vm) => Ok(Arc::new(vm)),
            Err(e) => Err(RuntimeError::sandbox("cannot start the pod VM", e)),
        }
    }
}
