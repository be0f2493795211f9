//! The pod side of the runtime: pod VMs (vessel-sandbox), their share dirs
//! (vessel-storage), the pod records, VM crash handling and restart recovery.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_cri::v1 as cri;
use prost::Message as _;
use tokio::sync::watch;
use tonic::Status;
use vessel_image::ImageStore;
use vessel_sandbox::{PodVm, VmConfig, VmExit};
use vessel_storage::scratch::ScratchDisks;
use vessel_storage::sharedir::ShareDir;

use crate::config::{Accel, Config, RuntimeHandlerConfig, DEFAULT_HANDLER};
use crate::crilog::CriLog;
use crate::store::{
    new_id, ContainerState, PodRecord, PodState, StartupTimings, StateStore, StoreError, VmFacts,
};

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Store errors at the gRPC edge.
pub fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::NotFound { .. } => Status::not_found(e.to_string()),
        StoreError::Ambiguous { .. } => Status::invalid_argument(e.to_string()),
        StoreError::NameTaken { .. } => Status::already_exists(e.to_string()),
        StoreError::BadTransition { .. } => Status::failed_precondition(e.to_string()),
        StoreError::Db(_) => Status::internal(e.to_string()),
    }
}

pub fn sandbox_status(what: &str, e: vessel_sandbox::Error) -> Status {
    Status::internal(format!("{what}: {e}"))
}

/// A running pod VM and what lives with it.
pub struct LivePod {
    pub vm: PodVm,
    pub share: ShareDir,
}

/// A started container's host-side helpers.
pub struct LiveCtr {
    pub log: Option<Arc<CriLog>>,
    /// Becomes true once the exit is recorded.
    pub exited: watch::Receiver<bool>,
}

pub struct Engine {
    pub config: Arc<Config>,
    pub images: ImageStore,
    pub store: StateStore,
    pub pods: Mutex<HashMap<String, Arc<LivePod>>>,
    pub ctrs: Mutex<HashMap<String, Arc<LiveCtr>>>,
    /// Serializes the lifecycle calls of one pod (stop/remove vs. create/start).
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Pod networks (CNI); inert without a CNI config.
    pub net: vessel_network::NetworkManager,
    /// Each pod's scratch disk (its containers' writable layers).
    pub scratch: ScratchDisks,
}

/// The scratch disks of `config`: `<root>/scratch/<pod>.img`.
pub fn scratch_disks(config: &Config) -> ScratchDisks {
    let mkfs = mkfs_ext4().unwrap_or_else(|| PathBuf::from(MKFS_EXT4));
    ScratchDisks::new(config.root.join("scratch"), mkfs)
}

/// The program that formats scratch disks (e2fsprogs).
pub const MKFS_EXT4: &str = "mkfs.ext4";

/// `mkfs.ext4` on PATH, else in the sbin dirs a non-root PATH lacks.
pub fn mkfs_ext4() -> Option<PathBuf> {
    use vessel_sandbox::preflight::find_program;
    find_program(std::path::Path::new(MKFS_EXT4)).or_else(|| {
        ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
            .into_iter()
            .map(PathBuf::from)
            .find_map(|p| find_program(&p))
    })
}

impl Engine {
    pub fn pod_dir(&self, id: &str) -> PathBuf {
        self.config.run_root.join("pods").join(id)
    }

    /// Short: unix socket paths inside it must fit in 108 bytes.
    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.config
            .run_root
            .join("vm")
            .join(&id[..id.len().min(16)])
    }

    pub fn share_path(&self, id: &str) -> PathBuf {
        self.pod_dir(id).join("share")
    }

    pub fn live_pod(&self, id: &str) -> Option<Arc<LivePod>> {
        self.pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    pub fn live_ctr(&self, id: &str) -> Option<Arc<LiveCtr>> {
        self.ctrs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Held while a call changes the pod or adds to it.
    pub async fn lock_pod(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_owned())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    fn handler(&self, name: &str) -> Result<(String, RuntimeHandlerConfig), Status> {
        let name = if name.is_empty() {
            DEFAULT_HANDLER
        } else {
            name
        };
        match self.config.runtimes.get(name) {
            Some(h) => Ok((name.to_owned(), h.clone())),
            None => Err(Status::invalid_argument(format!(
                "unknown runtime handler {name:?}; configured: {}",
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
        db: Arc<redb::Database>,
    ) -> anyhow::Result<Arc<Self>> {
        let store = StateStore::open(db)?;
        let net = crate::podnet::manager(&config);
        let scratch = scratch_disks(&config);
        let engine = Arc::new(Engine {
            scratch,
            config,
            images,
            store,
            pods: Mutex::default(),
            ctrs: Mutex::default(),
            locks: Mutex::default(),
            net,
        });
        for pod in engine.store.pods() {
            if pod.state == PodState::Ready {
                engine.recover_pod(pod).await;
            } else {
                // A stop or a start that a crash interrupted may have left a VM
                // or mounts behind; both cleanups are no-ops when nothing is left.
                let _ = PodVm::destroy(engine.vm_dir(&pod.id)).await;
                if let Err(e) = ShareDir::existing(&engine.share_path(&pod.id)).destroy() {
                    tracing::warn!(pod = %pod.id, error = %e, "cannot release the share dir");
                }
                engine.release_network(&pod.id).await;
                engine.release_scratch(&pod.id).await;
                engine.finish_containers(&pod.id, "the pod sandbox is not running");
            }
        }
        // Disks of pods the store forgot (a crash between create and the record's
        // removal). Only READY pods' disks are still in use.
        let ready: std::collections::HashSet<String> = engine
            .store
            .pods()
            .into_iter()
            .filter(|p| p.state == PodState::Ready)
            .map(|p| p.id)
            .collect();
        let scratch = engine.scratch.clone();
        match tokio::task::spawn_blocking(move || scratch.sweep(|id| ready.contains(id))).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(removed = n, "removed scratch disks of gone pods"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot sweep scratch disks"),
            Err(e) => tracing::warn!(error = %e, "scratch disk sweep failed"),
        }
        Ok(engine)
    }

    async fn recover_pod(self: &Arc<Self>, pod: PodRecord) {
        let share = ShareDir::existing(&self.share_path(&pod.id));
        match PodVm::reconnect(self.vm_dir(&pod.id)).await {
            Ok(vm) => {
                tracing::info!(pod = %pod.id, "reconnected to the pod VM");
                let live = Arc::new(LivePod { vm, share });
                self.pods
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(pod.id.clone(), live.clone());
                self.watch_vm(&pod.id, &live);
                for c in self.store.containers_of(&pod.id) {
                    if c.state == ContainerState::Running {
                        self.follow_container(&live, &c.id, &c.log_path).await;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(pod = %pod.id, error = %e, "pod VM is gone; marking the pod NOTREADY");
                let _ = PodVm::destroy(self.vm_dir(&pod.id)).await;
                self.pod_died(&pod.id, "the pod VM was not running when vesseld restarted");
                if let Err(e) = share.destroy() {
                    tracing::warn!(pod = %pod.id, error = %e, "cannot release the share dir");
                }
                self.release_network(&pod.id).await;
                self.release_scratch(&pod.id).await;
            }
        }
    }

    /// Gives back the IP and the netns of a pod found dead at start-up at once, not at
    /// its StopPodSandbox, which may come much later or never. Stop runs it again;
    /// teardown is idempotent.
    async fn release_network(&self, pod_id: &str) {
        if let Err(e) = crate::podnet::teardown(&self.net, pod_id).await {
            tracing::warn!(pod = %pod_id, error = %e.message(), "cannot release the pod network");
        }
    }

    /// Deletes a pod's scratch disk (its VM is gone: nothing reads it again).
    /// Unlinking a large sparse file walks its extents: off the async workers.
    async fn remove_scratch(&self, pod_id: &str) -> Result<(), Status> {
        let scratch = self.scratch.clone();
        let id = pod_id.to_owned();
        tokio::task::spawn_blocking(move || scratch.remove(&id))
            .await
            .map_err(|e| Status::internal(format!("scratch disk removal failed: {e}")))?
            .map_err(|e| {
                Status::internal(format!(
                    "cannot remove the pod's scratch disk (check {}): {e}",
                    self.scratch.dir().display()
                ))
            })
    }

    /// [`Self::remove_scratch`] where a failure is only logged (RemovePodSandbox
    /// tries again).
    async fn release_scratch(&self, pod_id: &str) {
        if let Err(e) = self.remove_scratch(pod_id).await {
            tracing::warn!(pod = %pod_id, error = %e.message(), "cannot remove the scratch disk");
        }
    }

    /// Marks a pod whose VM is gone NOTREADY and its unfinished containers exited.
    fn pod_died(&self, pod_id: &str, message: &str) {
        let _ = self
            .store
            .update_pod(pod_id, |p| p.state = PodState::NotReady);
        self.finish_containers(pod_id, message);
    }

    /// Every container of the pod not yet exited becomes EXITED (255).
    pub fn finish_containers(&self, pod_id: &str, message: &str) {
        for c in self.store.containers_of(pod_id) {
            if c.state == ContainerState::Exited {
                continue;
            }
            let _ = self.store.update_container(&c.id, |c| {
                c.state = ContainerState::Exited;
                c.exit_code = 255;
                c.finished_at_ns = now_ns();
                c.reason = "Error".into();
                c.message = message.into();
            });
        }
    }

    /// Reacts to a VM that exits on its own.
    fn watch_vm(self: &Arc<Self>, pod_id: &str, live: &Arc<LivePod>) {
        let mut exits = live.vm.exit_watch();
        let engine = Arc::downgrade(self);
        let pod_id = pod_id.to_owned();
        tokio::spawn(async move {
            let how = loop {
                if let Some(how) = *exits.borrow_and_update() {
                    break how;
                }
                if exits.changed().await.is_err() {
                    return;
                }
            };
            if how != VmExit::Unexpected {
                return;
            }
            let Some(engine) = engine.upgrade() else {
                return;
            };
            // sandbox logged the warning, with what died.
            tracing::info!(pod = %pod_id, "pod VM exited unexpectedly; pod is NOTREADY");
            let live = engine
                .pods
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&pod_id);
            engine.pod_died(&pod_id, "the pod VM exited unexpectedly");
            if let Some(live) = live {
                let _ = live.vm.stop().await;
                let _ = live.share.destroy();
            }
        });
    }

    pub async fn run_pod(
        self: &Arc<Self>,
        req: cri::RunPodSandboxRequest,
    ) -> Result<String, Status> {
        let config = req
            .config
            .ok_or_else(|| Status::invalid_argument("RunPodSandbox: config is missing"))?;
        let meta = config
            .metadata
            .clone()
            .ok_or_else(|| Status::invalid_argument("RunPodSandbox: config.metadata is missing"))?;
        if meta.name.is_empty() || meta.namespace.is_empty() {
            return Err(Status::invalid_argument(
                "RunPodSandbox: metadata.name and metadata.namespace are required",
            ));
        }
        crate::podnet::check_host_network(&config)?;
        crate::validate::host_ipc(&config).map_err(|e| crate::status::invalid_input_status(&e))?;
        crate::userns::for_pod(&config).map_err(|e| crate::status::invalid_input_status(&e))?;
        let (handler_name, handler) = self.handler(&req.runtime_handler)?;
        let started = Instant::now();
        let id = new_id();
        let record = PodRecord {
            id: id.clone(),
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            uid: meta.uid.clone(),
            attempt: meta.attempt,
            labels: config.labels.clone().into_iter().collect(),
            annotations: config.annotations.clone().into_iter().collect(),
            runtime_handler: handler_name,
            // Not ready until the VM answers.
            state: PodState::NotReady,
            created_at_ns: now_ns(),
            config: config.encode_to_vec(),
            vm: None,
            ips: Vec::new(),
        };
        self.store.add_pod(record).map_err(store_status)?;
        let size = crate::vmsize::vm_size(
            handler.vcpus,
            handler.memory_mib,
            &config,
            crate::vmsize::host_cpus(),
        );
        match self.start_pod_vm(&id, &config, &handler, size).await {
            Ok((live, mut startup)) => {
                startup.total_ms = millis(started.elapsed());
                tracing::debug!(pod = %id, ?startup, "pod sandbox started");
                let facts = VmFacts {
                    pid: live.vm.vmm_pid(),
                    accel: format!("{:?}", live.vm.accel()).to_lowercase(),
                    vcpus: size.vcpus,
                    memory_mib: size.memory_mib,
                    startup,
                };
                let res = self.store.update_pod(&id, |p| {
                    p.state = PodState::Ready;
                    p.vm = Some(facts);
                });
                if let Err(e) = res {
                    self.unwind_pod(&id, Some(live)).await;
                    return Err(store_status(e));
                }
                // Its death (QEMU or a helper) makes the pod NOTREADY at once.
                self.watch_vm(&id, &live);
                Ok(id)
            }
            Err(e) => {
                self.unwind_pod(&id, None).await;
                Err(e)
            }
        }
    }

    async fn unwind_pod(&self, id: &str, live: Option<Arc<LivePod>>) {
        let live = live.or_else(|| {
            self.pods
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(id)
        });
        if let Some(live) = live {
            let _ = live.vm.stop().await;
        }
        // After the VM: QEMU holds the tap.
        let _ = crate::podnet::teardown(&self.net, id).await;
        self.pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        let _ = ShareDir::existing(&self.share_path(id)).destroy();
        let _ = std::fs::remove_dir_all(self.pod_dir(id));
        self.release_scratch(id).await;
        let _ = self.store.remove_pod(id);
    }

    async fn start_pod_vm(
        &self,
        id: &str,
        config: &cri::PodSandboxConfig,
        handler: &RuntimeHandlerConfig,
        size: crate::vmsize::VmSize,
    ) -> Result<(Arc<LivePod>, StartupTimings), Status> {
        let mut timings = StartupTimings::default();
        if !config.log_directory.is_empty() {
            std::fs::create_dir_all(&config.log_directory).map_err(|e| {
                Status::internal(format!(
                    "cannot create log directory {}: {e}",
                    config.log_directory
                ))
            })?;
        }
        let phase = Instant::now();
        let pod_net = crate::podnet::setup(&self.net, id, config).await?;
        timings.network_ms = millis(phase.elapsed());
        let phase = Instant::now();
        let share = ShareDir::create(&self.share_path(id))
            .map_err(|e| Status::internal(format!("pod share dir: {e}")))?;
        let mut files = pod_files(config);
        if let Some(n) = &pod_net {
            crate::podnet::adjust_pod_files(&mut files, &n.plan, config);
        }
        for (name, contents) in &files {
            share
                .write_pod_file(name, contents.as_bytes())
                .map_err(|e| Status::internal(format!("pod file {name}: {e}")))?;
        }
        timings.share_ms = millis(phase.elapsed());

        let kernel = handler
            .kernel
            .clone()
            .unwrap_or_else(|| self.config.guest.kernel.clone());
        let initrd = handler
            .initrd
            .clone()
            .unwrap_or_else(|| self.config.guest.initrd.clone());
        let mut vmc = VmConfig::new(id, self.vm_dir(id), share.export_path(), kernel, initrd);
        vmc.vcpus = size.vcpus;
        vmc.memory_mib = u32::try_from(size.memory_mib).unwrap_or(u32::MAX);
        vmc.accel = match handler.accel {
            Accel::Auto => vessel_sandbox::Accel::Auto,
            Accel::Kvm => vessel_sandbox::Accel::Kvm,
            Accel::Tcg => vessel_sandbox::Accel::Tcg,
        };
        vmc.accel_cache_dir = self.config.run_root.clone();
        vmc.extra_cmdline = handler.extra_kernel_args.clone();
        // The kubelet's pod cgroup: the VM's host processes are accounted to the pod.
        vmc.cgroup_parent = config
            .linux
            .as_ref()
            .map(|l| l.cgroup_parent.clone())
            .filter(|p| !p.is_empty());
        if handler.writable_layer_mib > 0 {
            let phase = Instant::now();
            let scratch = self.scratch.clone();
            let (pod, mib) = (id.to_owned(), handler.writable_layer_mib);
            let disk = tokio::task::spawn_blocking(move || scratch.create(&pod, mib))
                .await
                .map_err(|e| Status::internal(format!("scratch disk task failed: {e}")))?
                .map_err(|e| {
                    Status::internal(format!(
                        "cannot create the pod's scratch disk (is mkfs.ext4 (e2fsprogs) \
                         installed, is there space under {}?): {e}",
                        self.scratch.dir().display()
                    ))
                })?;
            vmc.scratch_disk = Some(vessel_sandbox::DiskConfig {
                file: Arc::new(disk.file),
                file_ro: Arc::new(disk.file_ro),
                path: disk.path,
            });
            timings.scratch_disk_ms = millis(phase.elapsed());
        }
        let net_plan = pod_net.map(|n| {
            vmc.netns = Some(n.netns.path().to_path_buf());
            let plan = n.plan.clone();
            vmc.net = Some(crate::podnet::vm_nic(n));
            plan
        });
        let vm = PodVm::start(vmc)
            .await
            .map_err(|e| sandbox_status("cannot start the pod VM", e))?;
        if let Some(boot) = vm.boot_timing() {
            timings.helpers_ms = millis(boot.helpers);
            timings.vm_to_agent_ms = millis(boot.vmm_to_agent);
        }
        let live = Arc::new(LivePod { vm, share });
        self.pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_owned(), live.clone());
        if let Some(plan) = net_plan {
            let phase = Instant::now();
            live.vm
                .agent()
                .configure_network(crate::podnet::configure_request(&plan, config))
                .await
                .map_err(|e| sandbox_status("cannot configure the guest network", e))?;
            let ips = crate::podnet::pod_ips(&plan);
            self.store
                .update_pod(id, |p| p.ips = ips)
                .map_err(store_status)?;
            timings.guest_network_ms = millis(phase.elapsed());
        }
        Ok((live, timings))
    }

    /// Stops a pod: its containers, its VM, its mounts. Gone or stopped: success.
    pub async fn stop_pod(&self, id: &str) -> Result<(), Status> {
        let pod = match self.store.pod(id) {
            Ok(p) => p,
            Err(StoreError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(store_status(e)),
        };
        let _guard = self.lock_pod(&pod.id).await;
        self.stop_pod_locked(&pod).await
    }

    async fn stop_pod_locked(&self, pod: &PodRecord) -> Result<(), Status> {
        let live = self
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pod.id);
        if let Some(live) = live {
            // Kill what still runs so the exit watchers record real exit codes.
            let running: Vec<_> = self
                .store
                .containers_of(&pod.id)
                .into_iter()
                .filter(|c| c.state == ContainerState::Running)
                .collect();
            for c in &running {
                let _ = live
                    .vm
                    .agent()
                    .signal_process(vessel_proto::agent::SignalProcessRequest {
                        container_id: c.id.clone(),
                        exec_id: String::new(),
                        signal: libc::SIGKILL as u32,
                        all: true,
                    })
                    .await;
            }
            for c in &running {
                if let Some(l) = self.live_ctr(&c.id) {
                    let mut rx = l.exited.clone();
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_secs(5),
                        rx.wait_for(|done| *done),
                    )
                    .await;
                }
            }
            live.vm
                .stop()
                .await
                .map_err(|e| sandbox_status("cannot stop the pod VM", e))?;
            live.share
                .destroy()
                .map_err(|e| Status::internal(format!("cannot release the share dir: {e}")))?;
        }
        // The VM is gone: its containers' writable layers go too, freeing the disk
        // now rather than at RemovePodSandbox.
        self.remove_scratch(&pod.id).await?;
        crate::podnet::teardown(&self.net, &pod.id).await?;
        self.finish_containers(&pod.id, "the pod sandbox was stopped");
        self.store
            .update_pod(&pod.id, |p| p.state = PodState::NotReady)
            .map_err(store_status)?;
        Ok(())
    }

    /// Removes a pod and its containers; stops it first if needed.
    pub async fn remove_pod(&self, id: &str) -> Result<(), Status> {
        let pod = match self.store.pod(id) {
            Ok(p) => p,
            Err(StoreError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(store_status(e)),
        };
        let _guard = self.lock_pod(&pod.id).await;
        self.stop_pod_locked(&pod).await?;
        for c in self.store.containers_of(&pod.id) {
            self.ctrs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&c.id);
            self.store.remove_container(&c.id).map_err(store_status)?;
        }
        let _ = ShareDir::existing(&self.share_path(&pod.id)).destroy();
        match std::fs::remove_dir_all(self.pod_dir(&pod.id)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Status::internal(format!(
                    "cannot remove {}: {e}",
                    self.pod_dir(&pod.id).display()
                )))
            }
        }
        let _ = PodVm::destroy(self.vm_dir(&pod.id)).await;
        self.store.remove_pod(&pod.id).map_err(store_status)?;
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pod.id);
        Ok(())
    }

    pub fn pod_config(pod: &PodRecord) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig::decode(pod.config.as_slice()).unwrap_or_default()
    }
}

/// hosts, resolv.conf and hostname of a pod.
pub fn pod_files(config: &cri::PodSandboxConfig) -> BTreeMap<&'static str, String> {
    let hostname = crate::hostname::pod_hostname(config);
    let hosts = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"
    );
    let resolv = config
        .dns_config
        .as_ref()
        .map(|dns| crate::podnet::resolv_conf(&dns.servers, &dns.searches, &dns.options))
        .unwrap_or_default();
    BTreeMap::from([
        ("hosts", hosts),
        ("resolv.conf", resolv),
        ("hostname", format!("{hostname}\n")),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_files_follow_the_config() {
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "web".into(),
                ..Default::default()
            }),
            dns_config: Some(cri::DnsConfig {
                servers: vec!["10.0.0.10".into()],
                searches: vec!["ns.svc.cluster.local".into(), "svc.cluster.local".into()],
                options: vec!["ndots:5".into()],
            }),
            ..Default::default()
        };
        let f = pod_files(&config);
        assert_eq!(f["hostname"], "web\n");
        assert!(f["hosts"].contains("127.0.1.1\tweb\n"));
        assert_eq!(
            f["resolv.conf"],
            "nameserver 10.0.0.10\nsearch ns.svc.cluster.local svc.cluster.local\noptions ndots:5\n"
        );
        let mut c = config.clone();
        c.hostname = "h1".into();
        c.dns_config = None;
        let f = pod_files(&c);
        assert_eq!(f["hostname"], "h1\n");
        assert_eq!(f["resolv.conf"], "");
    }
}
