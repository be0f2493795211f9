//! Who may open a streaming session: a per-pod share and a per-pod rate of new
//! sessions, under the node-wide cap. Without the share, one client holding
//! `max_sessions` idle exec/port-forward sessions into one pod left every other
//! tenant without exec, attach or port-forward.
//!
//! The pod's slot is checked before the node's permit is taken (both under one
//! lock), so a flooded pod never holds more node permits than its share. The per-pod
//! entry goes away once its pod has no sessions and its rate bucket is full again:
//! the map holds only pods with open sessions or a recent burst, and dropping an
//! entry earlier would let close-and-reopen reset the rate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::StreamingConfig;

/// Why a session was refused; the message names the config key that refused it.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum Refused {
    #[error(
        "too many streaming sessions on this node ([streaming] max_sessions = {0}); retry later"
    )]
    NodeCap(usize),
    #[error("too many streaming sessions into this pod ([streaming] max_sessions_per_pod = {0}); close some or retry later")]
    PodCap(usize),
    #[error("new streaming sessions into this pod come too fast ([streaming] sessions_per_pod_per_s = {0}, sessions_per_pod_burst = {1}); retry later")]
    PodRate(f64, u32),
}

impl Refused {
    /// The `reason` label of the refusal counter.
    pub fn reason(&self) -> &'static str {
        match self {
            Refused::NodeCap(_) => "node_cap",
            Refused::PodCap(_) => "pod_cap",
            Refused::PodRate(..) => "pod_rate",
        }
    }
}

struct PodEntry {
    open: usize,
    /// Token bucket of new sessions, refilled at `rate` per second up to `burst`.
    tokens: f64,
    refilled: Instant,
}

impl PodEntry {
    fn refill(&mut self, now: Instant, rate: f64, burst: f64) {
        let dt = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(burst);
        self.refilled = now;
    }

    /// Nothing left to remember: no sessions and a full bucket.
    fn idle(&self, now: Instant, rate: f64, burst: f64) -> bool {
        let dt = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.open == 0 && self.tokens + dt * rate >= burst
    }
}

pub struct SessionLimits {
    node: Arc<Semaphore>,
    max_sessions: usize,
    per_pod: usize,
    rate: f64,
    burst: u32,
    pods: Mutex<HashMap<String, PodEntry>>,
}

impl SessionLimits {
    pub fn new(config: &StreamingConfig) -> Arc<Self> {
        Arc::new(Self {
            node: Arc::new(Semaphore::new(config.max_sessions)),
            max_sessions: config.max_sessions,
            per_pod: config.per_pod_cap(),
            rate: config.sessions_per_pod_per_s,
            burst: config.sessions_per_pod_burst,
            pods: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, PodEntry>> {
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A session slot for `pod`, held until the returned permit drops. Never waits.
    pub fn acquire(self: &Arc<Self>, pod: &str) -> Result<SessionPermit, Refused> {
        let r = self.try_acquire(pod);
        if let Err(e) = &r {
            crate::metrics::get().streaming_refused(e.reason());
        }
        r
    }

    fn try_acquire(self: &Arc<Self>, pod: &str) -> Result<SessionPermit, Refused> {
        let now = Instant::now();
        let burst = f64::from(self.burst);
        let mut pods = self.lock();
        // Bounded by the pods with sessions or a recent burst; each check is cheap.
        pods.retain(|_, e| !e.idle(now, self.rate, burst));
        let entry = pods.entry(pod.to_owned()).or_insert(PodEntry {
            open: 0,
            tokens: burst,
            refilled: now,
        });
        entry.refill(now, self.rate, burst);
        let refused = if entry.open >= self.per_pod {
            Some(Refused::PodCap(self.per_pod))
        } else if entry.tokens < 1.0 {
            Some(Refused::PodRate(self.rate, self.burst))
        } else {
            None
        };
        let node = match refused {
            Some(r) => Err(r),
            // Only after the pod's share allowed it: a flooded pod cannot take node
            // permits beyond its share.
            None => self
                .node
                .clone()
                .try_acquire_owned()
                .map_err(|_| Refused::NodeCap(self.max_sessions)),
        };
        match node {
            Ok(node) => {
                entry.tokens -= 1.0;
                entry.open += 1;
                crate::metrics::get().streaming_sessions(pod, entry.open);
                Ok(SessionPermit {
                    limits: self.clone(),
                    pod: pod.to_owned(),
                    _node: node,
                })
            }
            Err(r) => {
                if entry.idle(now, self.rate, burst) {
                    pods.remove(pod);
                }
                Err(r)
            }
        }
    }

    fn release(&self, pod: &str) {
        let now = Instant::now();
        let burst = f64::from(self.burst);
        let mut pods = self.lock();
        let Some(entry) = pods.get_mut(pod) else {
            return;
        };
        entry.open = entry.open.saturating_sub(1);
        // Under the map's lock, so the gauge follows the map's order of events.
        crate::metrics::get().streaming_sessions(pod, entry.open);
        if entry.idle(now, self.rate, burst) {
            pods.remove(pod);
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.lock().len()
    }

    #[cfg(test)]
    fn node_available(&self) -> usize {
        self.node.available_permits()
    }
}

/// One open session: its pod's slot and a node permit, both given back on drop.
pub struct SessionPermit {
    limits: Arc<SessionLimits>,
    pod: String,
    _node: OwnedSemaphorePermit,
}

impl Drop for SessionPermit {
    fn drop(&mut self) {
        self.limits.release(&self.pod);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(max: usize, per_pod: usize, rate: f64, burst: u32) -> Arc<SessionLimits> {
        SessionLimits::new(&StreamingConfig {
            max_sessions: max,
            max_sessions_per_pod: Some(per_pod),
            sessions_per_pod_per_s: rate,
            sessions_per_pod_burst: burst,
            ..Default::default()
        })
    }

    #[test]
    fn a_flooded_pod_leaves_node_permits_to_others() {
        let l = limits(8, 4, 1000.0, 100);
        let a: Vec<_> = (0..4).map(|_| l.acquire("lim-a").unwrap()).collect();
        assert_eq!(l.acquire("lim-a").err(), Some(Refused::PodCap(4)));
        assert_eq!(l.node_available(), 4, "a refused pod took a node permit");
        let b: Vec<_> = (0..4).map(|_| l.acquire("lim-b").unwrap()).collect();
        // The node cap still holds over all pods.
        assert_eq!(l.acquire("lim-c").err(), Some(Refused::NodeCap(8)));
        assert_eq!(l.tracked(), 2, "a refused pod left an entry behind");
        drop(b);
        assert_eq!(l.node_available(), 4);
        let text = crate::metrics::get().render();
        assert!(
            text.contains("vessel_streaming_sessions{pod=\"lim-a\"} 4"),
            "{text}"
        );
        assert!(!text.contains("pod=\"lim-b\""), "gauge kept a pod at 0");
        for reason in ["pod_cap", "node_cap"] {
            assert!(
                text.contains(&format!(
                    "vessel_streaming_sessions_refused_total{{reason=\"{reason}\"}}"
                )),
                "{reason} missing: {text}"
            );
        }
        drop(a);
        assert_eq!(l.node_available(), 8);
        // Both buckets refill within 0.1 s; the next acquire sweeps them, leaving
        // only the probe's own entry (its bucket is one short).
        std::thread::sleep(Duration::from_millis(150));
        drop(l.acquire("lim-c").unwrap());
        assert_eq!(l.tracked(), 1, "per-pod entries outlived their sessions");
    }

    #[test]
    fn new_sessions_are_rate_limited_per_pod_and_released() {
        // 5/s with a burst of 3: three at once, then one every 200 ms (wide
        // margins: the test machine may stall a thread for tens of ms).
        let l = limits(64, 64, 5.0, 3);
        for _ in 0..3 {
            drop(l.acquire("rate-a").unwrap());
        }
        // Closing sessions does not give the burst back early.
        assert!(matches!(
            l.acquire("rate-a").err(),
            Some(Refused::PodRate(..))
        ));
        // Another pod has a bucket of its own.
        drop(l.acquire("rate-b").unwrap());
        std::thread::sleep(Duration::from_millis(250));
        let p = l.acquire("rate-a").expect("refilled after 1/rate");
        assert!(matches!(
            l.acquire("rate-a").err(),
            Some(Refused::PodRate(..))
        ));
        assert_eq!(l.node_available(), 63);
        drop(p);
        assert_eq!(l.node_available(), 64, "permit not released on drop");
        // A full bucket and no sessions: nothing is kept for the pod (the probe's
        // own entry is the one left).
        std::thread::sleep(Duration::from_millis(700));
        drop(l.acquire("rate-c").unwrap());
        assert_eq!(l.tracked(), 1);
        let msg = Refused::PodRate(5.0, 3).to_string();
        assert!(msg.contains("sessions_per_pod_per_s"), "{msg}");
        let text = crate::metrics::get().render();
        assert!(
            text.contains("vessel_streaming_sessions_refused_total{reason=\"pod_rate\"}"),
            "{text}"
        );
    }
}
