//! The helper daemons of a pod VM: virtiofsd (the share dir) and vhost-device-vsock
//! (the agent channel where the host has no kernel vhost-vsock).

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::config::Binaries;
use crate::error::{Error, Result};
use crate::layout::RunDir;
use crate::process::{spawn_confined, spawn_detached, Confine, Proc, SpawnSpec};

/// Capabilities virtiofsd drops for a pod share: the guest creates no device nodes
/// and sets no file capabilities on host files.
pub const VIRTIOFSD_MODCAPS: &str = "--modcaps=-mknod:-setfcap";

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
    std::fs::create_dir_all(dir.jail()).map_err(|e| Error::io(dir.jail(), e))?;
    let mut socket_arg = OsString::from("--socket-path=");
    socket_arg.push(dir.fs_socket());
    spawn_detached(&SpawnSpec {
        program: &bins.virtiofsd,
        args: virtiofsd_args(socket_arg, share_dir),
        log: &dir.fs_log(),
        netns: None,
        keep_fds: vec![],
    })
}

/// Spawns virtiofsd serving the listening socket `listener` (bound by vesseld, so
/// its owner is whoever vesseld chose: the VM's uid). It stays root, for files of
/// every owner, inside its own namespace sandbox and seccomp filter.
pub fn spawn_virtiofsd_on(
    bins: &Binaries,
    dir: &RunDir,
    share_dir: &Path,
    listener: RawFd,
    confine: &Confine,
) -> Result<Proc> {
    spawn_confined(
        &SpawnSpec {
            program: &bins.virtiofsd,
            args: virtiofsd_args(format!("--fd={listener}").into(), share_dir),
            log: &dir.fs_log(),
            netns: None,
            keep_fds: vec![listener],
        },
        confine,
    )
}

fn virtiofsd_args(socket_arg: OsString, share_dir: &Path) -> Vec<OsString> {
    let mut share_arg = OsString::from("--shared-dir=");
    share_arg.push(share_dir);
    vec![
        socket_arg,
        share_arg,
        "--cache=auto".into(),
        // Explicit, though the defaults: a mount namespace rooted at the share dir
        // and virtiofsd's own seccomp filter (kill on a call outside its list).
        "--sandbox=namespace".into(),
        "--seccomp=kill".into(),
        VIRTIOFSD_MODCAPS.into(),
    ]
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
    std::fs::create_dir_all(dir.jail()).map_err(|e| Error::io(dir.jail(), e))?;
    spawn_vsock_helper_confined(bins, dir, &Confine::default())
}

/// `spawn_vsock_helper`, confined (the VM's uid, its cgroup, vesseld's seccomp filter).
pub fn spawn_vsock_helper_confined(
    bins: &Binaries,
    dir: &RunDir,
    confine: &Confine,
) -> Result<Proc> {
    let (mut sock, mut hybrid) = (dir.vsock_socket(), dir.vsock_hybrid());
    let reachable = || {
        dir.root()
            .parent()
            .is_some_and(|p| crate::jail::check_world_searchable(p).is_ok())
    };
    if confine.cwd.is_some() && !reachable() {
        // Confined, it runs in the jail dir: relative names work where the dirs
        // above the run dir are closed to its uid (absolute ones show whose it is).
        sock = file_name(&sock);
        hybrid = file_name(&hybrid);
    }
    let mut vm = OsString::from(format!("guest-cid={HYBRID_GUEST_CID},socket="));
    vm.push(&sock);
    vm.push(",uds-path=");
    vm.push(hybrid);
    spawn_confined(
        &SpawnSpec {
            program: &bins.vhost_device_vsock,
            args: vec!["--vm".into(), vm],
            log: &dir.vsock_log(),
            netns: None,
            keep_fds: vec![],
        },
        confine,
    )
}

/// The last component of `p`, as a relative path.
pub(crate) fn file_name(p: &Path) -> std::path::PathBuf {
    p.file_name().map(Into::into).unwrap_or_default()
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
        // lstat: the socket's dir may be the VM uid's, never follow what is there.
        if std::fs::symlink_metadata(path).is_ok() {
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
