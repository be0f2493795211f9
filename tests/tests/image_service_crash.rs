//! vesseld killed with SIGKILL in the middle of a pull: after a restart the image is
//! absent, leftovers are collected, and pulling again works.

use std::path::Path;
use std::time::{Duration, Instant};

use vessel_tests::daemon::TestDaemon;
use vessel_tests::registry::TestRegistry;
use vessel_tests::testimages;

/// Bytes under `dir`, recursively.
fn du(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.map(|e| {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        if m.is_dir() {
            du(&e.path())
        } else {
            m.len()
        }
    })
    .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_mid_pull_then_restart_and_pull_again() {
    let reg = TestRegistry::start().unwrap();
    // One download at a time: the pull takes longer, so the kill lands mid-pull even
    // with an optimized build.
    let mut d = TestDaemon::start_with("[image]\nmax_concurrent_downloads = 1\n").unwrap();
    d.write_hosts_toml(&reg.addr(), &reg.url()).unwrap();
    let layers = 4;
    let layer_size = 8 << 20;
    let img = testimages::push_random(&reg, "big:1", layers, layer_size)
        .await
        .unwrap();

    let mut c = d.client().await.unwrap();
    let r = img.reference.clone();
    let pull = tokio::spawn(async move { c.pull(&r).await });

    // Kill once the pull has written something, well before it can be done.
    let start = Instant::now();
    while du(d.root()) < 2 << 20 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "pull made no progress"
        );
        assert!(
            !pull.is_finished(),
            "pull finished before it could be interrupted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    d.kill9();
    let interrupted = pull.await.unwrap();
    assert!(
        interrupted.is_err(),
        "the pull was cut off: {interrupted:?}"
    );

    d.restart().unwrap();
    let mut c = d.client().await.unwrap();
    assert!(c.list_images(None).await.unwrap().is_empty());
    let (s, _) = c.image_status(&img.reference, false).await.unwrap();
    assert!(s.is_none());

    let started = Instant::now();
    let id = c.pull(&img.reference).await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(id, img.config_digest);
    let images = c.list_images(None).await.unwrap();
    assert_eq!(images.len(), 1);
    assert!(images[0].size >= (layers * layer_size) as u64);
    let snapshots = std::fs::read_dir(d.root().join("snapshots"))
        .unwrap()
        .count();
    assert_eq!(snapshots, layers, "exactly the image's snapshots remain");
    eprintln!(
        "pulled {} MiB through vesseld in {secs:.2} s ({:.0} MiB/s)",
        (layers * layer_size) >> 20,
        (layers * layer_size) as f64 / 1048576.0 / secs
    );
}
