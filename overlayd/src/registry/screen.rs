//! Keys under `<prefix>/subnets/` that overlayd cannot use: logged once, counted, ignored. One bad
//! key must never remove a peer or stop the others from being programmed (flannel dropped every
//! peer on one such event).
//!
//! The watch and the listing record what they cannot read at all ([`Ignored`] in the lease set);
//! [`screen`] adds what does not fit the network config or this node's subnet, and hands the data
//! plane only the leases it can use.

use std::collections::BTreeMap;
use std::sync::Arc;

use ipnetwork::Ipv4Network;

use super::lease_value::Lease;
use super::watch::LeaseSet;
use crate::config::NetworkConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IgnoreReason {
    /// The value is not a lease value (not JSON, cut off, or missing PublicIP...).
    NotJson,
    /// The key under `subnets/` does not name a subnet (`10.244.1.0-24`).
    BadKey,
    /// The key's prefix length is not the network's SubnetLen.
    PrefixLength,
    /// The subnet is not inside Network.
    OutsideNetwork,
    /// The subnet overlaps this node's own subnet.
    OverlapsOwn,
    /// A watch event without its key and value.
    TruncatedEvent,
}

impl IgnoreReason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            IgnoreReason::NotJson => "not_json",
            IgnoreReason::BadKey => "bad_key",
            IgnoreReason::PrefixLength => "prefix_length",
            IgnoreReason::OutsideNetwork => "outside_network",
            IgnoreReason::OverlapsOwn => "overlaps_own",
            IgnoreReason::TruncatedEvent => "truncated_event",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            IgnoreReason::NotJson => {
                "its value is not a lease value overlayd understands (JSON with PublicIP); \
                 the previous value of this key, if any, is kept"
            }
            IgnoreReason::BadKey => "the key does not name a subnet like 10.244.1.0-24",
            IgnoreReason::PrefixLength => "its prefix length is not the network's SubnetLen",
            IgnoreReason::OutsideNetwork => "the subnet is outside the network config's Network",
            IgnoreReason::OverlapsOwn => "the subnet overlaps this node's own subnet",
            IgnoreReason::TruncatedEvent => "the watch event came without its key and value",
        }
    }
}

/// A key (or event) that was ignored, at the revision it was last written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    pub mod_revision: i64,
    pub reason: IgnoreReason,
}

/// Key under which a truncated watch event is recorded (there is no key to name it by).
pub const TRUNCATED_EVENT_KEY: &str = "(watch event without a key)";

/// The leases the data plane may use: keys of the network's SubnetLen inside Network, not
/// overlapping `own` (which stays), with readable values. Everything else is returned with why,
/// together with what the listing and the watch could not read.
/// [`screen`] without a copy when every lease is usable and no key was ignored: the set itself
/// is what the data plane gets (with 10 000 peers a copy is megabytes, made for every event).
pub fn screen_shared(
    set: &Arc<LeaseSet>,
    cfg: &NetworkConfig,
    own: Ipv4Network,
) -> (Arc<LeaseSet>, BTreeMap<String, Ignored>) {
    let clean = set.ignored.is_empty()
        && set
            .leases
            .iter()
            .all(|(subnet, l)| unusable(*subnet, l, cfg, own).is_none());
    if clean {
        return (set.clone(), BTreeMap::new());
    }
    let (usable, ignored) = screen(set, cfg, own);
    (Arc::new(usable), ignored)
}

/// Why a lease cannot be used, if it cannot.
fn unusable(
    subnet: Ipv4Network,
    l: &Lease,
    cfg: &NetworkConfig,
    own: Ipv4Network,
) -> Option<IgnoreReason> {
    if subnet == own {
        None
    } else if subnet.overlaps(own) {
        Some(IgnoreReason::OverlapsOwn)
    } else if subnet.prefix() != cfg.subnet_len {
        Some(IgnoreReason::PrefixLength)
    } else if !cfg.network.contains(subnet.network()) {
        Some(IgnoreReason::OutsideNetwork)
    } else if l.value.is_none() {
        Some(IgnoreReason::NotJson)
    } else {
        None
    }
}

pub fn screen(
    set: &LeaseSet,
    cfg: &NetworkConfig,
    own: Ipv4Network,
) -> (LeaseSet, BTreeMap<String, Ignored>) {
    let mut ignored = set.ignored.clone();
    let mut usable = LeaseSet {
        revision: set.revision,
        leases: BTreeMap::new(),
        ignored: BTreeMap::new(),
    };
    for (subnet, l) in &set.leases {
        match unusable(*subnet, l, cfg, own) {
            None => {
                usable.leases.insert(*subnet, l.clone());
            }
            Some(reason) => {
                ignored.insert(
                    format!("{}-{}", subnet.network(), subnet.prefix()),
                    Ignored {
                        mod_revision: l.mod_revision,
                        reason,
                    },
                );
            }
        }
    }
    (usable, ignored)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{Lease, LeaseValue};

    fn lease(s: &str, json: bool) -> (Ipv4Network, Arc<Lease>) {
        let subnet: Ipv4Network = s.parse().unwrap();
        let value = json.then(|| LeaseValue {
            public_ip: "192.0.2.1".parse().unwrap(),
            backend_type: "vxlan".into(),
            backend_data: None,
            node_name: None,
        });
        (
            subnet,
            Arc::new(Lease {
                subnet,
                value,
                lease_id: 1,
                mod_revision: 7,
            }),
        )
    }

    #[test]
    fn keeps_usable_leases_and_says_why_of_the_rest() {
        let (cfg, _) = NetworkConfig::parse(
            br#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        let own: Ipv4Network = "10.244.5.0/24".parse().unwrap();
        let set = LeaseSet {
            revision: 9,
            leases: [
                lease("10.244.5.0/24", true),
                lease("10.244.6.0/24", true),
                lease("10.244.7.0/25", true),
                lease("10.99.1.0/24", true),
                lease("10.244.0.0/20", true),
                lease("10.244.8.0/24", false),
            ]
            .into_iter()
            .collect(),
            ignored: BTreeMap::new(),
        };
        let (usable, ignored) = screen(&set, &cfg, own);
        let kept: Vec<String> = usable.leases.keys().map(|s| s.to_string()).collect();
        assert_eq!(kept, ["10.244.5.0/24", "10.244.6.0/24"]);
        let why: Vec<(&str, &str)> = ignored
            .iter()
            .map(|(k, i)| (k.as_str(), i.reason.label()))
            .collect();
        assert_eq!(
            why,
            [
                ("10.244.0.0-20", "overlaps_own"),
                ("10.244.7.0-25", "prefix_length"),
                ("10.244.8.0-24", "not_json"),
                ("10.99.1.0-24", "outside_network"),
            ]
        );
    }

    #[test]
    fn a_clean_set_is_shared_and_a_set_with_one_bad_lease_is_screened() {
        let (cfg, _) = NetworkConfig::parse(
            br#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        let own: Ipv4Network = "10.244.5.0/24".parse().unwrap();
        let clean = Arc::new(LeaseSet {
            revision: 3,
            leases: [lease("10.244.5.0/24", true), lease("10.244.6.0/24", true)]
                .into_iter()
                .collect(),
            ignored: BTreeMap::new(),
        });
        let (usable, ignored) = screen_shared(&clean, &cfg, own);
        assert!(
            Arc::ptr_eq(&usable, &clean),
            "a clean set must not be copied"
        );
        assert!(ignored.is_empty());

        let mut dirty = (*clean).clone();
        let (k, v) = lease("10.244.9.0/25", true);
        dirty.leases.insert(k, v);
        let dirty = Arc::new(dirty);
        let (usable, ignored) = screen_shared(&dirty, &cfg, own);
        assert!(!Arc::ptr_eq(&usable, &dirty));
        assert_eq!(usable.leases.len(), 2);
        assert_eq!(usable.revision, 3);
        assert_eq!(ignored.keys().collect::<Vec<_>>(), ["10.244.9.0-25"]);
    }
}
