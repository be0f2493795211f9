//! RuntimeService end to end through vesseld's socket: real pod VMs (TCG), a real
//! registry on 127.0.0.1, busybox containers. Each test boots one VM; every test
//! ends with a leak check (processes, mounts, run/state dirs).

mod runtime_common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use runtime_common::*;
use tonic::Code;

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
    let items = pods(&mut c).await;
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

    // The image backs the pod's (exited) containers: removing it is refused, naming
    // one of them, until they are gone.
    let e = c.remove_image(&image).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("in use by container") && e.message().contains(&pod),
        "{e:?}"
    );
    let (still, _) = c.image_status(&image, false).await.unwrap();
    assert!(still.is_some(), "a refused removal keeps the image");

    c.runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect("RemovePodSandbox");
    c.remove_image(&image)
        .await
        .expect("RemoveImage once no container uses it");
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
    // A second pod whose VM dies while vesseld is down.
    let doomed_cfg = pod_config("doomed", &d.dir().join("logs/doomed"));
    let doomed = run_pod(&mut c, &doomed_cfg, "")
        .await
        .expect("RunPodSandbox");
    let doomed_ctr = run_container(
        &mut c,
        &doomed,
        &doomed_cfg,
        container_config("victim", &image, &["sh", "-c", LONG_RUNNER]),
    )
    .await;
    let doomed_vm = pod_info(&mut c, &doomed).await["vmPid"].as_i64().unwrap() as i32;

    // Numbered lines, so a gap or a stop in the log shows.
    let ticker = "trap 'exit 143' TERM; i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.2; done";
    let long = run_container(
        &mut c,
        &pod,
        &pod_cfg,
        container_config("long", &image, &["sh", "-c", ticker]),
    )
    .await;
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
    // A volume bound in virtiofsd's namespace, released after the restart.
    let vol = d.dir().join("keepvol");
    std::fs::create_dir_all(&vol).unwrap();
    let mut with_vol = container_config("vol", &image, &["true"]);
    with_vol.mounts = vec![cri::Mount {
        container_path: "/vol".into(),
        host_path: vol.display().to_string(),
        ..Default::default()
    }];
    let with_vol = create(&mut c, &pod, &pod_cfg, with_vol).await.unwrap();
    let bound = format!(" /ctr/{with_vol}/0 ");
    assert!(virtiofsd_mountinfo(&d).contains(&bound));

    d.kill9();
    // SAFETY: kill(2) on the pid vesseld reported for this test's VM.
    unsafe { libc::kill(doomed_vm, libc::SIGKILL) };
    tokio::time::sleep(Duration::from_secs(5)).await;
    d.restart().expect("vesseld restarts");
    let mut c = d.client().await.unwrap();

    // The pod whose VM died meanwhile: NOTREADY, its container exited, removable.
    let st = pod_status(&mut c, &doomed).await;
    assert_eq!(
        st.status.unwrap().state,
        cri::PodSandboxState::SandboxNotready as i32
    );
    let s = status(&mut c, &doomed_ctr).await;
    assert_eq!(s.state, cri::ContainerState::ContainerExited as i32);
    assert_eq!(s.exit_code, 255, "{s:?}");
    c.runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: doomed.clone(),
        })
        .await
        .expect("RemovePodSandbox of the dead pod");
    assert!(!d.dir().join("run/pods").join(&doomed).exists());

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
    // Its output reaches the log: the agent keeps it until vesseld acknowledges it,
    // and the restarted vesseld resumes from the offset the log holds.
    let entries = read_log(&logs.join("short/0.log"));
    assert_eq!(
        entries,
        vec![("stdout".to_string(), "F".to_string(), "bye".to_string())]
    );
    c.runtime
        .remove_container(cri::RemoveContainerRequest {
            container_id: with_vol.clone(),
        })
        .await
        .expect("RemoveContainer after restart");
    assert!(!virtiofsd_mountinfo(&d).contains(&bound));
    let r = exec(&mut c, &long, &["echo", "still here"], 30)
        .await
        .expect("ExecSync after restart");
    assert_eq!(r.stdout, b"still here\n");
    // The running container's log goes on past the restart, and no tick is missing
    // (a kill between writing a line and recording its offset may repeat one).
    let ticks = |entries: Vec<(String, String, String)>| -> Vec<u64> {
        entries
            .iter()
            .filter_map(|(_, _, m)| m.strip_prefix("tick ")?.parse().ok())
            .collect()
    };
    let before = ticks(read_log(&logs.join("long/0.log")));
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let now = ticks(read_log(&logs.join("long/0.log")));
        if now.iter().max() > before.iter().max() {
            break now;
        }
        assert!(Instant::now() < deadline, "log stopped at {before:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let max = *after.iter().max().unwrap();
    let seen: std::collections::BTreeSet<u64> = after.iter().copied().collect();
    assert_eq!(
        seen,
        (1..=max).collect(),
        "every tick up to {max} logged once or more"
    );

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
    // shareProcessNamespace: containers join the pod's PID namespace, whose PID 1
    // is the pod-level init.
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
            // The ticker's main process (PID 1 of the namespace is the pod init).
            "for p in /proc/[0-9]*; do grep -q 'ech[o] tick' $p/cmdline 2>/dev/null && \
             grep -E '^(CapEff|Seccomp|NoNewPrivs):' $p/status && break; done; touch /x",
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
            &[
                "sh",
                "-c",
                "cat /proc/1/cmdline | tr '\\0' ' '; echo; ps -o args",
            ],
        ),
    )
    .await
    .unwrap();
    start(&mut c, &peek).await;
    wait_exited(&mut c, &peek, Duration::from_secs(60)).await;
    let seen = read_log(&logs.join("peek/0.log"));
    assert!(
        seen.first()
            .is_some_and(|(_, _, m)| m.contains("__podinit")),
        "PID 1 seen by peek is the pod init: {seen:?}"
    );
    assert!(
        seen.iter().any(|(_, _, m)| m.contains("echo tick")),
        "peek sees the ticker: {seen:?}"
    );

    // The ticker has no TERM trap; not being its namespace's PID 1, it dies of it.
    let t = Instant::now();
    c.runtime
        .stop_container(cri::StopContainerRequest {
            container_id: ticker.clone(),
            timeout: 10,
        })
        .await
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(status(&mut c, &ticker).await.exit_code, 143);
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
