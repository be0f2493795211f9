//! The pod's tap device and the tc redirect that joins it to the CNI veth (Kata's
//! tcfilter model): everything arriving on the veth leaves through the tap (to the VM)
//! and everything the VM sends leaves through the veth.

use std::fs::OpenOptions;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::error::{io, nl, sys, Error, Result};
use crate::ip::IpPrefix;
use crate::netns::NetNs;

/// `ETH_P_ALL`: the filters match every protocol.
const ETH_P_ALL: u16 = 0x0003;
/// The ingress qdisc's handle (`ffff:`).
const INGRESS_PARENT: u32 = 0xffff_0000;
/// The main routing table.
const RT_TABLE_MAIN: u8 = 254;

nix::ioctl_write_ptr_bad!(tun_set_iff, libc::TUNSETIFF, libc::ifreq);

/// An open tap device. Dropping it closes the fd, which deletes the (non-persistent)
/// tap; hand the fd to the hypervisor before that.
#[derive(Debug)]
pub struct TapDevice {
    pub name: String,
    pub ifindex: u32,
    fd: OwnedFd,
}

impl TapDevice {
    /// The fd for QEMU's `-netdev tap,fd=N` (frames carry a virtio-net header).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Takes the fd (for example to pass it to a child process).
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

/// A route seen on the veth inside the pod namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkRoute {
    pub dst: IpPrefix,
    pub gateway: Option<IpAddr>,
}

/// The veth as the CNI plugins left it: what the guest NIC must look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub name: String,
    pub ifindex: u32,
    /// "aa:bb:cc:dd:ee:ff".
    pub mac: String,
    pub mtu: u32,
    /// Global addresses (IPv6 link-local ones are the guest kernel's own business).
    pub addresses: Vec<IpPrefix>,
    /// Routes through the veth, other than the ones the kernel derives from addresses.
    pub routes: Vec<LinkRoute>,
}

/// Inside `netns`: creates `tap` (`IFF_TAP|IFF_NO_PI|IFF_VNET_HDR`) with the MTU of
/// `veth`, brings it up, adds ingress qdiscs on both and u32 match-all filters with
/// `mirred egress redirect` in both directions. Returns the open tap and the veth's
/// state. Blocks (a thread in the namespace does the work).
pub fn setup_tap(netns: &NetNs, veth: &str, tap: &str) -> Result<(TapDevice, LinkInfo)> {
    let tap = create_tap(netns, tap)?;
    let veth = connect_tap(netns, veth, &tap.name)?;
    Ok((tap, veth))
}

/// Inside `netns`: creates `tap` (`IFF_TAP|IFF_NO_PI|IFF_VNET_HDR`), down and not
/// yet joined to anything, so a VM can boot on it before the pod's CNI veth exists
/// (the warm pool). [`connect_tap`] joins it later. Blocks.
pub fn create_tap(netns: &NetNs, tap: &str) -> Result<TapDevice> {
    netns.run(|| {
        let fd = open_tap(tap)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(io("start runtime in", netns.path()))?;
        rt.block_on(async {
            let handle = connect()?;
            let link = get_link(&handle, tap).await?;
            Ok(TapDevice {
                name: tap.to_string(),
                ifindex: link.header.index,
                fd,
            })
        })
    })?
}

/// Inside `netns`: gives the existing `tap` the MTU of `veth`, brings it up and adds
/// the ingress qdiscs and redirect filters both ways. Returns the veth's state.
/// Blocks.
pub fn connect_tap(netns: &NetNs, veth: &str, tap: &str) -> Result<LinkInfo> {
    netns.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(io("start runtime in", netns.path()))?;
        rt.block_on(async {
            let handle = connect()?;
            let veth = link_info(&handle, veth).await?;
            let tap_index = get_link(&handle, tap).await?.header.index;
            handle
                .link()
                .set(
                    LinkUnspec::new_with_index(tap_index)
                        .mtu(veth.mtu)
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(nl("set tap up"))?;
            for index in [veth.ifindex, tap_index] {
                handle
                    .qdisc()
                    .add(index as i32)
                    .ingress()
                    .execute()
                    .await
                    .map_err(nl("add ingress qdisc"))?;
            }
            for (from, to) in [(veth.ifindex, tap_index), (tap_index, veth.ifindex)] {
                handle
                    .traffic_filter(from as i32)
                    .add()
                    .parent(INGRESS_PARENT)
                    // tc takes the protocol in network byte order.
                    .protocol(ETH_P_ALL.to_be())
                    .redirect(to)
                    .map_err(nl("build redirect filter"))?
                    .execute()
                    .await
                    .map_err(nl("add redirect filter"))?;
            }
            Ok(veth)
        })
    })?
}

/// Deletes `tap` in `netns` if it is there (the fd holder may still be alive). A
/// missing namespace or link is fine.
pub fn remove_tap(netns: &NetNs, tap: &str) -> Result<()> {
    if !netns.exists() {
        return Ok(());
    }
    netns.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(io("start runtime in", netns.path()))?;
        rt.block_on(async {
            let handle = connect()?;
            match get_link(&handle, tap).await {
                Ok(link) => handle
                    .link()
                    .del(link.header.index)
                    .execute()
                    .await
                    .map_err(nl("delete tap")),
                Err(Error::LinkNotFound(_)) => Ok(()),
                Err(e) => Err(e),
            }
        })
    })?
}

/// Reads a link's MAC, MTU, addresses and routes inside `netns`.
pub fn read_link(netns: &NetNs, name: &str) -> Result<LinkInfo> {
    netns.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(io("start runtime in", netns.path()))?;
        rt.block_on(async { link_info(&connect()?, name).await })
    })?
}

fn open_tap(name: &str) -> Result<OwnedFd> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(io("open", "/dev/net/tun"))?;
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(Error::InvalidName(name.to_string()));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: the fd is an open /dev/net/tun and `req` a valid, NUL-terminated ifreq
    // that outlives the call.
    unsafe { tun_set_iff(file.as_raw_fd(), &req) }.map_err(sys("TUNSETIFF"))?;
    Ok(file.into())
}

fn connect() -> Result<Handle> {
    // The socket binds to the calling thread's netns when it is created.
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(io("open netlink socket", "rtnetlink"))?;
    tokio::spawn(conn);
    Ok(handle)
}

async fn get_link(handle: &Handle, name: &str) -> Result<LinkMessage> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(link),
        Ok(None) => Err(Error::LinkNotFound(name.to_string())),
        // ENODEV: no such link.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
            Err(Error::LinkNotFound(name.to_string()))
        }
        Err(e) => Err(nl("get link")(e)),
    }
}

async fn link_info(handle: &Handle, name: &str) -> Result<LinkInfo> {
    let link = get_link(handle, name).await?;
    let index = link.header.index;
    let mut info = LinkInfo {
        name: name.to_string(),
        ifindex: index,
        mac: String::new(),
        mtu: 1500,
        addresses: Vec::new(),
        routes: Vec::new(),
    };
    for attr in &link.attributes {
        match attr {
            LinkAttribute::Address(mac) => info.mac = format_mac(mac),
            LinkAttribute::Mtu(mtu) => info.mtu = *mtu,
            _ => {}
        }
    }
    let mut addrs = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    while let Some(msg) = addrs.try_next().await.map_err(nl("get addresses"))? {
        for attr in &msg.attributes {
            if let AddressAttribute::Address(ip) = attr {
                let link_local =
                    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
                if let (false, Some(p)) = (link_local, IpPrefix::new(*ip, msg.header.prefix_len)) {
                    info.addresses.push(p);
                }
            }
        }
    }
    for query in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let mut routes = handle.route().get(query).execute();
        while let Some(msg) = routes.try_next().await.map_err(nl("get routes"))? {
            if let Some(r) = route_via(&msg, index) {
                info.routes.push(r);
            }
        }
    }
    Ok(info)
}

/// A main-table unicast route out of `index` that a plugin (not the kernel) added.
fn route_via(msg: &RouteMessage, index: u32) -> Option<LinkRoute> {
    let h = &msg.header;
    if h.table != RT_TABLE_MAIN
        || h.kind != RouteType::Unicast
        || h.protocol == RouteProtocol::Kernel
    {
        return None;
    }
    let mut oif = None;
    let mut dst = None;
    let mut gateway = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Destination(a) => dst = route_ip(a),
            RouteAttribute::Gateway(a) => gateway = route_ip(a),
            _ => {}
        }
    }
    if oif != Some(index) {
        return None;
    }
    let dst = dst.unwrap_or(if h.address_family == AddressFamily::Inet6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    });
    Some(LinkRoute {
        dst: IpPrefix::new(dst, h.destination_prefix_length)?,
        gateway,
    })
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

pub(crate) fn format_mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    #[test]
    fn macs_are_lowercase_colon_hex() {
        assert_eq!(
            super::format_mac(&[0x0a, 0x58, 0xff, 0, 1, 0xab]),
            "0a:58:ff:00:01:ab"
        );
    }
}
