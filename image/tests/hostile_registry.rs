//! Hostile registries (issue 27): a token server or an error answer of 1 GiB, an
//! error body trickled a byte a second, redirects and token realms pointing at local
//! addresses. Every server here is a thread of this process on 127.0.0.1 or
//! 127.0.0.2, writing its bodies on the fly (nothing is held in memory).
//!
//! Each scenario runs in a fresh copy of this test binary (`VESSEL_HOSTILE_CHILD`),
//! so the peak RSS (`VmHWM`) and the log volume it reports are the pull's own.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use vessel_image::{
    registry_bytes_refused, DownloadLimits, ErrorCode, ImageError, ImageLimits, ImageStore,
    ImageStoreConfig, RegistryAuth,
};

const GIB: u64 = 1 << 30;
const CHILD_ENV: &str = "VESSEL_HOSTILE_CHILD";
/// Peak RSS allowed for a child (the test binary, its runtime and servers, one
/// pull). Before the fix a 1 GiB token answer took 2.5 GB.
const MAX_PEAK_RSS_KIB: u64 = 128 << 10;
/// Log bytes (every event, every level) allowed for one hostile pull.
const MAX_LOG_BYTES: u64 = 64 << 10;
/// Longest error message allowed (the CRI adds a hint; gRPC carries it).
const MAX_ERROR_LEN: usize = 2048;

// ---- running a scenario in a child process -------------------------------------

/// Bytes of every tracing event's fields, as a log line would carry them.
struct LogBytes(Arc<AtomicU64>);

struct CountFields<'a>(&'a AtomicU64);

impl tracing::field::Visit for CountFields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let n = format!("{value:?}").len() + field.name().len() + 2;
        self.0.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl tracing::Subscriber for LogBytes {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        span.record(&mut CountFields(&self.0));
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        values.record(&mut CountFields(&self.0));
    }
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        event.record(&mut CountFields(&self.0));
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

/// What a scenario measured.
struct Measured {
    peak_rss_kib: u64,
    log_bytes: u64,
}

/// Runs `scenario` in a child copy of this binary (test `name`), where it gets a
/// runtime, a log counter, and the child's peak RSS and log volume checked after.
fn isolated<F, Fut>(name: &str, scenario: F)
where
    F: FnOnce(Arc<AtomicU64>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if std::env::var(CHILD_ENV).as_deref() == Ok(name) {
        let logged = Arc::new(AtomicU64::new(0));
        tracing::subscriber::set_global_default(LogBytes(logged.clone())).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(scenario(logged.clone()));
        let m = Measured {
            peak_rss_kib: peak_rss_kib(),
            log_bytes: logged.load(Ordering::Relaxed),
        };
        eprintln!(
            "{name}: peak RSS {} KiB, {} log bytes, {} bytes refused by caps",
            m.peak_rss_kib,
            m.log_bytes,
            registry_bytes_refused()
        );
        assert!(
            m.peak_rss_kib < MAX_PEAK_RSS_KIB,
            "peak RSS {} KiB",
            m.peak_rss_kib
        );
        assert!(m.log_bytes < MAX_LOG_BYTES, "{} log bytes", m.log_bytes);
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, name)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{}{stderr}", String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success(), "child {name} failed: {}", out.status);
    // The child ran the scenario (not zero tests).
    assert!(stderr.contains(&format!("{name}: peak RSS")), "{stderr}");
}

// ---- a scriptable registry -----------------------------------------------------

/// A server answering each request (one per connection) with `handler(path, conn)`.
struct Server {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

type Handler = Arc<dyn Fn(&str, &mut TcpStream) + Send + Sync>;

impl Server {
    fn start(bind: &str, handler: Handler) -> Server {
        let listener = TcpListener::bind(bind).unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (accepts.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                a.fetch_add(1, Ordering::Relaxed);
                let handler = handler.clone();
                std::thread::spawn(move || {
                    let mut r = BufReader::new(conn.try_clone().unwrap());
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        head.push_str(&line);
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                    handler(&path, &mut conn);
                });
            }
        });
        Server {
            addr,
            accepts,
            stop,
        }
    }

    fn host(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

fn answer(conn: &mut TcpStream, status: &str, headers: &str, body: &[u8]) {
    let _ = conn.write_all(
        format!(
            "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    let _ = conn.write_all(body);
}

/// `total` bytes of 'x' made on the fly, with or without a Content-Length; adds
/// what the peer took to `written`.
fn flood(conn: &mut TcpStream, status: &str, declared: bool, total: u64, written: &AtomicU64) {
    let len = if declared {
        format!("Content-Length: {total}\r\n")
    } else {
        String::new()
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{len}Connection: close\r\n\r\n"
    );
    if conn.write_all(head.as_bytes()).is_err() {
        return;
    }
    let block = vec![b'x'; 64 << 10];
    let mut sent = 0;
    while sent < total {
        if conn.write_all(&block).is_err() {
            return;
        }
        sent += block.len() as u64;
        written.fetch_add(block.len() as u64, Ordering::Relaxed);
    }
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A valid image: a config, and a manifest with `layers` (descriptors only).
struct Image {
    config: Vec<u8>,
    config_digest: String,
    manifest: Vec<u8>,
    layer_digests: Vec<String>,
}

fn image(layers: usize) -> Image {
    let layer_digests: Vec<String> = (0..layers)
        .map(|i| sha256(format!("layer {i}").as_bytes()))
        .collect();
    let diff_ids: Vec<String> = (0..layers)
        .map(|i| sha256(format!("diff {i}").as_bytes()))
        .collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": layer_digests.iter().map(|d| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": d,
            "size": 1000,
        })).collect::<Vec<_>>(),
    }))
    .unwrap();
    Image {
        config,
        config_digest,
        manifest,
        layer_digests,
    }
}

const MANIFEST_TYPE: &str = "Content-Type: application/vnd.oci.image.manifest.v1+json\r\n";

/// A store with its own certs dir; `hosts` writes `<host>/hosts.toml`.
struct Env {
    dir: tempfile::TempDir,
    store: ImageStore,
}

impl Env {
    fn new(limits: DownloadLimits, downloads: usize) -> Env {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("certs.d")).unwrap();
        let db = vessel_storage::db::Db::open(dir.path().join("state.redb")).unwrap();
        let store = ImageStore::open(
            ImageStoreConfig {
                root: dir.path().join("root"),
                certs_dir: dir.path().join("certs.d"),
                max_concurrent_downloads: downloads,
                download_limits: limits,
                limits: ImageLimits::default(),
            },
            db,
        )
        .unwrap();
        Env { dir, store }
    }

    fn hosts(&self, host: &str, toml: &str) {
        let d = self.dir.path().join("certs.d").join(host);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("hosts.toml"), toml).unwrap();
    }

    /// Pulls `reference`, which must fail within `limit`: Err and how long it took.
    async fn pull_fails(&self, reference: &str, limit: Duration) -> (ImageError, Duration) {
        let t = Instant::now();
        let res = tokio::time::timeout(limit, self.store.pull(reference, &RegistryAuth::default()))
            .await
            .unwrap_or_else(|_| panic!("pull of {reference} still running after {limit:?}"));
        let err = res.expect_err("the pull should fail");
        let took = t.elapsed();
        eprintln!(
            "{reference}: failed after {took:?} ({} bytes): {err}",
            err.to_string().len()
        );
        assert!(
            err.to_string().len() < MAX_ERROR_LEN,
            "error of {} bytes",
            err.to_string().len()
        );
        assert!(
            !err.to_string().contains("xxxxxxxxxx".repeat(120).as_str()),
            "more than a bounded prefix of the body in the error"
        );
        (err, took)
    }
}

// ---- the scenarios -------------------------------------------------------------

/// A token server answering 1 GiB (declared, or streamed without a length): the
/// pull fails at once as ResponseTooLarge, having read at most the 64 KiB cap, and
/// the refused bytes are counted.
#[test]
fn huge_token_answer_is_refused() {
    isolated("huge_token_answer_is_refused", |_| async {
        for declared in [true, false] {
            let written = Arc::new(AtomicU64::new(0));
            let w = written.clone();
            let port = Arc::new(AtomicUsize::new(0));
            let p = port.clone();
            let reg = Server::start(
                "127.0.0.1:0",
                Arc::new(move |path: &str, conn: &mut TcpStream| {
                    if path == "/v2/" {
                        let realm = format!(
                            "WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{}/token\",\
                             service=\"hostile\"\r\n",
                            p.load(Ordering::Relaxed)
                        );
                        answer(conn, "401 Unauthorized", &realm, b"{}");
                    } else if path.starts_with("/token") {
                        flood(conn, "200 OK", declared, GIB, &w);
                    } else {
                        answer(conn, "404 Not Found", "", b"");
                    }
                }),
            );
            port.store(reg.addr.port() as usize, Ordering::Relaxed);
            let env = Env::new(DownloadLimits::default(), 3);
            env.hosts(
                &reg.host(),
                &format!("server = \"http://{}\"\n", reg.host()),
            );
            let before = registry_bytes_refused();
            let (err, took) = env
                .pull_fails(&format!("{}/app:1", reg.host()), Duration::from_secs(60))
                .await;
            let refused = registry_bytes_refused() - before;
            let sent = written.load(Ordering::Relaxed);
            eprintln!("declared={declared}: server wrote {sent} bytes, {refused} refused");
            assert!(
                matches!(
                    &err,
                    ImageError::ResponseTooLarge { body: "token response", limit, .. }
                        if *limit == 64 << 10
                ),
                "{err:?}"
            );
            assert_eq!(err.code(), ErrorCode::Unavailable);
            assert!(took < Duration::from_secs(10), "{took:?}");
            if declared {
                assert!(refused >= GIB, "{refused}");
            } else {
                assert!(refused > 0);
            }
            // Read no further than the socket buffers hold: nowhere near the GiB.
            std::thread::sleep(Duration::from_millis(200));
            assert!(written.load(Ordering::Relaxed) < 64 << 20, "{sent}");
        }
    });
}

/// A blob GET answered 500 with a 1 GiB body (declared, or not): the pull fails
/// with the status and a bounded prefix of the body, quickly, and the log stays
/// small (the child's log counter checks it).
#[test]
fn huge_blob_error_body_is_cut() {
    isolated("huge_blob_error_body_is_cut", |logged| async move {
        for declared in [true, false] {
            let img = image(0);
            let written = Arc::new(AtomicU64::new(0));
            let w = written.clone();
            let manifest = img.manifest.clone();
            let reg = Server::start(
                "127.0.0.1:0",
                Arc::new(move |path: &str, conn: &mut TcpStream| {
                    if path == "/v2/" {
                        answer(conn, "200 OK", "", b"{}");
                    } else if path.contains("/manifests/") {
                        answer(conn, "200 OK", MANIFEST_TYPE, &manifest);
                    } else if path.contains("/blobs/") {
                        flood(conn, "500 Internal Server Error", declared, GIB, &w);
                    } else {
                        answer(conn, "404 Not Found", "", b"");
                    }
                }),
            );
            let env = Env::new(DownloadLimits::default(), 3);
            env.hosts(
                &reg.host(),
                &format!("server = \"http://{}\"\n", reg.host()),
            );
            let before = registry_bytes_refused();
            let logged_before = logged.load(Ordering::Relaxed);
            let (err, took) = env
                .pull_fails(&format!("{}/app:1", reg.host()), Duration::from_secs(60))
                .await;
            let refused = registry_bytes_refused() - before;
            let log = logged.load(Ordering::Relaxed) - logged_before;
            eprintln!(
                "declared={declared}: server wrote {} bytes, {refused} refused, {log} log bytes",
                written.load(Ordering::Relaxed)
            );
            assert_eq!(err.code(), ErrorCode::Unavailable, "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains("HTTP 500"), "{msg}");
            assert!(msg.contains(&img.config_digest), "{msg}");
            assert!(
                msg.contains("more bytes)"),
                "the prefix is marked cut: {msg}"
            );
            assert!(took < Duration::from_secs(10), "{took:?}");
            assert!(log < 16 << 10, "{log} log bytes for one pull");
            if declared {
                assert!(refused >= GIB - 4096, "{refused}");
            } else {
                assert!(refused > 0);
            }
            std::thread::sleep(Duration::from_millis(200));
            assert!(written.load(Ordering::Relaxed) < 64 << 20);
        }
    });
}

/// A layer whose blob GET answers 500 and then trickles its body one byte a second
/// (declaring 1 MB) holds the only download slot for the error-body deadline only,
/// not the 30 s rate window (nor forever, as before): the pull fails in seconds.
#[test]
fn trickled_error_body_ends_in_seconds() {
    isolated("trickled_error_body_ends_in_seconds", |_| async {
        let img = image(1);
        let layer = img.layer_digests[0].clone();
        let (manifest, config, config_digest) = (
            img.manifest.clone(),
            img.config.clone(),
            img.config_digest.clone(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let reg = Server::start(
            "127.0.0.1:0",
            Arc::new(move |path: &str, conn: &mut TcpStream| {
                if path == "/v2/" {
                    answer(conn, "200 OK", "", b"{}");
                } else if path.contains("/manifests/") {
                    answer(conn, "200 OK", MANIFEST_TYPE, &manifest);
                } else if path.ends_with(&config_digest) {
                    answer(conn, "200 OK", "", &config);
                } else if path.ends_with(&layer) {
                    let _ = conn.write_all(
                        b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 1000000\r\n\r\n",
                    );
                    while !s.load(Ordering::Relaxed) {
                        if conn.write_all(b"x").is_err() {
                            return;
                        }
                        std::thread::sleep(Duration::from_secs(1));
                    }
                } else {
                    answer(conn, "404 Not Found", "", b"");
                }
            }),
        );
        // The default rate check: 10 KiB/s over 30 s windows.
        let env = Env::new(DownloadLimits::default(), 1);
        env.hosts(
            &reg.host(),
            &format!("server = \"http://{}\"\n", reg.host()),
        );
        let (err, took) = env
            .pull_fails(&format!("{}/app:1", reg.host()), Duration::from_secs(90))
            .await;
        stop.store(true, Ordering::Relaxed);
        assert_eq!(err.code(), ErrorCode::Unavailable, "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("HTTP 500") && msg.contains("cut off after 5s"),
            "{msg}"
        );
        assert!(took < Duration::from_secs(15), "{took:?}");
    });
}

/// A registry not configured local sends the blob GET (or its token realm) to
/// 127.0.0.2 or to `localhost`: refused before any connection there. With
/// `local = true` in its hosts.toml the same redirect is followed.
#[test]
fn redirects_to_local_addresses_are_refused() {
    isolated("redirects_to_local_addresses_are_refused", |_| async {
        let img = image(0);
        // The target: serves the config, counts connections.
        let config = img.config.clone();
        let target = Server::start(
            "127.0.0.2:0",
            Arc::new(move |_: &str, conn: &mut TcpStream| answer(conn, "200 OK", "", &config)),
        );
        let by_name = Server::start(
            "127.0.0.1:0",
            Arc::new(|_: &str, conn: &mut TcpStream| answer(conn, "200 OK", "", b"")),
        );
        let locations = [
            format!("http://{}/blob", target.host()),
            format!("http://localhost:{}/blob", by_name.addr.port()),
        ];
        for (i, location) in locations.iter().enumerate() {
            let manifest = img.manifest.clone();
            let location = location.clone();
            let reg = Server::start(
                "127.0.0.1:0",
                Arc::new(move |path: &str, conn: &mut TcpStream| {
                    if path == "/v2/" {
                        answer(conn, "200 OK", "", b"{}");
                    } else if path.contains("/manifests/") {
                        answer(conn, "200 OK", MANIFEST_TYPE, &manifest);
                    } else if path.contains("/blobs/") {
                        answer(
                            conn,
                            "307 Temporary Redirect",
                            &format!("Location: {location}\r\n"),
                            b"",
                        );
                    } else {
                        answer(conn, "404 Not Found", "", b"");
                    }
                }),
            );
            let reference = format!("{}/app:1", reg.host());
            let seen = target.accepts.load(Ordering::Relaxed);
            let env = Env::new(DownloadLimits::default(), 3);
            env.hosts(
                &reg.host(),
                &format!("server = \"http://{}\"\n", reg.host()),
            );
            let (err, _) = env.pull_fails(&reference, Duration::from_secs(30)).await;
            match &err {
                ImageError::RedirectRefused { target, reason, .. } => {
                    assert_eq!(*reason, "loopback", "{err}");
                    assert!(target.contains(&locations[i]), "{err}");
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(err.code(), ErrorCode::Unavailable);
            assert!(err.to_string().contains("local = true"), "{err}");
            assert_eq!(target.accepts.load(Ordering::Relaxed), seen);
            assert_eq!(by_name.accepts.load(Ordering::Relaxed), 0);

            if i == 0 {
                // Configured local, the redirect is followed and the pull completes.
                env.hosts(
                    &reg.host(),
                    &format!("server = \"http://{}\"\nlocal = true\n", reg.host()),
                );
                let pulled = env
                    .store
                    .pull(&reference, &RegistryAuth::default())
                    .await
                    .unwrap();
                assert_eq!(pulled.id, img.config_digest);
                assert_eq!(target.accepts.load(Ordering::Relaxed), seen + 1);
            }
        }

        // A token realm on 127.0.0.2 is refused the same way.
        let realm = format!("http://{}/token", target.host());
        let before = target.accepts.load(Ordering::Relaxed);
        let reg = Server::start(
            "127.0.0.1:0",
            Arc::new(move |path: &str, conn: &mut TcpStream| {
                let challenge = format!("WWW-Authenticate: Bearer realm=\"{realm}\"\r\n");
                answer(conn, "401 Unauthorized", &challenge, b"{}");
                let _ = path;
            }),
        );
        let env = Env::new(DownloadLimits::default(), 3);
        env.hosts(
            &reg.host(),
            &format!("server = \"http://{}\"\n", reg.host()),
        );
        let (err, _) = env
            .pull_fails(&format!("{}/app:1", reg.host()), Duration::from_secs(30))
            .await;
        assert!(
            matches!(
                &err,
                ImageError::RedirectRefused {
                    reason: "loopback",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("token server"), "{err}");
        assert_eq!(target.accepts.load(Ordering::Relaxed), before);
    });
}
