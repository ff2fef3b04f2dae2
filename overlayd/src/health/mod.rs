//! What the daemon knows about itself, for probes, operators and dashboards: `/healthz`
//! (liveness), `/readyz` (readiness, naming the failing check), `/status` (JSON of everything
//! below) and `/metrics` (Prometheus).
//!
//! The supervisor reports into [`Health`] as things happen; nothing here changes the node. The
//! counters make drift visible: repairs that keep climbing while the leases stay the same mean
//! something else fights over our routes or rules.

mod etcd_contact;
pub mod http;
pub mod metrics;
pub mod probes;
pub mod readiness;
pub mod report;
pub mod server;

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;
use overlay_state::{ipam_store, IpamStore};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tracing::{info, warn};

use crate::config::NetworkConfig;
use crate::dataplane::peers::{Changes, Peer};
use crate::dataplane::Plan;
use crate::node::Node;
use crate::registry::{Acquired, LeaseSet};
pub use metrics::{ChangeLabels, Metrics, NetworkLabels};
use metrics::{CheckLabels, RepairLabels};
use report::{
    ConfigReport, DevicesReport, EtcdReport, IpamReport, LeaseReport, NodeReport, PeerReport,
    ProbeReport, RepairEvent, RepairsReport, StatusReport,
};

pub use server::serve;

/// How long etcd may stay silent before `/readyz` fails (`--etcd-heard-within`).
pub const DEFAULT_ETCD_HEARD_WITHIN: Duration = Duration::from_secs(60);
/// Repairs kept for `/status`.
const RECENT_REPAIRS: usize = 10;

/// Settings the daemon starts with that shape what is checked.
#[derive(Debug, Clone)]
pub struct Settings {
    pub lease_only: bool,
    pub etcd_heard_within: Duration,
}

pub struct Health {
    metrics: Metrics,
    // The supervisor's handles on the counters it drives directly.
    pub leases: Gauge,
    pub peers: Gauge,
    pub errors: Counter,
    known: Mutex<Known>,
    prober: Mutex<Option<crate::dataplane::probe::Prober>>,
    /// The lease revision the probe targets were last taken from.
    probe_revision: std::sync::atomic::AtomicI64,
}

#[derive(Default)]
struct Known {
    settings: Option<Settings>,
    config: Option<ConfigReport>,
    node: Option<NodeReport>,
    lease: Option<LeaseReport>,
    etcd: Option<etcd_contact::EtcdState>,
    /// The last keep-alive answer for the lease.
    refreshed: Option<etcd_contact::Refreshed>,
    devices: Option<(DevicesReport, rtnetlink::Handle)>,
    /// The peers the last pass asked for, and the leases they came from: shared with the data
    /// plane (no copy per watch event); reports are made from them when someone asks.
    peers: Arc<BTreeMap<Ipv4Network, Peer>>,
    leases: Arc<LeaseSet>,
    /// Peers not yet programmed because the last pass failed before reaching them.
    pending: BTreeSet<Ipv4Network>,
    /// The last data plane pass: its lease revision, and its error if it failed.
    last_pass: Option<(i64, Option<String>)>,
    last_ok_revision: i64,
    /// What the last pass could not write (`peer <subnet>`, `removing …`) and why.
    failing: Vec<(String, String)>,
    iptables: Option<Result<(), String>>,
    repairs: RepairsReport,
    recent_repairs: VecDeque<(Instant, String)>,
    ipam: Option<(PathBuf, Ipv4Network)>,
    /// Why this node refuses to go on (its subnet held by another node), while it does.
    refused: Option<String>,
    /// The likely cause for each peer the probes find unreachable.
    probe_causes: BTreeMap<Ipv4Network, String>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    pub fn new() -> Health {
        let metrics = Metrics::new();
        Health {
            leases: metrics.leases.clone(),
            peers: metrics.peers.clone(),
            errors: metrics.errors.clone(),
            metrics,
            known: Mutex::new(Known::default()),
            prober: Mutex::new(None),
            probe_revision: std::sync::atomic::AtomicI64::new(-1),
        }
    }

    fn known(&self) -> MutexGuard<'_, Known> {
        // A panic while holding the lock leaves plain data behind: still worth reporting.
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_settings(&self, s: Settings) {
        self.known().settings = Some(s);
    }

    /// `Backend.DirectRouting` as applied live after a config change in etcd.
    pub fn set_direct_routing(&self, on: bool) {
        if let Some(c) = self.known().config.as_mut() {
            c.direct_routing = on;
        }
    }

    pub fn set_config(
        &self,
        cfg: &NetworkConfig,
        mtu: u32,
        ip_masq: bool,
        lease_ttl: Duration,
        resync: Duration,
    ) {
        let mut k = self.known();
        let settings = k.settings.clone();
        k.config = Some(ConfigReport {
            network: cfg.network.to_string(),
            subnet_len: cfg.subnet_len,
            vni: cfg.backend.vni,
            port: cfg.backend.port,
            mtu,
            direct_routing: cfg.backend.direct_routing,
            ip_masq,
            lease_only: settings.as_ref().is_some_and(|s| s.lease_only),
            lease_ttl_seconds: lease_ttl.as_secs(),
            resync_interval_seconds: resync.as_secs_f64(),
            etcd_heard_within_seconds: settings
                .map_or(DEFAULT_ETCD_HEARD_WITHIN, |s| s.etcd_heard_within)
                .as_secs(),
        });
    }

    pub fn set_node(&self, node: &Node) {
        self.known().node = Some(NodeReport {
            name: node.name.clone(),
            iface: node.iface.clone(),
            public_ip: node.public_ip.to_string(),
            vtep_mac: node.vtep_mac.to_string(),
        });
    }

    /// This node holds `a` (leased, taken back or re-asserted).
    pub fn set_lease(&self, a: &Acquired) {
        self.known().lease = Some(LeaseReport {
            subnet: a.subnet.to_string(),
            lease_id: a.lease_id.map(|l| format!("{l:x}")),
            reservation: a.lease_id.is_none(),
            held: true,
            ttl_left_seconds: None,
            granted_ttl_seconds: None,
        });
        self.metrics.lease_ttl.set(-1);
    }

    /// etcd says our lease is gone; the supervisor is leasing the subnet again.
    pub fn lease_lost(&self) {
        if let Some(l) = self.known().lease.as_mut() {
            l.held = false;
            l.ttl_left_seconds = Some(0);
        }
        self.metrics.lease_ttl.set(0);
    }

    /// Not ready with `why` (this node's subnet is held by another node), until called with `None`.
    pub fn set_refused(&self, why: Option<String>) {
        self.known().refused = why;
    }

    /// One subnet key (one write of it) ignored for `reason`.
    pub fn count_ignored(&self, reason: &str) {
        self.metrics
            .ignored_leases
            .get_or_create(&metrics::ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// Kept for the supervisor: `false` marks the lease as not held.
    pub fn set_leased(&self, v: bool) {
        if !v {
            self.lease_lost();
        }
    }

    /// The devices the data plane made; `/readyz` looks them up in the kernel on each call.
    pub fn set_devices(&self, handle: rtnetlink::Handle, plan: &Plan) {
        self.known().devices = Some((
            DevicesReport {
                vtep: plan.vtep.name.clone(),
                bridge: plan.bridge.name.clone(),
                mtu: plan.vtep.mtu,
            },
            handle,
        ));
    }

    /// Where to count pod addresses from: the plugin's data dir, and the subnet leased.
    pub fn set_ipam(&self, data_dir: PathBuf, subnet: Ipv4Network) {
        self.metrics
            .pod_capacity
            .set(ipam_store::pod_capacity(subnet) as i64);
        self.known().ipam = Some((data_dir, subnet));
    }

    /// Kept for the supervisor's older calls; [`Health::record_pass`] says more.
    pub fn set_dataplane_ok(&self, ok: bool) {
        if !ok {
            let mut k = self.known();
            let rev = k.last_pass.as_ref().map_or(0, |p| p.0);
            k.last_pass = Some((rev, Some("the last data plane pass failed".into())));
        }
    }

    pub fn count_changes(&self, added: usize, removed: usize) {
        for (op, n) in [("added", added), ("removed", removed)] {
            if n > 0 {
                self.metrics
                    .changes
                    .get_or_create(&ChangeLabels { op: op.into() })
                    .inc_by(n as u64);
            }
        }
    }

    /// One data plane pass over the leases at `set.revision`, which asked for `peers`. Changes made
    /// at a revision that was already fully programmed are repairs (someone removed our entries).
    pub fn record_pass<'a>(
        &self,
        set: &Arc<LeaseSet>,
        peers: &Arc<BTreeMap<Ipv4Network, Peer>>,
        failing: impl Iterator<Item = (&'a str, &'a str)>,
        result: Result<Changes, &dyn std::fmt::Display>,
    ) {
        let failing: Vec<(String, String)> = failing
            .map(|(what, e)| (what.to_string(), e.to_string()))
            .collect();
        self.probe_targets(set.revision, peers);
        let mut k = self.known();
        match result {
            Ok(c) => {
                self.count_changes(c.added, c.removed);
                self.metrics.peer_errors.inc_by(c.errors as u64);
                self.metrics.peers_failing.set(c.failing as i64);
                self.metrics.peers.set(peers.len() as i64);
                let n = c.added + c.removed;
                if n > 0 && k.last_ok_revision == set.revision {
                    let what = format!(
                        "data plane: {} entries put back, {} removed, leases unchanged",
                        c.added, c.removed
                    );
                    info!("repaired {what}");
                    k.repairs.dataplane += 1;
                    push_repair(&mut k, what);
                    self.metrics
                        .repairs
                        .get_or_create(&RepairLabels {
                            kind: "dataplane".into(),
                        })
                        .inc();
                }
                k.last_ok_revision = set.revision;
                k.last_pass = Some((set.revision, None));
                k.pending.clear();
            }
            Err(e) => {
                self.metrics.errors.inc();
                k.last_pass = Some((set.revision, Some(e.to_string())));
                // What was programmed before stays so; the rest waits for the next pass.
                let was_programmed = |s: &Ipv4Network| {
                    k.peers.contains_key(s)
                        && !k.pending.contains(s)
                        && !k.failing.iter().any(|(w, _)| *w == format!("peer {s}"))
                };
                let pending = peers
                    .keys()
                    .filter(|s| !was_programmed(s))
                    .copied()
                    .collect();
                k.pending = pending;
            }
        }
        k.failing = failing;
        k.peers = peers.clone();
        k.leases = set.clone();
    }

    /// One iptables check. `Ok(true)` after an earlier success means our rules had gone and were
    /// restored: a repair.
    pub fn record_iptables<E: std::fmt::Display>(&self, result: &Result<bool, E>) {
        let mut k = self.known();
        match result {
            Ok(wrote) => {
                if *wrote && matches!(k.iptables, Some(Ok(()))) {
                    let what = "iptables: our rules were missing and were restored".to_string();
                    info!("repaired {what}");
                    k.repairs.iptables += 1;
                    push_repair(&mut k, what);
                    self.metrics
                        .repairs
                        .get_or_create(&RepairLabels {
                            kind: "iptables".into(),
                        })
                        .inc();
                }
                k.iptables = Some(Ok(()));
            }
            Err(e) => k.iptables = Some(Err(e.to_string())),
        }
    }

    /// Where pod addresses are counted and reclaimed: the plugin's data dir and the subnet.
    pub fn ipam_target(&self) -> Option<(PathBuf, Ipv4Network)> {
        self.known().ipam.clone()
    }

    /// The names of the node's links, in one dump through the data plane's netlink handle; None
    /// before the devices exist or if the dump fails (then nothing is reclaimed).
    pub async fn link_names(&self) -> Option<HashSet<String>> {
        let handle = self.known().devices.as_ref().map(|(_, h)| h.clone())?;
        crate::netlink::link_names(&handle)
            .await
            .map_err(|e| warn!("cannot list the node's links: {e}"))
            .ok()
    }

    /// Recounts the pod addresses per network: allocations by name, and, with the node's link
    /// names, which belong to live pods and which are leftovers (reads each allocation's file).
    pub fn ipam_usage(&self, links: Option<&HashSet<String>>) -> Vec<IpamReport> {
        let Some((dir, subnet)) = self.known().ipam.clone() else {
            return Vec::new();
        };
        let capacity = ipam_store::pod_capacity(subnet);
        self.metrics.pod_addresses.clear();
        let mut out = Vec::new();
        for u in ipam_store::usage(&dir, subnet) {
            let labels = NetworkLabels {
                network: u.network.clone(),
            };
            let (allocated, mut error) = match u.allocated {
                Ok(n) => {
                    self.metrics
                        .pod_addresses
                        .get_or_create(&labels)
                        .set(n as i64);
                    (Some(n), None)
                }
                Err(e) => {
                    warn!(network = u.network, "cannot count pod addresses: {e}");
                    (None, Some(e.to_string()))
                }
            };
            let store = IpamStore::new(&dir, &u.network).ok();
            let survey = match (links, &store) {
                (Some(links), Some(store)) => match store.survey(subnet, links) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        error.get_or_insert(e.to_string());
                        None
                    }
                },
                _ => None,
            };
            let reclaimed_total = store.map(|s| s.reclaimed_total()).unwrap_or(0);
            self.metrics
                .pod_addresses_reclaimed
                .get_or_create(&labels)
                .set(reclaimed_total as i64);
            if let Some(s) = &survey {
                self.metrics
                    .pod_addresses_live
                    .get_or_create(&labels)
                    .set(s.live as i64);
                self.metrics
                    .pod_addresses_reclaimable
                    .get_or_create(&labels)
                    .set(s.reclaimable as i64);
            }
            out.push(IpamReport {
                network: u.network,
                store: u.dir.display().to_string(),
                allocated,
                capacity,
                error,
                live: survey.as_ref().map(|s| s.live),
                reclaimable: survey.as_ref().map(|s| s.reclaimable),
                starting: survey.as_ref().map(|s| s.young),
                reclaimed_total,
            });
        }
        out
    }

    /// The whole report; readiness checks included (they look up the devices in the kernel).
    pub async fn report(&self) -> StatusReport {
        let peers = self.peers_with_probes();
        let checks = readiness::checks(self, &peers).await;
        let ready = checks.iter().all(|c| c.ok);
        self.metrics.ready.set(i64::from(ready));
        for c in &checks {
            self.metrics
                .check_ok
                .get_or_create(&CheckLabels {
                    check: c.name.clone(),
                })
                .set(i64::from(c.ok));
        }
        let k = self.known();
        let now = Instant::now();
        self.refresh_etcd_gauges(&k, now);
        let etcd = match &k.etcd {
            Some(e) => EtcdReport {
                endpoints: e.endpoints.clone(),
                prefix: e.prefix.clone(),
                last_contact_seconds_ago: e.silent_for(now).map(secs),
                watch_stream_open: e.watching,
                last_error: e.last_error.clone(),
            },
            None => EtcdReport {
                endpoints: String::new(),
                prefix: String::new(),
                last_contact_seconds_ago: None,
                watch_stream_open: false,
                last_error: Some("not connected yet".into()),
            },
        };
        let mut repairs = k.repairs.clone();
        repairs.recent = k
            .recent_repairs
            .iter()
            .map(|(t, what)| RepairEvent {
                seconds_ago: secs(now - *t),
                what: what.clone(),
            })
            .collect();
        StatusReport {
            ready,
            checks,
            config: k.config.clone(),
            node: k.node.clone(),
            lease: k.lease_report(now),
            etcd,
            devices: k.devices.as_ref().map(|d| d.0.clone()),
            peers,
            ipam: Vec::new(),
            repairs,
        }
    }

    /// Records the cause of an unreachable peer (`None`: it answers). True when it changed.
    pub(crate) fn set_probe_cause(&self, subnet: Ipv4Network, cause: Option<String>) -> bool {
        let mut k = self.known();
        match cause {
            Some(c) => k.probe_causes.insert(subnet, c.clone()).as_ref() != Some(&c),
            None => k.probe_causes.remove(&subnet).is_some(),
        }
    }

    /// "10.244.5.0/24 (node1, 192.0.2.11)" for logs.
    /// A peer's key as the lease watch last saw it.
    pub(crate) fn lease_of(&self, subnet: &Ipv4Network) -> Option<Arc<crate::registry::Lease>> {
        self.known().leases.leases.get(subnet).cloned()
    }

    pub(crate) fn peer_name(&self, t: &crate::dataplane::probe::Target) -> String {
        let k = self.known();
        let name = k
            .leases
            .leases
            .get(&t.subnet)
            .and_then(|l| l.value.as_ref())
            .and_then(|v| v.node_name.clone());
        match name {
            Some(n) => format!("{} ({n}, {})", t.subnet, t.public_ip),
            None => format!("{} ({})", t.subnet, t.public_ip),
        }
    }

    /// Every peer with what its probes say.
    pub fn peers_with_probes(&self) -> Vec<PeerReport> {
        let (mut peers, causes) = {
            let k = self.known();
            (k.peer_reports(), k.probe_causes.clone())
        };
        self.with_probes(&mut peers, &causes);
        peers
    }

    /// The probes' view merged into each peer (and the reachable/unreachable gauges).
    fn with_probes(&self, peers: &mut [PeerReport], causes: &BTreeMap<Ipv4Network, String>) {
        let snapshot = match self.prober.lock() {
            Ok(g) => match g.as_ref() {
                Some(p) => p.snapshot(),
                None => return,
            },
            Err(_) => return,
        };
        let now = Instant::now();
        let (mut up, mut down) = (0, 0);
        for p in peers.iter_mut() {
            let Ok(subnet) = p.subnet.parse::<Ipv4Network>() else {
                continue;
            };
            let Some(s) = snapshot.get(&subnet) else {
                continue;
            };
            match s.reachable {
                Some(true) => up += 1,
                Some(false) => down += 1,
                None => {}
            }
            p.probe = Some(ProbeReport {
                reachable: s.reachable,
                rtt_ms: s.last_rtt.map(|r| (r.as_secs_f64() * 1e6).round() / 1e3),
                misses: s.misses,
                sent: s.sent,
                answered: s.answered,
                since_seconds: secs(now - s.since),
                cause: if s.reachable == Some(false) {
                    causes.get(&subnet).cloned()
                } else {
                    None
                },
            });
        }
        self.metrics.peers_reachable.set(up);
        self.metrics.peers_unreachable.set(down);
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

fn push_repair(k: &mut Known, what: String) {
    if k.recent_repairs.len() == RECENT_REPAIRS {
        k.recent_repairs.pop_front();
    }
    k.recent_repairs.push_back((Instant::now(), what));
}

impl Known {
    /// Every peer of the last pass with its state: programmed, pending, or failing and why.
    fn peer_reports(&self) -> Vec<PeerReport> {
        let failing: BTreeMap<&str, &str> = self
            .failing
            .iter()
            .filter_map(|(what, e)| Some((what.strip_prefix("peer ")?, e.as_str())))
            .collect();
        self.peers
            .values()
            .map(|p| {
                let subnet = p.subnet.to_string();
                let state = match failing.get(subnet.as_str()) {
                    Some(e) => format!("failing: {e}"),
                    None if self.pending.contains(&p.subnet) => "pending".to_string(),
                    None => "programmed".to_string(),
                };
                peer_report(p, &self.leases, &state)
            })
            .collect()
    }
}

fn peer_report(p: &Peer, set: &LeaseSet, state: &str) -> PeerReport {
    PeerReport {
        subnet: p.subnet.to_string(),
        public_ip: p.public_ip.to_string(),
        node_name: set
            .leases
            .get(&p.subnet)
            .and_then(|l| l.value.as_ref())
            .and_then(|v| v.node_name.clone()),
        vtep_mac: p.mac.to_string(),
        direct: p.direct,
        state: state.into(),
        probe: None,
    }
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 10.0).round() / 10.0
}
