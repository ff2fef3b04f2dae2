//! A local mirror of every subnet key: a full listing at revision R, then a watch from R+1.
//!
//! Watch loss resumes from the last revision seen; compaction (the revision we want is gone) forces a
//! full listing again. Failures back off with a (low) cap, so an etcd outage costs ~0 CPU.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions, WatchResponse};
use ipnetwork::Ipv4Network;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::client::Registry;
use super::lease_value::Lease;
use super::observe::Observer;
use super::screen::{IgnoreReason, Ignored, TRUNCATED_EVENT_KEY};
use crate::backoff::Backoff;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseSet {
    /// The etcd revision this set reflects.
    pub revision: i64,
    /// Every subnet key. A value overlayd cannot read is `None`, unless the key held a readable
    /// one before: then that one stays (one bad write must not remove a peer).
    pub leases: BTreeMap<Ipv4Network, Lease>,
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
        self.leases.insert(new.subnet, new);
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

/// A watch quiet for `--etcd-watch-silence` is asked for its progress, and given up (listed
/// again) when nothing comes within this long of asking: a member cut off from the others can keep
/// a stream open that never sends anything again.
pub const PROGRESS_DEADLINE: Duration = Duration::from_secs(5);

enum WatchEnd {
    /// Resume from the last revision.
    Lost,
    /// History is gone: list everything again.
    Compacted,
    /// The stream stopped answering, or etcd's revision went back (restored from a snapshot):
    /// list everything again.
    Relist,
    /// etcd cancelled the watch; `auth` when for the login (a token older than the last change to
    /// users or roles is refused with "permission denied" when a watch opens).
    Canceled { auth: bool },
}

/// Keeps `tx` equal to etcd's subnet keys until the receiver side is dropped.
pub async fn follow(reg: Registry, tx: watch::Sender<Arc<LeaseSet>>, observer: Arc<dyn Observer>) {
    follow_from(reg, tx, None, observer).await
}

/// [`follow`], starting from a listing taken earlier (`None`: list now). The watch starts at the
/// revision after `start`'s; if etcd has compacted that history away, everything is listed again.
pub async fn follow_from(
    reg: Registry,
    tx: watch::Sender<Arc<LeaseSet>>,
    mut start: Option<LeaseSet>,
    observer: Arc<dyn Observer>,
) {
    // Capped low: the watch is how a node learns etcd is back, and one reconnect attempt every
    // few seconds costs nothing.
    let mut backoff = Backoff::new(Duration::from_millis(500), WATCH_RETRY_CAP);
    let mut prev: Option<LeaseSet> = None;
    let mut first_attempt = true;
    'resync: loop {
        if !std::mem::take(&mut first_attempt) {
            observer.watch_restarted();
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
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        debug!(
            revision = set.revision,
            leases = set.leases.len(),
            "listed subnet leases"
        );
        if tx.send(Arc::new(set.clone())).is_err() {
            return;
        }
        // Logging in again is tried at once, but only once until the watch works again: a user
        // that really lacks the permission must not make this loop spin.
        let mut may_relogin = true;
        loop {
            let mut progressed = false;
            let end = watch_from(&reg, &mut set, &tx, &mut progressed).await;
            // Only a watch that delivered something after its creation resets the backoff: one
            // that etcd creates and then cancels or loses each time must still slow down.
            if progressed {
                backoff.reset();
            }
            may_relogin |= progressed;
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
                    info!("etcd refused the lease watch for this node's login; logging in again");
                    if let Err(e) = reg.relogin().await {
                        warn!("cannot log in to etcd again: {e}");
                        tokio::time::sleep(spread(backoff.next_delay())).await;
                    }
                }
                WatchEnd::Lost | WatchEnd::Canceled { .. } => {
                    if tx.is_closed() {
                        return;
                    }
                    let wait = spread(backoff.next_delay());
                    tokio::time::sleep(wait).await;
                }
            }
            observer.watch_restarted();
        }
    }
}

async fn watch_from(
    reg: &Registry,
    set: &mut LeaseSet,
    tx: &watch::Sender<Arc<LeaseSet>>,
    progressed: &mut bool,
) -> WatchEnd {
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(set.revision + 1)
        .with_progress_notify();
    let (prefix, opts) = (reg.keys.subnets(), &opts);
    let prefix = prefix.as_str();
    let opened = reg
        .call(|mut c| async move { c.watch(prefix, Some(opts.clone())).await })
        .await;
    let mut stream = match opened {
        Ok(s) => s,
        Err(e) => {
            warn!("cannot watch subnet leases: {e}; retrying (data plane unchanged)");
            return WatchEnd::Lost;
        }
    };
    let mut asked_progress = false;
    let mut first = true;
    loop {
        let wait = if asked_progress {
            PROGRESS_DEADLINE
        } else {
            reg.watch_silence()
        };
        let next = match tokio::time::timeout(wait, stream.message()).await {
            Ok(next) => next,
            Err(_) if asked_progress => {
                warn!(
                    "the lease watch on {} sent nothing, not even the progress asked for {}s ago; listing every lease again",
                    reg.endpoints(),
                    PROGRESS_DEADLINE.as_secs()
                );
                return WatchEnd::Relist;
            }
            Err(_) => {
                if let Err(e) = stream.request_progress().await {
                    warn!(
                        "lease watch lost: {}; resuming from revision {}",
                        reg.map_err(e),
                        set.revision + 1
                    );
                    return WatchEnd::Lost;
                }
                asked_progress = true;
                continue;
            }
        };
        asked_progress = false;
        let msg = match next {
            Ok(Some(m)) => m,
            Ok(None) => {
                warn!(
                    "etcd closed the lease watch; resuming from revision {}",
                    set.revision + 1
                );
                return WatchEnd::Lost;
            }
            Err(e) => {
                warn!(
                    "lease watch lost: {}; resuming from revision {} (data plane unchanged)",
                    reg.map_err(e),
                    set.revision + 1
                );
                return WatchEnd::Lost;
            }
        };
        if msg.compact_revision() > 0 {
            return WatchEnd::Compacted;
        }
        if msg.canceled() {
            let reason = msg.cancel_reason();
            warn!(
                "etcd canceled the lease watch: {reason}; watching again from revision {}",
                set.revision + 1
            );
            return WatchEnd::Canceled {
                auth: is_auth_refusal(reason),
            };
        }
        let server_revision = msg.header().map(|h| h.revision()).unwrap_or(0);
        if std::mem::take(&mut first) && server_revision > 0 && server_revision < set.revision {
            warn!(
                "etcd's revision {server_revision} is below the last one seen, {} (etcd restored \
                 from a snapshot?); listing every lease again",
                set.revision
            );
            return WatchEnd::Relist;
        }
        if shows_it_works(&msg) {
            *progressed = true;
        }
        let mut changed = false;
        let revision = msg.header().map(|h| h.revision()).unwrap_or(set.revision);
        for ev in msg.events() {
            let Some(kv) = ev.kv() else {
                set.ignored.insert(
                    TRUNCATED_EVENT_KEY.to_string(),
                    Ignored {
                        mod_revision: revision,
                        reason: IgnoreReason::TruncatedEvent,
                    },
                );
                changed = true;
                continue;
            };
            changed |= match ev.event_type() {
                EventType::Put => {
                    set.apply_put(reg, kv.key(), kv.value(), kv.lease(), kv.mod_revision())
                }
                EventType::Delete => set.apply_delete(reg, kv.key()),
            };
        }
        if let Some(h) = msg.header() {
            set.revision = set.revision.max(h.revision());
        }
        if changed && tx.send(Arc::new(set.clone())).is_err() {
            return WatchEnd::Lost;
        }
    }
}

/// Whether an answer shows that the watch really works: events, or an answer without any after
/// the watch was created (a progress report). The bare "created" answer does not: a member can
/// create a watch and cancel or lose it right after, every time, and such a watch must keep
/// backing off instead of being retried at the first delay forever.
fn shows_it_works(msg: &WatchResponse) -> bool {
    works(msg.created(), msg.canceled(), msg.compact_revision() > 0)
}

fn works(created: bool, canceled: bool, compacted: bool) -> bool {
    !created && !canceled && !compacted
}

/// Between half and all of `d`, at random: when etcd comes back after an outage, the nodes that
/// waited for it list their leases spread over a few seconds rather than all at once.
fn spread(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.5..=1.0))
}

/// Whether etcd cancelled a watch because of the login (etcd 3.4 and 3.5 say "permission denied" for
/// an outdated or unknown token as well as for a missing permission).
fn is_auth_refusal(reason: &str) -> bool {
    ["permission denied", "auth", "token"]
        .iter()
        .any(|w| reason.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_answer_after_creation_shows_the_watch_works() {
        // created, canceled, compacted
        assert!(!works(true, false, false), "the bare creation");
        assert!(!works(true, true, false), "created and refused at once");
        assert!(!works(false, true, false), "cancelled later");
        assert!(!works(false, false, true), "compacted");
        assert!(works(false, false, false), "events or progress");
    }
}
