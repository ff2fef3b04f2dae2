//! The daemon's `/status` as text for a person, most important first.

use std::fmt::Write;
use std::net::SocketAddr;

use crate::health::report::StatusReport;

pub fn render(r: &StatusReport, addr: SocketAddr) -> String {
    let mut o = String::new();
    let node = r.node.as_ref().map_or("this node", |n| n.name.as_str());
    let failing: Vec<&str> = r
        .checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| c.name.as_str())
        .collect();
    if r.ready {
        let _ = writeln!(o, "overlayd on {node} is running and READY ({addr})");
    } else {
        let _ = writeln!(
            o,
            "overlayd on {node} is running but NOT READY: {} ({addr})",
            failing.join(", ")
        );
    }
    for c in &r.checks {
        let mark = if c.ok { "ok  " } else { "FAIL" };
        let _ = writeln!(o, "  {mark} {}: {}", c.name, c.detail);
    }
    if let Some(c) = &r.config {
        let _ = writeln!(
            o,
            "config: network {} /{} subnets, VNI {}, UDP {}, MTU {}, ip-masq {}, lease TTL {} s{}",
            c.network,
            c.subnet_len,
            c.vni,
            c.port,
            c.mtu,
            if c.ip_masq { "on" } else { "off" },
            c.lease_ttl_seconds,
            if c.lease_only { ", lease only" } else { "" }
        );
    }
    if let Some(n) = &r.node {
        let _ = writeln!(
            o,
            "node: {} on {} {} (VTEP MAC {})",
            n.name, n.iface, n.public_ip, n.vtep_mac
        );
    }
    match &r.lease {
        Some(l) => {
            let what = match (&l.lease_id, l.ttl_left_seconds) {
                (None, _) => "reservation, never expires".to_string(),
                (Some(id), Some(t)) => format!("lease {id}, {t} s left"),
                (Some(id), None) => format!("lease {id}"),
            };
            let held = if l.held { "" } else { " - NOT HELD" };
            let _ = writeln!(o, "subnet: {} ({what}){held}", l.subnet);
        }
        None => {
            let _ = writeln!(o, "subnet: none leased yet");
        }
    }
    let _ = writeln!(
        o,
        "etcd: {} prefix {}, {}{}",
        r.etcd.endpoints,
        r.etcd.prefix,
        match r.etcd.last_contact_seconds_ago {
            _ if r.etcd.watch_stream_open => "watching (stream open)".to_string(),
            Some(s) => format!("last answered {s:.0} s ago"),
            None => "never answered".to_string(),
        },
        r.etcd
            .last_error
            .as_ref()
            .map(|e| format!("; last error: {e}"))
            .unwrap_or_default()
    );
    if let Some(d) = &r.devices {
        let _ = writeln!(o, "devices: {} and {}, MTU {}", d.vtep, d.bridge, d.mtu);
    }
    let _ = writeln!(o, "peers ({}):", r.peers.len());
    for p in &r.peers {
        let probe = match &p.probe {
            None => String::new(),
            Some(pr) => match (pr.reachable, pr.rtt_ms) {
                (Some(true), Some(rtt)) => format!(", answers ({rtt:.2} ms)"),
                (Some(true), None) => ", answers".to_string(),
                (Some(false), _) => format!(
                    ", UNREACHABLE for {:.0} s: {}",
                    pr.since_seconds,
                    pr.cause.as_deref().unwrap_or("no reply")
                ),
                (None, _) => ", not probed yet".to_string(),
            },
        };
        let _ = writeln!(
            o,
            "  {:<18} {:<16} {:<24} {}{}{probe}",
            p.subnet,
            p.public_ip,
            p.node_name.as_deref().unwrap_or("-"),
            p.state,
            if p.direct { " (direct)" } else { "" }
        );
    }
    if r.ipam.is_empty() {
        let _ = writeln!(o, "pod addresses: none allocated (no IPAM store yet)");
    }
    for u in &r.ipam {
        match (u.allocated, &u.error) {
            (Some(n), _) => {
                let full = if n >= u.capacity {
                    " - FULL: new pods on this node fail"
                } else {
                    ""
                };
                // Live pods and leftovers apart: a full subnet of leftovers heals itself.
                let split = match (u.live, u.reclaimable, u.starting) {
                    (Some(live), Some(left), Some(starting)) => format!(
                        ": {live} live pods, {left} reclaimable leftovers of sandboxes gone \
                         without DEL, {starting} starting; {} reclaimed so far",
                        u.reclaimed_total
                    ),
                    _ => String::new(),
                };
                let _ = writeln!(
                    o,
                    "pod addresses (network {}): {n} of {} allocated{split}{full}",
                    u.network, u.capacity
                );
            }
            (None, e) => {
                let _ = writeln!(
                    o,
                    "pod addresses (network {}): {}",
                    u.network,
                    e.as_deref().unwrap_or("unknown")
                );
            }
        }
    }
    let _ = writeln!(
        o,
        "repairs: {} data plane, {} iptables",
        r.repairs.dataplane, r.repairs.iptables
    );
    for e in &r.repairs.recent {
        let _ = writeln!(o, "  {:.0} s ago: {}", e.seconds_ago, e.what);
    }
    o
}
