//! `overlayd release`: decommission this node's subnet. Revokes the etcd lease (which deletes the
//! subnet key, so peers drop their routes) and removes the subnet file. Running it again, or on a
//! node that holds nothing, is a no-op.

use std::process::ExitCode;

use anyhow::Context;
use overlay_state::SubnetFile;

use crate::cli::ReleaseArgs;
use crate::node;
use crate::registry::Registry;

pub async fn run(args: ReleaseArgs) -> anyhow::Result<ExitCode> {
    let reg = Registry::connect(&args.etcd).await?;
    let (conn, handle, _) = rtnetlink::new_connection().context("cannot open a netlink socket")?;
    tokio::spawn(conn);
    // The VNI only shapes the MAC, which release does not need.
    let node = node::discover(&handle, &args.node, 1).await?;

    let set = reg.list_leases().await?;
    let ours: Vec<_> = set
        .leases
        .values()
        .filter(|l| l.public_ip() == Some(node.public_ip))
        .collect();

    let mut released = 0;
    for l in &ours {
        if l.is_reservation() {
            println!(
                "subnet {} is a reservation for {} (a key without an etcd lease); left in place. \
                 Delete it with `ETCDCTL_API=3 etcdctl del {}` if the node is gone for good",
                l.subnet,
                node.public_ip,
                reg.keys.subnet(&l.subnet)
            );
            continue;
        }
        let id = l.lease_id;
        reg.call(|mut c| async move { c.lease_revoke(id).await })
            .await
            .with_context(|| format!("revoking the lease of subnet {}", l.subnet))?;
        println!(
            "released subnet {} (revoked etcd lease {:x})",
            l.subnet, l.lease_id
        );
        released += 1;
    }
    SubnetFile::remove(&args.node.subnet_file)?;
    if released == 0 && ours.iter().all(|l| !l.is_reservation()) {
        println!(
            "no subnet leased by {} in etcd at {}; nothing to release",
            node.public_ip,
            reg.endpoints()
        );
    }
    Ok(ExitCode::SUCCESS)
}
