//! Row 10: exec and port-forward through vesseld's streaming server over SPDY (the
//! kubelet's transport), as a user of `kubectl exec`/`port-forward` sees them:
//! CRI call → URL → SPDY session → vesseld → agent channel → process or port.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use k8s_cri::v1 as cri;
use vessel_streamproto::k8s;
use vessel_streamproto::spdy::session::{Session, Stream};
use vessel_streamproto::spdy::Headers;

use super::channel::mib_per_s;
use super::stats::Samples;
use crate::cri::CriClient;
use crate::streaming::{spdy_connect, spdy_port_conn};

/// Ports of the in-container servers [`SERVERS`] starts.
pub const DOWNLOAD_PORT: u16 = 9001;
pub const UPLOAD_PORT: u16 = 9000;

/// A shell script for a busybox container: serves `bytes` zeros on
/// [`DOWNLOAD_PORT`] and swallows whatever arrives on [`UPLOAD_PORT`], a process per
/// connection (`nc -ll -e`), which closes the connection when it is done.
pub fn servers_script(bytes: usize) -> String {
    format!(
        "printf '#!/bin/sh\\nexec {}\\n' >/tmp/down.sh && \
         printf '#!/bin/sh\\nexec cat >/dev/null\\n' >/tmp/up.sh && \
         chmod +x /tmp/down.sh /tmp/up.sh && \
         nc -ll -p {UPLOAD_PORT} -e /tmp/up.sh & \
         exec nc -ll -p {DOWNLOAD_PORT} -e /tmp/down.sh",
        dd_source(bytes)
    )
}

/// A source of `bytes` zeros in 64 KiB writes (busybox `head -c` moves data in small
/// pieces and is slower under TCG than any transport measured here).
pub fn dd_source(bytes: usize) -> String {
    format!(
        "dd if=/dev/zero bs=65536 count={} 2>/dev/null",
        bytes / 65536
    )
}

/// A sink that reads stdin in big blocks and reports how much it read (see
/// [`dd_counted`]).
pub const DD_SINK: &str = "dd of=/dev/null bs=65536 iflag=fullblock 2>&1";

/// Whether [`DD_SINK`]'s report says it read exactly `bytes` (busybox `dd` counts
/// blocks, not bytes; with `fullblock` only the last one may be partial).
pub fn dd_counted(report: &str, bytes: usize) -> bool {
    let full = bytes / 65536;
    let partial = usize::from(!bytes.is_multiple_of(65536));
    report.contains(&format!("{full}+{partial} records in"))
}

/// Seconds of the `real` line of busybox `time` (`real\t1m 2.34s`).
pub fn busybox_real_secs(report: &str) -> Option<f64> {
    let line = report.lines().find_map(|l| l.trim().strip_prefix("real"))?;
    let (min, sec) = line.trim().split_once('m')?;
    let sec = sec.trim().strip_suffix('s')?;
    Some(min.trim().parse::<f64>().ok()? * 60.0 + sec.parse::<f64>().ok()?)
}

/// The URL of an Exec of `cmd` in container `id`.
async fn exec_url(
    c: &mut CriClient,
    id: &str,
    cmd: &[&str],
    tty: bool,
    stdin: bool,
) -> anyhow::Result<String> {
    Ok(c.runtime
        .exec(cri::ExecRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
            tty,
            stdin,
            stdout: true,
            stderr: false,
        })
        .await
        .context("Exec")?
        .into_inner()
        .url)
}

/// An exec session over SPDY v4: error, optional stdin, stdout (and a resize stream
/// for a TTY, so the server sees what kubectl sends).
struct ExecSession {
    session: Session,
    error: Stream,
    stdin: Option<Stream>,
    stdout: Stream,
    _resize: Option<Stream>,
}

async fn open_exec(url: &str, stdin: bool, tty: bool) -> anyhow::Result<ExecSession> {
    let (session, proto) = spdy_connect(url, &["v4.channel.k8s.io"]).await?;
    if proto != "v4.channel.k8s.io" {
        bail!("the streaming server chose {proto:?}");
    }
    let open = |t: &str| session.open(Headers::new().with(k8s::STREAM_TYPE_HEADER, t));
    let error = open("error").await?;
    let stdin = match stdin {
        true => Some(open("stdin").await?),
        false => None,
    };
    let stdout = open("stdout").await?;
    let resize = match tty {
        true => Some(open("resize").await?),
        false => None,
    };
    Ok(ExecSession {
        session,
        error,
        stdin,
        stdout,
        _resize: resize,
    })
}

/// Sends `bytes` zeros on `stream`, in 256 KiB frames.
async fn send_zeros(stream: &Stream, bytes: usize) -> anyhow::Result<()> {
    let zeros = vec![0u8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(zeros.len());
        stream.send(&zeros[..n]).await?;
        left -= n;
    }
    Ok(())
}

/// Reads the error stream to its end; an error unless it reports success.
async fn expect_success(mut error: Stream) -> anyhow::Result<()> {
    let mut status = Vec::new();
    while let Some(d) = error.recv().await {
        status.extend(d);
    }
    if status.is_empty() {
        return Ok(());
    }
    let s: k8s::Status = serde_json::from_slice(&status).context("error stream")?;
    match s.code() {
        Some(0) => Ok(()),
        code => bail!(
            "exec ended with {code:?}: {}",
            String::from_utf8_lossy(&status)
        ),
    }
}

/// Guest → client: [`dd_source`] exec'd over SPDY, read to the end.
pub async fn exec_out(c: &mut CriClient, ctr: &str, bytes: usize) -> anyhow::Result<f64> {
    let source = dd_source(bytes);
    let url = exec_url(c, ctr, &["sh", "-c", &source], false, false).await?;
    let t = Instant::now();
    let mut s = open_exec(&url, false, false).await?;
    let mut got = 0usize;
    while let Some(d) = s.stdout.recv().await {
        got += d.len();
    }
    let elapsed = t.elapsed();
    expect_success(s.error).await?;
    s.session.close().await;
    if got != bytes {
        bail!("exec stdout over SPDY: got {got} of {bytes} bytes");
    }
    Ok(mib_per_s(bytes, elapsed))
}

/// Client → guest: BYTES into the stdin of `dd` exec'd over SPDY, until `dd` has
/// counted them all (busybox `wc` reads a byte at a time: too slow a sink).
pub async fn exec_in(c: &mut CriClient, ctr: &str, bytes: usize) -> anyhow::Result<f64> {
    let url = exec_url(c, ctr, &["sh", "-c", DD_SINK], false, true).await?;
    let t = Instant::now();
    let mut s = open_exec(&url, true, false).await?;
    let stdin = s.stdin.take().context("no stdin stream")?;
    send_zeros(&stdin, bytes).await?;
    stdin.finish().await?;
    let mut out = Vec::new();
    while let Some(d) = s.stdout.recv().await {
        out.extend(d);
    }
    let elapsed = t.elapsed();
    expect_success(s.error).await?;
    s.session.close().await;
    let summary = String::from_utf8_lossy(&out);
    if !dd_counted(&summary, bytes) {
        bail!("exec stdin over SPDY: dd did not count {bytes} bytes: {summary}");
    }
    Ok(mib_per_s(bytes, elapsed))
}

/// Keystroke latency of `exec -it`: one byte into a TTY running `cat`, timed until
/// the terminal echoes it back; `n` keystrokes on one session, in ms.
pub async fn keystrokes(c: &mut CriClient, ctr: &str, n: usize) -> anyhow::Result<Samples> {
    let url = exec_url(c, ctr, &["cat"], true, true).await?;
    let mut s = open_exec(&url, true, true).await?;
    let stdin = s.stdin.take().context("no stdin stream")?;
    let mut samples = Samples::new();
    for i in 0..n {
        let key = b'a' + (i % 26) as u8;
        let t = Instant::now();
        stdin.send(&[key]).await?;
        loop {
            let d = tokio::time::timeout(Duration::from_secs(10), s.stdout.recv())
                .await
                .context("no echo within 10 s")?
                .context("the TTY closed")?;
            if d.contains(&key) {
                break;
            }
        }
        samples.push_duration(t.elapsed());
    }
    // ^D on an empty line: cat sees EOF and exits.
    stdin.send(b"\n\x04").await?;
    while s.stdout.recv().await.is_some() {}
    expect_success(s.error).await?;
    s.session.close().await;
    Ok(samples)
}

async fn port_forward_session(c: &mut CriClient, pod: &str) -> anyhow::Result<Session> {
    let url = c
        .runtime
        .port_forward(cri::PortForwardRequest {
            pod_sandbox_id: pod.into(),
            port: vec![],
        })
        .await
        .context("PortForward")?
        .into_inner()
        .url;
    let (session, proto) = spdy_connect(&url, &["portforward.k8s.io"]).await?;
    if proto != "portforward.k8s.io" {
        bail!("the streaming server chose {proto:?}");
    }
    Ok(session)
}

/// One port-forward connection to [`DOWNLOAD_PORT`], read until `bytes` came.
pub async fn port_forward_down(
    c: &mut CriClient,
    pod: &str,
    bytes: usize,
    request_id: u32,
) -> anyhow::Result<f64> {
    let session = port_forward_session(c, pod).await?;
    let t = Instant::now();
    let mut conn = spdy_port_conn(&session, DOWNLOAD_PORT, request_id).await?;
    let mut got = 0usize;
    while got < bytes {
        match conn.data.recv().await {
            Some(d) => got += d.len(),
            None => break,
        }
    }
    let elapsed = t.elapsed();
    conn.data.finish().await?;
    session.close().await;
    if got != bytes {
        bail!("port-forward download: got {got} of {bytes} bytes");
    }
    Ok(mib_per_s(bytes, elapsed))
}

/// One port-forward connection to [`UPLOAD_PORT`]: `bytes` sent and half-closed,
/// timed until the server closes its side (it has read everything).
pub async fn port_forward_up(
    c: &mut CriClient,
    pod: &str,
    bytes: usize,
    request_id: u32,
) -> anyhow::Result<f64> {
    let session = port_forward_session(c, pod).await?;
    let t = Instant::now();
    let mut conn = spdy_port_conn(&session, UPLOAD_PORT, request_id).await?;
    send_zeros(&conn.data, bytes).await?;
    conn.data.finish().await?;
    while conn.data.recv().await.is_some() {}
    let elapsed = t.elapsed();
    let mut err = Vec::new();
    while let Some(d) = conn.error.recv().await {
        err.extend(d);
    }
    session.close().await;
    if !err.is_empty() {
        bail!("port-forward upload: {}", String::from_utf8_lossy(&err));
    }
    Ok(mib_per_s(bytes, elapsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_busybox_time_and_dd_reports() {
        assert_eq!(
            busybox_real_secs("real\t1m 2.50s\nuser\t0m 0.01s\n"),
            Some(62.5)
        );
        assert_eq!(busybox_real_secs("real\t0m 0.00s\n"), Some(0.0));
        assert_eq!(busybox_real_secs("nothing"), None);
        assert!(dd_counted(
            "256+0 records in\n256+0 records out\n",
            16 << 20
        ));
        assert!(!dd_counted("255+1 records in\n", 16 << 20));
        assert!(dd_counted("1+1 records in\n", 65536 + 5));
    }
}
