//! Who this node is on the underlay: interface, public IP, name, MTU and the VTEP's MAC.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{RouteAttribute, RouteType};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::cli::NodeArgs;
use crate::netlink;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub iface: String,
    pub iface_index: u32,
    pub iface_mtu: u32,
    pub public_ip: Ipv4Addr,
    /// The underlay L2 subnet the public IP sits in (for `Backend.DirectRouting`), when known.
    pub underlay_net: Option<Ipv4Network>,
    pub name: String,
    pub vtep_mac: Mac,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl std::str::FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!("{s:?} is not a MAC address"));
        }
        let mut m = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            m[i] = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
        }
        Ok(Mac(m))
    }
}

impl Mac {
    /// The VTEP MAC for a node: derived from its public IP and the VNI, so a restart (or a reboot,
    /// which loses /run) announces the same MAC and peers' FDB/ARP entries stay valid. Locally
    /// administered, unicast.
    pub fn for_vtep(public_ip: Ipv4Addr, vni: u32) -> Mac {
        // FNV-1a: tiny, and stable across Rust releases (std's hasher is not).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in b"overlayd-vtep"
            .iter()
            .chain(public_ip.octets().iter())
            .chain(vni.to_be_bytes().iter())
        {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let b = h.to_be_bytes();
        Mac([(b[0] & 0xfe) | 0x02, b[1], b[2], b[3], b[4], b[5]])
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("no IPv4 default route on this node: pass --iface (OVERLAYD_IFACE) to name the underlay interface")]
    NoDefaultRoute,
    #[error("interface {0:?} does not exist on this node: check --iface (OVERLAYD_IFACE)")]
    NoSuchIface(String),
    #[error("interface {0} has no IPv4 address: pass --public-ip (OVERLAYD_PUBLIC_IP)")]
    NoAddress(String),
    #[error("cannot determine the node name: {0}; pass --node-name (OVERLAYD_NODE_NAME)")]
    NoName(String),
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[from] std::io::Error),
}

/// Resolves the node's identity from flags, filling defaults from the kernel.
pub async fn discover(handle: &Handle, args: &NodeArgs, vni: u32) -> Result<Node, NodeError> {
    let iface = match &args.iface {
        Some(i) => i.clone(),
        None => default_route_iface(handle).await?,
    };
    let link = netlink::link_by_name(handle, &iface)
        .await?
        .ok_or_else(|| NodeError::NoSuchIface(iface.clone()))?;
    let iface_index = link.header.index;
    let iface_mtu = netlink::link_mtu(&link).unwrap_or(1500);
    let addrs = ipv4_addrs(handle, iface_index).await?;
    let public_ip = match args.public_ip {
        Some(ip) => ip,
        None => addrs
            .first()
            .map(|n| n.ip())
            .ok_or_else(|| NodeError::NoAddress(iface.clone()))?,
    };
    let underlay_net = addrs
        .iter()
        .find(|n| n.ip() == public_ip)
        .and_then(|n| Ipv4Network::new(n.network(), n.prefix()).ok());
    let name = match &args.node_name {
        Some(n) => n.clone(),
        None => nix::unistd::gethostname()
            .map_err(|e| NodeError::NoName(e.to_string()))?
            .to_string_lossy()
            .into_owned(),
    };
    Ok(Node {
        iface,
        iface_index,
        iface_mtu,
        public_ip,
        underlay_net,
        name,
        vtep_mac: Mac::for_vtep(public_ip, vni),
    })
}

async fn default_route_iface(handle: &Handle) -> Result<String, NodeError> {
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    let mut oif = None;
    while let Some(r) = routes.try_next().await? {
        if r.header.destination_prefix_length == 0 && r.header.kind == RouteType::Unicast {
            oif = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            if oif.is_some() {
                break;
            }
        }
    }
    let index = oif.ok_or(NodeError::NoDefaultRoute)?;
    let mut links = handle.link().get().match_index(index).execute();
    let msg = links.try_next().await?.ok_or(NodeError::NoDefaultRoute)?;
    msg.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .ok_or(NodeError::NoDefaultRoute)
}

async fn ipv4_addrs(handle: &Handle, index: u32) -> Result<Vec<Ipv4Network>, NodeError> {
    let mut addrs = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    let mut out = Vec::new();
    while let Some(a) = addrs.try_next().await? {
        for attr in &a.attributes {
            if let AddressAttribute::Address(IpAddr::V4(ip)) = attr {
                if let Ok(n) = Ipv4Network::new(*ip, a.header.prefix_len) {
                    out.push(n);
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtep_mac_is_stable_unicast_and_local() {
        let a = Mac::for_vtep(Ipv4Addr::new(192, 0, 2, 10), 1);
        assert_eq!(a, Mac::for_vtep(Ipv4Addr::new(192, 0, 2, 10), 1));
        assert_ne!(a, Mac::for_vtep(Ipv4Addr::new(192, 0, 2, 11), 1));
        assert_eq!(a.0[0] & 0x01, 0, "multicast bit must be clear");
        assert_eq!(a.0[0] & 0x02, 0x02, "locally administered bit must be set");
        assert_eq!(a.to_string().parse::<Mac>().unwrap(), a);
    }
}
