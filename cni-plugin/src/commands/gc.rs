//! GC: release every allocation of this network that is not among the runtime's valid
//! attachments, and remove the host veth such an allocation may still have.

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
    if released.iter().any(|a| a.key.is_some()) {
        let mut host = netns::connect_here()?;
        for a in released {
            if let Some(k) = a.key {
                let name = link::host_veth_name(&k.container_id, &k.ifname);
                // Best effort: GC must release IPs even if one link cannot be removed.
                let _ = link::delete_by_name(&mut host, &name);
            }
        }
    }
    Ok(())
}
