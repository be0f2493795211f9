//! File names inside a VM's run dir. The root holds what vesseld owns (state, logs,
//! console); `j/` what the VM's unprivileged processes create (see `jail`).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Longest unix socket path (sun_path minus the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The run dir of one VM and the files in it.
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// Wraps `root`; fails when socket paths inside it would be too long.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let d = Self { root: root.into() };
        // The readiness socket is the hybrid socket's path plus "_<port>".
        let longest = d.vsock_ready();
        if longest.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(Error::InvalidConfig(format!(
                "run dir {} is too long for unix socket paths",
                d.root.display()
            )));
        }
        Ok(d)
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// Persisted state (JSON).
    pub fn state(&self) -> PathBuf {
        self.root.join("state.json")
    }
    /// The jail dir: owned by the VM's uid, holds the sockets.
    pub fn jail(&self) -> PathBuf {
        self.root.join(crate::jail::JAIL_DIR)
    }
    /// QMP control socket (created by QEMU).
    pub fn qmp(&self) -> PathBuf {
        self.jail().join("qmp.sock")
    }
    /// Guest serial console.
    pub fn console_log(&self) -> PathBuf {
        self.root.join("console.log")
    }
    /// QEMU's own stdout/stderr.
    pub fn qemu_log(&self) -> PathBuf {
        self.root.join("qemu.log")
    }
    /// virtiofsd's vhost-user socket.
    pub fn fs_socket(&self) -> PathBuf {
        self.jail().join("fs.sock")
    }
    /// virtiofsd's log.
    pub fn fs_log(&self) -> PathBuf {
        self.root.join("virtiofsd.log")
    }
    /// vhost-device-vsock's vhost-user socket.
    pub fn vsock_socket(&self) -> PathBuf {
        self.jail().join("vsock.sock")
    }
    /// vhost-device-vsock's hybrid-vsock socket (host side of the agent channel).
    pub fn vsock_hybrid(&self) -> PathBuf {
        self.jail().join("vsock.hybrid")
    }
    /// Where vhost-device-vsock delivers the agent's readiness announcement (a guest
    /// connection to host port `READY_VSOCK_PORT`).
    pub fn vsock_ready(&self) -> PathBuf {
        crate::ready::hybrid_port_path(&self.vsock_hybrid(), vessel_proto::READY_VSOCK_PORT)
    }
    /// vhost-device-vsock's log.
    pub fn vsock_log(&self) -> PathBuf {
        self.root.join("vhost-device-vsock.log")
    }
}
