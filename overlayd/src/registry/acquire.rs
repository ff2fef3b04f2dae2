//! Getting this node a subnet (DESIGN.md, "Lease algorithm"):
//!
//! 1. a reservation (key without an etcd lease) whose PublicIP is ours;
//! 2. the subnet named in the local subnet file, if it is still ours or free;
//! 3. an existing lease whose PublicIP is ours (found even after the subnet file is gone);
//! 4. otherwise a random free subnet in [SubnetMin, SubnetMax], created in one transaction guarded by
//!    `create_revision == 0`, so two nodes can never both win one subnet; a lost race picks again.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use ipnetwork::Ipv4Network;
use rand::seq::IndexedRandom;
use tracing::{info, warn};

use super::client::{Registry, RegistryError};
use super::lease_value::{Lease, LeaseValue};
use crate::config::NetworkConfig;

/// A lost race re-reads and picks again; this bounds how often before giving up for now.
const MAX_ATTEMPTS: usize = 32;

#[derive(Debug, Clone)]
pub struct AcquireRequest {
    pub value: LeaseValue,
    /// The subnet this node had before (from the subnet file), if any.
    pub previous: Option<Ipv4Network>,
    /// Pod addresses from `previous` the CNI plugin's store still holds: while there are any,
    /// `previous` held by another node is a refusal, not a reason to take another subnet.
    pub previous_in_use: usize,
    pub ttl: Duration,
}

impl AcquireRequest {
    /// Whether `l` is this node's: our PublicIP, and our NodeName unless the value has none (a
    /// reservation, a value written by older tools). Our PublicIP under another NodeName is another
    /// node set up with the same address: taking its key would make the two fight over it.
    pub fn owns(&self, l: &Lease) -> bool {
        match &l.value {
            Some(v) if v.public_ip == self.value.public_ip => {
                match (&v.node_name, &self.value.node_name) {
                    (Some(theirs), Some(ours)) => theirs == ours,
                    _ => true,
                }
            }
            _ => false,
        }
    }
}

/// Who holds a key, for messages: "node-b, 192.0.2.7".
pub fn holder(l: &Lease) -> String {
    l.value
        .as_ref()
        .map(|v| match &v.node_name {
            Some(n) => format!("{n}, {}", v.public_ip),
            None => v.public_ip.to_string(),
        })
        .unwrap_or_else(|| "unreadable value".into())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquired {
    pub subnet: Ipv4Network,
    /// `None` for a reservation: nothing to keep alive, it never expires.
    pub lease_id: Option<i64>,
    pub how: How,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    Reservation,
    /// Our own key, still in etcd (a restart).
    Reused,
    /// The subnet from the subnet file, whose key had expired: created again.
    Recreated,
    New,
}

impl std::fmt::Display for How {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            How::Reservation => "reservation for this node",
            How::Reused => "this node's existing lease",
            How::Recreated => "this node's previous subnet, leased again",
            How::New => "new lease",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    #[error(
        "no free subnet: {leased} of {total} subnets in {network} are leased. Free one with \
         `overlayd release` on a decommissioned node, or enlarge Network / SubnetMin-SubnetMax"
    )]
    NetworkFull {
        leased: u32,
        total: u32,
        network: Ipv4Network,
    },
    #[error("lost the race for a free subnet {0} times in a row; will try again")]
    Contended(usize),
    #[error(
        "subnet {subnet} of this node (from its subnet file) is now leased by another node \
         ({holder}), and {pods} pod address(es) from it are still allocated on this node; refusing \
         to take another subnet, which would strand those pods. Either free {subnet} (run \
         `overlayd release` on the other node, or delete its key if it is stale) and this node \
         takes it back, or drain this node, delete its pods and the CNI store, then restart overlayd"
    )]
    PreviousTaken {
        subnet: Ipv4Network,
        holder: String,
        pods: usize,
    },
    #[error(
        "subnet {subnet} is leased by node {holder} with this node's PublicIP {ip}: two nodes \
         cannot share one PublicIP (VXLAN finds each node by it). Give this node its own \
         --public-ip (or --iface), or remove the other node; not writing to etcd until then"
    )]
    PublicIpInUse {
        subnet: Ipv4Network,
        ip: Ipv4Addr,
        holder: String,
    },
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl AcquireError {
    pub fn is_transient(&self) -> bool {
        match self {
            AcquireError::Registry(e) => e.is_transient(),
            AcquireError::PublicIpInUse { .. } => false,
            _ => true,
        }
    }
}

/// Acquires a subnet for the node described by `req.value`.
pub async fn acquire(
    reg: &Registry,
    cfg: &NetworkConfig,
    req: &AcquireRequest,
) -> Result<Acquired, AcquireError> {
    let me = req.value.public_ip;
    let ttl_secs = req.ttl.as_secs().max(1) as i64;
    // Granted lazily and reused across lost races; revoked if we end up not using it.
    let mut granted: Option<i64> = None;
    let result = acquire_inner(reg, cfg, req, me, ttl_secs, &mut granted).await;
    revoke_unused(reg, granted, result.as_ref().ok()).await;
    result
}

async fn acquire_inner(
    reg: &Registry,
    cfg: &NetworkConfig,
    req: &AcquireRequest,
    me: Ipv4Addr,
    ttl_secs: i64,
    granted: &mut Option<i64>,
) -> Result<Acquired, AcquireError> {
    for _ in 0..MAX_ATTEMPTS {
        let set = reg.list_leases().await?;
        let mine = |l: &&Arc<Lease>| req.owns(l) && cfg.is_leasable(&l.subnet);
        // Another node with our PublicIP: stop before writing anything (no tug of war).
        if let Some(l) = set
            .leases
            .values()
            .find(|l| l.public_ip() == Some(me) && !req.owns(l))
        {
            return Err(AcquireError::PublicIpInUse {
                subnet: l.subnet,
                ip: me,
                holder: holder(l),
            });
        }

        // 1. A reservation for us wins over everything: the operator pinned this node.
        if let Some(r) = set
            .leases
            .values()
            .filter(mine)
            .find(|l| l.is_reservation())
        {
            if update_value(reg, r, None, &req.value).await? {
                return Ok(Acquired {
                    subnet: r.subnet,
                    lease_id: None,
                    how: How::Reservation,
                });
            }
            continue;
        }

        // 2./3. Our previous subnet (subnet file first, then any key with our PublicIP).
        let previous = req.previous.filter(|p| cfg.is_leasable(p));
        if let Some(p) = previous {
            match set.leases.get(&p) {
                Some(l) if req.owns(l) => {
                    if let Some(a) = take_over(reg, l, req, ttl_secs, granted).await? {
                        return Ok(a);
                    }
                    continue;
                }
                Some(l) if req.previous_in_use > 0 => {
                    return Err(AcquireError::PreviousTaken {
                        subnet: p,
                        holder: holder(l),
                        pods: req.previous_in_use,
                    })
                }
                Some(l) => warn!(
                    subnet = %p,
                    holder = ?l.public_ip(),
                    "the subnet in this node's subnet file is now leased by another node; this node \
                     must take a different subnet, and pods still running with addresses from {p} \
                     will lose connectivity until they are recreated"
                ),
                None => {
                    let id = grant(reg, ttl_secs, granted).await?;
                    if create(reg, &p, &req.value, id).await? {
                        return Ok(Acquired {
                            subnet: p,
                            lease_id: Some(id),
                            how: How::Recreated,
                        });
                    }
                    continue;
                }
            }
        }
        if let Some(l) = set.leases.values().find(mine) {
            if let Some(a) = take_over(reg, l, req, ttl_secs, granted).await? {
                return Ok(a);
            }
            continue;
        }

        // 4. A random free subnet, so nodes starting together rarely want the same one.
        let free: Vec<Ipv4Network> = cfg
            .subnets()
            .filter(|s| !set.leases.contains_key(s))
            .collect();
        let Some(pick) = free.choose(&mut rand::rng()).copied() else {
            let total = cfg.capacity();
            let leased = set.leases.keys().filter(|s| cfg.is_leasable(s)).count() as u32;
            return Err(AcquireError::NetworkFull {
                leased,
                total,
                network: cfg.network,
            });
        };
        let id = grant(reg, ttl_secs, granted).await?;
        if create(reg, &pick, &req.value, id).await? {
            return Ok(Acquired {
                subnet: pick,
                lease_id: Some(id),
                how: How::New,
            });
        }
        info!(subnet = %pick, "another node claimed this subnet first; picking again");
    }
    Err(AcquireError::Contended(MAX_ATTEMPTS))
}

/// A lease granted for a claim that did not end up using it would only expire after its TTL
/// (an hour by default); revoke it now. Best effort: etcd expires it anyway.
async fn revoke_unused(reg: &Registry, granted: Option<i64>, won: Option<&Acquired>) {
    let used = won.and_then(|a| a.lease_id);
    if let Some(id) = granted.filter(|g| Some(*g) != used) {
        let _ = reg
            .call(|mut c| async move { c.lease_revoke(id).await })
            .await;
    }
}

async fn grant(
    reg: &Registry,
    ttl_secs: i64,
    granted: &mut Option<i64>,
) -> Result<i64, RegistryError> {
    if let Some(id) = *granted {
        return Ok(id);
    }
    let resp = reg
        .call(|mut c| async move { c.lease_grant(ttl_secs, None).await })
        .await?;
    *granted = Some(resp.id());
    Ok(resp.id())
}

/// Creates the key only if it has never existed since its last delete.
async fn create(
    reg: &Registry,
    subnet: &Ipv4Network,
    value: &LeaseValue,
    lease: i64,
) -> Result<bool, RegistryError> {
    let key = reg.keys.subnet(subnet);
    let txn = Txn::new()
        .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key.as_str(),
            value.to_json(),
            Some(PutOptions::new().with_lease(lease)),
        )]);
    let txn = &txn;
    Ok(reg
        .call(|mut c| async move { c.txn(txn.clone()).await })
        .await?
        .succeeded())
}

/// Takes back a key that already carries our PublicIP. Its etcd lease is kept (no write at all when
/// the value is unchanged, so a restart wakes no other node); a lease that is about to vanish is
/// replaced by a fresh one in the same guarded write.
async fn take_over(
    reg: &Registry,
    l: &Lease,
    req: &AcquireRequest,
    ttl_secs: i64,
    granted: &mut Option<i64>,
) -> Result<Option<Acquired>, RegistryError> {
    let id = l.lease_id;
    let alive = reg
        .call(|mut c| async move { c.lease_time_to_live(id, None).await })
        .await
        .map(|r| r.ttl() > 0)
        .unwrap_or(false);
    let lease = if alive {
        l.lease_id
    } else {
        grant(reg, ttl_secs, granted).await?
    };
    if !update_value(reg, l, Some(lease), &req.value).await? {
        return Ok(None);
    }
    Ok(Some(Acquired {
        subnet: l.subnet,
        lease_id: Some(lease),
        how: How::Reused,
    }))
}

/// Writes `value` (with `lease`, or none for a reservation) unless the key changed since we read
/// it. Skips the write when nothing would change.
async fn update_value(
    reg: &Registry,
    l: &Lease,
    lease: Option<i64>,
    value: &LeaseValue,
) -> Result<bool, RegistryError> {
    let same_value = l.value.as_ref() == Some(value);
    let same_lease = lease.unwrap_or(0) == l.lease_id;
    if same_value && same_lease {
        return Ok(true);
    }
    let key = reg.keys.subnet(&l.subnet);
    let mut opts = PutOptions::new();
    if let Some(id) = lease {
        opts = opts.with_lease(id);
    }
    let txn = Txn::new()
        .when([Compare::mod_revision(
            key.as_str(),
            CompareOp::Equal,
            l.mod_revision,
        )])
        .and_then([TxnOp::put(key.as_str(), value.to_json(), Some(opts))]);
    let txn = &txn;
    Ok(reg
        .call(|mut c| async move { c.txn(txn.clone()).await })
        .await?
        .succeeded())
}

#[derive(Debug, thiserror::Error)]
pub enum ReassertError {
    #[error(
        "subnet {subnet} is now leased by another node ({holder}); refusing to renumber this node \
         silently, which would strand its running pods. Free {subnet} (run `overlayd release` on \
         the other node, or delete its key if it is stale) and this node takes it back; or drain \
         this node, delete its pods and the CNI store, then restart overlayd"
    )]
    Taken { subnet: Ipv4Network, holder: String },
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Puts this node's key for `subnet` back after it vanished (expired while etcd was away, or deleted
/// by someone): only this subnet, never another one.
pub async fn reassert(
    reg: &Registry,
    subnet: Ipv4Network,
    req: &AcquireRequest,
) -> Result<Acquired, ReassertError> {
    let ttl_secs = req.ttl.as_secs().max(1) as i64;
    let mut granted = None;
    let result = reassert_inner(reg, subnet, req, ttl_secs, &mut granted).await;
    revoke_unused(reg, granted, result.as_ref().ok()).await;
    result
}

async fn reassert_inner(
    reg: &Registry,
    subnet: Ipv4Network,
    req: &AcquireRequest,
    ttl_secs: i64,
    granted: &mut Option<i64>,
) -> Result<Acquired, ReassertError> {
    for _ in 0..MAX_ATTEMPTS {
        // Only this subnet's key matters here; no need to list the whole network.
        match reg.lease(&subnet).await?.as_ref() {
            None => {
                let id = grant(reg, ttl_secs, granted).await?;
                if create(reg, &subnet, &req.value, id).await? {
                    return Ok(Acquired {
                        subnet,
                        lease_id: Some(id),
                        how: How::Recreated,
                    });
                }
            }
            Some(l) if req.owns(l) => {
                if l.is_reservation() {
                    if update_value(reg, l, None, &req.value).await? {
                        return Ok(Acquired {
                            subnet,
                            lease_id: None,
                            how: How::Reservation,
                        });
                    }
                } else if let Some(a) = take_over(reg, l, req, ttl_secs, granted).await? {
                    return Ok(a);
                }
            }
            Some(l) => {
                return Err(ReassertError::Taken {
                    subnet,
                    holder: holder(l),
                })
            }
        }
    }
    Err(ReassertError::Registry(RegistryError::Rejected {
        endpoints: reg.endpoints().to_string(),
        detail: format!("subnet key {subnet} kept changing under us"),
    }))
}
