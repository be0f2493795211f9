//! RuntimeService end to end through vesseld's socket: real pod VMs (TCG), a real
//! registry on 127.0.0.1, busybox containers. Each test boots one VM; every test
//! ends with a leak check (processes, mounts, run/state dirs).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use tonic::Code;
use vessel_tests::cri::CriClient;
use vessel_tests::daemon::TestDaemon;
use vessel_tests::registry::TestRegistry;
use vessel_tests::testimages;

fn guest_dir() -> PathBuf {
    std::env::var_os("VESSEL_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/guest"))
}

/// A registry with busybox pushed and pulled into a vesseld whose guest is the
/// built one. None (test skipped, with a message) when no guest was built.
async fn setup() -> Option<(TestRegistry, TestDaemon, CriClient, String)> {
    let guest = guest_dir();
    let (kernel, initrd) = (guest.join("vmlinux"), guest.join("initrd.img"));
    if !kernel.is_file() || !initrd.is_file() {
        eprintln!(
            "SKIPPED: no guest in {} (scripts/build-guest.sh builds it)",
            guest.display()
        );
        return None;
    }
    let reg = TestRegistry::start().unwrap();
    let extra = format!(
        "[guest]\nkernel = {:?}\ninitrd = {:?}\n\n[runtimes.default]\nvcpus = 1\nmemory_mib = 256\n\n\
         [runtimes.small]\nvcpus = 1\nmemory_mib = 192\n\n\
         [runtimes.broken]\nkernel = \"/nonexistent/vmlinux\"\n",
        kernel.display().to_string(),
        initrd.display().to_string()
    );
    let d = TestDaemon::start_with(&extra).unwrap();
    d.write_hosts_toml(&reg.addr(), &reg.url()).unwrap();
    let mut c = d.client().await.unwrap();
    let img = testimages::push_busybox(&reg, "runtime/busybox:1")
        .await
        .unwrap();
    c.pull(&img.reference).await.unwrap();
    Some((reg, d, c, img.reference))
}

fn pod_config(name: &str, log_dir: &Path) -> cri::PodSandboxConfig {
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

fn container_config(name: &str, image: &str, cmd: &[&str]) -> cri::ContainerConfig {
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

async fn run_pod(
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

async fn create(
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

async fn start(c: &mut CriClient, id: &str) {
    c.runtime
        .start_container(cri::StartContainerRequest {
            container_id: id.into(),
        })
        .await
        .expect("StartContainer");
}

async fn status(c: &mut CriClient, id: &str) -> cri::ContainerStatus {
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

async fn pod_status(c: &mut CriClient, id: &str) -> cri::PodSandboxStatusResponse {
    c.runtime
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: true,
        })
        .await
        .expect("PodSandboxStatus")
        .into_inner()
}

async fn wait_exited(c: &mut CriClient, id: &str, limit: Duration) -> cri::ContainerStatus {
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

async fn exec(
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
/// under it, and anything left under the run dirs of removed pods.
fn assert_no_leaks(d: &TestDaemon) {
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
    for sub in ["pods", "vm"] {
        let p = d.run_root().join(sub);
        if let Ok(rd) = std::fs::read_dir(&p) {
            left.extend(
                rd.flatten()
                    .map(|e| format!("file: {}", e.path().display())),
            );
        }
    }
    assert!(left.is_empty(), "left behind:\n{}", left.join("\n"));
}

/// Kills what a failed test left (VM processes, mounts) so later tests start clean.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
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

fn read_log(path: &Path) -> Vec<(String, String, String)> {
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

const LONG_RUNNER: &str = "trap 'exit 143' TERM; while :; do sleep 0.1; done";

#[tokio::test(flavor = "multi_thread")]
async fn pod_and_containers_lifecycle() {
    let Some((_reg, d, mut c, image)) = setup().await else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_owned());
    let logs = d.dir().join("logs/web");
    let pod_cfg = pod_config("web", &logs);

    // Unknown handler: rejected before any VM exists, naming the configured ones.
    let e = run_pod(&mut c, &pod_cfg, "gvisor").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("default") && e.message().contains("small"),
        "{e:?}"
    );

    // A start that fails unwinds everything and frees the name.
    let e = run_pod(&mut c, &pod_cfg, "broken").await.unwrap_err();
    assert_ne!(e.code(), Code::Ok);
    let items = c
        .runtime
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert!(items.is_empty(), "{items:?}");
    assert_no_leaks(&d);

    let boot = Instant::now();
    let pod = run_pod(&mut c, &pod_cfg, "small")
        .await
        .expect("RunPodSandbox");
    eprintln!("RunPodSandbox took {:?}", boot.elapsed());
    let e = run_pod(&mut c, &pod_cfg, "").await.unwrap_err();
    assert!(
        e.message().contains(&pod),
        "duplicate name names the holder: {e:?}"
    );

    let st = pod_status(&mut c, &pod).await;
    let s = st.status.clone().unwrap();
    assert_eq!(s.state, cri::PodSandboxState::SandboxReady as i32);
    assert_eq!(s.runtime_handler, "small");
    let info: serde_json::Value = serde_json::from_str(&st.info["info"]).unwrap();
    let vm_pid = info["vmPid"].as_i64().unwrap();
    assert!(Path::new(&format!("/proc/{vm_pid}")).exists(), "{info}");
    assert_eq!(info["memoryMib"], 192);
    assert_eq!(info["vcpus"], 1);
    assert!(info["accel"] == "tcg" || info["accel"] == "kvm", "{info}");

    let list =
        |state: Option<cri::PodSandboxState>, labels: &[(&str, &str)]| cri::ListPodSandboxRequest {
            filter: Some(cri::PodSandboxFilter {
                state: state.map(|s| cri::PodSandboxStateValue { state: s as i32 }),
                label_selector: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            }),
        };
    let items = c
        .runtime
        .list_pod_sandbox(list(
            Some(cri::PodSandboxState::SandboxReady),
            &[("app", "web")],
        ))
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].id, pod);
    let items = c
        .runtime
        .list_pod_sandbox(list(None, &[("app", "db")]))
        .await
        .unwrap()
        .into_inner()
        .items;
    assert!(items.is_empty());

    // A container that prints on both streams and fails.
    let mut cfg = container_config(
        "once",
        &image,
        &["sh", "-c", "echo hello; echo oops >&2; exit 3"],
    );
    cfg.envs = vec![cri::KeyValue {
        key: "GREETING".into(),
        value: "hi".into(),
    }];
    let once = create(&mut c, &pod, &pod_cfg, cfg.clone())
        .await
        .expect("CreateContainer");
    let e = create(&mut c, &pod, &pod_cfg, cfg).await.unwrap_err();
    assert!(
        e.message().contains(&once),
        "duplicate container name names the holder: {e:?}"
    );
    assert_eq!(
        status(&mut c, &once).await.state,
        cri::ContainerState::ContainerCreated as i32
    );
    start(&mut c, &once).await;
    let s = wait_exited(&mut c, &once, Duration::from_secs(60)).await;
    assert_eq!(s.exit_code, 3);
    assert_eq!(s.reason, "Error");
    assert!(s.started_at > 0 && s.finished_at >= s.started_at);
    assert_eq!(s.image.as_ref().unwrap().image, image);
    assert!(s.image_ref.contains("@sha256:"), "{}", s.image_ref);
    let log_path = logs.join("once/0.log");
    assert_eq!(s.log_path, log_path.display().to_string());
    let entries = read_log(&log_path);
    assert!(
        entries.contains(&("stdout".into(), "F".into(), "hello".into())),
        "{entries:?}"
    );
    assert!(
        entries.contains(&("stderr".into(), "F".into(), "oops".into())),
        "{entries:?}"
    );

    // A long runner with a read-only volume and env, user and hostname checks.
    let vol = d.dir().join("vol");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::write(vol.join("f"), "from the host").unwrap();
    let mut cfg = container_config("long", &image, &["sh", "-c", LONG_RUNNER]);
    cfg.mounts = vec![cri::Mount {
        container_path: "/data".into(),
        host_path: vol.display().to_string(),
        readonly: true,
        ..Default::default()
    }];
    cfg.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            run_as_username: "vessel".into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    let long = create(&mut c, &pod, &pod_cfg, cfg)
        .await
        .expect("CreateContainer long");
    start(&mut c, &long).await;
    let r = exec(&mut c, &long, &["cat", "/data/f"], 30)
        .await
        .expect("ExecSync");
    assert_eq!(
        (r.exit_code, r.stdout.as_slice()),
        (0, &b"from the host"[..]),
        "{r:?}"
    );
    let r = exec(
        &mut c,
        &long,
        &[
            "sh",
            "-c",
            "id -u; hostname; touch /data/x; echo e >&2; exit 4",
        ],
        30,
    )
    .await
    .unwrap();
    assert_eq!(r.exit_code, 4);
    assert_eq!(String::from_utf8_lossy(&r.stdout), "1000\nweb-host\n");
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("Read-only file system") && err.ends_with("e\n"),
        "{err}"
    );
    let e = exec(&mut c, &long, &["sleep", "30"], 1).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded);

    let running = c
        .runtime
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                state: Some(cri::ContainerStateValue {
                    state: cri::ContainerState::ContainerRunning as i32,
                }),
                pod_sandbox_id: pod.clone(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert_eq!(
        running.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        vec![long.as_str()]
    );

    let by_label = c
        .runtime
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                label_selector: HashMap::from([("container".to_string(), "once".to_string())]),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert_eq!(by_label.len(), 1);
    assert_eq!(by_label[0].id, once);
    c.runtime
        .update_runtime_config(cri::UpdateRuntimeConfigRequest {
            runtime_config: Some(cri::RuntimeConfig {
                network_config: Some(cri::NetworkConfig {
                    pod_cidr: "10.88.0.0/16".into(),
                }),
            }),
        })
        .await
        .expect("UpdateRuntimeConfig");

    // Missing volume source: InvalidArgument, and nothing reserved.
    let mut bad = container_config("bad", &image, &["true"]);
    bad.mounts = vec![cri::Mount {
        container_path: "/x".into(),
        host_path: d.dir().join("missing").display().to_string(),
        ..Default::default()
    }];
    let e = create(&mut c, &pod, &pod_cfg, bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // StopContainer: SIGTERM, honoured by the trap.
    let t = Instant::now();
    c.runtime
        .stop_container(cri::StopContainerRequest {
            container_id: long.clone(),
            timeout: 10,
        })
        .await
        .expect("StopContainer");
    let s = status(&mut c, &long).await;
    assert_eq!(
        (s.state, s.exit_code),
        (cri::ContainerState::ContainerExited as i32, 143)
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    // Again, and on something gone: success.
    c.runtime
        .stop_container(cri::StopContainerRequest {
            container_id: long.clone(),
            timeout: 1,
        })
        .await
        .unwrap();

    // Privileged (inside the VM): every capability.
    let mut cfg = container_config(
        "priv",
        &image,
        &["sh", "-c", "grep CapEff: /proc/self/status"],
    );
    cfg.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            privileged: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    let privileged = create(&mut c, &pod, &pod_cfg, cfg).await.unwrap();
    start(&mut c, &privileged).await;
    wait_exited(&mut c, &privileged, Duration::from_secs(60)).await;
    let out: Vec<String> = read_log(&logs.join("priv/0.log"))
        .into_iter()
        .map(|(_, _, m)| m)
        .collect();
    assert!(out[0].starts_with("CapEff:\t000001ff"), "{out:?}");

    // After earlier containers exited, the VM still runs new ones.
    let again = create(
        &mut c,
        &pod,
        &pod_cfg,
        container_config("again", &image, &["sh", "-c", "echo again"]),
    )
    .await
    .unwrap();
    start(&mut c, &again).await;
    let s = wait_exited(&mut c, &again, Duration::from_secs(60)).await;
    assert_eq!((s.exit_code, s.reason.as_str()), (0, "Completed"));

    c.runtime
        .remove_container(cri::RemoveContainerRequest {
            container_id: once.clone(),
        })
        .await
        .unwrap();
    c.runtime
        .remove_container(cri::RemoveContainerRequest {
            container_id: once.clone(),
        })
        .await
        .unwrap();
    let e = c
        .runtime
        .container_status(cri::ContainerStatusRequest {
            container_id: once.clone(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = exec(&mut c, "nope", &["true"], 0).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Stop the pod: NOTREADY, no VM; new containers refused.
    c.runtime
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect("StopPodSandbox");
    let st = pod_status(&mut c, &pod).await;
    assert_eq!(
        st.status.unwrap().state,
        cri::PodSandboxState::SandboxNotready as i32
    );
    assert!(
        !Path::new(&format!("/proc/{vm_pid}")).exists(),
        "the VM process is gone"
    );
    let e = create(
        &mut c,
        &pod,
        &pod_cfg,
        container_config("late", &image, &["true"]),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    c.runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect("RemovePodSandbox");
    for _ in 0..2 {
        c.runtime
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .unwrap();
        c.runtime
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .unwrap();
    }
    let e = c
        .runtime
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let all = c
        .runtime
        .list_containers(cri::ListContainersRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert!(
        all.is_empty(),
        "RemovePodSandbox removes its containers: {all:?}"
    );
    assert_no_leaks(&d);
}

#[tokio::test(flavor = "multi_thread")]
async fn state_survives_a_vesseld_kill() {
    let Some((_reg, mut d, mut c, image)) = setup().await else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_owned());
    let logs = d.dir().join("logs/keep");
    let pod_cfg = pod_config("keep", &logs);
    let pod = run_pod(&mut c, &pod_cfg, "").await.expect("RunPodSandbox");
    let long = create(
        &mut c,
        &pod,
        &pod_cfg,
        container_config("long", &image, &["sh", "-c", LONG_RUNNER]),
    )
    .await
    .unwrap();
    start(&mut c, &long).await;
    // Exits while vesseld is down.
    let short = create(
        &mut c,
        &pod,
        &pod_cfg,
        container_config("short", &image, &["sh", "-c", "sleep 3; echo bye; exit 7"]),
    )
    .await
    .unwrap();
    start(&mut c, &short).await;

    d.kill9();
    tokio::time::sleep(Duration::from_secs(5)).await;
    d.restart().expect("vesseld restarts");
    let mut c = d.client().await.unwrap();

    let st = pod_status(&mut c, &pod).await;
    assert_eq!(
        st.status.unwrap().state,
        cri::PodSandboxState::SandboxReady as i32
    );
    assert_eq!(
        status(&mut c, &long).await.state,
        cri::ContainerState::ContainerRunning as i32
    );
    let s = wait_exited(&mut c, &short, Duration::from_secs(30)).await;
    assert_eq!(s.exit_code, 7);
    // Its output may or may not reach the log: the agent hands buffered output to
    // the open ReadOutput stream, and the one of the killed vesseld can swallow it
    // before the guest learns that connection is gone. What arrives is intact.
    let entries = read_log(&logs.join("short/0.log"));
    assert!(
        entries.is_empty()
            || entries == vec![("stdout".to_string(), "F".to_string(), "bye".to_string())],
        "{entries:?}"
    );
    let r = exec(&mut c, &long, &["echo", "still here"], 30)
        .await
        .expect("ExecSync after restart");
    assert_eq!(r.stdout, b"still here\n");

    // The VM dies behind vesseld's back: the pod becomes NOTREADY and removable.
    let info: serde_json::Value = serde_json::from_str(&st.info["info"]).unwrap();
    let vm_pid = info["vmPid"].as_i64().unwrap() as i32;
    // SAFETY: kill(2) on the pid vesseld reported for this test's VM.
    unsafe { libc::kill(vm_pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = pod_status(&mut c, &pod).await.status.unwrap();
        if s.state == cri::PodSandboxState::SandboxNotready as i32 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pod still READY after its VM died"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        status(&mut c, &long).await.state,
        cri::ContainerState::ContainerExited as i32
    );
    c.runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect("RemovePodSandbox");
    assert_no_leaks(&d);
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_limits_and_security_context() {
    let Some((_reg, d, mut c, image)) = setup().await else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_owned());
    let logs = d.dir().join("logs/sec");
    let mut pod_cfg = pod_config("sec", &logs);
    // shareProcessNamespace: containers join the PID namespace of a running one.
    pod_cfg.linux = Some(cri::LinuxPodSandboxConfig {
        security_context: Some(cri::LinuxSandboxSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                pid: cri::NamespaceMode::Pod as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let pod = run_pod(&mut c, &pod_cfg, "").await.expect("RunPodSandbox");

    // A 40000-byte line: two 16 KiB partial entries and a full one.
    let long_line = create(
        &mut c,
        &pod,
        &pod_cfg,
        container_config(
            "longline",
            &image,
            &[
                "sh",
                "-c",
                "head -c 40000 /dev/zero | tr '\\0' a; echo; echo next",
            ],
        ),
    )
    .await
    .unwrap();
    start(&mut c, &long_line).await;
    wait_exited(&mut c, &long_line, Duration::from_secs(60)).await;
    let entries = read_log(&logs.join("longline/0.log"));
    let shape: Vec<(&str, usize)> = entries
        .iter()
        .map(|(_, tag, msg)| (tag.as_str(), msg.len()))
        .collect();
    assert_eq!(
        shape,
        vec![
            ("P", 16384),
            ("P", 16384),
            ("F", 40000 - 2 * 16384),
            ("F", 4)
        ]
    );
    assert!(entries[..3]
        .iter()
        .all(|(s, _, m)| s == "stdout" && m.bytes().all(|b| b == b'a')));

    // Memory limit: the shell grows a string until the OOM killer stops it.
    let mut oom = container_config(
        "oom",
        &image,
        &["sh", "-c", "a=xxxxxxxx; while :; do a=$a$a; done"],
    );
    oom.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 32 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let oom = create(&mut c, &pod, &pod_cfg, oom).await.unwrap();
    start(&mut c, &oom).await;
    let s = wait_exited(&mut c, &oom, Duration::from_secs(90)).await;
    assert_eq!(
        (s.reason.as_str(), s.exit_code),
        ("OOMKilled", 137),
        "{s:?}"
    );

    // Security context: read-only rootfs, no capabilities, RuntimeDefault seccomp,
    // no_new_privs; a ticking container whose log is rotated and reopened.
    let mut sec = container_config(
        "ticker",
        &image,
        &["sh", "-c", "while :; do echo tick; sleep 0.2; done"],
    );
    sec.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            readonly_rootfs: true,
            no_new_privs: true,
            capabilities: Some(cri::Capability {
                drop_capabilities: vec!["ALL".into()],
                ..Default::default()
            }),
            seccomp: Some(cri::SecurityProfile {
                profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
                localhost_ref: String::new(),
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let ticker = create(&mut c, &pod, &pod_cfg, sec).await.unwrap();
    start(&mut c, &ticker).await;
    let r = exec(
        &mut c,
        &ticker,
        &[
            "sh",
            "-c",
            "grep -E '^(CapEff|Seccomp|NoNewPrivs):' /proc/1/status; touch /x",
        ],
        30,
    )
    .await
    .unwrap();
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert!(out.contains("Seccomp:\t2"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert_ne!(r.exit_code, 0, "the rootfs is read-only");

    c.runtime
        .update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: ticker.clone(),
            linux: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 48 << 20,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("UpdateContainerResources");
    let s = status(&mut c, &ticker).await;
    assert_eq!(
        s.resources.unwrap().linux.unwrap().memory_limit_in_bytes,
        48 << 20
    );
    let r = exec(&mut c, &ticker, &["cat", "/sys/fs/cgroup/memory.max"], 30)
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&r.stdout).trim(),
        (48u64 << 20).to_string()
    );

    let log = logs.join("ticker/0.log");
    let rotated = logs.join("ticker/0.log.1");
    tokio::time::sleep(Duration::from_millis(600)).await;
    std::fs::rename(&log, &rotated).unwrap();
    c.runtime
        .reopen_container_log(cri::ReopenContainerLogRequest {
            container_id: ticker.clone(),
        })
        .await
        .expect("ReopenContainerLog");
    let deadline = Instant::now() + Duration::from_secs(20);
    while read_log(&log).len() < 2 {
        assert!(Instant::now() < deadline, "nothing written after reopen");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(read_log(&log)
        .iter()
        .all(|e| e == &("stdout".to_string(), "F".to_string(), "tick".to_string())));
    assert!(!read_log(&rotated).is_empty());

    let peek = create(
        &mut c,
        &pod,
        &pod_cfg,
        container_config(
            "peek",
            &image,
            &["sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '"],
        ),
    )
    .await
    .unwrap();
    start(&mut c, &peek).await;
    wait_exited(&mut c, &peek, Duration::from_secs(60)).await;
    let seen = read_log(&logs.join("peek/0.log"));
    assert!(
        seen.iter().any(|(_, _, m)| m.contains("echo tick")),
        "PID 1 seen by peek is the ticker: {seen:?}"
    );

    // The ticker has no TERM trap: PID 1 ignores SIGTERM, so the stop escalates.
    let t = Instant::now();
    c.runtime
        .stop_container(cri::StopContainerRequest {
            container_id: ticker.clone(),
            timeout: 2,
        })
        .await
        .unwrap();
    assert!(t.elapsed() >= Duration::from_secs(2));
    assert_eq!(status(&mut c, &ticker).await.exit_code, 137);
    let e = c
        .runtime
        .reopen_container_log(cri::ReopenContainerLogRequest {
            container_id: ticker.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    c.runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect("RemovePodSandbox");
    assert_no_leaks(&d);
}
