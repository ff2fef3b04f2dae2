//! A local mirror of every subnet key, and of the network config: a full listing at revision R,
//! then one watch stream from R+1 that carries two watches, `<prefix>/subnets/` and
//! `<prefix>/config` (issue 13: one watch stream per node, not one per key range).
//!
//! Watch loss resumes from the last revision seen; compaction (the revision we want is gone) forces
//! a full listing again. Failures back off with a (low) cap, so an etcd outage costs ~0 CPU.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::client::Registry;
use super::config_watch::ConfigFollower;
use super::lease_value::Lease;
use super::observe::Observer;
use super::screen::{IgnoreReason, Ignored};
use super::watch_stream::{watch_from, WatchEnd};
use crate::backoff::Backoff;
use crate::config::NetworkConfig;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseSet {
    /// The etcd revision this set reflects.
    pub revision: i64,
    /// Every subnet key. A value overlayd cannot read is `None`, unless the key held a readable
    /// one before: then that one stays (one bad write must not remove a peer). Shared: the
    /// follower's set and the one the supervisor holds differ by an event at most, so their
    /// leases are the same allocations (10 000 leases are megabytes; a copy per event was too).
    pub leases: BTreeMap<Ipv4Network, Arc<Lease>>,
    /// Keys under `subnets/` that could not be read, by key (relative to `subnets/`).
    pub ignored: BTreeMap<String, Ignored>,
}

impl LeaseSet {
    /// Applies one key as etcd has it now (from a listing or a put event); whether anything the
    /// supervisor looks at changed.
    pub fn apply_put(
        &mut self,
        reg: &Registry,
        key: &[u8],
        value: &[u8],
        lease_id: i64,
        mod_revision: i64,
    ) -> bool {
        let name = relative_key(reg, key);
        let Some(new) = reg.lease_from_kv(key, value, lease_id, mod_revision) else {
            self.ignored.insert(
                name,
                Ignored {
                    mod_revision,
                    reason: IgnoreReason::BadKey,
                },
            );
            return true; // news: it gets logged and counted
        };
        if new.value.is_none() {
            self.ignored.insert(
                name,
                Ignored {
                    mod_revision,
                    reason: IgnoreReason::NotJson,
                },
            );
            if self
                .leases
                .get(&new.subnet)
                .is_some_and(|old| old.value.is_some())
            {
                return true; // the last readable value stays; the bad one is news
            }
        } else {
            self.ignored.remove(&name);
        }
        self.leases.insert(new.subnet, Arc::new(new));
        true
    }

    /// Applies a deleted key.
    pub fn apply_delete(&mut self, reg: &Registry, key: &[u8]) -> bool {
        self.ignored.remove(&relative_key(reg, key));
        match reg.keys.parse_subnet(key) {
            Some(s) => self.leases.remove(&s).is_some(),
            None => false,
        }
    }

    /// After a full listing: keys whose value became unreadable keep the readable value `prev`
    /// had for them.
    fn keep_readable_from(&mut self, prev: &LeaseSet) {
        for (subnet, l) in self.leases.iter_mut() {
            if l.value.is_none() {
                if let Some(old) = prev.leases.get(subnet).filter(|o| o.value.is_some()) {
                    *l = old.clone();
                }
            }
        }
    }
}

fn relative_key(reg: &Registry, key: &[u8]) -> String {
    let key = String::from_utf8_lossy(key);
    key.strip_prefix(&reg.keys.subnets())
        .unwrap_or(&key)
        .to_string()
}

/// The longest wait between two attempts to list or watch: a node is back on etcd within about
/// this long of etcd's return.
pub const WATCH_RETRY_CAP: Duration = Duration::from_secs(4);
/// The first wait after a failure; it doubles up to [`WATCH_RETRY_CAP`].
pub const WATCH_RETRY_FIRST: Duration = Duration::from_millis(500);

/// What the follower keeps up to date, and whom it tells how the watch is doing.
pub struct Outputs {
    pub leases: watch::Sender<Arc<LeaseSet>>,
    /// The network config as etcd has it (the last valid one); `None`: not followed.
    pub config: Option<watch::Sender<Arc<NetworkConfig>>>,
    pub observer: Arc<dyn Observer>,
}

/// Keeps `out` equal to etcd's subnet keys (and config) until the leases' receiver is dropped.
pub async fn follow(reg: Registry, out: Outputs) {
    follow_from(reg, out, None).await
}

/// [`follow`], starting from a listing taken earlier (`None`: list now). The watch starts at the
/// revision after `start`'s; if etcd has compacted that history away, everything is listed again.
pub async fn follow_from(reg: Registry, out: Outputs, mut start: Option<LeaseSet>) {
    // Capped low: the watch is how a node learns etcd is back, and one reconnect attempt every
    // few seconds costs nothing.
    let mut backoff = Backoff::new(WATCH_RETRY_FIRST, WATCH_RETRY_CAP);
    let mut config = out.config.clone().map(|tx| ConfigFollower::new(&reg, tx));
    let mut prev: Option<LeaseSet> = None;
    let mut first_attempt = true;
    'resync: loop {
        if !std::mem::take(&mut first_attempt) {
            out.observer.watch_restarted();
        }
        let listed = match start.take() {
            Some(s) => Ok(s),
            None => reg.list_leases().await,
        };
        let mut set = match listed {
            Ok(mut s) => {
                if let Some(p) = prev.take() {
                    s.keep_readable_from(&p);
                }
                s
            }
            Err(e) => {
                let wait = spread(backoff.next_delay());
                warn!(
                    "cannot list subnet leases: {e}; retrying in {wait:?} (data plane unchanged)"
                );
                out.observer.not_watching(&e.to_string());
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        debug!(
            revision = set.revision,
            leases = set.leases.len(),
            "listed subnet leases"
        );
        if out.leases.send(Arc::new(set.clone())).is_err() {
            return;
        }
        // Logging in again is tried at once, but only once until the watch works again: a user
        // that really lacks the permission must not make this loop spin.
        let mut may_relogin = true;
        loop {
            let (end, worked) = watch_from(&reg, &mut set, &out, config.as_mut()).await;
            // Only a watch that delivered something after its creation resets the backoff: one
            // that etcd creates and then cancels or loses each time must still slow down.
            if worked {
                backoff.reset();
            }
            may_relogin |= worked;
            if out.leases.is_closed() {
                return;
            }
            match end {
                WatchEnd::Compacted => {
                    info!(
                        "etcd compacted past revision {}; resyncing all leases",
                        set.revision + 1
                    );
                    prev = Some(set);
                    continue 'resync;
                }
                WatchEnd::Relist => {
                    prev = Some(set);
                    continue 'resync;
                }
                WatchEnd::Canceled { auth: true } if may_relogin && reg.has_user() => {
                    may_relogin = false;
                    info!("etcd refused the watch for this node's login; logging in again");
                    if let Err(e) = reg.relogin().await {
                        warn!("cannot log in to etcd again: {e}");
                        tokio::time::sleep(spread(backoff.next_delay())).await;
                    }
                }
                WatchEnd::Lost | WatchEnd::Canceled { .. } => {
                    tokio::time::sleep(spread(backoff.next_delay())).await;
                }
            }
            out.observer.watch_restarted();
        }
    }
}

/// Between half and all of `d`, at random: when etcd comes back after an outage, the nodes that
/// waited for it list their leases spread over a few seconds rather than all at once.
fn spread(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.5..=1.0))
}
