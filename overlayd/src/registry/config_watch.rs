//! Follows `<prefix>/config` after start: one read, then a watch of that single key from the
//! revision after it, so an operator's `etcdctl put` reaches every node within moments and costs
//! nothing while nothing changes. A lost or compacted watch reads the key again (one key: a fresh
//! read is the whole resync). A value that does not parse, or a deleted key, is logged and
//! ignored: the running config stays.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::client::Registry;
use crate::backoff::Backoff;
use crate::config::NetworkConfig;

/// Keeps `tx` equal to the last valid config in etcd until the receiver side is dropped.
pub async fn follow(reg: Registry, tx: watch::Sender<Arc<NetworkConfig>>) {
    let key = reg.keys.config();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    // The last value seen (valid or not), so a bad one is warned about once.
    let mut last_raw: Option<Vec<u8>> = None;
    loop {
        if tx.is_closed() {
            return;
        }
        let k = key.as_str();
        let revision = match reg.call(|mut c| async move { c.get(k, None).await }).await {
            Ok(resp) => {
                if let Some(kv) = resp.kvs().first() {
                    offer(&tx, &mut last_raw, kv.value());
                }
                resp.header().map_or(0, |h| h.revision())
            }
            Err(e) => {
                let wait = backoff.next_delay();
                debug!("cannot read the network config: {e}; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        let opts = WatchOptions::new().with_start_revision(revision + 1);
        let opts = &opts;
        let mut stream = match reg
            .call(|mut c| async move { c.watch(k, Some(opts.clone())).await })
            .await
        {
            Ok(s) => s,
            Err(e) => {
                let wait = backoff.next_delay();
                debug!("cannot watch the network config: {e}; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(msg)) if msg.compact_revision() > 0 || msg.canceled() => break,
                Ok(Some(msg)) => {
                    backoff.reset();
                    for ev in msg.events() {
                        let Some(kv) = ev.kv() else { continue };
                        match ev.event_type() {
                            EventType::Put => offer(&tx, &mut last_raw, kv.value()),
                            EventType::Delete => warn!(
                                "the network config {key} was deleted from etcd; keeping the running config"
                            ),
                        }
                    }
                }
                Ok(None) | Err(_) => break,
            }
            if tx.is_closed() {
                return;
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

fn offer(tx: &watch::Sender<Arc<NetworkConfig>>, last_raw: &mut Option<Vec<u8>>, raw: &[u8]) {
    if last_raw.as_deref() == Some(raw) {
        return;
    }
    *last_raw = Some(raw.to_vec());
    match NetworkConfig::parse(raw) {
        Ok((cfg, _warnings)) => {
            tx.send_if_modified(|now| {
                let changed = **now != cfg;
                if changed {
                    *now = Arc::new(cfg);
                }
                changed
            });
        }
        Err(e) => warn!("the network config in etcd changed to one overlayd cannot use: {e}; keeping the running config"),
    }
}
