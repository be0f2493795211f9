//! One tenant filling the node's disk must not stop the others: with vesseld's root
//! on a small filesystem, pod A writes its scratch disk until the filesystem is
//! full. QEMU's default (`werror=enospc`) would pause every VM whose next write
//! fails; vessel's drives report the error to the writing guest instead, so pod B
//! (which keeps writing too) stays running and answers exec, and A's VM answers
//! as well (its writer just got EIO).

mod runtime_common;

use std::time::{Duration, Instant};

use runtime_common::*;
use vessel_tests::daemon::TestDaemon;

/// Size of the filesystem vesseld's root lives on.
const ROOT_FS_MIB: u64 = 160;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_node_disk_fails_the_writer_and_pauses_no_vm() {
    let guest = guest_dir();
    if !guest.join("vmlinux").is_file() {
        vessel_tests::skip_vm_or_fail("no guest (scripts/build-guest.sh builds it)");
        return;
    }
    let mut d = TestDaemon::prepare(&format!(
        "[guest]\nkernel = {:?}\ninitrd = {:?}\n\n[runtimes.default]\nvcpus = 1\n\
         memory_mib = 256\nwritable_layer_mib = 1024\n\n\
         [containers]\nscratch_overcommit = 100.0\n",
        guest.join("vmlinux").display().to_string(),
        guest.join("initrd.img").display().to_string(),
    ))
    .unwrap();
    // vesseld's root (images, state, scratch disks) on a small tmpfs of its own.
    std::fs::create_dir_all(d.root()).unwrap();
    let opts = format!("size={ROOT_FS_MIB}m,mode=0711");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &opts, "vessel-test-root"])
        .arg(d.root())
        .status()
        .unwrap();
    assert!(mounted.success(), "mount tmpfs on the daemon root");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(d.root().to_path_buf());
    d.restart().unwrap();
    let _cleanup = Cleanup(d.dir().to_path_buf());
    let reg = vessel_tests::registry::TestRegistry::start().unwrap();
    d.write_hosts_toml(&reg.addr(), &reg.url()).unwrap();
    let mut c = d.client().await.unwrap();
    let image = vessel_tests::testimages::push_busybox(&reg, "full/busybox:1")
        .await
        .unwrap()
        .reference;
    c.pull(&image).await.unwrap();

    // Kept free until the end, so the test can clean up once the disk was full.
    let ballast = d.root().join("ballast");
    std::fs::write(&ballast, vec![1u8; 8 << 20]).unwrap();

    // B writes a little every second (as any workload's logs or journal do).
    let b_cfg = pod_config("quiet-writer", &d.dir().join("logs/b"));
    let b_pod = run_pod(&mut c, &b_cfg, "").await.expect("RunPodSandbox B");
    let b = run_container(
        &mut c,
        &b_pod,
        &b_cfg,
        container_config(
            "tick",
            &image,
            &["sh", "-c", "while :; do date >> /tick; sync; sleep 1; done"],
        ),
    )
    .await;
    // A fills its scratch disk past what the node's filesystem holds.
    let a_cfg = pod_config("filler", &d.dir().join("logs/a"));
    let a_pod = run_pod(&mut c, &a_cfg, "").await.expect("RunPodSandbox A");
    let a = run_container(
        &mut c,
        &a_pod,
        &a_cfg,
        container_config(
            "fill",
            &image,
            &[
                "sh",
                "-c",
                "dd if=/dev/zero of=/fill bs=1M count=400 conv=fsync; echo $? > /dd-exit; \
                 while :; do sleep 1; done",
            ],
        ),
    )
    .await;

    let root_c = std::ffi::CString::new(d.root().as_os_str().as_encoded_bytes()).unwrap();
    let free = || {
        // SAFETY: statvfs writes only into the zeroed struct it is given; the path is
        // a valid NUL-terminated string.
        let st = unsafe {
            let mut st: libc::statvfs = std::mem::zeroed();
            assert_eq!(libc::statvfs(root_c.as_ptr(), &mut st), 0);
            st
        };
        st.f_bavail * st.f_frsize
    };
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let r = exec(&mut c, &a, &["cat", "/dd-exit"], 30).await;
        if r.as_ref().is_ok_and(|r| r.exit_code == 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A's dd never ended (free on the root: {} bytes)",
            free()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        free() < 4 << 20,
        "the node's filesystem is not full: {} bytes free",
        free()
    );
    // B has written into the full filesystem meanwhile: still running, answering.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (who, id) in [("B", &b), ("A", &a)] {
        let t = Instant::now();
        let r = exec(&mut c, id, &["true"], 20)
            .await
            .unwrap_or_else(|e| panic!("{who}'s exec with the node disk full: {e}"));
        assert_eq!(r.exit_code, 0, "{who}: {r:?}");
        eprintln!("{who}'s exec with the node disk full: {:?}", t.elapsed());
        assert_eq!(
            status(&mut c, id).await.state,
            k8s_cri::v1::ContainerState::ContainerRunning as i32,
            "{who}'s container"
        );
    }
    let dd = exec(&mut c, &a, &["cat", "/dd-exit"], 20).await.unwrap();
    let code = String::from_utf8_lossy(&dd.stdout).trim().to_owned();
    assert_ne!(code, "0", "A's dd cannot have written 400 MiB");
    // Calls that save state while the disk is full may fail (clearly); once space
    // is back they work again without a restart (the state store retries and
    // reopens its database).
    for i in 0..3 {
        let name = format!("during-full-{i}");
        match create(
            &mut c,
            &b_pod,
            &b_cfg,
            container_config(&name, &image, &["true"]),
        )
        .await
        {
            Ok(id) => eprintln!("CreateContainer with the disk full worked: {id}"),
            Err(e) => {
                eprintln!(
                    "CreateContainer with the disk full: {:?} {}",
                    e.code(),
                    e.message()
                );
                // A state save refused: the caller is told to retry.
                if e.message().contains("cannot save changes") {
                    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
                }
            }
        }
    }
    std::fs::remove_file(&ballast).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        match create(
            &mut c,
            &b_pod,
            &b_cfg,
            container_config("after", &image, &["true"]),
        )
        .await
        {
            Ok(id) => break id,
            Err(e) if Instant::now() < deadline => {
                eprintln!("CreateContainer once space is back: {e:?}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("the store did not recover once space was back: {e:?}"),
        }
    };
    start(&mut c, &after).await;
    for pod in [&a_pod, &b_pod] {
        remove_pod(&mut c, pod).await;
    }
    let scratch: Vec<_> = std::fs::read_dir(d.root().join("scratch"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(scratch.is_empty(), "scratch disks left: {scratch:?}");
    drop(_unmount);
    assert_no_leaks(&d);
}

/// A scratch disk the filesystem under vesseld's root could never back is refused
/// at RunPodSandbox, clearly and without leftovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scratch_disk_past_the_overcommit_is_refused() {
    let Some((_reg, d, mut c, _image)) = setup_with(
        "writable_layer_mib = 10240\n\n[containers]\nscratch_overcommit = 0.000001\n",
        "full/busybox:1",
    )
    .await
    else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_path_buf());
    let err = run_pod(&mut c, &pod_config("too-big", &d.dir().join("logs/x")), "")
        .await
        .expect_err("a 10 GiB disk at overcommit 0.000001");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("scratch_overcommit"),
        "{}",
        err.message()
    );
    assert!(pods(&mut c).await.is_empty(), "the refused pod is listed");
    assert_no_leaks(&d);
}
