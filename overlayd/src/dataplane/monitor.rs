//! Kernel change notifications, read so that drift (a route someone deleted, a link flap) is
//! repaired at once instead of at the next periodic pass.
//!
//! A node's kernel talks a lot: ARP on the underlay, FDB learning on the bridge, pod veths coming
//! and going, and every entry overlayd itself writes. Each notification is parsed down to a
//! [`KernelEvent`] here, and [`super::Dataplane::is_drift`] keeps only those that touch our devices
//! or contradict what we want; the rest cost a parse and nothing else.

use std::net::Ipv4Addr;

use futures::StreamExt;
use ipnetwork::Ipv4Network;
use rtnetlink::constants::{RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_LINK, RTMGRP_NEIGH};
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::sys::{AsyncSocket, SocketAddr};
use tokio::sync::mpsc;
use tracing::warn;

use super::peers::ROUTE_PROTOCOL;
use crate::node::Mac;

/// Notifications waiting to be looked at; past this the listener reports [`KernelEvent::Lost`].
const QUEUE: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelEvent {
    Link {
        index: u32,
        name: Option<String>,
    },
    Address {
        index: u32,
    },
    Route {
        dst: Option<Ipv4Network>,
        /// Carries overlayd's protocol mark.
        ours: bool,
        deleted: bool,
    },
    Neighbour {
        index: u32,
        /// An FDB entry (AF_BRIDGE) rather than an ARP entry.
        fdb: bool,
        ip: Option<Ipv4Addr>,
        mac: Option<Mac>,
        deleted: bool,
    },
    /// Notifications were dropped (a full queue): anything may have changed.
    Lost,
}

/// Spawns the listener. If its socket cannot be opened, drift is still repaired by the periodic
/// pass; the receiver then never yields.
pub fn spawn() -> mpsc::Receiver<KernelEvent> {
    let (tx, rx) = mpsc::channel(QUEUE);
    let opened = rtnetlink::new_connection().and_then(|(mut conn, handle, mut messages)| {
        let groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_NEIGH;
        conn.socket_mut()
            .socket_mut()
            .bind(&SocketAddr::new(0, groups))?;
        tokio::spawn(conn);
        tokio::spawn(async move {
            // Keep the handle alive: dropping it would close the connection.
            let _handle = handle;
            let mut lost = false;
            while let Some((msg, _)) = messages.next().await {
                let NetlinkPayload::InnerMessage(m) = msg.payload else {
                    continue;
                };
                let Some(ev) = parse(&m) else { continue };
                match tx.try_send(ev) {
                    Ok(()) => lost = false,
                    Err(mpsc::error::TrySendError::Full(_)) if !lost => {
                        // One marker is enough; it is sent as soon as there is room again.
                        lost = tx.send(KernelEvent::Lost).await.is_ok();
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => {}
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
        });
        Ok(())
    });
    if let Err(e) = opened {
        warn!("cannot listen for netlink changes ({e}); relying on the periodic reconcile");
    }
    rx
}

fn parse(m: &RouteNetlinkMessage) -> Option<KernelEvent> {
    use RouteNetlinkMessage as M;
    Some(match m {
        M::NewLink(l) | M::DelLink(l) => KernelEvent::Link {
            index: l.header.index,
            name: l.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            }),
        },
        M::NewAddress(a) | M::DelAddress(a) => KernelEvent::Address {
            index: a.header.index,
        },
        M::NewRoute(r) | M::DelRoute(r) => {
            if r.header.address_family != AddressFamily::Inet {
                return None;
            }
            let dst = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
                    Ipv4Network::new(*ip, r.header.destination_prefix_length).ok()
                }
                _ => None,
            });
            KernelEvent::Route {
                dst,
                ours: r.header.protocol == ROUTE_PROTOCOL,
                deleted: matches!(m, M::DelRoute(_)),
            }
        }
        M::NewNeighbour(n) | M::DelNeighbour(n) => {
            let mut ip = None;
            let mut mac = None;
            for a in &n.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(i)) => ip = Some(*i),
                    NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                        ip = <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
                    }
                    NeighbourAttribute::LinkLayerAddress(l) => {
                        mac = <[u8; 6]>::try_from(l.as_slice()).ok().map(Mac)
                    }
                    _ => {}
                }
            }
            KernelEvent::Neighbour {
                index: n.header.ifindex,
                fdb: n.header.family == AddressFamily::Bridge,
                ip,
                mac,
                deleted: matches!(m, M::DelNeighbour(_)),
            }
        }
        _ => return None,
    })
}
