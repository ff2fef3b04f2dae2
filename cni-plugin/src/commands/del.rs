//! DEL: take the host veth out of service, release the IP, and delete the veth pair. Idempotent: a
//! missing netns, interface or allocation is success. Needs neither the pod's netns nor the subnet
//! file, so it works after the sandbox is gone and while overlayd is down.
//!
//! Deleting a veth costs the kernel a wait for an RCU grace period (about 20 ms, most of a DEL),
//! and nothing the runtime does next depends on it: the pod is already cut off once its host end
//! is down. So DEL answers first and the deletion finishes after (see [`crate::later`]); an ADD
//! that meets a host veth still waiting for it replaces it.

use nix::errno::Errno;
use overlay_state::IpamStore;

use crate::config::{Env, NetConf};
use crate::error::CniError;
use crate::link::{self, done};
use crate::netlink::{Kind, NlError};
use crate::netns;

/// Returns the index of the host veth left to delete, if there is one.
pub fn del(conf: &NetConf, env: &Env) -> Result<Option<u32>, CniError> {
    let store = IpamStore::new(&conf.data_dir, &conf.name)?;
    let mut host = netns::connect_here()?;
    let host_name = link::host_veth_name(&env.container_id, &env.ifname);
    let kernel =
        |e: NlError| CniError::kernel(format!("cannot take down host veth {host_name}"), e);
    // Out of service first: the IP becomes free only when nothing carries it any more. Down, the
    // pair has no carrier and the bridge forwards nothing to or from it. Set down by name and
    // looked up (for its index) in one send; both answer ENODEV when there is no such link.
    let [down, found] = host
        .batch_of([
            (link::set_down_by_name_message(&host_name), Kind::Change),
            link::get_by_name_request(&host_name),
        ])
        .map_err(kernel)?;
    let pending = match done(down) {
        Ok(()) => link::found(found).map_err(kernel)?.map(|l| l.index),
        Err(e) if e.is(Errno::ENODEV) => None,
        Err(e) => return Err(kernel(e)),
    };
    store.release(&env.key())?;
    Ok(pending)
}
