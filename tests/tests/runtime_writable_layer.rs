//! Writable layers on node disk: a container of a pod whose VM has 192 MiB of RAM
//! writes 1.5× that to its rootfs and succeeds, because its overlay upper dir is on
//! the pod's scratch disk (a sparse file vesseld made under root), not in guest
//! memory. The write shows in ContainerStats (writable layer, measured in the
//! guest) and in ImageFsInfo's container filesystems (the file's blocks, measured on
//! the host); deleting it gives the blocks back (discard); RemovePodSandbox removes
//! the file.

mod runtime_common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use runtime_common::*;
use vessel_tests::cri::CriClient;

const MIB: u64 = 1024 * 1024;
/// The `small` handler of runtime_common::setup.
const GUEST_RAM_MIB: u64 = 192;
/// 1.5× guest RAM: with the layer in guest tmpfs this could not fit.
const WRITE_MIB: u64 = GUEST_RAM_MIB * 3 / 2;

fn val(v: &Option<cri::UInt64Value>) -> u64 {
    v.as_ref().map(|v| v.value).unwrap_or(0)
}

/// Bytes the scratch disks take on the host, per ImageFsInfo.
async fn container_fs_bytes(c: &mut CriClient) -> u64 {
    let r = c
        .image
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await
        .expect("ImageFsInfo")
        .into_inner();
    assert_eq!(r.container_filesystems.len(), 1, "{r:?}");
    let fs = &r.container_filesystems[0];
    assert!(!fs.fs_id.as_ref().unwrap().mountpoint.is_empty(), "{fs:?}");
    val(&fs.used_bytes)
}

async fn writable_layer_bytes(c: &mut CriClient, id: &str) -> u64 {
    let s = c
        .runtime
        .container_stats(cri::ContainerStatsRequest {
            container_id: id.into(),
        })
        .await
        .expect("ContainerStats")
        .into_inner()
        .stats
        .unwrap();
    val(&s.writable_layer.expect("writable layer").used_bytes)
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[tokio::test(flavor = "multi_thread")]
async fn container_writes_more_than_guest_ram_to_its_rootfs() {
    let Some((_reg, d, mut c, image)) = setup().await else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_owned());
    let logs = d.dir().join("logs/scratch");
    let pod_cfg = pod_config("scratch", &logs);
    let started = Instant::now();
    let pod = run_pod(&mut c, &pod_cfg, "small")
        .await
        .expect("RunPodSandbox");
    eprintln!("RunPodSandbox: {:?}", started.elapsed());
    let info = pod_info(&mut c, &pod).await;
    assert_eq!(info["memoryMib"], GUEST_RAM_MIB, "{info}");
    eprintln!("startup phases (ms): {}", info["startupMs"]);

    // The disk: vesseld's own file, private, sparse, of the default size.
    let disk = d.root().join(format!("scratch/{pod}.img"));
    let m = std::fs::metadata(&disk).expect("the pod's scratch disk");
    assert_eq!(m.mode() & 0o777, 0o600);
    assert_eq!(m.len(), 10 * 1024 * MIB);
    let idle = allocated(&disk);
    assert!(idle < 64 * MIB, "formatting allocated {idle} bytes");

    let ctr = run_container(
        &mut c,
        &pod,
        &pod_cfg,
        container_config("writer", &image, &["sh", "-c", LONG_RUNNER]),
    )
    .await;
    let fs_before = container_fs_bytes(&mut c).await;

    let t = Instant::now();
    let dd = format!("dd if=/dev/zero of=/big bs=1M count={WRITE_MIB} conv=fsync 2>&1");
    let r = exec(&mut c, &ctr, &["sh", "-c", &dd], 120)
        .await
        .expect("ExecSync dd");
    let secs = t.elapsed().as_secs_f64();
    let out = String::from_utf8_lossy(&r.stdout);
    eprintln!(
        "dd {WRITE_MIB} MiB: {secs:.1} s ({:.0} MiB/s): {}",
        WRITE_MIB as f64 / secs,
        out.trim()
    );
    assert_eq!(r.exit_code, 0, "dd failed: {out}");

    // The guest sees the file in the container's writable layer...
    let layer = writable_layer_bytes(&mut c, &ctr).await;
    assert!(layer >= WRITE_MIB * MIB, "writable layer {layer} bytes");
    // ...and the host sees the blocks in the pod's disk file.
    let on_disk = allocated(&disk);
    assert!(
        on_disk >= WRITE_MIB * MIB,
        "disk file holds {on_disk} bytes"
    );
    let fs_after = container_fs_bytes(&mut c).await;
    assert!(
        fs_after >= fs_before + WRITE_MIB * MIB,
        "ImageFsInfo container fs {fs_before} -> {fs_after}"
    );
    eprintln!("scratch disk: {idle} -> {on_disk} bytes allocated; writable layer {layer}");

    // Deleting the file in the guest punches holes in the host file (discard).
    let r = exec(&mut c, &ctr, &["sh", "-c", "rm /big && sync"], 60)
        .await
        .expect("ExecSync rm");
    assert_eq!(r.exit_code, 0, "{r:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = allocated(&disk);
        if now < on_disk / 2 {
            eprintln!("after rm: {now} bytes allocated");
            break;
        }
        assert!(Instant::now() < deadline, "no blocks freed: {now} bytes");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    remove_pod(&mut c, &pod).await;
    assert!(!disk.exists(), "scratch disk left after RemovePodSandbox");
    assert_eq!(container_fs_bytes(&mut c).await, 0);
    assert_no_leaks(&d);
}
