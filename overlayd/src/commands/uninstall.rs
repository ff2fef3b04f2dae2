//! `overlayd uninstall`: take overlayd's data plane off this node. Idempotent: a second run finds
//! nothing and says so.

use std::process::ExitCode;

use anyhow::Context;
use futures::TryStreamExt;
use overlay_state::SubnetFile;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo};

use crate::cli::UninstallArgs;
use crate::dataplane::{iptables::Iptables, links, peers};

pub async fn run(args: UninstallArgs) -> anyhow::Result<ExitCode> {
    let (conn, handle, _) = rtnetlink::new_connection().context("cannot open a netlink socket")?;
    tokio::spawn(conn);
    let mut removed = Vec::new();

    // Direct-routing routes go via the underlay, so deleting the VTEP would not take them.
    let ours = peers::our_routes(&handle).await?;
    let n = ours.len();
    for (r, _, _) in ours {
        let _ = handle.route().del(r).execute().await;
    }
    if n > 0 {
        removed.push(format!("{n} routes to other nodes"));
    }

    let mut vteps = Vec::new();
    let mut all = handle.link().get().execute();
    while let Some(l) = all.try_next().await.context("listing links")? {
        let name = l.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        });
        let is_vxlan = l.attributes.iter().any(|a| {
            matches!(a, LinkAttribute::LinkInfo(i) if i.iter().any(|x| matches!(x, LinkInfo::Kind(InfoKind::Vxlan))))
        });
        if let Some(name) = name.filter(|n| n.starts_with("overlay.") && is_vxlan) {
            vteps.push(name);
        }
    }
    for name in vteps.iter().chain(std::iter::once(&args.bridge)) {
        if links::delete_link(&handle, name).await? {
            removed.push(format!("link {name}"));
        }
    }

    match Iptables::detect().await {
        Ok(ipt) => {
            if ipt.remove().await? {
                removed.push(format!("iptables chains ({} backend)", ipt.backend()));
            }
        }
        Err(e) => eprintln!("skipping iptables: {e}"),
    }
    if args.subnet_file.exists() {
        SubnetFile::remove(&args.subnet_file)?;
        removed.push(format!("subnet file {}", args.subnet_file.display()));
    }

    if removed.is_empty() {
        println!("nothing of overlayd's is left on this node");
    } else {
        for r in &removed {
            println!("removed {r}");
        }
        println!("the etcd lease is kept; `overlayd release` gives the subnet back");
    }
    Ok(ExitCode::SUCCESS)
}
