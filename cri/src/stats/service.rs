//! The stats RPCs of the RuntimeService, over [`Stats`].

use std::collections::HashMap;
use std::sync::Arc;

use k8s_cri::v1 as cri;
use tonic::Status;

use super::{cadvisor, convert, Stats};
use crate::status::store_status;
use crate::store::{ContainerRecord, PodRecord};
use crate::views::labels_match;

impl Stats {
    pub async fn container_stats(
        self: &Arc<Self>,
        req: cri::ContainerStatsRequest,
    ) -> Result<cri::ContainerStatsResponse, Status> {
        let c = self
            .engine
            .store()
            .container(&req.container_id)
            .map_err(store_status)?;
        let sample = self.pod_sample(&c.pod_id).await;
        let fs = self.writable_fs().await;
        Ok(cri::ContainerStatsResponse {
            stats: Some(convert::container_stats(&c, sample.as_deref(), fs)),
        })
    }

    pub async fn list_container_stats(
        self: &Arc<Self>,
        req: cri::ListContainerStatsRequest,
    ) -> Result<cri::ListContainerStatsResponse, Status> {
        let f = req.filter.unwrap_or_default();
        let containers: Vec<ContainerRecord> = self
            .engine
            .store()
            .containers()
            .into_iter()
            .filter(|c| {
                (f.id.is_empty() || c.id.starts_with(&f.id))
                    && (f.pod_sandbox_id.is_empty() || c.pod_id.starts_with(&f.pod_sandbox_id))
                    && labels_match(&c.labels, &f.label_selector)
            })
            .collect();
        let mut pods: Vec<String> = containers.iter().map(|c| c.pod_id.clone()).collect();
        pods.sort();
        pods.dedup();
        let samples = self.pod_samples(pods).await;
        let fs = self.writable_fs().await;
        let stats = containers
            .iter()
            .map(|c| convert::container_stats(c, samples.get(&c.pod_id).map(|s| s.as_ref()), fs))
            .collect();
        Ok(cri::ListContainerStatsResponse { stats })
    }

    pub async fn pod_sandbox_stats(
        self: &Arc<Self>,
        req: cri::PodSandboxStatsRequest,
    ) -> Result<cri::PodSandboxStatsResponse, Status> {
        let pod = self
            .engine
            .store()
            .pod(&req.pod_sandbox_id)
            .map_err(store_status)?;
        let sample = self.pod_sample(&pod.id).await;
        let containers = self.engine.store().containers_of(&pod.id);
        Ok(cri::PodSandboxStatsResponse {
            stats: Some(convert::pod_stats(
                &pod,
                &containers,
                sample.as_deref(),
                self.writable_fs().await,
            )),
        })
    }

    /// The pods a filter selects, with their containers and samples.
    async fn select_pods(
        self: &Arc<Self>,
        id: &str,
        labels: &HashMap<String, String>,
    ) -> Vec<(
        PodRecord,
        Vec<ContainerRecord>,
        Option<Arc<super::PodSample>>,
    )> {
        let pods: Vec<PodRecord> = self
            .engine
            .store()
            .pods()
            .into_iter()
            .filter(|p| (id.is_empty() || p.id.starts_with(id)) && labels_match(&p.labels, labels))
            .collect();
        let mut samples = self
            .pod_samples(pods.iter().map(|p| p.id.clone()).collect())
            .await;
        pods.into_iter()
            .map(|p| {
                let containers = self.engine.store().containers_of(&p.id);
                let sample = samples.remove(&p.id);
                (p, containers, sample)
            })
            .collect()
    }

    pub async fn list_pod_sandbox_stats(
        self: &Arc<Self>,
        req: cri::ListPodSandboxStatsRequest,
    ) -> Result<cri::ListPodSandboxStatsResponse, Status> {
        let f = req.filter.unwrap_or_default();
        let fs = self.writable_fs().await;
        let stats = self
            .select_pods(&f.id, &f.label_selector)
            .await
            .iter()
            .map(|(p, cs, s)| convert::pod_stats(p, cs, s.as_deref(), fs))
            .collect();
        Ok(cri::ListPodSandboxStatsResponse { stats })
    }

    pub fn list_metric_descriptors(&self) -> cri::ListMetricDescriptorsResponse {
        cri::ListMetricDescriptorsResponse {
            descriptors: cadvisor::descriptors(),
        }
    }

    pub async fn list_pod_sandbox_metrics(
        self: &Arc<Self>,
    ) -> Result<cri::ListPodSandboxMetricsResponse, Status> {
        let pod_metrics = self
            .select_pods("", &HashMap::new())
            .await
            .iter()
            .filter_map(|(p, cs, s)| Some(cadvisor::pod_metrics(p, cs, s.as_deref()?)))
            .collect();
        Ok(cri::ListPodSandboxMetricsResponse { pod_metrics })
    }
}
