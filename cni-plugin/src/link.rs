//! The kernel side, through a blocking rtnetlink socket: the bridge, the veth pair, addresses and
//! routes. Each function builds the messages and says whether an error is one it tolerates; the
//! multi-request steps of ADD batch them (see [`crate::netlink`]).

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{
    AddressMessageBuilder, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth,
    RouteMessageBuilder,
};

use crate::netlink::{Kind, Netlink, NlError, Reply};

/// A create that found its object already there counts as done.
pub fn created(r: Reply) -> Result<(), NlError> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.is(Errno::EEXIST) => Ok(()),
        Err(e) => Err(e),
    }
}

/// A change or read answered with no error.
pub fn done(r: Reply) -> Result<(), NlError> {
    r.map(|_| ())
}

/// What the plugin needs to know about a link.
#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: String,
    pub mtu: Option<u32>,
    pub up: bool,
    pub controller: Option<u32>,
    pub kind_is_veth: bool,
    /// A veth's peer: its index in the peer's netns (IFLA_LINK).
    pub peer: Option<u32>,
}

impl Link {
    fn from_message(m: &LinkMessage) -> Link {
        let mut link = Link {
            index: m.header.index,
            name: String::new(),
            mac: String::new(),
            mtu: None,
            up: m.header.flags.contains(LinkFlags::Up),
            controller: None,
            kind_is_veth: false,
            peer: None,
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::Address(b) => link.mac = format_mac(b),
                LinkAttribute::IfName(n) => link.name.clone_from(n),
                LinkAttribute::Mtu(v) => link.mtu = Some(*v),
                LinkAttribute::Controller(c) => link.controller = Some(*c),
                LinkAttribute::Link(i) => link.peer = Some(*i),
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

pub use overlay_state::{host_veth_mac, host_veth_name};

/// Whether `name` has the shape [`host_veth_name`] gives.
pub fn is_host_veth_name(name: &str) -> bool {
    name.len() == 15
        && name.starts_with("veth")
        && name[4..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub fn format_mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn get_by_name_request(name: &str) -> (RouteNetlinkMessage, Kind) {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_string()));
    (RouteNetlinkMessage::GetLink(m), Kind::Get)
}

/// The link a [`get_by_name_request`] found, or `None` if there is no such link.
pub fn found(r: Reply) -> Result<Option<Link>, NlError> {
    match r {
        Ok(msgs) => Ok(msgs.iter().find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(Link::from_message(l)),
            _ => None,
        })),
        Err(e) if e.is(Errno::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Every link of the socket's netns, in one dump.
pub fn all(nl: &mut Netlink) -> Result<Vec<Link>, NlError> {
    let msgs = nl.request(
        RouteNetlinkMessage::GetLink(LinkMessage::default()),
        Kind::Dump,
    )?;
    Ok(msgs
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(Link::from_message(l)),
            _ => None,
        })
        .collect())
}

/// The link called `name`, or `None`.
pub fn by_name(nl: &mut Netlink, name: &str) -> Result<Option<Link>, NlError> {
    let (msg, kind) = get_by_name_request(name);
    found(nl.request(msg, kind))
}

/// The pods' bridge with the gateway address on it, made if missing (`existing` is what a lookup
/// found). Many ADDs may race to make it: each step tolerates another process having done it
/// first. The MAC is fixed (derived from the gateway) because a bridge otherwise takes the lowest
/// MAC of its ports, which changes as pods come and go and leaves stale gateway ARP entries in
/// every pod.
pub fn ensure_bridge(
    nl: &mut Netlink,
    existing: Option<Link>,
    name: &str,
    gateway: Ipv4Addr,
    prefix: u8,
    mtu: u32,
) -> Result<Link, NlError> {
    let b = match existing {
        // Whoever brought it up (overlayd, or an earlier ADD) gave it the gateway first.
        Some(b) if b.up => return Ok(b),
        Some(b) => b,
        None => {
            let msg = LinkBridge::new(name)
                .mtu(mtu)
                .address(ip_mac(gateway).to_vec())
                .build();
            created(nl.request(RouteNetlinkMessage::NewLink(msg), Kind::Create))?;
            // Its index: the kernel's answer to a create carries none.
            by_name(nl, name)?.ok_or(NlError::Kernel(Errno::ENODEV as i32))?
        }
    };
    // Address, then up, in one send: the kernel applies them in order.
    let [addr, up] = nl.batch_of([
        (address_message(b.index, gateway, prefix), Kind::Create),
        (set_up_message(b.index), Kind::Change),
    ])?;
    created(addr)?;
    done(up)?;
    Ok(Link { up: true, ..b })
}

pub use overlay_state::ip_mac;

/// One end of a veth pair to create.
pub struct VethEnd<'a> {
    pub name: &'a str,
    pub mac: [u8; 6],
}

/// The veth pair in one request: the host end (up, in the bridge) and the peer made straight in
/// the pod's netns under its final name, both with `mtu` and the given MACs. The kernel creates
/// the peer in the namespace named by IFLA_NET_NS_FD inside the peer's own message, so no rename
/// or move is needed and the pod never sees a temporary name. (The peer cannot be brought up in
/// the same request: the kernel answers ENOTCONN; it is set up afterwards.)
///
/// One queue each way per end: a veth otherwise gets as many as the node has CPUs, each with its
/// sysfs objects to create and destroy (hundreds per pod on a large node), and a veth without
/// XDP sends straight into its peer, whatever the number of queues.
pub fn create_veth_message(
    host: &VethEnd<'_>,
    pod: &VethEnd<'_>,
    pod_netns: &impl AsRawFd,
    mtu: u32,
    bridge_index: u32,
) -> RouteNetlinkMessage {
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(pod.name)
        .mtu(mtu)
        .address(pod.mac.to_vec())
        .setns_by_fd(pod_netns.as_raw_fd())
        .append_extra_attribute(LinkAttribute::NumTxQueues(1))
        .append_extra_attribute(LinkAttribute::NumRxQueues(1))
        .build();
    let msg = LinkVeth::new(host.name, pod.name)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .mtu(mtu)
        .address(host.mac.to_vec())
        .controller(bridge_index)
        .append_extra_attribute(LinkAttribute::NumTxQueues(1))
        .append_extra_attribute(LinkAttribute::NumRxQueues(1))
        .up()
        .build();
    RouteNetlinkMessage::NewLink(msg)
}

/// Hairpin on a bridge port, addressed by name (saves looking its index up). Kind: Change.
pub fn hairpin_message(port: &str, on: bool) -> RouteNetlinkMessage {
    RouteNetlinkMessage::NewLink(LinkBridgePort::new(0).name(port).hairpin(on).build())
}

/// Kind: Change.
pub fn set_up_message(index: u32) -> RouteNetlinkMessage {
    RouteNetlinkMessage::SetLink(LinkUnspec::new_with_index(index).up().build())
}

/// The link called `name` down (the kernel finds it by name). Kind: Change.
pub fn set_down_by_name_message(name: &str) -> RouteNetlinkMessage {
    RouteNetlinkMessage::SetLink(LinkUnspec::new_with_name(name).down().build())
}

/// Deletes the link called `name` (one request: the kernel finds it by name); a link that is not
/// there is not an error. Returns whether there was one.
pub fn delete_by_name(nl: &mut Netlink, name: &str) -> Result<bool, NlError> {
    let msg = RouteNetlinkMessage::DelLink(LinkUnspec::new_with_name(name).build());
    deleted(nl.request(msg, Kind::Change))
}

/// Deletes link `index`; gone already is not an error. Returns whether there was one.
pub fn delete_by_index(nl: &mut Netlink, index: u32) -> Result<bool, NlError> {
    let msg = RouteNetlinkMessage::DelLink(LinkUnspec::new_with_index(index).build());
    deleted(nl.request(msg, Kind::Change))
}

fn deleted(r: Reply) -> Result<bool, NlError> {
    match r {
        Ok(_) => Ok(true),
        Err(e) if e.is(Errno::ENODEV) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Kind: Create.
pub fn address_message(index: u32, ip: Ipv4Addr, prefix: u8) -> RouteNetlinkMessage {
    RouteNetlinkMessage::NewAddress(
        AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(ip, prefix)
            .build(),
    )
}

/// The IPv4 addresses (with prefix) on link `index`.
pub fn addresses(nl: &mut Netlink, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, NlError> {
    let mut q = AddressMessage::default();
    q.header.family = AddressFamily::Inet;
    q.header.index = index;
    let mut out = Vec::new();
    for m in nl.request(RouteNetlinkMessage::GetAddress(q), Kind::Dump)? {
        let RouteNetlinkMessage::NewAddress(m) = m else {
            continue;
        };
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

/// A route `dst via gw` through link `oif` (`dst` None = default). Kind: Create.
pub fn route_message(dst: Option<(Ipv4Addr, u8)>, gw: Ipv4Addr, oif: u32) -> RouteNetlinkMessage {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(gw)
        .output_interface(oif);
    if let Some((ip, len)) = dst {
        b = b.destination_prefix(ip, len);
    }
    RouteNetlinkMessage::NewRoute(b.build())
}

/// A route as (dst, prefix, gateway, oif).
pub type RouteEntry = (Ipv4Addr, u8, Option<Ipv4Addr>, Option<u32>);

/// IPv4 routes of the main table.
pub fn routes(nl: &mut Netlink) -> Result<Vec<RouteEntry>, NlError> {
    let q: RouteMessage = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let mut out = Vec::new();
    for m in nl.request(RouteNetlinkMessage::GetRoute(q), Kind::Dump)? {
        let RouteNetlinkMessage::NewRoute(m) = m else {
            continue;
        };
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
        assert!(is_host_veth_name(&a));
        assert!(!is_host_veth_name("veth0") && !is_host_veth_name("vethXYZ0123456789"));
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
