//! Kernel switches and MTUs, read in this network namespace (they are per namespace, so the lab
//! can break one node without touching the host).

use std::collections::HashMap;
use std::path::Path;

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};

use super::{Context, Finding};
use crate::config::VXLAN_OVERHEAD;
use crate::node;

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// The VTEP: `overlay.<VNI>` as the daemon names it (the VNI from its status when it answers).
fn vtep_name(cx: &Context) -> Option<String> {
    if let Ok(s) = &cx.status {
        if let Some(d) = &s.devices {
            return Some(d.vtep.clone());
        }
    }
    let entries = std::fs::read_dir("/sys/class/net").ok()?;
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.starts_with("overlay."))
        .collect();
    names.sort();
    names.into_iter().next()
}

pub fn sysctls(cx: &Context) -> Vec<Finding> {
    let mut out = Vec::new();
    let bridge_nf = "/proc/sys/net/bridge/bridge-nf-call-iptables";
    out.push(
        if !Path::new("/sys/module/br_netfilter").exists() && !Path::new(bridge_nf).exists() {
            Finding::fail(
                "br-netfilter",
                "br_netfilter is not loaded: kube-proxy's Service rules never see traffic between pods on one node",
                "modprobe br_netfilter (the DaemonSet's node-setup init container does; it needs /lib/modules mounted)",
            )
        } else {
            match read(bridge_nf).as_deref() {
                Some("1") => Finding::pass("br-netfilter", "loaded, net.bridge.bridge-nf-call-iptables = 1"),
                v => Finding::fail(
                    "br-netfilter",
                    format!(
                        "net.bridge.bridge-nf-call-iptables = {}: Services do not work between pods on this node",
                        v.unwrap_or("unreadable")
                    ),
                    "sysctl -w net.bridge.bridge-nf-call-iptables=1, and restart the overlayd pod (its init container sets it)",
                ),
            }
        },
    );
    out.push(match read("/proc/sys/net/ipv4/ip_forward").as_deref() {
        Some("1") => Finding::pass("ip-forward", "net.ipv4.ip_forward = 1"),
        v => Finding::fail(
            "ip-forward",
            format!(
                "net.ipv4.ip_forward = {}: the node does not forward pod traffic",
                v.unwrap_or("unreadable")
            ),
            "sysctl -w net.ipv4.ip_forward=1 (and persist it in /etc/sysctl.d), then restart the overlayd pod",
        ),
    });
    // The kernel applies the larger of `all` and the device's value; 1 (strict) drops replies
    // that come back over the tunnel from pods on other nodes.
    let all = read("/proc/sys/net/ipv4/conf/all/rp_filter").and_then(|v| v.parse::<u8>().ok());
    let mut strict = Vec::new();
    let mut seen = Vec::new();
    for dev in vtep_name(cx).into_iter().chain([cx.args.bridge.clone()]) {
        let Some(v) = read(&format!("/proc/sys/net/ipv4/conf/{dev}/rp_filter"))
            .and_then(|v| v.parse::<u8>().ok())
        else {
            continue;
        };
        let effective = v.max(all.unwrap_or(0));
        seen.push(format!("{dev} {effective}"));
        if effective == 1 {
            strict.push(dev);
        }
    }
    out.push(if seen.is_empty() {
        Finding::skip("rp-filter", "neither the VTEP nor the bridge exists yet")
    } else if strict.is_empty() {
        Finding::pass("rp-filter", format!("not strict ({})", seen.join(", ")))
    } else {
        Finding::fail(
            "rp-filter",
            format!(
                "strict reverse-path filtering (rp_filter = 1) on {}: replies from pods on other nodes are dropped",
                strict.join(", ")
            ),
            format!(
                "sysctl -w net.ipv4.conf.all.rp_filter=2 and set 2 (loose) or 0 on {} (e.g. in /etc/sysctl.d)",
                strict.join(", ")
            ),
        )
    });
    out
}

struct Link {
    name: String,
    mtu: u32,
    controller: Option<u32>,
}

async fn links(handle: &rtnetlink::Handle) -> Result<HashMap<u32, Link>, rtnetlink::Error> {
    let mut out = HashMap::new();
    let mut s = handle.link().get().execute();
    while let Some(m) = s.try_next().await? {
        out.insert(m.header.index, link(&m));
    }
    Ok(out)
}

fn link(m: &LinkMessage) -> Link {
    let mut l = Link {
        name: String::new(),
        mtu: 0,
        controller: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name.clone_from(n),
            LinkAttribute::Mtu(v) => l.mtu = *v,
            LinkAttribute::Controller(c) => l.controller = Some(*c),
            _ => {}
        }
    }
    l
}

/// VTEP ≤ underlay − 50 (the VXLAN header), bridge and pods' host veths ≤ VTEP: a packet bigger than
/// the path is dropped silently when it carries DF, which stalls TCP after the handshake.
pub async fn mtu(cx: &Context) -> Finding {
    const CHECK: &str = "mtu";
    let Ok((conn, handle, _)) = rtnetlink::new_connection() else {
        return Finding::fail(
            CHECK,
            "cannot open a netlink socket",
            "run as root (or with CAP_NET_ADMIN)",
        );
    };
    tokio::spawn(conn);
    let node = match node::discover(&handle, &cx.args.node, 1).await {
        Ok(n) => n,
        Err(e) => {
            return Finding::fail(
                CHECK,
                format!("cannot find the underlay: {e}"),
                "pass --iface",
            )
        }
    };
    let all = match links(&handle).await {
        Ok(l) => l,
        Err(e) => return Finding::fail(CHECK, format!("cannot list links: {e}"), "run as root"),
    };
    let Some(vtep_name) = vtep_name(cx) else {
        return Finding::skip(CHECK, "no VTEP yet (overlayd has not set up this node)");
    };
    let Some((_, vtep)) = all.iter().find(|(_, l)| l.name == vtep_name) else {
        return Finding::skip(CHECK, format!("no {vtep_name} yet"));
    };
    let limit = node.iface_mtu.saturating_sub(VXLAN_OVERHEAD);
    let mut problems = Vec::new();
    if vtep.mtu > limit {
        problems.push(format!(
            "{} MTU {} > {} ({} MTU {} − {VXLAN_OVERHEAD} VXLAN overhead)",
            vtep.name, vtep.mtu, limit, node.iface, node.iface_mtu
        ));
    }
    let bridge = all.iter().find(|(_, l)| l.name == cx.args.bridge);
    if let Some((index, b)) = bridge {
        if b.mtu > vtep.mtu {
            problems.push(format!(
                "{} MTU {} > {} MTU {}",
                b.name, b.mtu, vtep.name, vtep.mtu
            ));
        }
        let mut big: Vec<String> = all
            .values()
            .filter(|l| l.controller == Some(*index) && l.mtu > vtep.mtu)
            .map(|l| format!("{} ({})", l.name, l.mtu))
            .collect();
        big.sort();
        if !big.is_empty() {
            problems.push(format!(
                "pod veths with an MTU above {} MTU {}: {}",
                vtep.name,
                vtep.mtu,
                big.join(", ")
            ));
        }
    }
    if let Ok(f) = &cx.subnet_file {
        if f.mtu > vtep.mtu {
            problems.push(format!(
                "the subnet file gives pods MTU {} > {} MTU {}",
                f.mtu, vtep.name, vtep.mtu
            ));
        }
    }
    if problems.is_empty() {
        Finding::pass(
            CHECK,
            format!(
                "{} {} ≤ {} {} − {VXLAN_OVERHEAD}; bridge and pods not above it",
                vtep.name, vtep.mtu, node.iface, node.iface_mtu
            ),
        )
    } else {
        Finding::fail(
            CHECK,
            problems.join("; "),
            "leave Backend.MTU unset (overlayd derives underlay − 50), or set it to at most the underlay MTU − 50; restart the overlayd pod, then recreate pods made with the old MTU",
        )
    }
}
