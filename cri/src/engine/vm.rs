//! The running pod VM as the engine sees it: one trait in pod and container terms
//! (the sandbox crate owns the agent protocol), implemented by
//! [`vessel_sandbox::PodVm`]. The unit tests put a fake in its place to force the
//! interleavings of concurrent calls on one pod.
//!
//! Output streaming to logs, the streaming server (exec/attach/port-forward) and
//! stats still talk to the real agent: they reach it through
//! [`RunningVm::pod_vm`], which a fake does not have.

use std::os::fd::BorrowedFd;

use futures_util::stream::BoxStream;
use futures_util::StreamExt as _;
use tokio::sync::watch;
use vessel_proto::agent as pb;
use vessel_sandbox::vm::BootTiming;
use vessel_sandbox::{NewContainer, OutputStream, PodVm, ResolvedAccel, Result, VmExit};

/// One output stream of a process, chunk by chunk.
pub type Output = BoxStream<'static, std::result::Result<pb::OutputChunk, tonic::Status>>;

#[tonic::async_trait]
pub trait RunningVm: Send + Sync + 'static {
    /// The pod id.
    fn id(&self) -> &str;
    /// Host pid of the VMM.
    fn vmm_pid(&self) -> i32;
    fn accel(&self) -> ResolvedAccel;
    /// Timings of the boot (None after a reconnect).
    fn boot_timing(&self) -> Option<BootTiming>;
    /// Turns `Some` when the VMM exits.
    fn exit_watch(&self) -> watch::Receiver<Option<VmExit>>;
    /// A pidfd of the process serving the share dir (virtiofsd), whose mount
    /// namespace holds the volume binds.
    fn share_exporter(&self) -> Option<BorrowedFd<'_>>;
    /// The real VM, for the paths not behind this trait (log pumps, streaming,
    /// stats); None for a fake.
    fn pod_vm(&self) -> Option<&PodVm>;

    /// Stops the VM and removes what it left on the host; safe to repeat.
    async fn stop(&self) -> Result<()>;
    async fn create_container(&self, c: NewContainer) -> Result<()>;
    async fn start_container(&self, id: &str) -> Result<()>;
    async fn remove_container(&self, id: &str) -> Result<()>;
    async fn signal_container(&self, id: &str, signal: i32, all: bool) -> Result<()>;
    async fn update_resources(&self, id: &str, linux_resources_json: Vec<u8>) -> Result<()>;
    async fn exec(&self, id: &str, exec_id: &str, process_json: Vec<u8>, stdin: bool)
        -> Result<()>;
    /// One output stream of a process (`exec_id` empty: the main one), from the start.
    async fn output(&self, id: &str, exec_id: &str, which: OutputStream) -> Result<Output>;
    /// Exec + output + exit in one agent call (see `PodVm::exec_sync`).
    async fn exec_sync(
        &self,
        id: &str,
        exec_id: &str,
        process_json: Vec<u8>,
        output_limit: usize,
    ) -> Result<pb::ExecSyncResponse>;
    /// Waits for a process (`exec_id` empty: the main one) to exit.
    async fn wait(&self, id: &str, exec_id: &str) -> Result<pb::WaitProcessResponse>;
    async fn kill_exec(&self, id: &str, exec_id: &str) -> Result<()>;
    async fn configure_network(&self, req: pb::ConfigureNetworkRequest) -> Result<()>;
}

#[tonic::async_trait]
impl RunningVm for PodVm {
    fn id(&self) -> &str {
        PodVm::id(self)
    }
    fn vmm_pid(&self) -> i32 {
        PodVm::vmm_pid(self)
    }
    fn accel(&self) -> ResolvedAccel {
        PodVm::accel(self)
    }
    fn boot_timing(&self) -> Option<BootTiming> {
        PodVm::boot_timing(self)
    }
    fn exit_watch(&self) -> watch::Receiver<Option<VmExit>> {
        PodVm::exit_watch(self)
    }
    fn share_exporter(&self) -> Option<BorrowedFd<'_>> {
        PodVm::share_exporter(self)
    }
    fn pod_vm(&self) -> Option<&PodVm> {
        Some(self)
    }

    async fn stop(&self) -> Result<()> {
        PodVm::stop(self).await
    }
    async fn create_container(&self, c: NewContainer) -> Result<()> {
        PodVm::create_container(self, c).await
    }
    async fn start_container(&self, id: &str) -> Result<()> {
        PodVm::start_container(self, id).await
    }
    async fn remove_container(&self, id: &str) -> Result<()> {
        PodVm::remove_container(self, id).await
    }
    async fn signal_container(&self, id: &str, signal: i32, all: bool) -> Result<()> {
        PodVm::signal_container(self, id, signal, all).await
    }
    async fn update_resources(&self, id: &str, linux_resources_json: Vec<u8>) -> Result<()> {
        PodVm::update_resources(self, id, linux_resources_json).await
    }
    async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: Vec<u8>,
        stdin: bool,
    ) -> Result<()> {
        PodVm::exec(self, id, exec_id, process_json, stdin).await
    }
    async fn output(&self, id: &str, exec_id: &str, which: OutputStream) -> Result<Output> {
        Ok(PodVm::output(self, id, exec_id, which).await?.boxed())
    }
    async fn exec_sync(
        &self,
        id: &str,
        exec_id: &str,
        process_json: Vec<u8>,
        output_limit: usize,
    ) -> Result<pb::ExecSyncResponse> {
        PodVm::exec_sync(self, id, exec_id, process_json, output_limit).await
    }
    async fn wait(&self, id: &str, exec_id: &str) -> Result<pb::WaitProcessResponse> {
        PodVm::wait(self, id, exec_id).await
    }
    async fn kill_exec(&self, id: &str, exec_id: &str) -> Result<()> {
        PodVm::kill_exec(self, id, exec_id).await
    }
    async fn configure_network(&self, req: pb::ConfigureNetworkRequest) -> Result<()> {
        PodVm::configure_network(self, req).await
    }
}
