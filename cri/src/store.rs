//! Pods and containers: their records, state machine, name reservations, and their
//! persistence in the shared redb database (tables prefixed `runtime_`).
//!
//! The in-memory records are the truth. A change is checked and applied to them
//! under a lock held only for that (no I/O), and queued in the same step to one
//! writer thread ([`writer`]) that commits the changes to redb in that order. So
//! reads (the kubelet's List calls) never wait for an fsync, and the file always
//! holds a prefix of the applied changes.
//!
//! What a caller may rely on: a change is visible to every later read as soon as
//! its method returns; it is durable once a later [`StateStore::flush`] resolves
//! Ok. The CRI edge awaits `flush` before answering a call that changed state
//! (`crate::durable`), so what vesseld acknowledged survives a kill. A failed commit
//! is logged, and `flush` and every later change return it.

mod writer;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use vessel_storage::db::Db;

use writer::{Op, Writer};

/// pod id → JSON [`PodRecord`].
const PODS: TableDefinition<'static, &'static str, &'static [u8]> =
    TableDefinition::new("runtime_pods");
/// container id → JSON [`ContainerRecord`].
const CONTAINERS: TableDefinition<'static, &'static str, &'static [u8]> =
    TableDefinition::new("runtime_containers");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PodState {
    Ready,
    NotReady,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerState {
    Created,
    Running,
    Exited,
    Unknown,
}

/// What vesseld remembers of a pod.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodRecord {
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub attempt: u32,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub runtime_handler: String,
    pub state: PodState,
    pub created_at_ns: i64,
    /// The CRI `PodSandboxConfig`, protobuf-encoded.
    pub config: Vec<u8>,
    /// VM facts for the verbose status.
    pub vm: Option<VmFacts>,
    /// Pod IPs from CNI, primary first (empty without pod networking).
    #[serde(default)]
    pub ips: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmFacts {
    pub pid: i32,
    pub accel: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Where RunPodSandbox spent its time.
    #[serde(default)]
    pub startup: StartupTimings,
}

/// The phases of RunPodSandbox, in milliseconds: what the benchmark's breakdown and
/// an operator chasing a slow pod start read from the verbose status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartupTimings {
    /// netns, CNI ADD and the tap.
    pub network_ms: u64,
    /// Share dir and pod files (hosts, resolv.conf, hostname).
    pub share_ms: u64,
    /// Creating and formatting the scratch disk (writable layers).
    #[serde(default)]
    pub scratch_disk_ms: u64,
    /// Accelerator choice, virtiofsd and the vsock helper.
    pub helpers_ms: u64,
    /// QEMU spawned until the agent answered Health.
    pub vm_to_agent_ms: u64,
    /// The guest's interfaces, routes and DNS through the agent.
    pub guest_network_ms: u64,
    /// The whole RPC.
    pub total_ms: u64,
    /// Served by a pre-booted VM of the handler's warm pool (no boot in this RPC).
    #[serde(default)]
    pub pooled: bool,
    /// A pooled VM's host processes moved into the kubelet's pod cgroup.
    #[serde(default)]
    pub cgroup_ms: u64,
}

/// What vesseld remembers of a container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub pod_id: String,
    pub name: String,
    pub attempt: u32,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// The image as the request named it.
    pub image: String,
    /// The resolved image id.
    pub image_id: String,
    /// A digest reference of the image (`repo@sha256:...`), or its id.
    pub image_ref: String,
    /// Absolute log path ("" when the pod has no log directory).
    pub log_path: String,
    pub state: ContainerState,
    pub created_at_ns: i64,
    pub started_at_ns: i64,
    pub finished_at_ns: i64,
    pub exit_code: i32,
    pub reason: String,
    pub message: String,
    /// The CRI `ContainerConfig`, protobuf-encoded.
    pub config: Vec<u8>,
    /// The image's StopSignal ("" = SIGTERM).
    #[serde(default)]
    pub stop_signal: String,
    /// The OCI `process` of the main process as JSON (execs start from it).
    #[serde(default)]
    pub process_json: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    #[error("{kind} id prefix {prefix} is ambiguous")]
    Ambiguous { kind: &'static str, prefix: String },
    #[error("{kind} name {name} is reserved by {holder}")]
    NameTaken {
        kind: &'static str,
        name: String,
        holder: String,
    },
    #[error("container {id} is {from:?}; it cannot become {to:?}")]
    BadTransition {
        id: String,
        from: ContainerState,
        to: ContainerState,
    },
    #[error("state database: {0}")]
    Db(String),
    /// A commit failed (a full disk, say) and is being retried; changes are
    /// refused until one works.
    #[error("{0}")]
    Unsaved(String),
}

impl StoreError {
    fn db(e: impl std::fmt::Display) -> Self {
        StoreError::Db(e.to_string())
    }
}

/// Whether a container may move from `from` to `to`.
pub fn transition_allowed(from: ContainerState, to: ContainerState) -> bool {
    use ContainerState::*;
    matches!(
        (from, to),
        (Created, Running)
            | (Created, Exited)
            | (Running, Exited)
            | (_, Unknown)
            | (Unknown, Exited)
    )
}

/// The name a pod reserves: unique per (name, namespace, uid, attempt).
pub fn pod_name_key(name: &str, namespace: &str, uid: &str, attempt: u32) -> String {
    format!("{name}_{namespace}_{uid}_{attempt}")
}

/// The name a container reserves within its pod: unique per (name, attempt).
pub fn container_name_key(pod_id: &str, name: &str, attempt: u32) -> String {
    format!("{pod_id}/{name}_{attempt}")
}

/// A fresh 64-hex-digit id.
pub fn new_id() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

#[derive(Default)]
struct Inner {
    pods: HashMap<String, PodRecord>,
    containers: HashMap<String, ContainerRecord>,
    pod_names: HashMap<String, String>,
    container_names: HashMap<String, String>,
}

/// A committed change of a record: `old` is None for an add, `new` None for a removal.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    Pod {
        old: Option<&'a PodRecord>,
        new: Option<&'a PodRecord>,
    },
    Container {
        old: Option<&'a ContainerRecord>,
        new: Option<&'a ContainerRecord>,
    },
}

/// What an observer sees of a change: the change, then the pod it concerns (as it
/// is now, or as it was for a removed pod) and that pod's containers now.
pub type ChangeHook =
    Arc<dyn Fn(Change<'_>, Option<&PodRecord>, &[&ContainerRecord]) + Send + Sync>;

/// The pod and container records. Cheap to clone.
#[derive(Clone)]
pub struct StateStore {
    inner: Arc<RwLock<Inner>>,
    /// Commits the changes in the order they were applied; the last clone of the
    /// store to go waits for it to commit what is queued.
    writer: Arc<Writer>,
    /// Observers of applied changes (events, metrics). Called with the store locked
    /// for writing, so they see changes in the order the writer commits them; they
    /// must be quick and not call back.
    hooks: Arc<Mutex<Vec<ChangeHook>>>,
}

/// Decodes the stored record `id`; a record that does not decode is an error
/// naming it (never a default: the record holds what runs).
fn decode<T: for<'a> Deserialize<'a>>(kind: &str, id: &str, raw: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(raw).map_err(|e| {
        StoreError::Db(format!(
            "stored {kind} record {id} does not decode ({e}); remove it from the state database or restore a backup"
        ))
    })
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(StoreError::db)
}

impl StateStore {
    /// Loads every record, rebuilds the name reservations and starts the writer.
    pub fn open(shared: Arc<Db>) -> Result<Self, StoreError> {
        let db = shared.get().map_err(StoreError::db)?;
        {
            // Creates the tables so that reads never meet a missing one.
            let wtx = db.begin_write().map_err(StoreError::db)?;
            wtx.open_table(PODS).map_err(StoreError::db)?;
            wtx.open_table(CONTAINERS).map_err(StoreError::db)?;
            wtx.commit().map_err(StoreError::db)?;
        }
        let mut inner = Inner::default();
        let rtx = db.begin_read().map_err(StoreError::db)?;
        let pods = rtx.open_table(PODS).map_err(StoreError::db)?;
        for entry in pods.iter().map_err(StoreError::db)? {
            let (k, v) = entry.map_err(StoreError::db)?;
            let p: PodRecord = decode("pod", k.value(), v.value())?;
            inner.pod_names.insert(
                pod_name_key(&p.name, &p.namespace, &p.uid, p.attempt),
                p.id.clone(),
            );
            inner.pods.insert(p.id.clone(), p);
        }
        let ctrs = rtx.open_table(CONTAINERS).map_err(StoreError::db)?;
        for entry in ctrs.iter().map_err(StoreError::db)? {
            let (k, v) = entry.map_err(StoreError::db)?;
            let c: ContainerRecord = decode("container", k.value(), v.value())?;
            inner.container_names.insert(
                container_name_key(&c.pod_id, &c.name, c.attempt),
                c.id.clone(),
            );
            inner.containers.insert(c.id.clone(), c);
        }
        drop((pods, ctrs, rtx));
        Ok(StateStore {
            inner: Arc::new(RwLock::new(inner)),
            writer: Arc::new(Writer::start(shared)?),
            hooks: Arc::default(),
        })
    }

    /// Resolves once every change applied before this call is committed to disk,
    /// or with the commit error that stopped the writer. Awaited by the CRI edge
    /// before it acknowledges a call that changed state.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.writer.send(Op::Flush(tx))?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(writer::failed_error(&e)),
            Err(_) => Err(StoreError::Db("the state writer thread is gone".into())),
        }
    }

    /// Adds an observer of every later committed change.
    pub fn observe(&self, hook: ChangeHook) {
        self.hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(hook);
    }

    /// Tells the observers of `change` to the pod `pod_id` (`gone` when it is removed).
    fn notify(&self, inner: &Inner, change: Change<'_>, pod_id: &str, gone: Option<&PodRecord>) {
        let hooks = self.hooks.lock().unwrap_or_else(|p| p.into_inner());
        if hooks.is_empty() {
            return;
        }
        let pod = gone.or_else(|| inner.pods.get(pod_id));
        let mut containers: Vec<&ContainerRecord> = inner
            .containers
            .values()
            .filter(|c| c.pod_id == pod_id)
            .collect();
        containers.sort_by_key(|c| c.created_at_ns);
        for hook in hooks.iter() {
            hook(change, pod, &containers);
        }
    }

    // A panic while a lock is held leaves consistent data (every check and the
    // caller's closure run before anything changes), so a poisoned lock is usable.
    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues the record for the writer; called with the write lock held, after
    /// every check and before the memory changes, so the queue's order is the order
    /// in which changes become visible.
    fn queue_put(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        id: &str,
        raw: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.writer.send(Op::Put {
            table,
            id: id.to_owned(),
            raw,
        })
    }

    fn queue_delete(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        id: &str,
    ) -> Result<(), StoreError> {
        self.writer.send(Op::Delete {
            table,
            id: id.to_owned(),
        })
    }

    /// Reserves the pod's name and records it; fails naming the current holder.
    pub fn add_pod(&self, pod: PodRecord) -> Result<(), StoreError> {
        let raw = encode(&pod)?;
        let mut inner = self.write();
        let key = pod_name_key(&pod.name, &pod.namespace, &pod.uid, pod.attempt);
        if let Some(holder) = inner.pod_names.get(&key) {
            return Err(StoreError::NameTaken {
                kind: "pod",
                name: key,
                holder: holder.clone(),
            });
        }
        self.queue_put(PODS, &pod.id, raw)?;
        inner.pod_names.insert(key, pod.id.clone());
        inner.pods.insert(pod.id.clone(), pod.clone());
        let change = Change::Pod {
            old: None,
            new: Some(&pod),
        };
        self.notify(&inner, change, &pod.id, None);
        Ok(())
    }

    /// Applies `f` to a pod record and records the result.
    pub fn update_pod(
        &self,
        id: &str,
        f: impl FnOnce(&mut PodRecord),
    ) -> Result<PodRecord, StoreError> {
        let mut inner = self.write();
        let mut pod = inner
            .pods
            .get(id)
            .cloned()
            .ok_or_else(|| StoreError::NotFound {
                kind: "pod sandbox",
                id: id.to_owned(),
            })?;
        let old = pod.clone();
        f(&mut pod);
        self.queue_put(PODS, id, encode(&pod)?)?;
        inner.pods.insert(id.to_owned(), pod.clone());
        let change = Change::Pod {
            old: Some(&old),
            new: Some(&pod),
        };
        self.notify(&inner, change, id, None);
        Ok(pod)
    }

    /// Removes a pod record and frees its name; its containers must be gone already.
    pub fn remove_pod(&self, id: &str) -> Result<(), StoreError> {
        let mut inner = self.write();
        let Some(pod) = inner.pods.get(id).cloned() else {
            return Ok(());
        };
        self.queue_delete(PODS, id)?;
        inner.pods.remove(id);
        inner.pod_names.remove(&pod_name_key(
            &pod.name,
            &pod.namespace,
            &pod.uid,
            pod.attempt,
        ));
        let change = Change::Pod {
            old: Some(&pod),
            new: None,
        };
        self.notify(&inner, change, id, Some(&pod));
        Ok(())
    }

    /// Finds a pod by id or unique id prefix.
    pub fn pod(&self, id: &str) -> Result<PodRecord, StoreError> {
        let inner = self.read();
        let id = resolve(&inner.pods, id, "pod sandbox")?;
        Ok(inner.pods[&id].clone())
    }

    pub fn pods(&self) -> Vec<PodRecord> {
        let mut v: Vec<_> = self.read().pods.values().cloned().collect();
        v.sort_by_key(|p| p.created_at_ns);
        v
    }

    /// Reserves the container's name within its pod and records it.
    pub fn add_container(&self, c: ContainerRecord) -> Result<(), StoreError> {
        let raw = encode(&c)?;
        let mut inner = self.write();
        if !inner.pods.contains_key(&c.pod_id) {
            return Err(StoreError::NotFound {
                kind: "pod sandbox",
                id: c.pod_id.clone(),
            });
        }
        let key = container_name_key(&c.pod_id, &c.name, c.attempt);
        if let Some(holder) = inner.container_names.get(&key) {
            return Err(StoreError::NameTaken {
                kind: "container",
                name: format!("{}_{} in pod {}", c.name, c.attempt, c.pod_id),
                holder: holder.clone(),
            });
        }
        self.queue_put(CONTAINERS, &c.id, raw)?;
        inner.container_names.insert(key, c.id.clone());
        inner.containers.insert(c.id.clone(), c.clone());
        let change = Change::Container {
            old: None,
            new: Some(&c),
        };
        self.notify(&inner, change, &c.pod_id, None);
        Ok(())
    }

    /// Applies `f` to a container record and records it. A state change made by
    /// `f` must be allowed by [`transition_allowed`].
    pub fn update_container(
        &self,
        id: &str,
        f: impl FnOnce(&mut ContainerRecord),
    ) -> Result<ContainerRecord, StoreError> {
        let mut inner = self.write();
        let old = inner
            .containers
            .get(id)
            .cloned()
            .ok_or_else(|| StoreError::NotFound {
                kind: "container",
                id: id.to_owned(),
            })?;
        let mut c = old.clone();
        f(&mut c);
        if c.state != old.state && !transition_allowed(old.state, c.state) {
            return Err(StoreError::BadTransition {
                id: id.to_owned(),
                from: old.state,
                to: c.state,
            });
        }
        self.queue_put(CONTAINERS, id, encode(&c)?)?;
        inner.containers.insert(id.to_owned(), c.clone());
        let change = Change::Container {
            old: Some(&old),
            new: Some(&c),
        };
        self.notify(&inner, change, &c.pod_id, None);
        Ok(c)
    }

    pub fn remove_container(&self, id: &str) -> Result<(), StoreError> {
        let mut inner = self.write();
        let Some(c) = inner.containers.get(id).cloned() else {
            return Ok(());
        };
        self.queue_delete(CONTAINERS, id)?;
        inner.containers.remove(id);
        inner
            .container_names
            .remove(&container_name_key(&c.pod_id, &c.name, c.attempt));
        let change = Change::Container {
            old: Some(&c),
            new: None,
        };
        self.notify(&inner, change, &c.pod_id, None);
        Ok(())
    }

    /// Finds a container by id or unique id prefix.
    pub fn container(&self, id: &str) -> Result<ContainerRecord, StoreError> {
        let inner = self.read();
        let id = resolve(&inner.containers, id, "container")?;
        Ok(inner.containers[&id].clone())
    }

    pub fn containers(&self) -> Vec<ContainerRecord> {
        let mut v: Vec<_> = self.read().containers.values().cloned().collect();
        v.sort_by_key(|c| c.created_at_ns);
        v
    }

    pub fn containers_of(&self, pod_id: &str) -> Vec<ContainerRecord> {
        let mut v: Vec<_> = self
            .read()
            .containers
            .values()
            .filter(|c| c.pod_id == pod_id)
            .cloned()
            .collect();
        v.sort_by_key(|c| c.created_at_ns);
        v
    }
}

/// Exact id, else the one id starting with `prefix`.
fn resolve<T>(
    map: &HashMap<String, T>,
    prefix: &str,
    kind: &'static str,
) -> Result<String, StoreError> {
    if map.contains_key(prefix) {
        return Ok(prefix.to_owned());
    }
    let not_found = || StoreError::NotFound {
        kind,
        id: prefix.to_owned(),
    };
    if prefix.is_empty() {
        return Err(not_found());
    }
    let mut hits = map.keys().filter(|k| k.starts_with(prefix));
    match (hits.next(), hits.next()) {
        (Some(id), None) => Ok(id.clone()),
        (Some(_), Some(_)) => Err(StoreError::Ambiguous {
            kind,
            prefix: prefix.to_owned(),
        }),
        _ => Err(not_found()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    pub(crate) fn db(dir: &std::path::Path) -> Arc<Db> {
        Db::open(dir.join("state.redb")).unwrap()
    }

    pub(crate) fn pod(id: &str, name: &str, attempt: u32) -> PodRecord {
        PodRecord {
            id: id.into(),
            name: name.into(),
            namespace: "ns".into(),
            uid: "uid".into(),
            attempt,
            labels: BTreeMap::from([("app".into(), name.into())]),
            annotations: BTreeMap::new(),
            runtime_handler: "default".into(),
            state: PodState::Ready,
            created_at_ns: 1,
            config: vec![1, 2, 3],
            vm: None,
            ips: Vec::new(),
        }
    }

    pub(crate) fn ctr(id: &str, pod_id: &str, name: &str, attempt: u32) -> ContainerRecord {
        ContainerRecord {
            id: id.into(),
            pod_id: pod_id.into(),
            name: name.into(),
            attempt,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            image: "busybox".into(),
            image_id: "sha256:x".into(),
            image_ref: "busybox@sha256:x".into(),
            log_path: String::new(),
            state: ContainerState::Created,
            created_at_ns: 2,
            started_at_ns: 0,
            finished_at_ns: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            config: vec![],
            stop_signal: String::new(),
            process_json: String::new(),
        }
    }

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = StateStore::open(db(dir.path())).unwrap();
            s.add_pod(pod("p1", "web", 0)).unwrap();
            s.add_container(ctr("c1", "p1", "app", 0)).unwrap();
            s.update_container("c1", |c| {
                c.state = ContainerState::Running;
                c.started_at_ns = 5;
            })
            .unwrap();
            s.update_pod("p1", |p| p.state = PodState::NotReady)
                .unwrap();
        }
        let s = StateStore::open(db(dir.path())).unwrap();
        assert_eq!(s.pod("p1").unwrap().state, PodState::NotReady);
        let c = s.container("c1").unwrap();
        assert_eq!(c.state, ContainerState::Running);
        assert_eq!(c.started_at_ns, 5);
        // Reservations were rebuilt from the records.
        let e = s.add_pod(pod("p2", "web", 0)).unwrap_err().to_string();
        assert!(e.contains("p1"), "{e}");
        let e = s
            .add_container(ctr("c2", "p1", "app", 0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("c1"), "{e}");
    }

    #[test]
    fn names_are_freed_on_removal_and_attempts_differ() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(db(dir.path())).unwrap();
        s.add_pod(pod("p1", "web", 0)).unwrap();
        s.add_pod(pod("p2", "web", 1)).unwrap();
        s.add_container(ctr("c1", "p1", "app", 0)).unwrap();
        s.add_container(ctr("c2", "p1", "app", 1)).unwrap();
        // The same container name in another pod is fine.
        s.add_container(ctr("c3", "p2", "app", 0)).unwrap();
        assert!(matches!(
            s.add_container(ctr("c4", "p1", "app", 1)),
            Err(StoreError::NameTaken { .. })
        ));
        s.remove_container("c2").unwrap();
        s.add_container(ctr("c4", "p1", "app", 1)).unwrap();
        assert!(matches!(
            s.add_pod(pod("p3", "web", 1)),
            Err(StoreError::NameTaken { .. })
        ));
        s.remove_pod("p2").unwrap();
        s.add_pod(pod("p3", "web", 1)).unwrap();
        // Removing what is gone succeeds.
        s.remove_pod("p2").unwrap();
        s.remove_container("nope").unwrap();
        assert_eq!(s.containers_of("p1").len(), 2);
        assert!(matches!(
            s.add_container(ctr("c9", "ghost", "x", 0)),
            Err(StoreError::NotFound { .. })
        ));
    }

    #[test]
    fn state_machine_refuses_going_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(db(dir.path())).unwrap();
        s.add_pod(pod("p1", "web", 0)).unwrap();
        s.add_container(ctr("c1", "p1", "app", 0)).unwrap();
        s.update_container("c1", |c| c.state = ContainerState::Exited)
            .unwrap();
        let e = s
            .update_container("c1", |c| c.state = ContainerState::Running)
            .unwrap_err();
        assert!(matches!(e, StoreError::BadTransition { .. }), "{e}");
        assert_eq!(s.container("c1").unwrap().state, ContainerState::Exited);
        assert!(transition_allowed(
            ContainerState::Created,
            ContainerState::Running
        ));
        assert!(!transition_allowed(
            ContainerState::Running,
            ContainerState::Created
        ));
    }

    #[test]
    fn ids_resolve_by_unique_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(db(dir.path())).unwrap();
        s.add_pod(pod("abc1", "a", 0)).unwrap();
        s.add_pod(pod("abc2", "b", 0)).unwrap();
        assert_eq!(s.pod("abc1").unwrap().name, "a");
        assert!(matches!(s.pod("abc"), Err(StoreError::Ambiguous { .. })));
        assert!(matches!(s.pod("x"), Err(StoreError::NotFound { .. })));
        assert!(matches!(s.pod(""), Err(StoreError::NotFound { .. })));
        assert_eq!(new_id().len(), 64);
        assert_ne!(new_id(), new_id());
    }

    /// Reads what the file holds for pod `id` (committed transactions only).
    fn pod_on_disk(db: &Db, id: &str) -> Option<PodRecord> {
        let rtx = db.get().unwrap().begin_read().unwrap();
        let t = rtx.open_table(PODS).unwrap();
        let raw = t.get(id).unwrap()?;
        Some(serde_json::from_slice(raw.value()).unwrap())
    }

    #[tokio::test]
    async fn flush_makes_changes_durable_and_they_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let db1 = db(dir.path());
        let s = StateStore::open(db1.clone()).unwrap();
        s.add_pod(pod("p1", "web", 0)).unwrap();
        s.update_pod("p1", |p| p.ips = vec!["10.0.0.2".into()])
            .unwrap();
        s.add_pod(pod("p2", "db", 0)).unwrap();
        s.remove_pod("p2").unwrap();
        s.flush().await.unwrap();
        // Committed by the flush itself, not by the store going away.
        assert_eq!(pod_on_disk(&db1, "p1").unwrap().ips, ["10.0.0.2"]);
        assert!(pod_on_disk(&db1, "p2").is_none());
        drop((s, db1));
        let s = StateStore::open(db(dir.path())).unwrap();
        assert_eq!(s.pod("p1").unwrap().ips, ["10.0.0.2"]);
        assert!(s.pod("p2").is_err());
    }

    #[tokio::test]
    async fn changes_commit_and_notify_in_the_order_they_were_applied() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(db(dir.path())).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        s.observe(Arc::new(move |change, _, _| {
            if let Change::Container { new, .. } = change {
                log.lock()
                    .unwrap()
                    .push((new.map(|c| c.pod_id.clone()), new.map(|c| c.exit_code)));
            }
        }));
        // Four threads, each changing its own container 200 times, at once.
        for t in 0..4 {
            s.add_pod(pod(&format!("p{t}"), &format!("pod{t}"), 0))
                .unwrap();
            s.add_container(ctr(&format!("c{t}"), &format!("p{t}"), "app", 0))
                .unwrap();
        }
        std::thread::scope(|scope| {
            for t in 0..4 {
                let s = s.clone();
                scope.spawn(move || {
                    for i in 1..=200 {
                        s.update_container(&format!("c{t}"), |c| c.exit_code = i)
                            .unwrap();
                    }
                });
            }
        });
        // The last pod's container is removed then added again: a reopen that
        // applied these out of order would lose it.
        s.remove_container("c3").unwrap();
        let mut again = ctr("c3", "p3", "app", 0);
        again.exit_code = 999;
        s.add_container(again).unwrap();
        s.flush().await.unwrap();

        let seen = seen.lock().unwrap().clone();
        for t in 0..4 {
            let codes: Vec<i32> = seen
                .iter()
                .filter(|(p, _)| p.as_deref() == Some(&format!("p{t}")))
                .filter_map(|(_, code)| *code)
                .collect();
            let mut want: Vec<i32> = std::iter::once(0).chain(1..=200).collect();
            if t == 3 {
                want.push(999);
            }
            assert_eq!(codes, want, "pod p{t}");
        }
        drop(s);
        let s = StateStore::open(db(dir.path())).unwrap();
        for t in 0..3 {
            assert_eq!(s.container(&format!("c{t}")).unwrap().exit_code, 200);
        }
        assert_eq!(s.container("c3").unwrap().exit_code, 999);
    }

    #[tokio::test]
    async fn reads_and_writes_do_not_wait_for_a_commit_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let db1 = db(dir.path());
        let s = StateStore::open(db1.clone()).unwrap();
        s.add_pod(pod("p1", "web", 0)).unwrap();
        s.flush().await.unwrap();
        // Hold redb's one write transaction: the writer thread blocks in its commit.
        let held = db1.get().unwrap().begin_write().unwrap();
        s.add_container(ctr("c1", "p1", "app", 0)).unwrap();
        s.update_pod("p1", |p| p.state = PodState::NotReady)
            .unwrap();
        // Reads see the changes at once, while they are not durable yet.
        assert_eq!(s.containers().len(), 1);
        assert_eq!(s.pod("p1").unwrap().state, PodState::NotReady);
        let waiting = tokio::time::timeout(Duration::from_millis(300), s.flush()).await;
        assert!(waiting.is_err(), "flush resolved while the commit was held");
        drop(held);
        tokio::time::timeout(Duration::from_secs(10), s.flush())
            .await
            .expect("flush once the writer is free")
            .unwrap();
        assert_eq!(pod_on_disk(&db1, "p1").unwrap().state, PodState::NotReady);
    }

    /// Memory storage whose fsync fails once `fail` is set; reopened on the same
    /// memory, as a file is.
    #[derive(Debug)]
    struct FailingSync {
        mem: Arc<redb::backends::InMemoryBackend>,
        fail: Arc<AtomicBool>,
    }

    impl redb::StorageBackend for FailingSync {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.mem.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            self.mem.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.mem.set_len(len)
        }
        fn sync_data(&self) -> Result<(), std::io::Error> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(std::io::Error::other("injected: disk gone"));
            }
            self.mem.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.mem.write(offset, data)
        }
    }

    #[tokio::test]
    async fn a_failed_commit_is_retried_and_the_store_recovers() {
        let fail = Arc::new(AtomicBool::new(false));
        let mem = Arc::new(redb::backends::InMemoryBackend::new());
        let (m, f) = (mem.clone(), fail.clone());
        let db = Db::with_opener(
            "memory",
            Box::new(move || {
                redb::Database::builder().create_with_backend(FailingSync {
                    mem: m.clone(),
                    fail: f.clone(),
                })
            }),
        )
        .unwrap();
        let s = StateStore::open(db.clone()).unwrap();
        s.add_pod(pod("p1", "web", 0)).unwrap();
        s.flush().await.unwrap();
        fail.store(true, Ordering::SeqCst);
        // Applied in memory and queued; the commit fails behind it.
        s.add_pod(pod("p2", "db", 0)).unwrap();
        let e = s.flush().await.unwrap_err().to_string();
        assert!(e.contains("injected: disk gone"), "{e}");
        // While it fails, new changes are refused (memory stays file + retried).
        let e = s.add_pod(pod("p3", "x", 0)).unwrap_err();
        assert!(e.to_string().contains("cannot save changes"), "{e}");
        // The caller is told to retry (Unavailable), not that vesseld broke.
        let status = tonic::Status::from(crate::engine::RuntimeError::from(e));
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(s.update_pod("p1", |_| ()).is_err());
        assert_eq!(s.pods().len(), 2, "reads answer from memory");
        // The disk is back: within a retry or two the store takes changes again,
        // and what was retried is on disk, in order.
        fail.store(false, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while s.add_pod(pod("p3", "x", 0)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the store never recovered"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        s.flush().await.unwrap();
        for id in ["p1", "p2", "p3"] {
            assert!(pod_on_disk(&db, id).is_some(), "{id} not on disk");
        }
    }

    #[test]
    fn a_record_that_does_not_decode_fails_open_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let db1 = db(dir.path());
        drop(StateStore::open(db1.clone()).unwrap());
        let wtx = db1.get().unwrap().begin_write().unwrap();
        wtx.open_table(CONTAINERS)
            .unwrap()
            .insert("c-broken", b"{\"id\":".as_slice())
            .unwrap();
        wtx.commit().unwrap();
        let e = StateStore::open(db1).err().unwrap().to_string();
        assert!(e.contains("container record c-broken"), "{e}");
    }
}
