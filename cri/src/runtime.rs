//! CRI RuntimeService: the gRPC edge over [`Engine`], the stats sampler, the events
//! bus and the streaming server. Only checkpointing returns Unimplemented.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_server::RuntimeService;
use tonic::{Request, Response, Status};

use vessel_image::ImageStore;

use crate::clock::now_ns;
use crate::config::Config;
use crate::engine::Engine;
use crate::status::store_status;
use crate::views;

pub const RUNTIME_NAME: &str = "vessel";
/// The CRI `version` field is the version of the kubelet runtime API we speak.
pub const KUBELET_API_VERSION: &str = "0.1.0";
pub const RUNTIME_API_VERSION: &str = "v1";

pub struct RuntimeSvc {
    config: Arc<Config>,
    images: ImageStore,
    engine: Arc<Engine>,
    /// From the kubelet's UpdateRuntimeConfig.
    pod_cidr: std::sync::Mutex<String>,
    stats: Arc<crate::stats::Stats>,
    events: crate::events::EventBus,
    streaming: Option<Arc<crate::streaming::StreamingServer>>,
}

impl RuntimeSvc {
    pub fn new(config: Arc<Config>, images: ImageStore, engine: Arc<Engine>) -> Self {
        let events = crate::events::EventBus::default();
        let bus = events.clone();
        engine.store().observe(Arc::new(move |change, pod, ctrs| {
            bus.publish_change(change, pod, ctrs)
        }));
        let stats = Arc::new(crate::stats::Stats::new(
            engine.clone(),
            config.root.join("scratch"),
        ));
        RuntimeSvc {
            config,
            images,
            stats,
            engine,
            pod_cidr: std::sync::Mutex::default(),
            events,
            streaming: None,
        }
    }

    /// Serves Exec/Attach/PortForward through `server`.
    pub fn with_streaming(mut self, server: Arc<crate::streaming::StreamingServer>) -> Self {
        self.streaming = Some(server);
        self
    }

    fn streaming(&self) -> Result<&crate::streaming::StreamingServer, Status> {
        self.streaming
            .as_deref()
            .ok_or_else(|| Status::unavailable("the streaming server is not running"))
    }

    /// Runs a lifecycle call to its end on its own task. tonic drops a handler's
    /// future when the client goes away (a kubelet timeout, a killed crictl); a
    /// RunPodSandbox cut off between QEMU's start and its unwind would leave a VM
    /// nobody knows of, so these calls finish (or unwind) whether anyone waits.
    async fn detached<T, F, Fut>(&self, call: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Engine>) -> Fut,
        Fut: std::future::Future<Output = Result<T, crate::engine::RuntimeError>> + Send + 'static,
    {
        tokio::spawn(call(self.engine.clone()))
            .await
            .map_err(|e| Status::internal(format!("runtime task failed: {e}")))?
            .map_err(Status::from)
    }
}

/// Issues that bring the RPCs this foundation does not serve yet.
const ISSUE_CHECKPOINT: &str = "none planned (checkpointing is out of scope)";

fn not_yet<T>(rpc: &str, issue: &str) -> Result<Response<T>, Status> {
    Err(Status::unimplemented(format!(
        "vessel does not implement {rpc} yet; it arrives with the issue: {issue}"
    )))
}

type R<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl RuntimeService for RuntimeSvc {
    async fn version(&self, _req: Request<cri::VersionRequest>) -> R<cri::VersionResponse> {
        Ok(Response::new(cri::VersionResponse {
            version: KUBELET_API_VERSION.into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: RUNTIME_API_VERSION.into(),
        }))
    }

    async fn status(&self, req: Request<cri::StatusRequest>) -> R<cri::StatusResponse> {
        let conditions = vec![
            crate::hostcheck::runtime_condition(self.config.clone()).await,
            crate::podnet::network_condition(self.engine.net()),
        ];
        let mut info = HashMap::new();
        if req.get_ref().verbose {
            let cidr = self.pod_cidr.lock().unwrap_or_else(|p| p.into_inner());
            if !cidr.is_empty() {
                info.insert("podCIDR".to_owned(), cidr.clone());
            }
            let config = serde_json::to_string(&*self.config)
                .map_err(|e| Status::internal(format!("cannot render the config: {e}")))?;
            info.insert("config".to_owned(), config);
            let stats = self.images.stats();
            let stats = serde_json::json!({
                "blobsDownloaded": stats.blobs_downloaded,
                "bytesDownloaded": stats.bytes_downloaded,
                "layersUnpacked": stats.layers_unpacked,
            });
            info.insert("imageStats".to_owned(), stats.to_string());
        }
        // The CRI names the default handler "" (critest looks its features up so);
        // it is listed under its configured name too, for RuntimeClasses naming it.
        let runtime_handlers = std::iter::once(&String::new())
            .chain(self.config.runtimes.keys())
            .map(|name| cri::RuntimeHandler {
                name: name.clone(),
                features: Some(cri::RuntimeHandlerFeatures {
                    recursive_read_only_mounts: true,
                    user_namespaces: true,
                }),
            })
            .collect();
        Ok(Response::new(cri::StatusResponse {
            status: Some(cri::RuntimeStatus { conditions }),
            info,
            runtime_handlers,
            features: Some(cri::RuntimeFeatures {
                supplemental_groups_policy: true,
            }),
        }))
    }

    async fn runtime_config(
        &self,
        _req: Request<cri::RuntimeConfigRequest>,
    ) -> R<cri::RuntimeConfigResponse> {
        Ok(Response::new(cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: cri::CgroupDriver::Cgroupfs as i32,
            }),
        }))
    }

    async fn update_runtime_config(
        &self,
        req: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> R<cri::UpdateRuntimeConfigResponse> {
        // Only the pod CIDR is carried. Pod IPs come from the CNI config (its IPAM
        // range), so the CIDR is kept for Status to show, not used to allocate.
        let cidr = req
            .get_ref()
            .runtime_config
            .as_ref()
            .and_then(|c| c.network_config.as_ref())
            .map(|n| n.pod_cidr.clone())
            .unwrap_or_default();
        tracing::info!(pod_cidr = %cidr, "runtime config updated");
        *self.pod_cidr.lock().unwrap_or_else(|p| p.into_inner()) = cidr;
        Ok(Response::new(cri::UpdateRuntimeConfigResponse {}))
    }

    async fn run_pod_sandbox(
        &self,
        req: Request<cri::RunPodSandboxRequest>,
    ) -> R<cri::RunPodSandboxResponse> {
        let req = req.into_inner();
        let pod_sandbox_id = self
            .detached(|e| async move { e.run_pod(req).await })
            .await?;
        Ok(Response::new(cri::RunPodSandboxResponse { pod_sandbox_id }))
    }

    async fn stop_pod_sandbox(
        &self,
        req: Request<cri::StopPodSandboxRequest>,
    ) -> R<cri::StopPodSandboxResponse> {
        let id = req.into_inner().pod_sandbox_id;
        self.detached(|e| async move { e.stop_pod(&id).await })
            .await?;
        Ok(Response::new(cri::StopPodSandboxResponse {}))
    }

    async fn remove_pod_sandbox(
        &self,
        req: Request<cri::RemovePodSandboxRequest>,
    ) -> R<cri::RemovePodSandboxResponse> {
        let id = req.into_inner().pod_sandbox_id;
        self.detached(|e| async move { e.remove_pod(&id).await })
            .await?;
        Ok(Response::new(cri::RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        req: Request<cri::PodSandboxStatusRequest>,
    ) -> R<cri::PodSandboxStatusResponse> {
        let req = req.into_inner();
        let pod = self
            .engine
            .store()
            .pod(&req.pod_sandbox_id)
            .map_err(store_status)?;
        let mut info = HashMap::new();
        if req.verbose {
            info.insert("info".to_owned(), views::pod_info(&pod).to_string());
        }
        let containers_statuses = self
            .engine
            .store()
            .containers_of(&pod.id)
            .iter()
            .map(views::container_status)
            .collect();
        Ok(Response::new(cri::PodSandboxStatusResponse {
            status: Some(views::pod_status(&pod)),
            info,
            containers_statuses,
            timestamp: now_ns(),
        }))
    }

    async fn list_pod_sandbox(
        &self,
        req: Request<cri::ListPodSandboxRequest>,
    ) -> R<cri::ListPodSandboxResponse> {
        let filter = req.into_inner().filter;
        let items = self
            .engine
            .store()
            .pods()
            .iter()
            .filter(|p| views::pod_matches(p, filter.as_ref()))
            .map(views::pod_sandbox)
            .collect();
        Ok(Response::new(cri::ListPodSandboxResponse { items }))
    }

    async fn create_container(
        &self,
        req: Request<cri::CreateContainerRequest>,
    ) -> R<cri::CreateContainerResponse> {
        let req = req.into_inner();
        let container_id = self
            .detached(|e| async move { e.create_container(req).await })
            .await?;
        Ok(Response::new(cri::CreateContainerResponse { container_id }))
    }

    async fn start_container(
        &self,
        req: Request<cri::StartContainerRequest>,
    ) -> R<cri::StartContainerResponse> {
        let id = req.into_inner().container_id;
        self.detached(|e| async move { e.start_container(&id).await })
            .await?;
        Ok(Response::new(cri::StartContainerResponse {}))
    }

    async fn stop_container(
        &self,
        req: Request<cri::StopContainerRequest>,
    ) -> R<cri::StopContainerResponse> {
        let req = req.into_inner();
        self.detached(|e| async move { e.stop_container(&req.container_id, req.timeout).await })
            .await?;
        Ok(Response::new(cri::StopContainerResponse {}))
    }

    async fn remove_container(
        &self,
        req: Request<cri::RemoveContainerRequest>,
    ) -> R<cri::RemoveContainerResponse> {
        let id = req.into_inner().container_id;
        self.detached(|e| async move { e.remove_container(&id).await })
            .await?;
        Ok(Response::new(cri::RemoveContainerResponse {}))
    }

    async fn list_containers(
        &self,
        req: Request<cri::ListContainersRequest>,
    ) -> R<cri::ListContainersResponse> {
        let filter = req.into_inner().filter;
        let containers = self
            .engine
            .store()
            .containers()
            .iter()
            .filter(|c| views::container_matches(c, filter.as_ref()))
            .map(views::container)
            .collect();
        Ok(Response::new(cri::ListContainersResponse { containers }))
    }

    async fn container_status(
        &self,
        req: Request<cri::ContainerStatusRequest>,
    ) -> R<cri::ContainerStatusResponse> {
        let req = req.into_inner();
        let c = self
            .engine
            .store()
            .container(&req.container_id)
            .map_err(store_status)?;
        let mut info = HashMap::new();
        if req.verbose {
            info.insert("info".to_owned(), views::container_info(&c).to_string());
        }
        Ok(Response::new(cri::ContainerStatusResponse {
            status: Some(views::container_status(&c)),
            info,
        }))
    }

    async fn update_container_resources(
        &self,
        req: Request<cri::UpdateContainerResourcesRequest>,
    ) -> R<cri::UpdateContainerResourcesResponse> {
        self.engine.update_resources(req.into_inner()).await?;
        Ok(Response::new(cri::UpdateContainerResourcesResponse {}))
    }

    async fn reopen_container_log(
        &self,
        req: Request<cri::ReopenContainerLogRequest>,
    ) -> R<cri::ReopenContainerLogResponse> {
        self.engine.reopen_log(&req.get_ref().container_id)?;
        Ok(Response::new(cri::ReopenContainerLogResponse {}))
    }

    async fn exec_sync(&self, req: Request<cri::ExecSyncRequest>) -> R<cri::ExecSyncResponse> {
        Ok(Response::new(
            self.engine.exec_sync(req.into_inner()).await?,
        ))
    }

    async fn exec(&self, req: Request<cri::ExecRequest>) -> R<cri::ExecResponse> {
        Ok(Response::new(self.streaming()?.exec(req.into_inner())?))
    }

    async fn attach(&self, req: Request<cri::AttachRequest>) -> R<cri::AttachResponse> {
        Ok(Response::new(self.streaming()?.attach(req.into_inner())?))
    }

    async fn port_forward(
        &self,
        req: Request<cri::PortForwardRequest>,
    ) -> R<cri::PortForwardResponse> {
        Ok(Response::new(
            self.streaming()?.port_forward(req.into_inner())?,
        ))
    }

    async fn container_stats(
        &self,
        req: Request<cri::ContainerStatsRequest>,
    ) -> R<cri::ContainerStatsResponse> {
        Ok(Response::new(
            self.stats.container_stats(req.into_inner()).await?,
        ))
    }

    async fn list_container_stats(
        &self,
        req: Request<cri::ListContainerStatsRequest>,
    ) -> R<cri::ListContainerStatsResponse> {
        Ok(Response::new(
            self.stats.list_container_stats(req.into_inner()).await?,
        ))
    }

    async fn pod_sandbox_stats(
        &self,
        req: Request<cri::PodSandboxStatsRequest>,
    ) -> R<cri::PodSandboxStatsResponse> {
        Ok(Response::new(
            self.stats.pod_sandbox_stats(req.into_inner()).await?,
        ))
    }

    async fn list_pod_sandbox_stats(
        &self,
        req: Request<cri::ListPodSandboxStatsRequest>,
    ) -> R<cri::ListPodSandboxStatsResponse> {
        Ok(Response::new(
            self.stats.list_pod_sandbox_stats(req.into_inner()).await?,
        ))
    }

    async fn list_metric_descriptors(
        &self,
        _req: Request<cri::ListMetricDescriptorsRequest>,
    ) -> R<cri::ListMetricDescriptorsResponse> {
        Ok(Response::new(self.stats.list_metric_descriptors()))
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _req: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> R<cri::ListPodSandboxMetricsResponse> {
        Ok(Response::new(self.stats.list_pod_sandbox_metrics().await?))
    }

    async fn checkpoint_container(
        &self,
        _req: Request<cri::CheckpointContainerRequest>,
    ) -> R<cri::CheckpointContainerResponse> {
        not_yet("CheckpointContainer", ISSUE_CHECKPOINT)
    }

    type GetContainerEventsStream = crate::events::EventStream;

    async fn get_container_events(
        &self,
        _req: Request<cri::GetEventsRequest>,
    ) -> R<Self::GetContainerEventsStream> {
        Ok(Response::new(self.events.subscribe()))
    }
}
