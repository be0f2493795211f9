//! The tonic service: maps each RPC onto the agent's modules.

use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use vessel_proto::agent::{self as pb, agent_server::Agent};

use crate::containers::{self, Containers, CreateRequest, State};
use crate::reaper::Reaper;

pub struct AgentService {
    containers: Containers,
    serving_since_ms: u64,
}

impl AgentService {
    pub fn new(reaper: Reaper, serving_since_ms: u64) -> Self {
        Self {
            containers: Containers::new(reaper),
            serving_since_ms,
        }
    }
}

impl AgentService {
    /// The output buffer of one stream of a process.
    fn output(
        &self,
        container_id: &str,
        exec_id: &str,
        stream: i32,
    ) -> Result<std::sync::Arc<crate::output::OutputBuffer>, Status> {
        let p = self
            .containers
            .process(container_id, exec_id)
            .map_err(status)?;
        Ok(if stream == pb::OutputStream::Stderr as i32 {
            p.stdio.stderr.clone()
        } else {
            p.stdio.stdout.clone()
        })
    }
}

/// The most ExecSync output the agent holds per stream, whatever the host asks.
const MAX_EXEC_SYNC_OUTPUT: usize = 16 << 20;

/// A stream's bytes until it ends, freed from the buffer as they are read; `Err`
/// (naming the stream) once more than `limit` bytes came.
async fn collect_output(
    buf: std::sync::Arc<crate::output::OutputBuffer>,
    limit: usize,
    which: pb::OutputStream,
) -> Result<Vec<u8>, pb::OutputStream> {
    let mut out = Vec::new();
    let mut offset = 0;
    while let Some((at, data)) = buf.chunk_at(offset).await {
        offset = at + data.len() as u64;
        buf.ack(offset);
        if out.len() + data.len() > limit {
            return Err(which);
        }
        out.extend_from_slice(&data);
    }
    Ok(out)
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;
type Reply<T> = Result<Response<T>, Status>;

fn status(e: containers::Error) -> Status {
    use containers::Error as E;
    match e {
        E::NoContainer(_) | E::NoProcess(..) => Status::not_found(e.to_string()),
        E::Exists(_) => Status::already_exists(e.to_string()),
        E::InvalidArgument(_) | E::Spec(_) | E::Sysctl(_) => {
            Status::invalid_argument(e.to_string())
        }
        E::State(..) => Status::failed_precondition(e.to_string()),
        E::Runtime(_) | E::Io(_) => Status::internal(e.to_string()),
    }
}

fn ok() -> Reply<pb::Empty> {
    Ok(Response::new(pb::Empty {}))
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn health(&self, _: Request<pb::HealthRequest>) -> Reply<pb::HealthResponse> {
        Ok(Response::new(pb::HealthResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            boot_time_ms: self.serving_since_ms,
        }))
    }

    async fn create_container(&self, req: Request<pb::CreateContainerRequest>) -> Reply<pb::Empty> {
        let r = req.into_inner();
        let rootfs = r.rootfs.unwrap_or_default();
        self.containers
            .create(CreateRequest {
                id: r.container_id,
                spec_json: r.oci_spec_json,
                rootfs: rootfs.path,
                overlay_lower: rootfs.overlay_lower,
                overlay_upper: rootfs.overlay_upper,
                overlay_work: rootfs.overlay_work,
                stdin: r.stdin,
                stdin_once: r.stdin_once,
                share_pid_with: r.share_pid_ns_with,
                share_ipc_with: r.share_ipc_ns_with,
                pod_pid_ns: r.pod_pid_ns,
            })
            .await
            .map_err(status)?;
        ok()
    }

    async fn start_container(&self, req: Request<pb::ContainerRef>) -> Reply<pb::Empty> {
        self.containers
            .start(&req.into_inner().container_id)
            .await
            .map_err(status)?;
        ok()
    }

    async fn remove_container(&self, req: Request<pb::ContainerRef>) -> Reply<pb::Empty> {
        self.containers
            .remove(&req.into_inner().container_id)
            .await
            .map_err(status)?;
        ok()
    }

    async fn update_container_resources(
        &self,
        req: Request<pb::UpdateResourcesRequest>,
    ) -> Reply<pb::Empty> {
        let r = req.into_inner();
        let c = self.containers.get(&r.container_id).map_err(status)?;
        let res: oci_spec::runtime::LinuxResources =
            serde_json::from_slice(&r.oci_linux_resources_json)
                .map_err(|e| Status::invalid_argument(format!("linux.resources: {e}")))?;
        crate::cgroup::apply(&c.cgroup, &res)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        ok()
    }

    async fn container_stats(
        &self,
        req: Request<pb::ContainerRef>,
    ) -> Reply<pb::ContainerStatsResponse> {
        let c = self
            .containers
            .get(&req.into_inner().container_id)
            .map_err(status)?;
        let stats = tokio::task::spawn_blocking(move || crate::podstats::container(&c))
            .await
            .map_err(|e| Status::internal(format!("stats task: {e}")))?;
        Ok(Response::new(stats))
    }

    async fn list_containers(&self, _: Request<pb::Empty>) -> Reply<pb::ListContainersResponse> {
        let containers = self
            .containers
            .list()
            .into_iter()
            .map(|c| {
                let state = match c.state() {
                    State::Created => pb::container_info::State::Created,
                    State::Running => pb::container_info::State::Running,
                    State::Exited => pb::container_info::State::Exited,
                };
                pb::ContainerInfo {
                    container_id: c.id.clone(),
                    pid: c.main.pid as u32,
                    state: state as i32,
                }
            })
            .collect();
        Ok(Response::new(pb::ListContainersResponse { containers }))
    }

    async fn exec_process(&self, req: Request<pb::ExecProcessRequest>) -> Reply<pb::Empty> {
        let r = req.into_inner();
        self.containers
            .exec(&r.container_id, &r.exec_id, &r.oci_process_json, r.stdin)
            .await
            .map_err(status)?;
        ok()
    }

    async fn signal_process(&self, req: Request<pb::SignalProcessRequest>) -> Reply<pb::Empty> {
        let r = req.into_inner();
        self.containers
            .signal_when_catchable(&r.container_id, &r.exec_id, r.signal as i32, r.all)
            .await
            .map_err(status)?;
        ok()
    }

    async fn wait_process(&self, req: Request<pb::ProcessRef>) -> Reply<pb::WaitProcessResponse> {
        let r = req.into_inner();
        let p = self
            .containers
            .process(&r.container_id, &r.exec_id)
            .map_err(status)?;
        let (exit, oom) = p.wait().await;
        let started = *p.started_at_ns.lock().unwrap_or_else(|e| e.into_inner());
        Ok(Response::new(pb::WaitProcessResponse {
            exit_code: exit.code,
            exited_at_unix_ns: exit.at_unix_ns,
            oom_killed: oom,
            started_at_unix_ns: started,
        }))
    }

    async fn exec_sync(&self, req: Request<pb::ExecSyncRequest>) -> Reply<pb::ExecSyncResponse> {
        let r = req.into_inner();
        let limit = usize::try_from(r.output_limit)
            .unwrap_or(usize::MAX)
            .min(MAX_EXEC_SYNC_OUTPUT);
        self.containers
            .exec(&r.container_id, &r.exec_id, &r.oci_process_json, false)
            .await
            .map_err(status)?;
        let p = self
            .containers
            .process(&r.container_id, &r.exec_id)
            .map_err(status)?;
        let out = collect_output(p.stdio.stdout.clone(), limit, pb::OutputStream::Stdout);
        let err = collect_output(p.stdio.stderr.clone(), limit, pb::OutputStream::Stderr);
        // The first stream over the limit ends both (the other may never end).
        let (stdout, stderr) = match futures_util::future::try_join(out, err).await {
            Ok(both) => both,
            Err(which) => {
                self.containers
                    .signal(&r.container_id, &r.exec_id, libc::SIGKILL, false)
                    .map_err(status)?;
                return Ok(Response::new(pb::ExecSyncResponse {
                    output_exceeded: true,
                    exceeded_stream: which as i32,
                    ..Default::default()
                }));
            }
        };
        let (exit, oom) = p.wait().await;
        let started = *p.started_at_ns.lock().unwrap_or_else(|e| e.into_inner());
        Ok(Response::new(pb::ExecSyncResponse {
            stdout,
            stderr,
            status: Some(pb::WaitProcessResponse {
                exit_code: exit.code,
                exited_at_unix_ns: exit.at_unix_ns,
                oom_killed: oom,
                started_at_unix_ns: started,
            }),
            output_exceeded: false,
            exceeded_stream: 0,
        }))
    }

    type ReadOutputStream = BoxStream<pb::OutputChunk>;
    async fn read_output(
        &self,
        req: Request<pb::ReadOutputRequest>,
    ) -> Reply<Self::ReadOutputStream> {
        let r = req.into_inner();
        let buf = self.output(&r.container_id, &r.exec_id, r.stream)?;
        let auto_ack = !r.explicit_ack;
        let stream = futures_util::stream::unfold(r.offset, move |offset| {
            let buf = buf.clone();
            async move {
                let (at, data) = buf.chunk_at(offset).await?;
                let next = at + data.len() as u64;
                if auto_ack {
                    buf.ack(next);
                }
                Some((Ok(pb::OutputChunk { data, offset: at }), next))
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn ack_output(&self, req: Request<pb::AckOutputRequest>) -> Reply<pb::Empty> {
        let r = req.into_inner();
        self.output(&r.container_id, &r.exec_id, r.stream)?
            .ack(r.offset);
        ok()
    }

    async fn write_stdin(&self, req: Request<Streaming<pb::StdinChunk>>) -> Reply<pb::Empty> {
        let mut s = req.into_inner();
        let Some(first) = s.message().await? else {
            return ok();
        };
        let p = self
            .containers
            .process(&first.container_id, &first.exec_id)
            .map_err(status)?;
        let write = |data: Vec<u8>| {
            let p = p.clone();
            async move {
                if data.is_empty() {
                    return Ok(());
                }
                p.stdio
                    .write_stdin(&data)
                    .await
                    .map_err(|e| Status::failed_precondition(format!("stdin: {e}")))
            }
        };
        write(first.data).await?;
        while let Some(chunk) = s.message().await? {
            write(chunk.data).await?;
        }
        if p.stdio.stdin_once {
            p.stdio.close_stdin().await;
        }
        ok()
    }

    async fn close_stdin(&self, req: Request<pb::ProcessRef>) -> Reply<pb::Empty> {
        let r = req.into_inner();
        let p = self
            .containers
            .process(&r.container_id, &r.exec_id)
            .map_err(status)?;
        p.stdio.close_stdin().await;
        ok()
    }

    async fn resize_tty(&self, req: Request<pb::ResizeTtyRequest>) -> Reply<pb::Empty> {
        let r = req.into_inner();
        let p = self
            .containers
            .process(&r.container_id, &r.exec_id)
            .map_err(status)?;
        let clamp = |v: u32| v.min(u16::MAX as u32) as u16;
        p.stdio
            .resize(clamp(r.width), clamp(r.height))
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        ok()
    }

    async fn configure_network(
        &self,
        req: Request<pb::ConfigureNetworkRequest>,
    ) -> Reply<pb::Empty> {
        crate::network::configure(&req.into_inner())
            .await
            .map_err(|e| match e {
                crate::network::NetError::Invalid(_) => Status::invalid_argument(e.to_string()),
                crate::network::NetError::NoSuchMac(_)
                | crate::network::NetError::NoSuchDevice(_) => Status::not_found(e.to_string()),
                _ => Status::internal(e.to_string()),
            })?;
        ok()
    }

    async fn guest_stats(&self, _: Request<pb::Empty>) -> Reply<pb::GuestStatsResponse> {
        let g = crate::stats::guest();
        Ok(Response::new(pb::GuestStatsResponse {
            timestamp_unix_ns: crate::clock::unix_ns() as u64,
            memory_total_bytes: g.memory_total,
            memory_available_bytes: g.memory_available,
            cpu_usage_usec: g.cpu_usage_usec,
            uptime_ms: g.uptime_ms,
        }))
    }

    async fn pod_stats(&self, _: Request<pb::Empty>) -> Reply<pb::PodStatsResponse> {
        let containers = self.containers.list();
        let stats = tokio::task::spawn_blocking(move || crate::podstats::sample(&containers))
            .await
            .map_err(|e| Status::internal(format!("stats task: {e}")))?;
        Ok(Response::new(stats))
    }

    type PortForwardStream = BoxStream<pb::PortForwardData>;
    async fn port_forward(
        &self,
        req: Request<Streaming<pb::PortForwardData>>,
    ) -> Reply<Self::PortForwardStream> {
        let mut input = req.into_inner();
        let first = input
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("no first message"))?;
        let port = u16::try_from(first.port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| Status::invalid_argument(format!("bad port {}", first.port)))?;
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| Status::unavailable(format!("connect 127.0.0.1:{port}: {e}")))?;
        let (mut rd, mut wr) = tcp.into_split();
        if !first.data.is_empty() {
            wr.write_all(&first.data)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
        }
        // Host → guest port.
        tokio::spawn(async move {
            while let Some(Ok(m)) = input.next().await {
                if wr.write_all(&m.data).await.is_err() {
                    return;
                }
            }
            let _ = wr.shutdown().await;
        });
        // Guest port → host; the stream ends when the port closes its side.
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            let mut buf = vec![0u8; crate::output::CHUNK];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => {
                        if tx
                            .send(Ok(pb::PortForwardData {
                                port: 0,
                                data: buf[..n].to_vec(),
                            }))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::aborted(e.to_string()))).await;
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn shutdown(&self, _: Request<pb::Empty>) -> Reply<pb::Empty> {
        crate::log::info("shutdown requested");
        self.containers.kill_all();
        // Answer first; power off a moment later.
        tokio::spawn(async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            crate::boot::power_off();
        });
        ok()
    }
}
