//! What `/status` answers: everything the daemon knows, as JSON. `overlayd status` reads the same
//! types back, so the text it prints and the JSON can never disagree.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Check {
    /// `lease`, `devices`, `iptables`, `peers`, `etcd`
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    /// Every readiness check passes (what `/readyz` answers).
    pub ready: bool,
    pub checks: Vec<Check>,
    pub config: Option<ConfigReport>,
    pub node: Option<NodeReport>,
    pub lease: Option<LeaseReport>,
    pub etcd: EtcdReport,
    pub devices: Option<DevicesReport>,
    pub peers: Vec<PeerReport>,
    pub ipam: Vec<IpamReport>,
    pub repairs: RepairsReport,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfigReport {
    pub network: String,
    pub subnet_len: u8,
    pub vni: u32,
    pub port: u16,
    pub mtu: u32,
    pub direct_routing: bool,
    pub ip_masq: bool,
    pub lease_only: bool,
    pub lease_ttl_seconds: u64,
    pub resync_interval_seconds: f64,
    pub etcd_heard_within_seconds: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeReport {
    pub name: String,
    pub iface: String,
    pub public_ip: String,
    pub vtep_mac: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseReport {
    pub subnet: String,
    /// etcd lease id in hex, as `etcdctl lease list` shows it; `None` for a reservation.
    pub lease_id: Option<String>,
    pub reservation: bool,
    /// False after etcd said the lease expired, until the same subnet is leased again.
    pub held: bool,
    /// Seconds left: from the last keep-alive answer, counted down since (`None`: no answer yet,
    /// or a reservation).
    pub ttl_left_seconds: Option<i64>,
    pub granted_ttl_seconds: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EtcdReport {
    pub endpoints: String,
    pub prefix: String,
    /// Seconds since etcd last answered (`None`: never; 0 while the watch stream is open).
    pub last_contact_seconds_ago: Option<f64>,
    /// The watch stream is open and etcd answers on it.
    #[serde(default)]
    pub watch_stream_open: bool,
    /// The last failed call, cleared by the next answer.
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevicesReport {
    pub vtep: String,
    pub bridge: String,
    pub mtu: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerReport {
    pub subnet: String,
    pub public_ip: String,
    pub node_name: Option<String>,
    pub vtep_mac: String,
    /// Routed straight over the underlay (`Backend.DirectRouting`), not through the tunnel.
    pub direct: bool,
    /// `programmed` once its route, ARP and FDB entries are in the kernel; `pending` until then.
    pub state: String,
    /// What the probes through the overlay say (absent while probing is off).
    #[serde(default)]
    pub probe: Option<ProbeReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeReport {
    /// `None` until the first answer, or the first verdict of unreachable.
    pub reachable: Option<bool>,
    pub rtt_ms: Option<f64>,
    /// Probes missed in a row.
    pub misses: u32,
    pub sent: u64,
    pub answered: u64,
    /// Seconds since `reachable` last changed.
    pub since_seconds: f64,
    /// The likely cause while unreachable.
    pub cause: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IpamReport {
    pub network: String,
    pub store: String,
    pub allocated: Option<usize>,
    pub capacity: usize,
    pub error: Option<String>,
    /// Of those allocated: pods whose host veth exists (None: the node's links were not read).
    #[serde(default)]
    pub live: Option<usize>,
    /// Leftovers of sandboxes gone without DEL (no host veth, older than the grace).
    #[serde(default)]
    pub reclaimable: Option<usize>,
    /// Without a host veth but younger than the grace: ADDs in progress (or just killed).
    #[serde(default)]
    pub starting: Option<usize>,
    /// Given back without DEL since the store was made.
    #[serde(default)]
    pub reclaimed_total: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RepairsReport {
    /// Routes, ARP/FDB entries or devices put back while the leases stayed the same.
    pub dataplane: u64,
    /// Times our iptables rules were found missing and restored.
    pub iptables: u64,
    /// The latest repairs, newest last.
    pub recent: Vec<RepairEvent>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepairEvent {
    pub seconds_ago: f64,
    pub what: String,
}
