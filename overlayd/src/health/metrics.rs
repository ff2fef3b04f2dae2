//! The Prometheus metrics `/metrics` serves. Every name here is used by the dashboard and the
//! alerts in `manifests/` (a lab test checks that each one they use is served).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabels {
    /// `added` or `removed`
    pub op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NetworkLabels {
    /// The CNI network (the plugin keeps one store per network name).
    pub network: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RepairLabels {
    /// `dataplane` (routes, ARP, FDB, devices) or `iptables`
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why a subnet key was ignored: `not_json`, `bad_key`, `prefix_length`, `outside_network`,
    /// `overlaps_own`, `truncated_event`.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    /// A readiness check: `lease`, `devices`, `iptables`, `peers`, `etcd`.
    pub check: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub leases: Gauge,
    pub peers: Gauge,
    pub changes: Family<ChangeLabels, Counter>,
    pub errors: Counter,
    pub peer_errors: Counter,
    pub peers_failing: Gauge,
    pub pod_addresses: Family<NetworkLabels, Gauge>,
    pub pod_capacity: Gauge,
    pub pod_addresses_live: Family<NetworkLabels, Gauge>,
    pub pod_addresses_reclaimable: Family<NetworkLabels, Gauge>,
    pub pod_addresses_reclaimed: Family<NetworkLabels, Gauge>,
    pub repairs: Family<RepairLabels, Counter>,
    pub etcd_last_contact: Gauge,
    pub lease_ttl: Gauge,
    pub ready: Gauge,
    pub check_ok: Family<CheckLabels, Gauge>,
    pub probes_sent: Counter,
    pub probes_answered: Counter,
    pub probe_rtt: Histogram,
    pub peers_reachable: Gauge,
    pub peers_unreachable: Gauge,
    pub ignored_leases: Family<ReasonLabels, Counter>,
    pub etcd_watch_restarts: Counter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("overlayd");
        let m = Metrics {
            leases: Gauge::default(),
            peers: Gauge::default(),
            changes: Family::default(),
            errors: Counter::default(),
            peer_errors: Counter::default(),
            peers_failing: Gauge::default(),
            pod_addresses: Family::default(),
            pod_capacity: Gauge::default(),
            pod_addresses_live: Family::default(),
            pod_addresses_reclaimable: Family::default(),
            pod_addresses_reclaimed: Family::default(),
            repairs: Family::default(),
            etcd_last_contact: Gauge::default(),
            lease_ttl: Gauge::default(),
            ready: Gauge::default(),
            check_ok: Family::default(),
            probes_sent: Counter::default(),
            probes_answered: Counter::default(),
            // 50 µs to ~1.6 s: a lab's loopback-fast tunnel up to a cross-region path.
            probe_rtt: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
            peers_reachable: Gauge::default(),
            peers_unreachable: Gauge::default(),
            ignored_leases: Family::default(),
            etcd_watch_restarts: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "subnet_leases",
            "Subnet leases in etcd, this node's included",
            m.leases.clone(),
        );
        registry.register("peers", "Other nodes this node routes to", m.peers.clone());
        registry.register(
            "dataplane_changes",
            "Routes, ARP and FDB entries written or removed to match the leases",
            m.changes.clone(),
        );
        registry.register(
            "dataplane_errors",
            "Data plane passes that failed",
            m.errors.clone(),
        );
        registry.register(
            "peer_errors",
            "Route, ARP or FDB writes for one peer (or removals of stale entries) the kernel refused; each is retried with backoff while the other peers are programmed",
            m.peer_errors.clone(),
        );
        registry.register(
            "peers_failing",
            "Peers (or stale entries) not yet right after the last pass, waiting for a retry",
            m.peers_failing.clone(),
        );
        registry.register(
            "pod_addresses",
            "Pod addresses of this node's subnet the CNI plugin has handed out",
            m.pod_addresses.clone(),
        );
        registry.register(
            "pod_address_capacity",
            "Pod addresses this node's subnet has (all but network, gateway, broadcast)",
            m.pod_capacity.clone(),
        );
        registry.register(
            "pod_addresses_live",
            "Pod addresses handed out whose pod's host veth exists",
            m.pod_addresses_live.clone(),
        );
        registry.register(
            "pod_addresses_reclaimable",
            "Pod addresses held for sandboxes gone without DEL (no host veth, older than the grace): reclaimed by the next ADD on a full subnet or by the daemon's background pass",
            m.pod_addresses_reclaimable.clone(),
        );
        registry.register(
            "pod_addresses_reclaimed",
            "Pod addresses given back without DEL since the IPAM store was made (dead sandboxes, allocations of an earlier boot), by the plugin and the daemon; the store's own count",
            m.pod_addresses_reclaimed.clone(),
        );
        registry.register(
            "repairs",
            "Drift repaired while the leases stayed the same (someone removed a route, a device or our iptables rules)",
            m.repairs.clone(),
        );
        registry.register(
            "etcd_last_contact_timestamp_seconds",
            "Unix time etcd last answered this node (0: never)",
            m.etcd_last_contact.clone(),
        );
        registry.register(
            "lease_ttl_seconds",
            "Seconds left on this node's etcd lease at the last check (-1: no lease, or a reservation)",
            m.lease_ttl.clone(),
        );
        registry.register(
            "ready",
            "1 when every readiness check passes (what /readyz answers)",
            m.ready.clone(),
        );
        registry.register(
            "readiness_check",
            "1 when the readiness check passes, per check",
            m.check_ok.clone(),
        );
        registry.register(
            "probes_sent",
            "ICMP echo requests sent through the overlay to peers' VTEP addresses",
            m.probes_sent.clone(),
        );
        registry.register(
            "probes_answered",
            "Probe replies received in time",
            m.probes_answered.clone(),
        );
        registry.register(
            "probe_rtt_seconds",
            "Round-trip time of answered peer probes (through the VXLAN tunnel and back)",
            m.probe_rtt.clone(),
        );
        registry.register(
            "peers_reachable",
            "Peers whose last probes were answered",
            m.peers_reachable.clone(),
        );
        registry.register(
            "peers_unreachable",
            "Peers that missed 3 probes in a row (see /status for the likely cause)",
            m.peers_unreachable.clone(),
        );
        registry.register(
            "ignored_leases",
            "Subnet keys (or watch events) ignored because overlayd cannot use them, counted once per write; they never remove a peer",
            m.ignored_leases.clone(),
        );
        registry.register(
            "etcd_watch_restarts",
            "Times the etcd watch was started again after it ended or could not be started (every attempt; the first start is not counted). Retries back off from 0.5 s to 4 s, so a lasting rate above about 0.5/s means they do not",
            m.etcd_watch_restarts.clone(),
        );
        m.lease_ttl.set(-1);
        Metrics { registry, ..m }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
