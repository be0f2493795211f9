//! The CRI calls the harness times, with the configs it uses.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use k8s_cri::v1 as cri;

use crate::cri::CriClient;

pub fn pod_config(name: &str, log_dir: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "bench".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_dir.join(name).display().to_string(),
        ..Default::default()
    }
}

/// A busybox container that exits within 0.1 s of SIGTERM (a plain `sleep` as PID 1
/// ignores it, and ash's `wait` is not cut short by a trapped signal, so either
/// would make StopContainer wait for its timeout).
pub fn sleeper_config(name: &str, image: &str) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: vec![
            "sh".into(),
            "-c".into(),
            "trap 'exit 0' TERM; echo ready; while :; do sleep 0.1; done".into(),
        ],
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

/// A busybox container that forks nothing once started (it logs `ready`, then `sleep`
/// replaces the shell), so it does not disturb a count of the guest's forks. As PID 1
/// it ignores SIGTERM: stop it with a timeout of 0.
pub fn idle_config(name: &str, image: &str) -> cri::ContainerConfig {
    cri::ContainerConfig {
        command: vec![
            "sh".into(),
            "-c".into(),
            "echo ready; exec sleep 86400".into(),
        ],
        ..sleeper_config(name, image)
    }
}

/// Waits until the container's CRI log shows `ready` (its TERM trap is set: a
/// SIGTERM before that would be ignored by PID 1).
pub async fn wait_ready(
    pod_config: &cri::PodSandboxConfig,
    config: &cri::ContainerConfig,
) -> anyhow::Result<()> {
    let log = Path::new(&pod_config.log_directory).join(&config.log_path);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if std::fs::read_to_string(&log).is_ok_and(|t| t.contains(" ready")) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("container never logged ready in {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// RunPodSandbox; (pod id, wall time).
pub async fn run_pod(
    c: &mut CriClient,
    config: cri::PodSandboxConfig,
) -> anyhow::Result<(String, Duration)> {
    let t = Instant::now();
    let id = c
        .runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        })
        .await
        .context("RunPodSandbox")?
        .into_inner()
        .pod_sandbox_id;
    Ok((id, t.elapsed()))
}

/// StopPodSandbox + RemovePodSandbox; wall time.
pub async fn stop_and_remove_pod(c: &mut CriClient, id: &str) -> anyhow::Result<Duration> {
    let t = Instant::now();
    c.runtime
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        })
        .await
        .context("StopPodSandbox")?;
    c.runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        })
        .await
        .context("RemovePodSandbox")?;
    Ok(t.elapsed())
}

/// Stops and removes every pod the daemon knows (teardown after a failed step).
pub async fn remove_all_pods(c: &mut CriClient) {
    let Ok(pods) = c
        .runtime
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
    else {
        return;
    };
    for p in pods.into_inner().items {
        let _ = stop_and_remove_pod(c, &p.id).await;
    }
}

/// The `startupMs` phases from the pod's verbose status, in ms.
pub async fn startup_phases(c: &mut CriClient, id: &str) -> anyhow::Result<HashMap<String, f64>> {
    let resp = c
        .runtime
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: true,
        })
        .await
        .context("PodSandboxStatus")?
        .into_inner();
    let info: serde_json::Value =
        serde_json::from_str(resp.info.get("info").map_or("{}", String::as_str))
            .context("verbose info")?;
    let Some(phases) = info["startupMs"].as_object() else {
        bail!("PodSandboxStatus verbose info has no startupMs: {info}");
    };
    // `pooled` (a bool) reads as 0 or 1.
    Ok(phases
        .iter()
        .filter_map(|(k, v)| {
            let n = v.as_f64().or_else(|| v.as_bool().map(f64::from))?;
            Some((k.clone(), n))
        })
        .collect())
}

/// The pod's QEMU pid from the verbose status.
pub async fn vm_pid(c: &mut CriClient, id: &str) -> anyhow::Result<i32> {
    let resp = c
        .runtime
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: true,
        })
        .await?
        .into_inner();
    let info: serde_json::Value =
        serde_json::from_str(resp.info.get("info").map_or("{}", String::as_str))?;
    info["vmPid"]
        .as_i64()
        .and_then(|p| i32::try_from(p).ok())
        .context("verbose info has no vmPid")
}

/// CreateContainer + StartContainer; (container id, wall time).
pub async fn create_and_start(
    c: &mut CriClient,
    pod_id: &str,
    pod_config: &cri::PodSandboxConfig,
    config: cri::ContainerConfig,
) -> anyhow::Result<(String, Duration)> {
    let t = Instant::now();
    let id = c
        .runtime
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod_id.into(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .context("CreateContainer")?
        .into_inner()
        .container_id;
    c.runtime
        .start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .context("StartContainer")?;
    Ok((id, t.elapsed()))
}

pub async fn stop_container(
    c: &mut CriClient,
    id: &str,
    timeout_s: i64,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    c.runtime
        .stop_container(cri::StopContainerRequest {
            container_id: id.into(),
            timeout: timeout_s,
        })
        .await
        .context("StopContainer")?;
    Ok(t.elapsed())
}

pub async fn remove_container(c: &mut CriClient, id: &str) -> anyhow::Result<Duration> {
    let t = Instant::now();
    c.runtime
        .remove_container(cri::RemoveContainerRequest {
            container_id: id.into(),
        })
        .await
        .context("RemoveContainer")?;
    Ok(t.elapsed())
}

/// ExecSync of `cmd`; wall time. A non-zero exit is an error.
pub async fn exec_sync(c: &mut CriClient, id: &str, cmd: &[&str]) -> anyhow::Result<Duration> {
    let t = Instant::now();
    exec_output(c, id, cmd).await?;
    Ok(t.elapsed())
}

/// ExecSync of `cmd`; its stdout. A non-zero exit is an error.
pub async fn exec_output(c: &mut CriClient, id: &str, cmd: &[&str]) -> anyhow::Result<Vec<u8>> {
    let r = c
        .runtime
        .exec_sync(cri::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
            timeout: 30,
        })
        .await
        .context("ExecSync")?
        .into_inner();
    if r.exit_code != 0 {
        bail!("ExecSync {cmd:?} exited {}", r.exit_code);
    }
    Ok(r.stdout)
}

/// `vessel_pool_warm_vms` of the default handler on vesseld's /metrics at `port`.
pub fn pool_warm_vms(port: u16) -> Option<u64> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines()
        .find(|l| l.starts_with("vessel_pool_warm_vms{handler=\"default\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// [`pool_warm_vms`] of a vesseld inside network namespace `netns`, whose metrics
/// listen on that namespace's loopback: asked from a thread that joins it.
fn pool_warm_vms_in(netns: &Path, port: u16) -> Option<u64> {
    let ns = std::fs::File::open(netns).ok()?;
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
        pool_warm_vms(port)
    })
    .join()
    .ok()
    .flatten()
}

/// Waits until the default handler's pool holds `n` warm VMs (vesseld in `netns`,
/// or in the harness's own namespace).
pub async fn wait_pool_warm(netns: Option<&Path>, port: u16, n: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let warm = || match netns {
        Some(ns) => pool_warm_vms_in(ns, port),
        None => pool_warm_vms(port),
    };
    while warm() != Some(n) {
        if Instant::now() > deadline {
            bail!("the warm pool never held {n} VMs");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The ids of the warm pool's entries (their markers under the run root).
pub fn pool_ids(run_root: &Path) -> Vec<String> {
    std::fs::read_dir(run_root.join("pool"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}
