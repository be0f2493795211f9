//! ListMetricDescriptors / ListPodSandboxMetrics: the samples under the cAdvisor
//! metric names the kubelet serves on /metrics/cadvisor when it takes pod and
//! container stats from the CRI. The kubelet turns each descriptor into a
//! Prometheus description and each Metric into a sample, with `label_values` in
//! the order of the descriptor's `label_keys`.

use k8s_cri::v1 as cri;

use super::PodSample;
use crate::store::{ContainerRecord, PodRecord};

/// Labels of every metric (cAdvisor's, for dashboards' sake).
const LABELS: &[&str] = &["container", "id", "image", "name", "namespace", "pod"];
/// Network metrics add the interface.
const NET_LABELS: &[&str] = &[
    "container",
    "id",
    "image",
    "name",
    "namespace",
    "pod",
    "interface",
];

/// (name, help, type, per interface)
const METRICS: &[(&str, &str, cri::MetricType, bool)] = &[
    (
        "container_cpu_usage_seconds_total",
        "Cumulative cpu time consumed in seconds.",
        cri::MetricType::Counter,
        false,
    ),
    (
        "container_memory_usage_bytes",
        "Current memory usage in bytes, including all memory regardless of when it was accessed.",
        cri::MetricType::Gauge,
        false,
    ),
    (
        "container_memory_working_set_bytes",
        "Current working set in bytes.",
        cri::MetricType::Gauge,
        false,
    ),
    (
        "container_memory_rss",
        "Size of RSS in bytes.",
        cri::MetricType::Gauge,
        false,
    ),
    (
        "container_spec_memory_limit_bytes",
        "Memory limit for the container.",
        cri::MetricType::Gauge,
        false,
    ),
    (
        "container_oom_events_total",
        "Count of out of memory events observed for the container.",
        cri::MetricType::Counter,
        false,
    ),
    (
        "container_processes",
        "Number of processes running inside the container.",
        cri::MetricType::Gauge,
        false,
    ),
    (
        "container_network_receive_bytes_total",
        "Cumulative count of bytes received.",
        cri::MetricType::Counter,
        true,
    ),
    (
        "container_network_transmit_bytes_total",
        "Cumulative count of bytes transmitted.",
        cri::MetricType::Counter,
        true,
    ),
    (
        "container_network_receive_errors_total",
        "Cumulative count of errors encountered while receiving.",
        cri::MetricType::Counter,
        true,
    ),
    (
        "container_network_transmit_errors_total",
        "Cumulative count of errors encountered while transmitting.",
        cri::MetricType::Counter,
        true,
    ),
];

pub fn descriptors() -> Vec<cri::MetricDescriptor> {
    METRICS
        .iter()
        .map(|(name, help, _, net)| cri::MetricDescriptor {
            name: (*name).into(),
            help: (*help).into(),
            label_keys: (if *net { NET_LABELS } else { LABELS })
                .iter()
                .map(|s| (*s).into())
                .collect(),
        })
        .collect()
}

fn metric(name: &str, timestamp: i64, labels: Vec<String>, value: u64) -> cri::Metric {
    let metric_type = METRICS
        .iter()
        .find(|m| m.0 == name)
        .map(|m| m.2)
        .unwrap_or(cri::MetricType::Gauge);
    cri::Metric {
        name: name.into(),
        timestamp,
        metric_type: metric_type as i32,
        label_values: labels,
        value: Some(cri::UInt64Value { value }),
    }
}

fn container_metrics(
    p: &PodRecord,
    c: &ContainerRecord,
    sample: &PodSample,
) -> cri::ContainerMetrics {
    let labels = || {
        vec![
            c.name.clone(),
            c.id.clone(),
            c.image.clone(),
            c.name.clone(),
            p.namespace.clone(),
            p.name.clone(),
        ]
    };
    let t = sample.taken_ns;
    let metrics = match sample.container(&c.id) {
        Some(s) => vec![
            // The CRI carries integers: whole seconds (the kubelet's own cAdvisor
            // path has the same integer limit for this metric through the CRI).
            metric(
                "container_cpu_usage_seconds_total",
                t,
                labels(),
                s.cpu_usage_usec / 1_000_000,
            ),
            metric(
                "container_memory_usage_bytes",
                t,
                labels(),
                s.memory_usage_bytes,
            ),
            metric(
                "container_memory_working_set_bytes",
                t,
                labels(),
                s.memory_working_set_bytes,
            ),
            metric("container_memory_rss", t, labels(), s.memory_rss_bytes),
            metric(
                "container_spec_memory_limit_bytes",
                t,
                labels(),
                s.memory_limit_bytes,
            ),
            metric("container_oom_events_total", t, labels(), s.oom_events),
            metric("container_processes", t, labels(), s.pids_current),
        ],
        None => Vec::new(),
    };
    cri::ContainerMetrics {
        container_id: c.id.clone(),
        metrics,
    }
}

/// Network metrics are the pod's (its interfaces are shared by its containers),
/// labelled like cAdvisor's pod-level series (empty container name).
pub fn pod_metrics(
    p: &PodRecord,
    containers: &[ContainerRecord],
    sample: &PodSample,
) -> cri::PodSandboxMetrics {
    let t = sample.taken_ns;
    let mut metrics = Vec::new();
    for i in sample.guest.iter().flat_map(|g| &g.interfaces) {
        let labels = || {
            vec![
                String::new(),
                p.id.clone(),
                String::new(),
                String::new(),
                p.namespace.clone(),
                p.name.clone(),
                i.name.clone(),
            ]
        };
        metrics.push(metric(
            "container_network_receive_bytes_total",
            t,
            labels(),
            i.rx_bytes,
        ));
        metrics.push(metric(
            "container_network_transmit_bytes_total",
            t,
            labels(),
            i.tx_bytes,
        ));
        metrics.push(metric(
            "container_network_receive_errors_total",
            t,
            labels(),
            i.rx_errors,
        ));
        metrics.push(metric(
            "container_network_transmit_errors_total",
            t,
            labels(),
            i.tx_errors,
        ));
    }
    cri::PodSandboxMetrics {
        pod_sandbox_id: p.id.clone(),
        metrics,
        container_metrics: containers
            .iter()
            .map(|c| container_metrics(p, c, sample))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_name_the_kubelet_metrics_with_matching_labels() {
        let d = descriptors();
        for want in [
            "container_cpu_usage_seconds_total",
            "container_memory_working_set_bytes",
            "container_memory_rss",
            "container_memory_usage_bytes",
            "container_network_receive_bytes_total",
            "container_network_transmit_bytes_total",
        ] {
            assert!(d.iter().any(|m| m.name == want), "{want}");
        }
        let net = d
            .iter()
            .find(|m| m.name == "container_network_receive_bytes_total")
            .unwrap();
        assert_eq!(net.label_keys.last().map(String::as_str), Some("interface"));
    }
}
