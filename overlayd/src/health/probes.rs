//! What the peer probes mean for an operator: each change of a peer's state logged once, with
//! the likely cause when it can be told apart — the peer's etcd lease not renewed on time (its
//! node or daemon is down) versus a fresh lease and still no reply (the tunnel is blocked between
//! the nodes, most often a security group without the VXLAN port).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::Health;
use crate::dataplane::probe::{self, ProbeConfig, ProbeMetrics, Target, Transition};
use crate::registry::{keepalive, Lease, Registry};

/// While a peer stays unreachable, its cause is looked at again after this, then twice as long
/// each time up to [`RECHECK_CAP`]: a peer down for hours must not cost etcd two reads every few
/// seconds from every node (the stale-lease cause only grows more certain with time).
const RECHECK: Duration = Duration::from_secs(15);
const RECHECK_CAP: Duration = Duration::from_secs(300);
/// Causes looked up in etcd per second at most.
const EXPLAIN_PER_SECOND: usize = 10;
/// Slack on top of a renewal period before a lease counts as stale.
const RENEWAL_SLACK: Duration = Duration::from_secs(10);

impl Health {
    /// Starts probing peers from `local` (this node's VTEP address). A socket that cannot be
    /// opened turns probing off with one warning: the overlay matters more than its probes.
    pub fn start_probes(
        self: &Arc<Self>,
        reg: Registry,
        local: Ipv4Addr,
        port: u16,
        config: ProbeConfig,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let m = self.metrics();
        let metrics = ProbeMetrics {
            sent: m.probes_sent.clone(),
            answered: m.probes_answered.clone(),
            rtt: m.probe_rtt.clone(),
        };
        match probe::spawn(local, config, metrics, tx) {
            Ok(p) => {
                info!(
                    from = %local,
                    every = ?config.interval,
                    max_rate = config.max_rate,
                    "probing every peer through the overlay (ICMP echo VTEP to VTEP)"
                );
                if let Ok(mut g) = self.prober.lock() {
                    *g = Some(p);
                }
                tokio::spawn(follow(self.clone(), reg, port, rx));
            }
            Err(e) => warn!(
                "peer probes are off: cannot open an ICMP socket on {local}: {e} (the daemon needs CAP_NET_RAW)"
            ),
        }
    }

    /// The peers to probe: every peer the data plane programs (re-read only when the leases
    /// changed, so a pass over 5 000 peers every second costs nothing here).
    pub(super) fn probe_targets(
        &self,
        revision: i64,
        peers: &BTreeMap<Ipv4Network, crate::dataplane::peers::Peer>,
    ) {
        if self
            .probe_revision
            .swap(revision, std::sync::atomic::Ordering::Relaxed)
            == revision
        {
            return;
        }
        if let Ok(g) = self.prober.lock() {
            if let Some(p) = g.as_ref() {
                p.set_targets(
                    peers
                        .values()
                        .map(|p| Target {
                            subnet: p.subnet,
                            public_ip: p.public_ip,
                        })
                        .collect(),
                );
            }
        }
    }
}

/// Logs each transition once and keeps the cause of every unreachable peer up to date. Causes
/// cost an etcd read each, so at most [`EXPLAIN_PER_SECOND`] are looked up per second, oldest
/// first: a node cut off from all 5 000 peers must not turn into a burst of 5 000 reads.
async fn follow(
    health: Arc<Health>,
    reg: Registry,
    port: u16,
    mut rx: mpsc::UnboundedReceiver<Transition>,
) {
    struct Down {
        target: Target,
        /// Logged as unreachable (with its cause) yet.
        told: bool,
        next_check: Instant,
        recheck: Duration,
    }
    let mut down: BTreeMap<Ipv4Network, Down> = BTreeMap::new();
    // (next check, subnet) of every entry of `down`: the due ones are taken from its front, not
    // found by a scan of all of them every second (10 000 peers down).
    let mut queue: BTreeSet<(Instant, Ipv4Network)> = BTreeSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            t = rx.recv() => {
                let Some(t) = t else { return };
                if t.reachable {
                    let gone = down.remove(&t.target.subnet);
                    if let Some(d) = &gone {
                        queue.remove(&(d.next_check, t.target.subnet));
                    }
                    let told = gone.is_some_and(|d| d.told);
                    health.set_probe_cause(t.target.subnet, None);
                    // A first answer is only a debug line: with 10 000 peers the first round of
                    // answers is 10 000 of them, so nothing is formatted unless it is logged.
                    if !(told || t.was_known || tracing::enabled!(tracing::Level::DEBUG)) {
                        continue;
                    }
                    let who = health.peer_name(&t.target);
                    let rtt = t.rtt.map(|r| format!("{:.1} ms", r.as_secs_f64() * 1000.0)).unwrap_or_default();
                    if told || t.was_known {
                        info!(subnet = %t.target.subnet, public_ip = %t.target.public_ip, "peer {who} answers through the overlay again (rtt {rtt})");
                    } else {
                        debug!(subnet = %t.target.subnet, "peer {who} answers through the overlay (rtt {rtt})");
                    }
                } else {
                    let now = Instant::now();
                    let subnet = t.target.subnet;
                    if let Some(old) = down.insert(subnet, Down { target: t.target, told: false, next_check: now, recheck: RECHECK }) {
                        queue.remove(&(old.next_check, subnet));
                    }
                    queue.insert((now, subnet));
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let mut due = Vec::with_capacity(EXPLAIN_PER_SECOND);
                while due.len() < EXPLAIN_PER_SECOND {
                    match queue.first() {
                        Some(&(at, subnet)) if at <= now => {
                            queue.pop_first();
                            due.push(subnet);
                        }
                        _ => break,
                    }
                }
                for subnet in due {
                    let Some(target) = down.get(&subnet).map(|d| d.target.clone()) else { continue };
                    let lease = health.lease_of(&subnet);
                    let cause = explain(&reg, &target, lease.as_deref(), port).await;
                    let changed = health.set_probe_cause(subnet, Some(cause.clone()));
                    let Some(d) = down.get_mut(&subnet) else { continue };
                    let who = health.peer_name(&target);
                    if !d.told {
                        warn!(subnet = %subnet, public_ip = %target.public_ip, "peer {who} unreachable through the overlay: {cause}");
                    } else if changed {
                        warn!(subnet = %subnet, public_ip = %target.public_ip, "peer {who} still unreachable through the overlay: {cause}");
                    }
                    d.told = true;
                    d.next_check = Instant::now() + d.recheck;
                    queue.insert((d.next_check, subnet));
                    d.recheck = (d.recheck * 2).min(RECHECK_CAP);
                }
            }
        }
    }
}

/// Why a peer does not answer, as far as etcd can tell.
/// `lease` is the peer's key as the watch last saw it: the lookup asks etcd only for the lease's
/// time to live, not again for a key this node already follows.
async fn explain(reg: &Registry, t: &Target, lease: Option<&Lease>, port: u16) -> String {
    let blocked = format!(
        "no VXLAN reply from {} (UDP {port}): blocked between nodes? check the security groups",
        t.public_ip
    );
    let stale = match lease {
        None => Some("its subnet key is gone from etcd".to_string()),
        Some(l) if l.is_reservation() => None,
        Some(l) => {
            let id = l.lease_id;
            match reg
                .call(|mut c| async move { c.lease_time_to_live(id, None).await })
                .await
            {
                Ok(r) if r.ttl() <= 0 => Some("its lease has expired".to_string()),
                Ok(r) => {
                    let granted = Duration::from_secs(r.granted_ttl().max(0) as u64);
                    let since = granted.saturating_sub(Duration::from_secs(r.ttl() as u64));
                    let every = keepalive::interval(granted);
                    (since > every + RENEWAL_SLACK).then(|| {
                        format!(
                            "not renewed for {} s, renewals are due every {} s",
                            since.as_secs(),
                            every.as_secs()
                        )
                    })
                }
                Err(_) => None,
            }
        }
    };
    match stale {
        Some(why) => {
            format!("peer's lease is stale ({why}): is the node, or overlayd on it, down?")
        }
        None => blocked,
    }
}
