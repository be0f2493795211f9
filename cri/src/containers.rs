//! The container side of the runtime: CRI config → rootfs + volumes + OCI spec →
//! agent; exits (agent WaitProcess) → records; output (agent ReadOutput) → CRI logs.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use k8s_cri::v1 as cri;
use prost::Message as _;
use tonic::Status;
use vessel_proto::agent as pb;
use vessel_proto::{GUEST_POD_FILES_DIR, GUEST_SCRATCH_DIR, GUEST_SHARE_DIR};
use vessel_sandbox::AgentClient;
use vessel_storage::rootfs::{guest_lowerdirs, read_merged_file};

use crate::oci::{self, GuestMount, SpecInput};
use crate::pods::{now_ns, store_status, Engine, LivePod};
use crate::status::{image_status, invalid_input_status};
use crate::store::{new_id, ContainerRecord, ContainerState, PodState, StoreError};

/// Where the guest assembles container root filesystems (guest tmpfs).
const GUEST_ROOTFS_DIR: &str = "/run/vessel/rootfs";
/// Most output ExecSync keeps per stream (containerd's cap): the reply is held in
/// vesseld's memory, and the guest decides how much it sends.
pub const MAX_EXEC_SYNC_OUTPUT: usize = 16 << 20;
/// How long a SIGKILLed container may take to be reported gone.
const KILL_WAIT: Duration = Duration::from_secs(15);

fn agent_status(what: &str, e: vessel_sandbox::Error) -> Status {
    match e {
        vessel_sandbox::Error::Agent(s) => {
            Status::new(s.code(), format!("{what}: {}", s.message()))
        }
        e => Status::internal(format!("{what}: {e}")),
    }
}

fn signal_number(name: &str) -> Result<i32, Status> {
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
        .map_err(|_| Status::invalid_argument(format!("unknown stop signal {name:?}")))
}

impl Engine {
    fn ready_pod(&self, pod_id: &str) -> Result<Arc<LivePod>, Status> {
        let pod = self.store.pod(pod_id).map_err(store_status)?;
        match (pod.state, self.live_pod(&pod.id)) {
            (PodState::Ready, Some(live)) => Ok(live),
            _ => Err(Status::failed_precondition(format!(
                "pod sandbox {} is not ready (stopped, or its VM is gone)",
                pod.id
            ))),
        }
    }

    pub async fn create_container(
        &self,
        req: cri::CreateContainerRequest,
    ) -> Result<String, Status> {
        let config = req
            .config
            .ok_or_else(|| Status::invalid_argument("CreateContainer: config is missing"))?;
        let meta = config
            .metadata
            .clone()
            .filter(|m| !m.name.is_empty())
            .ok_or_else(|| Status::invalid_argument("CreateContainer: metadata.name is missing"))?;
        let image_name = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .filter(|i| !i.is_empty())
            .ok_or_else(|| Status::invalid_argument("CreateContainer: image is missing"))?;
        let pod = self.store.pod(&req.pod_sandbox_id).map_err(store_status)?;
        let _guard = self.lock_pod(&pod.id).await;
        let live = self.ready_pod(&pod.id)?;
        let pod_config = req
            .sandbox_config
            .clone()
            .unwrap_or_else(|| Engine::pod_config(&pod));

        // The image and its layers.
        let images = self.images.clone();
        let name = image_name.clone();
        let (image, layers) = tokio::task::spawn_blocking(move || {
            let image = images.resolve(&name)?;
            let layers = match &image {
                Some(i) => images.layer_paths(i)?,
                None => Vec::new(),
            };
            Ok::<_, vessel_image::ImageError>((image, layers))
        })
        .await
        .map_err(|e| Status::internal(format!("image lookup: {e}")))?
        .map_err(|e| image_status(&e))?;
        let image = image.ok_or_else(|| {
            Status::not_found(format!("image {image_name} is not present; pull it first"))
        })?;
        let image_config = image.config().map_err(|e| image_status(&e))?;
        let image_cfg = image_config.config().clone();
        let passwd = read_merged_file(&layers, "etc/passwd").unwrap_or_default();
        let group = read_merged_file(&layers, "etc/group").unwrap_or_default();

        // The stored config decides: it is what the pod was started (and checked) with.
        let pod_userns = crate::userns::for_pod(&Engine::pod_config(&pod))
            .map_err(|e| invalid_input_status(&e))?;
        crate::userns::check_container(pod_userns, crate::userns::container_options(&config))
            .map_err(|e| invalid_input_status(&e))?;

        let id = new_id();
        let log_path = crate::validate::log_path(&pod_config.log_directory, &config.log_path)
            .map_err(|e| invalid_input_status(&e))?;
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
        self.store.add_container(record).map_err(store_status)?;
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
                    .update_container(&id, |c| c.process_json = process_json)
                    .map_err(store_status)?;
                Ok(id)
            }
            Err(e) => {
                let _ = crate::volumes::release(&live, &id).await;
                let _ = self.store.remove_container(&id);
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
    ) -> Result<String, Status> {
        // Only this image's layers reach the VM; they stay until the pod goes.
        live.share
            .expose_layers(layers)
            .map_err(|e| Status::internal(format!("image layer: {e}")))?;
        let mut volumes = Vec::new();
        for (i, m) in config.mounts.iter().enumerate() {
            if m.container_path.is_empty() || m.host_path.is_empty() {
                return Err(Status::invalid_argument(
                    "mount needs both host_path and container_path",
                ));
            }
            crate::validate::mount(m).map_err(|e| crate::status::invalid_input_status(&e))?;
            if !Path::new(&m.host_path).exists() {
                return Err(Status::invalid_argument(format!(
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
                Some(
                    crate::validate::seccomp_profile(&p.localhost_ref)
                        .await
                        .map_err(|e| invalid_input_status(&e))?,
                )
            }
            _ => None,
        };
        let passwd = String::from_utf8_lossy(passwd);
        let group = String::from_utf8_lossy(group);
        let spec = oci::build(&SpecInput {
            container: config,
            pod: pod_config,
            image: image_cfg,
            passwd: &passwd,
            group: &group,
            mounts,
            pod_files,
            localhost_seccomp,
            userns,
        })
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let process_json = serde_json::to_string(&spec.process())
            .map_err(|e| Status::internal(format!("process json: {e}")))?;
        let spec_json =
            serde_json::to_vec(&spec).map_err(|e| Status::internal(format!("spec json: {e}")))?;

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
        let req = pb::CreateContainerRequest {
            container_id: id.to_owned(),
            oci_spec_json: spec_json,
            rootfs: Some(pb::Rootfs {
                path: format!("{root}/merged"),
                overlay_lower: guest_lowerdirs(layers, &format!("{GUEST_SHARE_DIR}/layers")),
                overlay_upper: format!("{writable}/upper"),
                overlay_work: format!("{writable}/work"),
            }),
            stdin: config.stdin,
            stdin_once: config.stdin_once,
            share_pid_ns_with: String::new(),
            share_ipc_ns_with: String::new(),
            pod_pid_ns: share_pid,
        };
        live.vm
            .agent()
            .create_container(req)
            .await
            .map_err(|e| agent_status("agent CreateContainer", e))?;
        Ok(process_json)
    }

    pub async fn start_container(&self, id: &str) -> Result<(), Status> {
        let c = self.store.container(id).map_err(store_status)?;
        let _guard = self.lock_pod(&c.pod_id).await;
        let c = self.store.container(&c.id).map_err(store_status)?;
        if c.state != ContainerState::Created {
            return Err(Status::failed_precondition(format!(
                "container {} is {:?}, not CREATED",
                c.id, c.state
            )));
        }
        let live = self.ready_pod(&c.pod_id)?;
        live.vm
            .agent()
            .start_container(pb::ContainerRef {
                container_id: c.id.clone(),
            })
            .await
            .map_err(|e| agent_status("agent StartContainer", e))?;
        self.store
            .update_container(&c.id, |c| {
                c.state = ContainerState::Running;
                c.started_at_ns = now_ns();
            })
            .map_err(store_status)?;
        self.follow_container(&live, &c.id, &c.log_path).await;
        Ok(())
    }

    pub async fn stop_container(&self, id: &str, timeout_s: i64) -> Result<(), Status> {
        let c = match self.store.container(id) {
            Ok(c) => c,
            Err(StoreError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(store_status(e)),
        };
        if c.state != ContainerState::Running {
            if c.state == ContainerState::Created {
                let _ = self.store.update_container(&c.id, |c| {
                    c.state = ContainerState::Exited;
                    c.finished_at_ns = now_ns();
                    c.reason = "Error".into();
                    c.message = "stopped before it was started".into();
                });
            }
            return Ok(());
        }
        // StartContainer marks a container RUNNING and then registers its exit
        // watcher, both under the pod lock: taken briefly here, the two agree. (Not
        // held for the grace period: the kubelet stops a pod's containers at once.)
        let (live, ctr) = {
            let _guard = self.lock_pod(&c.pod_id).await;
            (self.live_pod(&c.pod_id), self.live_ctr(&c.id))
        };
        let Some(live) = live else {
            // No VM: the pod's stop or its VM's death already ended the container.
            return Ok(());
        };
        let Some(ctr) = ctr else {
            return Err(Status::internal(format!(
                "container {} is RUNNING but vesseld does not follow it; retry the stop",
                c.id
            )));
        };
        let agent = live.vm.agent();
        let mut exited = ctr.exited.clone();
        if timeout_s > 0 {
            let sig = signal_number(&c.stop_signal)?;
            let _ = agent
                .signal_process(pb::SignalProcessRequest {
                    container_id: c.id.clone(),
                    exec_id: String::new(),
                    signal: sig as u32,
                    all: false,
                })
                .await;
            let grace = Duration::from_secs(timeout_s as u64);
            if tokio::time::timeout(grace, exited.wait_for(|d| *d))
                .await
                .is_ok()
            {
                return Ok(());
            }
        }
        agent
            .signal_process(pb::SignalProcessRequest {
                container_id: c.id.clone(),
                exec_id: String::new(),
                signal: libc::SIGKILL as u32,
                all: true,
            })
            .await
            .map_err(|e| agent_status("agent SignalProcess", e))?;
        tokio::time::timeout(KILL_WAIT, exited.wait_for(|d| *d))
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "container {} did not exit {KILL_WAIT:?} after SIGKILL",
                    c.id
                ))
            })?
            .map_err(|_| Status::internal("exit watcher ended"))?;
        Ok(())
    }

    pub async fn remove_container(&self, id: &str) -> Result<(), Status> {
        let c = match self.store.container(id) {
            Ok(c) => c,
            Err(StoreError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(store_status(e)),
        };
        if c.state == ContainerState::Running {
            self.stop_container(&c.id, 0).await?;
        }
        if let Some(live) = self.live_pod(&c.pod_id) {
            if let Err(e) = live
                .vm
                .agent()
                .remove_container(pb::ContainerRef {
                    container_id: c.id.clone(),
                })
                .await
            {
                let gone = matches!(&e, vessel_sandbox::Error::Agent(s) if s.code() == tonic::Code::NotFound);
                if !gone {
                    return Err(agent_status("agent RemoveContainer", e));
                }
            }
            crate::volumes::release(&live, &c.id)
                .await
                .map_err(|e| Status::internal(format!("cannot release volumes: {e}")))?;
        }
        crate::logpump::forget(&self.pod_dir(&c.pod_id), &c.id);
        self.ctrs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&c.id);
        self.store.remove_container(&c.id).map_err(store_status)
    }

    fn running(&self, id: &str) -> Result<(ContainerRecord, Arc<LivePod>), Status> {
        let c = self.store.container(id).map_err(store_status)?;
        if c.state != ContainerState::Running {
            return Err(Status::failed_precondition(format!(
                "container {} is not running ({:?})",
                c.id, c.state
            )));
        }
        let live = self.ready_pod(&c.pod_id)?;
        Ok((c, live))
    }

    pub async fn exec_sync(
        &self,
        req: cri::ExecSyncRequest,
    ) -> Result<cri::ExecSyncResponse, Status> {
        if req.cmd.is_empty() {
            return Err(Status::invalid_argument("ExecSync: cmd is empty"));
        }
        let (c, live) = self.running(&req.container_id)?;
        let mut process: oci_spec::runtime::Process =
            serde_json::from_str(&c.process_json).unwrap_or_default();
        process.set_args(Some(req.cmd.clone()));
        process.set_terminal(Some(false));
        process.set_console_size(None);
        let exec_id = new_id()[..16].to_owned();
        let agent = live.vm.agent().clone();
        agent
            .exec_process(pb::ExecProcessRequest {
                container_id: c.id.clone(),
                exec_id: exec_id.clone(),
                oci_process_json: serde_json::to_vec(&process)
                    .map_err(|e| Status::internal(e.to_string()))?,
                stdin: false,
            })
            .await
            .map_err(|e| agent_status("agent ExecProcess", e))?;
        let run = async {
            let out = read_all(&agent, &c.id, &exec_id, pb::OutputStream::Stdout);
            let err = read_all(&agent, &c.id, &exec_id, pb::OutputStream::Stderr);
            // The first stream over its cap ends both reads (the other may never end).
            let (out, err) = tokio::try_join!(out, err)?;
            let status = agent
                .wait_process(&c.id, &exec_id)
                .await
                .map_err(|e| agent_status("agent WaitProcess", e))?;
            Ok::<_, Status>(cri::ExecSyncResponse {
                stdout: out,
                stderr: err,
                exit_code: status.exit_code,
            })
        };
        let kill = || async {
            let _ = agent.kill_exec(&c.id, &exec_id).await;
        };
        let res = if req.timeout > 0 {
            match tokio::time::timeout(Duration::from_secs(req.timeout as u64), run).await {
                Ok(r) => r,
                Err(_) => {
                    kill().await;
                    return Err(Status::deadline_exceeded(format!(
                        "command {:?} timed out after {}s",
                        req.cmd, req.timeout
                    )));
                }
            }
        } else {
            run.await
        };
        if matches!(&res, Err(s) if s.code() == tonic::Code::ResourceExhausted) {
            kill().await;
        }
        res
    }

    pub async fn update_resources(
        &self,
        req: cri::UpdateContainerResourcesRequest,
    ) -> Result<(), Status> {
        let c = self
            .store
            .container(&req.container_id)
            .map_err(store_status)?;
        if c.state == ContainerState::Exited {
            return Err(Status::failed_precondition(format!(
                "container {} has exited",
                c.id
            )));
        }
        let live = self.ready_pod(&c.pod_id)?;
        let Some(r) = req.linux.as_ref() else {
            return Ok(());
        };
        let json =
            serde_json::to_vec(&oci::resources(r)).map_err(|e| Status::internal(e.to_string()))?;
        live.vm
            .agent()
            .update_container_resources(pb::UpdateResourcesRequest {
                container_id: c.id.clone(),
                oci_linux_resources_json: json,
            })
            .await
            .map_err(|e| agent_status("agent UpdateContainerResources", e))?;
        // Keep the stored config in step so ContainerStatus reports the new values.
        let mut config = cri::ContainerConfig::decode(c.config.as_slice()).unwrap_or_default();
        config.linux.get_or_insert_with(Default::default).resources = Some(r.clone());
        self.store
            .update_container(&c.id, |rec| rec.config = config.encode_to_vec())
            .map_err(store_status)?;
        Ok(())
    }

    pub fn reopen_log(&self, id: &str) -> Result<(), Status> {
        let (c, _) = self.running(id)?;
        match self.live_ctr(&c.id).and_then(|l| l.log.clone()) {
            Some(log) => log
                .reopen()
                .map_err(|e| Status::internal(format!("reopen {}: {e}", log.path().display()))),
            None => Err(Status::failed_precondition(format!(
                "container {} has no log file",
                c.id
            ))),
        }
    }
}

async fn read_all(
    agent: &AgentClient,
    id: &str,
    exec_id: &str,
    which: pb::OutputStream,
) -> Result<Vec<u8>, Status> {
    let req = pb::ReadOutputRequest {
        container_id: id.into(),
        exec_id: exec_id.into(),
        stream: which as i32,
        ..Default::default()
    };
    let mut s = agent
        .read_output(req)
        .await
        .map_err(|e| agent_status("agent ReadOutput", e))?;
    let mut out = Vec::new();
    while let Some(chunk) = s.message().await? {
        if out.len() + chunk.data.len() > MAX_EXEC_SYNC_OUTPUT {
            return Err(Status::resource_exhausted(format!(
                "ExecSync: the command wrote more than {} MiB to {}, the most ExecSync \
                 returns; it was killed. Use a streaming exec (crictl exec -i) for large output",
                MAX_EXEC_SYNC_OUTPUT >> 20,
                match which {
                    pb::OutputStream::Stdout => "stdout",
                    pb::OutputStream::Stderr => "stderr",
                }
            )));
        }
        out.extend_from_slice(&chunk.data);
    }
    Ok(out)
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
