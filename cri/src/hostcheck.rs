//! The `RuntimeReady` condition: whether this host can start a pod VM with the default
//! runtime handler (QEMU, the helpers and the guest image are all there).

use std::sync::Arc;

use k8s_cri::v1 as cri;
use vessel_sandbox::preflight::{host_problems, HostNeeds};
use vessel_sandbox::Binaries;

use crate::config::{Config, DEFAULT_HANDLER};

/// Problems that keep the default handler from starting a VM (empty: none).
pub fn default_handler_problems(config: &Config) -> Vec<String> {
    let handler = config.runtimes.get(DEFAULT_HANDLER);
    let kernel = handler
        .and_then(|h| h.kernel.as_deref())
        .unwrap_or(&config.guest.kernel);
    let initrd = handler
        .and_then(|h| h.initrd.as_deref())
        .unwrap_or(&config.guest.initrd);
    let mut problems = host_problems(&HostNeeds::new(&Binaries::default(), kernel, initrd));
    let wants_disk = handler.is_some_and(|h| h.writable_layer_mib > 0);
    if wants_disk && crate::scratch::mkfs_ext4().is_none() {
        problems.push(format!(
            "{} not found (install e2fsprogs, or set writable_layer_mib = 0)",
            crate::scratch::MKFS_EXT4
        ));
    }
    problems
}

/// The condition for the Status call. The checks search PATH and stat files, so
/// they run on the blocking pool, not on the async worker serving the call.
pub async fn runtime_condition(config: Arc<Config>) -> cri::RuntimeCondition {
    let problems = tokio::task::spawn_blocking(move || default_handler_problems(&config))
        .await
        .unwrap_or_else(|e| vec![format!("the host check failed: {e}")]);
    cri::RuntimeCondition {
        r#type: "RuntimeReady".into(),
        status: problems.is_empty(),
        reason: if problems.is_empty() {
            String::new()
        } else {
            "PodVmUnavailable".into()
        },
        message: problems.join("; "),
    }
}
