//! vesseld's own Prometheus metrics (`prometheus-client`), served on `/metrics`
//! when `[metrics] address` is set: CRI call latency, pod start phases, VM boots,
//! image pulls, per-pod VM overhead, agent round trips.
//!
//! One process-wide set: the recording points (the call-log layer, the store's
//! change hook, the stats sampler, the image service) are spread over the crate and
//! recording costs a few atomic operations whether or not anything scrapes.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::stats::host::HostUsage;
use crate::store::{Change, ContainerRecord, PodRecord, PodState};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccelLabels {
    accel: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodLabels {
    pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandlerLabels {
    handler: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    rpc: &'static str,
    result: &'static str,
}

fn seconds_histogram() -> Histogram {
    // 1 ms .. ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

pub struct Metrics {
    cri_calls: Family<CallLabels, Histogram, fn() -> Histogram>,
    pod_start: Family<PhaseLabels, Histogram, fn() -> Histogram>,
    vm_boots: Family<AccelLabels, Counter>,
    image_pulls: Family<ResultLabels, Histogram, fn() -> Histogram>,
    vm_cpu: Family<PodLabels, Gauge<f64, AtomicU64>>,
    vm_memory: Family<PodLabels, Gauge>,
    agent_calls: Family<RpcLabels, Histogram, fn() -> Histogram>,
    pool_warm: Family<HandlerLabels, Gauge>,
    streaming_sessions: Family<PodLabels, Gauge>,
    streaming_refused: Family<ReasonLabels, Counter>,
    /// Set once the image store exists: its cumulative download counters.
    image_bytes: OnceLock<vessel_image::ImageStore>,
}

static METRICS: OnceLock<Arc<Metrics>> = OnceLock::new();

/// The process-wide metrics.
pub fn get() -> &'static Arc<Metrics> {
    METRICS.get_or_init(|| {
        Arc::new(Metrics {
            cri_calls: Family::new_with_constructor(seconds_histogram),
            pod_start: Family::new_with_constructor(seconds_histogram),
            vm_boots: Family::default(),
            image_pulls: Family::new_with_constructor(seconds_histogram),
            vm_cpu: Family::default(),
            vm_memory: Family::default(),
            agent_calls: Family::new_with_constructor(seconds_histogram),
            pool_warm: Family::default(),
            streaming_sessions: Family::default(),
            streaming_refused: Family::default(),
            image_bytes: OnceLock::new(),
        })
    })
}

impl Metrics {
    pub fn cri_call(&self, method: &str, code: tonic::Code, latency: Duration) {
        self.cri_calls
            .get_or_create(&CallLabels {
                method: method.to_owned(),
                code: format!("{code:?}"),
            })
            .observe(latency.as_secs_f64());
    }

    pub fn agent_call(&self, rpc: &'static str, latency: Duration, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.agent_calls
            .get_or_create(&RpcLabels { rpc, result })
            .observe(latency.as_secs_f64());
    }

    pub fn image_pull(&self, elapsed: Duration, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.image_pulls
            .get_or_create(&ResultLabels { result })
            .observe(elapsed.as_secs_f64());
    }

    /// Warm (pre-booted, unclaimed) VMs in `handler`'s pool.
    pub fn pool_warm(&self, handler: &str, n: usize) {
        self.pool_warm
            .get_or_create(&HandlerLabels {
                handler: handler.to_owned(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Open streaming sessions into a pod; at 0 its label set goes, so the
    /// family holds only pods with sessions.
    pub fn streaming_sessions(&self, pod_id: &str, n: usize) {
        let pod = PodLabels {
            pod: pod_id.to_owned(),
        };
        if n == 0 {
            self.streaming_sessions.remove(&pod);
        } else {
            self.streaming_sessions
                .get_or_create(&pod)
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// A streaming session refused: node_cap, pod_cap or pod_rate.
    pub fn streaming_refused(&self, reason: &'static str) {
        self.streaming_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn set_image_store(&self, store: vessel_image::ImageStore) {
        let _ = self.image_bytes.set(store);
    }

    pub fn vm_overhead(&self, pod_id: &str, usage: &HostUsage) {
        let pod = PodLabels {
            pod: pod_id.to_owned(),
        };
        self.vm_cpu
            .get_or_create(&pod)
            .set(usage.cpu_ns as f64 / 1e9);
        self.vm_memory
            .get_or_create(&pod)
            .set(i64::try_from(usage.memory_bytes).unwrap_or(i64::MAX));
    }

    /// The store's change hook: pod starts (phases, boots) and removals.
    pub fn observe_change(
        &self,
        change: Change<'_>,
        _: Option<&PodRecord>,
        _: &[&ContainerRecord],
    ) {
        let Change::Pod { old, new } = change else {
            return;
        };
        match (old, new) {
            (Some(o), Some(n)) if o.state != PodState::Ready && n.state == PodState::Ready => {
                let Some(vm) = &n.vm else { return };
                self.vm_boots
                    .get_or_create(&AccelLabels {
                        accel: vm.accel.clone(),
                    })
                    .inc();
                let t = &vm.startup;
                for (phase, ms) in [
                    ("network", t.network_ms),
                    ("share", t.share_ms),
                    ("scratch_disk", t.scratch_disk_ms),
                    ("helpers", t.helpers_ms),
                    ("vm_to_agent", t.vm_to_agent_ms),
                    ("guest_network", t.guest_network_ms),
                    ("total", t.total_ms),
                ] {
                    self.pod_start
                        .get_or_create(&PhaseLabels { phase })
                        .observe(ms as f64 / 1000.0);
                }
            }
            (Some(o), None) => {
                let pod = PodLabels { pod: o.id.clone() };
                self.vm_cpu.remove(&pod);
                self.vm_memory.remove(&pod);
                self.streaming_sessions.remove(&pod);
            }
            _ => {}
        }
    }

    fn registry(self: &Arc<Self>) -> Registry {
        let mut r = Registry::with_prefix("vessel");
        r.register(
            "cri_call_duration_seconds",
            "Latency of CRI calls by method and gRPC code",
            self.cri_calls.clone(),
        );
        r.register(
            "pod_start_phase_seconds",
            "Time RunPodSandbox spent in each phase",
            self.pod_start.clone(),
        );
        r.register(
            "vm_boots",
            "Pod VMs booted, by accelerator",
            self.vm_boots.clone(),
        );
        r.register(
            "image_pull_duration_seconds",
            "Duration of PullImage calls by result",
            self.image_pulls.clone(),
        );
        r.register(
            "pod_vm_cpu_seconds",
            "Host CPU used by a pod's VM (QEMU and helpers), cumulative",
            self.vm_cpu.clone(),
        );
        r.register(
            "pod_vm_memory_bytes",
            "Host memory charged to a pod's VM (QEMU and helpers)",
            self.vm_memory.clone(),
        );
        r.register(
            "agent_call_duration_seconds",
            "Round trips to pod agents by RPC and result",
            self.agent_calls.clone(),
        );
        r.register(
            "pool_warm_vms",
            "Pre-booted pod VMs waiting in a runtime handler's warm pool",
            self.pool_warm.clone(),
        );
        r.register(
            "streaming_sessions",
            "Open streaming sessions (exec, attach, port-forward) by pod",
            self.streaming_sessions.clone(),
        );
        r.register(
            "streaming_sessions_refused",
            "Streaming sessions refused, by the limit that refused them",
            self.streaming_refused.clone(),
        );
        r.register_collector(Box::new(ImageBytes(self.clone())));
        // The registry is built per scrape, so a constant holds the current value.
        r.register(
            "image_registry_refused_bytes",
            "Bytes registries sent or declared past vesseld's caps on token, manifest \
             and error bodies, left unread",
            ConstCounter::new(vessel_image::registry_bytes_refused()),
        );
        r.register_collector(Box::new(LogDroppedBytes));
        r
    }

    /// The OpenMetrics text of everything.
    pub fn render(self: &Arc<Self>) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry());
        out
    }
}

/// The image store's download counter, read at scrape time.
#[derive(Debug)]
struct ImageBytes(Arc<Metrics>);

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Collector for ImageBytes {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let bytes = self
            .0
            .image_bytes
            .get()
            .map(|s| s.stats().bytes_downloaded)
            .unwrap_or(0);
        let counter = ConstCounter::new(bytes);
        let m = encoder.encode_descriptor(
            "image_pull_bytes",
            "Bytes of image blobs downloaded from registries",
            None,
            counter.metric_type(),
        )?;
        counter.encode(m)
    }
}

/// Container output dropped by capped logs, read at scrape time.
#[derive(Debug)]
struct LogDroppedBytes;

impl Collector for LogDroppedBytes {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counter = ConstCounter::new(crate::crilog::dropped_bytes());
        let m = encoder.encode_descriptor(
            "container_log_dropped_bytes",
            "Container output bytes dropped because a log reached [containers] log_size_max",
            None,
            counter.metric_type(),
        )?;
        counter.encode(m)
    }
}

/// Serves `/metrics` on `addr` until the process ends. Binding errors are the
/// caller's (a configured address that cannot be bound stops start-up).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

pub async fn serve(listener: tokio::net::TcpListener) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                |req: hyper::Request<hyper::body::Incoming>| async move {
                    let resp = if req.uri().path() == "/metrics" {
                        hyper::Response::builder()
                            .header(
                                "content-type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(Full::new(Bytes::from(get().render())))
                    } else {
                        hyper::Response::builder()
                            .status(404)
                            .body(Full::new(Bytes::from_static(b"see /metrics\n")))
                    };
                    resp.map_err(std::io::Error::other)
                },
            );
            let io = hyper_util::rt::TokioIo::new(stream);
            // A scraper that stalls holds only its own connection task.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                // `printf req | nc` shuts its sending side before the answer comes.
                .half_close(true)
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(io, service);
            if let Err(e) = tokio::time::timeout(Duration::from_secs(60), conn).await {
                tracing::debug!(error = %e, "metrics: connection timed out");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family() {
        let m = get();
        m.cri_call(
            "RuntimeService/Version",
            tonic::Code::Ok,
            Duration::from_millis(3),
        );
        m.agent_call("PodStats", Duration::from_millis(1), true);
        m.image_pull(Duration::from_secs(1), false);
        m.vm_overhead(
            "p1",
            &HostUsage {
                cpu_ns: 2_500_000_000,
                memory_bytes: 1 << 20,
            },
        );
        let mut old = crate::store::tests::pod("p1", "web", 0);
        old.state = PodState::NotReady;
        let mut new = old.clone();
        new.state = PodState::Ready;
        new.vm = Some(crate::store::VmFacts {
            pid: 1,
            accel: "tcg".into(),
            vcpus: 1,
            memory_mib: 256,
            startup: crate::store::StartupTimings {
                total_ms: 1500,
                ..Default::default()
            },
        });
        let ready = Change::Pod {
            old: Some(&old),
            new: Some(&new),
        };
        m.observe_change(ready, Some(&new), &[]);
        let text = m.render();
        for family in [
            "vessel_cri_call_duration_seconds_bucket{",
            "method=\"RuntimeService/Version\"",
            "code=\"Ok\"",
            "vessel_agent_call_duration_seconds_count{rpc=\"PodStats\",result=\"ok\"} 1",
            "vessel_image_pull_duration_seconds_count{result=\"error\"} 1",
            "vessel_pod_vm_cpu_seconds{pod=\"p1\"} 2.5",
            "vessel_pod_vm_memory_bytes{pod=\"p1\"} 1048576",
            "vessel_image_pull_bytes_total 0",
            "vessel_image_registry_refused_bytes_total ",
            "vessel_pod_start_phase_seconds_sum{phase=\"total\"} 1.5",
            "vessel_vm_boots_total{accel=\"tcg\"} 1",
            "# EOF",
        ] {
            assert!(text.contains(family), "{family} missing in:\n{text}");
        }
    }
}
