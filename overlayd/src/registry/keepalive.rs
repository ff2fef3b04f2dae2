//! Keeping this node's etcd lease alive with keep-alive messages — not by re-granting and re-putting
//! the key as flannel does, which wakes every node in the cluster on each renewal.

use std::time::Duration;

use tracing::{debug, warn};

use super::client::Registry;
use crate::backoff::Backoff;

/// How often to refresh a lease of `ttl`: a third of it, within [0.5 s, 10 min].
pub fn interval(ttl: Duration) -> Duration {
    (ttl / 3).clamp(Duration::from_millis(500), Duration::from_secs(600))
}

/// Refreshes `lease_id` until etcd says it no longer exists, then returns. While etcd is unreachable
/// it retries with a capped backoff and returns nothing: the data plane keeps running unchanged.
pub async fn keep_alive(reg: Registry, lease_id: i64, ttl: Duration) {
    let every = interval(ttl);
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let opened = reg
            .call(|mut c| async move { c.lease_keep_alive(lease_id).await })
            .await;
        let (mut keeper, mut stream) = match opened {
            Ok(pair) => pair,
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
