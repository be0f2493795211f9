//! Guest network configuration over rtnetlink (no `ip` binary in the guest).
//! Containers share the VM's network namespace, so this is the pod's network.

use std::net::IpAddr;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkInfo};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use vessel_proto::agent as pb;

/// Guest dir holding the pod's hostname, resolv.conf and hosts, for containers to
/// bind-mount (they are also written to the guest's own /etc).
pub const NETWORK_DIR: &str = "/run/vessel/network";

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("no guest interface with MAC {0}")]
    NoSuchMac(String),
    #[error("no guest interface named {0}")]
    NoSuchDevice(String),
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

pub fn parse_mac(s: &str) -> Result<Vec<u8>, NetError> {
    let bytes: Result<Vec<u8>, _> = s.split(':').map(|p| u8::from_str_radix(p, 16)).collect();
    match bytes {
        Ok(b) if b.len() == 6 => Ok(b),
        _ => Err(NetError::Invalid(format!("MAC {s:?}"))),
    }
}

/// A route destination: "" and default CIDRs mean the default route of the gateway's
/// family (IPv4 when no gateway).
pub fn parse_destination(dest: &str, gateway: Option<IpAddr>) -> Result<(IpAddr, u8), NetError> {
    if dest.is_empty() || dest == "default" {
        return Ok(match gateway {
            Some(IpAddr::V6(_)) => (IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), 0),
            _ => (IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0),
        });
    }
    let (ip, len) = match dest.split_once('/') {
        Some((ip, len)) => (ip, Some(len)),
        None => (dest, None),
    };
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| NetError::Invalid(format!("destination {dest:?}")))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(l) => l
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| NetError::Invalid(format!("prefix in {dest:?}")))?,
        None => max,
    };
    Ok((ip, len))
}

pub fn render_resolv_conf(dns: &pb::DnsConfig) -> String {
    let mut s = String::new();
    for n in &dns.servers {
        s.push_str(&format!("nameserver {n}\n"));
    }
    if !dns.searches.is_empty() {
        s.push_str(&format!("search {}\n", dns.searches.join(" ")));
    }
    if !dns.options.is_empty() {
        s.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    s
}

pub fn render_hosts(hostname: &str, entries: &[pb::HostEntry]) -> String {
    let mut s = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    for e in entries {
        if !e.names.is_empty() {
            s.push_str(&format!("{}\t{}\n", e.ip, e.names.join(" ")));
        }
    }
    if !hostname.is_empty()
        && !entries
            .iter()
            .any(|e| e.names.iter().any(|n| n == hostname))
    {
        s.push_str(&format!("127.0.1.1\t{hostname}\n"));
    }
    s
}

/// A guest network interface as the kernel lists it.
struct Link {
    index: u32,
    name: String,
    mac: Vec<u8>,
    up: bool,
    /// A virtual device (it names its kind: dummy, bridge, …), not a NIC.
    is_virtual: bool,
}

async fn links(handle: &Handle) -> Result<Vec<Link>, NetError> {
    let mut out = Vec::new();
    let mut stream = handle.link().get().execute();
    while let Some(msg) = stream.try_next().await? {
        let mut name = String::new();
        let mut mac = Vec::new();
        let mut is_virtual = false;
        for a in &msg.attributes {
            match a {
                LinkAttribute::IfName(n) => name = n.clone(),
                LinkAttribute::Address(m) => mac = m.clone(),
                LinkAttribute::LinkInfo(info) => {
                    is_virtual |= info.iter().any(|i| matches!(i, LinkInfo::Kind(_)))
                }
                _ => {}
            }
        }
        out.push(Link {
            index: msg.header.index,
            name,
            mac,
            up: msg.header.flags.contains(LinkFlags::Up),
            is_virtual,
        });
    }
    Ok(out)
}

pub async fn configure(req: &pb::ConfigureNetworkRequest) -> Result<(), NetError> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(conn);
    let result = apply(&handle, req).await;
    task.abort();
    result?;
    write_files(req)
}

/// Brings the interfaces up at boot: the loopback (a pod without a network still
/// has 127.0.0.1, which port-forward connects to) and the NIC, whose opening
/// (receive buffers, IPv6 set-up) then costs nothing when the pod's network is
/// configured: that is on the path of RunPodSandbox, above all for a pool VM.
/// Without addresses the NIC carries nothing but link-local traffic.
pub async fn links_up() -> Result<(), NetError> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(conn);
    let result = set_all_up(&handle).await;
    task.abort();
    result
}

async fn set_all_up(handle: &Handle) -> Result<(), NetError> {
    // Not the kernel's own virtual devices (dummy0): they stay down, as on a node.
    for link in links(handle)
        .await?
        .iter()
        .filter(|l| !l.up && !l.is_virtual)
    {
        set_state(handle, link.index, true).await?;
    }
    Ok(())
}

/// Sets link `index` up (`true`) or down.
async fn set_state(handle: &Handle, index: u32, up: bool) -> Result<(), NetError> {
    let link = LinkUnspec::new_with_index(index);
    let link = if up { link.up() } else { link.down() };
    handle.link().set(link.build()).execute().await?;
    Ok(())
}

async fn apply(handle: &Handle, req: &pb::ConfigureNetworkRequest) -> Result<(), NetError> {
    let mut all = links(handle).await?;
    if let Some(lo) = all.iter().find(|l| l.name == "lo" && !l.up) {
        set_state(handle, lo.index, true).await?;
    }
    for iface in &req.interfaces {
        let mac = parse_mac(&iface.mac)?;
        let current = if iface.current_mac.is_empty() {
            &iface.mac
        } else {
            &iface.current_mac
        };
        let now = parse_mac(current)?;
        let link = all
            .iter_mut()
            .find(|l| l.mac == now)
            .ok_or_else(|| NetError::NoSuchMac(current.clone()))?;
        let index = link.index;
        let rename = !iface.name.is_empty() && iface.name != link.name;
        // One message sets MAC, MTU, name and up: the kernel applies address, MTU
        // and name before the flags. A rename needs the link down first; a MAC
        // change is tried live (virtio-net supports it), else made with it down.
        let change = || {
            let mut c = LinkUnspec::new_with_index(index).up();
            if now != mac {
                c = c.address(mac.clone());
            }
            if rename {
                c = c.name(iface.name.clone());
            }
            if iface.mtu > 0 {
                c = c.mtu(iface.mtu);
            }
            c.build()
        };
        if rename && link.up {
            set_state(handle, index, false).await?;
        }
        match handle.link().set(change()).execute().await {
            Err(_) if !rename && now != mac && link.up => {
                set_state(handle, index, false).await?;
                handle.link().set(change()).execute().await?;
            }
            r => r?,
        }
        link.up = true;
        if rename {
            link.name = iface.name.clone();
        }
        for a in &iface.addresses {
            let ip: IpAddr = a
                .address
                .parse()
                .map_err(|_| NetError::Invalid(format!("address {:?}", a.address)))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            if a.prefix_len > max {
                return Err(NetError::Invalid(format!(
                    "prefix {} for {ip}",
                    a.prefix_len
                )));
            }
            handle
                .address()
                .add(index, ip, a.prefix_len as u8)
                .replace()
                .execute()
                .await?;
        }
    }
    for r in &req.routes {
        let gateway = if r.gateway.is_empty() {
            None
        } else {
            Some(
                r.gateway
                    .parse::<IpAddr>()
                    .map_err(|_| NetError::Invalid(format!("gateway {:?}", r.gateway)))?,
            )
        };
        let (dst, len) = parse_destination(&r.destination, gateway)?;
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst, len)
            .map_err(|e| NetError::Invalid(e.to_string()))?;
        if let Some(gw) = gateway {
            b = b
                .gateway(gw)
                .map_err(|e| NetError::Invalid(e.to_string()))?;
        }
        if !r.device.is_empty() {
            let link = all
                .iter()
                .find(|l| l.name == r.device)
                .ok_or_else(|| NetError::NoSuchDevice(r.device.clone()))?;
            b = b.output_interface(link.index);
        }
        if r.metric > 0 {
            b = b.priority(r.metric);
        }
        handle.route().add(b.build()).replace().execute().await?;
    }
    Ok(())
}

fn write_files(req: &pb::ConfigureNetworkRequest) -> Result<(), NetError> {
    std::fs::create_dir_all(NETWORK_DIR)?;
    let _ = std::fs::create_dir_all("/etc");
    if !req.hostname.is_empty() {
        nix::unistd::sethostname(&req.hostname).map_err(std::io::Error::from)?;
        std::fs::write(
            format!("{NETWORK_DIR}/hostname"),
            format!("{}\n", req.hostname),
        )?;
        let _ = std::fs::write("/etc/hostname", format!("{}\n", req.hostname));
    }
    if let Some(dns) = &req.dns {
        let text = render_resolv_conf(dns);
        std::fs::write(format!("{NETWORK_DIR}/resolv.conf"), &text)?;
        let _ = std::fs::write("/etc/resolv.conf", &text);
    }
    let hosts = render_hosts(&req.hostname, &req.hosts);
    std::fs::write(format!("{NETWORK_DIR}/hosts"), &hosts)?;
    let _ = std::fs::write("/etc/hosts", &hosts);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("aa:BB:cc:00:01:ff").unwrap(),
            vec![0xaa, 0xbb, 0xcc, 0, 1, 0xff]
        );
        assert!(parse_mac("aa:bb").is_err());
        assert!(parse_mac("zz:bb:cc:00:01:ff").is_err());
    }

    #[test]
    fn destinations() {
        assert_eq!(
            parse_destination("", None).unwrap(),
            ("0.0.0.0".parse().unwrap(), 0)
        );
        assert_eq!(
            parse_destination("", Some("fd00::1".parse().unwrap())).unwrap(),
            ("::".parse().unwrap(), 0)
        );
        assert_eq!(
            parse_destination("10.88.0.0/16", None).unwrap(),
            ("10.88.0.0".parse().unwrap(), 16)
        );
        assert_eq!(parse_destination("10.1.2.3", None).unwrap().1, 32);
        assert!(parse_destination("10.0.0.0/33", None).is_err());
        assert!(parse_destination("nonsense/8", None).is_err());
    }

    #[test]
    fn files() {
        let dns = pb::DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec![
                "default.svc.cluster.local".into(),
                "svc.cluster.local".into(),
            ],
            options: vec!["ndots:5".into()],
        };
        assert_eq!(
            render_resolv_conf(&dns),
            "nameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local\noptions ndots:5\n"
        );
        let hosts = render_hosts(
            "pod1",
            &[pb::HostEntry {
                ip: "10.88.0.5".into(),
                names: vec!["pod1".into()],
            }],
        );
        assert!(hosts.contains("10.88.0.5\tpod1\n"));
        assert!(!hosts.contains("127.0.1.1"));
        assert!(render_hosts("p", &[]).contains("127.0.1.1\tp\n"));
    }
}
