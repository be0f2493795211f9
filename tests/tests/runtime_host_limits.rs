//! What the host's kernel sees of a pod VM: the OOM killer's order (the pod's QoS,
//! never vesseld's own -999), a cgroup of its own under the configured default
//! parent, and a jail uid no other vesseld instance on the node hands out. A uid
//! range overlapping /etc/subuid-style ranges keeps vesseld from starting.

mod runtime_common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use runtime_common::*;
use vessel_tests::daemon::TestDaemon;
use vessel_tests::probe::pids_naming;

/// The host processes of pod (or pool entry) `id`: those naming the VM's run dir
/// (QEMU, vhost-device-vsock) and everything in a cgroup named for it (virtiofsd
/// and its sandbox child too).
fn vm_pids(d: &TestDaemon, id: &str) -> Vec<i32> {
    let mut pids = pids_naming(
        &d.run_root()
            .join("vm")
            .join(&id[..16])
            .display()
            .to_string(),
    );
    let me = format!("/vessel-{id}");
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cg = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
        if cg.lines().any(|l| l.ends_with(&me)) && !pids.contains(&pid) {
            pids.push(pid);
        }
    }
    pids
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn oom_score_adj(pid: i32) -> i32 {
    std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Each of `pids` with its score, for messages.
fn scores(pids: &[i32]) -> Vec<(String, i32)> {
    pids.iter().map(|&p| (comm(p), oom_score_adj(p))).collect()
}

fn assert_scores(pids: &[i32], want: i32, what: &str) {
    assert!(pids.len() >= 3, "{what}: too few VM processes: {pids:?}");
    let got = scores(pids);
    assert!(
        got.iter().all(|(_, s)| *s == want),
        "{what}: every VM process should have oom_score_adj {want}: {got:?}"
    );
}

/// The real uid of `pid`.
fn uid_of(pid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn qemu(pids: &[i32]) -> i32 {
    *pids
        .iter()
        .find(|&&p| comm(p).starts_with("qemu"))
        .expect("the VM's QEMU")
}

/// The cgroup path of `pid` in the memory hierarchy (v1) or the unified one.
fn memory_cgroup(pid: i32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let pick = |l: &&str| {
        let mut f = l.splitn(3, ':');
        let (_, ctrls) = (f.next(), f.next().unwrap_or(""));
        ctrls.split(',').any(|c| c == "memory")
    };
    let line = text
        .lines()
        .find(pick)
        .or_else(|| text.lines().find(|l| l.starts_with("0::")))
        .unwrap();
    line.splitn(3, ':').nth(2).unwrap().to_owned()
}

/// Removes the cgroup dirs of `rel` (deepest first) in every hierarchy.
fn remove_cgroup_tree(rel: &str) {
    fn rm(dir: &Path) {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    rm(&e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    let root = Path::new("/sys/fs/cgroup");
    let mut dirs = vec![root.join(rel)];
    if let Ok(rd) = std::fs::read_dir(root) {
        dirs.extend(rd.flatten().map(|e| e.path().join(rel)));
    }
    for d in dirs.iter().filter(|d| d.is_dir()) {
        rm(d);
    }
}

fn with_oom_score(mut cfg: cri::ContainerConfig, score: i64) -> cri::ContainerConfig {
    cfg.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            oom_score_adj: score,
            ..Default::default()
        }),
        ..Default::default()
    });
    cfg
}

async fn wait_until(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_vms_get_their_qos_score_own_cgroup_and_node_unique_uid() {
    let tag = std::process::id();
    let default_parent = format!("vessel-test-default-{tag}");
    let kubelet_root = format!("vessel-test-kubepods-{tag}");
    let Some((_reg, d, mut c, image)) = setup_with(
        &format!("\n[jail]\ndefault_cgroup_parent = \"/{default_parent}\"\n"),
        "runtime/busybox:1",
    )
    .await
    else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_path_buf());
    // vesseld's own score, which its children must not inherit: the unit's -999
    // where this test may lower a score (CAP_SYS_RESOURCE), else a raised marker.
    let vesseld = d.pid().unwrap() as i32;
    let own = if std::fs::write(format!("/proc/{vesseld}/oom_score_adj"), "-999").is_ok() {
        -999
    } else {
        std::fs::write(format!("/proc/{vesseld}/oom_score_adj"), "321").unwrap();
        321
    };

    // A pod with no cgroup parent and no QoS: an ordinary score, not vesseld's, in
    // a cgroup of its own under the configured default parent.
    let a = run_pod(&mut c, &pod_config("oom-a", &d.dir().join("logs/a")), "")
        .await
        .expect("RunPodSandbox A");
    let a_pids = vm_pids(&d, &a);
    assert_scores(&a_pids, 0, "pod A before containers");
    let want_cg = format!("/{default_parent}/vessel-{a}");
    let vesseld_cg = memory_cgroup(vesseld);
    for &p in &a_pids {
        let cg = memory_cgroup(p);
        assert_eq!(cg, want_cg, "{} is not in the pod's own cgroup", comm(p));
        assert_ne!(cg, vesseld_cg);
    }

    // A Burstable container: its score; then a BestEffort one: the highest wins (the
    // reported case: 1000 asked, QEMU left at vesseld's -999).
    let burstable = with_oom_score(container_config("g", &image, &["sleep", "600"]), 200);
    let g = create(
        &mut c,
        &a,
        &pod_config("oom-a", &d.dir().join("logs/a")),
        burstable,
    )
    .await
    .expect("CreateContainer g");
    assert_scores(&vm_pids(&d, &a), 200, "pod A with a Burstable container");
    let best_effort = with_oom_score(container_config("be", &image, &["sleep", "600"]), 1000);
    let be = create(
        &mut c,
        &a,
        &pod_config("oom-a", &d.dir().join("logs/a")),
        best_effort,
    )
    .await
    .expect("CreateContainer be");
    start(&mut c, &be).await;
    assert_scores(&vm_pids(&d, &a), 1000, "pod A with a BestEffort container");
    // UpdateContainerResources changes the ask too.
    c.runtime
        .update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: be.clone(),
            linux: Some(cri::LinuxContainerResources {
                oom_score_adj: 500,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("UpdateContainerResources");
    assert_scores(&vm_pids(&d, &a), 500, "pod A after the update");
    c.runtime
        .remove_container(cri::RemoveContainerRequest {
            container_id: be.clone(),
        })
        .await
        .expect("RemoveContainer be");
    assert_scores(
        &vm_pids(&d, &a),
        200,
        "pod A after the BestEffort container left",
    );
    let _ = g;
    assert_eq!(oom_score_adj(vesseld), own, "vesseld keeps its own score");

    // A kubelet BestEffort pod: 1000 from its cgroup parent before any container.
    let parent = format!("/{kubelet_root}/besteffort/podb");
    let mut b_cfg = pod_config("oom-b", &d.dir().join("logs/b"));
    b_cfg.linux = Some(cri::LinuxPodSandboxConfig {
        cgroup_parent: parent.clone(),
        ..Default::default()
    });
    let b = run_pod(&mut c, &b_cfg, "").await.expect("RunPodSandbox B");
    let b_pids = vm_pids(&d, &b);
    assert_scores(&b_pids, 1000, "BestEffort pod B");
    assert_eq!(memory_cgroup(qemu(&b_pids)), format!("{parent}/vessel-{b}"));

    // A second instance on the node (another run root, its warm pool on): its VMs
    // never get a uid the first one uses, and an idle pool VM goes first (1000).
    let d2 = TestDaemon::start_with(&format!(
        "[guest]\nkernel = {:?}\ninitrd = {:?}\n\n[runtimes.default]\nvcpus = 1\n\
         memory_mib = 256\npool_size = 1\n\n[jail]\ndefault_cgroup_parent = \"/{default_parent}\"\n",
        guest_dir().join("vmlinux").display().to_string(),
        guest_dir().join("initrd.img").display().to_string(),
    ))
    .unwrap();
    let _cleanup2 = Cleanup(d2.dir().to_path_buf());
    let pool_id = || {
        std::fs::read_dir(d2.run_root().join("pool"))
            .ok()?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .next()
    };
    let pool_qemu = || {
        let id = pool_id()?;
        vm_pids(&d2, &id)
            .into_iter()
            .find(|&p| comm(p).starts_with("qemu"))
    };
    wait_until(Duration::from_secs(120), "instance 2's pool VM", || {
        pool_qemu().is_some()
    })
    .await;
    let pool_pids = vm_pids(&d2, &pool_id().unwrap());
    assert_scores(&pool_pids, 1000, "idle pool VM");
    let uids = [qemu(&a_pids), qemu(&b_pids), pool_qemu().unwrap()].map(uid_of);
    eprintln!(
        "jail uids: A {} B {} instance-2 pool {}",
        uids[0], uids[1], uids[2]
    );
    assert!(uids.iter().all(|&u| u >= 1_000_000_000), "{uids:?}");
    assert!(
        uids[0] != uids[1] && uids[1] != uids[2] && uids[0] != uids[2],
        "two VMs on the node share a uid: {uids:?}"
    );
    drop(d2);

    for id in [&a, &b] {
        remove_pod(&mut c, id).await;
    }
    assert_no_leaks(&d);
    remove_cgroup_tree(&default_parent);
    remove_cgroup_tree(&kubelet_root);
}

#[test]
fn a_uid_range_overlapping_subuid_is_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let subuid: PathBuf = tmp.path().join("subuid");
    std::fs::write(&subuid, "root:100000:65536\nkubelet:999990000:65536\n").unwrap();
    let err = TestDaemon::start_with(&format!(
        "[jail]\nsubid_files = [{:?}]\n",
        subuid.display().to_string()
    ))
    .err()
    .expect("vesseld must refuse to start");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("overlaps kubelet's range 999990000..1000055536"),
        "unclear refusal: {msg}"
    );
    // Moved above it, the same daemon starts.
    let d = TestDaemon::start_with(&format!(
        "[jail]\nsubid_files = [{:?}]\nuid_base = 1000055536\n",
        subuid.display().to_string()
    ));
    assert!(d.is_ok(), "{:?}", d.err());
}
