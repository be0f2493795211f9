//! ExecSync: a command in a running container, its output collected (bounded).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_cri::v1 as cri;
use vessel_sandbox::OutputStream;

use super::{Engine, LivePod, RunningVm, RuntimeError};
use crate::store::{new_id, ContainerRecord, ContainerState};

/// Most output ExecSync keeps per stream (containerd's cap): the reply is held in
/// vesseld's memory, and the guest decides how much it sends.
pub const MAX_EXEC_SYNC_OUTPUT: usize = 16 << 20;

/// The process an exec in `c` runs as: the container's own (user, env, caps),
/// stored at CreateContainer. Missing or corrupt is an error: running the exec
/// with oci-spec's default process (root, default caps) would widen its rights.
pub fn exec_process(c: &ContainerRecord) -> Result<oci_spec::runtime::Process, RuntimeError> {
    if c.process_json.is_empty() {
        return Err(RuntimeError::precondition(format!(
            "container {} has no stored process spec (it was not fully created); \
             remove it and create it again",
            c.id
        )));
    }
    serde_json::from_str(&c.process_json).map_err(|e| {
        RuntimeError::internal(format!(
            "the stored process spec of container {} is corrupt ({e}); remove it and \
             create it again",
            c.id
        ))
    })
}

impl Engine {
    /// A running container and its pod's VM.
    pub(super) fn running(
        &self,
        id: &str,
    ) -> Result<(ContainerRecord, Arc<LivePod>), RuntimeError> {
        let c = self.store.container(id)?;
        if c.state != ContainerState::Running {
            return Err(RuntimeError::precondition(format!(
                "container {} is not running ({:?})",
                c.id, c.state
            )));
        }
        let live = self.ready_pod(&c.pod_id)?;
        Ok((c, live))
    }

    pub async fn exec_sync(
        &self,
        req: cri::ExecSyncRequest,
    ) -> Result<cri::ExecSyncResponse, RuntimeError> {
        if req.cmd.is_empty() {
            return Err(RuntimeError::invalid("ExecSync: cmd is empty"));
        }
        let c = self.store.container(&req.container_id)?;
        let exec_id = new_id()[..16].to_owned();
        // Checked and started under the pod lock; the output is read without it.
        let (c, live) = {
            let _guard = self.lock_pod(&c.pod_id).await?;
            let (c, live) = self.running(&c.id)?;
            let mut process = exec_process(&c)?;
            process.set_args(Some(req.cmd.clone()));
            process.set_terminal(Some(false));
            process.set_console_size(None);
            let process_json = serde_json::to_vec(&process)
                .map_err(|e| RuntimeError::internal(format!("process json: {e}")))?;
            live.vm
                .exec(&c.id, &exec_id, process_json, false)
                .await
                .map_err(|e| RuntimeError::agent("agent ExecProcess", e))?;
            (c, live)
        };
        let run = async {
            let out = read_all(&*live.vm, &c.id, &exec_id, OutputStream::Stdout);
            let err = read_all(&*live.vm, &c.id, &exec_id, OutputStream::Stderr);
            // The first stream over its cap ends both reads (the other may never end).
            let (out, err) = tokio::try_join!(out, err)?;
            let status = live
                .vm
                .wait(&c.id, &exec_id)
                .await
                .map_err(|e| RuntimeError::agent("agent WaitProcess", e))?;
            Ok::<_, RuntimeError>(cri::ExecSyncResponse {
                stdout: out,
                stderr: err,
                exit_code: status.exit_code,
            })
        };
        let kill = || async {
            if let Err(e) = live.vm.kill_exec(&c.id, &exec_id).await {
                tracing::debug!(container = %c.id, exec = %exec_id, error = %e, "cannot kill the exec");
            }
        };
        let res = if req.timeout > 0 {
            match tokio::time::timeout(Duration::from_secs(req.timeout as u64), run).await {
                Ok(r) => r,
                Err(_) => {
                    kill().await;
                    return Err(RuntimeError::DeadlineExceeded(format!(
                        "command {:?} timed out after {}s",
                        req.cmd, req.timeout
                    )));
                }
            }
        } else {
            run.await
        };
        if matches!(&res, Err(RuntimeError::ResourceExhausted(_))) {
            kill().await;
        }
        res
    }
}

async fn read_all(
    vm: &dyn RunningVm,
    id: &str,
    exec_id: &str,
    which: OutputStream,
) -> Result<Vec<u8>, RuntimeError> {
    let mut s = vm
        .output(id, exec_id, which)
        .await
        .map_err(|e| RuntimeError::agent("agent ReadOutput", e))?;
    let mut out = Vec::new();
    while let Some(chunk) = s
        .next()
        .await
        .transpose()
        .map_err(|e| RuntimeError::agent("agent ReadOutput", e.into()))?
    {
        if out.len() + chunk.data.len() > MAX_EXEC_SYNC_OUTPUT {
            return Err(RuntimeError::ResourceExhausted(format!(
                "ExecSync: the command wrote more than {} MiB to {}, the most ExecSync \
                 returns; it was killed. Use a streaming exec (crictl exec -i) for large output",
                MAX_EXEC_SYNC_OUTPUT >> 20,
                match which {
                    OutputStream::Stdout => "stdout",
                    OutputStream::Stderr => "stderr",
                }
            )));
        }
        out.extend_from_slice(&chunk.data);
    }
    Ok(out)
}
