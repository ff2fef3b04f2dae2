//! The node's VXLAN data plane (flannel's vxlan backend, reconciled instead of fire-and-forget):
//! the VTEP and the bridge, one route + ARP + FDB entry per other node, sysctls and iptables.
//! [`Dataplane::reconcile`] is declarative: it takes the set of leases and makes the kernel match,
//! so it serves the first sync, every watch event and the periodic drift repair alike.

pub mod iptables;
pub mod links;
pub mod monitor;
pub mod peers;
pub mod probe;
pub mod sysctl;

use std::net::Ipv4Addr;

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
    pub fn peers(&self, set: &LeaseSet) -> Vec<Peer> {
        let mut out = Vec::new();
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
            out.push(Peer {
                subnet: l.subnet,
                public_ip: v.public_ip,
                mac,
                direct: self
                    .direct_routing_net
                    .is_some_and(|n| n.contains(v.public_ip)),
            });
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
    peers: Vec<Peer>,
    peers_revision: i64,
    /// Peers whose programming failed, retried with backoff while the others go on.
    failures: peers::Failures,
}

impl Dataplane {
    pub fn new(handle: Handle, plan: Plan) -> Dataplane {
        Dataplane {
            handle,
            plan,
            iptables: None,
            peers: Vec::new(),
            peers_revision: -1,
            failures: peers::Failures::default(),
        }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Devices, addresses and sysctls. Safe to call again at any time.
    pub async fn ensure_devices(&mut self) -> Result<Devices, DataplaneError> {
        let vtep = links::ensure_vtep(&self.handle, &self.plan.vtep).await?;
        links::ensure_bridge(&self.handle, &self.plan.bridge).await?;
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

    /// Makes the kernel match `set`. Returns what changed.
    pub async fn reconcile(&mut self, set: &LeaseSet) -> Result<peers::Changes, DataplaneError> {
        if set.revision != self.peers_revision {
            self.peers = self.plan.peers(set);
            self.peers_revision = set.revision;
        }
        let dev = self.ensure_devices().await?;
        peers::reconcile(&self.handle, dev, &self.peers, &mut self.failures).await
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
    pub fn peers(&self) -> &[Peer] {
        &self.peers
    }

    /// How many other nodes the last pass routed to.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }
}
