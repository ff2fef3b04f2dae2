//! DEL: remove the host veth (its pod end goes with it) and release the IP. Idempotent: a missing
//! netns, interface or allocation is success. Needs neither the pod's netns nor the subnet file,
//! so it works after the sandbox is gone and while overlayd is down.

use overlay_state::IpamStore;

use crate::config::{Env, NetConf};
use crate::error::CniError;
use crate::link;
use crate::netns;

pub async fn del(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    let store = IpamStore::new(&conf.data_dir, &conf.name)?;
    let host = netns::connect_here()?;
    let host_name = link::host_veth_name(&env.container_id, &env.ifname);
    // Interface first: the IP becomes free only when nothing carries it any more.
    link::delete_by_name(&host, &host_name)
        .await
        .map_err(|e| CniError::kernel(format!("cannot delete host veth {host_name}"), e))?;
    store.release(&env.key())?;
    Ok(())
}
