//! The guest's network, derived from the CNI result and the veth: plain data the
//! runtime turns into the agent's `ConfigureNetwork` request.

use std::net::IpAddr;

use crate::cni::CniResult;
use crate::ip::IpPrefix;
use crate::tap::LinkInfo;

/// What the guest must configure so that it stands in for the pod's veth.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestNetworkPlan {
    pub interfaces: Vec<GuestInterface>,
    pub routes: Vec<GuestRoute>,
    pub dns: GuestDns,
}

/// One guest NIC. The MAC is the veth's: the guest then receives exactly the frames
/// the host side addresses to the pod, and its replies look like the veth's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInterface {
    /// Name inside the guest ("eth0").
    pub name: String,
    /// "aa:bb:cc:dd:ee:ff".
    pub mac: String,
    pub mtu: u32,
    pub addresses: Vec<IpPrefix>,
}

/// A guest route; `gateway: None` means on-link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestRoute {
    pub dst: IpPrefix,
    pub gateway: Option<IpAddr>,
    pub device: String,
}

/// Resolver settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestDns {
    pub servers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

impl GuestNetworkPlan {
    /// Builds the plan for one guest interface called `guest_ifname` standing in for
    /// `veth` (the CNI `CNI_IFNAME` interface).
    ///
    /// Addresses: the result's IPs for that interface (or with no interface index);
    /// the veth's own addresses if the result lists none. Routes: the result's; a route
    /// without `gw` goes via the gateway of the same family's IP (what the reference
    /// plugins configure), else on-link. With no routes in the result, the routes read
    /// from the veth are used. DNS: the result's, with `domain` first in the searches.
    pub fn new(result: &CniResult, veth: &LinkInfo, guest_ifname: &str) -> GuestNetworkPlan {
        let pod_if = result.sandbox_interface(&veth.name);
        let ips: Vec<_> = result
            .ips
            .iter()
            .filter(|ip| ip.interface.is_none() || ip.interface == pod_if)
            .collect();
        let mut addresses: Vec<IpPrefix> = ips.iter().map(|ip| ip.address).collect();
        if addresses.is_empty() {
            addresses = veth.addresses.clone();
        }
        let gateway_for = |dst: &IpPrefix| {
            ips.iter()
                .filter_map(|ip| ip.gateway)
                .find(|g| g.is_ipv4() == dst.addr.is_ipv4())
        };
        let mut routes: Vec<GuestRoute> = if result.routes.is_empty() {
            veth.routes
                .iter()
                .map(|r| GuestRoute {
                    dst: r.dst,
                    gateway: r.gateway,
                    device: guest_ifname.to_string(),
                })
                .collect()
        } else {
            result
                .routes
                .iter()
                .map(|r| GuestRoute {
                    dst: r.dst,
                    gateway: r.gw.or_else(|| gateway_for(&r.dst)),
                    device: guest_ifname.to_string(),
                })
                .collect()
        };
        routes.dedup();
        let mut searches = Vec::new();
        if let Some(d) = result.dns.domain.as_ref().filter(|d| !d.is_empty()) {
            searches.push(d.clone());
        }
        searches.extend(
            result
                .dns
                .search
                .iter()
                .filter(|s| !searches.contains(s))
                .cloned()
                .collect::<Vec<_>>(),
        );
        GuestNetworkPlan {
            interfaces: vec![GuestInterface {
                name: guest_ifname.to_string(),
                mac: veth.mac.clone(),
                mtu: veth.mtu,
                addresses,
            }],
            routes,
            dns: GuestDns {
                servers: result.dns.nameservers.clone(),
                searches,
                options: result.dns.options.clone(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tap::LinkRoute;
    use serde_json::json;

    fn veth() -> LinkInfo {
        LinkInfo {
            name: "eth0".into(),
            ifindex: 2,
            mac: "0a:58:0a:58:00:07".into(),
            mtu: 1450,
            addresses: vec!["10.88.0.7/16".parse().unwrap()],
            routes: vec![LinkRoute {
                dst: "0.0.0.0/0".parse().unwrap(),
                gateway: Some("10.88.0.1".parse().unwrap()),
            }],
        }
    }

    #[test]
    fn plan_from_a_bridge_result() {
        let r = CniResult::parse(&json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0", "mac": "aa:aa:aa:aa:aa:01"},
                {"name": "vethabc", "mac": "aa:aa:aa:aa:aa:02"},
                {"name": "eth0", "mac": "0a:58:0a:58:00:07", "sandbox": "/run/vessel/netns/p"}
            ],
            "ips": [
                {"address": "10.88.0.7/16", "gateway": "10.88.0.1", "interface": 2},
                {"address": "fd00::7/64", "gateway": "fd00::1", "interface": 2},
                {"address": "192.168.9.9/24", "interface": 0}
            ],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}, {"dst": "172.16.0.0/12", "gw": "10.88.0.254"}],
            "dns": {"nameservers": ["10.96.0.10"], "domain": "cluster.local",
                    "search": ["svc.cluster.local", "cluster.local"], "options": ["ndots:5"]}
        }))
        .unwrap();
        let plan = GuestNetworkPlan::new(&r, &veth(), "eth0");
        let i = &plan.interfaces[0];
        assert_eq!(
            (i.name.as_str(), i.mac.as_str(), i.mtu),
            ("eth0", "0a:58:0a:58:00:07", 1450)
        );
        let addrs: Vec<String> = i.addresses.iter().map(|a| a.to_string()).collect();
        assert_eq!(
            addrs,
            ["10.88.0.7/16", "fd00::7/64"],
            "the host-side IP is not the guest's"
        );
        let routes: Vec<(String, Option<String>)> = plan
            .routes
            .iter()
            .map(|r| (r.dst.to_string(), r.gateway.map(|g| g.to_string())))
            .collect();
        assert_eq!(
            routes,
            [
                ("0.0.0.0/0".into(), Some("10.88.0.1".into())),
                ("::/0".into(), Some("fd00::1".into())),
                ("172.16.0.0/12".into(), Some("10.88.0.254".into())),
            ]
        );
        assert!(plan.routes.iter().all(|r| r.device == "eth0"));
        assert_eq!(plan.dns.servers, ["10.96.0.10"]);
        assert_eq!(plan.dns.searches, ["cluster.local", "svc.cluster.local"]);
        assert_eq!(plan.dns.options, ["ndots:5"]);
    }

    #[test]
    fn falls_back_to_the_veth_state() {
        let r = CniResult::parse(&json!({"cniVersion": "0.4.0"})).unwrap();
        let plan = GuestNetworkPlan::new(&r, &veth(), "eth0");
        assert_eq!(plan.interfaces[0].addresses, veth().addresses);
        assert_eq!(plan.routes.len(), 1);
        assert_eq!(plan.routes[0].gateway, Some("10.88.0.1".parse().unwrap()));
        assert!(plan.dns.servers.is_empty());
    }
}
