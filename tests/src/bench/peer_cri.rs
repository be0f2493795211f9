//! The CRI peer of rows 2-4: a private containerd 1.6 with its CRI plugin and runc,
//! inside a network namespace the harness creates, driven by the same CRI calls as
//! vesseld. Everything it starts lives under its own dir (root, state, sockets,
//! runc state, pod netns mounts) and one cgroup parent, so it can all be found and
//! removed again, also after a failure.

use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use k8s_cri::v1 as cri;

use super::janitor::{cgroup_pids, pids_naming, remove_cgroup, unmount_under};
use super::pods;
use super::stats::Samples;
use crate::cri::CriClient;

const START_LIMIT: Duration = Duration::from_secs(30);
/// The peer's bridge and subnet: distinct from vessel's example conflist
/// (`vessel0`, 10.88.0.0/16), so the two never clash even in one namespace.
pub const PEER_BRIDGE: &str = "vbpeer0";
pub const PEER_SUBNET: &str = "10.89.0.0/16";

/// containerd's config: CRI with runc (cgroupfs), CNI from `conflist_dir`, images
/// from the harness's plain-HTTP registry (`certs_dir`'s hosts.toml), the pause
/// stand-in as sandbox image, every path under `dir`. OOM scores are capped at
/// containerd's own: runc fails to lower them (-998 for sandboxes) where the
/// harness itself may not, as in a sandboxed build host.
pub fn config_toml(dir: &Path, pause: &str) -> String {
    let p = |sub: &str| format!("{:?}", dir.join(sub).display().to_string());
    format!(
        "version = 2\nroot = {root}\nstate = {state}\n\
         disabled_plugins = [\"io.containerd.snapshotter.v1.aufs\", \
         \"io.containerd.snapshotter.v1.btrfs\", \"io.containerd.snapshotter.v1.zfs\", \
         \"io.containerd.snapshotter.v1.devmapper\"]\n\
         [grpc]\naddress = {sock}\n[ttrpc]\naddress = {ttrpc}\n\
         [plugins.\"io.containerd.internal.v1.opt\"]\npath = {opt}\n\
         [plugins.\"io.containerd.grpc.v1.cri\"]\nsandbox_image = {pause:?}\n\
         netns_mounts_under_state_dir = true\ndisable_apparmor = true\n\
         restrict_oom_score_adj = true\n\
         [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n\
         default_runtime_name = \"runc\"\nsnapshotter = \"overlayfs\"\n\
         [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n\
         runtime_type = \"io.containerd.runc.v2\"\n\
         [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]\n\
         SystemdCgroup = false\nRoot = {runc}\n\
         [plugins.\"io.containerd.grpc.v1.cri\".cni]\nbin_dir = \"/usr/lib/cni\"\n\
         conf_dir = {cni}\nmax_conf_num = 1\n\
         [plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = {certs}\n",
        root = p("root"),
        state = p("state"),
        sock = p("containerd.sock"),
        ttrpc = p("containerd.sock.ttrpc"),
        opt = p("opt"),
        runc = p("runc"),
        cni = p("cni"),
        certs = p("certs.d"),
    )
}

/// The conflist of vessel's CNI rows (`example`), with the peer's own bridge,
/// subnet and host-local store.
pub fn peer_conflist(
    example: &serde_json::Value,
    ipam_dir: &Path,
) -> anyhow::Result<serde_json::Value> {
    let mut conf = example.clone();
    conf["name"] = "vbench-peer".into();
    let bridge = conf["plugins"]
        .as_array_mut()
        .and_then(|p| p.iter_mut().find(|p| p["type"] == "bridge"))
        .context("the example conflist has no bridge plugin")?;
    bridge["bridge"] = PEER_BRIDGE.into();
    bridge["ipam"]["ranges"] = serde_json::json!([[{ "subnet": PEER_SUBNET }]]);
    bridge["ipam"]["dataDir"] = ipam_dir.display().to_string().into();
    Ok(conf)
}

/// hosts.toml telling containerd to reach `addr` (`127.0.0.1:port`) over plain HTTP.
pub fn hosts_toml(addr: &str) -> String {
    format!(
        "server = \"http://{addr}\"\n[host.\"http://{addr}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
    )
}

/// A listener on 127.0.0.1:`to.port()` inside `netns` that forwards each
/// connection to `to` on the host's loopback: containerd runs in the namespace,
/// the registry outside it, and nothing is routed between the two.
pub struct LoopbackForward {
    task: tokio::task::JoinHandle<()>,
}

impl LoopbackForward {
    pub fn start(netns: &Path, to: SocketAddr) -> anyhow::Result<Self> {
        let ns = File::open(netns).with_context(|| format!("open {}", netns.display()))?;
        // setns(2) moves only the calling thread: a short-lived one binds the
        // socket, which stays in the namespace it was made in.
        let listener = std::thread::scope(|s| {
            s.spawn(|| -> std::io::Result<std::net::TcpListener> {
                // SAFETY: setns on a valid, open namespace fd; it affects only
                // this thread, which ends right after the bind.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let l = std::net::TcpListener::bind(("127.0.0.1", to.port()))?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .join()
        })
        .map_err(|_| anyhow!("the netns binder thread panicked"))?
        .context("cannot listen inside the namespace")?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
        Ok(Self { task })
    }
}

impl Drop for LoopbackForward {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A private containerd with the CRI plugin, in a namespace; everything it
/// started is killed and removed on drop.
pub struct CriContainerd {
    child: Child,
    dir: PathBuf,
    cgroup: String,
    _forward: LoopbackForward,
}

impl CriContainerd {
    /// Starts it under `dir` in `netns`, pods under cgroup parent `cgroup`, its
    /// images from `registry` (the harness's, on the host's 127.0.0.1).
    pub async fn start(
        dir: &Path,
        netns: &Path,
        registry: SocketAddr,
        pause: &str,
        example_conflist: &serde_json::Value,
        cgroup: &str,
    ) -> anyhow::Result<(Self, CriClient)> {
        for sub in ["cni", "root", "state", "runc"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let conf = peer_conflist(example_conflist, &dir.join("cni-ipam"))?;
        std::fs::write(
            dir.join("cni/10-peer.conflist"),
            serde_json::to_vec_pretty(&conf)?,
        )?;
        let hosts = dir.join("certs.d").join(registry.to_string());
        std::fs::create_dir_all(&hosts)?;
        std::fs::write(hosts.join("hosts.toml"), hosts_toml(&registry.to_string()))?;
        let config = dir.join("config.toml");
        std::fs::write(&config, config_toml(dir, pause))?;
        let forward = LoopbackForward::start(netns, registry)?;

        let log = File::create(dir.join("containerd.log"))?;
        let ns = File::open(netns).with_context(|| format!("open {}", netns.display()))?;
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: between fork and exec only setns(2), async-signal-safe, runs;
        // `ns` stays open in the closure until then.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("cannot run containerd")?;
        let mut me = Self {
            child,
            dir: dir.to_owned(),
            cgroup: cgroup.to_owned(),
            _forward: forward,
        };
        let client = me.wait_ready().await?;
        Ok((me, client))
    }

    /// Until the CRI service answers Status with the runtime and network ready.
    async fn wait_ready(&mut self) -> anyhow::Result<CriClient> {
        let socket = self.dir.join("containerd.sock");
        let deadline = Instant::now() + START_LIMIT;
        let mut last = String::new();
        loop {
            if self.child.try_wait()?.is_some() || Instant::now() > deadline {
                bail!(
                    "containerd's CRI did not become ready ({last}); log:\n{}",
                    self.log()
                );
            }
            if socket.exists() {
                match CriClient::connect(&socket).await {
                    Ok(mut c) => match c
                        .runtime
                        .status(cri::StatusRequest { verbose: false })
                        .await
                    {
                        Ok(s) => {
                            let conditions = s.into_inner().status.map(|s| s.conditions);
                            if conditions.is_some_and(|cs| cs.iter().all(|c| c.status)) {
                                return Ok(c);
                            }
                            last = "conditions not ready".into();
                        }
                        Err(e) => last = e.to_string(),
                    },
                    Err(e) => last = e.to_string(),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// A pod config for this peer: `name`'s as in the vessel rows, its cgroups
    /// under the peer's parent.
    pub fn pod_config(&self, name: &str, log_dir: &Path) -> cri::PodSandboxConfig {
        let mut config = pods::pod_config(name, log_dir);
        config.linux = Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: self.cgroup.clone(),
            ..Default::default()
        });
        config
    }

    /// Processes still in the peer's cgroup (none once every pod is removed).
    pub fn leftover_pids(&self) -> Vec<i32> {
        cgroup_pids(&self.cgroup)
    }
}

impl Drop for CriContainerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The shims name containerd's socket (under dir); the containers only
        // their cgroup.
        for pid in pids_naming(&format!("{}/", self.dir.display())) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        remove_cgroup(&self.cgroup);
        unmount_under(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The issue-17 walk-through's samples, as the vessel rows take them.
#[derive(Debug, Default)]
pub struct Walk {
    pub run_cni: Samples,
    pub teardown: Samples,
    pub create_start: Samples,
    pub stop: Samples,
    pub remove: Samples,
    pub exec: Samples,
}

/// `pods` × (RunPodSandbox with CNI, StopPodSandbox + RemovePodSandbox), then on
/// one pod `containers` × (Create + Start, Stop, Remove) and `execs` × ExecSync
/// `true`: the same calls and configs as vessel's rows 2-4.
pub async fn walk(
    peer: &CriContainerd,
    c: &mut CriClient,
    busybox: &str,
    logs: &Path,
    (n_pods, n_containers, n_execs): (usize, usize, usize),
) -> anyhow::Result<Walk> {
    let mut w = Walk::default();
    for i in 0..n_pods {
        let (id, t) = pods::run_pod(c, peer.pod_config(&format!("peer{i}"), logs)).await?;
        w.run_cni.push_duration(t);
        w.teardown
            .push_duration(pods::stop_and_remove_pod(c, &id).await?);
    }
    let config = peer.pod_config("peer-ctrs", logs);
    std::fs::create_dir_all(&config.log_directory)?;
    let (pod, _) = pods::run_pod(c, config.clone()).await?;
    for i in 0..n_containers {
        let ctr_config = pods::sleeper_config(&format!("c{i}"), busybox);
        let (id, t) = pods::create_and_start(c, &pod, &config, ctr_config.clone()).await?;
        w.create_start.push_duration(t);
        pods::wait_ready(&config, &ctr_config).await?;
        w.stop
            .push_duration(pods::stop_container(c, &id, 10).await?);
        w.remove
            .push_duration(pods::remove_container(c, &id).await?);
    }
    let (ctr, _) =
        pods::create_and_start(c, &pod, &config, pods::sleeper_config("target", busybox)).await?;
    for _ in 0..n_execs {
        w.exec
            .push_duration(pods::exec_sync(c, &ctr, &["true"]).await?);
    }
    pods::stop_and_remove_pod(c, &pod).await?;
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_valid_toml_with_every_path_under_the_dir() {
        let dir = Path::new("/tmp/vbench-x/peer");
        let text = config_toml(dir, "127.0.0.1:5000/bench/pause:1");
        let v: toml::Value = toml::from_str(&text).expect("valid toml");
        assert_eq!(v["root"].as_str(), Some("/tmp/vbench-x/peer/root"));
        assert_eq!(v["state"].as_str(), Some("/tmp/vbench-x/peer/state"));
        assert_eq!(
            v["grpc"]["address"].as_str(),
            Some("/tmp/vbench-x/peer/containerd.sock")
        );
        let cri = &v["plugins"]["io.containerd.grpc.v1.cri"];
        assert_eq!(
            cri["sandbox_image"].as_str(),
            Some("127.0.0.1:5000/bench/pause:1")
        );
        assert_eq!(cri["netns_mounts_under_state_dir"].as_bool(), Some(true));
        assert_eq!(cri["restrict_oom_score_adj"].as_bool(), Some(true));
        assert_eq!(
            cri["containerd"]["runtimes"]["runc"]["options"]["Root"].as_str(),
            Some("/tmp/vbench-x/peer/runc")
        );
        assert_eq!(
            cri["cni"]["conf_dir"].as_str(),
            Some("/tmp/vbench-x/peer/cni")
        );
        assert_eq!(
            cri["registry"]["config_path"].as_str(),
            Some("/tmp/vbench-x/peer/certs.d")
        );
    }

    #[test]
    fn hosts_toml_points_at_plain_http() {
        let v: toml::Value = toml::from_str(&hosts_toml("127.0.0.1:5000")).unwrap();
        assert_eq!(v["server"].as_str(), Some("http://127.0.0.1:5000"));
        assert!(v["host"]["http://127.0.0.1:5000"]["capabilities"].is_array());
    }

    #[test]
    fn peer_conflist_has_its_own_bridge_subnet_and_store() {
        let example_path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/10-vessel.conflist");
        let example: serde_json::Value =
            serde_json::from_slice(&std::fs::read(example_path).unwrap()).unwrap();
        let conf = peer_conflist(&example, Path::new("/tmp/ipam")).unwrap();
        let bridge = &conf["plugins"][0];
        assert_eq!(bridge["bridge"], PEER_BRIDGE);
        assert_ne!(bridge["bridge"], example["plugins"][0]["bridge"]);
        assert_eq!(bridge["ipam"]["ranges"][0][0]["subnet"], PEER_SUBNET);
        assert_ne!(
            bridge["ipam"]["ranges"],
            example["plugins"][0]["ipam"]["ranges"]
        );
        assert_eq!(bridge["ipam"]["dataDir"], "/tmp/ipam");
        // The rest of the chain is the same as vessel's.
        assert_eq!(conf["plugins"].as_array().map(Vec::len), Some(3));
        assert!(peer_conflist(&serde_json::json!({"plugins": []}), Path::new("/x")).is_err());
    }
}
