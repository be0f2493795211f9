//! Registries and layers are untrusted: slow registries, header bombs, mirrors that
//! must not see credentials, and snapshots other host users must not reach. Every
//! server is on 127.0.0.1.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vessel_image::{
    DownloadLimits, ErrorCode, ImageError, ImageLimits, ImageStore, ImageStoreConfig, RegistryAuth,
};
use vessel_tests::registry::TestRegistry;
use vessel_tests::testimages::{self, Layer, LayerCompression, TarBuilder};

struct Env {
    dir: tempfile::TempDir,
    store: ImageStore,
}

impl Env {
    fn new(limits: DownloadLimits, downloads: usize) -> Self {
        Self::with_limits(limits, downloads, ImageLimits::default())
    }

    fn with_limits(limits: DownloadLimits, downloads: usize, image_limits: ImageLimits) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("certs.d")).unwrap();
        let db = vessel_storage::db::Db::open(dir.path().join("state.redb")).unwrap();
        let store = ImageStore::open(
            ImageStoreConfig {
                root: dir.path().join("root"),
                certs_dir: dir.path().join("certs.d"),
                max_concurrent_downloads: downloads,
                download_limits: limits,
                limits: image_limits,
            },
            db,
        )
        .unwrap();
        Env { dir, store }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn hosts(&self, host: &str, toml: &str) {
        let d = self.dir.path().join("certs.d").join(host);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("hosts.toml"), toml).unwrap();
    }
}

fn dead_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Reads one request head (up to the blank line); None at EOF.
fn read_head(r: &mut BufReader<TcpStream>) -> Option<String> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        head.push_str(&line);
        if line == "\r\n" || line == "\n" {
            return Some(head);
        }
    }
}

/// Forwards one request to `backend` with `Connection: close` and copies the whole
/// answer back.
fn forward(head: &str, client: &mut TcpStream, backend: &str) {
    let Ok(mut up) = TcpStream::connect(backend) else {
        return;
    };
    let head = head.trim_end_matches("\r\n").trim_end_matches("\r\n");
    let head: String = head
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    if up
        .write_all(format!("{head}Connection: close\r\n\r\n").as_bytes())
        .is_err()
    {
        return;
    }
    let _ = std::io::copy(&mut up, client);
}

/// What a [`Proxy`] does with requests whose path contains a pattern.
#[derive(Clone, Copy)]
enum Mode {
    /// Forward everything.
    Forward,
    /// Headers, then one byte a second.
    Trickle(&'static str),
    /// 64 MiB of manifest, with or without a Content-Length.
    Flood(&'static str, bool),
}

/// A proxy in front of `backend`: records every request head it receives, and
/// answers requests matching its [`Mode`] itself.
struct Proxy {
    port: u16,
    heads: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn start(backend: String, mode: Mode) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s) = (heads.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let (h, s, backend) = (h.clone(), s.clone(), backend.clone());
                std::thread::spawn(move || {
                    let mut r = BufReader::new(conn.try_clone().unwrap());
                    let Some(head) = read_head(&mut r) else {
                        return;
                    };
                    h.lock().unwrap().push(head.clone());
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                    if let Mode::Flood(p, declared) = mode {
                        if path.contains(p) {
                            let len = if declared {
                                "Content-Length: 67108864\r\n"
                            } else {
                                "Connection: close\r\n"
                            };
                            let _ = conn.write_all(
                                format!(
                                    "HTTP/1.1 200 OK\r\nContent-Type: \
                                     application/vnd.oci.image.manifest.v1+json\r\n{len}\r\n"
                                )
                                .as_bytes(),
                            );
                            let block = vec![b' '; 64 << 10];
                            for _ in 0..1024 {
                                if conn.write_all(&block).is_err() {
                                    return;
                                }
                            }
                            return;
                        }
                    }
                    if matches!(mode, Mode::Trickle(t) if path.contains(t)) {
                        let _ = conn.write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                              Content-Length: 1000000\r\n\r\n",
                        );
                        while !s.load(Ordering::Relaxed) {
                            if conn.write_all(b"x").is_err() {
                                return;
                            }
                            std::thread::sleep(Duration::from_secs(1));
                        }
                        return;
                    }
                    forward(&head, &mut conn, &backend);
                });
            }
        });
        Proxy { port, heads, stop }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Request heads with an Authorization header.
    fn authorized(&self) -> Vec<String> {
        self.heads
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.to_ascii_lowercase().contains("\nauthorization:"))
            .cloned()
            .collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// A registry that trickles one byte a second holds a download permit only for its
/// rate window: its pull fails with DeadlineExceeded after about one window, and a
/// pull from a healthy registry started at the same time (behind the only permit)
/// completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trickling_registry_fails_within_its_window() {
    let reg = TestRegistry::start().unwrap();
    let slow_img = testimages::push_busybox(&reg, "slow/app:1").await.unwrap();
    let healthy = testimages::push_random(&reg, "healthy:1", 1, 256 << 10)
        .await
        .unwrap();
    let window = Duration::from_secs(3);
    let env = Env::new(
        DownloadLimits {
            min_rate: 64 << 10,
            window,
        },
        1,
    );
    env.hosts(&reg.addr(), &format!("server = \"{}\"\n", reg.url()));
    // Only the layer trickles (the config is small and fetched without a permit).
    let layer: &'static str = Box::leak(slow_img.layer_digests[0].clone().into_boxed_str());
    let blobs = Proxy::start(reg.addr(), Mode::Trickle(layer));
    env.hosts(&blobs.addr(), &format!("server = \"{}\"\n", blobs.url()));
    let slow_ref = slow_img.reference.replace(&reg.addr(), &blobs.addr());

    let t0 = Instant::now();
    let slow = {
        let store = env.store.clone();
        tokio::spawn(async move {
            let r = store.pull(&slow_ref, &RegistryAuth::default()).await;
            (r, t0.elapsed())
        })
    };
    // Let the slow pull take the only download permit first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ok = env
        .store
        .pull(&healthy.reference, &RegistryAuth::default())
        .await
        .unwrap();
    let healthy_done = t0.elapsed();
    assert_eq!(ok.id, healthy.config_digest);
    let (res, slow_done) = slow.await.unwrap();
    let err = res.unwrap_err();
    eprintln!(
        "trickle failed after {slow_done:?}: {err}; healthy pull done after {healthy_done:?}"
    );
    assert_eq!(err.code(), ErrorCode::DeadlineExceeded, "{err:?}");
    assert!(matches!(err, ImageError::TooSlow(_)), "{err:?}");
    assert!(err.to_string().contains("below the minimum"), "{err}");
    assert!(slow_done < window * 3, "{slow_done:?}");
    assert!(healthy_done < window * 4, "{healthy_done:?}");

    // A manifest that trickles fails after two windows.
    let manifests = Proxy::start(reg.addr(), Mode::Trickle("/manifests/"));
    env.hosts(
        &manifests.addr(),
        &format!("server = \"{}\"\n", manifests.url()),
    );
    let t = Instant::now();
    let err = env
        .store
        .pull(
            &format!("{}/slow/app:1", manifests.addr()),
            &RegistryAuth::default(),
        )
        .await
        .unwrap_err();
    eprintln!("trickled manifest failed after {:?}: {err}", t.elapsed());
    assert_eq!(err.code(), ErrorCode::DeadlineExceeded, "{err:?}");
    assert!(t.elapsed() < window * 3, "{:?}", t.elapsed());
}

/// A manifest over 4 MiB is refused while it streams, whether or not its length is
/// declared up front.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_manifests_are_refused_while_streaming() {
    let reg = TestRegistry::start().unwrap();
    testimages::push_busybox(&reg, "app:1").await.unwrap();
    let env = Env::new(DownloadLimits::default(), 3);
    for declared in [true, false] {
        let flood = Proxy::start(reg.addr(), Mode::Flood("/manifests/", declared));
        env.hosts(&flood.addr(), &format!("server = \"{}\"\n", flood.url()));
        let t = Instant::now();
        let err = env
            .store
            .pull(&format!("{}/app:1", flood.addr()), &RegistryAuth::default())
            .await
            .unwrap_err();
        eprintln!(
            "declared={declared}: refused after {:?}: {err}",
            t.elapsed()
        );
        assert!(err.to_string().contains("manifest too large"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(10));
    }
}

/// Credentials go to a mirror only when its hosts.toml table opts in.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credentials_reach_only_opted_in_mirrors() {
    let reg = TestRegistry::start_with_htpasswd("alice", "s3cret").unwrap();
    let pushed = testimages::push_busybox(&reg, "private/app:1")
        .await
        .unwrap();
    let mirror = Proxy::start(reg.addr(), Mode::Forward);
    let creds = RegistryAuth {
        username: Some("alice".into()),
        password: Some("s3cret".into()),
        ..Default::default()
    };
    // The image names a registry whose server is a closed port: only the mirror can
    // serve it.
    let name = "creds.example";
    let reference = pushed.reference.replace(&reg.addr(), name);
    let hosts = |opt_in: &str| {
        format!(
            "server = \"https://127.0.0.1:{}\"\n[host.\"{}\"]\n{opt_in}",
            dead_port(),
            mirror.url()
        )
    };

    let env = Env::new(DownloadLimits::default(), 3);
    env.hosts(name, &hosts(""));
    let err = env.store.pull(&reference, &creds).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unauthenticated, "{err:?}");
    assert!(err.to_string().contains("send_credentials"), "{err}");
    assert!(
        mirror.authorized().is_empty(),
        "mirror got credentials: {:?}",
        mirror.authorized()
    );
    assert!(!mirror.heads.lock().unwrap().is_empty(), "mirror was asked");

    env.hosts(name, &hosts("send_credentials = true\n"));
    let img = env.store.pull(&reference, &creds).await.unwrap();
    assert_eq!(img.id, pushed.config_digest);
    let authorized = mirror.authorized();
    assert!(!authorized.is_empty());
    assert!(
        authorized
            .iter()
            .all(|h| h.to_ascii_lowercase().contains("authorization: basic")),
        "{authorized:?}"
    );
}

/// A 1.5 GiB GNU long name in a ~1.5 MiB gzip layer: the pull fails as DataLoss,
/// naming the limit, and leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn header_bomb_layer_fails_the_pull() {
    let reg = TestRegistry::start().unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_path("././@LongLink").unwrap();
    h.set_entry_type(tar::EntryType::GNULongName);
    h.set_size(3 << 29);
    h.set_cksum();
    let gz = |data: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    };
    let mut data = gz(h.as_bytes());
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(&vec![0u8; 1 << 20]).unwrap();
    let chunk = e.finish().unwrap();
    for _ in 0..1536 {
        data.extend_from_slice(&chunk);
    }
    let layer = Layer {
        media_type: LayerCompression::Gzip.media_type(),
        digest: testimages::sha256_digest(&data),
        // Never reached: the unpack stops at the header.
        diff_id: testimages::sha256_digest(b"not the tar"),
        data,
    };
    eprintln!("bomb layer: {} bytes of gzip", layer.data.len());
    let pushed = testimages::push_layers(&reg, "bomb:1", vec![layer])
        .await
        .unwrap();
    let env = Env::new(DownloadLimits::default(), 3);
    env.hosts(&reg.addr(), &format!("server = \"{}\"\n", reg.url()));
    let t = Instant::now();
    let err = env
        .store
        .pull(&pushed.reference, &RegistryAuth::default())
        .await
        .unwrap_err();
    eprintln!("bomb refused after {:?}: {err}", t.elapsed());
    assert_eq!(err.code(), ErrorCode::DataLoss, "{err:?}");
    assert!(
        err.to_string().contains("GNU long name") && err.to_string().contains("1048576"),
        "{err}"
    );
    assert!(env.store.list().unwrap().is_empty());
    let snaps: Vec<_> = std::fs::read_dir(env.root().join("snapshots"))
        .unwrap()
        .collect();
    assert!(snaps.is_empty(), "{snaps:?}");
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Runs `stat` on `path` as uid/gid 65534 (nobody); returns its stderr on failure.
fn stat_as_nobody(path: &Path) -> Result<(), String> {
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "stat",
            "--",
        ])
        .arg(path)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The store's dirs are private: a layer's setuid-root binary and device node exist
/// in its snapshot but another host user cannot reach them, even when the root dir
/// above is traversable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshots_are_private() {
    if !rustix::process::geteuid().is_root() {
        // Passing without checking anything would hide a regression.
        assert!(
            std::env::var_os("VESSEL_SKIP_VM").is_some(),
            "needs root (setuid ownership, mknod, setpriv); set VESSEL_SKIP_VM=1 to skip"
        );
        eprintln!("SKIPPED (VESSEL_SKIP_VM): needs root");
        return;
    }
    let reg = TestRegistry::start().unwrap();
    let mut b = TarBuilder::new();
    b.dir("bin/", 0o755).unwrap();
    b.file("bin/su", b"#!/bin/sh\n", 0o4755).unwrap();
    let mut tar = b.finish().unwrap();
    // A device node (1:3, like /dev/null), spliced before the end-of-archive blocks.
    let mut h = tar::Header::new_gnu();
    h.set_path("dev-null").unwrap();
    h.set_entry_type(tar::EntryType::Char);
    h.set_size(0);
    h.set_mode(0o666);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    h.set_cksum();
    let end = tar.len() - 1024;
    tar.splice(end..end, h.as_bytes().iter().copied());
    let layer = Layer::new(tar, LayerCompression::Gzip).unwrap();
    let pushed = testimages::push_layers(&reg, "suid:1", vec![layer])
        .await
        .unwrap();
    let env = Env::new(DownloadLimits::default(), 3);
    env.hosts(&reg.addr(), &format!("server = \"{}\"\n", reg.url()));
    let img = env
        .store
        .pull(&pushed.reference, &RegistryAuth::default())
        .await
        .unwrap();

    let root = env.root();
    assert_eq!(mode(&root), 0o700);
    assert_eq!(mode(&root.join("content")), 0o700);
    assert_eq!(mode(&root.join("snapshots")), 0o700);
    let snap = env.store.layer_paths(&img).unwrap().remove(0);
    let su = snap.join("bin/su");
    let dev = snap.join("dev-null");
    assert_eq!(mode(&su), 0o4755);
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &std::fs::symlink_metadata(&dev).unwrap().file_type()
    ));
    // Open every dir above the store to others, as a careless admin might.
    let mut p = root.clone();
    loop {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        if p == env.dir.path() {
            break;
        }
        p = p.parent().unwrap().to_path_buf();
    }
    std::fs::create_dir_all(root.join("probe")).unwrap();
    stat_as_nobody(&root.join("probe")).expect("setpriv works and root is traversable");
    for path in [&su, &dev, &snap] {
        let err = stat_as_nobody(path).expect_err("reachable by nobody");
        assert!(err.contains("Permission denied"), "{path:?}: {err}");
    }
    // The store tightens a loosened dir again when it opens.
    std::fs::set_permissions(
        root.join("snapshots"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let db = vessel_storage::db::Db::open(env.dir.path().join("state2.redb")).unwrap();
    let _again = ImageStore::open(env.store.config().clone(), db).unwrap();
    assert_eq!(mode(&root.join("snapshots")), 0o700);
    assert_eq!(mode(&root), 0o700);
}

/// A gzip layer with one file `name` of `size` zero bytes (~1 KiB of gzip per MiB,
/// so 20 GiB is ~20 MiB). Its diff id is made up: the unpack never gets that far.
fn zeros_layer(name: &str, size: u64) -> Layer {
    let mut h = tar::Header::new_gnu();
    h.set_path(name).unwrap();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    let gz = |data: &[u8], level| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), level);
        e.write_all(data).unwrap();
        e.finish().unwrap()
    };
    let mut data = gz(h.as_bytes(), flate2::Compression::fast());
    let chunk = gz(&vec![0u8; 1 << 20], flate2::Compression::best());
    for _ in 0..size >> 20 {
        data.extend_from_slice(&chunk);
    }
    data.extend_from_slice(&gz(&[0u8; 1024], flate2::Compression::fast()));
    Layer {
        media_type: LayerCompression::Gzip.media_type(),
        digest: testimages::sha256_digest(&data),
        diff_id: testimages::sha256_digest(name.as_bytes()),
        data,
    }
}

fn limits(max_unpacked_bytes: u64, max_image_entries: u64, max_layers: usize) -> ImageLimits {
    ImageLimits {
        max_unpacked_bytes,
        max_image_entries,
        max_layers,
    }
}

fn snapshot_dirs(env: &Env) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(env.root().join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn assert_limit(err: &ImageError, want_key: &str, want_limit: u64) {
    assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err:?}");
    match err {
        ImageError::LimitExceeded { key, limit, .. } => {
            assert_eq!((*key, *limit), (want_key, want_limit), "{err}");
        }
        other => panic!("{other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(want_key) && msg.contains(&want_limit.to_string()),
        "{msg}"
    );
}

/// The layer of issue 26: 20 GiB of zeros in ~20 MiB of gzip. Refused as soon as
/// the byte limit is crossed, inside the file, and nothing stays on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zero_bomb_layer_stops_at_the_byte_limit() {
    let reg = TestRegistry::start().unwrap();
    let layer = zeros_layer("zeros", 20 << 30);
    eprintln!("zeros layer: {} bytes of gzip", layer.data.len());
    let pushed = testimages::push_layers(&reg, "zeros:1", vec![layer])
        .await
        .unwrap();
    let cap = 16 << 20;
    let env = Env::with_limits(DownloadLimits::default(), 3, limits(cap, 1000, 10));
    env.hosts(&reg.addr(), &format!("server = \"{}\"\n", reg.url()));
    let t = Instant::now();
    let err = env
        .store
        .pull(&pushed.reference, &RegistryAuth::default())
        .await
        .unwrap_err();
    eprintln!("zeros refused after {:?}: {err}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    assert_limit(&err, "image.max_unpacked_bytes", cap);
    assert!(err.to_string().contains(&pushed.reference), "{err}");
    assert!(env.store.list().unwrap().is_empty());
    assert!(snapshot_dirs(&env).is_empty(), "{:?}", snapshot_dirs(&env));
}

/// Two bomb layers unpacking at once draw from one budget: when one crosses it the
/// other stops too, and when the pull returns neither has left a pending snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn layers_of_one_pull_share_the_byte_limit() {
    let reg = TestRegistry::start().unwrap();
    let layers = vec![zeros_layer("a", 4 << 30), zeros_layer("b", 4 << 30)];
    let pushed = testimages::push_layers(&reg, "zeros2:1", layers)
        .await
        .unwrap();
    let cap = 16 << 20;
    let env = Env::with_limits(DownloadLimits::default(), 3, limits(cap, 1000, 10));
    env.hosts(&reg.addr(), &format!("server = \"{}\"\n", reg.url()));
    let err = env
        .store
        .pull(&pushed.reference, &RegistryAuth::default())
        .await
        .unwrap_err();
    assert_limit(&err, "image.max_unpacked_bytes", cap);
    assert!(env.store.list().unwrap().is_empty());
    assert!(snapshot_dirs(&env).is_empty(), "{:?}", snapshot_dirs(&env));
}

/// A layer of many empty files is refused at the entry limit, leaving nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn entry_bomb_layer_stops_at_the_entry_limit() {
    let reg = TestRegistry::start().unwrap();
    let mut b = TarBuilder::new();
    b.dir("many/", 0o755).unwrap();
    for i in 0..5000 {
        b.file(&format!("many/{i}"), b"", 0o644).unwrap();
    }
    let layer = Layer::new(b.finish().unwrap(), LayerCompression::Gzip).unwrap();
    let pushed = testimages::push_layers(&reg, "many:1", vec![layer])
        .await
        .unwrap();
    let env = Env::with_limits(DownloadLimits::default(), 3, limits(1 << 30, 1000, 10));
    env.hosts(&reg.addr(), &format!("server = \"{}\"\n", reg.url()));
    let err = env
        .store
        .pull(&pushed.reference, &RegistryAuth::default())
        .await
        .unwrap_err();
    assert_limit(&err, "image.max_image_entries", 1000);
    assert!(env.store.list().unwrap().is_empty());
    assert!(snapshot_dirs(&env).is_empty(), "{:?}", snapshot_dirs(&env));

    // The same image within the limits pulls.
    let env = Env::with_limits(DownloadLimits::default(), 3, limits(1 << 30, 5001, 10));
    env.hosts(&reg.addr(), &format!("server = \"{}\"\n", reg.url()));
    env.store
        .pull(&pushed.reference, &RegistryAuth::default())
        .await
        .unwrap();
}

/// A manifest with more layers than the limit is refused before any blob (config
/// included) is downloaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn too_many_layers_are_refused_before_any_download() {
    let reg = TestRegistry::start().unwrap();
    let layers = (0..3)
        .map(|i| {
            let mut b = TarBuilder::new();
            b.file(&format!("f{i}"), b"x", 0o644).unwrap();
            Layer::new(b.finish().unwrap(), LayerCompression::Gzip).unwrap()
        })
        .collect();
    let pushed = testimages::push_layers(&reg, "layers:3", layers)
        .await
        .unwrap();
    let env = Env::with_limits(DownloadLimits::default(), 3, limits(1 << 30, 1000, 2));
    env.hosts(&reg.addr(), &format!("server = \"{}\"\n", reg.url()));
    let err = env
        .store
        .pull(&pushed.reference, &RegistryAuth::default())
        .await
        .unwrap_err();
    assert_limit(&err, "image.max_layers", 2);
    assert!(err.to_string().contains("(3)"), "{err}");
    assert_eq!(env.store.stats().blobs_downloaded, 0);
    assert!(env.store.list().unwrap().is_empty());
    assert!(snapshot_dirs(&env).is_empty());

    let env = Env::with_limits(DownloadLimits::default(), 3, limits(1 << 30, 1000, 3));
    env.hosts(&reg.addr(), &format!("server = \"{}\"\n", reg.url()));
    let img = env
        .store
        .pull(&pushed.reference, &RegistryAuth::default())
        .await
        .unwrap();
    assert_eq!(img.chain_ids.len(), 3);
}
