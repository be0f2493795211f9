//! Port-forward connections into the pod VM: each one is an agent PortForward
//! stream to `127.0.0.1:<port>` inside the guest (not the host's netns).

use std::sync::Arc;

use tokio::sync::mpsc;
use tonic::Status;
use vessel_proto::agent as pb;
use vessel_sandbox::agent::AgentClient;

use super::io::{PortForwardConn, QUEUE};
use crate::engine::Engine;
use crate::status::store_status;
use crate::store::PodState;

pub fn check_pod(engine: &Engine, pod_id: &str) -> Result<AgentClient, Status> {
    let pod = engine.store().pod(pod_id).map_err(store_status)?;
    match (pod.state, engine.live_pod(&pod.id)) {
        (PodState::Ready, Some(live)) => match live.vm.pod_vm() {
            Some(vm) => Ok(vm.agent().clone()),
            None => Err(Status::unimplemented("streaming needs a real pod VM")),
        },
        _ => Err(Status::failed_precondition(format!(
            "pod sandbox {} is not ready (stopped, or its VM is gone)",
            pod.id
        ))),
    }
}

/// Serves connections until the transport stops sending them.
pub async fn run(engine: Arc<Engine>, pod_id: String, mut conns: mpsc::Receiver<PortForwardConn>) {
    while let Some(conn) = conns.recv().await {
        let agent = match check_pod(&engine, &pod_id) {
            Ok(a) => a,
            Err(e) => {
                let _ = conn.error.send(e.message().to_owned());
                continue;
            }
        };
        tokio::spawn(forward(agent, conn));
    }
}

async fn forward(agent: AgentClient, conn: PortForwardConn) {
    let PortForwardConn {
        port,
        mut from_client,
        to_client,
        error,
    } = conn;
    let (tx, rx) = mpsc::channel(QUEUE);
    let _ = tx
        .send(pb::PortForwardData {
            port: port.into(),
            data: Vec::new(),
        })
        .await;
    // Client → guest; the end of it (client half-close) half-closes the guest socket.
    let feed = tokio::spawn(async move {
        while let Some(data) = from_client.recv().await {
            let m = pb::PortForwardData { port: 0, data };
            if tx.send(m).await.is_err() {
                break;
            }
        }
    });
    let mut back = match agent
        .port_forward(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(s) => s,
        Err(e) => {
            feed.abort();
            let msg = match e {
                vessel_sandbox::Error::Agent(s) => s.message().to_owned(),
                e => e.to_string(),
            };
            let _ = error.send(format!("error forwarding port {port} to the pod: {msg}"));
            return;
        }
    };
    // Guest → client; ends (half-close toward the client) when the guest closes.
    loop {
        match back.message().await {
            Ok(Some(m)) => {
                if to_client.send(m.data).await.is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                let _ = error.send(format!("port {port}: {}", e.message()));
                break;
            }
        }
    }
    drop(to_client);
    // The client may still be sending (its half of the connection); the feed task
    // ends when it finishes or the session ends.
    let _ = feed.await;
}
