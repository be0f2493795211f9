//! The helper daemons of a pod VM: virtiofsd (the share dir) and vhost-device-vsock
//! (the agent channel where the host has no kernel vhost-vsock).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::config::Binaries;
use crate::error::{Error, Result};
use crate::layout::RunDir;
use crate::process::{spawn_detached, Proc, SpawnSpec};

/// Guest CID the vhost-user vsock device gives the guest (the device is per VM, so
/// every VM can use the same one).
pub const HYBRID_GUEST_CID: u32 = 3;

/// Starts virtiofsd exporting `share_dir` and waits for its socket.
pub async fn start_virtiofsd(
    bins: &Binaries,
    dir: &RunDir,
    share_dir: &Path,
    timeout: Duration,
) -> Result<Proc> {
    let p = spawn_virtiofsd(bins, dir, share_dir)?;
    wait_for_socket(&p, &dir.fs_socket(), "virtiofsd", &dir.fs_log(), timeout).await?;
    Ok(p)
}

/// Spawns virtiofsd exporting `share_dir`; its socket appears later.
pub fn spawn_virtiofsd(bins: &Binaries, dir: &RunDir, share_dir: &Path) -> Result<Proc> {
    let sock = dir.fs_socket();
    let mut socket_arg = std::ffi::OsString::from("--socket-path=");
    socket_arg.push(&sock);
    let mut share_arg = std::ffi::OsString::from("--shared-dir=");
    share_arg.push(share_dir);
    spawn_detached(&SpawnSpec {
        program: &bins.virtiofsd,
        args: vec![socket_arg, share_arg, "--cache=auto".into()],
        log: &dir.fs_log(),
        netns: None,
        keep_fds: vec![],
    })
}

/// Starts vhost-device-vsock for one VM and waits for its vhost-user socket.
pub async fn start_vsock_helper(bins: &Binaries, dir: &RunDir, timeout: Duration) -> Result<Proc> {
    let p = spawn_vsock_helper(bins, dir)?;
    let name = "vhost-device-vsock";
    wait_for_socket(&p, &dir.vsock_socket(), name, &dir.vsock_log(), timeout).await?;
    Ok(p)
}

/// Spawns vhost-device-vsock for one VM; its sockets appear later.
pub fn spawn_vsock_helper(bins: &Binaries, dir: &RunDir) -> Result<Proc> {
    let sock = dir.vsock_socket();
    let mut vm = std::ffi::OsString::from(format!("guest-cid={HYBRID_GUEST_CID},socket="));
    vm.push(&sock);
    vm.push(",uds-path=");
    vm.push(dir.vsock_hybrid());
    spawn_detached(&SpawnSpec {
        program: &bins.vhost_device_vsock,
        args: vec!["--vm".into(), vm],
        log: &dir.vsock_log(),
        netns: None,
        keep_fds: vec![],
    })
}

/// Polls for `path` while `proc` lives. On failure the process is killed.
pub async fn wait_for_socket(
    proc: &Proc,
    path: &Path,
    program: &str,
    log: &Path,
    timeout: Duration,
) -> Result<()> {
    let start = Instant::now();
    loop {
        if path.exists() {
            return Ok(());
        }
        if proc.has_exited() {
            return Err(Error::died(program, &[log]));
        }
        if start.elapsed() > timeout {
            proc.kill().await;
            return Err(Error::Timeout(
                timeout,
                format!("{program} socket {}", path.display()),
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
