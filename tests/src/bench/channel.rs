//! The host ↔ guest agent channel of a running pod, measured from outside vesseld:
//! a second agent client on the pod's vsock, an empty call's round trip, and bulk
//! output and input streams of a process exec'd in a running container.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use vessel_proto::agent as pb;
use vessel_sandbox::layout::RunDir;
use vessel_sandbox::state::VmState;
use vessel_sandbox::AgentClient;

use super::stats::Samples;

/// Chunk size of the stdin stream: the agent's vsock write cap.
const STDIN_CHUNK: usize = vessel_proto::MAX_VSOCK_WRITE;

/// A client of the agent of the pod whose VM run dir is `vm_dir`.
pub fn agent_of(vm_dir: &Path) -> anyhow::Result<AgentClient> {
    let dir = RunDir::new(vm_dir)?;
    let state = VmState::load(&dir.state()).context("the pod's VM state")?;
    Ok(AgentClient::new(state.agent, Duration::from_secs(30)))
}

/// `n` Health calls on one connection (after one to connect), in ms.
pub async fn health_rtt(agent: &AgentClient, n: usize) -> anyhow::Result<Samples> {
    agent.health().await?;
    let mut s = Samples::new();
    for _ in 0..n {
        let t = Instant::now();
        agent.health().await?;
        s.push_duration(t.elapsed());
    }
    Ok(s)
}

fn process_json(args: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "args": args,
        "cwd": "/",
        "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
        "user": {"uid": 0, "gid": 0},
        "terminal": false,
    }))
    .unwrap_or_default()
}

async fn exec(
    agent: &AgentClient,
    ctr: &str,
    exec_id: &str,
    args: &[&str],
    stdin: bool,
) -> anyhow::Result<()> {
    agent
        .exec_process(pb::ExecProcessRequest {
            container_id: ctr.into(),
            exec_id: exec_id.into(),
            oci_process_json: process_json(args),
            stdin,
        })
        .await?;
    Ok(())
}

async fn read_stream(agent: &AgentClient, ctr: &str, exec_id: &str) -> anyhow::Result<Vec<u8>> {
    let mut s = agent
        .read_output(pb::ReadOutputRequest {
            container_id: ctr.into(),
            exec_id: exec_id.into(),
            stream: pb::OutputStream::Stdout as i32,
            ..Default::default()
        })
        .await?;
    let mut out = Vec::new();
    while let Some(chunk) = s.message().await? {
        out.extend_from_slice(&chunk.data);
    }
    Ok(out)
}

/// Guest → host: [`super::streams::dd_source`] in container `ctr`, read to the end.
/// Returns MiB/s from exec to the last byte.
pub async fn stream_out(
    agent: &AgentClient,
    ctr: &str,
    bytes: usize,
    tag: &str,
) -> anyhow::Result<f64> {
    let exec_id = format!("bench-out-{tag}");
    let source = super::streams::dd_source(bytes);
    let t = Instant::now();
    exec(agent, ctr, &exec_id, &["sh", "-c", &source], false).await?;
    let mut counted = 0usize;
    let mut s = agent
        .read_output(pb::ReadOutputRequest {
            container_id: ctr.into(),
            exec_id: exec_id.clone(),
            stream: pb::OutputStream::Stdout as i32,
            ..Default::default()
        })
        .await?;
    while let Some(chunk) = s.message().await? {
        counted += chunk.data.len();
    }
    let elapsed = t.elapsed();
    let status = agent.wait_process(ctr, &exec_id).await?;
    if counted != bytes || status.exit_code != 0 {
        bail!(
            "guest → host stream: got {counted} of {bytes} bytes, exit {}",
            status.exit_code
        );
    }
    Ok(mib_per_s(bytes, elapsed))
}

/// Host → guest: BYTES written to the stdin of `dd` in container `ctr`.
/// Returns MiB/s from exec until `dd` has counted them all.
pub async fn stream_in(
    agent: &AgentClient,
    ctr: &str,
    bytes: usize,
    tag: &str,
) -> anyhow::Result<f64> {
    let exec_id = format!("bench-in-{tag}");
    let t = Instant::now();
    exec(
        agent,
        ctr,
        &exec_id,
        &["sh", "-c", super::streams::DD_SINK],
        true,
    )
    .await?;
    let output = tokio::spawn({
        let (agent, ctr, exec_id) = (agent.clone(), ctr.to_owned(), exec_id.clone());
        async move { read_stream(&agent, &ctr, &exec_id).await }
    });
    let first = pb::StdinChunk {
        container_id: ctr.into(),
        exec_id: exec_id.clone(),
        data: Vec::new(),
    };
    let zeros = vec![0u8; STDIN_CHUNK];
    let chunks = (0..bytes.div_ceil(STDIN_CHUNK)).map(move |i| pb::StdinChunk {
        data: zeros[..STDIN_CHUNK.min(bytes - i * STDIN_CHUNK)].to_vec(),
        ..Default::default()
    });
    agent
        .write_stdin(futures::stream::iter(std::iter::once(first).chain(chunks)))
        .await?;
    agent
        .close_stdin(pb::ProcessRef {
            container_id: ctr.into(),
            exec_id: exec_id.clone(),
        })
        .await?;
    let out = output.await??;
    let elapsed = t.elapsed();
    let summary = String::from_utf8_lossy(&out);
    let status = agent.wait_process(ctr, &exec_id).await?;
    if !super::streams::dd_counted(&summary, bytes) || status.exit_code != 0 {
        bail!(
            "host → guest stream: dd did not count {bytes} bytes ({summary}), exit {}",
            status.exit_code
        );
    }
    Ok(mib_per_s(bytes, elapsed))
}

pub fn mib_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / 1_048_576.0 / d.as_secs_f64().max(1e-9)
}
