//! A minimal QMP client: one connection per command (QEMU serves one client at a time).

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::error::{Error, Result};

const QMP_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes vesseld reads from one QMP connection (one command): QEMU runs as the
/// VM's uid, so once exploited it could answer with an endless line.
const MAX_QMP_BYTES: u64 = 1 << 20;

/// Runs `command` (with `arguments`) and returns its `return` value.
pub async fn execute(socket: &Path, command: &str, arguments: Option<Value>) -> Result<Value> {
    tokio::time::timeout(QMP_TIMEOUT, execute_inner(socket, command, arguments))
        .await
        .map_err(|_| Error::Timeout(QMP_TIMEOUT, format!("QMP {command}")))?
}

async fn execute_inner(socket: &Path, command: &str, arguments: Option<Value>) -> Result<Value> {
    // The socket is in the jail dir: never follow what the VM's uid may have put there.
    let stream = crate::jail::connect_unix(socket)
        .await
        .map_err(|e| Error::Qmp(format!("connect {}: {e}", socket.display())))?;
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(tokio::io::AsyncReadExt::take(r, MAX_QMP_BYTES)).lines();
    let greeting = next_message(&mut lines).await?;
    if greeting.get("QMP").is_none() {
        return Err(Error::Qmp(format!("unexpected greeting {greeting}")));
    }
    send(&mut w, &json!({"execute": "qmp_capabilities"})).await?;
    reply(&mut lines).await?;
    let mut msg = json!({ "execute": command });
    if let Some(args) = arguments {
        msg["arguments"] = args;
    }
    send(&mut w, &msg).await?;
    reply(&mut lines).await
}

async fn send(w: &mut tokio::net::unix::OwnedWriteHalf, v: &Value) -> Result<()> {
    let mut line = serde_json::to_vec(v)?;
    line.push(b'\n');
    w.write_all(&line)
        .await
        .map_err(|e| Error::Qmp(format!("write: {e}")))
}

type Lines = tokio::io::Lines<BufReader<tokio::io::Take<tokio::net::unix::OwnedReadHalf>>>;

async fn next_message(lines: &mut Lines) -> Result<Value> {
    let line = lines
        .next_line()
        .await
        .map_err(|e| Error::Qmp(format!("read: {e}")))?
        .ok_or_else(|| Error::Qmp("connection closed".into()))?;
    Ok(serde_json::from_str(&line)?)
}

/// Skips asynchronous events until the command's answer.
async fn reply(lines: &mut Lines) -> Result<Value> {
    loop {
        let msg = next_message(lines).await?;
        if let Some(ret) = msg.get("return") {
            return Ok(ret.clone());
        }
        if let Some(err) = msg.get("error") {
            return Err(Error::Qmp(err.to_string()));
        }
    }
}
