//! Exec, Attach and PortForward end to end: CRI call → URL → our own SPDY and
//! WebSocket clients → vesseld's streaming server → the agent in a real pod VM.

mod runtime_common;

use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use runtime_common::*;
use sha2::{Digest as _, Sha256};
use vessel_streamproto::k8s::TerminalSize;
use vessel_tests::cri::CriClient;
use vessel_tests::streaming::*;

async fn exec_url(c: &mut CriClient, id: &str, cmd: &[&str], input: &ExecInput) -> String {
    c.runtime
        .exec(cri::ExecRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            tty: input.tty,
            stdin: input.stdin.is_some(),
            stdout: true,
            stderr: input.stderr && !input.tty,
        })
        .await
        .expect("Exec")
        .into_inner()
        .url
}

/// Runs `cmd` through both transports and checks each outcome with `check`.
async fn both(
    c: &mut CriClient,
    id: &str,
    cmd: &[&str],
    input: ExecInput,
    check: impl Fn(&str, &ExecOutcome),
) {
    let url = exec_url(c, id, cmd, &input).await;
    let out = spdy_exec(&url, input.clone()).await.expect("SPDY exec");
    check("spdy", &out);
    let url = exec_url(c, id, cmd, &input).await;
    let out = ws_exec(&url, input).await.expect("WebSocket exec");
    check("websocket", &out);
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_over_spdy_and_websocket() {
    let Some((_reg, d, mut c, image)) = setup().await else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_owned());
    let logs = d.dir().join("logs/x");
    let pod_cfg = pod_config("x", &logs);
    let pod = run_pod(&mut c, &pod_cfg, "").await.unwrap();
    let ctr = run_container(
        &mut c,
        &pod,
        &pod_cfg,
        container_config("main", &image, &["sleep", "3600"]),
    )
    .await;

    // Exit codes, stdout and stderr apart.
    let plain = ExecInput {
        stderr: true,
        ..Default::default()
    };
    let script = &["sh", "-c", "echo out; echo err >&2; exit 0"];
    both(&mut c, &ctr, script, plain.clone(), |t, o| {
        assert_eq!(o.exit_code(), Some(0), "{t}: {o:?}");
        assert_eq!(o.stdout, b"out\n", "{t}");
        assert_eq!(o.stderr, b"err\n", "{t}");
    })
    .await;
    both(
        &mut c,
        &ctr,
        &["sh", "-c", "exit 7"],
        plain.clone(),
        |t, o| {
            assert_eq!(o.exit_code(), Some(7), "{t}: {o:?}");
            let s = o.status.as_ref().unwrap();
            assert_eq!(s.reason, "NonZeroExitCode", "{t}");
        },
    )
    .await;

    // stdin EOF ends `cat`, after all of stdin came back.
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let with_stdin = ExecInput {
        stdin: Some(data.clone()),
        ..Default::default()
    };
    both(&mut c, &ctr, &["cat"], with_stdin, |t, o| {
        assert_eq!(o.exit_code(), Some(0), "{t}");
        assert!(o.stdout == data, "{t}: {} bytes back", o.stdout.len());
    })
    .await;

    // A TTY, resized before the command reads its size.
    let tty = ExecInput {
        tty: true,
        resize: Some(TerminalSize {
            width: 91,
            height: 33,
        }),
        ..Default::default()
    };
    both(
        &mut c,
        &ctr,
        &["sh", "-c", "sleep 1; stty size; exit 3"],
        tty,
        |t, o| {
            assert_eq!(o.exit_code(), Some(3), "{t}: {o:?}");
            assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "33 91", "{t}");
        },
    )
    .await;

    // A client that goes away kills its command.
    let input = ExecInput {
        stdin: Some(Vec::new()),
        keep_stdin_open: true,
        ..Default::default()
    };
    let url = exec_url(
        &mut c,
        &ctr,
        &["sh", "-c", "echo started; sleep 300"],
        &input,
    )
    .await;
    let (session, _) = spdy_connect(&url, &["v4.channel.k8s.io"]).await.unwrap();
    let open = |t: &'static str| {
        session.open(vessel_streamproto::spdy::Headers::new().with("streamtype", t))
    };
    let _e = open("error").await.unwrap();
    let _i = open("stdin").await.unwrap();
    let mut o = open("stdout").await.unwrap();
    assert_eq!(o.recv().await.unwrap(), b"started\n");
    session.close().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ps = exec(&mut c, &ctr, &["ps"], 10).await.unwrap();
        if !String::from_utf8_lossy(&ps.stdout).contains("sleep 300") {
            break;
        }
        assert!(Instant::now() < deadline, "exec outlived its client");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Tokens are single use.
    let url = exec_url(&mut c, &ctr, &["true"], &plain).await;
    spdy_exec(&url, plain.clone()).await.unwrap();
    let again = spdy_exec(&url, plain.clone()).await.unwrap_err();
    assert!(again.to_string().contains("404"), "{again}");

    // Throughput of one exec's stdout (reported, not asserted: TCG speed varies).
    let n = 64 << 20;
    let url = exec_url(
        &mut c,
        &ctr,
        // dd, not head: busybox head moves small blocks, slower than the channel.
        &[
            "sh",
            "-c",
            &format!("dd if=/dev/zero bs=65536 count={} 2>/dev/null", n >> 16),
        ],
        &plain,
    )
    .await;
    let t = Instant::now();
    let o = spdy_exec(&url, plain.clone()).await.unwrap();
    assert_eq!(o.stdout.len(), n);
    eprintln!(
        "exec stdout over SPDY: {:.1} MiB/s",
        n as f64 / 1048576.0 / t.elapsed().as_secs_f64()
    );

    remove_pod(&mut c, &pod).await;
    assert_no_leaks(&d);
}

#[tokio::test(flavor = "multi_thread")]
async fn attach_to_a_tty_container() {
    let Some((_reg, d, mut c, image)) = setup().await else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_owned());
    let logs = d.dir().join("logs/a");
    let pod_cfg = pod_config("a", &logs);
    let pod = run_pod(&mut c, &pod_cfg, "").await.unwrap();
    let mut cfg = container_config("sh", &image, &["sh"]);
    cfg.tty = true;
    cfg.stdin = true;
    let ctr = run_container(&mut c, &pod, &pod_cfg, cfg).await;

    let attach_url = |c: &mut CriClient| {
        let req = cri::AttachRequest {
            container_id: ctr.clone(),
            stdin: true,
            tty: true,
            stdout: true,
            stderr: false,
        };
        let mut rt = c.runtime.clone();
        async move { rt.attach(req).await.expect("Attach").into_inner().url }
    };
    // Two clients at once over SPDY; one types, both see the output.
    let watcher_url = attach_url(&mut c).await;
    let watcher = tokio::spawn(async move {
        let (session, _) = spdy_connect(&watcher_url, &["v4.channel.k8s.io"])
            .await
            .unwrap();
        let open = |t: &'static str| {
            session.open(vessel_streamproto::spdy::Headers::new().with("streamtype", t))
        };
        let _e = open("error").await.unwrap();
        let _i = open("stdin").await.unwrap();
        let mut o = open("stdout").await.unwrap();
        let _r = open("resize").await.unwrap();
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !String::from_utf8_lossy(&seen).contains("marker-42") {
            let d = tokio::time::timeout_at(deadline.into(), o.recv())
                .await
                .expect("watcher saw the marker")
                .unwrap();
            seen.extend(d);
        }
        // Detach by leaving.
        session.close().await;
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let url = attach_url(&mut c).await;
    let typed = ExecInput {
        stdin: Some(b"echo marker-$((6*7))\n".to_vec()),
        keep_stdin_open: true,
        tty: true,
        ..Default::default()
    };
    let ws = tokio::spawn(async move {
        let ws = ws_connect(&url, "v5.channel.k8s.io").await.unwrap();
        let (mut sink, mut source) = futures_util::StreamExt::split(ws);
        use futures_util::{SinkExt as _, StreamExt as _};
        let mut m = vec![0u8];
        m.extend(typed.stdin.unwrap());
        sink.send(tokio_tungstenite::tungstenite::Message::Binary(m.into()))
            .await
            .unwrap();
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !String::from_utf8_lossy(&seen).contains("marker-42") {
            let m = tokio::time::timeout_at(deadline.into(), source.next())
                .await
                .expect("typist saw the marker")
                .unwrap()
                .unwrap();
            if let tokio_tungstenite::tungstenite::Message::Binary(b) = m {
                if b.first() == Some(&1) {
                    seen.extend_from_slice(&b[1..]);
                }
            }
        }
        drop(sink);
    });
    ws.await.unwrap();
    watcher.await.unwrap();
    // Both left; the container goes on.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        status(&mut c, &ctr).await.state,
        cri::ContainerState::ContainerRunning as i32
    );
    // And its output reached the CRI log too.
    let log = std::fs::read_to_string(logs.join("sh/0.log")).unwrap_or_default();
    assert!(log.contains("marker-42"), "log: {log}");

    remove_pod(&mut c, &pod).await;
    assert_no_leaks(&d);
}

/// `seq 1 N` as the guest prints it, cut to `len` bytes.
#[tokio::test(flavor = "multi_thread")]
async fn port_forward_over_spdy_and_websocket() {
    let Some((_reg, d, mut c, image)) = setup().await else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_owned());
    let logs = d.dir().join("logs/p");
    let pod_cfg = pod_config("p", &logs);
    let pod = run_pod(&mut c, &pod_cfg, "").await.unwrap();
    // The 100 MiB each way; VESSEL_PF_MIB overrides it for measurements.
    let len_mib: usize = std::env::var("VESSEL_PF_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    #[allow(non_snake_case)]
    let LEN: usize = len_mib << 20;
    // The upload lands in a file (on the pod's scratch disk) that the download then
    // serves back: random bytes both ways, checked at both ends. (busybox `nc -l`
    // quits at EOF on its stdin, hence the `sleep |` in front of the receiving one.)
    let script = "mkdir -p /www && echo hello-from-the-guest > /www/index.html && \
         httpd -p 8080 -h /www && \
         (sleep 100000 | nc -l -p 9000 > /tmp/up.bin) & sleep 100000";
    let srv = run_container(
        &mut c,
        &pod,
        &pod_cfg,
        container_config("srv", &image, &["sh", "-c", script]),
    )
    .await;
    let pf_url = |c: &mut CriClient, ports: Vec<i32>| {
        let req = cri::PortForwardRequest {
            pod_sandbox_id: pod.clone(),
            port: ports,
        };
        let mut rt = c.runtime.clone();
        async move {
            rt.port_forward(req)
                .await
                .expect("PortForward")
                .into_inner()
                .url
        }
    };
    // The servers need a moment to listen (TCG is slow).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ns = exec(&mut c, &srv, &["netstat", "-ltn"], 10).await.unwrap();
        let ns = String::from_utf8_lossy(&ns.stdout).into_owned();
        if [":8080 ", ":9000 "].iter().all(|p| ns.contains(p)) {
            break;
        }
        assert!(Instant::now() < deadline, "servers not listening: {ns}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // SPDY: concurrent HTTP requests on one session.
    let url = pf_url(&mut c, vec![]).await;
    let (session, proto) = spdy_connect(&url, &["portforward.k8s.io"]).await.unwrap();
    assert_eq!(proto, "portforward.k8s.io");
    let mut reqs = Vec::new();
    for i in 0..8u32 {
        let s = session.clone();
        reqs.push(tokio::spawn(async move {
            spdy_port_roundtrip(&s, 8080, i, b"GET /index.html HTTP/1.0\r\n\r\n").await
        }));
    }
    for r in reqs {
        let (answer, err) = r.await.unwrap().unwrap();
        let text = String::from_utf8_lossy(&answer);
        assert!(text.contains("hello-from-the-guest"), "{text} / {err}");
        assert!(err.is_empty(), "{err}");
    }
    // A closed port: the error stream says so.
    let (_, err) = spdy_port_roundtrip(&session, 8999, 100, b"x")
        .await
        .unwrap();
    assert!(err.contains("8999"), "{err}");

    // LEN bytes each way with checksums, timed.
    let up: Vec<u8> = (0..LEN as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let t = Instant::now();
    let conn = spdy_port_conn(&session, 9000, 200).await.unwrap();
    conn.data.send(&up).await.unwrap();
    conn.data.finish().await.unwrap();
    let mut data = conn.data;
    while data.recv().await.is_some() {}
    let up_rate = LEN as f64 / 1048576.0 / t.elapsed().as_secs_f64();
    // nc wrote everything before it closed the connection.
    let want = hex::encode(Sha256::digest(&up));
    let sum = exec(&mut c, &srv, &["sha256sum", "/tmp/up.bin"], 300)
        .await
        .unwrap();
    let sum = String::from_utf8_lossy(&sum.stdout).into_owned();
    assert!(sum.starts_with(&want), "upload corrupted: {sum} vs {want}");
    let serve = "nc -l -p 9001 < /tmp/up.bin >/dev/null 2>&1 &";
    let started = exec(&mut c, &srv, &["sh", "-c", serve], 30).await.unwrap();
    assert_eq!(started.exit_code, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ns = exec(&mut c, &srv, &["netstat", "-ltn"], 10).await.unwrap();
        if String::from_utf8_lossy(&ns.stdout).contains(":9001 ") {
            break;
        }
        assert!(Instant::now() < deadline, "download server not listening");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let t = Instant::now();
    let mut conn = spdy_port_conn(&session, 9001, 201).await.unwrap();
    let mut got = Vec::with_capacity(LEN);
    while got.len() < LEN {
        match conn.data.recv().await {
            Some(d) => got.extend(d),
            None => break,
        }
    }
    let down_rate = LEN as f64 / 1048576.0 / t.elapsed().as_secs_f64();
    assert_eq!(got.len(), LEN);
    assert!(
        Sha256::digest(&got) == Sha256::digest(&up),
        "download corrupted"
    );
    conn.data.finish().await.unwrap();
    session.close().await;
    eprintln!("port-forward over SPDY: up {up_rate:.1} MiB/s, down {down_rate:.1} MiB/s");

    // WebSocket: one port per channel pair; the first frame on each names the port.
    let url = pf_url(&mut c, vec![8080]).await;
    let ws = ws_connect(&format!("{url}?port=8080"), "v4.channel.k8s.io")
        .await
        .unwrap();
    use futures_util::{SinkExt as _, StreamExt as _};
    let (mut sink, mut source) = ws.split();
    let mut firsts = Vec::new();
    let mut body = Vec::new();
    let mut sent = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !String::from_utf8_lossy(&body).contains("hello-from-the-guest") {
        let m = tokio::time::timeout_at(deadline.into(), source.next())
            .await
            .expect("answer over WebSocket")
            .unwrap()
            .unwrap();
        let tokio_tungstenite::tungstenite::Message::Binary(b) = m else {
            continue;
        };
        if firsts.len() < 2 {
            firsts.push(b.to_vec());
            if firsts.len() == 2 && !sent {
                let mut m = vec![0u8];
                m.extend_from_slice(b"GET /index.html HTTP/1.0\r\n\r\n");
                sink.send(tokio_tungstenite::tungstenite::Message::Binary(m.into()))
                    .await
                    .unwrap();
                sent = true;
            }
            continue;
        }
        if b.first() == Some(&0) {
            body.extend_from_slice(&b[1..]);
        }
    }
    assert_eq!(firsts, vec![vec![0, 0x90, 0x1f], vec![1, 0x90, 0x1f]]);
    drop(sink);

    remove_pod(&mut c, &pod).await;
    assert_no_leaks(&d);
}
