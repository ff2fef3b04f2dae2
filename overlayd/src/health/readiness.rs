//! The readiness checks `/readyz` answers with, each naming what is wrong when it fails. A node is
//! ready when it holds its subnet, its devices are up, our iptables rules are in place, every peer
//! the leases name is programmed, and etcd answered recently.

use std::time::Instant;

use rtnetlink::packet_route::link::LinkFlags;

use super::report::{Check, PeerReport};
use super::{Health, DEFAULT_ETCD_HEARD_WITHIN};
use crate::netlink;

/// Peers the probes find unreachable: reported, but no readiness failure by itself (this node can
/// do nothing about another node's security group, and restarting it would not help).
fn unreachable_note(peers: &[PeerReport]) -> String {
    let down: Vec<String> = peers
        .iter()
        .filter_map(|p| {
            let probe = p.probe.as_ref()?;
            (probe.reachable == Some(false)).then(|| {
                format!(
                    "{} ({}): {}",
                    p.subnet,
                    p.node_name.as_deref().unwrap_or(&p.public_ip),
                    probe.cause.as_deref().unwrap_or("no reply")
                )
            })
        })
        .collect();
    if down.is_empty() {
        return String::new();
    }
    format!(
        "; {} unreachable through the overlay: {}",
        down.len(),
        down.join("; ")
    )
}

fn check(name: &str, result: Result<String, String>) -> Check {
    let (ok, detail) = match result {
        Ok(d) => (true, d),
        Err(d) => (false, d),
    };
    Check {
        name: name.into(),
        ok,
        detail,
    }
}

pub async fn checks(h: &Health, peer_reports: &[PeerReport]) -> Vec<Check> {
    let (lease, iptables, peers, etcd, devices, lease_only) = {
        let k = h.known();
        let lease_only = k.settings.as_ref().is_some_and(|s| s.lease_only);
        let within = k
            .settings
            .as_ref()
            .map_or(DEFAULT_ETCD_HEARD_WITHIN, |s| s.etcd_heard_within);
        let now = Instant::now();
        let lease = match &k.lease_report(now) {
            _ if k.refused.is_some() => Err(k.refused.clone().unwrap_or_default()),
            None => Err("no subnet leased yet (see the log for why)".to_string()),
            Some(l) if !l.held => Err(format!(
                "etcd says the lease of {} expired; leasing the same subnet again",
                l.subnet
            )),
            Some(l) => Ok(match (&l.lease_id, l.ttl_left_seconds) {
                (None, _) => format!("{} (reservation)", l.subnet),
                (Some(id), Some(ttl)) => format!("{} lease {id}, {ttl} s left", l.subnet),
                (Some(id), None) => format!("{} lease {id}", l.subnet),
            }),
        };
        let iptables = match &k.iptables {
            None => Err("our rules are not installed yet".to_string()),
            Some(Ok(())) => Ok("our chains are in place".to_string()),
            Some(Err(e)) => Err(format!("{e}; checked again every few seconds")),
        };
        let reports = k.peer_reports();
        let programmed = reports.iter().filter(|p| p.state == "programmed").count();
        let peers = match &k.last_pass {
            None => Err("the peers are not programmed yet".to_string()),
            Some((_, Some(e))) => Err(format!(
                "{programmed} of {} peers programmed; the last pass failed: {e}",
                reports.len()
            )),
            Some((_, None)) if !k.failing.is_empty() => Err(format!(
                "{programmed} of {} peers programmed; {} (retried with backoff)",
                reports.len(),
                k.failing
                    .iter()
                    .map(|(what, e)| format!("{what}: {e}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            )),
            Some((_, None)) => Ok(format!(
                "all {} peers programmed{}",
                reports.len(),
                unreachable_note(peer_reports)
            )),
        };
        let etcd = match &k.etcd {
            None => Err("not connected to etcd yet (see the log for why)".to_string()),
            Some(e) => match e.silent_for(now) {
                Some(_) if e.watching => Ok(format!("{} answers (watch stream open)", e.endpoints)),
                Some(age) if age <= within => Ok(format!(
                    "{} answered {:.0} s ago",
                    e.endpoints,
                    age.as_secs_f64()
                )),
                age => Err(format!(
                    "{} has not answered for {} (limit {} s, --etcd-heard-within){}",
                    e.endpoints,
                    age.map_or("ever".to_string(), |a| format!("{:.0} s", a.as_secs_f64())),
                    within.as_secs(),
                    e.last_error
                        .as_ref()
                        .map(|err| format!(": {err}"))
                        .unwrap_or_default()
                )),
            },
        };
        let devices = k.devices.clone();
        (lease, iptables, peers, etcd, devices, lease_only)
    };
    let mut out = vec![check("lease", lease)];
    if lease_only {
        let skipped = || Ok("not managed here (--lease-only)".to_string());
        out.push(check("devices", skipped()));
        out.push(check("iptables", skipped()));
        out.push(check("peers", skipped()));
    } else {
        let devices = match devices {
            None => Err("the VTEP and the bridge are not created yet".to_string()),
            Some((d, handle)) => {
                let mut problems = Vec::new();
                for name in [&d.vtep, &d.bridge] {
                    match netlink::link_by_name(&handle, name).await {
                        Ok(Some(m)) if m.header.flags.contains(LinkFlags::Up) => {}
                        Ok(Some(_)) => problems.push(format!("{name} is down")),
                        Ok(None) => problems.push(format!("{name} is missing")),
                        Err(e) => problems.push(format!("cannot look up {name}: {e}")),
                    }
                }
                if problems.is_empty() {
                    Ok(format!("{} and {} are up", d.vtep, d.bridge))
                } else {
                    Err(format!(
                        "{} (the daemon re-creates them within a resync interval)",
                        problems.join(", ")
                    ))
                }
            }
        };
        out.push(check("devices", devices));
        out.push(check("iptables", iptables));
        out.push(check("peers", peers));
    }
    out.push(check("etcd", etcd));
    out
}
