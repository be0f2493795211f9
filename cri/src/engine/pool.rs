//! The warm pool: per runtime handler, pod VMs booted before any pod asks for them,
//! so RunPodSandbox only attaches the pod's network and files (as Kata's VMCache).
//!
//! Identity: every host resource of a pod is named by its id (VM dir, share dir,
//! netns, scratch disk, cgroup) and ids are vesseld's own random ones, so a pool
//! entry takes its pod's id up front ([`new_id`]) and builds everything under it;
//! claiming it is creating the pod record with that id. Nothing is renamed.
//!
//! Never handed out twice: an entry leaves its handler's queue under the queue's
//! lock, by a claim, by its death, or by shutdown, whichever comes first; only
//! the one that took it acts on it.
//!
//! Crash safety: a marker file `<run_root>/pool/<id>` is written before the
//! entry's first resource and removed after its pod record exists (claim) or its
//! resources are gone (discard). At start-up every marker without a pod record is
//! a leftover of a dead vesseld: its VM, netns, share and disk are destroyed.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use vessel_sandbox::PodVm;
use vessel_storage::sharedir::ShareDir;

use super::{log_failed, Engine, RunningVm, RuntimeError};
use crate::config::RuntimeHandlerConfig;
use crate::store::new_id;
use crate::vmsize::VmSize;

/// cgroup CPU weight of a pooled VM (the kernel's default is 100): idle VMs and
/// their boots yield to the node's running pods.
const POOLED_CPU_WEIGHT: u64 = 1;
/// The weight a claimed VM gets back.
const CLAIMED_CPU_WEIGHT: u64 = 100;
/// Wait after a failed fill, doubled up to [`FILL_BACKOFF_MAX`].
const FILL_BACKOFF: Duration = Duration::from_secs(2);
const FILL_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// A booted, unclaimed pod VM.
pub(super) struct Warm {
    pub id: String,
    pub vm: Arc<dyn RunningVm>,
    pub share: ShareDir,
    /// The NIC's MAC when the VM has one (its netns and tap exist, no CNI yet).
    pub mac: Option<String>,
}

/// One handler's pool.
pub(super) struct HandlerPool {
    handler: String,
    target: usize,
    /// The size of the handler's VMs when the pod adds no limits.
    size: VmSize,
    warm: Mutex<VecDeque<Warm>>,
    /// Wakes the refill task: a claim, a death, shutdown.
    wake: Notify,
}

impl HandlerPool {
    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Warm>> {
        self.warm.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, n: usize) {
        crate::metrics::get().pool_warm(&self.handler, n);
    }

    /// Takes the entry `id` out of the queue if it is still there.
    fn take(&self, id: &str) -> Option<Warm> {
        let mut q = self.queue();
        let i = q.iter().position(|w| w.id == id)?;
        let w = q.remove(i);
        self.publish(q.len());
        w
    }
}

/// Every handler's pool and the refill tasks.
#[derive(Default)]
pub(super) struct Pools {
    handlers: HashMap<String, Arc<HandlerPool>>,
    stopping: AtomicBool,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Pools {
    /// The pools `runtimes` asks for (handlers with a pool size above 0).
    pub fn new<'a>(runtimes: impl Iterator<Item = (&'a String, &'a RuntimeHandlerConfig)>) -> Self {
        let host_cpus = crate::vmsize::host_cpus();
        let handlers = runtimes
            .filter(|(name, h)| h.pool_size(name) > 0)
            .map(|(name, h)| {
                let size =
                    crate::vmsize::vm_size(h.vcpus, h.memory_mib, &Default::default(), host_cpus);
                let pool = HandlerPool {
                    handler: name.clone(),
                    target: h.pool_size(name) as usize,
                    size,
                    warm: Mutex::default(),
                    wake: Notify::new(),
                };
                (name.clone(), Arc::new(pool))
            })
            .collect();
        Pools {
            handlers,
            ..Default::default()
        }
    }

    /// Warm VMs of `handler` now.
    #[cfg(test)]
    pub fn warm(&self, handler: &str) -> usize {
        self.handlers.get(handler).map_or(0, |p| p.queue().len())
    }
}

/// Where pool markers live.
fn marker_dir(engine: &Engine) -> PathBuf {
    engine.config.run_root.join("pool")
}

impl Engine {
    /// Starts one refill task per pooled handler (after recovery).
    pub(super) fn start_pools(self: &Arc<Self>) {
        let mut tasks = self.pools.tasks.lock().unwrap_or_else(|p| p.into_inner());
        for pool in self.pools.handlers.values() {
            pool.publish(0);
            let engine = Arc::downgrade(self);
            tasks.push(tokio::spawn(refill(engine, pool.clone())));
        }
    }

    /// A warm VM of `handler` that fits a pod of `size` (`network`: whether the pod
    /// gets a CNI network), out of the pool for good; None when there is none.
    pub(super) fn claim_warm(
        self: &Arc<Self>,
        handler: &str,
        size: VmSize,
        network: bool,
    ) -> Option<Warm> {
        let pool = self.pools.handlers.get(handler)?;
        if pool.size != size || self.pools.stopping.load(Ordering::SeqCst) {
            return None;
        }
        let mut q = pool.queue();
        // VMs booted while networking was the other way (a CNI config came or
        // went) never fit again: they make room for ones that do.
        let (fit, stale): (Vec<Warm>, Vec<Warm>) =
            q.drain(..).partition(|w| w.mac.is_some() == network);
        *q = fit.into();
        let w = q.pop_front();
        pool.publish(q.len());
        drop(q);
        for old in stale {
            let engine = self.clone();
            tokio::spawn(async move { engine.discard_warm(&old.id, Some(old.vm)).await });
        }
        pool.wake.notify_one();
        w
    }

    /// The pool entry is now a pod (its record exists): drops its marker and gives
    /// its VM the CPU weight of a running pod.
    pub(super) async fn adopt_warm(&self, warm: &Warm) {
        log_failed(
            &warm.id,
            "remove the pool marker",
            remove_file(marker_dir(self).join(&warm.id)).await,
        );
        log_failed(
            &warm.id,
            "restore the VM's CPU weight",
            set_cpu_weight(warm.vm.as_ref(), CLAIMED_CPU_WEIGHT).await,
        );
    }

    /// Boots one pool VM of `handler` under a fresh id; undone on failure.
    async fn fill(&self, handler: &str, size: VmSize) -> Result<Warm, RuntimeError> {
        let (_, h) = self.handler(handler)?;
        let id = new_id();
        let dir = marker_dir(self);
        let marker = dir.join(&id);
        let text = handler.to_owned();
        super::blocking("cannot write the pool marker", move || {
            std::fs::create_dir_all(&dir)?;
            std::fs::write(marker, text)
        })
        .await?;
        match self.boot_warm(&id, &h, size).await {
            Ok(w) => Ok(w),
            Err(e) => {
                self.discard_warm(&id, None).await;
                Err(e)
            }
        }
    }

    async fn boot_warm(
        &self,
        id: &str,
        h: &RuntimeHandlerConfig,
        size: VmSize,
    ) -> Result<Warm, RuntimeError> {
        let net = self.steps.prepare_network(id).await?;
        let share = self
            .steps
            .create_share(self.share_path(id), Default::default())
            .await?;
        let mut vmc = self.vm_config(id, h, size, &share);
        vmc.cpu_weight = Some(POOLED_CPU_WEIGHT);
        vmc.oom_score_adj = Some(crate::oomscore::IDLE_POOL);
        if h.writable_layer_mib > 0 {
            let disk = self.steps.create_scratch(id, h.writable_layer_mib).await?;
            vmc.scratch_disk = Some(vessel_sandbox::DiskConfig {
                file: Arc::new(disk.file),
                file_ro: Arc::new(disk.file_ro),
                path: disk.path,
            });
        }
        let mac = net.map(|n| {
            vmc.netns = Some(n.netns);
            let mac = n.nic.mac.clone();
            vmc.net = Some(n.nic);
            mac
        });
        let vm = self.steps.start_vm(vmc).await?;
        Ok(Warm {
            id: id.to_owned(),
            vm,
            share,
            mac,
        })
    }

    /// Removes everything of pool entry `id` (its VM, when given, is stopped
    /// first), then its marker. Every step runs; failures are logged.
    pub(super) async fn discard_warm(&self, id: &str, vm: Option<Arc<dyn RunningVm>>) {
        if let Some(vm) = vm {
            log_failed(id, "stop the pool VM", vm.stop().await);
        }
        log_failed(
            id,
            "destroy the pool VM",
            PodVm::destroy(self.vm_dir(id)).await,
        );
        self.release_host_resources(id).await;
        log_failed(
            id,
            "remove the pool marker",
            remove_file(marker_dir(self).join(id)).await,
        );
    }

    /// Start-up: destroys what the pool entries of a previous vesseld left (the
    /// pool is rebuilt, never adopted). A marker whose pod record exists was
    /// claimed: only the marker goes.
    pub(super) async fn clean_old_pool(&self) {
        let dir = marker_dir(self);
        let ids =
            match super::blocking(
                "cannot read the pool markers",
                move || match std::fs::read_dir(&dir) {
                    Ok(rd) => Ok(rd
                        .flatten()
                        .filter_map(|e| e.file_name().into_string().ok())
                        .collect::<Vec<_>>()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
                    Err(e) => Err(e),
                },
            )
            .await
            {
                Ok(ids) => ids,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot clean the old warm pool");
                    return;
                }
            };
        for id in ids {
            // Markers are ours; a name that is not an id is not followed anywhere.
            if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue;
            }
            if self.store.pod(&id).is_ok() {
                log_failed(
                    &id,
                    "remove the pool marker",
                    remove_file(marker_dir(self).join(&id)).await,
                );
            } else {
                tracing::info!(pod = %id, "removing a pool VM of the previous vesseld");
                self.discard_warm(&id, None).await;
            }
        }
    }

    /// Shutdown: stops the refill tasks (a boot in progress is cut short: a TCG
    /// boot on a loaded node outlasts a supervisor's stop timeout) and destroys
    /// every warm VM and what the cut boot left (by its marker), so nothing
    /// outlives vesseld.
    pub async fn stop_pools(&self) {
        self.pools.stopping.store(true, Ordering::SeqCst);
        let tasks =
            std::mem::take(&mut *self.pools.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
        for pool in self.pools.handlers.values() {
            let drained: Vec<Warm> = pool.queue().drain(..).collect();
            pool.publish(0);
            for w in drained {
                self.discard_warm(&w.id, Some(w.vm)).await;
            }
        }
        self.clean_old_pool().await;
    }

    /// A pool VM that dies unclaimed leaves the pool, its remains go, and the
    /// refill task boots another.
    fn watch_warm(self: &Arc<Self>, pool: &Arc<HandlerPool>, id: &str, vm: &Arc<dyn RunningVm>) {
        let mut exits = vm.exit_watch();
        let engine = Arc::downgrade(self);
        let pool = Arc::downgrade(pool);
        let id = id.to_owned();
        tokio::spawn(async move {
            loop {
                if exits.borrow_and_update().is_some() {
                    break;
                }
                if exits.changed().await.is_err() {
                    break;
                }
            }
            let (Some(engine), Some(pool)) = (engine.upgrade(), pool.upgrade()) else {
                return;
            };
            // Claimed meanwhile: the pod's own watcher handles it.
            let Some(w) = pool.take(&id) else {
                return;
            };
            tracing::warn!(pod = %id, handler = %pool.handler, "a pool VM exited; replacing it");
            engine.discard_warm(&w.id, Some(w.vm)).await;
            pool.wake.notify_one();
        });
    }
}

/// Keeps `pool` at its target: one boot at a time, backing off after failures.
async fn refill(engine: Weak<Engine>, pool: Arc<HandlerPool>) {
    let mut backoff = FILL_BACKOFF;
    loop {
        let Some(e) = engine.upgrade() else { return };
        if e.pools.stopping.load(Ordering::SeqCst) {
            return;
        }
        if pool.queue().len() >= pool.target {
            drop(e);
            pool.wake.notified().await;
            continue;
        }
        match e.fill(&pool.handler, pool.size).await {
            Ok(w) => {
                backoff = FILL_BACKOFF;
                if e.pools.stopping.load(Ordering::SeqCst) {
                    e.discard_warm(&w.id, Some(w.vm)).await;
                    return;
                }
                tracing::debug!(pod = %w.id, handler = %pool.handler, "pool VM ready");
                e.watch_warm(&pool, &w.id, &w.vm);
                let mut q = pool.queue();
                q.push_back(w);
                pool.publish(q.len());
            }
            Err(err) => {
                tracing::warn!(handler = %pool.handler, error = %err, retry_in = ?backoff,
                    "cannot boot a pool VM");
                drop(e);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = pool.wake.notified() => {}
                }
                backoff = (backoff * 2).min(FILL_BACKOFF_MAX);
            }
        }
    }
}

async fn remove_file(path: PathBuf) -> Result<(), RuntimeError> {
    super::blocking("cannot remove a file", move || {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    })
    .await
}

/// Moves a real VM's host processes into the pod cgroup under the kubelet's
/// `parent` (a fake has none).
pub(super) async fn join_pod_cgroup(vm: &dyn RunningVm, parent: &str) -> Result<(), RuntimeError> {
    let Some(vm) = vm.pod_vm() else {
        return Ok(());
    };
    vm.move_cgroup(parent).await.map_err(|e| {
        RuntimeError::sandbox(
            "cannot move the pooled VM into the pod's cgroup (check the pod's cgroup_parent \
             and that vesseld may write under it)",
            e,
        )
    })
}

/// Sets the OOM score of a real VM's host processes (a fake has none).
pub(super) async fn set_oom_score(vm: &dyn RunningVm, score: i32) -> Result<(), RuntimeError> {
    let Some((pids, cgroup)) = vm.pod_vm().map(|v| v.oom_targets()) else {
        return Ok(());
    };
    super::blocking("cannot set the VM's OOM score", move || {
        vessel_sandbox::vm::set_oom_score_adj(pids, cgroup.as_ref(), score)
            .map_err(|e| std::io::Error::other(e.to_string()))
    })
    .await
}

/// Sets the CPU weight of a real VM's pod cgroup (a fake has none).
async fn set_cpu_weight(vm: &dyn RunningVm, weight: u64) -> Result<(), RuntimeError> {
    let Some(cg) = vm.pod_vm().and_then(|v| v.cgroup()) else {
        return Ok(());
    };
    super::blocking("cannot set the VM's CPU weight", move || {
        cg.set_cpu_weight(weight)
            .map_err(|e| std::io::Error::other(e.to_string()))
    })
    .await
}
