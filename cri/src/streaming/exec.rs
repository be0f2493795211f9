//! Exec and Attach against the agent: start (or find) the process, pump stdin,
//! output and resizes, report the exit.
//!
//! Exec output is read with auto-ack and sent with back-pressure: the process is
//! the client's own. Attach output is the container's, which the CRI log pump reads
//! with explicit acks: an attach reader never acks (it cannot hold the guest's
//! buffer) and never waits on its client: chunks a slow client cannot take are
//! dropped, so neither the log nor the container ever waits for an attach client.

use std::sync::Arc;

use k8s_cri::v1 as cri;
use prost::Message as _;
use tokio::sync::mpsc;
use tonic::Status;
use vessel_proto::agent as pb;
use vessel_sandbox::agent::AgentClient;
use vessel_streamproto::k8s;

use super::io::{until_gone, ExecIo, QUEUE};
use super::Pending;
use crate::engine::Engine;
use crate::status::store_status;
use crate::store::{ContainerRecord, ContainerState, PodState};

fn agent_err(what: &str, e: vessel_sandbox::Error) -> String {
    format!("{what}: {e}")
}

/// The container, if it is running in a ready pod, with its pod's agent.
pub fn check_container(
    engine: &Engine,
    id: &str,
) -> Result<(ContainerRecord, AgentClient), Status> {
    let c = engine.store().container(id).map_err(store_status)?;
    if c.state != ContainerState::Running {
        return Err(Status::failed_precondition(format!(
            "container {} is not running ({:?})",
            c.id, c.state
        )));
    }
    let pod = engine.store().pod(&c.pod_id).map_err(store_status)?;
    match (pod.state, engine.live_pod(&pod.id)) {
        (PodState::Ready, Some(live)) => match live.vm.pod_vm() {
            Some(vm) => Ok((c, vm.agent().clone())),
            None => Err(Status::unimplemented("streaming needs a real pod VM")),
        },
        _ => Err(Status::failed_precondition(format!(
            "pod sandbox {} of container {} is not ready",
            pod.id, c.id
        ))),
    }
}

/// Runs an exec or attach over `io`; a port-forward has nothing to run here.
pub async fn run(engine: Arc<Engine>, pending: Pending, io: ExecIo) {
    match pending {
        Pending::Exec(req) => run_exec(engine, req, io).await,
        Pending::Attach(req) => run_attach(engine, req, io).await,
        Pending::PortForward(_) => {}
    }
}

/// Runs an exec to its end; the status goes to `io.status`.
async fn run_exec(engine: Arc<Engine>, req: cri::ExecRequest, io: ExecIo) {
    let (c, agent) = match check_container(&engine, &req.container_id) {
        Ok(x) => x,
        Err(e) => {
            let _ = io.status.send(k8s::Status::failure(e.message()));
            return;
        }
    };
    let exec_id = hex::encode(rand::random::<[u8; 8]>());
    let mut process = match crate::engine::exec_process(&c) {
        Ok(p) => p,
        Err(e) => {
            let _ = io.status.send(k8s::Status::failure(e.to_string()));
            return;
        }
    };
    process.set_args(Some(req.cmd.clone()));
    process.set_terminal(Some(req.tty));
    process.set_console_size(None);
    let start = agent
        .exec_process(pb::ExecProcessRequest {
            container_id: c.id.clone(),
            exec_id: exec_id.clone(),
            oci_process_json: serde_json::to_vec(&process).unwrap_or_default(),
            stdin: io.stdin.is_some(),
        })
        .await;
    if let Err(e) = start {
        let _ = io.status.send(k8s::Status::failure(agent_err(
            "cannot start the command",
            e,
        )));
        return;
    }
    let ExecIo {
        stdin,
        stdout,
        stderr,
        resize,
        status,
        mut gone,
    } = io;
    let proc_ref = (c.id.clone(), exec_id.clone());
    let pumps = spawn_common(&agent, &proc_ref, stdin, resize, true);
    let outputs = spawn_outputs(&agent, &proc_ref, stdout, stderr, req.tty, OutputMode::Exec);
    let wait = agent.wait_process(&c.id, &exec_id);
    let result = tokio::select! {
        r = wait => Some(r),
        _ = until_gone(&mut gone) => None,
    };
    let final_status = match result {
        Some(Ok(exit)) => {
            // Output drains after the exit (the pipes end once the process is gone).
            for h in outputs {
                let _ = h.await;
            }
            k8s::Status::exit_code(exit.exit_code)
        }
        Some(Err(e)) => k8s::Status::failure(agent_err("cannot wait for the command", e)),
        None => {
            // The client left first: the command must not outlive its session.
            tracing::debug!(container = %c.id, exec = %exec_id, "exec client gone: killing");
            let _ = agent.kill_exec(&c.id, &exec_id).await;
            k8s::Status::failure("client disconnected")
        }
    };
    for p in pumps {
        p.abort();
    }
    let _ = status.send(final_status);
}

/// Attaches to the container's main process until the client leaves or the
/// process ends.
async fn run_attach(engine: Arc<Engine>, req: cri::AttachRequest, io: ExecIo) {
    let (c, agent) = match check_container(&engine, &req.container_id) {
        Ok(x) => x,
        Err(e) => {
            let _ = io.status.send(k8s::Status::failure(e.message()));
            return;
        }
    };
    // A record that does not decode must not attach with default (stdin-less,
    // non-TTY) settings: that would silently change what the client gets.
    let config = match cri::ContainerConfig::decode(c.config.as_slice()) {
        Ok(config) => config,
        Err(e) => {
            tracing::warn!(container = %c.id, error = %e, "stored container config is corrupt");
            let _ = io.status.send(k8s::Status::failure(format!(
                "the stored config of container {} is corrupt; recreate the container",
                c.id
            )));
            return;
        }
    };
    let ExecIo {
        stdin,
        stdout,
        stderr,
        resize,
        status,
        mut gone,
    } = io;
    if stdin.is_some() && !config.stdin {
        let _ = status.send(k8s::Status::failure(format!(
            "container {} was not created with stdin; attach without stdin",
            c.id
        )));
        return;
    }
    let proc_ref = (c.id.clone(), String::new());
    // stdin_once: the first attached client's EOF closes the container's stdin.
    let pumps = spawn_common(&agent, &proc_ref, stdin, resize, config.stdin_once);
    let mut outputs = spawn_outputs(
        &agent,
        &proc_ref,
        stdout,
        stderr,
        config.tty,
        OutputMode::Attach,
    );
    let wait = agent.wait_process(&c.id, "");
    let final_status = tokio::select! {
        r = wait => {
            for h in outputs.drain(..) {
                let _ = h.await;
            }
            match r {
                Ok(_) => k8s::Status::success(),
                Err(e) => k8s::Status::failure(agent_err("cannot wait for the container", e)),
            }
        }
        // Detach: the container goes on.
        _ = until_gone(&mut gone) => k8s::Status::success(),
    };
    for h in outputs.into_iter().chain(pumps) {
        h.abort();
    }
    let _ = status.send(final_status);
}

/// Copies the process's stdout and stderr to the client; a TTY merges stderr into
/// stdout, so its stderr channel gets nothing.
fn spawn_outputs(
    agent: &AgentClient,
    proc_ref: &(String, String),
    stdout: Option<mpsc::Sender<Vec<u8>>>,
    stderr: Option<mpsc::Sender<Vec<u8>>>,
    tty: bool,
    mode: OutputMode,
) -> Vec<tokio::task::JoinHandle<()>> {
    let stderr = stderr.filter(|_| !tty);
    [
        (pb::OutputStream::Stdout, stdout),
        (pb::OutputStream::Stderr, stderr),
    ]
    .into_iter()
    .filter_map(|(which, tx)| {
        let tx = tx?;
        Some(tokio::spawn(copy_output(
            agent.clone(),
            proc_ref.clone(),
            which,
            tx,
            mode,
        )))
    })
    .collect()
}

/// stdin and resize pumps shared by exec and attach. `close_at_eof`: the client's
/// stdin EOF closes the process's stdin.
fn spawn_common(
    agent: &AgentClient,
    (id, exec_id): &(String, String),
    stdin: Option<mpsc::Receiver<Vec<u8>>>,
    resize: Option<mpsc::Receiver<k8s::TerminalSize>>,
    close_at_eof: bool,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    if let Some(mut rx) = stdin {
        let (agent, id, exec_id) = (agent.clone(), id.clone(), exec_id.clone());
        tasks.push(tokio::spawn(async move {
            let (tx, chunks) = mpsc::channel(QUEUE);
            let first = pb::StdinChunk {
                container_id: id.clone(),
                exec_id: exec_id.clone(),
                data: Vec::new(),
            };
            let _ = tx.send(first).await;
            let feed = async move {
                while let Some(data) = rx.recv().await {
                    let chunk = pb::StdinChunk {
                        data,
                        ..Default::default()
                    };
                    if tx.send(chunk).await.is_err() {
                        break;
                    }
                }
            };
            let write = agent.write_stdin(tokio_stream::wrappers::ReceiverStream::new(chunks));
            let (_, written) = tokio::join!(feed, write);
            if let Err(e) = written {
                tracing::debug!(error = %e, "stdin stream ended");
            }
            if close_at_eof {
                let _ = agent
                    .close_stdin(pb::ProcessRef {
                        container_id: id,
                        exec_id,
                    })
                    .await;
            }
        }));
    }
    if let Some(mut rx) = resize {
        let (agent, id, exec_id) = (agent.clone(), id.clone(), exec_id.clone());
        tasks.push(tokio::spawn(async move {
            while let Some(size) = rx.recv().await {
                let _ = agent
                    .resize_tty(pb::ResizeTtyRequest {
                        container_id: id.clone(),
                        exec_id: exec_id.clone(),
                        width: size.width.into(),
                        height: size.height.into(),
                    })
                    .await;
            }
        }));
    }
    tasks
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum OutputMode {
    /// Auto-ack, wait for the client.
    Exec,
    /// Never ack, never wait: drop what the client cannot take.
    Attach,
}

async fn copy_output(
    agent: AgentClient,
    (id, exec_id): (String, String),
    which: pb::OutputStream,
    tx: mpsc::Sender<Vec<u8>>,
    mode: OutputMode,
) {
    let req = pb::ReadOutputRequest {
        container_id: id,
        exec_id,
        stream: which as i32,
        offset: 0,
        explicit_ack: mode == OutputMode::Attach,
    };
    let mut s = match agent.read_output(req).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "cannot open output stream");
            return;
        }
    };
    let mut dropped = 0u64;
    // The agent bounds its chunks (its CHUNK), but the guest is not trusted: the
    // client decodes at most MAX_AGENT_MESSAGE per message, so each chunk is bounded.
    while let Ok(Some(chunk)) = s.message().await {
        match mode {
            OutputMode::Exec => {
                if tx.send(chunk.data).await.is_err() {
                    return;
                }
            }
            OutputMode::Attach => match tx.try_send(chunk.data) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(d)) => dropped += d.len() as u64,
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            },
        }
    }
    if dropped > 0 {
        tracing::info!(
            dropped,
            "attach client was too slow; output it missed was dropped"
        );
    }
}
