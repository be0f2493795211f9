//! Images of any layer count Docker builds run, and cost the host the same mounts
//! whatever their layer count: containers from images of 1, 44, 100 and 127 layers
//! (pulled from a registry on 127.0.0.1) see the top layer's files over the bottom
//! one's, whiteouts and opaque dirs applied, and each image adds one mount to the
//! pod (plus its copy in the exported tree), none per layer and none for a second
//! container of the same image.

mod runtime_common;

use runtime_common::*;
use vessel_tests::testimages;

const COUNTS: [usize; 4] = [1, 44, 100, 127];

/// Mounts whose mountinfo line names this test's dir.
fn host_mounts(d: &vessel_tests::daemon::TestDaemon) -> usize {
    let dir = d.dir().display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&dir))
        .count()
}

async fn stdout_of(c: &mut vessel_tests::cri::CriClient, id: &str, cmd: &[&str]) -> String {
    let r = exec(c, id, cmd, 30).await.expect("ExecSync");
    assert_eq!(
        r.exit_code,
        0,
        "{cmd:?}: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    String::from_utf8_lossy(&r.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_of_up_to_127_layers_run_with_constant_host_mounts() {
    let Some((reg, d, mut c, _busybox)) = setup().await else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_owned());
    let mut images = Vec::new();
    for n in COUNTS {
        let img = testimages::push_many_layers(&reg, &format!("layers/n{n}:1"), n)
            .await
            .unwrap();
        c.pull(&img.reference).await.unwrap();
        images.push((n, img.reference));
    }
    let logs = d.dir().join("logs/layers");
    let pod_cfg = pod_config("layers", &logs);
    let pod = run_pod(&mut c, &pod_cfg, "").await.expect("RunPodSandbox");

    for (n, image) in &images {
        let before = host_mounts(&d);
        let name = format!("n{n}");
        let id = run_container(
            &mut c,
            &pod,
            &pod_cfg,
            container_config(&name, image, &["sleep", "3600"]),
        )
        .await;
        assert_eq!(
            host_mounts(&d) - before,
            2,
            "{n} layers: one image rootfs mount and its exported copy"
        );
        let top = stdout_of(&mut c, &id, &["cat", "/stack/n"]).await;
        assert_eq!(top.trim(), (n - 1).to_string(), "{n} layers: top wins");
        let listing = stdout_of(&mut c, &id, &["ls", "/stack"]).await;
        for i in [0, n / 2, n - 1] {
            assert!(
                listing.split_whitespace().any(|f| f == format!("l{i}")),
                "{n} layers: l{i} missing from {listing:?}"
            );
        }
        if *n > 1 {
            let gone = exec(&mut c, &id, &["ls", "/stack/gone"], 30).await.unwrap();
            assert_ne!(gone.exit_code, 0, "{n} layers: whiteout not applied");
            let opq = stdout_of(&mut c, &id, &["ls", "/stack/opq"]).await;
            assert_eq!(opq.trim(), "new", "{n} layers: opaque dir");
        }
        // The writable layer still works over the image.
        stdout_of(
            &mut c,
            &id,
            &["sh", "-c", "echo w > /stack/n && cat /stack/n"],
        )
        .await;
    }

    // A second container of the 127-layer image adds no mount at all.
    let before = host_mounts(&d);
    let (_, image) = images.last().unwrap();
    let id = run_container(
        &mut c,
        &pod,
        &pod_cfg,
        container_config("again", image, &["sleep", "3600"]),
    )
    .await;
    assert_eq!(
        host_mounts(&d),
        before,
        "same image, same pod: no new mount"
    );
    assert_eq!(
        stdout_of(&mut c, &id, &["cat", "/stack/n"]).await.trim(),
        "126"
    );

    remove_pod(&mut c, &pod).await;
    assert_no_leaks(&d);
}
