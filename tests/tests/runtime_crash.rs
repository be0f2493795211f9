//! vesseld killed (SIGKILL) while RunPodSandbox boots the VM: the VM and its helpers
//! outlive it (they are detached), so the restarted vesseld must tear them down,
//! report the pod NOTREADY, and RemovePodSandbox must leave nothing behind.

mod runtime_common;

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use runtime_common::*;
use vessel_tests::cri::CriClient;

/// Pids (not ours, not vesseld's) whose command line names `dir` and `needle`.
fn procs_naming(dir: &Path, needle: &str, except: Option<u32>) -> Vec<u32> {
    let dir = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            let ours = pid == std::process::id() || Some(pid) == except;
            (!ours && cmd.contains(&dir) && cmd.contains(needle)).then_some(pid)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_during_run_pod_sandbox_is_cleaned_up_after_restart() {
    let Some((_reg, mut d, mut c, _image)) = setup().await else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_owned());
    let pod_cfg = pod_config("crashy", &d.dir().join("logs/crashy"));

    let socket = d.socket().to_owned();
    let cfg = pod_cfg.clone();
    let pending = tokio::spawn(async move {
        let mut c = CriClient::connect(socket).await.unwrap();
        run_pod(&mut c, &cfg, "").await
    });

    // Wait for the pod record and a booting QEMU, then kill vesseld mid-call.
    let deadline = Instant::now() + Duration::from_secs(60);
    let pod_id = loop {
        let items = pods(&mut c).await;
        let booting = !procs_naming(d.dir(), "qemu-system", d.pid()).is_empty();
        if let (Some(p), true) = (items.first(), booting) {
            assert_eq!(
                p.state,
                cri::PodSandboxState::SandboxNotready as i32,
                "{p:?}"
            );
            break p.id.clone();
        }
        assert!(
            !pending.is_finished(),
            "RunPodSandbox ended first: {pending:?}"
        );
        assert!(Instant::now() < deadline, "no booting pod VM seen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Let the start record the VMM pid (written right after spawning it).
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.kill9();
    let res = pending.await.unwrap();
    assert!(res.is_err(), "RunPodSandbox cannot succeed: {res:?}");
    assert!(
        !procs_naming(d.dir(), "qemu-system", None).is_empty(),
        "the VM outlives the killed vesseld (else this test proves nothing)"
    );

    d.restart().expect("vesseld restarts");
    let mut c = d.client().await.unwrap();
    let items = pods(&mut c).await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0].id, pod_id);
    assert_eq!(items[0].state, cri::PodSandboxState::SandboxNotready as i32);
    // Start-up already tore the half-started VM and its helpers down.
    let left = procs_naming(d.dir(), "", d.pid());
    assert!(left.is_empty(), "still running after restart: {left:?}");

    c.runtime
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod_id.clone(),
        })
        .await
        .expect("StopPodSandbox");
    c.runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.clone(),
        })
        .await
        .expect("RemovePodSandbox");
    assert!(pods(&mut c).await.is_empty());
    assert_no_leaks(&d);
}
