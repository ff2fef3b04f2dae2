//! CHECK: the pod's interface, address and routes are still what the previous result says, the
//! IP is still allocated to this attachment, and the host end is still in the bridge.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use overlay_state::IpamStore;

use crate::config::{Env, NetConf};
use crate::error::{code, CniError};
use crate::link;
use crate::netlink::NlError;
use crate::netns;

fn mismatch(msg: String) -> CniError {
    CniError::new(code::CHECK_MISMATCH, msg)
}

pub fn check(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    if !conf.version.supports_check() {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "CHECK needs cniVersion 0.4.0 or later, the config says {}",
                conf.version.as_str()
            ),
        ));
    }
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "CHECK needs \"prevResult\" in the network config",
        )
    })?;
    let netns_path = env
        .netns
        .as_ref()
        .ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_NETNS is required for CHECK"))?;
    let (if_index, iface) = prev
        .interfaces
        .iter()
        .enumerate()
        .find(|(_, i)| i.name == env.ifname && i.sandbox.is_some())
        .ok_or_else(|| {
            mismatch(format!(
                "prevResult has no interface {} in a sandbox",
                env.ifname
            ))
        })?;

    let pod_ns = netns::open(netns_path)?;
    let (mut host, mut pod) = netns::connect_node_and_pod(&pod_ns)?;
    let kernel = |what: &'static str| move |e: NlError| CniError::kernel(what, e);
    let pod_link = link::by_name(&mut pod, &env.ifname)
        .map_err(kernel("cannot list the pod's links"))?
        .ok_or_else(|| {
            mismatch(format!(
                "interface {} is missing from netns {}",
                env.ifname,
                netns_path.display()
            ))
        })?;
    if !iface.mac.is_empty() && !iface.mac.eq_ignore_ascii_case(&pod_link.mac) {
        return Err(mismatch(format!(
            "interface {} has MAC {}, prevResult says {}",
            env.ifname, pod_link.mac, iface.mac
        )));
    }
    if !pod_link.up {
        return Err(mismatch(format!("interface {} is down", env.ifname)));
    }

    let have = link::addresses(&mut pod, pod_link.index)
        .map_err(kernel("cannot list the pod's addresses"))?;
    let mut our_ip = None;
    for ip in prev.ips.iter().filter(|ip| ip.interface == Some(if_index)) {
        let Ok(net) = ip.address.parse::<Ipv4Network>() else {
            continue; // IPv6 or foreign: not ours to check
        };
        if !have.contains(&(net.ip(), net.prefix())) {
            return Err(mismatch(format!(
                "address {} is missing from {}",
                ip.address, env.ifname
            )));
        }
        our_ip = Some(net.ip());
    }

    let routes = link::routes(&mut pod).map_err(kernel("cannot list the pod's routes"))?;
    for r in &prev.routes {
        let Ok(dst) = r.dst.parse::<Ipv4Network>() else {
            continue;
        };
        let gw: Option<Ipv4Addr> = r.gw.as_deref().and_then(|g| g.parse().ok());
        let found = routes.iter().any(|(d, len, g, _)| {
            *d == dst.network() && *len == dst.prefix() && (gw.is_none() || *g == gw)
        });
        if !found {
            return Err(mismatch(format!(
                "route {}{} is missing in the pod",
                r.dst,
                r.gw.as_ref()
                    .map(|g| format!(" via {g}"))
                    .unwrap_or_default()
            )));
        }
    }

    if let Some(ip) = our_ip {
        let store = IpamStore::new(&conf.data_dir, &conf.name)?;
        if store.find(&env.key())? != Some(ip) {
            return Err(mismatch(format!(
                "{ip} is not allocated to container {} / {} in the IPAM store {}",
                env.container_id,
                env.ifname,
                store.dir().display()
            )));
        }
    }

    let host_name = link::host_veth_name(&env.container_id, &env.ifname);
    let [host_link, bridge] = host
        .batch_of([
            link::get_by_name_request(&host_name),
            link::get_by_name_request(&conf.bridge),
        ])
        .map_err(kernel("cannot list the host's links"))?;
    let host_link = link::found(host_link)
        .map_err(kernel("cannot list the host's links"))?
        .ok_or_else(|| mismatch(format!("host veth {host_name} is missing")))?;
    let bridge = link::found(bridge)
        .map_err(kernel("cannot list the host's links"))?
        .ok_or_else(|| mismatch(format!("bridge {} is missing", conf.bridge)))?;
    if host_link.controller != Some(bridge.index) {
        return Err(mismatch(format!(
            "host veth {host_name} is not attached to bridge {}",
            conf.bridge
        )));
    }
    Ok(())
}
