//! This node's own key in etcd, kept while the daemon runs: its lease kept alive, the key put back
//! when it vanishes, expires or is changed, and another node holding the subnet refused (not
//! ready, saying why) rather than a silent renumbering. A task of its own, so that waiting for
//! etcd here never holds up the data plane's repair loops (issue 10).

use std::sync::Arc;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::backoff::Backoff;
use crate::health::Health;
use crate::registry::{self, AcquireRequest, Acquired, LeaseSet, Registry};

/// How often a refused subnet (held by another node) is checked again.
pub const REFUSED_RECHECK: Duration = Duration::from_secs(5);

/// A task that is aborted when its handle is dropped (with the task that owns it).
pub struct Task(pub JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn spawn_keepalive(
    reg: &Registry,
    a: &Acquired,
    ttl: Duration,
    health: &Arc<Health>,
) -> Option<Task> {
    a.lease_id.map(|id| {
        Task(tokio::spawn(registry::keepalive::keep_alive(
            reg.clone(),
            id,
            ttl,
            health.clone(),
        )))
    })
}

/// Keeps this node's key in etcd: its lease alive, and the key put back when it vanishes or is
/// changed. A task of its own, so that re-asserting through an etcd outage never holds up the
/// data plane's repair loops. When another node holds the subnet it refuses to renumber: not
/// ready, saying why, checking again until the subnet is free. Returns when `rx` closes.
pub async fn guard_lease(
    reg: Registry,
    req: AcquireRequest,
    mut acquired: Acquired,
    mut rx: watch::Receiver<Arc<LeaseSet>>,
    health: Arc<Health>,
) {
    let subnet = acquired.subnet;
    let own_key = format!("{}-{}", subnet.network(), subnet.prefix());
    let ttl = req.ttl;
    let mut keeper = spawn_keepalive(&reg, &acquired, ttl, &health);
    loop {
        let keeper_done = async {
            match keeper.as_mut() {
                Some(k) => {
                    let _ = (&mut k.0).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
                let set = rx.borrow_and_update().clone();
                if set.revision == 0 {
                    continue; // nothing listed yet
                }
                let current = set.leases.get(&subnet);
                // The set keeps a key's last readable value; our own key must be what etcd has.
                let unreadable = set.ignored.contains_key(&own_key);
                if current.and_then(|l| l.value.as_ref()) == Some(&req.value) && !unreadable {
                    continue;
                }
                match current {
                    Some(l) if req.owns(l) => warn!("this node's lease value for {subnet} was changed in etcd; writing it back"),
                    _ => warn!("this node's subnet key for {subnet} is gone or changed hands in etcd; putting it back"),
                }
            }
            _ = keeper_done => {
                keeper = None;
                health.lease_lost();
                warn!("etcd says this node's lease for {subnet} expired; leasing the same subnet again");
            }
        }
        let mut last_refusal = String::new();
        loop {
            match reassert_until_done(&reg, subnet, &req).await {
                Ok(a) => {
                    if a.lease_id != acquired.lease_id || keeper.is_none() {
                        keeper = spawn_keepalive(&reg, &a, ttl, &health);
                    }
                    health.set_lease(&a);
                    acquired = a;
                    health.set_refused(None);
                    info!("subnet {subnet} is this node's again");
                    break;
                }
                Err(e) => {
                    // Our lease no longer backs the key: nothing to keep alive.
                    keeper = None;
                    let msg = e.to_string();
                    if msg != last_refusal {
                        error!("{msg}; checking again every {}s", REFUSED_RECHECK.as_secs());
                        last_refusal = msg.clone();
                    }
                    health.set_refused(Some(msg));
                    tokio::select! {
                        _ = tokio::time::sleep(REFUSED_RECHECK) => {}
                        changed = rx.changed() => if changed.is_err() { return; },
                    }
                }
            }
        }
    }
}

/// Re-asserts `subnet`, waiting out etcd outages; only another node holding it is final.
async fn reassert_until_done(
    reg: &Registry,
    subnet: Ipv4Network,
    req: &AcquireRequest,
) -> Result<Acquired, registry::ReassertError> {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        match registry::reassert(reg, subnet, req).await {
            Ok(a) => return Ok(a),
            Err(e @ registry::ReassertError::Taken { .. }) => return Err(e),
            Err(e) => {
                let wait = backoff.next_delay();
                warn!(
                    "cannot re-assert subnet {subnet}: {e}; retrying in {}s",
                    wait.as_secs_f32()
                );
                tokio::time::sleep(wait).await;
            }
        }
    }
}
