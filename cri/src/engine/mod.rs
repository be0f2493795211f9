//! The runtime engine: pod VMs, their containers, and the state that says what
//! runs. The CRI service (`crate::runtime`) calls it; `crate::status` maps its
//! [`RuntimeError`]s to gRPC codes.
//!
//! # State
//! The store (`crate::store`) holds the records: what the kubelet sees and what a
//! restarted vesseld recovers from. What runs now is one [`PodEntry`] per pod
//! (private to this module): the pod's lifecycle lock, its live VM and share dir
//! while the VM runs (`None` before the VM is up and after it stopped or died), and
//! the started containers vesseld follows. An entry exists from RunPodSandbox (or
//! recovery at start-up) until RemovePodSandbox; a stored pod always has one.
//!
//! # Locking rule
//! Every call that changes a pod or its containers holds that pod's lifecycle lock
//! ([`Engine::lock_pod`]) from its first read of the pod's state to its last change,
//! and re-reads the records after taking it. A call that then waits on a guest
//! process (StopContainer's grace period, ExecSync's output) takes the lock only to
//! read and to start, and waits without it. The one writer that never takes the
//! lock is the exit watcher ([`exits`]): it only records Running → Exited, which
//! the store applies atomically, and lock holders wait for it. The entry map's
//! std mutex is held only to look up or swap, never across an await.
//!
//! # Seam
//! The host steps of a pod start go through [`steps::PodSteps`] and the running
//! VM through [`RunningVm`]; the unit tests put fakes in their place.

mod container;
mod error;
mod exec;
mod exits;
mod pod;
mod pool;
mod steps;
#[cfg(test)]
mod tests;
mod vm;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use vessel_image::ImageStore;
use vessel_storage::scratch::ScratchDisks;
use vessel_storage::sharedir::ShareDir;

use crate::config::{Config, RuntimeHandlerConfig, DEFAULT_HANDLER};
use crate::crilog::CriLog;
use crate::store::StateStore;

pub use error::RuntimeError;
pub use exec::exec_process;
use steps::{HostSteps, PodSteps};
pub use vm::RunningVm;

/// A running pod VM and what lives with it.
pub struct LivePod {
    pub vm: Arc<dyn RunningVm>,
    pub share: ShareDir,
}

/// A started container's host-side helpers.
pub struct LiveCtr {
    pub log: Option<Arc<CriLog>>,
    /// Becomes true once the exit is recorded.
    pub exited: watch::Receiver<bool>,
}

/// What runs of one pod; see the module docs.
#[derive(Default)]
struct PodEntry {
    lock: Arc<tokio::sync::Mutex<()>>,
    live: Option<Arc<LivePod>>,
    ctrs: HashMap<String, Arc<LiveCtr>>,
}

/// Proof that the caller holds a pod's lifecycle lock.
pub struct PodGuard {
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

pub struct Engine {
    config: Arc<Config>,
    images: ImageStore,
    store: StateStore,
    pods: Mutex<HashMap<String, PodEntry>>,
    /// Pod networks (CNI); inert without a CNI config.
    net: vessel_network::NetworkManager,
    /// Each pod's scratch disk (its containers' writable layers).
    scratch: ScratchDisks,
    /// The host steps of a pod's start and their undo (the seam for fakes).
    steps: Arc<dyn PodSteps>,
    /// Per handler, pre-booted VMs for new pods.
    pools: pool::Pools,
}

impl Engine {
    pub fn store(&self) -> &StateStore {
        &self.store
    }

    pub fn net(&self) -> &vessel_network::NetworkManager {
        &self.net
    }

    pub fn pod_dir(&self, id: &str) -> PathBuf {
        self.config.run_root.join("pods").join(id)
    }

    /// Short: unix socket paths inside it must fit in 108 bytes.
    fn vm_dir(&self, id: &str) -> PathBuf {
        self.config
            .run_root
            .join("vm")
            .join(&id[..id.len().min(16)])
    }

    fn share_path(&self, id: &str) -> PathBuf {
        self.pod_dir(id).join("share")
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, PodEntry>> {
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pod's VM while it runs.
    pub fn live_pod(&self, id: &str) -> Option<Arc<LivePod>> {
        self.entries().get(id).and_then(|e| e.live.clone())
    }

    /// A started container of `pod_id` that vesseld follows.
    fn live_ctr(&self, pod_id: &str, id: &str) -> Option<Arc<LiveCtr>> {
        self.entries()
            .get(pod_id)
            .and_then(|e| e.ctrs.get(id).cloned())
    }

    /// Sets (or clears) the pod's live VM; returns what was there.
    fn set_live(&self, _: &PodGuard, id: &str, live: Option<Arc<LivePod>>) -> Option<Arc<LivePod>> {
        match self.entries().get_mut(id) {
            Some(e) => std::mem::replace(&mut e.live, live),
            None => None,
        }
    }

    fn add_ctr(&self, _: &PodGuard, pod_id: &str, id: &str, ctr: Arc<LiveCtr>) {
        if let Some(e) = self.entries().get_mut(pod_id) {
            e.ctrs.insert(id.to_owned(), ctr);
        }
    }

    fn forget_ctr(&self, _: &PodGuard, pod_id: &str, id: &str) {
        if let Some(e) = self.entries().get_mut(pod_id) {
            e.ctrs.remove(id);
        }
    }

    /// Adds the entry of a new pod, its lock already held by the caller.
    fn add_entry(&self, id: &str) -> PodGuard {
        let entry = PodEntry::default();
        let guard = entry
            .lock
            .clone()
            .try_lock_owned()
            .expect("a new lock is free");
        self.entries().insert(id.to_owned(), entry);
        PodGuard { _guard: guard }
    }

    /// Drops a removed pod's entry (the caller holds its lock; whoever waits on it
    /// finds the records gone).
    fn remove_entry(&self, _: PodGuard, id: &str) {
        self.entries().remove(id);
    }

    /// The pod's lifecycle lock (see the module docs). NotFound once the pod is
    /// removed.
    pub async fn lock_pod(&self, id: &str) -> Result<PodGuard, RuntimeError> {
        let lock = self
            .entries()
            .get(id)
            .map(|e| e.lock.clone())
            .ok_or_else(|| RuntimeError::NotFound(format!("pod sandbox {id} not found")))?;
        Ok(PodGuard {
            _guard: lock.lock_owned().await,
        })
    }

    fn handler(&self, name: &str) -> Result<(String, RuntimeHandlerConfig), RuntimeError> {
        let name = if name.is_empty() {
            DEFAULT_HANDLER
        } else {
            name
        };
        match self.config.runtimes.get(name) {
            Some(h) => Ok((name.to_owned(), h.clone())),
            None => Err(RuntimeError::invalid(format!(
                "unknown runtime handler {name:?}; use one of those configured: {}",
                self.config
                    .runtimes
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// Opens the state and reconnects to the pod VMs that outlived the last vesseld.
    pub async fn open(
        config: Arc<Config>,
        images: ImageStore,
        db: Arc<vessel_storage::db::Db>,
    ) -> anyhow::Result<Arc<Self>> {
        // Before any VM starts: a VMM must never share a uid with a user namespace.
        vessel_sandbox::uids::check_subid_overlap(
            &config.jail.uid_range(),
            &config.jail.subid_files,
        )?;
        let store = StateStore::open(db)?;
        let net = crate::podnet::manager(&config);
        let scratch = crate::scratch::scratch_disks(&config);
        let steps = Arc::new(HostSteps {
            net: net.clone(),
            scratch: scratch.clone(),
        });
        let engine = Self::with_steps(config, images, store, net, scratch, steps).await;
        engine.clean_old_pool().await;
        engine.start_pools();
        Ok(engine)
    }

    /// An engine whose pod steps are `steps`; recovers the stored pods.
    async fn with_steps(
        config: Arc<Config>,
        images: ImageStore,
        store: StateStore,
        net: vessel_network::NetworkManager,
        scratch: ScratchDisks,
        steps: Arc<dyn PodSteps>,
    ) -> Arc<Self> {
        let engine = Arc::new(Engine {
            pools: pool::Pools::new(config.runtimes.iter()),
            scratch,
            config,
            images,
            store,
            pods: Mutex::default(),
            net,
            steps,
        });
        engine.recover().await;
        engine
    }
}

/// Runs blocking file work off the async workers.
async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, RuntimeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RuntimeError::task(what, e))?
        .map_err(|e| RuntimeError::internal(format!("{what}: {e}")))
}

/// Removes a directory tree off the async workers; gone already is fine.
async fn remove_tree(dir: PathBuf) -> Result<(), RuntimeError> {
    let what = format!("cannot remove {}", dir.display());
    tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    })
    .await
    .map_err(|e| RuntimeError::task(&what, e))?
    .map_err(|e| RuntimeError::internal(format!("{what}: {e}")))
}

/// Releases a share dir (unmounts) off the async workers.
async fn destroy_share(share: ShareDir) -> Result<(), RuntimeError> {
    tokio::task::spawn_blocking(move || share.destroy())
        .await
        .map_err(|e| RuntimeError::task("share dir release", e))?
        .map_err(|e| {
            RuntimeError::internal(format!(
                "cannot release the pod's share dir (check for mounts left under it): {e}"
            ))
        })
}

/// Logs an unwind or cleanup step that failed; the caller goes on.
fn log_failed<T, E: std::fmt::Display>(pod: &str, step: &str, res: Result<T, E>) {
    if let Err(e) = res {
        tracing::warn!(pod = %pod, step, error = %e, "cleanup step failed");
    }
}
