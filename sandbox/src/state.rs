//! The run state of a VM, persisted in its run dir so a restarted vesseld can
//! reconnect to (or clean up after) VMs it started earlier.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::accel::ResolvedAccel;
use crate::agent::VsockAddr;
use crate::cgroup::PodCgroup;
use crate::error::{Error, Result};
use crate::process::ProcId;

/// Bumped on incompatible changes of this file's format.
pub const STATE_VERSION: u32 = 1;

/// Contents of `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// Format version.
    pub version: u32,
    /// Pod id.
    pub id: String,
    /// Hypervisor backend name (e.g. "qemu").
    pub hypervisor: String,
    /// Accelerator the VM runs with.
    pub accel: ResolvedAccel,
    /// How the host reaches the agent.
    pub agent: VsockAddr,
    /// The VM process, once started.
    pub vmm: Option<ProcId>,
    /// virtiofsd, once started.
    pub virtiofsd: Option<ProcId>,
    /// vhost-device-vsock, once started (absent with kernel vhost-vsock).
    pub vsock_helper: Option<ProcId>,
    /// Unary agent call timeout, ms.
    pub agent_call_timeout_ms: u64,
    /// Graceful shutdown timeout, ms.
    pub shutdown_timeout_ms: u64,
    /// The uid (= gid) QEMU and vhost-device-vsock run as; also the owner of `j/`.
    #[serde(default)]
    pub jail_uid: Option<u32>,
    /// The pod cgroup, once created (removed with the VM).
    #[serde(default)]
    pub cgroup: Option<PodCgroup>,
}

impl VmState {
    /// Writes atomically (temp file + rename), so a crash never leaves half a file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }

    /// Reads and checks the version.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let state: Self = serde_json::from_slice(&bytes).map_err(|e| Error::State {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if state.version != STATE_VERSION {
            return Err(Error::State {
                path: path.to_path_buf(),
                reason: format!("version {} (expected {STATE_VERSION})", state.version),
            });
        }
        Ok(state)
    }
}
