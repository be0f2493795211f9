//! The guest as an attacker: a privileged container in a pod whose PID namespace is
//! the VM's own reaches the virtio-fs share through `/proc/1/root` and tries to
//! plant symlinks, fifos, device nodes and large files everywhere in it, then
//! floods its output; an ordinary container writes 1 GiB to `/etc/hosts` and an
//! ExecSync streams without end. The host must not change outside the pod's own
//! dirs, no mount may appear elsewhere, and vesseld must stay responsive with
//! bounded memory, through more containers, new layers, volumes and a restart.

mod runtime_common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use runtime_common::*;
use tonic::Code;
use vessel_tests::cri::CriClient;
use vessel_tests::daemon::TestDaemon;
use vessel_tests::testimages::{self, LayerCompression};

/// Every mount point on the host, as mountinfo lists them.
fn mount_points() -> BTreeSet<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .collect()
}

/// Names, kinds and contents of everything under `dir`.
fn snapshot_tree(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            let what = if meta.is_dir() {
                stack.push(e.path());
                "dir".to_string()
            } else if meta.is_file() {
                format!("file {:?}", std::fs::read(e.path()).unwrap())
            } else {
                format!("other {:?}", meta.file_type())
            };
            out.insert(format!("{} {what}", e.path().display()));
        }
    }
    out
}

fn vesseld_rss_kib(d: &TestDaemon) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid().unwrap())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Bytes in regular files under `dir` (what a pod costs in host tmpfs).
fn file_bytes(dir: &Path) -> u64 {
    file_sizes(dir).iter().map(|(_, n)| n).sum()
}

/// Every regular file under `dir` with its size, not counting the image rootfs mounted
/// into share dirs (host disk, not tmpfs) nor the exported view of the same files.
fn file_sizes(dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            let name = e.file_name();
            if meta.is_dir() && name != "images" && name != "layers" && name != "export" {
                stack.push(e.path());
            } else if meta.is_file() {
                out.push((e.path().display().to_string(), meta.len()));
            }
        }
    }
    out
}

fn with_volumes(
    mut cfg: cri::ContainerConfig,
    mounts: &[(&Path, &str, bool)],
) -> cri::ContainerConfig {
    cfg.mounts = mounts
        .iter()
        .map(|(host, ctr, ro)| cri::Mount {
            host_path: host.display().to_string(),
            container_path: ctr.to_string(),
            readonly: *ro,
            ..Default::default()
        })
        .collect();
    cfg
}

fn privileged_node_pid(mut cfg: cri::ContainerConfig) -> cri::ContainerConfig {
    cfg.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            privileged: true,
            namespace_options: Some(cri::NamespaceOption {
                pid: cri::NamespaceMode::Node as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    cfg
}

/// The attack, in the guest: every planting attempt outside the writable volume is
/// counted; the share must refuse them all.
const PLANT: &str = r#"
S=/proc/1/root/run/vessel/share
test -d $S/layers || { echo "NO SHARE"; exit 1; }
planted=0; refused=0
try() { if "$@" 2>/dev/null; then planted=$((planted+1)); echo "PLANTED: $*"; else refused=$((refused+1)); fi; }
for d in $S $S/pod $S/layers $S/ctr $S/layers/* $S/ctr/*; do
  try ln -s "$CANARY" "$d/link"
  try mkfifo "$d/fifo"
  try mknod "$d/blk" b 7 0
  try dd if=/dev/zero of="$d/big" bs=1M count=4
  for n in $NEXT_LAYERS; do try ln -s "$CANARY" "$d/$n"; try mkdir "$d/$n"; done
  for n in 7 8 9; do try ln -s "$CANARY" "$d/$n"; done
done
for f in $S/pod/*; do try sh -c "echo hacked >> $f"; try rm -f "$f"; try ln -sf "$CANARY" "$f"; done
mount -o remount,rw $S 2>/dev/null; try mkdir $S/after-remount
# Inside the writable volume planting works; vesseld must never follow it.
ln -s "$CANARY" /vol/escape; mkfifo /vol/fifo; mknod /vol/blk b 7 0 2>/dev/null
echo "attack done planted=$planted refused=$refused"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_guest_cannot_reach_the_host() {
    let Some((reg, mut d, mut c, image)) = setup().await else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_owned());

    // A second image: busybox's layer plus one the pod has not used yet.
    let second = testimages::push_layers(
        &reg,
        "hostile/second:1",
        vec![
            testimages::busybox_layer(LayerCompression::Gzip).unwrap(),
            testimages::random_layer("second-marker", 4096, LayerCompression::Gzip).unwrap(),
        ],
    )
    .await
    .unwrap()
    .reference;
    let snapshots_before: BTreeSet<String> = std::fs::read_dir(d.root().join("snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    c.pull(&second).await.expect("pull the second image");
    let next_layers: Vec<String> = std::fs::read_dir(d.root().join("snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !snapshots_before.contains(n) && !n.starts_with('.'))
        .collect();
    assert!(
        !next_layers.is_empty(),
        "the second image brought a new layer"
    );

    let canary = d.dir().join("canary");
    std::fs::create_dir_all(canary.join("sub")).unwrap();
    std::fs::write(canary.join("sub/keep"), "canary").unwrap();
    let canary_before = snapshot_tree(&canary);
    let rw_vol = d.dir().join("rw-vol");
    let ro_vol = d.dir().join("ro-vol");
    for v in [&rw_vol, &ro_vol] {
        std::fs::create_dir_all(v).unwrap();
    }
    std::fs::write(ro_vol.join("data"), "read-only volume").unwrap();
    let mounts_before = mount_points();

    let logs = d.dir().join("logs/hostile");
    let pod_cfg = pod_config("hostile", &logs);
    let pod = run_pod(&mut c, &pod_cfg, "").await.expect("RunPodSandbox");
    let pod_dir = d.run_root().join("pods").join(&pod);
    let pod_run_before = file_bytes(d.run_root());

    // 1. An ordinary container writes 1 GiB to /etc/hosts: it lands in guest
    // memory (and fails there), not in a host file.
    let plain = run_container(
        &mut c,
        &pod,
        &pod_cfg,
        container_config("plain", &image, &["sh", "-c", LONG_RUNNER]),
    )
    .await;
    let r = exec(
        &mut c,
        &plain,
        &[
            "sh",
            "-c",
            "dd if=/dev/zero of=/etc/hosts bs=1M count=1024 2>&1; echo rc=$?",
        ],
        120,
    )
    .await
    .expect("ExecSync dd");
    let out = String::from_utf8_lossy(&r.stdout);
    eprintln!("dd into /etc/hosts: {out}");
    let grown = file_bytes(d.run_root()).saturating_sub(pod_run_before);
    assert!(
        grown < 2 << 20,
        "the host's run dir grew by {grown} bytes after a 1 GiB write to /etc/hosts: {:?}",
        file_sizes(d.run_root())
    );
    // The host's copy is untouched; another container still sees a working file.
    let hosts = std::fs::read_to_string(pod_dir.join("share/host/pod/hosts")).unwrap();
    assert!(hosts.contains("localhost"), "{hosts}");

    // 2. ExecSync of an endless stream fails with a clear error; memory stays bounded.
    let rss_before = vesseld_rss_kib(&d);
    let started = Instant::now();
    let err = exec(&mut c, &plain, &["yes", "endless output line"], 300)
        .await
        .expect_err("an endless ExecSync must fail");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("16 MiB"), "{}", err.message());
    let rss_after = vesseld_rss_kib(&d);
    eprintln!(
        "endless ExecSync failed after {:?}; vesseld RSS {rss_before} -> {rss_after} KiB",
        started.elapsed()
    );
    assert!(
        rss_after < rss_before + 96 * 1024,
        "vesseld RSS grew from {rss_before} to {rss_after} KiB"
    );
    // The container is still usable, and the killed exec is gone.
    let r = exec(&mut c, &plain, &["sh", "-c", "pgrep yes || echo none"], 30)
        .await
        .expect("ExecSync after the cap");
    assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), "none");

    // 3. The attacker plants, then floods its output.
    let mut attacker_cfg = privileged_node_pid(with_volumes(
        container_config(
            "attacker",
            &image,
            &[
                "sh",
                "-c",
                &format!(
                    "{PLANT}\n exec timeout 15 yes 'flood flood flood flood flood flood flood'"
                ),
            ],
        ),
        &[(&rw_vol, "/vol", false)],
    ));
    attacker_cfg.envs = vec![
        cri::KeyValue {
            key: "CANARY".into(),
            value: canary.display().to_string(),
        },
        cri::KeyValue {
            key: "NEXT_LAYERS".into(),
            value: next_layers.join(" "),
        },
    ];
    let mut priv_pod_cfg = pod_cfg.clone();
    priv_pod_cfg.linux = Some(cri::LinuxPodSandboxConfig {
        security_context: Some(cri::LinuxSandboxSecurityContext {
            privileged: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    let attacker = run_container(&mut c, &pod, &priv_pod_cfg, attacker_cfg).await;
    let log = logs.join("attacker/0.log");
    let deadline = Instant::now() + Duration::from_secs(120);
    let summary = loop {
        let lines: Vec<String> = read_log(&log).into_iter().map(|(_, _, m)| m).collect();
        if let Some(s) = lines.iter().find(|l| l.starts_with("attack done")) {
            let planted: Vec<&String> = lines.iter().filter(|l| l.starts_with("PLANTED")).collect();
            assert!(planted.is_empty(), "the guest planted: {planted:?}");
            break s.clone();
        }
        assert!(
            !lines.iter().any(|l| l == "NO SHARE"),
            "the attacker did not find the share"
        );
        assert!(Instant::now() < deadline, "no attack summary in {lines:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("{summary}");
    assert!(summary.contains("planted=0"), "{summary}");

    // While the flood runs, vesseld answers at once.
    let mut latencies = Vec::new();
    let rss_flood_before = vesseld_rss_kib(&d);
    for _ in 0..20 {
        let t = Instant::now();
        c.runtime
            .version(cri::VersionRequest::default())
            .await
            .expect("Version during the flood");
        latencies.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    latencies.sort();
    let rss_flood = vesseld_rss_kib(&d);
    let log_bytes = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "Version during the flood: p50 {:?}, p90 {:?}, max {:?}; log {} KiB; vesseld RSS {} -> {} KiB",
        latencies[10],
        latencies[18],
        latencies[19],
        log_bytes >> 10,
        rss_flood_before,
        rss_flood
    );
    assert!(
        log_bytes > 1 << 20,
        "the flood reached the log ({log_bytes} bytes)"
    );
    assert!(
        latencies[18] < Duration::from_millis(100),
        "Version p90 {:?} during a log flood",
        latencies[18]
    );
    assert!(
        rss_flood < rss_flood_before + 64 * 1024,
        "vesseld RSS grew from {rss_flood_before} to {rss_flood} KiB during the flood"
    );
    wait_exited(&mut c, &attacker, Duration::from_secs(60)).await;

    // 4. More containers, with the new layer and both volumes, after the attack.
    let check = |name: &str| {
        with_volumes(
            container_config(name, &second, &["sh", "-c", LONG_RUNNER]),
            &[(&rw_vol, "/vol", false), (&ro_vol, "/ro", true)],
        )
    };
    let late = run_container(&mut c, &pod, &pod_cfg, check("late")).await;
    let r = exec(
        &mut c,
        &late,
        &[
            "sh",
            "-c",
            "cat /ro/data; ls /second-marker; ls -la /vol/escape",
        ],
        30,
    )
    .await
    .expect("ExecSync in the late container");
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(out.contains("read-only volume"), "{out}");
    assert!(out.contains("/second-marker"), "{out}");
    // The read-only volume stays read-only even for a root guest that remounts.
    let prober = attacker_free_shell(&mut c, &pod, &priv_pod_cfg, &image, &ro_vol).await;
    let r = exec(
        &mut c,
        &prober,
        &[
            "sh",
            "-c",
            "S=/proc/1/root/run/vessel/share; for v in $S/ctr/*/*; do echo x > $v/planted 2>/dev/null && echo WROTE $v; done; echo end",
        ],
        30,
    )
    .await
    .expect("ExecSync write attempt");
    let out = String::from_utf8_lossy(&r.stdout).to_string();
    assert!(!ro_vol.join("planted").exists(), "{out}");

    // 5. vesseld restarts, one more container, then the pod goes.
    d.restart().expect("restart vesseld");
    let mut c = d.client().await.unwrap();
    let after = run_container(&mut c, &pod, &pod_cfg, check("after-restart")).await;
    let r = exec(&mut c, &after, &["cat", "/ro/data"], 30)
        .await
        .expect("ExecSync after restart");
    assert_eq!(String::from_utf8_lossy(&r.stdout), "read-only volume");

    // No mount appeared outside the pod's own dirs at any point.
    let pod_prefix = pod_dir.display().to_string();
    let stray: Vec<String> = mount_points()
        .difference(&mounts_before)
        .filter(|m| {
            !m.starts_with(&pod_prefix)
                && !m.starts_with(&d.run_root().join("vm").display().to_string())
        })
        .cloned()
        .collect();
    assert!(stray.is_empty(), "mounts outside the pod's dirs: {stray:?}");

    c.runtime
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect("StopPodSandbox");
    remove_pod(&mut c, &pod).await;

    assert_eq!(snapshot_tree(&canary), canary_before, "the canary changed");
    assert_eq!(
        std::fs::read_to_string(ro_vol.join("data")).unwrap(),
        "read-only volume"
    );
    // What the guest planted in its writable volume is still just data there.
    assert!(std::fs::symlink_metadata(rw_vol.join("escape"))
        .unwrap()
        .file_type()
        .is_symlink());
    // Layers stayed intact: no file appeared in any snapshot.
    for l in &next_layers {
        let names: Vec<_> = std::fs::read_dir(d.root().join("snapshots").join(l))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("second-marker")],
            "layer {l}"
        );
    }
    assert_eq!(mount_points(), mounts_before, "mounts changed");
    assert_no_leaks(&d);
    drop(reg);
}

/// A privileged, PID-NODE container with the read-only volume, for a second write
/// attempt at the volumes from the guest's root.
async fn attacker_free_shell(
    c: &mut CriClient,
    pod: &str,
    pod_cfg: &cri::PodSandboxConfig,
    image: &str,
    ro_vol: &Path,
) -> String {
    let cfg = privileged_node_pid(with_volumes(
        container_config("prober", image, &["sh", "-c", LONG_RUNNER]),
        &[(ro_vol, "/ro", true)],
    ));
    run_container(c, pod, pod_cfg, cfg).await
}
