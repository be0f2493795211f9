//! The host <-> guest agent API. Generated code only; see `proto/agent.proto`.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// Agent API v1 (package `vessel.agent.v1`).
pub mod agent {
    tonic::include_proto!("vessel.agent.v1");
}

/// vsock port the agent listens on inside the guest.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Largest single write either side makes to the vsock stream.
/// vhost-device-vsock 0.3 stalls on larger writes from newer guest kernels.
pub const MAX_VSOCK_WRITE: usize = 32 * 1024;

/// virtiofs tag under which the pod share dir is exported to the guest.
pub const SHARE_TAG: &str = "vessel";

/// Where the agent mounts the pod share dir inside the guest.
pub const GUEST_SHARE_DIR: &str = "/run/vessel/share";

/// Where the agent keeps the guest's own copy of the pod files (`hosts`,
/// `resolv.conf`, `hostname`) that the host puts, read-only, in `pod/` of the share.
/// Containers bind these writable copies: what they write lands in guest memory,
/// never on the host.
pub const GUEST_POD_FILES_DIR: &str = "/run/vessel/pod";

/// vsock port on the host (CID 2) the agent connects to once it serves
/// `AGENT_VSOCK_PORT`, to announce that it is ready: the host waits for this instead
/// of polling the guest. With vhost-device-vsock the connection arrives on the unix
/// socket `<uds-path>_1025`. The kernel command line may name another port with
/// `vessel.ready_port=<port>` (kernel vhost-vsock, where host ports are host-wide).
pub const READY_VSOCK_PORT: u32 = 1025;

/// The agent's readiness announcement: this prefix, a space, its version, `\n`.
pub const READY_LINE_PREFIX: &str = "vessel-agent-ready";

/// Serial of the pod's scratch disk (virtio-blk): the guest finds it by this, in
/// `/sys/block/<dev>/serial`.
pub const SCRATCH_DISK_SERIAL: &str = "vessel-scratch";

/// Where the agent mounts the scratch disk: containers' overlay upper and work dirs
/// live in `<this>/<container id>/`, on node disk rather than guest memory. Without
/// a scratch disk the dir is plain guest tmpfs.
pub const GUEST_SCRATCH_DIR: &str = "/run/vessel/scratch";
