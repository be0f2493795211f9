//! Container volumes: binds into the pod's share dir, which live only in the mount
//! namespace of the pod's virtiofsd (see `vessel_storage::sharedir`). Mount work
//! blocks (a thread enters virtiofsd's namespace), so it runs off the async workers.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use k8s_cri::v1 as cri;
use vessel_storage::sharedir::{Propagation, VolumeOptions};
use vessel_storage::StorageError;

use crate::engine::{LivePod, RuntimeError};

/// One volume to bind: its index in the container config, host source, options.
pub struct Volume {
    pub index: usize,
    pub source: PathBuf,
    pub opts: VolumeOptions,
}

impl Volume {
    /// From a validated CRI mount (bidirectional propagation is refused earlier).
    pub fn of(index: usize, m: &cri::Mount) -> Self {
        let propagation = match cri::MountPropagation::try_from(m.propagation) {
            Ok(cri::MountPropagation::PropagationHostToContainer) => Propagation::HostToContainer,
            _ => Propagation::Private,
        };
        Volume {
            index,
            source: PathBuf::from(&m.host_path),
            opts: VolumeOptions {
                readonly: m.readonly,
                recursive_readonly: m.recursive_read_only,
                propagation,
            },
        }
    }
}

/// A descriptor of the pod's virtiofsd that a blocking task can own.
fn exporter(live: &LivePod) -> Option<std::io::Result<OwnedFd>> {
    live.vm.share_exporter().map(|fd| fd.try_clone_to_owned())
}

/// Binds `volumes` for container `id`; returns each one's path in the exported
/// tree, in order.
pub async fn bind(
    live: &LivePod,
    id: &str,
    volumes: Vec<Volume>,
) -> Result<Vec<String>, RuntimeError> {
    if volumes.is_empty() {
        return Ok(Vec::new());
    }
    let exporter = exporter(live)
        .ok_or_else(|| RuntimeError::precondition("the pod VM has no virtiofsd for volumes"))?
        .map_err(|e| RuntimeError::internal(format!("cannot reach the pod's virtiofsd: {e}")))?;
    let share = live.share.clone();
    let id = id.to_owned();
    tokio::task::spawn_blocking(move || {
        volumes
            .iter()
            .map(|v| {
                share
                    .bind_volume(exporter.as_fd(), &id, v.index, &v.source, v.opts)
                    .map_err(|e| {
                        RuntimeError::internal(format!("volume {}: {e}", v.source.display()))
                    })
            })
            .collect()
    })
    .await
    .map_err(|e| RuntimeError::task("volume bind", e))?
}

/// Unmounts and removes container `id`'s volumes.
pub async fn release(live: &LivePod, id: &str) -> Result<(), StorageError> {
    // Without a descriptor (virtiofsd gone) removing the mount points is enough.
    let exporter = exporter(live).and_then(Result::ok);
    let share = live.share.clone();
    let id = id.to_owned();
    tokio::task::spawn_blocking(move || {
        share.release_container(exporter.as_ref().map(|fd| fd.as_fd()), &id)
    })
    .await
    .unwrap_or_else(|e| {
        Err(StorageError::Io {
            op: "release volumes",
            path: PathBuf::new(),
            source: std::io::Error::other(e.to_string()),
        })
    })
}
