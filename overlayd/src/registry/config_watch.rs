//! The network config after start, followed on the lease watch's own stream (see
//! [`super::watch_stream`]): read once per stream, then watched from the revision after, so an
//! operator's `etcdctl put` reaches every node within moments and costs nothing while nothing
//! changes. A value that does not parse, or a deleted key, is logged (once) and ignored: the
//! running config stays.

use std::sync::Arc;

use etcd_client::{EventType, WatchResponse};
use tokio::sync::watch;
use tracing::warn;

use super::client::{Registry, RegistryError};
use crate::config::NetworkConfig;

pub(super) struct ConfigFollower {
    tx: watch::Sender<Arc<NetworkConfig>>,
    key: String,
    /// The last value seen (valid or not), so a bad one is warned about once.
    last_raw: Option<Vec<u8>>,
    /// The revision the config is known at: of the last read, or of the last event.
    revision: i64,
}

impl ConfigFollower {
    pub(super) fn new(reg: &Registry, tx: watch::Sender<Arc<NetworkConfig>>) -> ConfigFollower {
        ConfigFollower {
            tx,
            key: reg.keys.config(),
            last_raw: None,
            revision: 0,
        }
    }

    pub(super) fn key(&self) -> &str {
        &self.key
    }

    pub(super) fn revision(&self) -> i64 {
        self.revision
    }

    /// Reads the key as etcd has it now.
    pub(super) async fn read(&mut self, reg: &Registry) -> Result<(), RegistryError> {
        let k = self.key.as_str();
        let resp = reg
            .call(|mut c| async move { c.get(k, None).await })
            .await?;
        if let Some(kv) = resp.kvs().first() {
            let raw = kv.value().to_vec();
            self.offer(&raw);
        }
        self.revision = resp.header().map_or(0, |h| h.revision());
        Ok(())
    }

    /// One answer of the config's watch.
    pub(super) fn apply(&mut self, msg: &WatchResponse) {
        for ev in msg.events() {
            let Some(kv) = ev.kv() else { continue };
            self.revision = self.revision.max(kv.mod_revision());
            match ev.event_type() {
                EventType::Put => {
                    let raw = kv.value().to_vec();
                    self.offer(&raw);
                }
                EventType::Delete => warn!(
                    "the network config {} was deleted from etcd; keeping the running config",
                    self.key
                ),
            }
        }
    }

    fn offer(&mut self, raw: &[u8]) {
        if self.last_raw.as_deref() == Some(raw) {
            return;
        }
        self.last_raw = Some(raw.to_vec());
        match NetworkConfig::parse(raw) {
            Ok((cfg, _warnings)) => {
                self.tx.send_if_modified(|now| {
                    let changed = **now != cfg;
                    if changed {
                        *now = Arc::new(cfg);
                    }
                    changed
                });
            }
            Err(e) => warn!(
                "the network config in etcd changed to one overlayd cannot use: {e}; keeping the running config"
            ),
        }
    }
}
