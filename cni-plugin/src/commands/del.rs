//! DEL: take the host veth out of service and release the IP. Idempotent: a missing netns,
//! interface or allocation is success. Needs neither the pod's netns nor the subnet file, so it
//! works after the sandbox is gone and while overlayd is down.
//!
//! DEL does not delete the veth pair. Deleting one makes the caller wait for an RCU grace period
//! (about 20 ms, ten times the rest of a DEL), and nothing the runtime does next depends on it:
//! the pod is cut off once its host end is down. A process left to delete it after the answer
//! would be adopted by the runtime's reaper and stay a zombie under one that never reaps (issue
//! 11). So whoever meets the pair next deletes it: the runtime removing the pod's netns right
//! after DEL (containerd and CRI-O do; the kernel then deletes the pair in the background), an
//! ADD of the same attachment (which takes its pair over), or GC (which removes every host veth
//! DEL left down).

use nix::errno::Errno;
use overlay_state::IpamStore;

use crate::config::{Env, NetConf};
use crate::error::CniError;
use crate::link::{self, done};
use crate::netlink::Kind;
use crate::netns;

pub fn del(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    let store = IpamStore::new(&conf.data_dir, &conf.name)?;
    let mut host = netns::connect_here()?;
    let host_name = link::host_veth_name(&env.container_id, &env.ifname);
    // Out of service first: the IP becomes free only when nothing carries it any more. Down, the
    // pair has no carrier and the bridge forwards nothing to or from it. ENODEV: no such link.
    match done(host.request(link::set_down_by_name_message(&host_name), Kind::Change)) {
        Ok(()) => {}
        Err(e) if e.is(Errno::ENODEV) => {}
        Err(e) => {
            return Err(CniError::kernel(
                format!("cannot take down host veth {host_name}"),
                e,
            ))
        }
    }
    store.release(&env.key())?;
    Ok(())
}
