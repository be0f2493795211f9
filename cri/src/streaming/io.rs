//! The transport-neutral shape of a session: what the SPDY and WebSocket sides hand
//! to the agent side. Every channel is bounded; who fills one waits (exec) or drops
//! (attach output, see `exec`).

use tokio::sync::{mpsc, oneshot, watch};
use vessel_streamproto::k8s::{Status, TerminalSize};

/// Chunks queued between the wire and the agent, each way, per stream.
pub const QUEUE: usize = 16;

pub struct ExecIo {
    /// Client stdin; ends at the client's half-close.
    pub stdin: Option<mpsc::Receiver<Vec<u8>>>,
    pub stdout: Option<mpsc::Sender<Vec<u8>>>,
    pub stderr: Option<mpsc::Sender<Vec<u8>>>,
    pub resize: Option<mpsc::Receiver<TerminalSize>>,
    /// The final status for the error stream/channel.
    pub status: oneshot::Sender<Status>,
    /// Becomes true when the client went away.
    pub gone: watch::Receiver<bool>,
}

/// One forwarded connection.
pub struct PortForwardConn {
    pub port: u16,
    pub from_client: mpsc::Receiver<Vec<u8>>,
    pub to_client: mpsc::Sender<Vec<u8>>,
    /// A message for the error stream/channel when the connection fails.
    pub error: oneshot::Sender<String>,
}

/// Waits until the client is gone.
pub async fn until_gone(gone: &mut watch::Receiver<bool>) {
    let _ = gone.wait_for(|g| *g).await;
}
