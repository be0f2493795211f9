//! Container and pod stats: one PodStats round trip per pod VM, cached briefly so a
//! kubelet (or many crictl calls) polling every pod costs at most one agent call per
//! pod per [`MAX_AGE`], whatever the number of callers and calls.

pub mod cadvisor;
pub mod convert;
pub mod cpu;
pub mod host;
mod service;
pub mod vet;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::clock::now_ns;
use crate::engine::Engine;
use cpu::CpuSample;
use host::HostUsage;
use vet::GuestSample;

/// A sample younger than this is served from the cache.
pub const MAX_AGE: Duration = Duration::from_secs(1);
/// How long one PodStats call may take; a slower guest gets its last sample served.
const AGENT_LIMIT: Duration = Duration::from_secs(2);
/// After a failed call the pod is not asked again for this long (a stalled guest
/// would otherwise cost every caller [`AGENT_LIMIT`]).
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// The memory bound of a VM whose size is not recorded yet (1 TiB).
const UNKNOWN_VM_MEMORY: u64 = 1 << 40;

/// One pod's numbers at one instant.
#[derive(Debug, Clone)]
pub struct PodSample {
    pub at: Instant,
    /// Host wall clock, for the CRI timestamps.
    pub taken_ns: i64,
    /// None when the agent did not answer.
    pub guest: Option<GuestSample>,
    /// QEMU and helpers on the host.
    pub host: HostUsage,
    /// Rates against the previous sample (absent on the first).
    pub container_nano_cores: HashMap<String, u64>,
    pub host_nano_cores: Option<u64>,
}

impl PodSample {
    pub fn container(&self, id: &str) -> Option<&vessel_proto::agent::ContainerStatsResponse> {
        self.guest.as_ref()?.containers.get(id)
    }
}

#[derive(Default)]
struct Entry {
    latest: Option<Arc<PodSample>>,
    failed_at: Option<Instant>,
    /// The pod's containers (vesseld's view) when `latest` was taken.
    known: HashSet<String>,
}

impl Entry {
    /// What to answer without asking the agent: Some(fresh sample), or Some(last
    /// sample, maybe none) while a failed pod waits out [`RETRY_AFTER`]; None: sample.
    /// A container created since the last sample makes it stale (a caller asking for
    /// a new container's stats gets them at once).
    fn cached(&self, now: Instant, known: &HashSet<String>) -> Option<Option<Arc<PodSample>>> {
        let age = |t: Instant| now.saturating_duration_since(t);
        if self.failed_at.is_none() && !known.is_subset(&self.known) {
            return None;
        }
        if let Some(l) = self.latest.as_ref().filter(|l| age(l.at) < MAX_AGE) {
            return Some(Some(l.clone()));
        }
        if self.failed_at.is_some_and(|f| age(f) < RETRY_AFTER) {
            return Some(self.latest.clone());
        }
        None
    }
}

pub struct Stats {
    engine: Arc<Engine>,
    /// Per pod; the async lock makes concurrent callers share one agent call.
    cache: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Entry>>>>,
    /// The scratch disks' dir: containers' writable layers live there on the host.
    scratch_dir: std::path::PathBuf,
    /// Its mount point, found once: the kubelet stats this host path.
    writable_fs: tokio::sync::OnceCell<String>,
}

impl Stats {
    pub fn new(engine: Arc<Engine>, scratch_dir: std::path::PathBuf) -> Self {
        Stats {
            engine,
            cache: Mutex::default(),
            scratch_dir,
            writable_fs: tokio::sync::OnceCell::new(),
        }
    }

    /// The host filesystem containers' writable layers are accounted to (what
    /// ImageFsInfo reports as the container filesystem), never a guest path: the
    /// kubelet stats it.
    async fn writable_fs(&self) -> &str {
        self.writable_fs
            .get_or_init(|| async {
                let dir = self.scratch_dir.clone();
                tokio::task::spawn_blocking(move || crate::scratch::scratch_mountpoint(&dir))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_else(|| std::path::PathBuf::from("/"))
                    .display()
                    .to_string()
            })
            .await
    }

    fn entry(&self, pod_id: &str) -> Arc<tokio::sync::Mutex<Entry>> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        // Forget pods that are gone (cheap: one pass per new entry).
        if !cache.contains_key(pod_id) {
            cache.retain(|id, _| self.engine.live_pod(id).is_some());
        }
        cache.entry(pod_id.to_owned()).or_default().clone()
    }

    /// The pod's latest sample, taken now if the cached one is older than
    /// [`MAX_AGE`]. None for a pod without a running VM.
    pub async fn pod_sample(&self, pod_id: &str) -> Option<Arc<PodSample>> {
        let live = self.engine.live_pod(pod_id)?;
        // Stats come from the real agent and host processes only.
        let vm = live.vm.pod_vm()?;
        let entry = self.entry(pod_id);
        let mut e = entry.lock().await;
        let known: HashSet<String> = self
            .engine
            .store()
            .containers_of(pod_id)
            .into_iter()
            .map(|c| c.id)
            .collect();
        if let Some(cached) = e.cached(Instant::now(), &known) {
            return cached;
        }
        let pod = self.engine.store().pod(pod_id).ok()?;
        let (vcpus, memory_cap) = pod
            .vm
            .as_ref()
            .map(|v| (v.vcpus, v.memory_mib.saturating_mul(1 << 20)))
            // Facts are recorded once the VM answered; until then a loose bound.
            .unwrap_or((1, UNKNOWN_VM_MEMORY));

        // Observed in the agent metrics by the sandbox crate's call observer.
        let reply = vm.agent().pod_stats(AGENT_LIMIT).await;
        let cgroup = vm
            .cgroup()
            .filter(|c| c.unified)
            .and_then(|c| c.dirs.first().cloned());
        let pids = vm.pids();
        let host = tokio::task::spawn_blocking(move || host::usage(cgroup.as_deref(), &pids))
            .await
            .unwrap_or_default();
        let at = Instant::now();
        let guest = match reply {
            Ok(r) => {
                e.failed_at = None;
                Some(vet::vet(r, &known, memory_cap))
            }
            Err(err) => {
                tracing::debug!(pod = %pod_id, error = %err, "pod stats: the agent did not answer");
                e.failed_at = Some(at);
                None
            }
        };
        let sample = Arc::new(rate(e.latest.as_deref(), at, guest, host, vcpus));
        crate::metrics::get().vm_overhead(pod_id, &sample.host);
        e.latest = Some(sample.clone());
        e.known = known;
        Some(sample)
    }

    /// Samples of many pods at once (each pod at most one agent call).
    pub async fn pod_samples(
        self: &Arc<Self>,
        pod_ids: Vec<String>,
    ) -> HashMap<String, Arc<PodSample>> {
        let mut tasks = tokio::task::JoinSet::new();
        for id in pod_ids {
            let me = self.clone();
            tasks.spawn(async move {
                let s = me.pod_sample(&id).await;
                (id, s)
            });
        }
        let mut out = HashMap::new();
        while let Some(r) = tasks.join_next().await {
            if let Ok((id, Some(s))) = r {
                out.insert(id, s);
            }
        }
        out
    }
}

/// A new sample with its rates against `prev`.
fn rate(
    prev: Option<&PodSample>,
    at: Instant,
    guest: Option<GuestSample>,
    host: HostUsage,
    vcpus: u32,
) -> PodSample {
    let mut container_nano_cores = HashMap::new();
    let mut host_nano_cores = None;
    if let Some(prev) = prev {
        if let (Some(g), Some(pg)) = (&guest, &prev.guest) {
            for (id, s) in &g.containers {
                let Some(p) = pg.containers.get(id) else {
                    continue;
                };
                let a = CpuSample {
                    at: prev.at,
                    usage_ns: p.cpu_usage_usec.saturating_mul(1000),
                };
                let b = CpuSample {
                    at,
                    usage_ns: s.cpu_usage_usec.saturating_mul(1000),
                };
                if let Some(n) = cpu::nano_cores(a, b, vcpus) {
                    container_nano_cores.insert(id.clone(), n);
                }
            }
        }
        let a = CpuSample {
            at: prev.at,
            usage_ns: prev.host.cpu_ns,
        };
        let b = CpuSample {
            at,
            usage_ns: host.cpu_ns,
        };
        host_nano_cores = cpu::nano_cores(a, b, crate::vmsize::host_cpus());
    }
    PodSample {
        at,
        taken_ns: now_ns(),
        guest,
        host,
        container_nano_cores,
        host_nano_cores,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vessel_proto::agent as pb;

    fn guest(cpu_usec: u64) -> GuestSample {
        GuestSample {
            containers: [(
                "c".to_owned(),
                pb::ContainerStatsResponse {
                    cpu_usage_usec: cpu_usec,
                    ..Default::default()
                },
            )]
            .into(),
            ..Default::default()
        }
    }

    #[test]
    fn cache_serves_young_samples_and_backs_off_after_failures() {
        let t0 = Instant::now();
        let sample = Arc::new(rate(None, t0, Some(guest(0)), HostUsage::default(), 1));
        let c: HashSet<String> = ["c".to_owned()].into();
        let mut e = Entry::default();
        assert!(e.cached(t0, &c).is_none(), "nothing cached: sample");
        e.latest = Some(sample.clone());
        e.known = c.clone();
        let hit = e.cached(t0 + MAX_AGE / 2, &c).expect("fresh");
        assert!(Arc::ptr_eq(&hit.unwrap(), &sample));
        assert!(e.cached(t0 + MAX_AGE, &c).is_none(), "stale: sample again");
        let new: HashSet<String> = ["c".to_owned(), "d".to_owned()].into();
        assert!(
            e.cached(t0, &new).is_none(),
            "a new container: sample again"
        );
        assert!(
            e.cached(t0, &HashSet::new()).is_some(),
            "a removed one is fine"
        );
        // The agent failed at t0 + MAX_AGE: the old sample is served until RETRY_AFTER.
        e.failed_at = Some(t0 + MAX_AGE);
        let served = e
            .cached(t0 + MAX_AGE + RETRY_AFTER / 2, &new)
            .expect("backing off");
        assert!(Arc::ptr_eq(&served.unwrap(), &sample));
        assert!(e.cached(t0 + MAX_AGE + RETRY_AFTER, &c).is_none(), "retry");
        let none = Entry {
            latest: None,
            failed_at: Some(t0),
            known: HashSet::new(),
        };
        assert_eq!(none.cached(t0, &c).map(|s| s.is_none()), Some(true));
    }

    #[test]
    fn rates_come_from_the_previous_sample() {
        let t0 = Instant::now();
        let first = rate(None, t0, Some(guest(0)), HostUsage::default(), 2);
        assert!(first.container_nano_cores.is_empty());
        assert_eq!(first.host_nano_cores, None);
        let host = HostUsage {
            cpu_ns: 500_000_000,
            memory_bytes: 1,
        };
        let second = rate(
            Some(&first),
            t0 + Duration::from_secs(1),
            Some(guest(900_000)),
            host,
            2,
        );
        assert_eq!(second.container_nano_cores["c"], 900_000_000);
        assert_eq!(second.host_nano_cores, Some(500_000_000));
        // A failed guest call keeps host numbers, has no container rates.
        let third = rate(Some(&second), t0 + Duration::from_secs(2), None, host, 2);
        assert!(third.container_nano_cores.is_empty());
        assert_eq!(third.host_nano_cores, Some(0));
    }
}
