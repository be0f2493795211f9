//! Pods and containers: their records, state machine, name reservations, and their
//! persistence in the shared redb database (tables prefixed `runtime_`).
//!
//! Every change is written through to redb before the in-memory copy changes, so a
//! vesseld killed at any point restarts with what it last acknowledged.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// pod id → JSON [`PodRecord`].
const PODS: TableDefinition<&str, &[u8]> = TableDefinition::new("runtime_pods");
/// container id → JSON [`ContainerRecord`].
const CONTAINERS: TableDefinition<&str, &[u8]> = TableDefinition::new("runtime_containers");

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
    db: Arc<Database>,
    inner: Arc<Mutex<Inner>>,
    /// Observers of committed changes (events, metrics). Called with the store locked,
    /// so they see changes in commit order; they must be quick and not call back.
    hooks: Arc<Mutex<Vec<ChangeHook>>>,
}

fn decode<T: for<'a> Deserialize<'a>>(id: &str, raw: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(raw).map_err(|e| StoreError::Db(format!("record {id}: {e}")))
}

impl StateStore {
    /// Loads every record and rebuilds the name reservations.
    pub fn open(db: Arc<Database>) -> Result<Self, StoreError> {
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
            let p: PodRecord = decode(k.value(), v.value())?;
            inner.pod_names.insert(
                pod_name_key(&p.name, &p.namespace, &p.uid, p.attempt),
                p.id.clone(),
            );
            inner.pods.insert(p.id.clone(), p);
        }
        let ctrs = rtx.open_table(CONTAINERS).map_err(StoreError::db)?;
        for entry in ctrs.iter().map_err(StoreError::db)? {
            let (k, v) = entry.map_err(StoreError::db)?;
            let c: ContainerRecord = decode(k.value(), v.value())?;
            inner.container_names.insert(
                container_name_key(&c.pod_id, &c.name, c.attempt),
                c.id.clone(),
            );
            inner.containers.insert(c.id.clone(), c);
        }
        Ok(StateStore {
            db,
            inner: Arc::new(Mutex::new(inner)),
            hooks: Arc::default(),
        })
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

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (writes go to the
        // db first), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn put<T: Serialize>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        id: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let raw = serde_json::to_vec(value).map_err(StoreError::db)?;
        let wtx = self.db.begin_write().map_err(StoreError::db)?;
        {
            let mut t = wtx.open_table(table).map_err(StoreError::db)?;
            t.insert(id, raw.as_slice()).map_err(StoreError::db)?;
        }
        wtx.commit().map_err(StoreError::db)
    }

    fn delete(&self, table: TableDefinition<&str, &[u8]>, id: &str) -> Result<(), StoreError> {
        let wtx = self.db.begin_write().map_err(StoreError::db)?;
        {
            let mut t = wtx.open_table(table).map_err(StoreError::db)?;
            t.remove(id).map_err(StoreError::db)?;
        }
        wtx.commit().map_err(StoreError::db)
    }

    /// Reserves the pod's name and persists it; fails naming the current holder.
    pub fn add_pod(&self, pod: PodRecord) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let key = pod_name_key(&pod.name, &pod.namespace, &pod.uid, pod.attempt);
        if let Some(holder) = inner.pod_names.get(&key) {
            return Err(StoreError::NameTaken {
                kind: "pod",
                name: key,
                holder: holder.clone(),
            });
        }
        self.put(PODS, &pod.id, &pod)?;
        inner.pod_names.insert(key, pod.id.clone());
        inner.pods.insert(pod.id.clone(), pod.clone());
        let change = Change::Pod {
            old: None,
            new: Some(&pod),
        };
        self.notify(&inner, change, &pod.id, None);
        Ok(())
    }

    /// Applies `f` to a pod record and persists the result.
    pub fn update_pod(
        &self,
        id: &str,
        f: impl FnOnce(&mut PodRecord),
    ) -> Result<PodRecord, StoreError> {
        let mut inner = self.lock();
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
        self.put(PODS, id, &pod)?;
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
        let mut inner = self.lock();
        let Some(pod) = inner.pods.get(id).cloned() else {
            return Ok(());
        };
        self.delete(PODS, id)?;
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
        let inner = self.lock();
        let id = resolve(&inner.pods, id, "pod sandbox")?;
        Ok(inner.pods[&id].clone())
    }

    pub fn pods(&self) -> Vec<PodRecord> {
        let mut v: Vec<_> = self.lock().pods.values().cloned().collect();
        v.sort_by_key(|p| p.created_at_ns);
        v
    }

    /// Reserves the container's name within its pod and persists it.
    pub fn add_container(&self, c: ContainerRecord) -> Result<(), StoreError> {
        let mut inner = self.lock();
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
        self.put(CONTAINERS, &c.id, &c)?;
        inner.container_names.insert(key, c.id.clone());
        inner.containers.insert(c.id.clone(), c.clone());
        let change = Change::Container {
            old: None,
            new: Some(&c),
        };
        self.notify(&inner, change, &c.pod_id, None);
        Ok(())
    }

    /// Applies `f` to a container record and persists it. A state change made by
    /// `f` must be allowed by [`transition_allowed`].
    pub fn update_container(
        &self,
        id: &str,
        f: impl FnOnce(&mut ContainerRecord),
    ) -> Result<ContainerRecord, StoreError> {
        let mut inner = self.lock();
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
        self.put(CONTAINERS, id, &c)?;
        inner.containers.insert(id.to_owned(), c.clone());
        let change = Change::Container {
            old: Some(&old),
            new: Some(&c),
        };
        self.notify(&inner, change, &c.pod_id, None);
        Ok(c)
    }

    pub fn remove_container(&self, id: &str) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let Some(c) = inner.containers.get(id).cloned() else {
            return Ok(());
        };
        self.delete(CONTAINERS, id)?;
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
        let inner = self.lock();
        let id = resolve(&inner.containers, id, "container")?;
        Ok(inner.containers[&id].clone())
    }

    pub fn containers(&self) -> Vec<ContainerRecord> {
        let mut v: Vec<_> = self.lock().containers.values().cloned().collect();
        v.sort_by_key(|c| c.created_at_ns);
        v
    }

    pub fn containers_of(&self, pod_id: &str) -> Vec<ContainerRecord> {
        let mut v: Vec<_> = self
            .lock()
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

    pub(crate) fn db(dir: &std::path::Path) -> Arc<Database> {
        Arc::new(Database::create(dir.join("state.redb")).unwrap())
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
}
