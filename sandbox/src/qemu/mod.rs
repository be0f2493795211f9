//! The QEMU backend: microvm, launched detached, controlled over QMP.

mod args;
pub mod qmp;

use std::os::fd::AsRawFd;
use std::path::PathBuf;

use async_trait::async_trait;

pub use args::{kernel_cmdline, qemu_args};

use crate::error::{Error, Result};
use crate::helpers::wait_for_socket;
use crate::hypervisor::{Hypervisor, LaunchSpec};
use crate::layout::RunDir;
use crate::process::{spawn_confined, Confine, Proc, SpawnSpec};

/// Backend name in state files.
pub const NAME: &str = "qemu";

/// QEMU (`qemu-system-x86_64`).
#[derive(Debug, Clone)]
pub struct Qemu {
    /// The QEMU program.
    pub binary: PathBuf,
}

impl Default for Qemu {
    fn default() -> Self {
        Self {
            binary: "qemu-system-x86_64".into(),
        }
    }
}

#[async_trait]
impl Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        NAME
    }

    fn spawn(&self, spec: &LaunchSpec<'_>) -> Result<Proc> {
        let ids = spec.confine.and_then(|c| c.ids);
        // An unprivileged QEMU cannot open /dev/vhost-net itself: vhost only with
        // the descriptor vesseld opened.
        let vhost_net = std::path::Path::new("/dev/vhost-net").exists()
            && (ids.is_none() || spec.confine.is_some_and(|c| c.vhost_net.is_some()));
        let mut keep_fds: Vec<_> = spec.config.net.iter().map(|n| n.tap.as_raw_fd()).collect();
        keep_fds.extend(
            spec.config
                .scratch_disk
                .iter()
                .flat_map(|d| [d.file.as_raw_fd(), d.file_ro.as_raw_fd()]),
        );
        let mut confine = Confine::default();
        // An unprivileged QEMU may not be able to reach the guest files' directories
        // (a checkout under a 0700 home): vesseld opens them and QEMU reads them
        // through /proc/self/fd, which needs only the files themselves readable.
        let mut args = qemu_args(spec, vhost_net);
        let mut guest_files = Vec::new();
        if spec.confine.is_some_and(|c| c.ids.is_some()) {
            for (flag, p) in [
                ("-kernel", &spec.config.kernel),
                ("-initrd", &spec.config.initrd),
            ] {
                let f = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
                let by_fd = format!("/proc/self/fd/{}", f.as_raw_fd());
                if let Some(i) = args.iter().position(|a| a == flag) {
                    args[i + 1] = by_fd.into();
                }
                keep_fds.push(f.as_raw_fd());
                guest_files.push(f);
            }
        }
        if let Some(c) = spec.confine {
            keep_fds.extend(
                [&c.console, &c.vhost_vsock, &c.vhost_net]
                    .into_iter()
                    .flatten()
                    .map(|f| f.as_raw_fd()),
            );
            confine.cgroup_procs = c.cgroup_procs.iter().map(|f| f.as_raw_fd()).collect();
            confine.cwd = Some(spec.dir.jail());
            confine.oom_score_adj = c.oom_score_adj;
            if let Some(ids) = c.ids {
                confine.user = Some((ids.uid, ids.gid));
                let cfg = spec.config;
                confine.private_tmp = Some(vec![
                    spec.dir.root().to_path_buf(),
                    cfg.kernel.clone(),
                    cfg.initrd.clone(),
                ]);
                if spec.accel == crate::accel::ResolvedAccel::Kvm {
                    // QEMU 7 takes no /dev/kvm descriptor: the device's group instead.
                    confine.groups = crate::jail::kvm_group(std::path::Path::new("/dev/kvm"))?
                        .into_iter()
                        .collect();
                }
            }
        }
        spawn_confined(
            &SpawnSpec {
                program: &self.binary,
                args,
                log: &spec.dir.qemu_log(),
                netns: spec.config.netns.as_deref(),
                keep_fds,
            },
            &confine,
        )
    }

    async fn wait_ready(&self, spec: &LaunchSpec<'_>, vmm: &Proc) -> Result<()> {
        // QEMU creates the QMP socket once its command line is accepted; a bad
        // argument or missing kernel makes it exit first.
        let (qmp, log) = (spec.dir.qmp(), spec.dir.qemu_log());
        wait_for_socket(vmm, &qmp, "qemu", &log, spec.config.timeouts.helper_ready).await
    }

    async fn power_down(&self, dir: &RunDir) -> Result<()> {
        qmp::execute(&dir.qmp(), "system_powerdown", None)
            .await
            .map(drop)
    }

    async fn quit(&self, dir: &RunDir) -> Result<()> {
        match qmp::execute(&dir.qmp(), "quit", None).await {
            Ok(_) => Ok(()),
            // QEMU may close the socket before its answer arrives.
            Err(Error::Qmp(m)) if m.contains("connection closed") => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn resume(&self, dir: &RunDir) -> Result<()> {
        qmp::execute(&dir.qmp(), "cont", None).await.map(drop)
    }

    async fn is_running(&self, dir: &RunDir) -> Result<bool> {
        let status = qmp::execute(&dir.qmp(), "query-status", None).await?;
        Ok(status
            .get("running")
            .and_then(|v| v.as_bool())
            .unwrap_or(false))
    }
}
