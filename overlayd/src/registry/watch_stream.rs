//! One watch stream with two watches on it: the subnet keys (by prefix) and the network config
//! (one key). etcd multiplexes watches on a stream by `watch_id`; the ids it gives are learnt
//! from the `created` answers, which come in the order the watches were asked for.
//!
//! Two watches and not one on all of `<prefix>/`: a node's etcd role may cover only
//! `<prefix>/subnets/` and read of `<prefix>/config`, and a watch is refused unless the role
//! covers its whole range.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions, WatchResponse};
use tracing::{debug, info, warn};

use super::client::{Registry, RegistryError};
use super::config_watch::ConfigFollower;
use super::screen::{IgnoreReason, Ignored, TRUNCATED_EVENT_KEY};
use super::watch::{LeaseSet, Outputs};

/// A watch quiet for `--etcd-watch-silence` is asked for its progress, and given up (listed
/// again) when nothing comes within this long of asking: a member cut off from the others can keep
/// a stream open that never sends anything again.
pub const PROGRESS_DEADLINE: Duration = Duration::from_secs(5);

/// etcd's `watch_id` on answers that belong to no single watch (progress asked for the stream).
const STREAM_WIDE: i64 = -1;

pub(super) enum WatchEnd {
    /// Resume from the last revision.
    Lost,
    /// The leases' history is gone: list everything again.
    Compacted,
    /// The stream stopped answering, etcd's revision went back (restored from a snapshot), or an
    /// answer was too large to accept: list everything again.
    Relist,
    /// etcd cancelled a watch; `auth` when for the login (a token older than the last change to
    /// users or roles is refused with "permission denied" when a watch opens).
    Canceled { auth: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Leases,
    Config,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::Leases => "lease",
            Which::Config => "network config",
        }
    }
}

/// Whether an answer shows that the watch really works: events, or an answer without any after
/// the watch was created (a progress report). The bare "created" answer does not: a member can
/// create a watch and cancel or lose it right after, every time, and such a watch must keep
/// backing off instead of being retried at the first delay forever.
pub(super) fn shows_it_works(created: bool, canceled: bool, compacted: bool) -> bool {
    !created && !canceled && !compacted
}

/// Reads the config (when followed), opens the stream, and applies what it brings until it
/// ends. Returns how it ended, and whether it worked meanwhile ([`shows_it_works`]).
pub(super) async fn watch_from(
    reg: &Registry,
    set: &mut LeaseSet,
    out: &Outputs,
    config: Option<&mut ConfigFollower>,
) -> (WatchEnd, bool) {
    let mut worked = false;
    let (end, why) = run(reg, set, out, config, &mut worked).await;
    out.observer.not_watching(&why);
    (end, worked)
}

async fn run(
    reg: &Registry,
    set: &mut LeaseSet,
    out: &Outputs,
    mut config: Option<&mut ConfigFollower>,
    worked: &mut bool,
) -> (WatchEnd, String) {
    // The config is one key: reading it again is its whole resync, and costs less than asking
    // etcd to replay its history from an old revision.
    if let Some(c) = config.as_deref_mut() {
        if let Err(e) = c.read(reg).await {
            let why = format!("cannot read the network config: {e}");
            warn!("{why}; retrying (data plane unchanged)");
            return (WatchEnd::Lost, why);
        }
    }
    // Fragmented: etcd cuts an answer over its --max-request-bytes in parts, so a catch-up after
    // a reconnect (up to 1 000 revisions in one answer, each as large as a request) arrives in
    // pieces of bounded size instead of one message that can pass any limit (issue 13).
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(set.revision + 1)
        .with_progress_notify()
        .with_fragment();
    let (prefix, opts) = (reg.keys.subnets(), &opts);
    let prefix = prefix.as_str();
    let opened = reg
        .call_watch(|mut w| async move { w.watch(prefix, Some(opts.clone())).await })
        .await;
    let mut stream = match opened {
        Ok(s) => s,
        Err(e) => {
            let why = format!("cannot watch subnet leases: {e}");
            warn!("{why}; retrying (data plane unchanged)");
            return (WatchEnd::Lost, why);
        }
    };
    // Watches asked for and not yet created, in order; created ones by etcd's id.
    let mut asked = VecDeque::from([Which::Leases]);
    let mut ids: HashMap<i64, Which> = HashMap::new();
    if let Some(c) = config.as_deref() {
        let opts = WatchOptions::new().with_start_revision(c.revision() + 1);
        if let Err(e) = stream.watch(c.key(), Some(opts)).await {
            let why = format!("cannot watch the network config: {}", reg.map_err(e));
            warn!("{why}; retrying (data plane unchanged)");
            return (WatchEnd::Lost, why);
        }
        asked.push_back(Which::Config);
    }
    let mut asked_progress = false;
    let mut first = true;
    // Lease events applied from the parts of a fragmented answer, not yet told to the supervisor.
    let mut unsent = false;
    loop {
        let wait = if asked_progress {
            PROGRESS_DEADLINE
        } else {
            reg.watch_silence()
        };
        let next = match tokio::time::timeout(wait, stream.message()).await {
            Ok(next) => next,
            Err(_) if asked_progress => {
                let why = format!(
                    "the watch on {} sent nothing, not even the progress asked for {}s ago",
                    reg.endpoints(),
                    PROGRESS_DEADLINE.as_secs()
                );
                warn!("{why}; listing every lease again");
                return (WatchEnd::Relist, why);
            }
            Err(_) => {
                if let Err(e) = stream.request_progress().await {
                    let why = format!("lease watch lost: {}", reg.map_err(e));
                    warn!("{why}; resuming from revision {}", set.revision + 1);
                    return (WatchEnd::Lost, why);
                }
                asked_progress = true;
                continue;
            }
        };
        asked_progress = false;
        let msg = match next {
            Ok(Some(m)) => m,
            Ok(None) => {
                let why = "etcd closed the watch stream".to_string();
                warn!("{why}; resuming from revision {}", set.revision + 1);
                return (WatchEnd::Lost, why);
            }
            Err(e) => {
                let e = reg.map_err(e);
                let why = format!("lease watch lost: {e}");
                // Resuming would ask for the same answer again: list what is there now instead,
                // and watch from the listing's revision.
                if matches!(e, RegistryError::TooLarge { .. }) {
                    warn!("{why}; listing every lease again");
                    return (WatchEnd::Relist, why);
                }
                warn!(
                    "{why}; resuming from revision {} (data plane unchanged)",
                    set.revision + 1
                );
                return (WatchEnd::Lost, why);
            }
        };
        out.observer.watching();
        // A refused creation may carry the id asked for (0: "any") rather than one given: the
        // order of the answers is what ties them to the watches.
        let which = if msg.created() {
            let Some(w) = asked.pop_front() else {
                debug!(
                    watch_id = msg.watch_id(),
                    "a watch created that was not asked for; ignored"
                );
                continue;
            };
            ids.insert(msg.watch_id(), w);
            Some(w)
        } else {
            match msg.watch_id() {
                STREAM_WIDE => None,
                id => match ids.get(&id) {
                    Some(w) => Some(*w),
                    None => {
                        debug!(watch_id = id, "an answer for no watch of ours; ignored");
                        continue;
                    }
                },
            }
        };
        if msg.compact_revision() > 0 {
            match which {
                Some(Which::Config) => {
                    // Read again at the next start, then watched from there.
                    let why = "etcd compacted the network config's history".to_string();
                    info!("{why}; reading it again");
                    return (WatchEnd::Lost, why);
                }
                _ => {
                    return (
                        WatchEnd::Compacted,
                        "etcd compacted the lease watch's history".into(),
                    )
                }
            }
        }
        if msg.canceled() {
            let reason = msg.cancel_reason();
            let why = format!(
                "etcd canceled the {} watch: {reason}",
                which.unwrap_or(Which::Leases).name()
            );
            warn!("{why}; watching again from revision {}", set.revision + 1);
            let auth = is_auth_refusal(reason);
            return (WatchEnd::Canceled { auth }, why);
        }
        let server_revision = msg.header().map(|h| h.revision()).unwrap_or(0);
        if std::mem::take(&mut first) && server_revision > 0 && server_revision < set.revision {
            let why = format!(
                "etcd's revision {server_revision} is below the last one seen, {} (etcd restored \
                 from a snapshot?)",
                set.revision
            );
            warn!("{why}; listing every lease again");
            return (WatchEnd::Relist, why);
        }
        if shows_it_works(msg.created(), msg.canceled(), msg.compact_revision() > 0) {
            *worked = true;
        }
        match which {
            Some(Which::Leases) => {
                let more = is_fragment(&msg);
                unsent |= apply_lease_events(reg, set, &msg, more);
                // A set is told once its last revision is whole: the supervisor takes a set's
                // revision for its contents, and two sets at one revision must not differ.
                if !more
                    && std::mem::take(&mut unsent)
                    && out.leases.send(Arc::new(set.clone())).is_err()
                {
                    return (WatchEnd::Lost, "the daemon stopped following leases".into());
                }
            }
            Some(Which::Config) => {
                if let Some(c) = config.as_deref_mut() {
                    c.apply(&msg);
                }
            }
            // etcd's answer to our progress request, for the whole stream: it proves the stream
            // works, but its revision is not one to resume from. etcd 3.4 (before 3.4.24) answers
            // it even while a watch on the stream is still catching up, so events below that
            // revision may not have been sent yet. The lease watch's own progress reports (etcd
            // sends them only for a watch that has caught up) do move the revision.
            None => {}
        }
    }
}

/// Whether more parts of this answer follow: etcd fragments an answer over its --max-request-bytes,
/// and one revision's events (a transaction, a range delete, a lease's expiry) can span parts.
fn is_fragment(msg: &WatchResponse) -> bool {
    // Only the protobuf message has the flag (etcd-client's `pub-response-field` exposes it).
    msg.0.fragment
}

/// Applies one answer of the lease watch to `set`; whether anything the supervisor looks at
/// changed. The revision moves to the last event's, or to the header's on an answer without
/// events after creation (a progress report): a header's revision is etcd's newest, and events up
/// to it may still be on their way (the answer that creates the watch, a catch-up cut in parts).
///
/// With `more` parts of the answer to come the revision stays: its last event's revision may not
/// be whole yet, and a watch lost now resumes from the revision before the answer; the events
/// applied meanwhile come again and apply the same way.
fn apply_lease_events(reg: &Registry, set: &mut LeaseSet, msg: &WatchResponse, more: bool) -> bool {
    let header_revision = msg.header().map(|h| h.revision()).unwrap_or(set.revision);
    if msg.events().is_empty() {
        if !msg.created() {
            set.revision = set.revision.max(header_revision);
        }
        return false;
    }
    let mut changed = false;
    let mut last = set.revision;
    for ev in msg.events() {
        let Some(kv) = ev.kv() else {
            set.ignored.insert(
                TRUNCATED_EVENT_KEY.to_string(),
                Ignored {
                    mod_revision: header_revision,
                    reason: IgnoreReason::TruncatedEvent,
                },
            );
            changed = true;
            continue;
        };
        last = last.max(kv.mod_revision());
        changed |= match ev.event_type() {
            EventType::Put => {
                set.apply_put(reg, kv.key(), kv.value(), kv.lease(), kv.mod_revision())
            }
            EventType::Delete => set.apply_delete(reg, kv.key()),
        };
    }
    if !more {
        set.revision = last;
    }
    changed
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
    use etcd_client::proto::{PbEvent, PbKeyValue, PbResponseHeader, PbWatchResponse};

    /// A registry that is never called: connecting without credentials makes no call.
    fn registry(rt: &tokio::runtime::Runtime) -> Registry {
        let args = crate::cli::EtcdArgs {
            etcd_endpoints: vec!["http://127.0.0.1:1".into()],
            etcd_prefix: "/coreos.com/network".into(),
            etcd_cafile: None,
            etcd_certfile: None,
            etcd_keyfile: None,
            etcd_username: None,
            etcd_password: None,
            etcd_watch_silence: Duration::from_secs(10),
        };
        rt.block_on(Registry::connect(&args))
            .expect("a lazy client")
    }

    fn put(subnet: &str, revision: i64) -> PbEvent {
        PbEvent {
            r#type: 0,
            kv: Some(PbKeyValue {
                key: format!("/coreos.com/network/subnets/{subnet}").into_bytes(),
                value: br#"{"PublicIP":"192.0.2.1","BackendType":"vxlan"}"#.to_vec(),
                create_revision: revision,
                mod_revision: revision,
                version: 1,
                lease: 0,
            }),
            prev_kv: None,
        }
    }

    fn answer(events: Vec<PbEvent>, fragment: bool) -> WatchResponse {
        WatchResponse(PbWatchResponse {
            header: Some(PbResponseHeader {
                revision: 9,
                ..Default::default()
            }),
            events,
            fragment,
            ..Default::default()
        })
    }

    #[test]
    fn a_revision_cut_across_fragments_is_resumed_from_until_it_is_whole() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let reg = registry(&rt);
        let mut set = LeaseSet {
            revision: 4,
            ..LeaseSet::default()
        };
        // Revision 6 (a transaction of two puts) begins in the first part and ends in the next.
        let first = answer(vec![put("10.244.5.0-24", 5), put("10.244.6.0-24", 6)], true);
        assert!(is_fragment(&first));
        assert!(apply_lease_events(&reg, &mut set, &first, true));
        assert_eq!(set.leases.len(), 2, "the events are applied");
        assert_eq!(
            set.revision, 4,
            "a watch lost now resumes before the answer, not after a half revision 6"
        );
        let last = answer(vec![put("10.244.7.0-24", 6)], false);
        assert!(!is_fragment(&last));
        assert!(apply_lease_events(&reg, &mut set, &last, false));
        assert_eq!(set.leases.len(), 3);
        assert_eq!(set.revision, 6);
    }

    #[test]
    fn only_an_answer_after_creation_shows_the_watch_works() {
        // created, canceled, compacted
        assert!(!shows_it_works(true, false, false), "the bare creation");
        assert!(
            !shows_it_works(true, true, false),
            "created and refused at once"
        );
        assert!(!shows_it_works(false, true, false), "cancelled later");
        assert!(!shows_it_works(false, false, true), "compacted");
        assert!(shows_it_works(false, false, false), "events or progress");
    }
}
