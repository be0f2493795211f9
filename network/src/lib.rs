//! Pod networking for vessel: a named network namespace per pod, the CNI plugin chain
//! run into it, and a tap device joined to the CNI veth by tc redirects, plus the plan
//! for the guest's side. Knows nothing about VMs or CRI: the runtime hands the tap fd
//! to the hypervisor and the plan to the guest agent.
//!
//! ```no_run
//! # async fn demo() -> vessel_network::Result<()> {
//! use vessel_network::{NetworkConfig, NetworkManager, PodNetworkRequest};
//! let net = NetworkManager::new(NetworkConfig::new("/run/vessel".as_ref(), "/var/lib/vessel".as_ref()));
//! let pod = net
//!     .setup(&PodNetworkRequest { pod_id: "abc".into(), ..Default::default() })
//!     .await?;
//! // give pod.tap.into_fd() to QEMU, pod.plan to the agent … later:
//! net.teardown("abc").await?;
//! # Ok(()) }
//! ```

pub mod cni;
mod error;
mod ip;
mod netns;
mod plan;
mod tap;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use cni::{Attachment, Cni, CniResult, NetworkConfigList, PluginError, PortMapping};
pub use error::{Error, Result};
pub use ip::{IpPrefix, ParseIpPrefixError};
pub use netns::NetNs;
pub use plan::{GuestDns, GuestInterface, GuestNetworkPlan, GuestRoute};
pub use tap::{
    connect_tap, create_tap, read_link, remove_tap, setup_tap, LinkInfo, LinkRoute, TapDevice,
};

/// The interface CNI creates in the pod namespace.
pub const POD_IFNAME: &str = "eth0";
/// The tap the VM's NIC is backed by, next to [`POD_IFNAME`].
pub const TAP_NAME: &str = "tap0";

/// Where things live and which network to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// Pod namespaces are pinned at `<netns_dir>/<pod id>`.
    pub netns_dir: PathBuf,
    /// CNI configs (`*.conflist`, `*.conf`, `*.json`).
    pub cni_conf_dir: PathBuf,
    /// Plugin binaries, searched in order; also the plugins' `CNI_PATH`.
    pub cni_bin_dirs: Vec<PathBuf>,
    /// ADD results (needed for DEL after a restart): keep it on persistent storage.
    pub cni_cache_dir: PathBuf,
    /// A network name to pick, instead of the lexically first config file.
    pub network_name: Option<String>,
    /// Limit per plugin call.
    pub plugin_timeout: Duration,
}

impl NetworkConfig {
    /// Defaults: netns under `<run_root>/netns`, cache under `<state_root>/cni`,
    /// configs in `/etc/cni/net.d`, plugins in `/opt/cni/bin` then `/usr/lib/cni`.
    pub fn new(run_root: &Path, state_root: &Path) -> NetworkConfig {
        NetworkConfig {
            netns_dir: run_root.join("netns"),
            cni_conf_dir: "/etc/cni/net.d".into(),
            cni_bin_dirs: vec!["/opt/cni/bin".into(), "/usr/lib/cni".into()],
            cni_cache_dir: state_root.join("cni"),
            network_name: None,
            plugin_timeout: Duration::from_secs(60),
        }
    }
}

/// Who the pod is (for `CNI_ARGS`) and which host ports it wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodNetworkRequest {
    /// The sandbox id: netns name and `CNI_CONTAINERID`.
    pub pod_id: String,
    pub pod_name: String,
    pub pod_namespace: String,
    pub pod_uid: String,
    pub port_mappings: Vec<PortMapping>,
}

/// A set-up pod network.
#[derive(Debug)]
pub struct PodNetwork {
    pub netns: NetNs,
    /// The open tap; dropping it deletes the tap, so pass the fd on first.
    pub tap: TapDevice,
    /// The CNI veth inside the pod namespace, as the plugins left it.
    pub veth: LinkInfo,
    pub result: CniResult,
    pub plan: GuestNetworkPlan,
}

/// A pod namespace with its tap, before any CNI ADD ([`NetworkManager::prepare`]).
#[derive(Debug)]
pub struct PreparedNetwork {
    pub netns: NetNs,
    /// The open tap; dropping it deletes the tap, so pass the fd on first.
    pub tap: TapDevice,
}

/// What [`NetworkManager::attach`] added to a prepared namespace.
#[derive(Debug)]
pub struct AttachedNetwork {
    /// The CNI veth inside the pod namespace, as the plugins left it.
    pub veth: LinkInfo,
    pub result: CniResult,
    pub plan: GuestNetworkPlan,
}

/// Sets up and tears down pod networks.
#[derive(Debug, Clone)]
pub struct NetworkManager {
    config: NetworkConfig,
    cni: Cni,
}

impl NetworkManager {
    pub fn new(config: NetworkConfig) -> NetworkManager {
        let cni = Cni::new(config.cni_bin_dirs.clone(), &config.cni_cache_dir)
            .with_timeout(config.plugin_timeout);
        NetworkManager { config, cni }
    }

    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    pub fn cni(&self) -> &Cni {
        &self.cni
    }

    /// The pod's namespace (whether or not it exists).
    pub fn netns(&self, pod_id: &str) -> NetNs {
        NetNs::at(self.config.netns_dir.join(pod_id))
    }

    /// The network config a new pod gets (re-read every time: configs may change).
    pub fn network_config(&self) -> Result<NetworkConfigList> {
        NetworkConfigList::load(
            &self.config.cni_conf_dir,
            self.config.network_name.as_deref(),
        )
    }

    /// netns + tap → CNI ADD → tc redirect → guest plan. On failure every step taken
    /// is undone before the error is returned.
    ///
    /// CNI plugins run as children of the calling thread: host-side interfaces and
    /// iptables rules land in the caller's network namespace.
    pub async fn setup(&self, req: &PodNetworkRequest) -> Result<PodNetwork> {
        let prepared = self.prepare(&req.pod_id).await?;
        match self.attach(req, &prepared.netns).await {
            Ok(a) => Ok(PodNetwork {
                netns: prepared.netns,
                tap: prepared.tap,
                veth: a.veth,
                result: a.result,
                plan: a.plan,
            }),
            Err(e) => {
                let ns = prepared.netns.clone();
                drop(prepared.tap);
                let _ = blocking(move || ns.remove()).await;
                Err(e)
            }
        }
    }

    /// The pod's namespace and its tap, not yet joined to any network: a VM can boot
    /// on the tap before the pod (and its CNI ADD) is known. Undone on failure.
    pub async fn prepare(&self, pod_id: &str) -> Result<PreparedNetwork> {
        netns::check_name(pod_id)?;
        let dir = self.config.netns_dir.clone();
        let id = pod_id.to_owned();
        let ns = blocking(move || NetNs::create(&dir, &id)).await?;
        let ns2 = ns.clone();
        match blocking(move || create_tap(&ns2, TAP_NAME)).await {
            Ok(tap) => Ok(PreparedNetwork { netns: ns, tap }),
            Err(e) => {
                let ns2 = ns.clone();
                let _ = blocking(move || ns2.remove()).await;
                Err(e)
            }
        }
    }

    /// CNI ADD into a prepared namespace, then the tap joined to the new veth. On
    /// failure the ADD is undone (DEL); the namespace and tap stay, the caller's.
    pub async fn attach(&self, req: &PodNetworkRequest, ns: &NetNs) -> Result<AttachedNetwork> {
        netns::check_name(&req.pod_id)?;
        let net = self.network_config()?;
        let att = self.attachment(req);
        let result = match self.cni.add(&net, &att, ns.path()).await {
            Ok(r) => r,
            Err(e) => {
                let _ = self.cni.del(Some(&net), &att, Some(ns.path())).await;
                return Err(e);
            }
        };
        let ns2 = ns.clone();
        match blocking(move || connect_tap(&ns2, POD_IFNAME, TAP_NAME)).await {
            Ok(veth) => {
                let plan = GuestNetworkPlan::new(&result, &veth, POD_IFNAME);
                Ok(AttachedNetwork { veth, result, plan })
            }
            Err(e) => {
                let _ = self.cni.del(Some(&net), &att, Some(ns.path())).await;
                Err(e)
            }
        }
    }

    /// Tap deleted, CNI DEL (cached config and result), netns removed. Idempotent; every
    /// step is attempted even if an earlier one fails. If DEL fails the cache entry is
    /// kept so a retry can finish it.
    pub async fn teardown(&self, pod_id: &str) -> Result<()> {
        netns::check_name(pod_id)?;
        let ns = self.netns(pod_id);
        let att = Attachment {
            container_id: pod_id.to_string(),
            ifname: POD_IFNAME.to_string(),
            ..Default::default()
        };
        let fallback = self.network_config().ok();
        self.undo(&ns, &att, fallback.as_ref(), true).await
    }

    /// CNI CHECK against the cached result.
    pub async fn check(&self, pod_id: &str) -> Result<()> {
        let att = Attachment {
            container_id: pod_id.to_string(),
            ifname: POD_IFNAME.to_string(),
            ..Default::default()
        };
        self.cni.check(&att, self.netns(pod_id).path()).await
    }

    fn attachment(&self, req: &PodNetworkRequest) -> Attachment {
        Attachment {
            container_id: req.pod_id.clone(),
            ifname: POD_IFNAME.to_string(),
            pod_namespace: req.pod_namespace.clone(),
            pod_name: req.pod_name.clone(),
            pod_uid: req.pod_uid.clone(),
            port_mappings: req.port_mappings.clone(),
        }
    }

    async fn undo(
        &self,
        ns: &NetNs,
        att: &Attachment,
        fallback: Option<&NetworkConfigList>,
        tap: bool,
    ) -> Result<()> {
        let mut errors = Vec::new();
        if tap {
            let ns2 = ns.clone();
            if let Err(e) = blocking(move || remove_tap(&ns2, TAP_NAME)).await {
                errors.push(e);
            }
        }
        if let Err(e) = self.cni.del(fallback, att, Some(ns.path())).await {
            errors.push(e);
        }
        let ns2 = ns.clone();
        if let Err(e) = blocking(move || ns2.remove()).await {
            errors.push(e);
        }
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(Error::Teardown(errors)),
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| Error::ThreadPanicked)?
}
