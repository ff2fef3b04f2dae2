//! `overlayd status`: what an operator asks first on a node — which subnet, is the lease alive, and
//! does the kernel route to every other node. Exit 0 when all is well, 1 otherwise.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use overlay_state::ipam_store::{self, pod_capacity};
use overlay_state::SubnetFile;

use crate::cli::StatusArgs;
use crate::dataplane::peers;
use crate::node;
use crate::registry::Registry;

pub async fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let mut healthy = true;
    let file = match SubnetFile::read(&args.node.subnet_file) {
        Ok(f) => {
            println!(
                "subnet file {}: subnet {} gateway {} network {} mtu {}",
                args.node.subnet_file.display(),
                f.subnet,
                f.gateway(),
                f.network,
                f.mtu
            );
            Some(f)
        }
        Err(e) => {
            println!("{e}");
            healthy = false;
            None
        }
    };

    if let Some(f) = &file {
        healthy &= report_pod_addresses(&args.node.cni_data_dir, f);
    }

    let (conn, handle, _) = rtnetlink::new_connection().context("cannot open a netlink socket")?;
    tokio::spawn(conn);
    let node = node::discover(&handle, &args.node, 1).await?;
    let reg = Registry::connect(&args.etcd).await?;
    let set = reg.list_leases().await?;
    let routed: std::collections::BTreeSet<_> = peers::our_routes(&handle)
        .await?
        .into_iter()
        .filter_map(|(_, dst, _)| dst)
        .collect();

    let mine: Vec<_> = set
        .leases
        .values()
        .filter(|l| l.public_ip() == Some(node.public_ip))
        .collect();
    match mine.as_slice() {
        [] => {
            println!("etcd {}: no lease for {}", reg.endpoints(), node.public_ip);
            healthy = false;
        }
        [l, ..] => {
            let ttl = if l.is_reservation() {
                "reservation, never expires".to_string()
            } else {
                let id = l.lease_id;
                match reg
                    .call(|mut c| async move { c.lease_time_to_live(id, None).await })
                    .await
                {
                    Ok(r) if r.ttl() > 0 => format!("lease {:x}, {} s left", l.lease_id, r.ttl()),
                    _ => {
                        healthy = false;
                        format!("lease {:x} has expired", l.lease_id)
                    }
                }
            };
            println!(
                "etcd {}: {} held by {} ({ttl})",
                reg.endpoints(),
                l.subnet,
                node.public_ip
            );
            if file.as_ref().is_some_and(|f| f.subnet != l.subnet) {
                println!("MISMATCH: the subnet file and etcd disagree");
                healthy = false;
            }
        }
    }

    println!("peers:");
    let mut peers = 0;
    for l in set.leases.values() {
        if l.public_ip() == Some(node.public_ip) {
            continue;
        }
        peers += 1;
        let name = l
            .value
            .as_ref()
            .and_then(|v| v.node_name.clone())
            .unwrap_or_else(|| "-".into());
        let ip = l
            .public_ip()
            .map_or_else(|| "-".to_string(), |i| i.to_string());
        let state = if routed.contains(&l.subnet) {
            "routed"
        } else {
            healthy = false;
            "NO ROUTE"
        };
        println!(
            "  {:<18} {:<16} {:<24} {state}",
            l.subnet.to_string(),
            ip,
            name
        );
    }
    if peers == 0 {
        println!("  (none)");
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// How many of the subnet's pod addresses the plugin has handed out, per CNI network (one store
/// each under the plugin's `dataDir`). A full subnet is unhealthy: new pods fail on this node.
fn report_pod_addresses(data_dir: &Path, file: &SubnetFile) -> bool {
    let capacity = pod_capacity(file.subnet);
    let stores = ipam_store::usage(data_dir, file.subnet);
    if stores.is_empty() {
        println!(
            "pod addresses: 0 of {capacity} allocated (no IPAM store under {} yet)",
            data_dir.display()
        );
        return true;
    }
    let mut healthy = true;
    for u in stores {
        match u.allocated {
            Ok(used) => {
                let full = used >= capacity;
                println!(
                    "pod addresses (network {}): {used} of {capacity} allocated{}, store {}",
                    u.network,
                    if full {
                        " - FULL: new pods on this node fail; delete pods, or run CNI GC to release leaked addresses"
                    } else {
                        ""
                    },
                    u.dir.display()
                );
                healthy &= !full;
            }
            Err(e) => {
                println!("pod addresses (network {}): {e}", u.network);
                healthy = false;
            }
        }
    }
    healthy
}
