//! etcd as this node's daemon would use it: reachable, TLS and auth accepted, the network config
//! valid, leave to write under the prefix, and this node's lease held.

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use super::{Context, Finding};
use crate::registry::{Registry, RegistryError};

const ETCD: &str = "etcd";
const CONFIG: &str = "network-config";
const PERMISSION: &str = "etcd-permission";
const LEASE: &str = "lease";

pub async fn checks(cx: &Context) -> Vec<Finding> {
    let args = &cx.args.etcd;
    let reg = match Registry::connect(args).await {
        Ok(r) => r,
        Err(e) => {
            let fix = match &e {
                RegistryError::AuthFailed { .. } => "fix the overlayd-etcd-auth Secret (username/password)",
                RegistryError::TlsFile { .. } | RegistryError::TlsContent { .. } => "check the overlayd-etcd-tls Secret and the --etcd-cafile/--etcd-certfile/--etcd-keyfile paths",
                RegistryError::TlsRejected { .. } => "replace the TLS file the message names (the overlayd-etcd-tls Secret)",
                _ => "check --etcd-endpoints (OVERLAYD_ETCD_ENDPOINTS), the security group from this node to etcd's client port, and the TLS flags",
            };
            return vec![
                Finding::fail(ETCD, e.to_string(), fix),
                Finding::skip(CONFIG, "etcd not reachable"),
                Finding::skip(PERMISSION, "etcd not reachable"),
                lease_from_daemon(cx).unwrap_or_else(|| Finding::skip(LEASE, "etcd not reachable")),
            ];
        }
    };
    let mut out = Vec::new();
    let config = reg.network_config().await;
    let reachable = !matches!(
        config,
        Err(RegistryError::Unreachable { .. }) | Err(RegistryError::TlsRejected { .. })
    );
    out.push(match &config {
        Err(RegistryError::Unreachable { .. })
        | Err(RegistryError::AuthFailed { .. })
        | Err(RegistryError::TlsRejected { .. }) => Finding::fail(
            ETCD,
            config
                .as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_default(),
            "check --etcd-endpoints, the network path to etcd's client port, TLS and credentials",
        ),
        _ => Finding::pass(
            ETCD,
            format!(
                "{} answers{}{}",
                reg.endpoints(),
                if args.etcd_cafile.is_some() {
                    ", TLS verified"
                } else {
                    ""
                },
                args.etcd_username
                    .as_ref()
                    .map(|u| format!(", logged in as {u}"))
                    .unwrap_or_default()
            ),
        ),
    });
    if !reachable {
        out.push(Finding::skip(CONFIG, "etcd not reachable"));
        out.push(Finding::skip(PERMISSION, "etcd not reachable"));
        out.push(
            lease_from_daemon(cx).unwrap_or_else(|| Finding::skip(LEASE, "etcd not reachable")),
        );
        return out;
    }
    out.push(match config {
        Ok((cfg, warnings)) if warnings.is_empty() => Finding::pass(
            CONFIG,
            format!(
                "{}: Network {}, /{} subnets ({} of them), VNI {}, UDP {}",
                reg.keys.config(),
                cfg.network,
                cfg.subnet_len,
                cfg.capacity(),
                cfg.backend.vni,
                cfg.backend.port
            ),
        ),
        Ok((_, warnings)) => Finding::warn(
            CONFIG,
            warnings.join("; "),
            "`overlayd config show` prints it with defaults filled in; `overlayd config put --force` rewrites it",
        ),
        Err(e) => Finding::fail(
            CONFIG,
            e.to_string(),
            "seed or fix it with `overlayd config validate` then `overlayd config put` (or etcdctl put, v3 API)",
        ),
    });
    out.push(permission(&reg).await);
    out.push(match lease_from_daemon(cx) {
        Some(f) => f,
        None => lease_from_etcd(cx, &reg).await,
    });
    out
}

/// Can this user write subnet keys? A transaction whose guard never holds: etcd checks the
/// permission of every operation in it, and runs none.
async fn permission(reg: &Registry) -> Finding {
    let key = format!("{}overlayd-doctor-permission-check", reg.keys.subnets());
    let k = key.clone();
    let r = reg
        .call(|mut c| {
            let k = k.clone();
            async move {
                c.txn(
                    Txn::new()
                        .when([Compare::version(k.clone(), CompareOp::Less, 0)])
                        .and_then([TxnOp::put(k, "", None)]),
                )
                .await
            }
        })
        .await;
    let listed = reg.list_leases().await;
    match (r, listed) {
        (Ok(_), Ok(set)) => Finding::pass(
            PERMISSION,
            format!(
                "may read and write under {} ({} subnets leased)",
                reg.keys.subnets(),
                set.leases.len()
            ),
        ),
        (Err(e), _) | (_, Err(e)) => Finding::fail(
            PERMISSION,
            format!("cannot write (or read) subnet keys under {}: {e}", reg.keys.subnets()),
            format!(
                "grant the user readwrite on the prefix: etcdctl role grant-permission <role> readwrite {} --prefix",
                reg.keys.prefix()
            ),
        ),
    }
}

/// The lease as the running daemon sees it (it checks the TTL with etcd every few seconds).
fn lease_from_daemon(cx: &Context) -> Option<Finding> {
    let s = cx.status.as_ref().ok()?;
    let l = s.lease.as_ref()?;
    Some(if !l.held {
        Finding::fail(
            LEASE,
            format!("etcd says the lease of {} expired; the daemon is leasing it again", l.subnet),
            "see the overlayd log; if another node took the subnet, drain this node and restart its overlayd pod",
        )
    } else {
        match (&l.lease_id, l.ttl_left_seconds, l.granted_ttl_seconds) {
            (None, _, _) => Finding::pass(LEASE, format!("{} (reservation, never expires)", l.subnet)),
            (Some(id), Some(left), Some(granted)) if granted > 0 && left * 10 < granted => Finding::warn(
                LEASE,
                format!("{} lease {id} has {left} s of {granted} s left and is not being renewed", l.subnet),
                "check the daemon's etcd contact (overlayd status); a lease that expires frees the subnet for other nodes",
            ),
            (Some(id), left, granted) => Finding::pass(
                LEASE,
                format!(
                    "{} held, lease {id}{}",
                    l.subnet,
                    match (left, granted) {
                        (Some(l), Some(g)) => format!(", {l} s of {g} s left"),
                        _ => String::new(),
                    }
                ),
            ),
        }
    })
}

/// Without the daemon: the subnet file's subnet in etcd, and its lease's TTL.
async fn lease_from_etcd(cx: &Context, reg: &Registry) -> Finding {
    let f = match &cx.subnet_file {
        Ok(f) => f,
        Err(e) => {
            return Finding::fail(
                LEASE,
                format!("no subnet leased on this node: {e}"),
                "start overlayd (the DaemonSet) and read its log",
            )
        }
    };
    let fix =
        "restart the overlayd pod: it leases the subnet in its subnet file again if still free";
    match reg.lease(&f.subnet).await {
        Err(e) => Finding::fail(LEASE, e.to_string(), "check etcd"),
        Ok(None) => Finding::fail(
            LEASE,
            format!("{} (the subnet file's) has no key in etcd: other nodes have no route to this node's pods", f.subnet),
            fix,
        ),
        Ok(Some(l)) if l.is_reservation() => Finding::pass(LEASE, format!("{} (reservation)", f.subnet)),
        Ok(Some(l)) => {
            let id = l.lease_id;
            match reg
                .call(|mut c| async move { c.lease_time_to_live(id, None).await })
                .await
            {
                Ok(r) if r.ttl() > 0 => Finding::pass(
                    LEASE,
                    format!("{} held, lease {id:x}, {} s of {} s left", f.subnet, r.ttl(), r.granted_ttl()),
                ),
                Ok(_) => Finding::fail(LEASE, format!("{} lease {id:x} has expired", f.subnet), fix),
                Err(e) => Finding::fail(LEASE, e.to_string(), "check etcd"),
            }
        }
    }
}
