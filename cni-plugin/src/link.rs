//! The kernel side, through rtnetlink: the bridge, the veth pair, addresses and routes.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth,
    RouteMessageBuilder,
};

const EEXIST: i32 = -17;
const ENODEV: i32 = -19;

pub fn is_errno(e: &rtnetlink::Error, code: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == code)
}

pub fn is_exists(e: &rtnetlink::Error) -> bool {
    is_errno(e, EEXIST)
}

/// What the plugin needs to know about a link.
#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub mac: String,
    pub mtu: Option<u32>,
    pub up: bool,
    pub controller: Option<u32>,
    pub kind_is_veth: bool,
}

impl Link {
    fn from_message(m: &LinkMessage) -> Link {
        let mut link = Link {
            index: m.header.index,
            mac: String::new(),
            mtu: None,
            up: m.header.flags.contains(LinkFlags::Up),
            controller: None,
            kind_is_veth: false,
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::Address(b) => link.mac = format_mac(b),
                LinkAttribute::Mtu(v) => link.mtu = Some(*v),
                LinkAttribute::Controller(c) => link.controller = Some(*c),
                LinkAttribute::LinkInfo(infos) => {
                    link.kind_is_veth = infos
                        .iter()
                        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)))
                }
                _ => {}
            }
        }
        link
    }
}

fn attachment_hash(container_id: &str, ifname: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id
        .bytes()
        .chain(std::iter::once(0))
        .chain(ifname.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The host end's name, derived from the attachment so that DEL and GC find it without the pod's
/// netns, and a retried ADD finds what a killed one left: `veth` + 11 hex digits of FNV-1a.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    format!("veth{:011x}", attachment_hash(container_id, ifname) >> 20)
}

/// The host end's MAC, from the same hash (locally administered, unicast): set by the plugin so
/// that ADD need not read it back from the kernel.
pub fn host_veth_mac(container_id: &str, ifname: &str) -> [u8; 6] {
    let h = attachment_hash(container_id, ifname).to_be_bytes();
    [0x0e, h[0], h[1], h[2], h[3], h[4]]
}

pub fn format_mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The link called `name`, or `None`.
pub async fn by_name(h: &Handle, name: &str) -> Result<Option<Link>, rtnetlink::Error> {
    let mut s = h.link().get().match_name(name.to_string()).execute();
    match s.try_next().await {
        Ok(m) => Ok(m.as_ref().map(Link::from_message)),
        Err(e) if is_errno(&e, ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The pods' bridge with the gateway address on it, made if missing. Many ADDs may race to make
/// it: each step tolerates another process having done it first. The MAC is fixed (derived from
/// the gateway) because a bridge otherwise takes the lowest MAC of its ports, which changes as
/// pods come and go and leaves stale gateway ARP entries in every pod.
pub async fn ensure_bridge(
    h: &Handle,
    name: &str,
    gateway: Ipv4Addr,
    prefix: u8,
    mtu: u32,
) -> Result<Link, rtnetlink::Error> {
    if let Some(b) = by_name(h, name).await? {
        if b.up {
            // Whoever brought it up (overlayd, or an earlier ADD) gave it the gateway first.
            return Ok(b);
        }
    } else {
        let msg = LinkBridge::new(name)
            .mtu(mtu)
            .address(ip_mac(gateway).to_vec())
            .build();
        match h.link().add(msg).execute().await {
            Ok(()) => {}
            Err(e) if is_exists(&e) => {}
            Err(e) => return Err(e),
        }
    }
    let b = by_name(h, name)
        .await?
        .ok_or(rtnetlink::Error::RequestFailed)?;
    match h
        .address()
        .add(b.index, IpAddr::V4(gateway), prefix)
        .execute()
        .await
    {
        Ok(()) => {}
        Err(e) if is_exists(&e) => {}
        Err(e) => return Err(e),
    }
    h.link()
        .set(LinkUnspec::new_with_index(b.index).up().build())
        .execute()
        .await?;
    Ok(Link { up: true, ..b })
}

pub use overlay_state::ip_mac;

/// One end of a veth pair to create.
pub struct VethEnd<'a> {
    pub name: &'a str,
    pub mac: [u8; 6],
}

/// Creates the veth pair in one request: the host end (up, in the bridge) and the peer made
/// straight in the pod's netns under its final name, both with `mtu` and the given MACs. The
/// kernel creates the peer in the namespace named by IFLA_NET_NS_FD inside the peer's own message,
/// so no rename or move is needed and the pod never sees a temporary name. (The peer cannot be
/// brought up in the same request: the kernel answers ENOTCONN; [`set_up`] does it.)
pub async fn create_veth(
    h: &Handle,
    host: &VethEnd<'_>,
    pod: &VethEnd<'_>,
    pod_netns: &impl AsRawFd,
    mtu: u32,
    bridge_index: u32,
) -> Result<(), rtnetlink::Error> {
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(pod.name)
        .mtu(mtu)
        .address(pod.mac.to_vec())
        .setns_by_fd(pod_netns.as_raw_fd())
        .build();
    let msg = LinkVeth::new(host.name, pod.name)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .mtu(mtu)
        .address(host.mac.to_vec())
        .controller(bridge_index)
        .up()
        .build();
    h.link().add(msg).execute().await
}

/// Hairpin on a bridge port, addressed by name (saves looking its index up).
pub async fn set_hairpin(h: &Handle, port: &str, on: bool) -> Result<(), rtnetlink::Error> {
    h.link()
        .set_port(LinkBridgePort::new(0).name(port).hairpin(on).build())
        .execute()
        .await
}

pub async fn set_up(h: &Handle, index: u32) -> Result<(), rtnetlink::Error> {
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
}

/// Deletes the link called `name` (one request: the kernel finds it by name); a link that is not
/// there is not an error. Returns whether there was one.
pub async fn delete_by_name(h: &Handle, name: &str) -> Result<bool, rtnetlink::Error> {
    match h
        .link()
        .del_with_message(LinkUnspec::new_with_name(name).build())
        .execute()
        .await
    {
        Ok(()) => Ok(true),
        Err(e) if is_errno(&e, ENODEV) => Ok(false),
        Err(e) => Err(e),
    }
}

pub async fn add_address(
    h: &Handle,
    index: u32,
    ip: Ipv4Addr,
    prefix: u8,
) -> Result<(), rtnetlink::Error> {
    h.address()
        .add(index, IpAddr::V4(ip), prefix)
        .execute()
        .await
}

/// The IPv4 addresses (with prefix) on link `index`.
pub async fn addresses(h: &Handle, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, rtnetlink::Error> {
    let mut out = Vec::new();
    let mut s = h.address().get().set_link_index_filter(index).execute();
    while let Some(m) = s.try_next().await? {
        if m.header.family != AddressFamily::Inet || m.header.index != index {
            continue;
        }
        for a in &m.attributes {
            if let AddressAttribute::Local(IpAddr::V4(ip)) = a {
                out.push((*ip, m.header.prefix_len));
            }
        }
    }
    Ok(out)
}

/// A route `dst via gw` through link `oif` (`dst` None = default).
pub async fn add_route(
    h: &Handle,
    dst: Option<(Ipv4Addr, u8)>,
    gw: Ipv4Addr,
    oif: u32,
) -> Result<(), rtnetlink::Error> {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(gw)
        .output_interface(oif);
    if let Some((ip, len)) = dst {
        b = b.destination_prefix(ip, len);
    }
    match h.route().add(b.build()).execute().await {
        Ok(()) => Ok(()),
        Err(e) if is_exists(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

/// IPv4 routes of the main table as (dst, prefix, gateway, oif).
pub async fn routes(
    h: &Handle,
) -> Result<Vec<(Ipv4Addr, u8, Option<Ipv4Addr>, Option<u32>)>, rtnetlink::Error> {
    let q: RouteMessage = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let mut s = h.route().get(q).execute();
    let mut out = Vec::new();
    while let Some(m) = s.try_next().await? {
        if m.header.address_family != AddressFamily::Inet {
            continue;
        }
        let (mut dst, mut gw, mut oif) = (Ipv4Addr::UNSPECIFIED, None, None);
        for a in &m.attributes {
            match a {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gw = Some(*ip),
                RouteAttribute::Oif(i) => oif = Some(*i),
                _ => {}
            }
        }
        out.push((dst, m.header.destination_prefix_length, gw, oif));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names_are_stable_short_and_distinct() {
        let a = host_veth_name("0123456789abcdef", "eth0");
        assert_eq!(a, host_veth_name("0123456789abcdef", "eth0"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("veth"));
        assert_ne!(a, host_veth_name("0123456789abcdef", "eth1"));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(host_veth_name("ab", "c"), host_veth_name("a", "bc"));
        let mac = host_veth_mac("x", "eth0");
        assert_eq!(mac[0] & 0x03, 0x02, "locally administered unicast");
    }

    #[test]
    fn ip_macs_use_the_kubernetes_prefix() {
        assert_eq!(
            format_mac(&ip_mac(Ipv4Addr::new(10, 244, 7, 5))),
            "0a:58:0a:f4:07:05"
        );
    }
}
