//! Container lifecycle: CRI config → rootfs + volumes + OCI spec → agent; start,
//! stop, remove, resource updates.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use k8s_cri::v1 as cri;
use prost::Message as _;
use vessel_proto::{GUEST_POD_FILES_DIR, GUEST_SCRATCH_DIR, GUEST_SHARE_DIR};
use vessel_storage::rootfs::read_merged_file;

use super::{log_failed, Engine, LivePod, RuntimeError};
use crate::clock::now_ns;
use crate::oci::{self, GuestMount, SpecInput};
use crate::store::{new_id, ContainerRecord, ContainerState, StoreError};

/// Where the guest assembles container root filesystems (guest tmpfs).
const GUEST_ROOTFS_DIR: &str = "/run/vessel/rootfs";
/// How long a SIGKILLed container may take to be reported gone.
const KILL_WAIT: Duration = Duration::from_secs(15);

fn signal_number(name: &str) -> Result<i32, RuntimeError> {
    if name.is_empty() {
        return Ok(libc::SIGTERM);
    }
    if let Ok(n) = name.parse::<i32>() {
        return Ok(n);
    }
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    nix::sys::signal::Signal::from_str(&full)
        .map(|s| s as i32)
        .map_err(|_| {
            RuntimeError::invalid(format!(
                "unknown stop signal {name:?}; use a name like SIGTERM or a number"
            ))
        })
}

impl Engine {
    /// The running VM of a stored pod. Its entry is the truth: a live VM means
    /// READY (both change together under the pod lock).
    pub(super) fn ready_pod(&self, pod_id: &str) -> Result<Arc<LivePod>, RuntimeError> {
        let pod = self.store.pod(pod_id)?;
        self.live_pod(&pod.id).ok_or_else(|| {
            RuntimeError::precondition(format!(
                "pod sandbox {} is not ready (stopped, or its VM is gone); run a new pod",
                pod.id
            ))
        })
    }

    pub async fn create_container(
        &self,
        req: cri::CreateContainerRequest,
    ) -> Result<String, RuntimeError> {
        let config = req
            .config
            .ok_or_else(|| RuntimeError::invalid("CreateContainer: config is missing"))?;
        let meta = config
            .metadata
            .clone()
            .filter(|m| !m.name.is_empty())
            .ok_or_else(|| RuntimeError::invalid("CreateContainer: metadata.name is missing"))?;
        let image_name = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .filter(|i| !i.is_empty())
            .ok_or_else(|| RuntimeError::invalid("CreateContainer: image is missing"))?;
        let pod = self.store.pod(&req.pod_sandbox_id)?;
        let guard = self.lock_pod(&pod.id).await?;
        let live = self.ready_pod(&pod.id)?;
        let stored_config = Engine::pod_config(&pod)?;
        let pod_config = req
            .sandbox_config
            .clone()
            .unwrap_or_else(|| stored_config.clone());

        // The image, its layers and the files read from them: file work, off the
        // async workers.
        let images = self.images.clone();
        let name = image_name.clone();
        let found = tokio::task::spawn_blocking(move || {
            let Some(image) = images.resolve(&name)? else {
                return Ok(None);
            };
            let layers = images.layer_paths(&image)?;
            let image_cfg = image.config()?.config().clone();
            let passwd = read_merged_file(&layers, "etc/passwd").unwrap_or_default();
            let group = read_merged_file(&layers, "etc/group").unwrap_or_default();
            Ok::<_, vessel_image::ImageError>(Some((image, layers, image_cfg, passwd, group)))
        })
        .await
        .map_err(|e| RuntimeError::task("image lookup", e))??;
        let (image, layers, image_cfg, passwd, group) = found.ok_or_else(|| {
            RuntimeError::NotFound(format!("image {image_name} is not present; pull it first"))
        })?;

        // The stored config decides: it is what the pod was started (and checked) with.
        let pod_userns = crate::userns::for_pod(&stored_config)?;
        crate::userns::check_container(pod_userns, crate::userns::container_options(&config))?;

        let id = new_id();
        let log_path = crate::validate::log_path(&pod_config.log_directory, &config.log_path)?;
        let image_ref = image
            .repo_digests
            .first()
            .cloned()
            .unwrap_or_else(|| image.id.clone());
        let record = ContainerRecord {
            id: id.clone(),
            pod_id: pod.id.clone(),
            name: meta.name.clone(),
            attempt: meta.attempt,
            labels: config.labels.clone().into_iter().collect(),
            annotations: config.annotations.clone().into_iter().collect(),
            image: image_name.clone(),
            image_id: image.id.clone(),
            image_ref,
            log_path,
            state: ContainerState::Created,
            created_at_ns: now_ns(),
            started_at_ns: 0,
            finished_at_ns: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            config: config.encode_to_vec(),
            stop_signal: image_cfg
                .as_ref()
                .and_then(|c| c.stop_signal().clone())
                .unwrap_or_default(),
            process_json: String::new(),
        };
        // Reserve the name before any work that would have to be undone.
        self.store.add_container(record)?;
        match self
            .create_in_guest(
                &id,
                &config,
                &pod_config,
                &live,
                image_cfg.as_ref(),
                &passwd,
                &group,
                &layers,
                pod_userns,
            )
            .await
        {
            Ok(process_json) => {
                self.store
                    .update_container(&id, |c| c.process_json = process_json)?;
                self.apply_oom_score(&pod, &live).await;
                drop(guard);
                Ok(id)
            }
            Err(e) => {
                log_failed(
                    &pod.id,
                    "release the volumes of a failed container",
                    crate::volumes::release(&live, &id).await,
                );
                log_failed(
                    &pod.id,
                    "remove the record of a failed container",
                    self.store.remove_container(&id),
                );
                // Its image's rootfs goes too, unless another container of the pod
                // runs from it (the pod lock is held: none can start using it now).
                let image_in_use = self
                    .store
                    .containers_of(&pod.id)
                    .iter()
                    .any(|c| c.image_id == image.id);
                if let (false, Some(top)) = (image_in_use, layers.last().cloned()) {
                    let share = live.share.clone();
                    log_failed(
                        &pod.id,
                        "release the image rootfs of a failed container",
                        tokio::task::spawn_blocking(move || share.release_image(&top))
                            .await
                            .map_err(|e| e.to_string())
                            .and_then(|r| r.map_err(|e| e.to_string())),
                    );
                }
                drop(guard);
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn create_in_guest(
        &self,
        id: &str,
        config: &cri::ContainerConfig,
        pod_config: &cri::PodSandboxConfig,
        live: &LivePod,
        image_cfg: Option<&oci_spec::image::Config>,
        passwd: &[u8],
        group: &[u8],
        layers: &[std::path::PathBuf],
        userns: Option<crate::userns::PodUserns>,
    ) -> Result<String, RuntimeError> {
        // Only this image's merged rootfs reaches the VM, one mount whatever its
        // layer count; it stays until the pod goes (see docs/design.md).
        let (share, dirs) = (live.share.clone(), layers.to_vec());
        let image_rel = tokio::task::spawn_blocking(move || share.expose_image(&dirs))
            .await
            .map_err(|e| RuntimeError::task("image rootfs exposure", e))?
            .map_err(|e| RuntimeError::internal(format!("image rootfs: {e}")))?;
        let mut volumes = Vec::new();
        for (i, m) in config.mounts.iter().enumerate() {
            if m.container_path.is_empty() || m.host_path.is_empty() {
                return Err(RuntimeError::invalid(
                    "mount needs both host_path and container_path",
                ));
            }
            crate::validate::mount(m)?;
            if !Path::new(&m.host_path).exists() {
                return Err(RuntimeError::invalid(format!(
                    "mount source {} does not exist",
                    m.host_path
                )));
            }
            volumes.push(crate::volumes::Volume::of(i, m));
        }
        let rels = crate::volumes::bind(live, id, volumes).await?;
        let mounts = config
            .mounts
            .iter()
            .zip(rels)
            .map(|(m, rel)| GuestMount {
                destination: m.container_path.clone(),
                source: format!("{GUEST_SHARE_DIR}/{rel}"),
                // The host bind is read-only already. A read-only bind in the guest
                // too would also make the submounts the guest automounts below it
                // read-only, which a non-recursive read-only volume must not do.
                readonly: m.readonly
                    && (m.recursive_read_only
                        || !vessel_storage::sharedir::has_submounts(Path::new(&m.host_path))),
            })
            .collect();
        let pod_files = [
            ("/etc/hosts", "hosts"),
            ("/etc/resolv.conf", "resolv.conf"),
            ("/etc/hostname", "hostname"),
        ]
        .into_iter()
        .map(|(dest, name)| GuestMount {
            destination: dest.into(),
            source: format!("{GUEST_POD_FILES_DIR}/{name}"),
            readonly: false,
        })
        .collect();
        let sc = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref());
        let localhost_seccomp = match sc.and_then(|s| s.seccomp.as_ref()) {
            Some(p) if p.profile_type == cri::security_profile::ProfileType::Localhost as i32 => {
                Some(crate::validate::seccomp_profile(&p.localhost_ref).await?)
            }
            _ => None,
        };
        // The image's /etc/group can be megabytes: user resolution and the spec are
        // built off the async workers.
        let passwd = String::from_utf8_lossy(passwd).into_owned();
        let group = String::from_utf8_lossy(group).into_owned();
        let (container, pod) = (config.clone(), pod_config.clone());
        let image = image_cfg.cloned();
        let built = tokio::task::spawn_blocking(move || {
            let spec = oci::build(&SpecInput {
                container: &container,
                pod: &pod,
                image: image.as_ref(),
                passwd: &passwd,
                group: &group,
                mounts,
                pod_files,
                localhost_seccomp,
                userns,
            })
            .map_err(|e| RuntimeError::invalid(e.to_string()))?;
            let process_json = serde_json::to_string(&spec.process())
                .map_err(|e| RuntimeError::internal(format!("process json: {e}")))?;
            let spec_json = serde_json::to_vec(&spec)
                .map_err(|e| RuntimeError::internal(format!("spec json: {e}")))?;
            Ok::<_, RuntimeError>((process_json, spec_json))
        });
        let (process_json, spec_json) = built
            .await
            .map_err(|e| RuntimeError::task("container spec", e))??;

        // The "pod" PID namespace: one whose PID 1 is a pod-level init the agent
        // keeps (the pause container's role), only when asked for explicitly. POD
        // IPC is the VM's own (see oci.rs), so no container is joined for it.
        let opts = pod_config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.clone());
        let pod_mode = cri::NamespaceMode::Pod as i32;
        let share_pid = opts.as_ref().is_some_and(|o| o.pid == pod_mode);

        let root = format!("{GUEST_ROOTFS_DIR}/{id}");
        // The writable layer goes on the pod's scratch disk (node disk), not in
        // guest memory; see docs/design.md, "Writable layers".
        let writable = format!("{GUEST_SCRATCH_DIR}/{id}");
        let new = vessel_sandbox::NewContainer {
            id: id.to_owned(),
            oci_spec_json: spec_json,
            rootfs: format!("{root}/merged"),
            overlay_lower: image_rel
                .iter()
                .map(|rel| format!("{GUEST_SHARE_DIR}/{rel}"))
                .collect(),
            overlay_upper: format!("{writable}/upper"),
            overlay_work: format!("{writable}/work"),
            stdin: config.stdin,
            stdin_once: config.stdin_once,
            pod_pid_ns: share_pid,
        };
        live.vm
            .create_container(new)
            .await
            .map_err(|e| RuntimeError::agent("agent CreateContainer", e))?;
        Ok(process_json)
    }

    pub async fn start_container(&self, id: &str) -> Result<(), RuntimeError> {
        let c = self.store.container(id)?;
        let guard = self.lock_pod(&c.pod_id).await?;
        let c = self.store.container(&c.id)?;
        if c.state != ContainerState::Created {
            return Err(RuntimeError::precondition(format!(
                "container {} is {:?}, not CREATED",
                c.id, c.state
            )));
        }
        let live = self.ready_pod(&c.pod_id)?;
        live.vm
            .start_container(&c.id)
            .await
            .map_err(|e| RuntimeError::agent("agent StartContainer", e))?;
        self.store.update_container(&c.id, |c| {
            c.state = ContainerState::Running;
            c.started_at_ns = now_ns();
        })?;
        self.follow_container(&guard, &live, &c.id, &c.log_path)
            .await;
        Ok(())
    }

    /// The container's record re-read under its pod's lock; None when gone.
    async fn lock_stored_container(
        &self,
        id: &str,
    ) -> Result<Option<(super::PodGuard, ContainerRecord)>, RuntimeError> {
        let c = match self.store.container(id) {
            Ok(c) => c,
            Err(StoreError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let guard = match self.lock_pod(&c.pod_id).await {
            Ok(g) => g,
            Err(RuntimeError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        match self.store.container(&c.id) {
            Ok(c) => Ok(Some((guard, c))),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn stop_container(&self, id: &str, timeout_s: i64) -> Result<(), RuntimeError> {
        // StartContainer marks a container RUNNING and then registers its exit
        // watcher, both under the pod lock: taken briefly here, the two agree. (Not
        // held for the grace period: the kubelet stops a pod's containers at once.)
        let (c, live, ctr) = {
            let Some((_guard, c)) = self.lock_stored_container(id).await? else {
                return Ok(());
            };
            if c.state != ContainerState::Running {
                if c.state == ContainerState::Created {
                    self.store.update_container(&c.id, |c| {
                        c.state = ContainerState::Exited;
                        c.finished_at_ns = now_ns();
                        c.reason = "Error".into();
                        c.message = "stopped before it was started".into();
                    })?;
                }
                return Ok(());
            }
            let (live, ctr) = (self.live_pod(&c.pod_id), self.live_ctr(&c.pod_id, &c.id));
            (c, live, ctr)
        };
        let Some(live) = live else {
            // No VM: the pod's stop or its VM's death already ended the container.
            return Ok(());
        };
        let Some(ctr) = ctr else {
            return Err(RuntimeError::internal(format!(
                "container {} is RUNNING but vesseld does not follow it; retry the stop",
                c.id
            )));
        };
        let mut exited = ctr.exited.clone();
        if timeout_s > 0 {
            let sig = signal_number(&c.stop_signal)?;
            if let Err(e) = live.vm.signal_container(&c.id, sig, false).await {
                // SIGKILL follows after the grace period.
                tracing::debug!(container = %c.id, error = %e, "stop signal failed");
            }
            let grace = Duration::from_secs(timeout_s as u64);
            if tokio::time::timeout(grace, exited.wait_for(|d| *d))
                .await
                .is_ok()
            {
                return Ok(());
            }
        }
        live.vm
            .signal_container(&c.id, libc::SIGKILL, true)
            .await
            .map_err(|e| RuntimeError::agent("agent SignalProcess", e))?;
        tokio::time::timeout(KILL_WAIT, exited.wait_for(|d| *d))
            .await
            .map_err(|_| {
                RuntimeError::DeadlineExceeded(format!(
                    "container {} did not exit {KILL_WAIT:?} after SIGKILL; retry the stop",
                    c.id
                ))
            })?
            .map_err(|_| {
                RuntimeError::internal("the container's exit watcher ended; retry the stop")
            })?;
        Ok(())
    }

    pub async fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        // A StartContainer can win the lock only once (CREATED → RUNNING): two
        // rounds suffice; the bound guards against a record that stays RUNNING.
        for _ in 0..3 {
            let c = match self.store.container(id) {
                Ok(c) => c,
                Err(StoreError::NotFound { .. }) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            if c.state == ContainerState::Running {
                self.stop_container(&c.id, 0).await?;
            }
            let Some((guard, c)) = self.lock_stored_container(&c.id).await? else {
                return Ok(());
            };
            if c.state == ContainerState::Running {
                // A StartContainer got the lock first: stop what it started.
                continue;
            }
            if let Some(live) = self.live_pod(&c.pod_id) {
                if let Err(e) = live.vm.remove_container(&c.id).await {
                    let gone = matches!(&e, vessel_sandbox::Error::Agent(s) if s.code() == tonic::Code::NotFound);
                    if !gone {
                        return Err(RuntimeError::agent("agent RemoveContainer", e));
                    }
                }
                crate::volumes::release(&live, &c.id).await.map_err(|e| {
                    RuntimeError::internal(format!(
                        "cannot release the container's volumes (check for mounts left \
                         under the pod's share dir): {e}"
                    ))
                })?;
            }
            crate::logpump::forget(&self.pod_dir(&c.pod_id), &c.id);
            self.forget_ctr(&guard, &c.pod_id, &c.id);
            self.store.remove_container(&c.id)?;
            if let (Some(live), Ok(pod)) = (self.live_pod(&c.pod_id), self.store.pod(&c.pod_id)) {
                self.apply_oom_score(&pod, &live).await;
            }
            return Ok(());
        }
        Err(RuntimeError::precondition(format!(
            "container {id} is still running after being stopped; retry the removal"
        )))
    }

    pub async fn update_resources(
        &self,
        req: cri::UpdateContainerResourcesRequest,
    ) -> Result<(), RuntimeError> {
        let c = self.store.container(&req.container_id)?;
        let _guard = self.lock_pod(&c.pod_id).await?;
        let c = self.store.container(&c.id)?;
        if c.state == ContainerState::Exited {
            return Err(RuntimeError::precondition(format!(
                "container {} has exited",
                c.id
            )));
        }
        let live = self.ready_pod(&c.pod_id)?;
        let Some(r) = req.linux.as_ref() else {
            return Ok(());
        };
        let json = serde_json::to_vec(&oci::resources(r))
            .map_err(|e| RuntimeError::internal(format!("resources json: {e}")))?;
        live.vm
            .update_resources(&c.id, json)
            .await
            .map_err(|e| RuntimeError::agent("agent UpdateContainerResources", e))?;
        // Keep the stored config in step so ContainerStatus reports the new values.
        let mut config = cri::ContainerConfig::decode(c.config.as_slice()).map_err(|e| {
            RuntimeError::internal(format!(
                "the stored config of container {} is corrupt ({e}); recreate the container",
                c.id
            ))
        })?;
        config.linux.get_or_insert_with(Default::default).resources = Some(r.clone());
        self.store
            .update_container(&c.id, |rec| rec.config = config.encode_to_vec())?;
        if let Ok(pod) = self.store.pod(&c.pod_id) {
            self.apply_oom_score(&pod, &live).await;
        }
        Ok(())
    }

    pub fn reopen_log(&self, id: &str) -> Result<(), RuntimeError> {
        let (c, _) = self.running(id)?;
        match self.live_ctr(&c.pod_id, &c.id).and_then(|l| l.log.clone()) {
            Some(log) => log.reopen().map_err(|e| {
                RuntimeError::internal(format!("reopen {}: {e}", log.path().display()))
            }),
            None => Err(RuntimeError::precondition(format!(
                "container {} has no log file",
                c.id
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_signals_parse() {
        assert_eq!(signal_number("").unwrap(), libc::SIGTERM);
        assert_eq!(signal_number("SIGQUIT").unwrap(), libc::SIGQUIT);
        assert_eq!(signal_number("int").unwrap(), libc::SIGINT);
        assert_eq!(signal_number("9").unwrap(), 9);
        assert!(signal_number("SIGNOPE").is_err());
    }
}
