//! The pod VM: hypervisor driver (QEMU), accelerator choice, helper daemons
//! (virtiofsd, vhost-device-vsock), the agent client, and the VM lifecycle with crash
//! detection. Knows nothing of CRI.
//!
//! ```no_run
//! # async fn demo() -> vessel_sandbox::Result<()> {
//! use vessel_sandbox::{PodVm, VmConfig, VmExit};
//! let mut cfg = VmConfig::new(
//!     "pod-1",
//!     "/run/vessel/pods/pod-1/vm",     // owned by the VM; removed by stop()
//!     "/run/vessel/pods/pod-1/share",  // exported as virtiofs tag "vessel"
//!     "/usr/share/vessel/vmlinux",
//!     "/usr/share/vessel/initrd.img",
//! );
//! cfg.vcpus = 2;
//! let vm = PodVm::start(cfg).await?;          // helpers, QEMU, agent Health
//! vm.agent().health().await?;                 // every unary call has a timeout
//! let mut exits = vm.exit_watch();            // Some(VmExit::Unexpected) on a crash
//! vm.stop().await?;                           // graceful → forced; nothing left behind
//! // After a vesseld restart: PodVm::reconnect(run_dir), or PodVm::destroy(run_dir).
//! # Ok(()) }
//! ```

pub mod accel;
pub mod agent;
pub mod cgroup;
pub mod config;
mod containers;
mod error;
pub mod helpers;
pub mod hypervisor;
pub mod jail;
pub mod layout;
pub mod preflight;
pub mod process;
pub mod qemu;
pub mod ready;
pub mod seccomp;
pub mod state;
pub mod tsc;
pub mod uids;
pub mod vm;
pub mod vsock;

pub use accel::{Accel, ResolvedAccel};
pub use agent::{AgentClient, VsockAddr};
pub use config::{Binaries, DiskConfig, JailConfig, NetConfig, Timeouts, VmConfig};
pub use containers::{NewContainer, OutputStream};
pub use error::{Error, Result};
pub use vm::{PodVm, VmExit};
