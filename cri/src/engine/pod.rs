//! Pod lifecycle: RunPodSandbox (and its unwind), StopPodSandbox,
//! RemovePodSandbox, a VM that dies on its own, and recovery at start-up.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use prost::Message as _;
use vessel_sandbox::{PodVm, VmConfig, VmExit};
use vessel_storage::sharedir::ShareDir;

use super::pool::Warm;
use super::{destroy_share, log_failed, remove_tree, Engine, LivePod, PodGuard, RuntimeError};
use crate::clock::{millis, now_ns};
use crate::config::RuntimeHandlerConfig;
use crate::store::{
    new_id, ContainerState, PodRecord, PodState, StartupTimings, StoreError, VmFacts,
};

/// How long StopPodSandbox waits for each SIGKILLed container's exit to be recorded.
const STOP_KILL_WAIT: Duration = Duration::from_secs(5);

impl Engine {
    /// Recovers every stored pod: reconnects to the VMs that outlived the last
    /// vesseld; cleans up after the others.
    pub(super) async fn recover(self: &Arc<Self>) {
        for pod in self.store.pods() {
            let guard = self.add_entry(&pod.id);
            if pod.state == PodState::Ready {
                self.recover_pod(&guard, pod).await;
            } else {
                // A stop or a start that a crash interrupted may have left a VM
                // or mounts behind; both cleanups are no-ops when nothing is left.
                log_failed(
                    &pod.id,
                    "destroy the VM",
                    PodVm::destroy(self.vm_dir(&pod.id)).await,
                );
                log_failed(
                    &pod.id,
                    "release the share dir",
                    self.steps.destroy_share(self.share_path(&pod.id)).await,
                );
                self.release_network(&pod.id).await;
                self.release_scratch(&pod.id).await;
                self.finish_containers(&pod.id, "the pod sandbox is not running");
            }
        }
        // Disks of pods the store forgot (a crash between create and the record's
        // removal). Only READY pods' disks are still in use.
        let ready: std::collections::HashSet<String> = self
            .store
            .pods()
            .into_iter()
            .filter(|p| p.state == PodState::Ready)
            .map(|p| p.id)
            .collect();
        let scratch = self.scratch.clone();
        match tokio::task::spawn_blocking(move || scratch.sweep(|id| ready.contains(id))).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(removed = n, "removed scratch disks of gone pods"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot sweep scratch disks"),
            Err(e) => tracing::warn!(error = %e, "scratch disk sweep failed"),
        }
    }

    async fn recover_pod(self: &Arc<Self>, guard: &PodGuard, pod: PodRecord) {
        let share = ShareDir::existing(&self.share_path(&pod.id));
        match PodVm::reconnect(self.vm_dir(&pod.id)).await {
            Ok(vm) => {
                tracing::info!(pod = %pod.id, "reconnected to the pod VM");
                let live = Arc::new(LivePod {
                    vm: Arc::new(vm),
                    share,
                });
                self.set_live(guard, &pod.id, Some(live.clone()));
                self.watch_vm(&pod.id, &live);
                for c in self.store.containers_of(&pod.id) {
                    if c.state == ContainerState::Running {
                        self.follow_container(guard, &live, &c.id, &c.log_path)
                            .await;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(pod = %pod.id, error = %e, "pod VM is gone; marking the pod NOTREADY");
                log_failed(
                    &pod.id,
                    "destroy the VM",
                    PodVm::destroy(self.vm_dir(&pod.id)).await,
                );
                self.pod_died(&pod.id, "the pod VM was not running when vesseld restarted");
                log_failed(&pod.id, "release the share dir", destroy_share(share).await);
                self.release_network(&pod.id).await;
                self.release_scratch(&pod.id).await;
            }
        }
    }

    /// Gives back the IP and the netns of a pod found dead at start-up at once, not at
    /// its StopPodSandbox, which may come much later or never. Stop runs it again;
    /// teardown is idempotent.
    pub(super) async fn release_network(&self, pod_id: &str) {
        log_failed(
            pod_id,
            "release the pod network",
            self.steps.teardown_network(pod_id).await,
        );
    }

    /// What a pod (or pool entry) holds on the host besides its VM: network, share
    /// dir, pod dir, scratch disk. Run after the VM is gone (QEMU holds the tap);
    /// every step runs and a failed one is logged.
    pub(super) async fn release_host_resources(&self, id: &str) {
        self.release_network(id).await;
        log_failed(
            id,
            "release the share dir",
            self.steps.destroy_share(self.share_path(id)).await,
        );
        log_failed(
            id,
            "remove the pod dir",
            remove_tree(self.pod_dir(id)).await,
        );
        self.release_scratch(id).await;
    }

    /// [`Self::remove_scratch`] where a failure is only logged (RemovePodSandbox
    /// tries again).
    pub(super) async fn release_scratch(&self, pod_id: &str) {
        log_failed(
            pod_id,
            "remove the scratch disk",
            self.steps.remove_scratch(pod_id).await,
        );
    }

    /// Marks a pod whose VM is gone NOTREADY and its unfinished containers exited.
    fn pod_died(&self, pod_id: &str, message: &str) {
        log_failed(
            pod_id,
            "mark the pod NOTREADY",
            self.store
                .update_pod(pod_id, |p| p.state = PodState::NotReady),
        );
        self.finish_containers(pod_id, message);
    }

    /// Every container of the pod not yet exited becomes EXITED (255).
    fn finish_containers(&self, pod_id: &str, message: &str) {
        for c in self.store.containers_of(pod_id) {
            if c.state == ContainerState::Exited {
                continue;
            }
            let res = self.store.update_container(&c.id, |c| {
                c.state = ContainerState::Exited;
                c.exit_code = 255;
                c.finished_at_ns = now_ns();
                c.reason = "Error".into();
                c.message = message.into();
            });
            // The exit watcher may have recorded it in between.
            if !matches!(res, Err(StoreError::BadTransition { .. })) {
                log_failed(pod_id, "mark a container EXITED", res);
            }
        }
    }

    /// Reacts to a VM that exits on its own: under the pod lock, if it is still
    /// the pod's VM, the pod becomes NOTREADY and its VM's remains go.
    fn watch_vm(self: &Arc<Self>, pod_id: &str, live: &Arc<LivePod>) {
        let mut exits = live.vm.exit_watch();
        let engine = Arc::downgrade(self);
        let watched: Weak<LivePod> = Arc::downgrade(live);
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
            let Ok(guard) = engine.lock_pod(&pod_id).await else {
                return; // removed meanwhile
            };
            // A StopPodSandbox that ran first has dealt with it already.
            let current = engine.live_pod(&pod_id);
            if current.is_none_or(|c| Arc::as_ptr(&c) != watched.as_ptr()) {
                return;
            }
            // sandbox logged the warning, with what died.
            tracing::info!(pod = %pod_id, "pod VM exited unexpectedly; pod is NOTREADY");
            let live = engine.set_live(&guard, &pod_id, None);
            engine.pod_died(&pod_id, "the pod VM exited unexpectedly");
            if let Some(live) = live {
                log_failed(&pod_id, "stop the VM", live.vm.stop().await);
                log_failed(
                    &pod_id,
                    "release the share dir",
                    destroy_share(live.share.clone()).await,
                );
            }
        });
    }

    pub async fn run_pod(
        self: &Arc<Self>,
        req: cri::RunPodSandboxRequest,
    ) -> Result<String, RuntimeError> {
        let config = req
            .config
            .ok_or_else(|| RuntimeError::invalid("RunPodSandbox: config is missing"))?;
        let meta = config
            .metadata
            .clone()
            .ok_or_else(|| RuntimeError::invalid("RunPodSandbox: config.metadata is missing"))?;
        if meta.name.is_empty() || meta.namespace.is_empty() {
            return Err(RuntimeError::invalid(
                "RunPodSandbox: metadata.name and metadata.namespace are required",
            ));
        }
        crate::podnet::check_host_network(&config)?;
        crate::validate::host_ipc(&config)?;
        crate::userns::for_pod(&config)?;
        let (handler_name, handler) = self.handler(&req.runtime_handler)?;
        let started = Instant::now();
        let size = crate::vmsize::vm_size(
            handler.vcpus,
            handler.memory_mib,
            &config,
            crate::vmsize::host_cpus(),
        );
        // A pool VM's size and NIC were fixed at boot: a pod that wants other ones
        // boots its own VM.
        let network = crate::podnet::has_config(&self.net.config().cni_conf_dir);
        let warm = self.claim_warm(&handler_name, size, network);
        let id = warm.as_ref().map_or_else(new_id, |w| w.id.clone());
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
        // Held until the pod is READY or unwound: a stop or remove that finds the
        // record waits for it.
        let guard = self.add_entry(&id);
        if let Err(e) = self.store.add_pod(record) {
            self.remove_entry(guard, &id);
            if let Some(w) = warm {
                self.discard_warm(&w.id, Some(w.vm)).await;
            }
            return Err(e.into());
        }
        let started_vm = match warm {
            Some(w) => {
                self.adopt_warm(&w).await;
                self.start_pooled(&guard, &id, &config, w).await
            }
            None => {
                self.start_pod_vm(&guard, &id, &config, &handler, size)
                    .await
            }
        };
        match started_vm {
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
                    self.unwind_pod(guard, &id).await;
                    return Err(e.into());
                }
                // Its death (QEMU or a helper) makes the pod NOTREADY at once.
                self.watch_vm(&id, &live);
                Ok(id)
            }
            Err(e) => {
                tracing::info!(pod = %id, error = %e, "pod start failed; unwinding");
                self.unwind_pod(guard, &id).await;
                Err(e)
            }
        }
    }

    /// Undoes a RunPodSandbox, last step first; every step runs and a failed one
    /// is logged.
    async fn unwind_pod(&self, guard: PodGuard, id: &str) {
        if let Some(live) = self.set_live(&guard, id, None) {
            log_failed(id, "stop the VM", live.vm.stop().await);
        }
        // After the VM: QEMU holds the tap.
        self.release_host_resources(id).await;
        log_failed(id, "remove the pod record", self.store.remove_pod(id));
        self.remove_entry(guard, id);
    }

    async fn start_pod_vm(
        &self,
        guard: &PodGuard,
        id: &str,
        config: &cri::PodSandboxConfig,
        handler: &RuntimeHandlerConfig,
        size: crate::vmsize::VmSize,
    ) -> Result<(Arc<LivePod>, StartupTimings), RuntimeError> {
        let mut timings = StartupTimings::default();
        create_log_dir(config).await?;
        let phase = Instant::now();
        let pod_net = self.steps.setup_network(id, config).await?;
        timings.network_ms = millis(phase.elapsed());
        let phase = Instant::now();
        let mut files = crate::podfiles::pod_files(config);
        if let Some(n) = &pod_net {
            crate::podnet::adjust_pod_files(&mut files, &n.plan, config);
        }
        let share = self.steps.create_share(self.share_path(id), files).await?;
        timings.share_ms = millis(phase.elapsed());

        let mut vmc = self.vm_config(id, handler, size, &share);
        // The kubelet's pod cgroup: the VM's host processes are accounted to the pod
        // (vm_config has set the default parent for pods that name none).
        if let Some(parent) = config
            .linux
            .as_ref()
            .map(|l| l.cgroup_parent.clone())
            .filter(|p| !p.is_empty())
        {
            vmc.cgroup_parent = Some(parent);
        }
        vmc.oom_score_adj = Some(crate::oomscore::for_sandbox(config));
        if handler.writable_layer_mib > 0 {
            let phase = Instant::now();
            let disk = self
                .steps
                .create_scratch(id, handler.writable_layer_mib)
                .await?;
            vmc.scratch_disk = Some(vessel_sandbox::DiskConfig {
                file: Arc::new(disk.file),
                file_ro: Arc::new(disk.file_ro),
                path: disk.path,
            });
            timings.scratch_disk_ms = millis(phase.elapsed());
        }
        let net_plan = pod_net.map(|n| {
            vmc.netns = Some(n.netns);
            vmc.net = Some(n.nic);
            n.plan
        });
        let vm = self.steps.start_vm(vmc).await?;
        if let Some(boot) = vm.boot_timing() {
            timings.helpers_ms = millis(boot.helpers);
            timings.vm_to_agent_ms = millis(boot.vmm_to_agent);
        }
        let live = Arc::new(LivePod { vm, share });
        self.set_live(guard, id, Some(live.clone()));
        if let Some(plan) = net_plan {
            self.configure_guest_network(&live, id, &plan, None, config, &mut timings)
                .await?;
        }
        Ok((live, timings))
    }

    /// A pod's start on a pool VM: CNI ADD into the VM's netns, the pod files into
    /// its share, the guest network. The caller unwinds a failure as for a cold start.
    async fn start_pooled(
        &self,
        guard: &PodGuard,
        id: &str,
        config: &cri::PodSandboxConfig,
        warm: Warm,
    ) -> Result<(Arc<LivePod>, StartupTimings), RuntimeError> {
        let mut timings = StartupTimings {
            pooled: true,
            ..Default::default()
        };
        let live = Arc::new(LivePod {
            vm: warm.vm,
            share: warm.share.clone(),
        });
        // From here a failure's unwind stops the VM.
        self.set_live(guard, id, Some(live.clone()));
        // Booted under vesseld's own cgroup parent: the kubelet accounts the pod's
        // VM in its pod cgroup, as for a cold boot.
        if let Some(parent) = config
            .linux
            .as_ref()
            .map(|l| l.cgroup_parent.as_str())
            .filter(|p| !p.is_empty())
        {
            let phase = Instant::now();
            super::pool::join_pod_cgroup(live.vm.as_ref(), parent).await?;
            timings.cgroup_ms = millis(phase.elapsed());
        }
        // No longer the idle pool's first-to-go score: the pod's.
        super::pool::set_oom_score(live.vm.as_ref(), crate::oomscore::for_sandbox(config)).await?;
        create_log_dir(config).await?;
        let mut files = crate::podfiles::pod_files(config);
        let mut net_plan = None;
        if let Some(mac) = warm.mac {
            let phase = Instant::now();
            let plan = self.steps.attach_network(id, config).await?;
            crate::podnet::adjust_pod_files(&mut files, &plan, config);
            timings.network_ms = millis(phase.elapsed());
            net_plan = Some((plan, mac));
        }
        let phase = Instant::now();
        self.steps.write_pod_files(warm.share, files).await?;
        timings.share_ms = millis(phase.elapsed());
        if let Some((plan, mac)) = net_plan {
            // The NIC's MAC was fixed at boot, before the veth existed: the agent
            // finds it by that MAC and gives it the veth's, which the CNI plugins
            // may enforce (the bridge's macspoofchk).
            self.configure_guest_network(&live, id, &plan, Some(&mac), config, &mut timings)
                .await?;
        }
        Ok((live, timings))
    }

    /// The guest's interfaces, routes, DNS and hostname from the plan
    /// (`current_mac`: the NIC's MAC when it is not yet the plan's); the pod's IPs
    /// into its record.
    async fn configure_guest_network(
        &self,
        live: &LivePod,
        id: &str,
        plan: &vessel_network::GuestNetworkPlan,
        current_mac: Option<&str>,
        config: &cri::PodSandboxConfig,
        timings: &mut StartupTimings,
    ) -> Result<(), RuntimeError> {
        let phase = Instant::now();
        let mut req = crate::podnet::configure_request(plan, config);
        if let Some(mac) = current_mac {
            for i in &mut req.interfaces {
                mac.clone_into(&mut i.current_mac);
            }
        }
        live.vm
            .configure_network(req)
            .await
            .map_err(|e| RuntimeError::agent("cannot configure the guest network", e))?;
        let ips = crate::podnet::pod_ips(plan);
        self.store.update_pod(id, |p| p.ips = ips)?;
        timings.guest_network_ms = millis(phase.elapsed());
        Ok(())
    }

    /// The VM config of a pod (or pool) VM of `handler` and `size`, sharing `share`.
    pub(super) fn vm_config(
        &self,
        id: &str,
        handler: &RuntimeHandlerConfig,
        size: crate::vmsize::VmSize,
        share: &ShareDir,
    ) -> VmConfig {
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
        vmc.accel = handler.accel;
        vmc.accel_cache_dir = self.config.run_root.clone();
        vmc.extra_cmdline = handler.extra_kernel_args.clone();
        vmc.jail = Some(self.config.jail.uid_range());
        vmc.cgroup_parent = Some(self.config.jail.default_cgroup_parent.clone());
        vmc
    }

    /// The pod's lock and its record, re-read under the lock; None when the pod
    /// is gone (before or while waiting).
    async fn lock_stored_pod(
        &self,
        id: &str,
    ) -> Result<Option<(PodGuard, PodRecord)>, RuntimeError> {
        let pod = match self.store.pod(id) {
            Ok(p) => p,
            Err(StoreError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let guard = match self.lock_pod(&pod.id).await {
            Ok(g) => g,
            Err(RuntimeError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        match self.store.pod(&pod.id) {
            Ok(p) => Ok(Some((guard, p))),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Stops a pod: its containers, its VM, its mounts. Gone or stopped: success.
    pub async fn stop_pod(&self, id: &str) -> Result<(), RuntimeError> {
        match self.lock_stored_pod(id).await? {
            Some((guard, pod)) => self.stop_pod_locked(&guard, &pod).await,
            None => Ok(()),
        }
    }

    async fn stop_pod_locked(&self, guard: &PodGuard, pod: &PodRecord) -> Result<(), RuntimeError> {
        if let Some(live) = self.set_live(guard, &pod.id, None) {
            // Kill what still runs so the exit watchers record real exit codes.
            let running: Vec<_> = self
                .store
                .containers_of(&pod.id)
                .into_iter()
                .filter(|c| c.state == ContainerState::Running)
                .collect();
            for c in &running {
                if let Err(e) = live.vm.signal_container(&c.id, libc::SIGKILL, true).await {
                    // The VM stops next, which ends it anyway.
                    tracing::debug!(pod = %pod.id, container = %c.id, error = %e, "SIGKILL failed");
                }
            }
            for c in &running {
                if let Some(l) = self.live_ctr(&pod.id, &c.id) {
                    let mut rx = l.exited.clone();
                    let _ = tokio::time::timeout(STOP_KILL_WAIT, rx.wait_for(|done| *done)).await;
                }
            }
            live.vm
                .stop()
                .await
                .map_err(|e| RuntimeError::sandbox("cannot stop the pod VM", e))?;
            destroy_share(live.share.clone()).await?;
        }
        // The VM is gone: its containers' writable layers go too, freeing the disk
        // now rather than at RemovePodSandbox.
        self.steps.remove_scratch(&pod.id).await?;
        self.steps.teardown_network(&pod.id).await?;
        self.finish_containers(&pod.id, "the pod sandbox was stopped");
        self.store
            .update_pod(&pod.id, |p| p.state = PodState::NotReady)?;
        Ok(())
    }

    /// Removes a pod and its containers; stops it first if needed.
    pub async fn remove_pod(&self, id: &str) -> Result<(), RuntimeError> {
        let Some((guard, pod)) = self.lock_stored_pod(id).await? else {
            return Ok(());
        };
        self.stop_pod_locked(&guard, &pod).await?;
        for c in self.store.containers_of(&pod.id) {
            self.forget_ctr(&guard, &pod.id, &c.id);
            self.store.remove_container(&c.id)?;
        }
        log_failed(
            &pod.id,
            "release the share dir",
            self.steps.destroy_share(self.share_path(&pod.id)).await,
        );
        remove_tree(self.pod_dir(&pod.id)).await?;
        log_failed(
            &pod.id,
            "destroy the VM",
            PodVm::destroy(self.vm_dir(&pod.id)).await,
        );
        self.store.remove_pod(&pod.id)?;
        self.remove_entry(guard, &pod.id);
        Ok(())
    }

    /// Gives the pod VM's host processes the OOM score its containers ask for
    /// (`crate::oomscore`). Called with the pod lock held, after its set of
    /// containers or their resources changed. A failure is logged: the pod runs on,
    /// only with a less fitting score.
    pub(super) async fn apply_oom_score(&self, pod: &PodRecord, live: &LivePod) {
        let Ok(config) = Engine::pod_config(pod) else {
            return;
        };
        let asks = self
            .store
            .containers_of(&pod.id)
            .into_iter()
            .filter_map(|c| {
                cri::ContainerConfig::decode(c.config.as_slice())
                    .ok()
                    .map(|cfg| crate::oomscore::of_container(&cfg))
            });
        let score = crate::oomscore::for_pod(crate::oomscore::for_sandbox(&config), asks);
        log_failed(
            &pod.id,
            "set the pod VM's OOM score",
            super::pool::set_oom_score(live.vm.as_ref(), score).await,
        );
    }

    /// The config a pod was started with; a record that does not decode is an error,
    /// not an empty config.
    pub fn pod_config(pod: &PodRecord) -> Result<cri::PodSandboxConfig, RuntimeError> {
        cri::PodSandboxConfig::decode(pod.config.as_slice()).map_err(|e| {
            RuntimeError::internal(format!(
                "the stored config of pod sandbox {} is corrupt ({e}); remove the pod and \
                 run it again",
                pod.id
            ))
        })
    }
}

/// The directory the kubelet wants the pod's container logs in.
async fn create_log_dir(config: &cri::PodSandboxConfig) -> Result<(), RuntimeError> {
    if config.log_directory.is_empty() {
        return Ok(());
    }
    let dir = config.log_directory.clone();
    super::blocking("cannot create the pod's log directory", move || {
        std::fs::create_dir_all(dir)
    })
    .await
}
