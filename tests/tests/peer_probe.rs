//! Peer probes through the overlay, with the daemon's defaults (30 s interval): a node whose
//! VXLAN port is blocked is reported unreachable within 60 s — in /status, the /readyz detail
//! (still ready), the log and /metrics — with the cause named, and cleared once unblocked; a peer
//! whose etcd lease is not being renewed is told apart as stale.

use std::time::{Duration, Instant};

use overlay_testlab::lab::{Lab, DEFAULT_CONFIG, PREFIX};
use overlay_testlab::{bin, require_root, wait_for};
use serde_json::Value;

const PORT: u16 = 9472;

fn status(lab: &Lab) -> Value {
    let out = lab.nodes[0]
        .ns
        .cmd(bin("overlayd").to_str().expect("utf8"))
        .args(["status", "--output", "json"])
        .env("OVERLAYD_METRICS_ADDR", format!("127.0.0.1:{PORT}"))
        .output()
        .expect("overlayd status");
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// node0's view of the peer with `subnet`: (reachable, cause).
fn probe_of(lab: &Lab, subnet: &str) -> Option<(Option<bool>, Option<String>)> {
    let j = status(lab);
    let p = j["peers"]
        .as_array()?
        .iter()
        .find(|p| p["subnet"] == subnet)?
        .clone();
    Some((
        p["probe"]["reachable"].as_bool(),
        p["probe"]["cause"].as_str().map(str::to_string),
    ))
}

fn metric(lab: &Lab, name: &str) -> Option<f64> {
    let (_, body) = lab.http_get(0, PORT, "/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn a_node_behind_a_blocked_vxlan_port_is_reported_within_60_s_and_clears() {
    if !require_root("a_node_behind_a_blocked_vxlan_port_is_reported_within_60_s_and_clears") {
        return;
    }
    let mut lab = Lab::new(DEFAULT_CONFIG);
    lab.add_node(&["--metrics-addr", &format!("127.0.0.1:{PORT}")]);
    lab.add_node(&[]);
    let s1 = lab.subnet(1).to_string();
    wait_for(
        "node1 answering node0's probes",
        Duration::from_secs(60),
        || (probe_of(&lab, &s1)?.0 == Some(true)).then_some(()),
    );
    assert_eq!(metric(&lab, "overlayd_peers_reachable"), Some(1.0));
    assert!(metric(&lab, "overlayd_probe_rtt_seconds_count").unwrap_or(0.0) >= 1.0);

    // What a security group without UDP 8472 does: node1 drops every VXLAN packet it receives.
    let block = ["-p", "udp", "--dport", "8472", "-j", "DROP"];
    assert!(lab.nodes[1]
        .ns
        .ok("iptables", &[&["-I", "INPUT"][..], &block].concat()));
    let t = Instant::now();
    let cause = wait_for(
        "node1 reported unreachable",
        Duration::from_secs(60),
        || match probe_of(&lab, &s1)? {
            (Some(false), Some(cause)) => Some(cause),
            _ => None,
        },
    );
    eprintln!("reported unreachable {:?} after the block", t.elapsed());
    assert!(
        cause.contains("no VXLAN reply from 192.0.2.11 (UDP 8472)")
            && cause.contains("security groups"),
        "{cause}"
    );
    // Reported in /readyz's detail, but no readiness failure by itself.
    let (code, body) = lab.http_get(0, PORT, "/readyz").expect("readyz");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("1 unreachable through the overlay") && body.contains("node1"),
        "{body}"
    );
    assert_eq!(metric(&lab, "overlayd_peers_unreachable"), Some(1.0));
    assert_eq!(metric(&lab, "overlayd_peers_reachable"), Some(0.0));
    let log = lab.nodes[0].daemon.as_ref().expect("daemon").log_text();
    assert_eq!(
        log.matches("unreachable through the overlay: no VXLAN reply")
            .count(),
        1,
        "{log}"
    );

    assert!(lab.nodes[1]
        .ns
        .ok("iptables", &[&["-D", "INPUT"][..], &block].concat()));
    wait_for("node1 answering again", Duration::from_secs(60), || {
        (probe_of(&lab, &s1)? == (Some(true), None)).then_some(())
    });
    assert_eq!(metric(&lab, "overlayd_peers_unreachable"), Some(0.0));
    let log = lab.nodes[0].daemon.as_ref().expect("daemon").log_text();
    assert!(log.contains("answers through the overlay again"), "{log}");
}

#[test]
fn a_peer_whose_lease_is_not_renewed_is_reported_as_stale() {
    if !require_root("a_peer_whose_lease_is_not_renewed_is_reported_as_stale") {
        return;
    }
    let mut lab = Lab::new(DEFAULT_CONFIG);
    lab.add_node(&["--metrics-addr", &format!("127.0.0.1:{PORT}")]);
    // A node that leased a subnet and died: its etcd lease (90 s) is never kept alive, and
    // nothing answers at its PublicIP.
    let granted = lab.etcd.ctl(&["lease", "grant", "90"]);
    let id = granted
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("lease id in {granted:?}"))
        .to_string();
    lab.etcd.ctl(&[
        "put",
        &format!("{PREFIX}/subnets/10.244.250.0-24"),
        r#"{"PublicIP":"192.0.2.50","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:aa:00:00:00:50"},"NodeName":"gone"}"#,
        "--lease",
        &id,
    ]);
    let t = Instant::now();
    // Renewals of a 90 s lease are due every 30 s: stale after 30 s + slack, gone after 90 s.
    let cause = wait_for(
        "the dead peer reported stale",
        Duration::from_secs(80),
        || match probe_of(&lab, "10.244.250.0/24")? {
            (Some(false), Some(c)) if c.contains("stale") => Some(c),
            _ => None,
        },
    );
    eprintln!(
        "stale reported {:?} after the lease was granted",
        t.elapsed()
    );
    assert!(cause.contains("peer's lease is stale"), "{cause}");
    assert!(cause.contains("not renewed"), "{cause}");
}
