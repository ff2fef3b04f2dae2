//! Keeping this node's etcd lease alive with keep-alive messages — not by re-granting and re-putting
//! the key as flannel does, which wakes every node in the cluster on each renewal.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use super::client::{Registry, RegistryError};
use super::observe::Observer;
use crate::backoff::Backoff;

/// How often to refresh a lease of `ttl`: a quarter of it (three refreshes may fail before the lease
/// expires), within [0.5 s, 10 min].
pub fn interval(ttl: Duration) -> Duration {
    (ttl / 4).clamp(Duration::from_millis(500), Duration::from_secs(600))
}

/// Refreshes `lease_id` until etcd says it no longer exists, then returns. While etcd is unreachable
/// it retries with a capped backoff and returns nothing: the data plane keeps running unchanged.
///
/// A lease that expired while this node was cut off from etcd shows up as a keep-alive stream that
/// cannot be opened ("lease not found"): that is an expiry too, not a reason to retry.
///
/// Each answer goes to `observer` (the TTL it gives, and contact with etcd).
pub async fn keep_alive(reg: Registry, lease_id: i64, ttl: Duration, observer: Arc<dyn Observer>) {
    let every = interval(ttl);
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let opened = reg
            .call(|mut c| async move { c.lease_keep_alive(lease_id).await })
            .await;
        let (mut keeper, mut stream) = match opened {
            Ok(pair) => pair,
            Err(e) if is_lease_not_found(&e) => return,
            Err(e) => {
                let wait = backoff.next_delay();
                warn!("cannot keep lease {lease_id:x} alive: {e}; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        loop {
            if let Err(e) = keeper.keep_alive().await {
                warn!(
                    "keep-alive for lease {lease_id:x} failed: {}",
                    reg.map_err(e)
                );
                break;
            }
            match tokio::time::timeout(super::client::CALL_TIMEOUT, stream.message()).await {
                Ok(Ok(Some(resp))) if resp.ttl() <= 0 => return,
                Ok(Ok(Some(resp))) => {
                    debug!(ttl = resp.ttl(), "lease {lease_id:x} refreshed");
                    observer.lease_refreshed(lease_id, resp.ttl());
                    backoff.reset();
                }
                Ok(Ok(None)) => {
                    warn!("etcd closed the keep-alive stream for lease {lease_id:x}");
                    break;
                }
                Ok(Err(e)) => {
                    warn!(
                        "keep-alive for lease {lease_id:x} failed: {}",
                        reg.map_err(e)
                    );
                    break;
                }
                Err(_) => {
                    warn!(
                        "no keep-alive answer for lease {lease_id:x} from {}",
                        reg.endpoints()
                    );
                    break;
                }
            }
            tokio::time::sleep(every).await;
        }
        let wait = backoff.next_delay();
        tokio::time::sleep(wait).await;
    }
}

/// etcd-client opens a keep-alive stream with a first keep-alive and reports a TTL of 0 (etcd's
/// answer for a lease it does not know) as "lease not found".
fn is_lease_not_found(e: &RegistryError) -> bool {
    matches!(e, RegistryError::Rejected { detail, .. } if detail.contains("lease not found"))
}
