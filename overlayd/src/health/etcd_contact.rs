//! A light, regular call to etcd so "etcd heard from" means something even when no lease changes
//! and keep-alives are hours apart (a third of a 24 h TTL): `LeaseTimeToLive` on our lease, which
//! also gives the TTL left for `/status` and the lease-expiry alert, or a count-only read of the
//! config key for a reservation. One small request per node every few seconds.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::GetOptions;

use super::Health;
use crate::registry::Registry;

/// How often to call: a quarter of the readiness window, within [1 s, 30 s].
pub fn interval(heard_within: Duration) -> Duration {
    (heard_within / 4).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

pub fn spawn(reg: Registry, health: Arc<Health>, heard_within: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval(heard_within));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = health.lease_changed.notified() => {}
            }
            check_once(&reg, &health).await;
        }
    });
}

async fn check_once(reg: &Registry, health: &Health) {
    let result = match health.lease_id() {
        Some(id) => reg
            .call(|mut c| async move { c.lease_time_to_live(id, None).await })
            .await
            .map(|r| Some((r.ttl(), r.granted_ttl()))),
        None => {
            let key = reg.keys.config();
            reg.call(|mut c| {
                let key = key.clone();
                async move { c.get(key, Some(GetOptions::new().with_count_only())).await }
            })
            .await
            .map(|_| None)
        }
    };
    match result {
        Ok(ttl) => {
            health.etcd_answered();
            if let Some((left, granted)) = ttl {
                health.set_lease_ttl(left, granted);
            }
        }
        Err(e) => health.etcd_failed(e.to_string()),
    }
}
