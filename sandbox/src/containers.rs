//! The pod VM's containers, in pod and container terms: the agent protocol's
//! requests are built here, not by the runtime above.

use tonic::Streaming;
use vessel_proto::agent as pb;

use crate::error::Result;
use crate::vm::PodVm;

/// A container to create in the pod VM.
#[derive(Debug, Clone, Default)]
pub struct NewContainer {
    pub id: String,
    /// The OCI runtime spec (`oci-spec` serde form).
    pub oci_spec_json: Vec<u8>,
    /// Where the guest assembles the root filesystem, and its overlay parts.
    pub rootfs: String,
    pub overlay_lower: Vec<String>,
    pub overlay_upper: String,
    pub overlay_work: String,
    pub stdin: bool,
    pub stdin_once: bool,
    /// Join the pod's PID namespace (its pod-level init).
    pub pod_pid_ns: bool,
}

/// Which output stream of a process.
pub use pb::OutputStream;

fn container(id: &str) -> pb::ContainerRef {
    pb::ContainerRef {
        container_id: id.to_owned(),
    }
}

impl PodVm {
    /// Creates a container (not started).
    pub async fn create_container(&self, c: NewContainer) -> Result<()> {
        let req = pb::CreateContainerRequest {
            container_id: c.id,
            oci_spec_json: c.oci_spec_json,
            rootfs: Some(pb::Rootfs {
                path: c.rootfs,
                overlay_lower: c.overlay_lower,
                overlay_upper: c.overlay_upper,
                overlay_work: c.overlay_work,
            }),
            stdin: c.stdin,
            stdin_once: c.stdin_once,
            share_pid_ns_with: String::new(),
            share_ipc_ns_with: String::new(),
            pod_pid_ns: c.pod_pid_ns,
        };
        self.agent().create_container(req).await.map(drop)
    }

    /// Starts a created container's main process.
    pub async fn start_container(&self, id: &str) -> Result<()> {
        self.agent().start_container(container(id)).await.map(drop)
    }

    /// Kills what is left of a container and frees its guest state.
    pub async fn remove_container(&self, id: &str) -> Result<()> {
        self.agent().remove_container(container(id)).await.map(drop)
    }

    /// Signals a container's main process, or (`all`) every process in it.
    pub async fn signal_container(&self, id: &str, signal: i32, all: bool) -> Result<()> {
        self.agent()
            .signal_process(pb::SignalProcessRequest {
                container_id: id.to_owned(),
                exec_id: String::new(),
                signal: signal as u32,
                all,
            })
            .await
            .map(drop)
    }

    /// Applies new OCI linux resources (JSON) to a container.
    pub async fn update_resources(&self, id: &str, linux_resources_json: Vec<u8>) -> Result<()> {
        self.agent()
            .update_container_resources(pb::UpdateResourcesRequest {
                container_id: id.to_owned(),
                oci_linux_resources_json: linux_resources_json,
            })
            .await
            .map(drop)
    }

    /// Starts an extra process (`exec_id`) in a container; the process is an OCI
    /// process (JSON).
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: Vec<u8>,
        stdin: bool,
    ) -> Result<()> {
        self.agent()
            .exec_process(pb::ExecProcessRequest {
                container_id: id.to_owned(),
                exec_id: exec_id.to_owned(),
                oci_process_json: process_json,
                stdin,
            })
            .await
            .map(drop)
    }

    /// One output stream of a process (`exec_id` empty: the main one), from the start.
    pub async fn output(
        &self,
        id: &str,
        exec_id: &str,
        which: OutputStream,
    ) -> Result<Streaming<pb::OutputChunk>> {
        self.agent()
            .read_output(pb::ReadOutputRequest {
                container_id: id.to_owned(),
                exec_id: exec_id.to_owned(),
                stream: which as i32,
                ..Default::default()
            })
            .await
    }

    /// Runs an extra process to its end and returns its output (at most
    /// `output_limit` bytes per stream) and exit, in one agent call; no timeout.
    pub async fn exec_sync(
        &self,
        id: &str,
        exec_id: &str,
        process_json: Vec<u8>,
        output_limit: usize,
    ) -> Result<pb::ExecSyncResponse> {
        let req = pb::ExecSyncRequest {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
            oci_process_json: process_json,
            output_limit: output_limit as u64,
        };
        self.agent().exec_sync(req, output_limit).await
    }

    /// Waits for a process (`exec_id` empty: the main one) to exit; no timeout.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<pb::WaitProcessResponse> {
        self.agent().wait_process(id, exec_id).await
    }

    /// SIGKILLs one exec'd process.
    pub async fn kill_exec(&self, id: &str, exec_id: &str) -> Result<()> {
        self.agent().kill_exec(id, exec_id).await
    }

    /// Configures the guest's interfaces, routes, DNS and hosts.
    pub async fn configure_network(&self, req: pb::ConfigureNetworkRequest) -> Result<()> {
        self.agent().configure_network(req).await.map(drop)
    }
}
