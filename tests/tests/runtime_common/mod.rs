//! Shared helpers of the runtime_* end-to-end tests: a daemon with a built guest
//! and busybox pulled, CRI call shorthands, the leak check and the cleanup guard.
// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use vessel_tests::cri::CriClient;
use vessel_tests::daemon::TestDaemon;
use vessel_tests::registry::TestRegistry;
use vessel_tests::testimages;

pub fn guest_dir() -> PathBuf {
    std::env::var_os("VESSEL_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/guest"))
}

/// A registry with busybox pushed and pulled into a vesseld whose guest is the
/// built one. None (test skipped, with a message) when no guest was built.
pub async fn setup() -> Option<(TestRegistry, TestDaemon, CriClient, String)> {
    setup_with(
        "\n[runtimes.small]\nvcpus = 1\nmemory_mib = 192\n\n\
         [runtimes.broken]\nkernel = \"/nonexistent/vmlinux\"\n",
        "runtime/busybox:1",
    )
    .await
}

/// [`setup`] with `more_config` after the default handler's table (more of its
/// keys, then other tables) and busybox pushed as `image`.
pub async fn setup_with(
    more_config: &str,
    image: &str,
) -> Option<(TestRegistry, TestDaemon, CriClient, String)> {
    let guest = guest_dir();
    let (kernel, initrd) = (guest.join("vmlinux"), guest.join("initrd.img"));
    if !kernel.is_file() || !initrd.is_file() {
        vessel_tests::skip_vm_or_fail(&format!(
            "no guest in {} (scripts/build-guest.sh builds it)",
            guest.display()
        ));
        return None;
    }
    let reg = TestRegistry::start().unwrap();
    let extra = format!(
        "[guest]\nkernel = {:?}\ninitrd = {:?}\n\n[runtimes.default]\nvcpus = 1\nmemory_mib = 256\n{more_config}",
        kernel.display().to_string(),
        initrd.display().to_string()
    );
    let d = TestDaemon::start_with(&extra).unwrap();
    d.write_hosts_toml(&reg.addr(), &reg.url()).unwrap();
    let mut c = d.client().await.unwrap();
    let img = testimages::push_busybox(&reg, image).await.unwrap();
    c.pull(&img.reference).await.unwrap();
    Some((reg, d, c, img.reference))
}

pub fn pod_config(name: &str, log_dir: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: format!("{name}-host"),
        log_directory: log_dir.display().to_string(),
        labels: HashMap::from([("app".to_string(), name.to_string())]),
        ..Default::default()
    }
}

pub fn container_config(name: &str, image: &str, cmd: &[&str]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}/0.log"),
        labels: HashMap::from([("container".to_string(), name.to_string())]),
        ..Default::default()
    }
}

pub async fn run_pod(
    c: &mut CriClient,
    config: &cri::PodSandboxConfig,
    handler: &str,
) -> Result<String, tonic::Status> {
    Ok(c.runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        })
        .await?
        .into_inner()
        .pod_sandbox_id)
}

pub async fn create(
    c: &mut CriClient,
    pod: &str,
    pod_cfg: &cri::PodSandboxConfig,
    cfg: cri::ContainerConfig,
) -> Result<String, tonic::Status> {
    Ok(c.runtime
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(cfg),
            sandbox_config: Some(pod_cfg.clone()),
        })
        .await?
        .into_inner()
        .container_id)
}

/// RemovePodSandbox (which stops the pod first), expecting success.
pub async fn remove_pod(c: &mut CriClient, pod: &str) {
    c.runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.into(),
        })
        .await
        .expect("RemovePodSandbox");
}

/// Every container vesseld lists, unfiltered.
pub async fn list_containers(c: &mut CriClient) -> Vec<cri::Container> {
    c.runtime
        .list_containers(cri::ListContainersRequest::default())
        .await
        .expect("ListContainers")
        .into_inner()
        .containers
}

pub async fn start(c: &mut CriClient, id: &str) {
    c.runtime
        .start_container(cri::StartContainerRequest {
            container_id: id.into(),
        })
        .await
        .expect("StartContainer");
}

pub async fn status(c: &mut CriClient, id: &str) -> cri::ContainerStatus {
    c.runtime
        .container_status(cri::ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        })
        .await
        .expect("ContainerStatus")
        .into_inner()
        .status
        .unwrap()
}

pub async fn pod_status(c: &mut CriClient, id: &str) -> cri::PodSandboxStatusResponse {
    c.runtime
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: true,
        })
        .await
        .expect("PodSandboxStatus")
        .into_inner()
}

/// The verbose PodSandboxStatus info (`vmPid`, `accel`, `vcpus`, `memoryMib`, ...).
pub async fn pod_info(c: &mut CriClient, id: &str) -> serde_json::Value {
    serde_json::from_str(&pod_status(c, id).await.info["info"]).expect("pod info is JSON")
}

/// CreateContainer + StartContainer; the container id.
pub async fn run_container(
    c: &mut CriClient,
    pod: &str,
    pod_cfg: &cri::PodSandboxConfig,
    cfg: cri::ContainerConfig,
) -> String {
    let id = create(c, pod, pod_cfg, cfg).await.expect("CreateContainer");
    start(c, &id).await;
    id
}

pub async fn wait_exited(c: &mut CriClient, id: &str, limit: Duration) -> cri::ContainerStatus {
    let deadline = Instant::now() + limit;
    loop {
        let s = status(c, id).await;
        if s.state == cri::ContainerState::ContainerExited as i32 {
            return s;
        }
        assert!(Instant::now() < deadline, "container {id} still {s:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every pod vesseld lists.
pub async fn pods(c: &mut CriClient) -> Vec<cri::PodSandbox> {
    c.runtime
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items
}

pub async fn exec(
    c: &mut CriClient,
    id: &str,
    cmd: &[&str],
    timeout: i64,
) -> Result<cri::ExecSyncResponse, tonic::Status> {
    Ok(c.runtime
        .exec_sync(cri::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout,
        })
        .await?
        .into_inner())
}

/// Processes (other than vesseld) whose command line names the test dir, mounts
/// under it, and anything left under the run dirs or scratch disks of removed pods.
pub fn assert_no_leaks(d: &TestDaemon) {
    let dir = d.dir().display().to_string();
    let me = std::process::id();
    let vesseld = d.pid();
    let mut left = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me || Some(pid) == vesseld {
            continue;
        }
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(&dir) {
                left.push(format!("pid {pid}: {cmd}"));
            }
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    left.extend(
        mounts
            .lines()
            .filter(|l| l.contains(&dir))
            .map(|l| format!("mount: {l}")),
    );
    // Pod run dirs, and the scratch disks (writable layers) under root.
    let dirs = ["pods", "vm"]
        .map(|sub| d.run_root().join(sub))
        .into_iter()
        .chain([d.root().join("scratch")]);
    for p in dirs {
        if let Ok(rd) = std::fs::read_dir(&p) {
            left.extend(
                rd.flatten()
                    .map(|e| format!("file: {}", e.path().display())),
            );
        }
    }
    assert!(left.is_empty(), "left behind:\n{}", left.join("\n"));
}

/// The mountinfo of this test's virtiofsd processes: their namespace is where the
/// volumes are mounted (mount points relative to the exported tree).
pub fn virtiofsd_mountinfo(d: &TestDaemon) -> String {
    let dir = d.dir().display().to_string();
    let mut out = String::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("virtiofsd") && cmd.contains(&dir) {
            out += &std::fs::read_to_string(entry.path().join("mountinfo")).unwrap_or_default();
        }
    }
    out
}

/// Kills what a failed test left (VM processes, mounts) so later tests start clean.
pub struct Cleanup(pub PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            print_consoles(&self.0.join("run/vm"));
        }
        let dir = self.0.display().to_string();
        let me = std::process::id();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if pid as u32 == me {
                continue;
            }
            if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
                if String::from_utf8_lossy(&cmd).contains(&dir) {
                    // SAFETY: kill(2) with a pid read from /proc; no memory is involved.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&dir))
            .collect();
        points.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in points {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

pub fn read_log(path: &Path) -> Vec<(String, String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut f = l.splitn(4, ' ');
            let _ts = f.next().unwrap();
            (
                f.next().unwrap_or("").to_owned(),
                f.next().unwrap_or("").to_owned(),
                f.next().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

pub const LONG_RUNNER: &str = "trap 'exit 143' TERM; while :; do sleep 0.1; done";

/// The end of every pod VM's console under `vm_dir`: what the guest kernel said
/// (overlay or module errors) when a test fails.
fn print_consoles(vm_dir: &Path) {
    for e in std::fs::read_dir(vm_dir).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(e.path().join("console.log")).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        eprintln!("--- console of VM {} (last lines) ---", e.path().display());
        for l in tail.iter().rev() {
            eprintln!("{l}");
        }
    }
}
