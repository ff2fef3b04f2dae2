//! Routes, ARP and FDB entries to every other node, reconciled against the kernel: whatever is
//! missing or different is (re)written, whatever no lease explains is removed. Each pass dumps the
//! kernel's tables once, so a route someone deleted comes back on the next pass.
//!
//! Per peer (flannel's vxlan design): ARP `<subnet>.0 → VtepMAC` on the VTEP, FDB `VtepMAC → PublicIP`
//! on the VTEP, then the route `<subnet> via <subnet>.0 dev overlay.<VNI> onlink`. Written in that
//! order so the route never points at an unresolvable next hop.
//!
//! A kernel error on one peer (or one stale entry) never stops the pass: the others are still
//! programmed, the failure is logged once per peer and error, counted, and retried with a capped
//! backoff ([`Failures`]), so one bad lease cannot cut a node off from the rest of the cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use ipnetwork::Ipv4Network;
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, RouteMessageBuilder};
use tracing::{debug, info, warn};

use super::DataplaneError;
use crate::backoff::Backoff;
use crate::netlink;
use crate::node::Mac;

/// Marks routes overlayd owns (`proto 76` in `ip route`), so reconcile never touches anyone else's.
pub const ROUTE_PROTOCOL: RouteProtocol = RouteProtocol::Other(76);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub subnet: Ipv4Network,
    pub public_ip: Ipv4Addr,
    pub mac: Mac,
    /// Route straight to the peer's PublicIP over the underlay instead of the tunnel.
    pub direct: bool,
}

impl Peer {
    fn vtep_ip(&self) -> Ipv4Addr {
        self.subnet.network()
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Devices {
    pub vtep: u32,
    pub underlay: u32,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    pub added: usize,
    pub removed: usize,
    /// Writes or removals that failed in this pass.
    pub errors: usize,
    /// Peers (or stale entries) still not right after this pass, waiting for a retry.
    pub failing: usize,
}

/// First and longest wait before a failed peer is tried again.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_CAP: Duration = Duration::from_secs(60);

/// What failed, keyed by what it concerns (`peer <subnet>`, `removing …`), and when to try again.
#[derive(Debug, Default)]
pub struct Failures {
    by_key: BTreeMap<String, Failure>,
}

#[derive(Debug)]
struct Failure {
    backoff: Backoff,
    retry_at: Instant,
    last_error: String,
    attempts: u32,
}

impl Failures {
    fn waiting(&self, key: &str, now: Instant) -> bool {
        self.by_key.get(key).is_some_and(|f| f.retry_at > now)
    }

    fn failed(&mut self, key: &str, e: &DataplaneError, now: Instant) {
        let f = self
            .by_key
            .entry(key.to_string())
            .or_insert_with(|| Failure {
                backoff: Backoff::new(RETRY_FIRST, RETRY_CAP),
                retry_at: now,
                last_error: String::new(),
                attempts: 0,
            });
        let delay = f.backoff.next_delay();
        f.retry_at = now + delay;
        f.attempts += 1;
        let msg = e.to_string();
        if msg != f.last_error {
            warn!("{key}: {msg}; the other peers are unaffected; retrying this one with backoff (up to every {RETRY_CAP:?})");
            f.last_error = msg;
        }
    }

    fn succeeded(&mut self, key: &str) {
        if let Some(f) = self.by_key.remove(key) {
            info!("{key}: programmed after {} failed attempts", f.attempts);
        }
    }

    /// What is failing now (`peer <subnet>`, `removing …`) with its last error, for /status.
    pub fn current(&self) -> impl Iterator<Item = (&str, &str)> {
        self.by_key
            .iter()
            .map(|(k, f)| (k.as_str(), f.last_error.as_str()))
    }

    /// Forgets a peer that is no longer wanted (its lease went).
    pub(super) fn forget_peer(&mut self, subnet: &Ipv4Network) {
        self.by_key.remove(&format!("peer {subnet}"));
    }

    /// How many things are failing now.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// What is due for another try: peers' subnets, and whether a removal is (removals are
    /// retried by a full pass, which finds what is still stale).
    pub(super) fn due(&self, now: Instant) -> (Vec<Ipv4Network>, bool) {
        let mut peers = Vec::new();
        let mut removal = false;
        for (k, f) in &self.by_key {
            if f.retry_at > now {
                continue;
            }
            match k.strip_prefix("peer ").and_then(|s| s.parse().ok()) {
                Some(subnet) => peers.push(subnet),
                None => removal = true,
            }
        }
        (peers, removal)
    }

    /// Forgets what no longer exists (a peer whose lease went, an entry already gone).
    fn retain(&mut self, keys: &BTreeSet<String>) {
        self.by_key.retain(|k, _| keys.contains(k));
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelRoute {
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub onlink: bool,
    /// The route's metric ([`route_metric`]).
    pub priority: Option<u32>,
}

/// Distinct metrics our routes are spread over.
const METRIC_SPREAD: u32 = 1024;

/// The metric of the route to `subnet`: 1 to 1024, from the subnet's number.
///
/// Only one route per subnet exists, so the metric never chooses between our routes. It is there
/// for the kernel's sake: IPv4 keeps one `fib_info` per distinct next hop, found through a hash of
/// everything but the gateway (protocol, scope, metric, device...). Every peer route is alike in
/// all of those, so with one metric all of them share one hash chain, and each insert walks it:
/// 10 000 routes took 1.2 s of kernel time here, 0.1 s with the metric spread over 1024 values.
pub fn route_metric(subnet: &Ipv4Network) -> u32 {
    let number = u32::from(subnet.network())
        .checked_shr(32 - u32::from(subnet.prefix()))
        .unwrap_or(0);
    number % METRIC_SPREAD + 1
}

pub async fn reconcile(
    handle: &Handle,
    dev: Devices,
    peers: &BTreeMap<Ipv4Network, Peer>,
    failures: &mut Failures,
) -> Result<Changes, DataplaneError> {
    let mut changes = Changes::default();
    let now = Instant::now();
    // Everything tried in this pass; failures of anything else are forgotten at the end.
    let mut tried = BTreeSet::new();
    let mut stale_neighbours = Vec::new();
    let tunneled: Vec<&Peer> = peers.values().filter(|p| !p.direct).collect();

    // ARP: <subnet>.0 → MAC on the VTEP.
    let want_arp: BTreeMap<Ipv4Addr, Mac> = tunneled.iter().map(|p| (p.vtep_ip(), p.mac)).collect();
    let mut arp_ok = BTreeSet::new();
    // Each dump is looked at as it arrives: only stale entries keep their message (10 000 peers'
    // messages held at once would be megabytes for a moment, and the allocator keeps the peak).
    each_neighbour(handle, dev.vtep, AddressFamily::Inet, |msg, ip, lladdr| {
        let Some(ip) = ip else { return };
        match want_arp.get(&ip) {
            Some(mac)
                if lladdr == Some(&mac.0[..]) && msg.header.state == NeighbourState::Permanent =>
            {
                arp_ok.insert(ip);
            }
            Some(_) => {} // wrong MAC or state: replaced below
            None if msg.header.state == NeighbourState::Permanent => {
                stale_neighbours.push((msg, format!("ARP entry {ip}")));
            }
            None => {}
        }
    })
    .await?;

    // FDB: MAC → PublicIP on the VTEP (NTF_SELF: the VXLAN driver's own table).
    let want_fdb: BTreeMap<Mac, Ipv4Addr> = tunneled.iter().map(|p| (p.mac, p.public_ip)).collect();
    let mut fdb_ok = BTreeSet::new();
    each_neighbour(
        handle,
        dev.vtep,
        AddressFamily::Bridge,
        |msg, dst, lladdr| {
            let Some(mac) = lladdr.and_then(|m| <[u8; 6]>::try_from(m).ok()).map(Mac) else {
                return;
            };
            // Entries without a remote are the kernel's own (e.g. the device's address); leave them.
            let Some(dst) = dst else { return };
            match want_fdb.get(&mac) {
                Some(ip) if *ip == dst => {
                    fdb_ok.insert(mac);
                }
                _ => stale_neighbours.push((msg, format!("FDB entry {mac} → {dst}"))),
            }
        },
    )
    .await?;

    // Routes: ours carry ROUTE_PROTOCOL.
    let want_routes: BTreeMap<Ipv4Network, KernelRoute> = peers
        .values()
        .map(|p| {
            let r = if p.direct {
                KernelRoute {
                    gateway: Some(p.public_ip),
                    oif: Some(dev.underlay),
                    onlink: false,
                    priority: Some(route_metric(&p.subnet)),
                }
            } else {
                KernelRoute {
                    gateway: Some(p.vtep_ip()),
                    oif: Some(dev.vtep),
                    onlink: true,
                    priority: Some(route_metric(&p.subnet)),
                }
            };
            (p.subnet, r)
        })
        .collect();
    let mut routes_ok = BTreeSet::new();
    let mut stale_routes = Vec::new();
    each_our_route(handle, |r, dst, have| {
        match dst.and_then(|d| want_routes.get(&d).map(|w| (d, w))) {
            Some((d, want)) if *want == have => {
                routes_ok.insert(d);
            }
            // Another metric is another route (one written before metrics were spread): the
            // right one is written below, this one goes.
            Some((_, want)) if want.priority != have.priority => stale_routes.push(r),
            // Wanted with another next hop (e.g. DirectRouting turned on or off): replaced in
            // place below, so the subnet is never without a route.
            Some(_) => {}
            None => stale_routes.push(r),
        }
    })
    .await?;
    // Stale entries: neighbours first, then routes, each kind with many requests in flight.
    let mut removals = Vec::new();
    for (msg, what) in stale_neighbours {
        let key = format!("removing {what}");
        if failures.waiting(&key, now) {
            tried.insert(key);
            changes.failing += 1;
            continue;
        }
        removals.push((key, msg, what));
    }
    let removed: Vec<(String, Result<usize, DataplaneError>)> = futures::stream::iter(removals)
        .map(|(key, msg, what)| async move {
            (key, delete_neighbour(handle, msg, &what).await.map(|()| 1))
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    for (key, result) in removed {
        changes.note(failures, &mut tried, &key, now, result, false);
    }
    let mut route_removals = Vec::new();
    for r in stale_routes {
        let dst = describe_route(&r)
            .0
            .map_or_else(|| "an unknown destination".to_string(), |d| d.to_string());
        let key = format!("removing route to {dst}");
        if failures.waiting(&key, now) {
            tried.insert(key);
            changes.failing += 1;
            continue;
        }
        route_removals.push((key, r, dst));
    }
    let removed: Vec<(String, Result<usize, DataplaneError>)> =
        futures::stream::iter(route_removals)
            .map(|(key, r, dst)| async move {
                let result = match handle.route().del(r).execute().await {
                    Ok(()) => {
                        info!("removed route to {dst}");
                        Ok(1)
                    }
                    Err(e) if netlink::is_errno(&e, netlink::ESRCH) => Ok(0), // already gone
                    Err(e) => Err(DataplaneError::netlink(
                        format!("removing route to {dst}"),
                        e,
                    )),
                };
                (key, result)
            })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
    for (key, result) in removed {
        changes.note(failures, &mut tried, &key, now, result, false);
    }

    let mut todo = Vec::new();
    for p in peers.values() {
        let key = peer_key(p);
        if failures.waiting(&key, now) {
            tried.insert(key);
            changes.failing += 1;
            continue;
        }
        todo.push(p);
    }
    let ok = KernelOk {
        arp: arp_ok,
        fdb: fdb_ok,
        routes: routes_ok,
    };
    for (key, result) in program_all(handle, dev, todo, &ok).await {
        changes.note(failures, &mut tried, &key, now, result, true);
    }
    failures.retain(&tried);
    if changes != Changes::default() {
        debug!(?changes, "peers reconciled");
    }
    Ok(changes)
}

impl Changes {
    /// [`Changes::note`] outside a full pass: nothing is forgotten afterwards.
    pub(super) fn book(
        &mut self,
        failures: &mut Failures,
        key: &str,
        now: Instant,
        result: Result<usize, DataplaneError>,
        adds: bool,
    ) {
        self.note(failures, &mut BTreeSet::new(), key, now, result, adds);
    }

    /// Books the outcome of one write (`n` entries changed) and keeps `failures` up to date.
    fn note(
        &mut self,
        failures: &mut Failures,
        tried: &mut BTreeSet<String>,
        key: &str,
        now: Instant,
        result: Result<usize, DataplaneError>,
        adds: bool,
    ) {
        tried.insert(key.to_string());
        match result {
            Ok(n) => {
                if adds {
                    self.added += n;
                } else {
                    self.removed += n;
                }
                failures.succeeded(key);
            }
            Err(e) => {
                self.errors += 1;
                self.failing += 1;
                failures.failed(key, &e, now);
            }
        }
    }
}

/// Requests in flight at once when many entries change (the first sync, a full pass after a
/// flush): a netlink round trip costs about 90 µs here, so 10 000 peers written one after another
/// would take seconds; pipelined, the kernel's own work is what is left.
pub(super) const IN_FLIGHT: usize = 128;

/// What a kernel dump found already right; empty when nothing was dumped (write everything).
#[derive(Debug, Default)]
pub(super) struct KernelOk {
    pub arp: BTreeSet<Ipv4Addr>,
    pub fdb: BTreeSet<Mac>,
    pub routes: BTreeSet<Ipv4Network>,
}

pub(super) fn peer_key(p: &Peer) -> String {
    format!("peer {}", p.subnet)
}

/// [`program`] for many peers, [`IN_FLIGHT`] at a time; each peer's own entries stay in order.
pub(super) async fn program_all(
    handle: &Handle,
    dev: Devices,
    peers: Vec<&Peer>,
    ok: &KernelOk,
) -> Vec<(String, Result<usize, DataplaneError>)> {
    futures::stream::iter(peers)
        .map(|p| async move { (peer_key(p), program(handle, dev, p, ok).await) })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await
}

/// Writes whatever of `p`'s ARP, FDB and route entries is missing or wrong. Returns how many.
async fn program(
    handle: &Handle,
    dev: Devices,
    p: &Peer,
    ok: &KernelOk,
) -> Result<usize, DataplaneError> {
    let mut added = 0;
    if !p.direct {
        if !ok.arp.contains(&p.vtep_ip()) {
            handle
                .neighbours()
                .add(dev.vtep, IpAddr::V4(p.vtep_ip()))
                .link_layer_address(&p.mac.0)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(|e| {
                    DataplaneError::netlink(format!("adding ARP entry for {}", p.subnet), e)
                })?;
            added += 1;
        }
        if !ok.fdb.contains(&p.mac) {
            handle
                .neighbours()
                .add_bridge(dev.vtep, &p.mac.0)
                .destination(IpAddr::V4(p.public_ip))
                .flags(NeighbourFlags::Own)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(|e| {
                    DataplaneError::netlink(format!("adding FDB entry for {}", p.subnet), e)
                })?;
            added += 1;
        }
    }
    if !ok.routes.contains(&p.subnet) {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(p.subnet.network(), p.subnet.prefix())
            .protocol(ROUTE_PROTOCOL)
            .priority(route_metric(&p.subnet))
            .scope(RouteScope::Universe);
        b = if p.direct {
            b.gateway(p.public_ip).output_interface(dev.underlay)
        } else {
            b.gateway(p.vtep_ip()).output_interface(dev.vtep).onlink()
        };
        handle
            .route()
            .add(b.build())
            .replace()
            .execute()
            .await
            .map_err(|e| DataplaneError::netlink(format!("adding route to {}", p.subnet), e))?;
        added += 1;
        info!(
            subnet = %p.subnet,
            public_ip = %p.public_ip,
            vtep_mac = %p.mac,
            direct = p.direct,
            "programmed peer"
        );
    }
    Ok(added)
}

/// The routes overlayd owns (marked with [`ROUTE_PROTOCOL`]), with their destination and next hop.
pub async fn our_routes(
    handle: &Handle,
) -> Result<Vec<(RouteMessage, Option<Ipv4Network>, KernelRoute)>, DataplaneError> {
    let mut out = Vec::new();
    each_our_route(handle, |r, dst, have| out.push((r, dst, have))).await?;
    Ok(out)
}

/// Calls `f` for each route overlayd owns, as the dump arrives.
async fn each_our_route(
    handle: &Handle,
    mut f: impl FnMut(RouteMessage, Option<Ipv4Network>, KernelRoute),
) -> Result<(), DataplaneError> {
    let mut dump = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(r) = dump
        .try_next()
        .await
        .map_err(|e| DataplaneError::netlink("listing routes", e))?
    {
        if r.header.protocol == ROUTE_PROTOCOL {
            let (dst, have) = describe_route(&r);
            f(r, dst, have);
        }
    }
    Ok(())
}

fn describe_route(r: &RouteMessage) -> (Option<Ipv4Network>, KernelRoute) {
    let mut dst = None;
    let mut gateway = None;
    let mut oif = None;
    let mut priority = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
                dst = Ipv4Network::new(*ip, r.header.destination_prefix_length).ok()
            }
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(*ip),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Priority(p) => priority = Some(*p),
            _ => {}
        }
    }
    let onlink = r.header.flags.contains(RouteFlags::Onlink);
    (
        dst,
        KernelRoute {
            gateway,
            oif,
            onlink,
            priority,
        },
    )
}

/// Calls `f` for each neighbour of `family` on link `index` (its address and link-layer
/// address), as the dump arrives.
async fn each_neighbour(
    handle: &Handle,
    index: u32,
    family: AddressFamily,
    mut f: impl FnMut(NeighbourMessage, Option<Ipv4Addr>, Option<&[u8]>),
) -> Result<(), DataplaneError> {
    let mut stream = handle
        .neighbours()
        .get()
        .set_address_family(family)
        .execute();
    while let Some(msg) = stream
        .try_next()
        .await
        .map_err(|e| DataplaneError::netlink("listing neighbours", e))?
    {
        if msg.header.ifindex != index {
            continue;
        }
        let mut ip = None;
        let mut lladdr = None;
        for a in &msg.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(i)) => ip = Some(*i),
                // FDB entries (AF_BRIDGE) carry the remote's IPv4 address as raw bytes.
                NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                    ip = <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
                }
                NeighbourAttribute::LinkLayerAddress(m) => lladdr = Some(m.clone()),
                _ => {}
            }
        }
        f(msg, ip, lladdr.as_deref());
    }
    Ok(())
}

async fn delete_neighbour(
    handle: &Handle,
    msg: NeighbourMessage,
    what: &str,
) -> Result<(), DataplaneError> {
    match handle.neighbours().del(msg).execute().await {
        Ok(()) => {
            info!("removed {what}");
            Ok(())
        }
        Err(e) if netlink::is_errno(&e, netlink::ENOENT) => Ok(()), // gone already
        Err(e) => Err(DataplaneError::netlink(format!("removing {what}"), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_metrics_are_spread_and_never_zero() {
        let metric = |s: &str| route_metric(&s.parse().unwrap());
        assert_eq!(metric("10.244.7.0/24"), (0x0af407 % 1024) + 1);
        let metrics: BTreeSet<u32> = (0..1024u32)
            .map(|i| {
                route_metric(&Ipv4Network::new(Ipv4Addr::from(0x0af4_0000 + (i << 8)), 24).unwrap())
            })
            .collect();
        assert_eq!(
            metrics.len(),
            1024,
            "consecutive subnets get distinct metrics"
        );
        assert!(metrics.iter().all(|m| (1..=1024).contains(m)));
        // The smallest subnets too (a /30 per node).
        assert!((1..=1024).contains(&metric("10.9.0.4/30")));
    }
}
