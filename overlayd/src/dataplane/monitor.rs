//! Wakes the reconciler as soon as the kernel reports a link, address, route or neighbour change,
//! so drift (a route someone deleted, a link flap) is repaired at once instead of at the next tick.

use std::sync::Arc;

use futures::StreamExt;
use rtnetlink::constants::{RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_LINK, RTMGRP_NEIGH};
use rtnetlink::sys::{AsyncSocket, SocketAddr};
use tokio::sync::Notify;
use tracing::warn;

/// Spawns the listener; `notify` fires on every kernel change notification. If the socket cannot
/// be opened, drift is still repaired by the periodic reconcile.
pub fn spawn(notify: Arc<Notify>) {
    let opened = rtnetlink::new_connection().and_then(|(mut conn, _handle, mut messages)| {
        let groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_NEIGH;
        conn.socket_mut()
            .socket_mut()
            .bind(&SocketAddr::new(0, groups))?;
        tokio::spawn(conn);
        tokio::spawn(async move {
            // Keep the handle alive: dropping it would close the connection.
            let _handle = _handle;
            while messages.next().await.is_some() {
                notify.notify_one();
            }
        });
        Ok(())
    });
    if let Err(e) = opened {
        warn!("cannot listen for netlink changes ({e}); relying on the periodic reconcile");
    }
}
