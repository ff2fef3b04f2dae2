//! A change of the lease set, applied as a diff: only the peers that came, went or changed are
//! written, with no dump of the kernel's tables, so one watch event costs the same with 10 peers or
//! 10 000. The full pass in [`super::peers::reconcile`] stays the safety net for drift (periodic,
//! and after a kernel notification about our devices or entries).
//!
//! Removal goes in the reverse of the write order: route, then FDB, then ARP, so a route never
//! points at a next hop that is already gone. Entries already absent are fine (someone removed them,
//! or a full pass did).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use futures::StreamExt;
use ipnetwork::Ipv4Network;
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, RouteMessageBuilder};
use tracing::info;

use super::peers::{self, Changes, Devices, Failures, Peer, IN_FLIGHT, ROUTE_PROTOCOL};
use super::DataplaneError;
use crate::netlink;

pub async fn apply(
    handle: &Handle,
    dev: Devices,
    old: &BTreeMap<Ipv4Network, Peer>,
    new: &BTreeMap<Ipv4Network, Peer>,
    failures: &mut Failures,
) -> Changes {
    let mut changes = Changes::default();
    let now = Instant::now();
    // Gone, or changed in a way that leaves an old entry no write would replace.
    let mut removals = Vec::new();
    for (subnet, o) in old {
        match new.get(subnet) {
            None => removals.push(Removal {
                peer: o.clone(),
                route: true,
                neighbours: !o.direct,
            }),
            Some(n) if !o.direct && (n.direct || n.mac != o.mac) => removals.push(Removal {
                peer: o.clone(),
                route: false,
                neighbours: true,
            }),
            Some(_) => {}
        }
    }
    let removed: Vec<(String, Result<usize, DataplaneError>)> = futures::stream::iter(removals)
        .map(|r| async move {
            let key = format!("removing peer {}", r.peer.subnet);
            (key, remove(handle, dev, &r).await)
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    for (key, result) in removed {
        changes.book(failures, &key, now, result, false);
    }

    let writes: Vec<&Peer> = new
        .iter()
        .filter(|(subnet, n)| old.get(*subnet) != Some(*n))
        .map(|(_, n)| n)
        .collect();
    let written = peers::program_all(handle, dev, writes, &Default::default()).await;
    for (key, result) in written {
        changes.book(failures, &key, now, result, true);
    }
    changes
}

struct Removal {
    peer: Peer,
    route: bool,
    neighbours: bool,
}

async fn remove(handle: &Handle, dev: Devices, r: &Removal) -> Result<usize, DataplaneError> {
    let p = &r.peer;
    let mut n = 0;
    if r.route {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(p.subnet.network(), p.subnet.prefix())
            .protocol(ROUTE_PROTOCOL)
            .priority(peers::route_metric(&p.subnet))
            .build();
        match handle.route().del(msg).execute().await {
            Ok(()) => n += 1,
            Err(e) if netlink::is_errno(&e, netlink::ESRCH) => {}
            Err(e) => {
                return Err(DataplaneError::netlink(
                    format!("removing route to {}", p.subnet),
                    e,
                ))
            }
        }
    }
    if r.neighbours {
        let mut fdb = NeighbourMessage::default();
        fdb.header.family = AddressFamily::Bridge;
        fdb.header.ifindex = dev.vtep;
        fdb.header.flags = NeighbourFlags::Own;
        fdb.attributes = vec![
            NeighbourAttribute::LinkLayerAddress(p.mac.0.to_vec()),
            NeighbourAttribute::Destination(NeighbourAddress::Inet(p.public_ip)),
        ];
        n += delete_neighbour(handle, fdb, || {
            format!("removing FDB entry {} → {}", p.mac, p.public_ip)
        })
        .await?;
        let mut arp = NeighbourMessage::default();
        arp.header.family = AddressFamily::Inet;
        arp.header.ifindex = dev.vtep;
        arp.attributes = vec![NeighbourAttribute::Destination(NeighbourAddress::Inet(
            p.subnet.network(),
        ))];
        n += delete_neighbour(handle, arp, || {
            format!("removing ARP entry {}", IpAddr::V4(p.subnet.network()))
        })
        .await?;
    }
    if r.route {
        // The same words as the full pass's removal, so one peer leaving reads the same either way.
        info!(public_ip = %p.public_ip, "removed route to {}", p.subnet);
    }
    Ok(n)
}

async fn delete_neighbour(
    handle: &Handle,
    msg: NeighbourMessage,
    what: impl Fn() -> String,
) -> Result<usize, DataplaneError> {
    match handle.neighbours().del(msg).execute().await {
        Ok(()) => Ok(1),
        Err(e) if netlink::is_errno(&e, netlink::ENOENT) => Ok(0),
        Err(e) => Err(DataplaneError::netlink(what(), e)),
    }
}
