//! Liveness as the kubelet relies on it: a StopContainer right after StartContainer
//! is not lost, and the death of a pod's VM (QEMU, or either helper it cannot live
//! without) makes the pod NOTREADY and its containers EXITED within 2 s, after which
//! the pod is removed cleanly. Also CRI details critest relies on: long pod names,
//! default signal dispositions, a group without a user, a pod-level PID 1.

mod runtime_common;

use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use runtime_common::*;
use vessel_tests::cri::CriClient;
use vessel_tests::daemon::TestDaemon;

/// The pid of one of the pod's host processes, from its VM's state file.
fn vm_process(d: &TestDaemon, pod: &str, which: &str) -> i32 {
    let state = d.run_root().join("vm").join(&pod[..16]).join("state.json");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state).expect("VM state file")).unwrap();
    state[which]["pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("no {which} in {state}")) as i32
}

async fn pod_state(c: &mut CriClient, pod: &str) -> i32 {
    pod_status(c, pod).await.status.unwrap().state
}

/// Kills `which` of a running pod and checks what the kubelet would see.
async fn pod_dies_with(c: &mut CriClient, d: &TestDaemon, image: &str, which: &str) {
    let logs = d.dir().join("logs").join(which);
    let pod_cfg = pod_config(&format!("dies-{which}"), &logs);
    let pod = run_pod(c, &pod_cfg, "").await.expect("RunPodSandbox");
    let ctr = run_container(
        c,
        &pod,
        &pod_cfg,
        container_config("victim", image, &["sh", "-c", LONG_RUNNER]),
    )
    .await;
    let pid = vm_process(d, &pod, which);
    // SAFETY: kill(2) with a pid read from the VM's state file.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill {which}");
    let killed = Instant::now();
    loop {
        if pod_state(c, &pod).await == cri::PodSandboxState::SandboxNotready as i32 {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(2),
            "pod still READY {:?} after {which} was killed",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = killed.elapsed();
    let s = status(c, &ctr).await;
    assert_eq!(
        s.state,
        cri::ContainerState::ContainerExited as i32,
        "{s:?}"
    );
    assert!(!s.reason.is_empty() && !s.message.is_empty(), "{s:?}");
    eprintln!(
        "{which} killed: pod NOTREADY after {seen:?}; container: {} / {}",
        s.reason, s.message
    );
    remove_pod(c, &pod).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn vm_death_is_seen_at_once_and_stops_are_never_lost() {
    let Some((_reg, d, mut c, image)) = setup().await else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_owned());

    // StopContainer right after StartContainer: the signal reaches the process.
    let logs = d.dir().join("logs/quick");
    let pod_cfg = pod_config("quick", &logs);
    let pod = run_pod(&mut c, &pod_cfg, "").await.expect("RunPodSandbox");
    for attempt in 0..3 {
        let mut cfg = container_config(&format!("top-{attempt}"), &image, &["top"]);
        cfg.tty = true;
        let id = run_container(&mut c, &pod, &pod_cfg, cfg).await;
        let t = Instant::now();
        c.runtime
            .stop_container(cri::StopContainerRequest {
                container_id: id.clone(),
                timeout: 10,
            })
            .await
            .expect("StopContainer");
        let took = t.elapsed();
        let s = status(&mut c, &id).await;
        eprintln!(
            "stop right after start #{attempt}: {took:?}, exit {}",
            s.exit_code
        );
        assert!(
            took < Duration::from_secs(5),
            "StopContainer right after StartContainer took {took:?}: the TERM was lost"
        );
        assert_eq!(s.state, cri::ContainerState::ContainerExited as i32);
    }
    remove_pod(&mut c, &pod).await;

    for which in ["vmm", "virtiofsd", "vsock_helper"] {
        pod_dies_with(&mut c, &d, &image, which).await;
    }
    assert_no_leaks(&d);
}

/// A guest that hangs while QEMU lives (its vCPUs stopped through QMP) answers
/// nothing: within the agent's unresponsive window (30 s, checked every 5 s) the pod
/// is NOTREADY, its container EXITED, and removal is clean.
#[tokio::test(flavor = "multi_thread")]
async fn a_hung_guest_makes_the_pod_notready() {
    let Some((_reg, d, mut c, image)) = setup().await else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_owned());
    let logs = d.dir().join("logs/hung");
    let pod_cfg = pod_config("hung", &logs);
    let pod = run_pod(&mut c, &pod_cfg, "").await.expect("RunPodSandbox");
    let ctr = run_container(
        &mut c,
        &pod,
        &pod_cfg,
        container_config("sleeper", &image, &["sh", "-c", LONG_RUNNER]),
    )
    .await;
    let qmp = vessel_sandbox::layout::RunDir::new(d.run_root().join("vm").join(&pod[..16]))
        .unwrap()
        .qmp();
    vessel_sandbox::qemu::qmp::execute(&qmp, "stop", None)
        .await
        .expect("QMP stop");
    let hung = Instant::now();
    let vmm = vm_process(&d, &pod, "vmm");
    // SAFETY: kill(2) with signal 0 only checks that the pid exists.
    assert_eq!(unsafe { libc::kill(vmm, 0) }, 0, "QEMU lives");
    loop {
        if pod_state(&mut c, &pod).await == cri::PodSandboxState::SandboxNotready as i32 {
            break;
        }
        assert!(
            hung.elapsed() < Duration::from_secs(45),
            "pod still READY {:?} after its guest hung",
            hung.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("hung guest: pod NOTREADY after {:?}", hung.elapsed());
    let s = status(&mut c, &ctr).await;
    assert_eq!(
        s.state,
        cri::ContainerState::ContainerExited as i32,
        "{s:?}"
    );
    assert!(!s.message.is_empty(), "{s:?}");
    remove_pod(&mut c, &pod).await;
    assert_no_leaks(&d);
}

/// A privileged container gets what a node's kernel offers it: bridges and veths (the
/// guest loads their modules on demand, as critest's `brctl addbr` needs), while an
/// unprivileged one is still refused. Mounts a VM cannot give are refused clearly.
#[tokio::test(flavor = "multi_thread")]
async fn privileged_containers_create_bridges_and_veths() {
    let Some((_reg, d, mut c, image)) = setup().await else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_owned());
    let logs = d.dir().join("logs/netadmin");
    let pod_cfg = pod_config("netadmin", &logs);
    let pod = run_pod(&mut c, &pod_cfg, "").await.expect("RunPodSandbox");
    let mut cfg = container_config("priv", &image, &["sh", "-c", LONG_RUNNER]);
    cfg.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            privileged: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    let privileged = run_container(&mut c, &pod, &pod_cfg, cfg).await;
    let plain = run_container(
        &mut c,
        &pod,
        &pod_cfg,
        container_config("plain", &image, &["sh", "-c", LONG_RUNNER]),
    )
    .await;
    let r = exec(
        &mut c,
        &privileged,
        &[
            "sh",
            "-c",
            "brctl addbr vbr0 && ip link add vx0 type veth peer name vx1 && ip -o link",
        ],
        60,
    )
    .await
    .expect("ExecSync");
    let out = String::from_utf8_lossy(&r.stdout);
    assert_eq!(
        r.exit_code,
        0,
        "{out} {}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(out.contains("vbr0") && out.contains("vx0"), "{out}");
    let r = exec(&mut c, &plain, &["brctl", "addbr", "vbr1"], 60)
        .await
        .expect("ExecSync");
    assert_ne!(r.exit_code, 0, "no NET_ADMIN, no bridge");

    // Mounts a VM cannot give are refused with a clear InvalidArgument: bidirectional
    // propagation, and recursive read-only without read-only.
    let vol = d.dir().join("vol");
    std::fs::create_dir_all(&vol).unwrap();
    for (mount, why) in [
        (
            cri::Mount {
                propagation: cri::MountPropagation::PropagationBidirectional as i32,
                ..Default::default()
            },
            "bidirectional (rshared) propagation cannot cross",
        ),
        (
            cri::Mount {
                recursive_read_only: true,
                ..Default::default()
            },
            "recursive_read_only needs readonly",
        ),
    ] {
        let mut cfg = container_config("mnt", &image, &["true"]);
        cfg.mounts = vec![cri::Mount {
            host_path: vol.display().to_string(),
            container_path: "/mnt".into(),
            ..mount
        }];
        let e = create(&mut c, &pod, &pod_cfg, cfg).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(why), "{}", e.message());
    }
    // So is hostIPC: the node's IPC namespace is in the host kernel, out of reach.
    let mut ipc_cfg = pod_config("hostipc", &d.dir().join("logs/hostipc"));
    ipc_cfg.linux = Some(cri::LinuxPodSandboxConfig {
        security_context: Some(cri::LinuxSandboxSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                ipc: cri::NamespaceMode::Node as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let e = run_pod(&mut c, &ipc_cfg, "").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("hostIPC pods are not supported"),
        "{}",
        e.message()
    );
    remove_pod(&mut c, &pod).await;
    assert_no_leaks(&d);
}

#[tokio::test(flavor = "multi_thread")]
async fn long_pod_names_default_signals_and_group_without_user() {
    let Some((_reg, d, mut c, image)) = setup().await else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_owned());

    // critest-style pod: a ~70-character name and no hostname.
    let name = "podsandbox-for-test-long-names-0d7f3a4e-9b1c-4c1e-8f00-5a5a5a5a5a5a-x";
    assert!(name.len() > 64);
    let logs = d.dir().join("logs/long");
    let mut pod_cfg = pod_config(name, &logs);
    pod_cfg.hostname = String::new();
    let pod = run_pod(&mut c, &pod_cfg, "")
        .await
        .expect("RunPodSandbox with a long pod name");
    // `sleep` changes no disposition itself (a shell ignores some), so its status
    // shows what the container's init inherited.
    let ctr = run_container(
        &mut c,
        &pod,
        &pod_cfg,
        container_config("sig", &image, &["sleep", "3600"]),
    )
    .await;
    let r = exec(&mut c, &ctr, &["hostname"], 30)
        .await
        .expect("hostname");
    let host = String::from_utf8_lossy(&r.stdout).trim().to_string();
    assert!(host.len() <= 63 && name.starts_with(&host), "{host:?}");

    // Every signal at its default disposition, none blocked, in the container's
    // main process and in an exec (runc's children start so).
    let r = exec(
        &mut c,
        &ctr,
        &[
            "grep",
            "-E",
            "^Sig(Ign|Blk)",
            "/proc/1/status",
            "/proc/self/status",
        ],
        30,
    )
    .await
    .expect("signal masks");
    let out = String::from_utf8_lossy(&r.stdout);
    assert_eq!(out.lines().count(), 4, "{out}");
    for line in out.lines() {
        assert!(line.ends_with("0000000000000000"), "{out}");
    }

    // run_as_group without a user is refused, leaving nothing behind.
    let mut cfg = container_config("group-only", &image, &["true"]);
    cfg.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            run_as_group: Some(cri::Int64Value { value: 5 }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let err = create(&mut c, &pod, &pod_cfg, cfg)
        .await
        .expect_err("run_as_group alone");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("run_as_group"), "{}", err.message());
    let listed = list_containers(&mut c).await;
    assert_eq!(listed.len(), 1, "{listed:?}");

    // pid: POD. PID 1 of the shared namespace is the pod's init, not a workload,
    // and the first container's exit leaves the others running.
    let mut shared_cfg = pod_cfg.clone();
    shared_cfg.linux = Some(cri::LinuxPodSandboxConfig {
        security_context: Some(cri::LinuxSandboxSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                pid: cri::NamespaceMode::Pod as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let first = run_container(
        &mut c,
        &pod,
        &shared_cfg,
        container_config("first", &image, &["sh", "-c", "sleep 3; exit 3"]),
    )
    .await;
    let second = run_container(
        &mut c,
        &pod,
        &shared_cfg,
        container_config("second", &image, &["sh", "-c", LONG_RUNNER]),
    )
    .await;
    let r = exec(
        &mut c,
        &second,
        &[
            "sh",
            "-c",
            "tr '\\0' ' ' < /proc/1/cmdline; echo; ps -o args",
        ],
        30,
    )
    .await
    .expect("pid 1 of the pod namespace");
    let out = String::from_utf8_lossy(&r.stdout).to_string();
    let pid1 = out.lines().next().unwrap_or_default();
    assert!(pid1.contains("__podinit"), "PID 1 is {pid1:?}:\n{out}");
    assert!(
        out.contains("sleep 3"),
        "the first container is visible: {out}"
    );
    let s = wait_exited(&mut c, &first, Duration::from_secs(30)).await;
    assert_eq!(s.exit_code, 3);
    assert_eq!(
        status(&mut c, &second).await.state,
        cri::ContainerState::ContainerRunning as i32,
        "the first container's exit took the second with it"
    );
    exec(&mut c, &second, &["true"], 30)
        .await
        .expect("the second container still runs");

    remove_pod(&mut c, &pod).await;
    assert_no_leaks(&d);
}
