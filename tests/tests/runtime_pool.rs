//! The warm pool end to end: pods served by pre-booted VMs, the refill, a cold boot
//! for a pod that does not fit, a pool VM that dies, a vesseld restart and stop.
//! Real VMs under TCG; the pool is 1 VM (each costs a boot).

mod runtime_common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use runtime_common::*;
use vessel_tests::bench::pods::pool_warm_vms;
use vessel_tests::cri::CriClient;
use vessel_tests::daemon::TestDaemon;
use vessel_tests::probe::{free_port, pids_naming};
use vessel_tests::registry::TestRegistry;

/// How long a pool VM may take to boot on a loaded TCG machine.
const BOOT_LIMIT: Duration = Duration::from_secs(120);

/// A vesseld with a pool of one default-handler VM, its metrics on `metrics_port`,
/// busybox pulled. None when no guest was built (skipped with a message).
async fn setup_pool(metrics_port: u16) -> Option<(TestRegistry, TestDaemon, CriClient, String)> {
    setup_with(
        &format!("pool_size = 1\n\n[metrics]\naddress = \"127.0.0.1:{metrics_port}\"\n"),
        "pool/busybox:1",
    )
    .await
}

async fn wait_warm(d: &TestDaemon, port: u16, want: u64) {
    let deadline = Instant::now() + BOOT_LIMIT;
    loop {
        if pool_warm_vms(port) == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pool never reached {want} warm VMs (gauge {:?}); log:\n{}",
            pool_warm_vms(port),
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Ids of the pool entries (their markers).
fn pool_ids(d: &TestDaemon) -> Vec<String> {
    std::fs::read_dir(d.run_root().join("pool"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The VM dir of pod (or pool entry) `id`.
fn vm_dir(d: &TestDaemon, id: &str) -> PathBuf {
    d.run_root().join("vm").join(&id[..16])
}

fn qemu_of(d: &TestDaemon, id: &str) -> Option<i32> {
    let dir = vm_dir(d, id).display().to_string();
    pids_naming(&dir).into_iter().find(|pid| {
        std::fs::read(format!("/proc/{pid}/comm"))
            .map(|c| String::from_utf8_lossy(&c).starts_with("qemu"))
            .unwrap_or(false)
    })
}

async fn exec_out(c: &mut CriClient, ctr: &str, cmd: &[&str]) -> String {
    let r = exec(c, ctr, cmd, 30).await.expect("ExecSync");
    assert_eq!(r.exit_code, 0, "{cmd:?}: {r:?}");
    String::from_utf8_lossy(&r.stdout).into_owned()
}

/// The existing dirs of cgroup `rel` in the v2 root or any v1 hierarchy.
fn cgroup_dirs(rel: &str) -> Vec<PathBuf> {
    let root = std::path::Path::new("/sys/fs/cgroup");
    ["", "cpu", "cpuacct", "memory", "pids", "unified"]
        .iter()
        .map(|h| root.join(h).join(rel))
        .filter(|d| d.is_dir())
        .collect()
}

/// After vesseld stopped: no process, mount or file of any pod or pool VM.
fn assert_pool_gone(d: &TestDaemon) {
    assert_no_leaks(d);
    assert!(
        pool_ids(d).is_empty(),
        "pool markers left: {:?}",
        pool_ids(d)
    );
    let netns: Vec<_> = std::fs::read_dir(d.run_root().join("netns"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(netns.is_empty(), "netns left: {netns:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_come_from_the_pool_which_refills_and_replaces_its_dead() {
    let port = free_port();
    let Some((_reg, mut d, mut c, image)) = setup_pool(port).await else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_owned());
    wait_warm(&d, port, 1).await;
    let warm_id = pool_ids(&d).pop().expect("a pool marker");

    // Served from the pool: the pool VM's id becomes the pod's.
    let cfg = pod_config("pooled", &d.dir().join("logs/pooled"));
    let pod = run_pod(&mut c, &cfg, "").await.expect("RunPodSandbox");
    assert_eq!(pod, warm_id, "the pod took the warm VM");
    let info = pod_info(&mut c, &pod).await;
    assert_eq!(info["startupMs"]["pooled"], true, "{info}");
    assert_eq!(info["memoryMib"], 256, "{info}");
    eprintln!("pooled RunPodSandbox: {}", info["startupMs"]);
    // Its files came late, written at claim: the container sees the pod's.
    let ctr = run_container(
        &mut c,
        &pod,
        &cfg,
        container_config("sleeper", &image, &["/bin/busybox", "sleep", "600"]),
    )
    .await;
    let hostname = exec_out(&mut c, &ctr, &["/bin/busybox", "cat", "/etc/hostname"]).await;
    assert_eq!(hostname.trim(), "pooled-host");
    let hosts = exec_out(&mut c, &ctr, &["/bin/busybox", "cat", "/etc/hosts"]).await;
    assert!(hosts.contains("pooled-host"), "{hosts}");

    // The pool refills with a new VM.
    wait_warm(&d, port, 1).await;
    let next_id = pool_ids(&d).pop().expect("a new pool marker");
    assert_ne!(next_id, pod);

    // A pod with a memory limit does not fit the pool VM: a cold boot, pool kept.
    let mut big = pod_config("big", &d.dir().join("logs/big"));
    big.linux = Some(cri::LinuxPodSandboxConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 64 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let big_pod = run_pod(&mut c, &big, "").await.expect("RunPodSandbox big");
    let info = pod_info(&mut c, &big_pod).await;
    assert_eq!(info["startupMs"]["pooled"], false, "{info}");
    assert_eq!(info["memoryMib"], 256 + 64, "{info}");
    let big_ctr = run_container(
        &mut c,
        &big_pod,
        &big,
        container_config("echo", &image, &["/bin/busybox", "sleep", "600"]),
    )
    .await;
    assert_eq!(
        exec_out(&mut c, &big_ctr, &["/bin/busybox", "echo", "cold"])
            .await
            .trim(),
        "cold"
    );
    assert_eq!(
        pool_ids(&d),
        std::slice::from_ref(&next_id),
        "the pool VM was not used"
    );

    // A pool VM that dies is dropped, cleaned up and replaced.
    let qemu = qemu_of(&d, &next_id).expect("the pool VM's QEMU");
    // SAFETY: kill(2) on a pid this test found by its command line.
    unsafe { libc::kill(qemu, libc::SIGKILL) };
    let deadline = Instant::now() + BOOT_LIMIT;
    loop {
        let ids = pool_ids(&d);
        if pool_warm_vms(port) == Some(1) && !ids.contains(&next_id) && ids.len() == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dead pool VM not replaced: {ids:?}\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!vm_dir(&d, &next_id).exists(), "dead pool VM's dir left");
    assert!(
        pids_naming(&vm_dir(&d, &next_id).display().to_string()).is_empty(),
        "dead pool VM's helpers left"
    );

    // A pod with a cgroup_parent (the kubelet always sets one) is served from the
    // pool too: its VM's host processes move into the pod's cgroup.
    let replacement = pool_ids(&d).pop().expect("the replacement pool VM");
    let parent = format!("/vessel-test-pool-{}", std::process::id());
    let mut kubelet_pod = pod_config("kubelet", &d.dir().join("logs/kubelet"));
    kubelet_pod.linux = Some(cri::LinuxPodSandboxConfig {
        cgroup_parent: parent.clone(),
        ..Default::default()
    });
    let kpod = run_pod(&mut c, &kubelet_pod, "")
        .await
        .expect("RunPodSandbox with a cgroup_parent");
    assert_eq!(kpod, replacement, "the pod took the warm VM");
    let info = pod_info(&mut c, &kpod).await;
    assert_eq!(info["startupMs"]["pooled"], true, "{info}");
    let qemu = qemu_of(&d, &kpod).expect("the claimed VM's QEMU");
    let cgroup = std::fs::read_to_string(format!("/proc/{qemu}/cgroup")).unwrap();
    assert!(
        cgroup.contains(&format!("{parent}/vessel-{kpod}")),
        "QEMU is not in the pod's cgroup: {cgroup}"
    );
    let left = cgroup_dirs(&format!("vessel/vessel-{kpod}"));
    assert!(left.is_empty(), "the pool cgroup is left: {left:?}");
    let kctr = run_container(
        &mut c,
        &kpod,
        &kubelet_pod,
        container_config("echo", &image, &["/bin/busybox", "sleep", "600"]),
    )
    .await;
    assert_eq!(
        exec_out(&mut c, &kctr, &["/bin/busybox", "echo", "moved"])
            .await
            .trim(),
        "moved"
    );
    remove_pod(&mut c, &kpod).await;
    let rel = parent.trim_start_matches('/');
    let left = cgroup_dirs(&format!("{rel}/vessel-{kpod}"));
    assert!(left.is_empty(), "the pod cgroup is left: {left:?}");
    for dir in cgroup_dirs(rel) {
        let _ = std::fs::remove_dir(dir);
    }

    // Removing the pooled pod leaves nothing of it.
    remove_pod(&mut c, &pod).await;
    remove_pod(&mut c, &big_pod).await;
    for id in [&pod, &big_pod] {
        assert!(!vm_dir(&d, id).exists());
        assert!(!d.run_root().join("pods").join(id).exists());
        assert!(!d.root().join("scratch").join(format!("{id}.img")).exists());
    }

    // Stopping vesseld takes the pool with it.
    drop(c);
    assert!(d.stop(), "vesseld did not stop cleanly:\n{}", d.log());
    assert_pool_gone(&d);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_vesseld_destroys_the_old_pool_and_builds_a_new_one() {
    let port = free_port();
    let Some((_reg, mut d, c, _image)) = setup_pool(port).await else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_owned());
    wait_warm(&d, port, 1).await;
    let old = pool_ids(&d).pop().expect("a pool marker");
    let old_dir = vm_dir(&d, &old).display().to_string();
    assert!(!pids_naming(&old_dir).is_empty(), "pool VM processes");

    // SIGKILL: vesseld cleans nothing; the pool VM outlives it.
    drop(c);
    d.kill9();
    assert!(
        !pids_naming(&old_dir).is_empty(),
        "pool VM died with vesseld"
    );
    d.restart().unwrap();
    let mut c = d.client().await.unwrap();
    wait_warm(&d, port, 1).await;
    let new = pool_ids(&d);
    assert_eq!(new.len(), 1, "{new:?}");
    assert_ne!(new[0], old);
    assert!(pids_naming(&old_dir).is_empty(), "old pool VM still runs");
    assert!(!vm_dir(&d, &old).exists());
    assert!(!d.run_root().join("pods").join(&old).exists());
    assert!(!d.root().join("scratch").join(format!("{old}.img")).exists());
    assert!(pods(&mut c).await.is_empty(), "pool VMs are not pods");

    drop(c);
    assert!(d.stop(), "vesseld did not stop cleanly:\n{}", d.log());
    assert_pool_gone(&d);
}
