//! Image user resolution is linear, bounded and off the async workers: a user in
//! 50,000 groups of the image's `/etc/group` runs (CreateContainer within a second
//! of a small image's, while a concurrent Version call answers promptly), and one
//! in 200,000, past the kernel's NGROUPS_MAX, is refused at once with
//! InvalidArgument instead of timing out in the guest.

mod runtime_common;

use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use runtime_common::*;
use vessel_tests::testimages;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_groups_run_and_too_many_are_refused_fast() {
    let Some((reg, d, mut c, _busybox)) = setup().await else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_owned());
    let mut images = Vec::new();
    for n in [0, 50_000, 200_000] {
        let img = testimages::push_with_groups(&reg, &format!("groups/n{n}:1"), n)
            .await
            .unwrap();
        c.pull(&img.reference).await.unwrap();
        images.push(img.reference);
    }
    let pod_cfg = pod_config("groups", &d.dir().join("logs/groups"));
    let pod = run_pod(&mut c, &pod_cfg, "").await.expect("RunPodSandbox");

    let timed_create = |c: &mut vessel_tests::cri::CriClient, name: &str, image: &str| {
        let cfg = container_config(name, image, &["sleep", "3600"]);
        let (mut c, pod, pod_cfg) = (c.clone(), pod.clone(), pod_cfg.clone());
        async move {
            let t = Instant::now();
            let r = create(&mut c, &pod, &pod_cfg, cfg).await;
            (r, t.elapsed())
        }
    };
    let (small, small_took) = timed_create(&mut c, "small", &images[0]).await;
    small.expect("CreateContainer, small image");

    // 50,000 groups, with Version calls timed while the create runs.
    let create = tokio::spawn(timed_create(&mut c, "many", &images[1]));
    let mut slowest_version = Duration::ZERO;
    while !create.is_finished() {
        let t = Instant::now();
        c.runtime
            .version(cri::VersionRequest::default())
            .await
            .expect("Version");
        slowest_version = slowest_version.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (many, many_took) = create.await.unwrap();
    let id = many.expect("CreateContainer, 50,000 groups");
    eprintln!("CreateContainer: 50,000 groups {many_took:?}, a small image {small_took:?}");
    assert!(
        many_took < small_took + Duration::from_secs(1),
        "50,000 groups took {many_took:?}, a small image {small_took:?}"
    );
    assert!(
        slowest_version < Duration::from_millis(500),
        "Version took {slowest_version:?} during the create"
    );
    start(&mut c, &id).await;
    // From the kernel: busybox `id -G` looks each gid up in the 50,000-line file.
    let r = exec(&mut c, &id, &["grep", "^Groups:", "/proc/self/status"], 30)
        .await
        .expect("ExecSync");
    assert_eq!(r.exit_code, 0, "{}", String::from_utf8_lossy(&r.stderr));
    let words = String::from_utf8_lossy(&r.stdout)
        .split_whitespace()
        .count();
    assert_eq!(words, 1 + 50_000, "\"Groups:\" and every supplementary gid");

    // 200,000: refused, fast, naming the limit.
    let (too_many, took) = timed_create(&mut c, "too-many", &images[2]).await;
    let err = too_many.expect_err("200,000 groups must be refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("65536"), "{}", err.message());
    assert!(took < Duration::from_secs(1), "refusal took {took:?}");

    remove_pod(&mut c, &pod).await;
    assert_no_leaks(&d);
}
