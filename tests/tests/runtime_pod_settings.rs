//! Pod-level settings end to end, in one pod VM: only the layers of the pod's own
//! images reach its VM, the VM grows to hold the pod's resources, pod sysctls reach the guest kernel (where the VM is the pod), a bad
//! sysctl is refused without leaving anything, the kubelet's termination-log mount
//! carries a container's last words to the host, and a TTY container is logged.

mod runtime_common;

use std::time::Duration;

use std::collections::BTreeSet;

use k8s_cri::v1 as cri;
use runtime_common::*;
use tonic::Code;
use vessel_tests::testimages::{self, LayerCompression};

const MIB: i64 = 1024 * 1024;

fn stdout(r: &cri::ExecSyncResponse) -> String {
    String::from_utf8_lossy(&r.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn pod_resources_sysctls_and_termination_log() {
    let Some((reg, d, mut c, image)) = setup().await else {
        return;
    };
    // Another tenant's image on the same node: its content must not reach this pod.
    let secret = testimages::push_layers(
        &reg,
        "tenant-b/secret:1",
        vec![testimages::random_layer("secret", 4096, LayerCompression::Gzip).unwrap()],
    )
    .await
    .unwrap();
    c.pull(&secret.reference).await.unwrap();
    let _cleanup = Cleanup(d.dir().to_owned());
    let logs = d.dir().join("logs/settings");
    let mut pod_cfg = pod_config("settings", &logs);
    pod_cfg.linux = Some(cri::LinuxPodSandboxConfig {
        // What the kubelet sends for a pod whose containers' limits add up to
        // 1 CPU and 128 MiB.
        resources: Some(cri::LinuxContainerResources {
            cpu_period: 100_000,
            cpu_quota: 100_000,
            memory_limit_in_bytes: 128 * MIB,
            ..Default::default()
        }),
        sysctls: [
            ("net.ipv4.ip_unprivileged_port_start", "80"),
            ("kernel.shm_rmid_forced", "1"),
            ("net.core.somaxconn", "1000"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
        ..Default::default()
    });

    let pod = run_pod(&mut c, &pod_cfg, "").await.expect("RunPodSandbox");
    let info = pod_info(&mut c, &pod).await;
    // [runtimes.default] is 1 vCPU and 256 MiB (runtime_common::setup).
    let host_cpus = std::thread::available_parallelism().unwrap().get() as u64;
    let want_vcpus = 2.min(host_cpus.max(1));
    assert_eq!(info["memoryMib"], 256 + 128, "{info}");
    assert_eq!(info["vcpus"], want_vcpus, "{info}");

    let ctr = run_container(
        &mut c,
        &pod,
        &pod_cfg,
        container_config("probe", &image, &["sh", "-c", LONG_RUNNER]),
    )
    .await;

    // The pod's share dir (all its VM can see of the host) holds the busybox image
    // (named by its top layer), not the other image's.
    let entries = |dir: std::path::PathBuf| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect()
    };
    let exposed = entries(
        d.run_root()
            .join("pods")
            .join(&pod)
            .join("share/export/images"),
    );
    let stored = entries(d.root().join("snapshots"));
    assert_eq!(exposed.len(), 1, "busybox is one layer: {exposed:?}");
    assert!(exposed.is_subset(&stored), "{exposed:?} of {stored:?}");
    assert_eq!(stored.len(), 2, "busybox and the secret image: {stored:?}");

    // The guest really is that big.
    let r = exec(&mut c, &ctr, &["nproc"], 10).await.unwrap();
    assert_eq!(stdout(&r), want_vcpus.to_string());
    let r = exec(&mut c, &ctr, &["grep", "MemTotal", "/proc/meminfo"], 10)
        .await
        .unwrap();
    let kib: u64 = stdout(&r)
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{r:?}"));
    // The kernel keeps some of the RAM for itself; all of 256 MiB would not do.
    assert!(kib > 300 * 1024 && kib <= 384 * 1024, "MemTotal {kib} KiB");

    // Sysctls as the container sees them.
    for (path, want) in [
        ("/proc/sys/net/ipv4/ip_unprivileged_port_start", "80"),
        ("/proc/sys/kernel/shm_rmid_forced", "1"),
        ("/proc/sys/net/core/somaxconn", "1000"),
    ] {
        let r = exec(&mut c, &ctr, &["cat", path], 10).await.unwrap();
        assert_eq!(stdout(&r), want, "{path}");
    }

    // A sysctl the guest kernel does not have: InvalidArgument naming it, and the
    // container is not left half-created.
    let mut bad_pod_cfg = pod_cfg.clone();
    bad_pod_cfg
        .linux
        .as_mut()
        .unwrap()
        .sysctls
        .insert("net.vessel.no_such_knob".into(), "1".into());
    let e = create(
        &mut c,
        &pod,
        &bad_pod_cfg,
        container_config("bad-sysctl", &image, &["true"]),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("net.vessel.no_such_knob"), "{e:?}");
    let names: Vec<String> = c
        .runtime
        .list_containers(cri::ListContainersRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .containers
        .into_iter()
        .map(|c| c.metadata.unwrap().name)
        .collect();
    assert_eq!(names, vec!["probe".to_string()]);

    // The kubelet's termination message: it creates the file on the host and mounts
    // it at /dev/termination-log; what the container writes there is read on exit.
    let term = d.dir().join("termination-log");
    std::fs::write(&term, b"").unwrap();
    let mut last = container_config(
        "last-words",
        &image,
        &[
            "sh",
            "-c",
            "echo 'out of coffee' > /dev/termination-log; exit 2",
        ],
    );
    last.mounts = vec![cri::Mount {
        container_path: "/dev/termination-log".into(),
        host_path: term.display().to_string(),
        ..Default::default()
    }];
    let last = run_container(&mut c, &pod, &pod_cfg, last).await;
    let s = wait_exited(&mut c, &last, Duration::from_secs(60)).await;
    assert_eq!(s.exit_code, 2);
    assert_eq!(
        std::fs::read_to_string(&term).unwrap(),
        "out of coffee\n",
        "termination message on the host"
    );

    // A TTY container's output reaches its CRI log too (as stdout; a pty ends lines
    // with \r\n).
    let mut tty = container_config(
        "tty",
        &image,
        &["sh", "-c", "test -t 1 && echo on a terminal"],
    );
    tty.tty = true;
    let tty = run_container(&mut c, &pod, &pod_cfg, tty).await;
    let s = wait_exited(&mut c, &tty, Duration::from_secs(60)).await;
    assert_eq!(s.exit_code, 0, "stdout is a terminal: {s:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let entries = loop {
        let entries = read_log(&logs.join("tty/0.log"));
        if !entries.is_empty() || std::time::Instant::now() > deadline {
            break entries;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let entries: Vec<_> = entries
        .into_iter()
        .map(|(stream, tag, msg)| (stream, tag, msg.trim_end_matches('\r').to_owned()))
        .collect();
    assert_eq!(
        entries,
        vec![("stdout".into(), "F".into(), "on a terminal".into())]
    );

    c.runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap();
    assert_no_leaks(&d);
}
