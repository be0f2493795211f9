//! ExecSync: a command in a running container, its output collected (bounded).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_cri::v1 as cri;
use vessel_proto::agent as pb;
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
        // An empty program name ([""]) would fail in the guest as Internal.
        if req.cmd.first().is_none_or(|p| p.is_empty()) {
            return Err(RuntimeError::invalid(
                "ExecSync: cmd is empty (its first element names the program to run)",
            ));
        }
        let c = self.store.container(&req.container_id)?;
        let exec_id = new_id()[..16].to_owned();
        // Checked under the pod lock; the command runs without it.
        let (c, live, process_json) = {
            let _guard = self.lock_pod(&c.pod_id).await?;
            let (c, live) = self.running(&c.id)?;
            let process_json = exec_sync_process(&c, &req.cmd)?;
            (c, live, process_json)
        };
        let run = async {
            let one_call = live
                .vm
                .exec_sync(&c.id, &exec_id, process_json.clone(), MAX_EXEC_SYNC_OUTPUT)
                .await;
            match one_call {
                // An agent from before ExecSync: a pod an older vesseld started.
                Err(vessel_sandbox::Error::Agent(s)) if s.code() == tonic::Code::Unimplemented => {
                    self.exec_sync_in_parts(&c, &exec_id, process_json).await
                }
                Err(e) => Err(RuntimeError::agent("agent ExecSync", e)),
                Ok(reply) => exec_sync_reply(reply, MAX_EXEC_SYNC_OUTPUT),
            }
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

    /// ExecSync as ExecProcess (under the pod lock), ReadOutput of both streams and
    /// WaitProcess: four round trips, for agents without the ExecSync call.
    async fn exec_sync_in_parts(
        &self,
        c: &ContainerRecord,
        exec_id: &str,
        process_json: Vec<u8>,
    ) -> Result<cri::ExecSyncResponse, RuntimeError> {
        let (c, live) = {
            let _guard = self.lock_pod(&c.pod_id).await?;
            let (c, live) = self.running(&c.id)?;
            live.vm
                .exec(&c.id, exec_id, process_json, false)
                .await
                .map_err(|e| RuntimeError::agent("agent ExecProcess", e))?;
            (c, live)
        };
        let out = read_all(&*live.vm, &c.id, exec_id, OutputStream::Stdout);
        let err = read_all(&*live.vm, &c.id, exec_id, OutputStream::Stderr);
        // The first stream over its cap ends both reads (the other may never end).
        let (out, err) = tokio::try_join!(out, err)?;
        let status = live
            .vm
            .wait(&c.id, exec_id)
            .await
            .map_err(|e| RuntimeError::agent("agent WaitProcess", e))?;
        Ok(cri::ExecSyncResponse {
            stdout: out,
            stderr: err,
            exit_code: status.exit_code,
        })
    }
}

/// The OCI process of an ExecSync of `cmd` in `c`, as JSON.
fn exec_sync_process(c: &ContainerRecord, cmd: &[String]) -> Result<Vec<u8>, RuntimeError> {
    let mut process = exec_process(c)?;
    process.set_args(Some(cmd.to_vec()));
    process.set_terminal(Some(false));
    process.set_console_size(None);
    serde_json::to_vec(&process).map_err(|e| RuntimeError::internal(format!("process json: {e}")))
}

fn too_much_output(which: OutputStream) -> RuntimeError {
    RuntimeError::ResourceExhausted(format!(
        "ExecSync: the command wrote more than {} MiB to {}, the most ExecSync \
         returns; it was killed. Use a streaming exec (crictl exec -i) for large output",
        MAX_EXEC_SYNC_OUTPUT >> 20,
        match which {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
        }
    ))
}

/// The CRI reply of the agent's ExecSync reply. Nothing in it is trusted: a
/// stream longer than `limit` is treated as the agent saying so (the caller
/// kills the exec), and a reply without an exit status is an error.
fn exec_sync_reply(
    reply: pb::ExecSyncResponse,
    limit: usize,
) -> Result<cri::ExecSyncResponse, RuntimeError> {
    if reply.output_exceeded {
        let which = OutputStream::try_from(reply.exceeded_stream).unwrap_or(OutputStream::Stdout);
        return Err(too_much_output(which));
    }
    if reply.stdout.len() > limit {
        return Err(too_much_output(OutputStream::Stdout));
    }
    if reply.stderr.len() > limit {
        return Err(too_much_output(OutputStream::Stderr));
    }
    let status = reply.status.ok_or_else(|| {
        RuntimeError::internal(
            "the pod's agent answered ExecSync without an exit status; the pod's guest \
             is misbehaving: recreate the pod",
        )
    })?;
    Ok(cri::ExecSyncResponse {
        stdout: reply.stdout,
        stderr: reply.stderr,
        exit_code: status.exit_code,
    })
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
            return Err(too_much_output(which));
        }
        out.extend_from_slice(&chunk.data);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(stdout: usize, stderr: usize) -> pb::ExecSyncResponse {
        pb::ExecSyncResponse {
            stdout: vec![b'o'; stdout],
            stderr: vec![b'e'; stderr],
            status: Some(pb::WaitProcessResponse {
                exit_code: 3,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_reply_within_the_limit_becomes_the_cri_reply() {
        let r = exec_sync_reply(reply(10, 2), 10).unwrap();
        assert_eq!((r.stdout.len(), r.stderr.len(), r.exit_code), (10, 2, 3));
    }

    #[test]
    fn the_guest_cannot_pass_more_than_the_limit_or_omit_the_status() {
        for (out, err, which) in [(11, 0, "stdout"), (0, 11, "stderr")] {
            match exec_sync_reply(reply(out, err), 10) {
                Err(RuntimeError::ResourceExhausted(m)) => assert!(m.contains(which), "{m}"),
                other => panic!("{other:?}"),
            }
        }
        let mut r = reply(1, 1);
        r.status = None;
        assert!(matches!(
            exec_sync_reply(r, 10),
            Err(RuntimeError::Internal(_))
        ));
    }

    #[test]
    fn an_exceeded_stream_is_named_even_if_the_guest_garbles_it() {
        let mut r = reply(0, 0);
        r.output_exceeded = true;
        r.exceeded_stream = OutputStream::Stderr as i32;
        match exec_sync_reply(r.clone(), 10) {
            Err(RuntimeError::ResourceExhausted(m)) => assert!(m.contains("stderr"), "{m}"),
            other => panic!("{other:?}"),
        }
        r.exceeded_stream = 77;
        assert!(matches!(
            exec_sync_reply(r, 10),
            Err(RuntimeError::ResourceExhausted(_))
        ));
    }
}
