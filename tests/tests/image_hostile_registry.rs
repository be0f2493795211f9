//! Hostile registries through vesseld's socket (issue 27): a token server answering
//! 1 GiB, a blob GET answered 500 with a 1 GiB body. vesseld's peak RSS, its log and
//! the CRI error stay small, and the refused bytes show on /metrics. The registry is
//! a thread of this test on 127.0.0.1 making its bodies on the fly; no VM is booted.
//! (The cases without vesseld, redirects and trickled bodies included, are in
//! image/tests/hostile_registry.rs.)

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vessel_tests::daemon::TestDaemon;
use vessel_tests::probe::{free_port, metric};
use vessel_tests::testimages;

const GIB: u64 = 1 << 30;

type Handler = Arc<dyn Fn(&str, &mut TcpStream) + Send + Sync>;

/// Serves each request (one per connection) with `handler(path, conn)`.
fn serve(handler: Handler) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
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
    port
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

/// 1 GiB of 'x', declared, made on the fly.
fn flood(conn: &mut TcpStream, status: &str) {
    let head = format!("HTTP/1.1 {status}\r\nContent-Length: {GIB}\r\nConnection: close\r\n\r\n");
    if conn.write_all(head.as_bytes()).is_err() {
        return;
    }
    let block = vec![b'x'; 64 << 10];
    for _ in 0..GIB / block.len() as u64 {
        if conn.write_all(&block).is_err() {
            return;
        }
    }
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn huge_token_and_error_bodies_stay_out_of_vesseld() {
    let metrics_port = free_port();
    let d = TestDaemon::start_with(&format!(
        "[metrics]\naddress = \"127.0.0.1:{metrics_port}\"\n"
    ))
    .unwrap();
    let pid = d.pid().unwrap();
    let mut c = d.client().await.unwrap();

    // A token server answering 1 GiB.
    let port = Arc::new(AtomicU16::new(0));
    let p = port.clone();
    let token_reg = serve(Arc::new(move |path: &str, conn: &mut TcpStream| {
        if path == "/v2/" {
            let challenge = format!(
                "WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{}/token\"\r\n",
                p.load(Ordering::Relaxed)
            );
            answer(conn, "401 Unauthorized", &challenge, b"{}");
        } else {
            flood(conn, "200 OK");
        }
    }));
    port.store(token_reg, Ordering::Relaxed);

    // A registry whose blob GET answers 500 and 1 GiB.
    let config = br#"{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":[]}}"#;
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[]}}"#,
        testimages::sha256_digest(config),
        config.len()
    );
    let blob_reg = serve(Arc::new(move |path: &str, conn: &mut TcpStream| {
        if path == "/v2/" {
            answer(conn, "200 OK", "", b"{}");
        } else if path.contains("/manifests/") {
            let ct = "Content-Type: application/vnd.oci.image.manifest.v1+json\r\n";
            answer(conn, "200 OK", ct, manifest.as_bytes());
        } else {
            flood(conn, "500 Internal Server Error");
        }
    }));

    let rss_before = vm_hwm_kib(pid);
    let log_before = d.log().len();
    for (port, what) in [(token_reg, "token"), (blob_reg, "blob error")] {
        let host = format!("127.0.0.1:{port}");
        d.write_hosts_toml(&host, &format!("http://{host}"))
            .unwrap();
        let t = Instant::now();
        let status =
            tokio::time::timeout(Duration::from_secs(60), c.pull(&format!("{host}/app:1")))
                .await
                .expect("PullImage still running after 60 s")
                .expect_err("the pull should fail");
        eprintln!(
            "{what}: {:?} after {:?}, {} bytes: {}",
            status.code(),
            t.elapsed(),
            status.message().len(),
            status.message()
        );
        // A gRPC status from vesseld, not a broken connection.
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            status.message().len() < 4096,
            "{} bytes",
            status.message().len()
        );
        assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    }
    let rss = vm_hwm_kib(pid);
    let logged = d.log().len() - log_before;
    let refused = metric(metrics_port, "vessel_image_registry_refused_bytes_total").unwrap() as u64;
    eprintln!(
        "vesseld peak RSS {rss_before} KiB before, {rss} KiB after; {logged} log bytes \
         (debug level); {refused} bytes refused on /metrics"
    );
    assert!(rss < 256 << 10, "vesseld peak RSS {rss} KiB");
    assert!(logged < 256 << 10, "{logged} log bytes");
    assert!(refused >= 2 * GIB - 4096, "{refused}");
}
