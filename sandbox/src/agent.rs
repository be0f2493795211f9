//! Client of the guest agent (tonic over vsock), with a timeout on every unary call.

use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};
use tonic::Streaming;
use vessel_proto::agent::{self as pb, agent_client};

use crate::error::{Error, Result};
pub use crate::vsock::VsockAddr;

/// The generated tonic client, for callers that need something not wrapped here.
pub type RawAgentClient = agent_client::AgentClient<Channel>;

/// Handle to one VM's agent. Cheap to clone; reconnects on demand.
#[derive(Debug, Clone)]
pub struct AgentClient {
    rpc: RawAgentClient,
    call_timeout: Duration,
    addr: VsockAddr,
}

/// Told of every agent call this process makes through [`AgentClient`]: the RPC's
/// name, how long it took (for a stream: until it opened) and whether it
/// succeeded. vesseld exports these as metrics (agent round trips per CRI call).
pub type CallObserver = fn(&'static str, Duration, bool);

static OBSERVER: OnceLock<CallObserver> = OnceLock::new();

/// Installs the process-wide [`CallObserver`]; the first one set stays.
pub fn set_call_observer(observer: CallObserver) {
    let _ = OBSERVER.set(observer);
}

fn observe(rpc: &'static str, started: Instant, ok: bool) {
    if let Some(f) = OBSERVER.get() {
        f(rpc, started.elapsed(), ok);
    }
}

/// Largest agent reply vesseld decodes.
const MAX_AGENT_MESSAGE: usize = 4 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

impl AgentClient {
    /// A lazily connecting client; nothing is dialled until the first call.
    pub fn new(addr: VsockAddr, call_timeout: Duration) -> Self {
        let target = addr.clone();
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            let target = target.clone();
            async move { crate::vsock::connect(&target).await.map(TokioIo::new) }
        });
        // The URI is a placeholder: the connector ignores it.
        let channel = Endpoint::from_static("http://vessel-agent.vsock")
            .connect_timeout(CONNECT_TIMEOUT)
            // Detects a stalled connection so the next call dials a new one.
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .connect_with_connector_lazy(connector);
        Self {
            // Every reply is the guest's to shape: bound each message explicitly (large
            // data comes as streams of small chunks that callers bound in turn).
            rpc: agent_client::AgentClient::new(channel)
                .max_decoding_message_size(MAX_AGENT_MESSAGE),
            call_timeout,
            addr,
        }
    }

    /// Where this client connects.
    pub fn addr(&self) -> &VsockAddr {
        &self.addr
    }

    /// The generated client (no timeouts applied).
    pub fn raw(&self) -> RawAgentClient {
        self.rpc.clone()
    }

    async fn timed<T, F>(&self, what: &'static str, limit: Duration, f: F) -> Result<T>
    where
        F: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let started = Instant::now();
        let res = match tokio::time::timeout(limit, f).await {
            Ok(r) => r.map(tonic::Response::into_inner).map_err(Error::from),
            Err(_) => Err(Error::Timeout(limit, format!("agent {what}"))),
        };
        observe(what, started, res.is_ok());
        res
    }

    /// An untimed call, observed like the timed ones.
    async fn untimed<T, F>(what: &'static str, f: F) -> Result<T>
    where
        F: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let started = Instant::now();
        let res = f
            .await
            .map(tonic::Response::into_inner)
            .map_err(Error::from);
        observe(what, started, res.is_ok());
        res
    }

    /// The pod's stats in one round trip, within `limit` (stats callers poll and
    /// would rather serve a stale sample than wait the default call timeout).
    pub async fn pod_stats(&self, limit: Duration) -> Result<pb::PodStatsResponse> {
        let mut c = self.raw();
        self.timed("PodStats", limit, c.pod_stats(pb::Empty {}))
            .await
    }

    /// Health, with the default call timeout.
    pub async fn health(&self) -> Result<pb::HealthResponse> {
        self.health_within(self.call_timeout).await
    }

    /// Health with a caller-chosen timeout (boot polling uses a short one).
    pub async fn health_within(&self, limit: Duration) -> Result<pb::HealthResponse> {
        let mut c = self.raw();
        self.timed("Health", limit, c.health(pb::HealthRequest {}))
            .await
    }

    /// Blocks until the process exits (no timeout).
    pub async fn wait_process(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<pb::WaitProcessResponse> {
        let req = pb::ProcessRef {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
        };
        let mut c = self.raw();
        Self::untimed("WaitProcess", c.wait_process(req)).await
    }

    /// ExecProcess + its output + its exit in one round trip (no timeout: the
    /// caller's deadline applies). The reply may hold `output_limit` bytes per
    /// stream and no more: a larger one fails to decode.
    pub async fn exec_sync(
        &self,
        req: pb::ExecSyncRequest,
        output_limit: usize,
    ) -> Result<pb::ExecSyncResponse> {
        // Both streams at the limit, plus the status and framing.
        let most = output_limit.saturating_mul(2).saturating_add(64 << 10);
        let mut c = self.raw().max_decoding_message_size(most);
        Self::untimed("ExecSync", c.exec_sync(req)).await
    }

    /// SIGKILLs one exec'd process: an ExecSync past its deadline, or a streaming
    /// exec whose client left.
    pub async fn kill_exec(&self, container_id: &str, exec_id: &str) -> Result<()> {
        self.signal_process(pb::SignalProcessRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            signal: libc::SIGKILL as u32,
            all: false,
        })
        .await
        .map(drop)
    }

    /// Opens an output stream (the open is timed; the stream is not).
    pub async fn read_output(
        &self,
        req: pb::ReadOutputRequest,
    ) -> Result<Streaming<pb::OutputChunk>> {
        let mut c = self.raw();
        self.timed("ReadOutput", self.call_timeout, c.read_output(req))
            .await
    }

    /// Streams stdin; the first chunk must name the process (no timeout).
    pub async fn write_stdin(
        &self,
        chunks: impl tonic::IntoStreamingRequest<Message = pb::StdinChunk>,
    ) -> Result<()> {
        let mut c = self.raw();
        Self::untimed("WriteStdin", c.write_stdin(chunks))
            .await
            .map(drop)
    }

    /// Port-forward stream; the first message must carry the port (no timeout).
    pub async fn port_forward(
        &self,
        data: impl tonic::IntoStreamingRequest<Message = pb::PortForwardData>,
    ) -> Result<Streaming<pb::PortForwardData>> {
        let mut c = self.raw();
        Self::untimed("PortForward", c.port_forward(data)).await
    }
}

macro_rules! unary {
    ($(#[$doc:meta] $name:ident($req:ty) -> $resp:ty, $rpc:literal;)*) => {
        impl AgentClient {
            $(
                #[$doc]
                pub async fn $name(&self, req: $req) -> Result<$resp> {
                    let mut c = self.raw();
                    self.timed($rpc, self.call_timeout, c.$name(req)).await
                }
            )*
        }
    };
}

unary! {
    /// Creates a container (not started).
    create_container(pb::CreateContainerRequest) -> pb::Empty, "CreateContainer";
    /// Starts a created container's main process.
    start_container(pb::ContainerRef) -> pb::Empty, "StartContainer";
    /// SIGKILLs what is left and frees the container's guest state.
    remove_container(pb::ContainerRef) -> pb::Empty, "RemoveContainer";
    /// Applies new OCI linux resources.
    update_container_resources(pb::UpdateResourcesRequest) -> pb::Empty, "UpdateContainerResources";
    /// cgroup statistics of one container.
    container_stats(pb::ContainerRef) -> pb::ContainerStatsResponse, "ContainerStats";
    /// Every container the agent knows.
    list_containers(pb::Empty) -> pb::ListContainersResponse, "ListContainers";
    /// Starts an extra process in a container.
    exec_process(pb::ExecProcessRequest) -> pb::Empty, "ExecProcess";
    /// Signals a process (or all of a container's).
    signal_process(pb::SignalProcessRequest) -> pb::Empty, "SignalProcess";
    /// Frees a process's output below an offset (see `ReadOutput.explicit_ack`).
    ack_output(pb::AckOutputRequest) -> pb::Empty, "AckOutput";
    /// Closes a process's stdin.
    close_stdin(pb::ProcessRef) -> pb::Empty, "CloseStdin";
    /// Resizes a process's TTY.
    resize_tty(pb::ResizeTtyRequest) -> pb::Empty, "ResizeTty";
    /// Configures guest interfaces, routes, DNS, hosts.
    configure_network(pb::ConfigureNetworkRequest) -> pb::Empty, "ConfigureNetwork";
    /// Whole-guest statistics.
    guest_stats(pb::Empty) -> pb::GuestStatsResponse, "GuestStats";
    /// Kills every container and powers the guest off.
    shutdown(pb::Empty) -> pb::Empty, "Shutdown";
}
