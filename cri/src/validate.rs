//! Checks of CRI request fields that name host paths: the caller is trusted to run
//! pods, not to make vesseld write or read arbitrary host files.

use std::io::Read as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
use std::path::{Component, Path};

/// Largest Localhost seccomp profile read (real ones are a few KiB).
pub const MAX_SECCOMP_PROFILE: u64 = 1 << 20;

/// A request field refused.
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum InvalidInput {
    /// `log_path` would leave the pod's `log_directory`.
    #[error(
        "log_path {path:?}: {reason}; it must be a relative path without \"..\" inside \
         the pod's log_directory"
    )]
    LogPath { path: String, reason: &'static str },
    /// A Localhost seccomp profile that cannot be used.
    #[error("seccomp profile {path:?}: {reason}")]
    SeccompProfile { path: String, reason: String },
    /// A mount a pod VM cannot give as asked.
    #[error("mount of {host_path:?} at {container_path:?}: {reason}")]
    Mount {
        host_path: String,
        container_path: String,
        reason: &'static str,
    },
    /// User namespace options vessel cannot honour.
    #[error("user namespace options: {reason}")]
    UserNamespace { reason: String },
    /// hostIPC: the node's IPC namespace (its shared memory, semaphores, message
    /// queues) lives in the host kernel, which a pod VM's processes cannot reach.
    #[error(
        "hostIPC pods are not supported: vessel runs each pod in its own VM, whose \
         containers cannot share the node's IPC namespace; drop hostIPC (containers of \
         one pod always share the pod's IPC namespace)"
    )]
    HostIpc,
}

/// Refuses a pod that asks for the node's IPC namespace: giving it the VM's own
/// instead would silently break what hostIPC is for (talking to host processes).
pub fn host_ipc(config: &k8s_cri::v1::PodSandboxConfig) -> Result<(), InvalidInput> {
    let ipc = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref())
        .map(|n| n.ipc);
    match ipc == Some(k8s_cri::v1::NamespaceMode::Node as i32) {
        true => Err(InvalidInput::HostIpc),
        false => Ok(()),
    }
}

/// Checks what a CRI mount asks for against what a pod VM can give. Bidirectional
/// (rshared) propagation would need the container's mounts to reach the host, which
/// no mount crosses a VM boundary to do; a recursive read-only mount must be
/// read-only and private (as the CRI requires of every runtime).
pub fn mount(m: &k8s_cri::v1::Mount) -> Result<(), InvalidInput> {
    use k8s_cri::v1::MountPropagation;
    let bad = |reason| InvalidInput::Mount {
        host_path: m.host_path.clone(),
        container_path: m.container_path.clone(),
        reason,
    };
    let propagation = MountPropagation::try_from(m.propagation).unwrap_or_default();
    if propagation == MountPropagation::PropagationBidirectional {
        return Err(bad(
            "bidirectional (rshared) propagation cannot cross the pod's VM boundary; \
             use PROPAGATION_PRIVATE or PROPAGATION_HOST_TO_CONTAINER",
        ));
    }
    if m.recursive_read_only {
        if !m.readonly {
            return Err(bad("recursive_read_only needs readonly to be set"));
        }
        if propagation != MountPropagation::PropagationPrivate {
            return Err(bad("recursive_read_only needs PROPAGATION_PRIVATE"));
        }
    }
    Ok(())
}

/// The container's log file: `log_path` under the pod's `log_directory`. Empty when
/// either is empty (no log). `log_path` must be relative, free of `..` and NUL.
pub fn log_path(log_directory: &str, log_path: &str) -> Result<String, InvalidInput> {
    if log_directory.is_empty() || log_path.is_empty() {
        return Ok(String::new());
    }
    let bad = |reason| InvalidInput::LogPath {
        path: log_path.to_owned(),
        reason,
    };
    if log_path.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    let rel = Path::new(log_path);
    let mut normal = 0;
    for c in rel.components() {
        match c {
            Component::Normal(_) => normal += 1,
            Component::CurDir => {}
            Component::ParentDir => return Err(bad("contains \"..\"")),
            Component::RootDir | Component::Prefix(_) => return Err(bad("is absolute")),
        }
    }
    if normal == 0 || log_path.ends_with('/') {
        return Err(bad("names no file"));
    }
    Ok(Path::new(log_directory)
        .join(rel)
        .to_string_lossy()
        .into_owned())
}

/// Reads a Localhost seccomp profile (the kubelet passes absolute paths; their
/// directories may be symlinks): a regular file of at most [`MAX_SECCOMP_PROFILE`]
/// bytes of UTF-8. Runs on a blocking thread: a path on a slow or hung filesystem
/// must not stall the async workers.
pub async fn seccomp_profile(path: &str) -> Result<String, InvalidInput> {
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || read_profile(Path::new(&owned)))
        .await
        .map_err(|e| InvalidInput::SeccompProfile {
            path: path.to_owned(),
            reason: format!("read task failed: {e}"),
        })?
        .map_err(|reason| InvalidInput::SeccompProfile {
            path: path.to_owned(),
            reason,
        })
}

fn read_profile(path: &Path) -> Result<String, String> {
    if path.as_os_str().as_bytes().contains(&0) {
        return Err("contains a NUL byte".into());
    }
    if !path.is_absolute() {
        return Err("must be an absolute path".into());
    }
    // O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOCTTY: a terminal
    // must not become ours. The type is checked on the opened file, not the name.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    let ft = meta.file_type();
    if !ft.is_file() {
        let what = if ft.is_dir() {
            "a directory"
        } else if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_char_device() || ft.is_block_device() {
            "a device"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(format!("is {what}, not a regular file"));
    }
    if meta.len() > MAX_SECCOMP_PROFILE {
        return Err(format!(
            "is {} bytes, over the limit of {MAX_SECCOMP_PROFILE}",
            meta.len()
        ));
    }
    // The file may grow after the stat: read at most one byte past the limit.
    let mut data = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_SECCOMP_PROFILE + 1)
        .read_to_end(&mut data)
        .map_err(|e| e.to_string())?;
    if data.len() as u64 > MAX_SECCOMP_PROFILE {
        return Err(format!("is over the limit of {MAX_SECCOMP_PROFILE} bytes"));
    }
    String::from_utf8(data).map_err(|_| "is not UTF-8".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_a_vm_cannot_give_are_refused() {
        use k8s_cri::v1::{Mount, MountPropagation as P};
        let m = |readonly, recursive_read_only, propagation: P| Mount {
            host_path: "/srv/data".into(),
            container_path: "/data".into(),
            readonly,
            recursive_read_only,
            propagation: propagation as i32,
            ..Default::default()
        };
        assert!(mount(&m(false, false, P::PropagationPrivate)).is_ok());
        assert!(mount(&m(true, false, P::PropagationHostToContainer)).is_ok());
        assert!(mount(&m(true, true, P::PropagationPrivate)).is_ok());
        for (bad, why) in [
            (
                m(false, false, P::PropagationBidirectional),
                "bidirectional",
            ),
            (m(false, true, P::PropagationPrivate), "needs readonly"),
            (
                m(true, true, P::PropagationHostToContainer),
                "PROPAGATION_PRIVATE",
            ),
            (m(true, true, P::PropagationBidirectional), "bidirectional"),
        ] {
            let e = mount(&bad).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("/srv/data"), "{e}");
        }
    }

    #[test]
    fn log_paths_stay_in_the_log_directory() {
        let dir = "/var/log/pods/ns_pod_uid";
        assert_eq!(log_path(dir, "c/0.log").unwrap(), format!("{dir}/c/0.log"));
        assert_eq!(
            log_path(dir, "./c_0.log").unwrap(),
            format!("{dir}/./c_0.log")
        );
        assert_eq!(log_path("", "c/0.log").unwrap(), "");
        assert_eq!(log_path(dir, "").unwrap(), "");
        for (bad, why) in [
            ("../../etc/cron.d/x", "\"..\""),
            ("c/../../x", "\"..\""),
            ("/etc/passwd", "absolute"),
            ("c/0.log\0x", "NUL"),
            (".", "names no file"),
            ("c/", "names no file"),
        ] {
            let e = log_path(dir, bad).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(why), "{bad}: {msg}");
            assert!(msg.contains("log_directory"), "{msg}");
        }
    }

    #[tokio::test]
    async fn seccomp_profiles_must_be_small_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let good = d.join("profile.json");
        std::fs::write(&good, br#"{"defaultAction":"SCMP_ACT_ALLOW"}"#).unwrap();
        // Through a symlinked directory, as kubelet paths may be.
        std::os::unix::fs::symlink(d, d.join("link")).unwrap();
        let via_link = d.join("link/profile.json");
        for p in [&good, &via_link] {
            let text = seccomp_profile(p.to_str().unwrap()).await.unwrap();
            assert!(text.contains("SCMP_ACT_ALLOW"));
        }

        let big = d.join("big.json");
        std::fs::write(&big, vec![b' '; (MAX_SECCOMP_PROFILE + 1) as usize]).unwrap();
        let fifo = d.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let cases: Vec<(String, &str)> = vec![
            (big.display().to_string(), "over the limit"),
            (fifo.display().to_string(), "FIFO"),
            ("/dev/null".into(), "device"),
            (d.display().to_string(), "directory"),
            ("relative/profile.json".into(), "absolute"),
            (d.join("missing").display().to_string(), "No such file"),
        ];
        for (path, why) in cases {
            let t = std::time::Instant::now();
            let e = seccomp_profile(&path).await.unwrap_err().to_string();
            assert!(e.contains(why), "{path}: {e}");
            assert!(
                t.elapsed() < std::time::Duration::from_secs(5),
                "{path} blocked"
            );
        }
    }

    #[test]
    fn host_ipc_is_refused_with_what_to_do() {
        use k8s_cri::v1 as cri;
        let with_ipc = |ipc: cri::NamespaceMode| cri::PodSandboxConfig {
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        ipc: ipc as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = host_ipc(&with_ipc(cri::NamespaceMode::Node)).unwrap_err();
        assert!(e.to_string().contains("drop hostIPC"), "{e}");
        assert!(host_ipc(&with_ipc(cri::NamespaceMode::Pod)).is_ok());
        assert!(host_ipc(&cri::PodSandboxConfig::default()).is_ok());
    }
}
