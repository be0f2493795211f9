//! Pulls from a real `docker-registry` on 127.0.0.1: mirrors, multi-arch, zstd,
//! dedup of downloads, digest checks, auth, tag/remove semantics, GC and crash safety.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vessel_image::{
    DownloadLimits, ErrorCode, Image, ImageError, ImageLimits, ImageStore, ImageStoreConfig,
    RegistryAuth,
};
use vessel_tests::registry::TestRegistry;
use vessel_tests::testimages;

/// A store in a temp dir with its own certs dir and database.
struct Env {
    dir: tempfile::TempDir,
    db: Arc<vessel_storage::db::Db>,
    store: ImageStore,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("certs.d")).unwrap();
        let db = vessel_storage::db::Db::open(dir.path().join("state.redb")).unwrap();
        let store = open(dir.path(), db.clone());
        Env { dir, db, store }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn certs(&self) -> PathBuf {
        self.dir.path().join("certs.d")
    }

    /// Writes `<certs>/<host>/hosts.toml`.
    fn hosts(&self, host: &str, toml: &str) {
        let d = self.certs().join(host);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("hosts.toml"), toml).unwrap();
    }

    /// Plain HTTP to `reg` under its own name.
    fn plain_http(&self, reg: &TestRegistry) {
        self.hosts(&reg.addr(), &format!("server = \"{}\"\n", reg.url()));
    }

    /// Plain HTTP to `reg` under its own name, credentials allowed over it.
    fn plain_http_with_credentials(&self, reg: &TestRegistry) {
        self.hosts(
            &reg.addr(),
            &format!("server = \"{}\"\nsend_credentials = true\n", reg.url()),
        );
    }

    /// A second store on the same root and database (as after a restart).
    fn reopen(&self) -> ImageStore {
        open(self.dir.path(), self.db.clone())
    }

    fn blobs(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.root().join("content/blobs/sha256"))
            .unwrap()
            .map(|e| format!("sha256:{}", e.unwrap().file_name().to_string_lossy()))
            .collect();
        v.sort();
        v
    }

    fn snapshot_dirs(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.root().join("snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

fn open(dir: &Path, db: Arc<vessel_storage::db::Db>) -> ImageStore {
    ImageStore::open(
        ImageStoreConfig {
            root: dir.join("root"),
            certs_dir: dir.join("certs.d"),
            max_concurrent_downloads: 3,
            download_limits: DownloadLimits::default(),
            limits: ImageLimits::default(),
        },
        db,
    )
    .unwrap()
}

/// A port nothing listens on (connections are refused).
fn dead_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn anon() -> RegistryAuth {
    RegistryAuth::default()
}

/// Path of a blob in the registry's filesystem storage.
fn registry_blob(reg: &TestRegistry, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap();
    reg.storage_dir()
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data")
}

fn rootfs_file(store: &ImageStore, image: &Image, rel: &str) -> Option<PathBuf> {
    store
        .layer_paths(image)
        .unwrap()
        .into_iter()
        .rev()
        .map(|p| p.join(rel))
        .find(|p| p.symlink_metadata().is_ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn short_name_through_mirror_in_order() {
    let reg = TestRegistry::start().unwrap();
    let pushed = testimages::push_busybox(&reg, "library/busybox:latest")
        .await
        .unwrap();
    let env = Env::new();
    // First mirror is dead, second is the registry; the upstream is dead too, so
    // nothing leaves 127.0.0.1.
    env.hosts(
        "docker.io",
        &format!(
            "server = \"http://127.0.0.1:{dead}\"\n\
             [host.\"http://127.0.0.1:{dead}\"]\n  capabilities = [\"pull\", \"resolve\"]\n\
             [host.\"{url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            dead = dead_port(),
            url = reg.url()
        ),
    );
    let img = env.store.pull("busybox", &anon()).await.unwrap();
    assert_eq!(img.id, pushed.config_digest);
    assert_eq!(img.repo_tags, vec!["docker.io/library/busybox:latest"]);
    assert_eq!(
        img.repo_digests,
        vec![format!(
            "docker.io/library/busybox@{}",
            pushed.manifest_digest
        )]
    );
    assert_eq!(img.chain_ids.len(), 1);
    assert_eq!(img.user, "");
    assert_eq!(img.uid(), None);
    let layer = testimages::get_blob(&reg, "library/busybox", &pushed.layer_digests[0])
        .await
        .unwrap();
    // The size on disk: the compressed blob plus what it unpacked to, which for
    // busybox is more than the blob (ListImages' size is what GC frees).
    let unpacked = vessel_storage::disk_usage(&env.store.layer_paths(&img).unwrap()[0])
        .unwrap()
        .0;
    assert_eq!(img.size, layer.len() as u64 + unpacked);
    assert!(unpacked > layer.len() as u64, "{unpacked}");
    let cfg = img.config().unwrap();
    assert_eq!(cfg.rootfs().diff_ids().len(), 1);

    let busybox = rootfs_file(&env.store, &img, "bin/busybox").expect("bin/busybox unpacked");
    assert!(busybox.metadata().unwrap().len() > 100_000);

    let listed = env.store.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, img.id);
    for name in [
        "busybox",
        "busybox:latest",
        "docker.io/library/busybox:latest",
        img.id.as_str(),
        &img.id[7..19],
        &img.repo_digests[0],
    ] {
        let found = env.store.resolve(name).unwrap();
        assert_eq!(found.map(|i| i.id), Some(img.id.clone()), "{name}");
    }
    assert!(env.store.resolve("busybox:other").unwrap().is_none());

    let usage = env.store.fs_usage().unwrap();
    assert!(usage.used_bytes >= layer.len() as u64, "{usage:?}");
    assert!(usage.inodes_used > 10, "{usage:?}");
    assert!(env
        .root()
        .canonicalize()
        .unwrap()
        .starts_with(&usage.mountpoint));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multiarch_index_resolves_to_linux_amd64() {
    let reg = TestRegistry::start().unwrap();
    let pushed = testimages::push_multiarch(&reg, "multi:1").await.unwrap();
    let env = Env::new();
    env.plain_http(&reg);
    let img = env.store.pull(&pushed.reference, &anon()).await.unwrap();
    assert_eq!(img.id, pushed.config_digest);
    assert_eq!(
        img.repo_digests,
        vec![format!("{}/multi@{}", reg.addr(), pushed.manifest_digest)]
    );
    let arch = rootfs_file(&env.store, &img, "arch").unwrap();
    assert_eq!(std::fs::read_to_string(arch).unwrap(), "amd64\n");
    // The arm64 layer was never fetched: one config + one layer.
    assert_eq!(env.store.stats().blobs_downloaded, 2);

    // Pulling by the index digest gives the same image, without a tag.
    let by_digest = env
        .store
        .pull(&pushed.digest_reference(), &anon())
        .await
        .unwrap();
    assert_eq!(by_digest.id, img.id);
    assert_eq!(env.store.stats().blobs_downloaded, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zstd_layers_unpack() {
    let reg = TestRegistry::start().unwrap();
    let pushed = testimages::push_zstd(&reg, "zst:1").await.unwrap();
    let env = Env::new();
    env.plain_http(&reg);
    let img = env.store.pull(&pushed.reference, &anon()).await.unwrap();
    assert_eq!(img.id, pushed.config_digest);
    assert!(rootfs_file(&env.store, &img, "bin/busybox").is_some());
    assert!(rootfs_file(&env.store, &img, "etc/passwd").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repull_downloads_nothing_even_after_reopen() {
    let reg = TestRegistry::start().unwrap();
    let pushed = testimages::push_layered_whiteouts(&reg, "wh:1")
        .await
        .unwrap();
    let env = Env::new();
    env.plain_http(&reg);
    let first = env.store.pull(&pushed.reference, &anon()).await.unwrap();
    let s = env.store.stats();
    assert_eq!(s.blobs_downloaded, 4, "config + 3 layers");
    assert_eq!(s.layers_unpacked, 3);
    let again = env.store.pull(&pushed.reference, &anon()).await.unwrap();
    assert_eq!(again.id, first.id);
    assert_eq!(env.store.stats(), s);

    let reopened = env.reopen();
    let third = reopened.pull(&pushed.reference, &anon()).await.unwrap();
    assert_eq!(third.id, first.id);
    assert_eq!(reopened.stats().blobs_downloaded, 0);
    assert_eq!(reopened.stats().layers_unpacked, 0);
    assert_eq!(reopened.list().unwrap().len(), 1);
    let paths = reopened.layer_paths(&third).unwrap();
    assert_eq!(paths.len(), 3);
    assert!(paths[2].join("data/added-in-l3").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_pulls_share_one_download() {
    let reg = TestRegistry::start().unwrap();
    let pushed = testimages::push_random(&reg, "rand:1", 3, 4 << 20)
        .await
        .unwrap();
    let env = Env::new();
    env.plain_http(&reg);
    let other_name = format!("{}/rand@{}", reg.addr(), pushed.manifest_digest);
    let pulls: Vec<_> = [&pushed.reference, &pushed.reference, &other_name]
        .into_iter()
        .map(|r| {
            let (store, r) = (env.store.clone(), r.clone());
            tokio::spawn(async move { store.pull(&r, &anon()).await })
        })
        .collect();
    let mut got = Vec::new();
    for p in pulls {
        got.push(p.await.unwrap().unwrap());
    }
    let (a, b, c) = (&got[0], &got[1], &got[2]);
    assert_eq!(a.id, b.id);
    assert_eq!(a.id, c.id);
    let s = env.store.stats();
    assert_eq!(s.blobs_downloaded, 4, "config + 3 layers, once each: {s:?}");
    assert_eq!(s.layers_unpacked, 3, "{s:?}");
    let img = env.store.resolve(&pushed.reference).unwrap().unwrap();
    assert_eq!(img.repo_tags, vec![pushed.reference.clone()]);
    assert_eq!(env.store.list().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupted_blob_is_a_digest_mismatch() {
    let reg = TestRegistry::start().unwrap();
    let pushed = testimages::push_busybox(&reg, "bad:1").await.unwrap();
    let layer = &pushed.layer_digests[0];
    let path = registry_blob(&reg, layer);
    let mut data = std::fs::read(&path).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    std::fs::write(&path, &data).unwrap();

    let env = Env::new();
    env.plain_http(&reg);
    let err = env
        .store
        .pull(&pushed.reference, &anon())
        .await
        .unwrap_err();
    match &err {
        ImageError::DigestMismatch { expected, actual } => {
            assert_eq!(expected, layer);
            assert_ne!(actual, layer);
            assert!(actual.starts_with("sha256:"));
        }
        e => panic!("want DigestMismatch, got {e:?}"),
    }
    assert_eq!(err.code(), ErrorCode::DataLoss);
    assert!(env.store.list().unwrap().is_empty());
    assert!(!env.blobs().contains(layer), "corrupt blob kept");
    assert!(env.snapshot_dirs().is_empty(), "{:?}", env.snapshot_dirs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn htpasswd_registry_needs_credentials() {
    let reg = TestRegistry::start_with_htpasswd("alice", "s3cret").unwrap();
    let pushed = testimages::push_busybox(&reg, "private/app:1")
        .await
        .unwrap();
    let env = Env::new();
    env.plain_http(&reg);
    let good = RegistryAuth {
        username: Some("alice".into()),
        password: Some("s3cret".into()),
        ..Default::default()
    };
    // Credentials do not cross plain HTTP unless hosts.toml says so; the error says.
    let err = env.store.pull(&pushed.reference, &good).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unauthenticated, "{err:?}");
    assert!(err.to_string().contains("send_credentials = true"), "{err}");
    env.plain_http_with_credentials(&reg);

    let err = env
        .store
        .pull(&pushed.reference, &anon())
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unauthenticated, "{err:?}");
    let wrong = RegistryAuth {
        username: Some("alice".into()),
        password: Some("nope".into()),
        ..Default::default()
    };
    let err = env.store.pull(&pushed.reference, &wrong).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unauthenticated, "{err:?}");
    assert!(env.store.list().unwrap().is_empty());

    let img = env.store.pull(&pushed.reference, &good).await.unwrap();
    assert_eq!(img.id, pushed.config_digest);

    // The same credentials as a base64 `auth` string, into a fresh store.
    let env2 = Env::new();
    env2.plain_http_with_credentials(&reg);
    let b64 = RegistryAuth {
        auth: Some("YWxpY2U6czNjcmV0".into()), // alice:s3cret
        ..Default::default()
    };
    assert_eq!(
        env2.store.pull(&pushed.reference, &b64).await.unwrap().id,
        img.id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_image_is_not_found() {
    let reg = TestRegistry::start().unwrap();
    testimages::push_busybox(&reg, "exists:1").await.unwrap();
    let env = Env::new();
    env.plain_http(&reg);
    for r in [
        format!("{}/exists:2", reg.addr()),
        format!("{}/nope:1", reg.addr()),
    ] {
        let err = env.store.pull(&r, &anon()).await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::NotFound, "{r}: {err:?}");
    }
    let err = env.store.pull("Not A Ref", &anon()).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tags_remove_and_gc() {
    let reg = TestRegistry::start().unwrap();
    let a = testimages::push_busybox(&reg, "a:1").await.unwrap();
    let b = testimages::push_busybox(&reg, "b:2").await.unwrap();
    assert_eq!(a.config_digest, b.config_digest, "same content");
    let env = Env::new();
    env.plain_http(&reg);
    env.store.pull(&a.reference, &anon()).await.unwrap();
    let img = env.store.pull(&b.reference, &anon()).await.unwrap();
    assert_eq!(
        img.repo_tags,
        vec![a.reference.clone(), b.reference.clone()]
    );
    assert_eq!(env.store.list().unwrap().len(), 1);
    let snaps = env.snapshot_dirs();
    assert_eq!(snaps.len(), 1);

    // Dropping one of two tags keeps the image and its content.
    assert!(env.store.remove(&a.reference).unwrap());
    let left = env.store.list().unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].repo_tags, vec![b.reference.clone()]);
    assert_eq!(env.snapshot_dirs(), snaps);
    assert!(!env.store.remove(&a.reference).unwrap(), "already gone");

    // Removing the last tag removes the image; GC frees blobs and snapshots.
    assert!(env.store.remove(&b.reference).unwrap());
    assert!(env.store.list().unwrap().is_empty());
    assert!(env.snapshot_dirs().is_empty(), "{:?}", env.snapshot_dirs());
    assert!(env.blobs().is_empty(), "{:?}", env.blobs());
    assert!(!env.store.remove(&img.id).unwrap());

    // Remove by id and by repo digest.
    let img = env.store.pull(&a.reference, &anon()).await.unwrap();
    assert!(env.store.remove(&img.id).unwrap());
    assert!(env.store.list().unwrap().is_empty());
    let img = env.store.pull(&a.reference, &anon()).await.unwrap();
    assert!(env.store.remove(&img.repo_digests[0]).unwrap());
    assert!(env.store.list().unwrap().is_empty());

    // A tag moves to the newly pulled image; the old one stays, untagged.
    let old = env.store.pull(&a.reference, &anon()).await.unwrap();
    let new = testimages::push_with_user(&reg, "a:1", "1000")
        .await
        .unwrap();
    let newimg = env.store.pull(&new.reference, &anon()).await.unwrap();
    assert_ne!(newimg.id, old.id);
    assert_eq!(newimg.uid(), Some(1000));
    // Same layer: the snapshot is shared, nothing new unpacked.
    assert_eq!(newimg.chain_ids, old.chain_ids);
    let old_now = env.store.resolve(&old.id).unwrap().unwrap();
    assert!(old_now.repo_tags.is_empty());
    assert_eq!(old_now.repo_digests, old.repo_digests);
    assert_eq!(
        env.store.resolve(&a.reference).unwrap().unwrap().id,
        newimg.id
    );

    // GC keeps what images use and drops strays, including leftovers of a crash.
    let stray_blob = env
        .root()
        .join(format!("content/blobs/sha256/{}", "e".repeat(64)));
    std::fs::write(&stray_blob, b"stray").unwrap();
    let stray_snap = env.root().join(format!("snapshots/{}", "f".repeat(64)));
    std::fs::create_dir_all(stray_snap.join("usr")).unwrap();
    std::fs::write(env.root().join("content/ingest/partial"), b"x").unwrap();
    std::fs::create_dir_all(env.root().join("snapshots/.tmp-crashed")).unwrap();
    let before = env.snapshot_dirs().len();
    let store2 = env.reopen();
    assert!(!stray_blob.exists());
    assert!(!stray_snap.exists());
    assert!(!env.root().join("content/ingest/partial").exists());
    assert!(!env.root().join("snapshots/.tmp-crashed").exists());
    assert_eq!(env.snapshot_dirs().len(), before - 2);
    for img in store2.list().unwrap() {
        assert!(store2.layer_paths(&img).unwrap().iter().all(|p| p.is_dir()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_layers_fail_the_pull_and_leave_nothing() {
    let reg = TestRegistry::start().unwrap();
    let env = Env::new();
    env.plain_http(&reg);
    for kind in testimages::HostileKind::ALL {
        let pushed =
            testimages::push_hostile(&reg, &format!("hostile-{kind:?}:1").to_lowercase(), kind)
                .await
                .unwrap();
        let err = env
            .store
            .pull(&pushed.reference, &anon())
            .await
            .unwrap_err();
        assert!(
            matches!(err, ImageError::UnsafeLayer { .. }),
            "{kind:?}: {err:?}"
        );
        assert_eq!(err.code(), ErrorCode::DataLoss);
        if let Some(marker) = kind.host_marker() {
            assert!(!Path::new(marker).exists(), "{kind:?} wrote {marker}");
        }
        assert!(env.store.list().unwrap().is_empty());
        assert!(
            env.snapshot_dirs().is_empty(),
            "{kind:?}: {:?}",
            env.snapshot_dirs()
        );
    }
}

/// Env var telling the re-executed test binary to act as the pulling child.
const CHILD_ENV: &str = "VESSEL_IMAGE_TEST_CHILD_PULL";

/// A pull killed with SIGKILL midway leaves nothing visible, and the next pull
/// (after a restart) completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_pull_is_invisible_and_next_pull_completes() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        // Child: pull whatever the parent says, then linger.
        let (dir, reference) = spec.split_once('|').unwrap();
        let db = vessel_storage::db::Db::open(Path::new(dir).join("state.redb")).unwrap();
        let store = open(Path::new(dir), db);
        let _ = store.pull(reference, &anon()).await;
        std::thread::sleep(Duration::from_secs(60));
        return;
    }
    let reg = TestRegistry::start().unwrap();
    let pushed = testimages::push_random(&reg, "big:1", 4, 8 << 20)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs.d").join(reg.addr());
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::write(
        certs.join("hosts.toml"),
        format!("server = \"{}\"\n", reg.url()),
    )
    .unwrap();

    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "killed_pull_is_invisible_and_next_pull_completes",
            "--nocapture",
        ])
        .env(
            CHILD_ENV,
            format!("{}|{}", dir.path().display(), pushed.reference),
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let ingest = dir.path().join("root/content/ingest");
    let deadline = Instant::now() + Duration::from_secs(30);
    // Kill once a download is under way.
    loop {
        let busy = std::fs::read_dir(&ingest)
            .map(|d| d.flatten().any(|e| e.metadata().is_ok_and(|m| m.len() > 0)))
            .unwrap_or(false);
        if busy {
            break;
        }
        assert!(Instant::now() < deadline, "child never started downloading");
        assert!(child.try_wait().unwrap().is_none(), "child exited early");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    let mut child = Reap(child);
    child.0.wait().unwrap();

    let db = vessel_storage::db::Db::open(dir.path().join("state.redb")).unwrap();
    let store = open(dir.path(), db);
    assert!(
        store.list().unwrap().is_empty(),
        "half-pulled image visible"
    );
    assert!(store.resolve(&pushed.reference).unwrap().is_none());
    assert_eq!(
        std::fs::read_dir(&ingest).unwrap().count(),
        0,
        "ingest leftovers"
    );
    let tmp_left = std::fs::read_dir(dir.path().join("root/snapshots"))
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with('.'));
    assert!(!tmp_left, "snapshot temp dirs left");

    let img = store.pull(&pushed.reference, &anon()).await.unwrap();
    assert_eq!(img.id, pushed.config_digest);
    assert_eq!(store.list().unwrap().len(), 1);
    assert_eq!(store.layer_paths(&img).unwrap().len(), 4);
}

/// Pull + unpack throughput of a ~100 MiB image (4 layers of random data) from the
/// local registry. Prints MiB/s; no assertion on speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "measurement; run with --ignored --nocapture"]
async fn measure_pull_throughput() {
    let reg = TestRegistry::start().unwrap();
    let pushed = testimages::push_random(&reg, "tput:1", 4, 25 << 20)
        .await
        .unwrap();
    let env = Env::new();
    env.plain_http(&reg);
    let t = Instant::now();
    let img = env.store.pull(&pushed.reference, &anon()).await.unwrap();
    let secs = t.elapsed().as_secs_f64();
    let mib = img.size as f64 / (1024.0 * 1024.0);
    println!(
        "pull+unpack of {mib:.1} MiB in {} layers: {secs:.2} s = {:.1} MiB/s",
        img.chain_ids.len(),
        mib / secs
    );
    assert_eq!(env.store.stats().layers_unpacked, 4);
}
