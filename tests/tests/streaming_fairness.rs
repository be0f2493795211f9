//! Streaming fairness (issue 27): one client holding idle sessions into pod A must
//! not leave pod B without exec. With only the node-wide `max_sessions` semaphore,
//! A's idle sessions took every permit and B's exec got "too many streaming
//! sessions"; now A is refused at its `max_sessions_per_pod` share (429, naming
//! the key) and B's exec runs.

mod runtime_common;

use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use runtime_common::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use vessel_streamproto::k8s;
use vessel_streamproto::spdy::session::{Limits, Role, Session, Stream};
use vessel_streamproto::spdy::Headers;
use vessel_tests::cri::CriClient;
use vessel_tests::probe::{free_port, metric_in as metric, metrics_text as metrics};
use vessel_tests::streaming::*;

const MAX_SESSIONS: usize = 8;
const PER_POD: usize = 4;

/// A refused upgrade: the HTTP status and body.
#[derive(Debug)]
struct Refusal {
    code: u16,
    body: String,
}

/// Upgrades `url` to SPDY offering `protocol`, or returns what the server said.
async fn upgrade(url: &str, protocol: &str) -> Result<Session, Refusal> {
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest.split_once('/').unwrap();
    let mut tcp = TcpStream::connect(host).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let req = format!(
        "POST /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\
         {}: {protocol}\r\nContent-Length: 0\r\n\r\n",
        k8s::PROTOCOL_HEADER
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    // Byte by byte: after a 101 what follows is SPDY.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tcp.read_u8().await.expect("response head"));
        assert!(head.len() < 16 * 1024, "response head too long");
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let code: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head}"));
    if code == 101 {
        let (session, _) = Session::start(tcp, Role::Client, Limits::default());
        return Ok(session);
    }
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    tcp.read_exact(&mut body).await.unwrap();
    Err(Refusal {
        code,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

async fn port_forward_url(c: &mut CriClient, pod: &str) -> String {
    c.runtime
        .port_forward(cri::PortForwardRequest {
            pod_sandbox_id: pod.into(),
            port: vec![],
        })
        .await
        .expect("PortForward")
        .into_inner()
        .url
}

async fn exec_url(c: &mut CriClient, ctr: &str, cmd: &[&str], stdin: bool) -> String {
    c.runtime
        .exec(cri::ExecRequest {
            container_id: ctr.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            stdin,
            stdout: true,
            ..Default::default()
        })
        .await
        .expect("Exec")
        .into_inner()
        .url
}

/// An open session into pod A and the streams that keep it busy.
struct Held {
    session: Session,
    _streams: Vec<Stream>,
}

/// Opens sessions into pod A until one is refused (at most `MAX_SESSIONS` + 1
/// tries): first an `exec -i` that never ends (`cat` on an open stdin), then idle
/// port-forwards, the two floods of the issue. Returns the held sessions and the
/// refusal.
async fn flood(c: &mut CriClient, pod: &str, ctr: &str) -> (Vec<Held>, Option<Refusal>) {
    let mut held = Vec::new();
    for i in 0..=MAX_SESSIONS {
        let r = if i == 0 {
            let url = exec_url(c, ctr, &["cat"], true).await;
            match upgrade(&url, "v4.channel.k8s.io").await {
                Ok(session) => {
                    let open = |t: &'static str| {
                        session.open(Headers::new().with(k8s::STREAM_TYPE_HEADER, t))
                    };
                    let streams = vec![
                        open("error").await.unwrap(),
                        open("stdin").await.unwrap(),
                        open("stdout").await.unwrap(),
                    ];
                    Ok(Held {
                        session,
                        _streams: streams,
                    })
                }
                Err(e) => Err(e),
            }
        } else {
            let url = port_forward_url(c, pod).await;
            upgrade(&url, "portforward.k8s.io")
                .await
                .map(|session| Held {
                    session,
                    _streams: vec![],
                })
        };
        match r {
            Ok(h) => held.push(h),
            Err(refusal) => return (held, Some(refusal)),
        }
    }
    (held, None)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flooded_pod_does_not_block_another_pods_exec() {
    let mport = free_port();
    let Some((_reg, d, mut c, image)) = setup_with(
        &format!(
            "\n[streaming]\nmax_sessions = {MAX_SESSIONS}\nmax_sessions_per_pod = {PER_POD}\n\n\
             [metrics]\naddress = \"127.0.0.1:{mport}\"\n"
        ),
        "fair/busybox:1",
    )
    .await
    else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_owned());
    let mut ids = Vec::new();
    for name in ["a", "b"] {
        let logs = d.dir().join(format!("logs/{name}"));
        let pod_cfg = pod_config(name, &logs);
        let pod = run_pod(&mut c, &pod_cfg, "").await.unwrap();
        let ctr = run_container(
            &mut c,
            &pod,
            &pod_cfg,
            container_config("main", &image, &["sleep", "3600"]),
        )
        .await;
        ids.push((pod, ctr));
    }
    let (pod_a, ctr_a) = ids[0].clone();
    let (pod_b, ctr_b) = ids[1].clone();

    let (held, refusal) = flood(&mut c, &pod_a, &ctr_a).await;
    let opened = held.len();
    eprintln!("pod A: {opened} sessions open, then {refusal:?}");

    // The neighbour's exec runs while A's sessions are held. Under the old single
    // node semaphore A held all MAX_SESSIONS permits and this was refused.
    let url = exec_url(&mut c, &ctr_b, &["echo", "hello-from-b"], false).await;
    let t = Instant::now();
    let out = spdy_exec(&url, ExecInput::default())
        .await
        .unwrap_or_else(|e| panic!("pod B's exec while A is flooded: {e}"));
    eprintln!("pod B's exec during A's flood: {:?}", t.elapsed());
    assert_eq!(out.exit_code(), Some(0), "{out:?}");
    assert_eq!(out.stdout, b"hello-from-b\n");

    // A was refused at its share, with 429 naming the key.
    assert_eq!(opened, PER_POD, "sessions into A before a refusal");
    let refusal = refusal.expect("A was never refused");
    assert_eq!(refusal.code, 429, "{refusal:?}");
    assert!(
        refusal.body.contains("max_sessions_per_pod = 4"),
        "{refusal:?}"
    );

    // /metrics: A's open sessions, the refusal by reason, and no label kept for B
    // (its exec is over; the gauge drops a pod at 0).
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = metrics(mport);
        if !text.contains(&format!("pod=\"{pod_b}\"")) || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let gauge_a = format!("vessel_streaming_sessions{{pod=\"{pod_a}\"}}");
    assert_eq!(metric(&text, &gauge_a), Some(PER_POD as f64), "{text}");
    assert!(
        !text.contains(&format!("vessel_streaming_sessions{{pod=\"{pod_b}\"}}")),
        "B's gauge kept at 0: {text}"
    );
    let refused = "vessel_streaming_sessions_refused_total{reason=\"pod_cap\"}";
    assert_eq!(metric(&text, refused), Some(1.0), "{text}");

    // Closing A's sessions gives its share back (and drops its gauge label).
    for h in held {
        h.session.close().await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = metrics(mport);
        if metric(&text, &gauge_a).is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A's sessions not released: {text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (again, refusal) = flood(&mut c, &pod_a, &ctr_a).await;
    assert_eq!(
        again.len(),
        PER_POD,
        "A after closing its sessions: {refusal:?}"
    );
    for h in again {
        h.session.close().await;
    }

    for (pod, _) in &ids {
        remove_pod(&mut c, pod).await;
    }
    let text = metrics(mport);
    assert!(
        !text.contains("vessel_streaming_sessions{"),
        "gauge labels left after the pods went: {text}"
    );
    assert_no_leaks(&d);
}
