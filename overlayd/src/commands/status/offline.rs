//! `overlayd status` with the daemon down (or unreachable): what this node shows by itself — the
//! subnet file, the plugin's IPAM store, the kernel's routes to other nodes — and etcd's view when
//! the flags or the environment say where it is. Every part is best-effort: one that cannot be read
//! says why and the rest is still shown.

use std::collections::BTreeSet;
use std::path::Path;

use ipnetwork::Ipv4Network;
use overlay_state::ipam_store::{self, pod_capacity};
use overlay_state::SubnetFile;
use serde_json::{json, Map, Value};

use crate::cli::StatusArgs;
use crate::dataplane::peers;
use crate::node;
use crate::registry::Registry;

/// The same findings as text lines and as JSON fields.
pub struct Out {
    pub lines: Vec<String>,
    pub json: Map<String, Value>,
}

impl Out {
    fn line(&mut self, l: impl Into<String>) {
        self.lines.push(l.into());
    }
    fn field(&mut self, key: &str, v: Value) {
        self.json.insert(key.into(), v);
    }
}

pub async fn collect(args: &StatusArgs, why_not: &str) -> Out {
    let mut out = Out {
        lines: Vec::new(),
        json: Map::new(),
    };
    out.line(format!(
        "overlayd is NOT answering on this node ({why_not}); showing what the node itself holds:"
    ));
    out.field("daemon", json!({"answering": false, "detail": why_not}));

    let file = match SubnetFile::read(&args.node.subnet_file) {
        Ok(f) => {
            out.line(format!(
                "subnet file {}: subnet {} gateway {} network {} mtu {}",
                args.node.subnet_file.display(),
                f.subnet,
                f.gateway(),
                f.network,
                f.mtu
            ));
            out.field(
                "subnet_file",
                json!({"path": args.node.subnet_file, "subnet": f.subnet.to_string(),
                       "network": f.network.to_string(), "mtu": f.mtu, "ip_masq": f.ip_masq}),
            );
            Some(f)
        }
        Err(e) => {
            out.line(e.to_string());
            out.field(
                "subnet_file",
                json!({"path": args.node.subnet_file, "error": e.to_string()}),
            );
            None
        }
    };
    if let Some(f) = &file {
        let links = async {
            let (conn, handle, _) = rtnetlink::new_connection().ok()?;
            tokio::spawn(conn);
            crate::netlink::link_names(&handle).await.ok()
        }
        .await;
        pod_addresses(&mut out, &args.node.cni_data_dir, f, links.as_ref());
    }

    let routed = routes(&mut out).await;
    etcd_view(&mut out, args, file.as_ref(), routed.as_ref()).await;
    out
}

/// Our routes in the kernel (proto 76), by destination.
async fn routes(out: &mut Out) -> Option<BTreeSet<Ipv4Network>> {
    let routed = async {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let r = peers::our_routes(&handle)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(
            r.into_iter()
                .filter_map(|(_, dst, _)| dst)
                .collect::<BTreeSet<_>>(),
        )
    }
    .await;
    match routed {
        Ok(set) => {
            out.line(format!(
                "kernel: {} overlay routes to other nodes",
                set.len()
            ));
            out.field(
                "routes",
                Value::from(set.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
            );
            Some(set)
        }
        Err(e) => {
            out.line(format!("kernel: cannot list routes: {e}"));
            out.field("routes", json!({"error": e}));
            None
        }
    }
}

/// etcd's leases against the kernel's routes: is ours alive, is every other node routed.
async fn etcd_view(
    out: &mut Out,
    args: &StatusArgs,
    file: Option<&SubnetFile>,
    routed: Option<&BTreeSet<Ipv4Network>>,
) {
    let reg = match Registry::connect(&args.etcd).await {
        Ok(r) => r,
        Err(e) => {
            out.line(format!("etcd: {e}"));
            out.field("etcd", json!({"error": e.to_string()}));
            return;
        }
    };
    let set = match reg.list_leases().await {
        Ok(s) => s,
        Err(e) => {
            out.line(format!("etcd: {e}"));
            out.field(
                "etcd",
                json!({"endpoints": reg.endpoints(), "error": e.to_string()}),
            );
            return;
        }
    };
    let node = match rtnetlink::new_connection() {
        Ok((conn, handle, _)) => {
            tokio::spawn(conn);
            node::discover(&handle, &args.node, 1).await.ok()
        }
        Err(_) => None,
    };
    // Which lease is ours: the subnet file's, else the one naming this node's public IP.
    let mine = set.leases.values().find(|l| {
        file.is_some_and(|f| f.subnet == l.subnet)
            || node
                .as_ref()
                .is_some_and(|n| l.public_ip() == Some(n.public_ip))
    });
    let mut lease_json = Value::Null;
    match mine {
        None => out.line(format!(
            "etcd {}: no lease for this node{}",
            reg.endpoints(),
            node.as_ref()
                .map(|n| format!(" ({})", n.public_ip))
                .unwrap_or_default()
        )),
        Some(l) => {
            let holder = l
                .public_ip()
                .map_or_else(|| "-".to_string(), |i| i.to_string());
            let (ttl_text, ttl) = if l.is_reservation() {
                ("reservation, never expires".to_string(), None)
            } else {
                let id = l.lease_id;
                match reg
                    .call(|mut c| async move { c.lease_time_to_live(id, None).await })
                    .await
                {
                    Ok(r) if r.ttl() > 0 => (
                        format!("lease {:x}, {} s left", l.lease_id, r.ttl()),
                        Some(r.ttl()),
                    ),
                    _ => (format!("lease {:x} has expired", l.lease_id), Some(0)),
                }
            };
            out.line(format!(
                "etcd {}: {} held by {holder} ({ttl_text})",
                reg.endpoints(),
                l.subnet
            ));
            lease_json = json!({"subnet": l.subnet.to_string(), "holder": holder,
                                "lease_id": format!("{:x}", l.lease_id), "ttl_left_seconds": ttl});
            if file.is_some_and(|f| f.subnet != l.subnet) {
                out.line("MISMATCH: the subnet file and etcd disagree");
            }
        }
    }

    out.line("peers:");
    let mut peers = Vec::new();
    for l in set.leases.values() {
        if mine.is_some_and(|m| m.subnet == l.subnet) {
            continue;
        }
        let name = l
            .value
            .as_ref()
            .and_then(|v| v.node_name.clone())
            .unwrap_or_else(|| "-".into());
        let ip = l
            .public_ip()
            .map_or_else(|| "-".to_string(), |i| i.to_string());
        let state = match routed {
            Some(r) if r.contains(&l.subnet) => "routed",
            Some(_) => "NO ROUTE",
            None => "unknown",
        };
        out.line(format!(
            "  {:<18} {:<16} {:<24} {state}",
            l.subnet.to_string(),
            ip,
            name
        ));
        peers.push(json!({"subnet": l.subnet.to_string(), "public_ip": ip, "node_name": name, "state": state}));
    }
    if peers.is_empty() {
        out.line("  (none)");
    }
    out.field(
        "etcd",
        json!({"endpoints": reg.endpoints(), "lease": lease_json, "peers": peers}),
    );
}

/// How many of the subnet's pod addresses the plugin has handed out, per CNI network (one store
/// each under the plugin's `dataDir`).
fn pod_addresses(
    out: &mut Out,
    data_dir: &Path,
    file: &SubnetFile,
    links: Option<&std::collections::HashSet<String>>,
) {
    let capacity = pod_capacity(file.subnet);
    let stores = ipam_store::usage(data_dir, file.subnet);
    if stores.is_empty() {
        out.line(format!(
            "pod addresses: 0 of {capacity} allocated (no IPAM store under {} yet)",
            data_dir.display()
        ));
        out.field("pod_addresses", json!([]));
        return;
    }
    let mut js = Vec::new();
    for u in stores {
        match u.allocated {
            Ok(used) => {
                let full = used >= capacity;
                // Live pods and leftovers of sandboxes gone without DEL apart (by the node's links).
                let survey = links.and_then(|l| {
                    overlay_state::IpamStore::new(data_dir, &u.network)
                        .ok()?
                        .survey(file.subnet, l)
                        .ok()
                });
                let split = survey
                    .as_ref()
                    .map(|s| {
                        format!(
                            ": {} live pods, {} reclaimable leftovers of sandboxes gone without \
                             DEL, {} starting; {} reclaimed so far",
                            s.live, s.reclaimable, s.young, s.reclaimed_total
                        )
                    })
                    .unwrap_or_default();
                out.line(format!(
                    "pod addresses (network {}): {used} of {capacity} allocated{split}{}, store {}",
                    u.network,
                    if full {
                        " - FULL: new pods on this node fail; delete pods, or run CNI GC to release leaked addresses"
                    } else {
                        ""
                    },
                    u.dir.display()
                ));
                js.push(json!({
                    "network": u.network,
                    "allocated": used,
                    "capacity": capacity,
                    "live": survey.as_ref().map(|s| s.live),
                    "reclaimable": survey.as_ref().map(|s| s.reclaimable),
                    "starting": survey.as_ref().map(|s| s.young),
                    "reclaimed_total": survey.as_ref().map(|s| s.reclaimed_total),
                }));
            }
            Err(e) => {
                out.line(format!("pod addresses (network {}): {e}", u.network));
                js.push(json!({"network": u.network, "error": e.to_string()}));
            }
        }
    }
    out.field("pod_addresses", Value::from(js));
}
