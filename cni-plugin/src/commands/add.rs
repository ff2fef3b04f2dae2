//! ADD: an IP from the node's subnet, a veth pair into the pod, the pod end configured, the host
//! end in the bridge.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::Path;

use ipnetwork::Ipv4Network;
use overlay_state::{current_boot_id, IpamStore, SubnetFile};

use crate::config::{Env, NetConf};
use crate::error::{code, CniError};
use crate::helper::SpareMaker;
use crate::link::{self, created, done, found};
use crate::netlink::{Kind, Netlink, NlError};
use crate::netns;
use crate::spec::{CniResult, Interface, IpConfig, Route};

/// Fewer spares than this left after an allocation: top them up.
const SPARES_LOW: usize = 2;

/// The result, and the helper making spare files if the store is running short of them (making
/// a file is dear, and a fork costs about 0.1 ms, so only when needed).
pub fn add(conf: &NetConf, env: &Env) -> Result<(CniResult, Option<SpareMaker>), CniError> {
    let netns_path = env
        .netns
        .as_ref()
        .ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_NETNS is required for ADD"))?;
    let subnet_file = super::read_subnet_file(conf)?;
    let store = IpamStore::new(&conf.data_dir, &conf.name)?.with_boot_id(current_boot_id());
    let pod_ns = netns::open(netns_path)?;
    let (mut host, mut pod) = netns::connect_node_and_pod(&pod_ns)?;

    let mtu = conf.mtu.unwrap_or(subnet_file.mtu);
    let gateway = subnet_file.gateway();
    let prefix = subnet_file.subnet.prefix();
    // The pod-side check and the node's bridge lookup are independent: both in flight at once.
    let kernel = |what: &'static str| move |e: NlError| CniError::kernel(what, e);
    let pod_q = pod
        .send(vec![link::get_by_name_request(&env.ifname)])
        .map_err(kernel("cannot list the pod's links"))?;
    let host_q = host
        .send(vec![link::get_by_name_request(&conf.bridge)])
        .map_err(kernel("cannot list the node's links"))?;
    let existing = pod.collect_one(pod_q);
    let bridge = host.collect_one(host_q);
    let host_name = link::host_veth_name(&env.container_id, &env.ifname);
    // Before the store changes: an interface that is not ours belongs to someone else, so it must
    // neither be touched nor have its IP released.
    if let Some(pod_link) = found(existing).map_err(kernel("cannot list the pod's links"))? {
        take_over(&mut host, &pod_link, &host_name, env, netns_path)?;
    }
    // Making the node's bridge is no change to the pod, and every ADD needs it anyway.
    let bridge = found(bridge)
        .and_then(|b| link::ensure_bridge(&mut host, b, &conf.bridge, gateway, prefix, mtu))
        .map_err(|e| CniError::kernel(format!("cannot set up bridge {}", conf.bridge), e))?;

    let key = env.key();
    // On a full subnet the store reclaims allocations whose host veth is gone: one dump.
    // A dump interrupted by changes is made again (a few times at most); failing that, nothing
    // is reclaimed.
    let mut links = || {
        (0..3).find_map(|_| {
            link::all(&mut host)
                .ok()
                .map(|ls| ls.into_iter().map(|l| l.name).collect())
        })
    };
    let allocated = store.allocate_or_reclaim(subnet_file.subnet, &key, &mut links)?;
    for r in &allocated.reclaimed {
        // The runtime keeps the plugin's stderr in its log; the store keeps reclaim.log.
        eprintln!("overlay: reclaimed {r}");
    }
    let ip = allocated.ip;
    // Made while the pod is wired; waited for before the plugin exits (also on an error here).
    let spare_maker = allocated
        .spares_left
        .is_some_and(|n| n < SPARES_LOW)
        .then(|| SpareMaker::start(&store))
        .flatten();
    let attached = attach(
        conf,
        env,
        &subnet_file,
        &mut Attachment {
            host: &mut host,
            pod: &mut pod,
            pod_ns: &pod_ns,
            host_name: &host_name,
            bridge_index: bridge.index,
            ip,
            mtu,
        },
    );
    // Wired: the allocation must still be ours (see IpamStore::holds).
    let attached = attached.and_then(|links| match store.holds(&key, ip) {
        Ok(true) => Ok(links),
        Ok(false) => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            format!(
                "{ip} was reclaimed while this ADD was wiring the pod (it took longer than {}s); \
                 try again",
                overlay_state::ipam_store::RECLAIM_GRACE.as_secs()
            ),
        )),
        Err(e) => Err(e.into()),
    });
    let (host_mac, pod_mac) = match attached {
        Ok(links) => links,
        Err(e) => {
            // Undo in reverse so the IP is free only once no interface carries it.
            let _ = link::delete_by_name(&mut host, &host_name);
            let _ = store.release(&key);
            return Err(e);
        }
    };

    let wired = Wired {
        bridge_mac: bridge.mac.clone(),
        host_name: host_name.clone(),
        host_mac,
        pod_mac,
        ip,
        mtu,
    };
    Ok((
        result_for(conf, env, &subnet_file, netns_path, wired),
        spare_maker,
    ))
}

/// What ADD made: the names, MACs and address the result reports.
pub struct Wired {
    pub bridge_mac: String,
    pub host_name: String,
    pub host_mac: String,
    pub pod_mac: String,
    pub ip: Ipv4Addr,
    pub mtu: u32,
}

/// ADD's result: the bridge, the host veth and the pod's interface, the pod's address and routes,
/// after whatever the previous plugin of a chain reported. No kernel, no file: the fuzz target
/// calls it too.
pub fn result_for(
    conf: &NetConf,
    env: &Env,
    subnet_file: &SubnetFile,
    netns_path: &Path,
    w: Wired,
) -> CniResult {
    let ours = CniResult {
        interfaces: vec![
            Interface {
                name: conf.bridge.clone(),
                mac: w.bridge_mac,
                ..Default::default()
            },
            Interface {
                name: w.host_name,
                mac: w.host_mac,
                ..Default::default()
            },
            Interface {
                name: env.ifname.clone(),
                mac: w.pod_mac,
                mtu: Some(w.mtu),
                sandbox: Some(netns_path.display().to_string()),
                ..Default::default()
            },
        ],
        ips: vec![IpConfig {
            address: format!("{}/{}", w.ip, subnet_file.subnet.prefix()),
            gateway: Some(subnet_file.gateway().to_string()),
            interface: Some(2),
            ..Default::default()
        }],
        routes: pod_routes(conf, subnet_file)
            .into_iter()
            .map(|(dst, gw)| Route {
                dst: dst.to_string(),
                gw: Some(gw.to_string()),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    merge(conf.prev_result.clone(), ours)
}

/// The pod already has an interface called `CNI_IFNAME`. If it is the peer of this attachment's
/// host veth, it is what an earlier ADD or DEL of the same attachment left (a DEL answers before
/// the pair is gone, an ADD may have been killed, or the runtime repeats an ADD): the pair is
/// deleted and made again, and the store gives the attachment back the IP it still holds.
/// Anything else is someone else's interface: code 101, nothing touched.
fn take_over(
    host: &mut Netlink,
    pod_link: &link::Link,
    host_name: &str,
    env: &Env,
    netns_path: &Path,
) -> Result<(), CniError> {
    let kernel = |what: &'static str| move |e: NlError| CniError::kernel(what, e);
    let host_link =
        link::by_name(host, host_name).map_err(kernel("cannot list the node's links"))?;
    // Each end names the other's index: a pair with one end in each namespace, so not a chance
    // match of indexes from two namespaces.
    let ours = host_link.is_some_and(|h| {
        h.kind_is_veth
            && pod_link.kind_is_veth
            && h.peer == Some(pod_link.index)
            && pod_link.peer == Some(h.index)
    });
    if !ours {
        return Err(CniError::new(
            code::INTERFACE_EXISTS,
            format!(
                "interface {} already exists in netns {} and is not this attachment's veth \
                 (its host end would be {host_name}); remove it or use another CNI_IFNAME",
                env.ifname,
                netns_path.display()
            ),
        ));
    }
    link::delete_by_name(host, host_name)
        .map_err(kernel("cannot remove this attachment's old veth pair"))?;
    Ok(())
}

struct Attachment<'a> {
    host: &'a mut Netlink,
    pod: &'a mut Netlink,
    pod_ns: &'a File,
    host_name: &'a str,
    bridge_index: u32,
    ip: Ipv4Addr,
    mtu: u32,
}

/// The routes the pod gets: a default route via the gateway, or only the cluster network when
/// another interface owns the default.
fn pod_routes(conf: &NetConf, subnet_file: &SubnetFile) -> Vec<(Ipv4Network, Ipv4Addr)> {
    let gw = subnet_file.gateway();
    if conf.is_default_gateway {
        vec![(
            Ipv4Network::new(Ipv4Addr::UNSPECIFIED, 0).unwrap_or(subnet_file.network),
            gw,
        )]
    } else {
        vec![(subnet_file.network, gw)]
    }
}

/// The pair made and configured. Returns the MACs of the host end and the pod's interface.
fn attach(
    conf: &NetConf,
    env: &Env,
    subnet_file: &SubnetFile,
    a: &mut Attachment<'_>,
) -> Result<(String, String), CniError> {
    let kernel = |what: &'static str| move |e: NlError| CniError::kernel(what, e);
    let host_end = link::VethEnd {
        name: a.host_name,
        mac: link::host_veth_mac(&env.container_id, &env.ifname),
    };
    let pod_end = link::VethEnd {
        name: &env.ifname,
        mac: link::ip_mac(a.ip),
    };
    let create = || link::create_veth_message(&host_end, &pod_end, a.pod_ns, a.mtu, a.bridge_index);
    match a.host.request(create(), Kind::Create) {
        Ok(_) => {}
        // The host end's name derives from (container id, ifname), and the pod has no such
        // interface (checked above): this is what an ADD killed halfway, or a DEL whose deletion
        // has not finished yet, left. Replace it.
        Err(e) if e.is(nix::errno::Errno::EEXIST) => {
            link::delete_by_name(a.host, a.host_name)
                .map_err(kernel("cannot remove a leftover host veth"))?;
            done(a.host.request(create(), Kind::Create))
                .map_err(kernel("cannot create the veth pair"))?;
        }
        Err(e) => return Err(kernel("cannot create the veth pair")(e)),
    }
    // The host's hairpin and the pod's side are independent: in flight together.
    let hairpin = if conf.hairpin_mode {
        Some(
            a.host
                .send(vec![(
                    link::hairpin_message(a.host_name, true),
                    Kind::Change,
                )])
                .map_err(kernel("cannot turn on hairpin mode on the host veth"))?,
        )
    } else {
        None
    };
    let pod_link = link::by_name(a.pod, &env.ifname)
        .map_err(kernel("cannot read the pod's interface"))?
        .ok_or_else(|| CniError::new(code::KERNEL, "the pod's interface vanished"))?;
    // Address (with the subnet's prefix, so the kernel adds the on-link route the gateway is
    // reached by), up, then the routes via the gateway: one send, applied in this order.
    let mut requests = vec![
        (
            link::address_message(pod_link.index, a.ip, subnet_file.subnet.prefix()),
            Kind::Create,
        ),
        (link::set_up_message(pod_link.index), Kind::Change),
    ];
    for (dst, gw) in pod_routes(conf, subnet_file) {
        let dst = (dst.prefix() > 0).then(|| (dst.network(), dst.prefix()));
        requests.push((link::route_message(dst, gw, pod_link.index), Kind::Create));
    }
    let routes = requests.len() - 2;
    let mut replies = a
        .pod
        .batch(requests)
        .map_err(kernel("cannot configure the pod's interface"))?
        .into_iter();
    let mut next = || {
        replies
            .next()
            .unwrap_or_else(|| Err(NlError::Decode("missing answer".into())))
    };
    done(next()).map_err(kernel("cannot add the pod's address"))?;
    done(next()).map_err(kernel("cannot bring the pod's interface up"))?;
    for _ in 0..routes {
        created(next()).map_err(kernel("cannot add the pod's route"))?;
    }
    if let Some(q) = hairpin {
        done(a.host.collect_one(q))
            .map_err(kernel("cannot turn on hairpin mode on the host veth"))?;
    }
    Ok((link::format_mac(&host_end.mac), pod_link.mac))
}

/// Chained after another plugin: our interfaces, IPs and routes are appended to its result (IP
/// interface indexes shifted accordingly); its DNS and anything else are kept.
fn merge(prev: Option<CniResult>, mut ours: CniResult) -> CniResult {
    let Some(mut prev) = prev else {
        return ours;
    };
    let offset = prev.interfaces.len();
    for ip in &mut ours.ips {
        ip.interface = ip.interface.map(|i| i + offset);
    }
    prev.interfaces.append(&mut ours.interfaces);
    prev.ips.append(&mut ours.ips);
    prev.routes.append(&mut ours.routes);
    prev
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_shifts_interface_indexes() {
        let prev = CniResult {
            interfaces: vec![Interface {
                name: "a".into(),
                ..Default::default()
            }],
            dns: Some(serde_json::json!({"nameservers": ["10.96.0.10"]})),
            ..Default::default()
        };
        let ours = CniResult {
            interfaces: vec![
                Interface::default(),
                Interface::default(),
                Interface::default(),
            ],
            ips: vec![IpConfig {
                interface: Some(2),
                ..Default::default()
            }],
            ..Default::default()
        };
        let m = merge(Some(prev), ours);
        assert_eq!(m.interfaces.len(), 4);
        assert_eq!(m.ips[0].interface, Some(3));
        assert!(m.dns.is_some());
    }
}
