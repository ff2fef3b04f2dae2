//! nftables' change notifications (NFNLGRP_NFTABLES), so the iptables check runs when a ruleset
//! changed rather than every few seconds. With the nf_tables backend every `iptables-restore` (kube-
//! proxy's syncs, an operator's flush, our own writes) is a batch of nftables messages the kernel
//! multicasts to this group; the legacy backend has no such thing and keeps being polled.
//!
//! Only the fact that something changed is passed on: the check that follows reads our own chains
//! and the two built-in ones it cares about, whatever the notification said.

use rtnetlink::sys::{AsyncSocket, AsyncSocketExt, TokioSocket};
use tokio::sync::mpsc;
use tracing::debug;

/// NETLINK_NETFILTER in linux/netlink.h.
const NETLINK_NETFILTER: isize = 12;
/// NFNLGRP_NFTABLES in linux/netfilter/nfnetlink.h.
const NFNLGRP_NFTABLES: u32 = 7;
/// ENOBUFS: the socket's queue overflowed and notifications were lost, which is still news.
const ENOBUFS: i32 = 105;

/// Starts listening in the current network namespace; `None` when the socket cannot be opened or
/// joined (no nf_tables, or no CAP_NET_ADMIN): the caller then polls. The receiver yields once per
/// burst of changes (a full channel of one coalesces them).
pub fn spawn() -> Option<mpsc::Receiver<()>> {
    let mut socket = match TokioSocket::new(NETLINK_NETFILTER) {
        Ok(s) => s,
        Err(e) => {
            debug!("no nftables notifications ({e}); iptables is polled");
            return None;
        }
    };
    let joined = socket
        .socket_mut()
        .bind_auto()
        .and_then(|_| socket.socket_mut().add_membership(NFNLGRP_NFTABLES));
    if let Err(e) = joined {
        debug!("no nftables notifications ({e}); iptables is polled");
        return None;
    }
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            match socket.recv_from_full().await {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(ENOBUFS) => {}
                Err(e) => {
                    debug!("nftables notifications stopped ({e}); iptables is polled");
                    return;
                }
            }
            if let Err(mpsc::error::TrySendError::Closed(())) = tx.try_send(()) {
                return;
            }
        }
    });
    Some(rx)
}
