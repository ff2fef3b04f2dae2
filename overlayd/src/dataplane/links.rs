//! The node's two overlay devices, through netlink: the VTEP `overlay.<VNI>` and the pods' bridge.
//! Both are made idempotently: a device that exists with the right settings is left untouched
//! (restarts must not flap the data plane), one with wrong settings is fixed or replaced.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVxlan};
use tracing::{info, warn};

use super::DataplaneError;
use crate::netlink;
use crate::node::Mac;

/// What the VTEP must look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VtepSpec {
    pub name: String,
    pub vni: u32,
    pub local: Ipv4Addr,
    pub port: u16,
    pub underlay_index: u32,
    pub mtu: u32,
    pub mac: Mac,
    /// `<subnet>.0/32`
    pub addr: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeSpec {
    pub name: String,
    pub mtu: u32,
    /// `<subnet>.1/<len>`: the pods' gateway.
    pub gateway: Ipv4Network,
}

async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, DataplaneError> {
    netlink::link_by_name(handle, name)
        .await
        .map_err(|e| DataplaneError::netlink(format!("looking up {name}"), e))
}

fn vxlan_info(msg: &LinkMessage) -> Option<&Vec<InfoVxlan>> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Data(InfoData::Vxlan(v)) => Some(v),
            _ => None,
        }),
        _ => None,
    })
}

fn kind(msg: &LinkMessage) -> Option<&InfoKind> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k),
            _ => None,
        }),
        _ => None,
    })
}

fn mac(msg: &LinkMessage) -> Option<&[u8]> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => Some(m.as_slice()),
        _ => None,
    })
}

fn vtep_matches(msg: &LinkMessage, spec: &VtepSpec) -> bool {
    if kind(msg) != Some(&InfoKind::Vxlan) {
        return false;
    }
    let Some(info) = vxlan_info(msg) else {
        return false;
    };
    let mut ok = (false, false, false, false);
    for i in info {
        match i {
            InfoVxlan::Id(v) => ok.0 = *v == spec.vni,
            InfoVxlan::Local(ip) => ok.1 = *ip == spec.local,
            InfoVxlan::Port(p) => ok.2 = *p == spec.port,
            InfoVxlan::Link(l) => ok.3 = *l == spec.underlay_index,
            InfoVxlan::Learning(true) => return false,
            _ => {}
        }
    }
    ok == (true, true, true, true)
}

/// Makes the VTEP exist as `spec` says, up, with its one address. Returns its index.
pub async fn ensure_vtep(handle: &Handle, spec: &VtepSpec) -> Result<u32, DataplaneError> {
    let existing = link_by_name(handle, &spec.name).await?;
    let index = match existing {
        Some(msg) if vtep_matches(&msg, spec) => {
            let index = msg.header.index;
            let up = msg.header.flags.contains(LinkFlags::Up);
            if netlink::link_mtu(&msg) != Some(spec.mtu)
                || mac(&msg) != Some(&spec.mac.0[..])
                || !up
            {
                set_up(handle, index, &spec.name, spec.mtu, spec.mac.0).await?;
            }
            index
        }
        other => {
            if let Some(msg) = other {
                warn!(
                    device = spec.name,
                    "existing device has other VXLAN settings (VNI, local IP, port or underlay); recreating it"
                );
                handle
                    .link()
                    .del(msg.header.index)
                    .execute()
                    .await
                    .map_err(|e| {
                        DataplaneError::netlink(format!("deleting stale {}", spec.name), e)
                    })?;
            }
            let msg = LinkVxlan::new(&spec.name, spec.vni)
                .dev(spec.underlay_index)
                .local(spec.local)
                .port(spec.port)
                .learning(false)
                .mtu(spec.mtu)
                .address(spec.mac.0.to_vec())
                .up()
                .build();
            handle.link().add(msg).execute().await.map_err(|e| {
                DataplaneError::netlink(format!("creating VXLAN device {}", spec.name), e)
            })?;
            info!(
                device = spec.name,
                vni = spec.vni,
                local = %spec.local,
                port = spec.port,
                mtu = spec.mtu,
                mac = %spec.mac,
                "created VTEP"
            );
            link_by_name(handle, &spec.name)
                .await?
                .map(|m| m.header.index)
                .ok_or_else(|| DataplaneError::Vanished(spec.name.clone()))?
        }
    };
    ensure_only_address(
        handle,
        index,
        &spec.name,
        Ipv4Network::new(spec.addr, 32).map_err(|e| DataplaneError::Invalid(e.to_string()))?,
    )
    .await?;
    Ok(index)
}

/// Makes the bridge exist, up, with the gateway address and MTU. Returns its index.
pub async fn ensure_bridge(handle: &Handle, spec: &BridgeSpec) -> Result<u32, DataplaneError> {
    // The same fixed MAC the CNI plugin gives a bridge it creates: a bridge otherwise takes the
    // lowest MAC of its ports, which changes as pods come and go and leaves pods with a stale ARP
    // entry for their gateway.
    let want_mac = overlay_state::ip_mac(spec.gateway.ip());
    let (index, needs_setup) = match link_by_name(handle, &spec.name).await? {
        Some(msg) if kind(&msg) == Some(&InfoKind::Bridge) => {
            let needs_setup = netlink::link_mtu(&msg) != Some(spec.mtu)
                || mac(&msg) != Some(&want_mac[..])
                || !msg.header.flags.contains(LinkFlags::Up);
            (msg.header.index, needs_setup)
        }
        Some(_) => {
            return Err(DataplaneError::Invalid(format!(
                "{} exists but is not a bridge; remove it or pick another bridge name",
                spec.name
            )))
        }
        None => {
            // Created down; brought up only once it has its address (below).
            let add = handle
                .link()
                .add(
                    LinkBridge::new(&spec.name)
                        .mtu(spec.mtu)
                        .address(want_mac.to_vec())
                        .build(),
                )
                .execute()
                .await;
            match add {
                Ok(()) => info!(bridge = spec.name, mtu = spec.mtu, "created bridge"),
                // The CNI plugin may have made it a moment ago.
                Err(e) if netlink::is_errno(&e, netlink::EEXIST) => {}
                Err(e) => {
                    return Err(DataplaneError::netlink(
                        format!("creating bridge {}", spec.name),
                        e,
                    ))
                }
            }
            let index = link_by_name(handle, &spec.name)
                .await?
                .map(|m| m.header.index)
                .ok_or_else(|| DataplaneError::Vanished(spec.name.clone()))?;
            (index, true)
        }
    };
    // The address before `up`: the plugin takes an up bridge as configured.
    ensure_only_address(handle, index, &spec.name, spec.gateway).await?;
    if needs_setup {
        set_up(handle, index, &spec.name, spec.mtu, want_mac).await?;
    }
    Ok(index)
}

/// Sets MTU and MAC and brings the link up, in one request.
async fn set_up(
    handle: &Handle,
    index: u32,
    name: &str,
    mtu: u32,
    mac: [u8; 6],
) -> Result<(), DataplaneError> {
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(index)
                .mtu(mtu)
                .address(mac.to_vec())
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(|e| DataplaneError::netlink(format!("setting up {name}"), e))
}

/// Adds `want` to the link and removes every other IPv4 address (a stale gateway from an earlier
/// subnet would black-hole pods).
async fn ensure_only_address(
    handle: &Handle,
    index: u32,
    name: &str,
    want: Ipv4Network,
) -> Result<(), DataplaneError> {
    let mut present = false;
    let mut stale: Vec<AddressMessage> = Vec::new();
    let mut addrs = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    while let Some(a) = addrs
        .try_next()
        .await
        .map_err(|e| DataplaneError::netlink(format!("listing addresses of {name}"), e))?
    {
        let ip = a.attributes.iter().find_map(|attr| match attr {
            AddressAttribute::Local(IpAddr::V4(ip)) | AddressAttribute::Address(IpAddr::V4(ip)) => {
                Some(*ip)
            }
            _ => None,
        });
        let Some(ip) = ip else { continue };
        if ip == want.ip() && a.header.prefix_len == want.prefix() {
            present = true;
        } else {
            stale.push(a);
        }
    }
    for a in stale {
        warn!(device = name, "removing stale address {:?}", a.attributes);
        handle.address().del(a).execute().await.map_err(|e| {
            DataplaneError::netlink(format!("removing a stale address from {name}"), e)
        })?;
    }
    if !present {
        match handle
            .address()
            .add(index, IpAddr::V4(want.ip()), want.prefix())
            .execute()
            .await
        {
            Ok(()) => {}
            Err(e) if netlink::is_errno(&e, netlink::EEXIST) => {}
            Err(e) => {
                return Err(DataplaneError::netlink(
                    format!("adding {want} to {name}"),
                    e,
                ))
            }
        }
    }
    Ok(())
}

/// Removes a link by name; a missing one is fine.
pub async fn delete_link(handle: &Handle, name: &str) -> Result<bool, DataplaneError> {
    match link_by_name(handle, name).await? {
        Some(msg) => {
            handle
                .link()
                .del(msg.header.index)
                .execute()
                .await
                .map_err(|e| DataplaneError::netlink(format!("deleting {name}"), e))?;
            Ok(true)
        }
        None => Ok(false),
    }
}
