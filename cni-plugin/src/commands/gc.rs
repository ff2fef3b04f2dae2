//! GC: release every allocation of this network that is not among the runtime's valid
//! attachments, and remove the host veths nothing valid uses: those of the released allocations,
//! and those DEL left down in the bridge (see [`super::del`]).

use std::collections::HashSet;

use overlay_state::{AttachmentKey, IpamStore};

use crate::config::NetConf;
use crate::error::{code, CniError};
use crate::link;
use crate::netns;

pub fn gc(conf: &NetConf) -> Result<(), CniError> {
    // Without the list every allocation would look stale; refuse rather than strand every pod.
    let valid: &[AttachmentKey] = conf.valid_attachments.as_deref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "GC needs \"cni.dev/valid-attachments\" in the network config",
        )
    })?;
    let store = IpamStore::new(&conf.data_dir, &conf.name)?;
    let released = store.gc(|k| valid.contains(k))?;
    let released: HashSet<String> = released
        .into_iter()
        .filter_map(|a| a.key)
        .map(|k| link::host_veth_name(&k.container_id, &k.ifname))
        .collect();
    let keep: HashSet<String> = valid
        .iter()
        .map(|k| link::host_veth_name(&k.container_id, &k.ifname))
        .collect();
    let mut host = netns::connect_here()?;
    let links =
        link::all(&mut host).map_err(|e| CniError::kernel("cannot list the node's links", e))?;
    let bridge = links
        .iter()
        .find(|l| l.name == conf.bridge)
        .map(|b| b.index);
    for l in &links {
        // Down in our bridge under our naming: what DEL leaves. An up one may be another network's
        // sharing the bridge, so only those of allocations released here are removed up.
        let left_by_del = link::is_host_veth_name(&l.name)
            && l.kind_is_veth
            && !l.up
            && bridge.is_some()
            && l.controller == bridge
            && !keep.contains(&l.name);
        if left_by_del || released.contains(&l.name) {
            // Best effort: GC must release IPs even if one link cannot be removed.
            let _ = link::delete_by_index(&mut host, l.index);
        }
    }
    Ok(())
}
