//! The node's VXLAN data plane (flannel's vxlan backend, reconciled instead of fire-and-forget):
//! the VTEP and the bridge, one route + ARP + FDB entry per other node, sysctls and iptables.
//! [`Dataplane::reconcile`] is declarative: it takes the set of leases and makes the kernel match,
//! so it serves the first sync, every watch event and the periodic drift repair alike.

pub mod iptables;
pub mod links;
pub mod monitor;
pub mod nft_events;
pub mod peer_diff;
pub mod peers;
pub mod probe;
pub mod sysctl;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnetwork::Ipv4Network;
use rtnetlink::Handle;
use tracing::warn;

use crate::config::NetworkConfig;
use crate::node::Node;
use crate::registry::LeaseSet;
use links::{BridgeSpec, VtepSpec};
use peers::{Devices, Peer};

pub const DEFAULT_BRIDGE: &str = "cni0";

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("netlink: {what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{0} vanished right after it was created; is another agent managing it?")]
    Vanished(String),
    #[error("{0}")]
    Invalid(String),
    #[error("iptables: {0}")]
    Iptables(String),
    #[error("sysctl {key}: {detail}")]
    Sysctl { key: String, detail: String },
}

impl DataplaneError {
    pub fn netlink(what: impl Into<String>, source: rtnetlink::Error) -> Self {
        DataplaneError::Netlink {
            what: what.into(),
            source,
        }
    }
}

/// Everything the data plane needs to know, fixed for the daemon's life.
#[derive(Debug, Clone)]
pub struct Plan {
    pub vtep: VtepSpec,
    pub bridge: BridgeSpec,
    pub network: Ipv4Network,
    pub subnet: Ipv4Network,
    pub vni: u32,
    pub underlay_index: u32,
    /// Set with `Backend.DirectRouting`: peers inside this L2 subnet are routed without the tunnel.
    pub direct_routing_net: Option<Ipv4Network>,
    /// This node's underlay subnet, for when `Backend.DirectRouting` is turned on later.
    pub underlay_net: Option<Ipv4Network>,
    pub ip_masq: bool,
}

impl Plan {
    pub fn new(
        cfg: &NetworkConfig,
        node: &Node,
        subnet: Ipv4Network,
        mtu: u32,
        ip_masq: bool,
        underlay_net: Option<Ipv4Network>,
    ) -> Plan {
        let gateway = Ipv4Addr::from(u32::from(subnet.network()) + 1);
        Plan {
            vtep: VtepSpec {
                name: vtep_name(cfg.backend.vni),
                vni: cfg.backend.vni,
                local: node.public_ip,
                port: cfg.backend.port,
                underlay_index: node.iface_index,
                mtu,
                mac: node.vtep_mac,
                addr: subnet.network(),
            },
            bridge: BridgeSpec {
                name: DEFAULT_BRIDGE.into(),
                mtu,
                // A /len network with .1 as host: prefix always valid as subnet_len <= 30.
                gateway: Ipv4Network::new(gateway, subnet.prefix()).unwrap_or(subnet),
            },
            network: cfg.network,
            subnet,
            vni: cfg.backend.vni,
            underlay_index: node.iface_index,
            direct_routing_net: if cfg.backend.direct_routing {
                underlay_net
            } else {
                None
            },
            underlay_net,
            ip_masq,
        }
    }

    /// The peers a lease set asks for: every other node's vxlan lease with a usable VtepMAC.
    pub fn peers(&self, set: &LeaseSet) -> BTreeMap<Ipv4Network, Peer> {
        let mut out = BTreeMap::new();
        for l in set.leases.values() {
            if l.subnet == self.subnet || !self.network.contains(l.subnet.network()) {
                continue;
            }
            let Some(v) = &l.value else {
                warn!(subnet = %l.subnet, "lease value is not JSON overlayd understands; skipping this peer");
                continue;
            };
            if !v.backend_type.eq_ignore_ascii_case("vxlan") {
                continue; // another backend's node: not ours to program
            }
            let Some(mac) = v.vtep_mac() else {
                continue; // a reservation whose node has not started yet
            };
            if v.backend_data
                .as_ref()
                .is_some_and(|b| b.vni != 0 && b.vni != self.vni)
            {
                warn!(subnet = %l.subnet, "peer uses another VNI; skipping it");
                continue;
            }
            out.insert(
                l.subnet,
                Peer {
                    subnet: l.subnet,
                    public_ip: v.public_ip,
                    mac,
                    direct: self
                        .direct_routing_net
                        .is_some_and(|n| n.contains(v.public_ip)),
                },
            );
        }
        out
    }
}

pub fn vtep_name(vni: u32) -> String {
    format!("overlay.{vni}")
}

pub struct Dataplane {
    handle: Handle,
    plan: Plan,
    iptables: Option<iptables::Iptables>,
    /// Peers derived from the lease set at `peers_revision`; recomputed only when the set changes,
    /// so a malformed lease is warned about once, not on every pass.
    peers: Arc<BTreeMap<Ipv4Network, Peer>>,
    peers_revision: i64,
    /// Peers whose programming failed, retried with backoff while the others go on.
    failures: peers::Failures,
    /// Indices of the VTEP and the bridge as last ensured, to tell our devices' notifications
    /// from the rest.
    indices: Option<(u32, u32)>,
}

impl Dataplane {
    pub fn new(handle: Handle, plan: Plan) -> Dataplane {
        Dataplane {
            handle,
            plan,
            iptables: None,
            peers: Arc::new(BTreeMap::new()),
            peers_revision: -1,
            failures: peers::Failures::default(),
            indices: None,
        }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Devices, addresses and sysctls. Safe to call again at any time.
    pub async fn ensure_devices(&mut self) -> Result<Devices, DataplaneError> {
        let vtep = links::ensure_vtep(&self.handle, &self.plan.vtep).await?;
        let bridge = links::ensure_bridge(&self.handle, &self.plan.bridge).await?;
        self.indices = Some((vtep, bridge));
        Ok(Devices {
            vtep,
            underlay: self.plan.underlay_index,
        })
    }

    pub async fn ensure_sysctls(&self) -> Result<(), DataplaneError> {
        sysctl::enable_forwarding()?;
        // kube-proxy's service rules must see pod-to-pod traffic that stays on the bridge.
        if let Err(e) = sysctl::enable_bridge_nf_call_iptables().await {
            warn!("{e}; Services may not work for pods on the same node");
        }
        Ok(())
    }

    /// The iptables backend in use, once the first check picked it.
    pub fn iptables_backend(&self) -> Option<crate::iptables_tools::Backend> {
        self.iptables.as_ref().map(|i| i.backend())
    }

    pub async fn ensure_iptables(&mut self) -> Result<bool, DataplaneError> {
        if self.iptables.is_none() {
            let ipt = iptables::Iptables::detect().await?;
            tracing::info!(backend = %ipt.backend(), "iptables backend");
            self.iptables = Some(ipt);
        }
        let rules = iptables::Rules {
            network: self.plan.network,
            subnet: self.plan.subnet,
            ip_masq: self.plan.ip_masq,
        };
        match &self.iptables {
            Some(ipt) => ipt.ensure(&rules).await,
            None => Ok(false),
        }
    }

    /// Makes the kernel match `set` by checking everything against dumps of its tables: the
    /// first sync, the periodic drift repair, and after a kernel notification. Returns what changed.
    pub async fn reconcile(&mut self, set: &LeaseSet) -> Result<peers::Changes, DataplaneError> {
        if set.revision != self.peers_revision {
            self.peers = Arc::new(self.plan.peers(set));
            self.peers_revision = set.revision;
        }
        let dev = self.ensure_devices().await?;
        peers::reconcile(&self.handle, dev, &self.peers, &mut self.failures).await
    }

    /// Applies a new lease set as a diff against the last one (no dumps): what a watch event
    /// changes. Before the first full pass there is nothing to diff against, so it does one.
    pub async fn apply(&mut self, set: &LeaseSet) -> Result<peers::Changes, DataplaneError> {
        if self.peers_revision < 0 {
            return self.reconcile(set).await;
        }
        if set.revision == self.peers_revision {
            return Ok(peers::Changes::default());
        }
        let new = self.plan.peers(set);
        let dev = self.ensure_devices().await?;
        for gone in self.peers.keys().filter(|s| !new.contains_key(s)) {
            self.failures.forget_peer(gone);
        }
        let mut changes =
            peer_diff::apply(&self.handle, dev, &self.peers, &new, &mut self.failures).await;
        self.peers = Arc::new(new);
        self.peers_revision = set.revision;
        changes.failing = self.failures.len();
        Ok(changes)
    }

    /// Whether a failed write is due for another try.
    pub fn retry_due(&self) -> bool {
        let (peers, removal) = self.failures.due(std::time::Instant::now());
        removal || !peers.is_empty()
    }

    /// Tries again what failed and is due, with no dump unless a removal failed.
    pub async fn retry(&mut self, set: &LeaseSet) -> Result<peers::Changes, DataplaneError> {
        let now = std::time::Instant::now();
        let (due, removal) = self.failures.due(now);
        if removal || self.peers_revision != set.revision {
            return self.reconcile(set).await;
        }
        let dev = self.ensure_devices().await?;
        for gone in due.iter().filter(|s| !self.peers.contains_key(s)) {
            self.failures.forget_peer(gone);
        }
        let todo: Vec<&Peer> = due.iter().filter_map(|s| self.peers.get(s)).collect();
        let mut changes = peers::Changes::default();
        for (key, result) in peers::program_all(&self.handle, dev, todo, &Default::default()).await
        {
            changes.book(&mut self.failures, &key, now, result, true);
        }
        changes.failing = self.failures.len();
        Ok(changes)
    }

    /// Whether a kernel notification shows drift a full pass must repair: our devices changed, or
    /// an entry a peer needs was removed or overwritten. Our own writes, and removals of entries no
    /// peer needs (our own diffs), are not drift.
    pub fn is_drift(&self, ev: &monitor::KernelEvent) -> bool {
        use monitor::KernelEvent as E;
        let ours = |index: u32| self.indices.is_none_or(|(v, b)| index == v || index == b);
        let wanted_subnet = |ip: Ipv4Addr| {
            Ipv4Network::new(ip, self.plan.subnet.prefix())
                .ok()
                .and_then(|n| self.peers.get(&n))
        };
        match ev {
            E::Lost => true,
            E::Link { index, name } => {
                ours(*index)
                    || *index == self.plan.underlay_index
                    || name
                        .as_deref()
                        .is_some_and(|n| n == self.plan.vtep.name || n == self.plan.bridge.name)
            }
            E::Address { index } => ours(*index),
            E::Route {
                dst,
                ours: true,
                deleted: true,
            } => dst.is_some_and(|d| self.peers.contains_key(&d)),
            // Someone else's route for a peer's subnet shadows or replaces ours.
            E::Route {
                dst, ours: false, ..
            } => dst.is_some_and(|d| self.peers.contains_key(&d)),
            E::Route { .. } => false,
            E::Neighbour { index, .. } if self.indices.is_some_and(|(v, _)| *index != v) => false,
            E::Neighbour {
                fdb: false,
                ip: Some(ip),
                mac,
                deleted,
                ..
            } => wanted_subnet(*ip).is_some_and(|p| !p.direct && (*deleted || *mac != Some(p.mac))),
            E::Neighbour {
                fdb: true,
                mac: Some(mac),
                ip,
                deleted,
                ..
            } => self
                .peers
                .values()
                .find(|p| !p.direct && p.mac == *mac)
                .is_some_and(|p| *deleted || ip.is_some_and(|ip| ip != p.public_ip)),
            E::Neighbour { .. } => false,
        }
    }

    /// Turns `Backend.DirectRouting` on or off for the running daemon (the config changed in
    /// etcd); the next [`Dataplane::reconcile`] moves the peers. Returns whether anything changes.
    pub fn set_direct_routing(&mut self, on: bool) -> bool {
        let want = if on { self.plan.underlay_net } else { None };
        if want == self.plan.direct_routing_net {
            return false;
        }
        self.plan.direct_routing_net = want;
        self.peers_revision = -1; // derive the peers again
        true
    }

    /// What the last pass could not program, and why (each retried with backoff).
    pub fn failures(&self) -> &peers::Failures {
        &self.failures
    }

    /// The peers the last pass programmed (or tried to).
    pub fn peers(&self) -> &Arc<BTreeMap<Ipv4Network, Peer>> {
        &self.peers
    }

    /// How many other nodes the last pass routed to.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }
}
