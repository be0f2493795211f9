//! Pod networking at the CRI level: when a CNI config exists, every pod gets a netns,
//! a CNI attachment and a tap NIC (vessel-network), and its guest is configured from
//! the resulting plan plus the CRI DNS settings. Without a config, pods run without
//! a NIC and the error says why.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use k8s_cri::v1 as cri;
use vessel_network::{GuestNetworkPlan, NetworkManager, PodNetwork, PodNetworkRequest};
use vessel_proto::agent as pb;

use crate::config::Config;
use crate::engine::RuntimeError;

/// The network manager for this daemon's config (netns pins under the run root, the
/// ADD cache under the persistent root so DEL works after a restart).
pub fn manager(config: &Config) -> NetworkManager {
    let mut nc = vessel_network::NetworkConfig::new(&config.run_root, &config.root);
    nc.cni_conf_dir = config.network.cni_conf_dir.clone();
    nc.cni_bin_dirs = config.network.cni_bin_dirs.clone();
    NetworkManager::new(nc)
}

/// Whether `dir` holds a CNI config file: networking is on only then.
pub fn has_config(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        e.path().is_file()
            && [".conflist", ".conf", ".json"]
                .iter()
                .any(|ext| name.ends_with(ext))
    })
}

/// The `NetworkReady` condition.
pub fn network_condition(net: &NetworkManager) -> cri::RuntimeCondition {
    let dir = &net.config().cni_conf_dir;
    let problem = if !has_config(dir) {
        Some(format!(
            "no CNI network config in {}; pods run without a network interface",
            dir.display()
        ))
    } else {
        net.network_config()
            .err()
            .map(|e| format!("CNI config in {} is unusable: {e}", dir.display()))
    };
    cri::RuntimeCondition {
        r#type: "NetworkReady".into(),
        status: problem.is_none(),
        reason: if problem.is_some() {
            "NetworkPluginNotReady".into()
        } else {
            String::new()
        },
        message: problem.unwrap_or_default(),
    }
}

/// Refuses pods that ask for the node's network namespace.
pub fn check_host_network(config: &cri::PodSandboxConfig) -> Result<(), RuntimeError> {
    let network = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref())
        .map(|n| n.network);
    if network == Some(cri::NamespaceMode::Node as i32) {
        return Err(RuntimeError::invalid(
            "hostNetwork pods are not supported: vessel runs each pod in its own VM with its \
             own network, and host networking is not supported yet",
        ));
    }
    Ok(())
}

fn request(id: &str, config: &cri::PodSandboxConfig) -> PodNetworkRequest {
    let meta = config.metadata.clone().unwrap_or_default();
    let port_mappings = config
        .port_mappings
        .iter()
        .filter(|p| p.host_port > 0 && p.container_port > 0)
        .map(|p| vessel_network::PortMapping {
            host_port: u16::try_from(p.host_port).unwrap_or(0),
            container_port: u16::try_from(p.container_port).unwrap_or(0),
            protocol: match cri::Protocol::try_from(p.protocol) {
                Ok(cri::Protocol::Udp) => "udp",
                Ok(cri::Protocol::Sctp) => "sctp",
                _ => "tcp",
            }
            .into(),
            host_ip: p.host_ip.clone(),
        })
        .filter(|p| p.host_port > 0 && p.container_port > 0)
        .collect();
    PodNetworkRequest {
        pod_id: id.to_owned(),
        pod_name: meta.name,
        pod_namespace: meta.namespace,
        pod_uid: meta.uid,
        port_mappings,
    }
}

/// netns + CNI ADD for a new pod, or None when networking is off.
pub async fn setup(
    net: &NetworkManager,
    id: &str,
    config: &cri::PodSandboxConfig,
) -> Result<Option<PodNetwork>, RuntimeError> {
    if !has_config(&net.config().cni_conf_dir) {
        return Ok(None);
    }
    net.setup(&request(id, config))
        .await
        .map(Some)
        .map_err(|e| {
            RuntimeError::internal(format!(
                "pod network setup failed (check the CNI config and plugins): {e}"
            ))
        })
}

/// A pool VM's netns and tap, or None when networking is off.
pub async fn prepare(
    net: &NetworkManager,
    id: &str,
) -> Result<Option<vessel_network::PreparedNetwork>, RuntimeError> {
    if !has_config(&net.config().cni_conf_dir) {
        return Ok(None);
    }
    net.prepare(id).await.map(Some).map_err(|e| {
        RuntimeError::internal(format!(
            "cannot prepare a pod network namespace (check {}): {e}",
            net.config().netns_dir.display()
        ))
    })
}

/// CNI ADD for a pod claiming a pool VM, into the netns made at [`prepare`].
pub async fn attach(
    net: &NetworkManager,
    id: &str,
    config: &cri::PodSandboxConfig,
) -> Result<GuestNetworkPlan, RuntimeError> {
    net.attach(&request(id, config), &net.netns(id))
        .await
        .map(|a| a.plan)
        .map_err(|e| {
            RuntimeError::internal(format!(
                "pod network setup failed (check the CNI config and plugins): {e}"
            ))
        })
}

/// A locally administered unicast MAC for a pool VM's NIC (its pod's veth does not
/// exist yet): random, so two pool VMs on one bridge never share one.
pub fn random_mac() -> String {
    let mut b: [u8; 6] = rand::random();
    b[0] = (b[0] & 0xfe) | 0x02;
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Tap, CNI DEL and netns. Idempotent, also for pods that never had a network.
pub async fn teardown(net: &NetworkManager, id: &str) -> Result<(), RuntimeError> {
    net.teardown(id)
        .await
        .map_err(|e| RuntimeError::internal(format!("pod network teardown failed: {e}")))
}

/// The pod's IPs, IPv4 first (the CRI primary IP is the first).
pub fn pod_ips(plan: &GuestNetworkPlan) -> Vec<String> {
    let mut ips: Vec<_> = plan
        .interfaces
        .iter()
        .flat_map(|i| i.addresses.iter().map(|a| a.addr))
        .collect();
    ips.sort_by_key(|ip| !ip.is_ipv4());
    ips.dedup();
    ips.into_iter().map(|ip| ip.to_string()).collect()
}

/// DNS for the pod: the CRI `dns_config` when given (the kubelet's choice), else
/// what the CNI result says.
fn dns(plan: &GuestNetworkPlan, config: &cri::PodSandboxConfig) -> pb::DnsConfig {
    match &config.dns_config {
        Some(d) if !(d.servers.is_empty() && d.searches.is_empty() && d.options.is_empty()) => {
            pb::DnsConfig {
                servers: d.servers.clone(),
                searches: d.searches.clone(),
                options: d.options.clone(),
            }
        }
        _ => pb::DnsConfig {
            servers: plan.dns.servers.clone(),
            searches: plan.dns.searches.clone(),
            options: plan.dns.options.clone(),
        },
    }
}

/// The agent request configuring the guest from the plan.
pub fn configure_request(
    plan: &GuestNetworkPlan,
    config: &cri::PodSandboxConfig,
) -> pb::ConfigureNetworkRequest {
    let hostname = crate::hostname::pod_hostname(config);
    let hosts = pod_ips(plan)
        .into_iter()
        .map(|ip| pb::HostEntry {
            ip,
            names: vec![hostname.clone()],
        })
        .collect();
    pb::ConfigureNetworkRequest {
        interfaces: plan
            .interfaces
            .iter()
            .map(|i| pb::Interface {
                name: i.name.clone(),
                mac: i.mac.clone(),
                mtu: i.mtu,
                addresses: i
                    .addresses
                    .iter()
                    .map(|a| pb::IpAddress {
                        address: a.addr.to_string(),
                        prefix_len: u32::from(a.prefix_len),
                    })
                    .collect(),
                current_mac: String::new(),
            })
            .collect(),
        routes: plan
            .routes
            .iter()
            .map(|r| pb::Route {
                destination: r.dst.to_string(),
                gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
                device: r.device.clone(),
                metric: 0,
            })
            .collect(),
        hostname,
        dns: Some(dns(plan, config)),
        hosts,
    }
}

/// The pod's /etc/resolv.conf for these servers, search domains and options.
pub fn resolv_conf(servers: &[String], searches: &[String], options: &[String]) -> String {
    let mut resolv = String::new();
    for s in servers {
        resolv.push_str(&format!("nameserver {s}\n"));
    }
    if !searches.is_empty() {
        resolv.push_str(&format!("search {}\n", searches.join(" ")));
    }
    if !options.is_empty() {
        resolv.push_str(&format!("options {}\n", options.join(" ")));
    }
    resolv
}

/// Containers bind-mount the pod files from the share dir: give them the CNI DNS
/// when the CRI sent none, and the pod IPs in /etc/hosts.
pub fn adjust_pod_files(
    files: &mut BTreeMap<&'static str, String>,
    plan: &GuestNetworkPlan,
    config: &cri::PodSandboxConfig,
) {
    let d = dns(plan, config);
    files.insert(
        "resolv.conf",
        resolv_conf(&d.servers, &d.searches, &d.options),
    );
    let name = crate::hostname::pod_hostname(config);
    if let Some(hosts) = files.get_mut("hosts") {
        for ip in pod_ips(plan) {
            hosts.push_str(&format!("{ip}\t{name}\n"));
        }
    }
}

/// The NIC handed to QEMU; the tap fd is shared with the VM config only.
pub fn vm_nic(pod: PodNetwork) -> vessel_sandbox::NetConfig {
    let mac = pod.veth.mac.clone();
    vessel_sandbox::NetConfig {
        tap: Arc::new(pod.tap.into_fd()),
        mac,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vessel_network::{GuestDns, GuestInterface, GuestRoute};

    fn plan() -> GuestNetworkPlan {
        GuestNetworkPlan {
            interfaces: vec![GuestInterface {
                name: "eth0".into(),
                mac: "0a:58:0a:58:00:07".into(),
                mtu: 1500,
                addresses: vec![
                    "fd00::7/64".parse().unwrap(),
                    "10.88.0.7/16".parse().unwrap(),
                ],
            }],
            routes: vec![GuestRoute {
                dst: "0.0.0.0/0".parse().unwrap(),
                gateway: Some("10.88.0.1".parse().unwrap()),
                device: "eth0".into(),
            }],
            dns: GuestDns {
                servers: vec!["10.88.0.53".into()],
                searches: vec!["cni.local".into()],
                options: vec![],
            },
        }
    }

    fn config(dns: Option<cri::DnsConfig>) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "web".into(),
                ..Default::default()
            }),
            dns_config: dns,
            ..Default::default()
        }
    }

    #[test]
    fn request_carries_plan_hostname_and_cri_dns() {
        let cfg = config(Some(cri::DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["ns.svc".into()],
            options: vec!["ndots:5".into()],
        }));
        let r = configure_request(&plan(), &cfg);
        assert_eq!(r.hostname, "web");
        assert_eq!(r.interfaces[0].mac, "0a:58:0a:58:00:07");
        assert_eq!(r.interfaces[0].addresses.len(), 2);
        assert_eq!(r.routes[0].gateway, "10.88.0.1");
        assert_eq!(r.routes[0].destination, "0.0.0.0/0");
        let dns = r.dns.unwrap();
        assert_eq!(dns.servers, ["10.96.0.10"]);
        assert_eq!(dns.options, ["ndots:5"]);
        assert_eq!(r.hosts[0].ip, "10.88.0.7", "IPv4 first");
        assert_eq!(pod_ips(&plan()), ["10.88.0.7", "fd00::7"]);
    }

    #[test]
    fn cni_dns_is_the_fallback() {
        let mut files = crate::podfiles::pod_files(&config(None));
        adjust_pod_files(&mut files, &plan(), &config(None));
        assert_eq!(
            files["resolv.conf"],
            "nameserver 10.88.0.53\nsearch cni.local\n"
        );
        assert!(files["hosts"].contains("10.88.0.7\tweb\n"));
    }

    #[test]
    fn host_network_is_refused() {
        let mut cfg = config(None);
        cfg.linux = Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        let e = check_host_network(&cfg).unwrap_err();
        assert!(matches!(e, RuntimeError::InvalidArgument(_)));
        assert!(e.to_string().contains("host networking is not supported"));
        assert!(check_host_network(&config(None)).is_ok());
    }
}
