//! The background reclaim of pod addresses: what the plugin does on a full subnet (see
//! `overlay_state::ipam_store`'s reclaim rules), done at a low rate so `overlayd status` and the
//! metrics show no leftovers for long, and an unclean reboot's allocations are dropped before the
//! first ADD. It changes only the plugin's IPAM store, under the store's lock.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use overlay_state::ipam_store::{network_names, Reclaimed};
use overlay_state::{current_boot_id, IpamStore};
use tracing::{info, warn};

use crate::health::Health;

/// Reclaimed per network and pass, at most: the store's lock is not held for long.
const PER_PASS: usize = 16;

/// Reclaims every `interval`, forever.
pub async fn run(health: Arc<Health>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some((dir, subnet)) = health.ipam_target() else {
            continue;
        };
        let h = health.clone();
        let rt = tokio::runtime::Handle::current();
        // The link dump is taken under each store's lock (as the plugin does), from the
        // blocking thread.
        let links = move || rt.block_on(h.link_names());
        match tokio::task::spawn_blocking(move || pass(&dir, subnet, links)).await {
            Ok(reclaimed) => {
                for (network, r) in reclaimed {
                    let (id, ifname) = r
                        .key
                        .as_ref()
                        .map(|k| (k.container_id.clone(), k.ifname.clone()))
                        .unwrap_or_default();
                    info!(
                        network,
                        ip = %r.ip,
                        container = id,
                        ifname,
                        "reclaimed pod address {}: {}",
                        r.ip,
                        r.why
                    );
                }
            }
            Err(e) => warn!("IPAM reclaim pass failed: {e}"),
        }
    }
}

/// One pass over every network's store under `dir`.
fn pass(
    dir: &Path,
    subnet: Ipv4Network,
    mut links: impl FnMut() -> Option<std::collections::HashSet<String>>,
) -> Vec<(String, Reclaimed)> {
    let boot = current_boot_id();
    let mut out = Vec::new();
    for network in network_names(dir) {
        let Ok(store) = IpamStore::new(dir, &network) else {
            continue;
        };
        match store
            .with_boot_id(boot.clone())
            .reclaim(subnet, PER_PASS, &mut links)
        {
            Ok(r) => out.extend(r.into_iter().map(|r| (network.clone(), r))),
            Err(e) => warn!(network, "cannot reclaim pod addresses: {e}"),
        }
    }
    out
}
