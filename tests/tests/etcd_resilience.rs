//! etcd in production (issue 10), end to end: real etcd, real `overlayd` daemons in node
//! namespaces, pods made by the real plugin. Malformed keys, a re-assert that cannot finish, a long
//! etcd outage, and a node cut off from etcd for longer than its lease TTL. Needs root.

use std::process::Stdio;
use std::time::{Duration, Instant};

use overlay_testlab::lab::{Lab, DEFAULT_CONFIG, PREFIX};
use overlay_testlab::{require_root, wait_for};

/// `--metrics-addr` of every lab daemon here, on its node's own loopback.
const METRICS_PORT: u16 = 9472;
/// A node that never runs: its lease only, to see whether a running node follows new leases.
const FAKE_PEER: &str = r#"{"PublicIP":"192.0.2.99","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:63"}}"#;

fn wait_all_routes(lab: &Lab) {
    for from in 0..lab.nodes.len() {
        for to in 0..lab.nodes.len() {
            if from != to {
                let s = lab.subnet(to).to_string();
                lab.wait_route(from, &s, true, Duration::from_secs(15));
            }
        }
    }
}

/// The etcd lease id (decimal, as etcdctl's JSON has it) behind `key`.
fn lease_of(lab: &Lab, key: &str) -> i64 {
    let out = lab.etcd.ctl(&["get", key, "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
    v["kvs"][0]["lease"].as_i64().unwrap_or(0)
}

fn has_route(lab: &Lab, node: usize, dst: &str) -> bool {
    lab.nodes[node]
        .ns
        .ip_out(&["route", "show", "exact", dst])
        .contains(dst.split('/').next().unwrap_or(dst))
}

fn log(lab: &Lab, i: usize) -> String {
    lab.nodes[i]
        .daemon
        .as_ref()
        .map(|d| d.log_text())
        .unwrap_or_default()
}

/// Pings `count` times every 200 ms from node `from`'s first pod to node `to`'s; returns the
/// running ping, whose summary [`ping_summary`] reads.
fn spawn_ping(lab: &Lab, from: usize, to: usize, count: u32) -> std::process::Child {
    let dst = lab.pod(to, 0).ip.to_string();
    lab.pod(from, 0)
        .ns
        .cmd("ping")
        .args(["-i", "0.2", "-W", "1", "-c", &count.to_string(), &dst])
        .stdout(Stdio::piped())
        .spawn()
        .expect("ping")
}

fn ping_summary(ping: std::process::Child) -> String {
    let out = ping.wait_with_output().expect("ping output");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or(&text)
        .to_string()
}

#[test]
fn malformed_keys_never_remove_a_peer() {
    if !require_root("malformed_keys_never_remove_a_peer") {
        return;
    }
    let mut lab = Lab::new(DEFAULT_CONFIG);
    let metrics = format!("127.0.0.1:{METRICS_PORT}");
    for _ in 0..3 {
        lab.add_node(&["--metrics-addr", &metrics]);
    }
    for i in 0..3 {
        lab.add_pod(i);
    }
    wait_all_routes(&lab);

    // node1's own key gets a value cut off halfway (its lease kept), as a truncated event would
    // deliver it; and keys that fit no node are written next to it.
    let k1 = lab.subnet_key(1);
    let v1 = lab.etcd.get(&k1).expect("node1's key");
    let lease1 = format!("{:x}", lease_of(&lab, &k1));
    lab.etcd.ctl(&[
        "put",
        &k1,
        &v1[..v1.len() / 2],
        &format!("--lease={lease1}"),
    ]);
    let bogus = [
        ("10.244.250.0-25", FAKE_PEER),   // another prefix length
        ("10.99.0.0-24", FAKE_PEER),      // outside Network
        ("10.244.0.0-16", FAKE_PEER),     // overlaps every node's own subnet
        ("10.244.251.0-24", "{not json"), // not a lease value
    ];
    for (k, v) in bogus {
        lab.etcd.put(&format!("{PREFIX}/subnets/{k}"), v);
    }
    // Several passes later: every peer still programmed, none of the bogus keys is.
    std::thread::sleep(Duration::from_secs(3));
    for (from, to) in [(0, 1), (0, 2), (2, 1), (1, 0)] {
        let s = lab.subnet(to).to_string();
        assert!(
            has_route(&lab, from, &s),
            "node{from} lost its route to node{to} ({s}):\n{}",
            log(&lab, from)
        );
    }
    for dst in [
        "10.244.250.0/25",
        "10.99.0.0/24",
        "10.244.0.0/16",
        "10.244.251.0/24",
    ] {
        assert!(!has_route(&lab, 0, dst), "node0 routes {dst}");
    }
    for to in [1, 2] {
        let dst = lab.pod(to, 0).ip.to_string();
        assert!(
            lab.pod(0, 0).ns.ping(&dst),
            "pod on node0 cannot reach node{to}"
        );
    }
    let (_, body) = lab
        .http_get(0, METRICS_PORT, "/metrics")
        .expect("node0's /metrics");
    for reason in [
        "not_json",
        "prefix_length",
        "outside_network",
        "overlaps_own",
    ] {
        assert!(
            body.lines().any(|l| l.starts_with(&format!(
                "overlayd_ignored_leases_total{{reason=\"{reason}\"}}"
            )) && !l.ends_with(" 0")),
            "{reason} not counted:\n{body}"
        );
    }
    // node1's value is put right: all is as before.
    lab.etcd
        .ctl(&["put", &k1, &v1, &format!("--lease={lease1}")]);
    let dst = lab.pod(1, 0).ip.to_string();
    assert!(lab.pod(0, 0).ns.ping(&dst));
}

#[test]
fn drift_is_repaired_while_the_own_key_cannot_be_put_back() {
    if !require_root("drift_is_repaired_while_the_own_key_cannot_be_put_back") {
        return;
    }
    let mut lab = Lab::new(DEFAULT_CONFIG);
    lab.etcd.enable_auth("overlayd", "s3cret", PREFIX);
    let auth = ["--etcd-username", "overlayd", "--etcd-password", "s3cret"];
    lab.add_node(&auth);
    lab.add_node(&auth);
    wait_all_routes(&lab);

    // etcd stops taking this role's writes, then node0's key vanishes: node0 keeps trying to put
    // it back, as it would through an etcd outage.
    let prefix = format!("{PREFIX}/");
    lab.etcd.ctl(&[
        "role",
        "revoke-permission",
        "overlayd",
        "--prefix=true",
        &prefix,
    ]);
    lab.etcd.ctl(&[
        "role",
        "grant-permission",
        "overlayd",
        "--prefix=true",
        "read",
        &prefix,
    ]);
    lab.etcd.ctl(&["del", &lab.subnet_key(0)]);
    if let Some(d) = lab.nodes[0].daemon.as_mut() {
        d.wait_log("cannot re-assert subnet", Duration::from_secs(10));
    }
    // Meanwhile the data plane is still repaired.
    let s1 = lab.subnet(1).to_string();
    let t = Instant::now();
    lab.nodes[0].ns.ip(&["route", "del", &s1]);
    lab.wait_route(0, &s1, true, Duration::from_secs(5));
    eprintln!(
        "route repaired {:?} after its deletion, while the re-assert waited",
        t.elapsed()
    );

    lab.etcd.ctl(&[
        "role",
        "grant-permission",
        "overlayd",
        "--prefix=true",
        "readwrite",
        &prefix,
    ]);
    let k0 = lab.subnet_key(0);
    wait_for("node0 to put its key back", Duration::from_secs(40), || {
        lab.etcd.get(&k0).map(|_| ())
    });
}

#[test]
fn long_etcd_outage_keeps_pods_talking_repairs_drift_and_keeps_the_lease() {
    if !require_root("long_etcd_outage_keeps_pods_talking_repairs_drift_and_keeps_the_lease") {
        return;
    }
    // TTL 12 s: keep-alives every 3 s; the outage lasts 10 s, over three keep-alive periods.
    // Node 2 is the one whose route on node0 is deleted: the pods on nodes 0 and 1 keep talking.
    let mut lab = Lab::new(DEFAULT_CONFIG);
    let ttl = ["--lease-ttl", "12s"];
    for _ in 0..3 {
        lab.add_node(&ttl);
    }
    lab.add_pod(0);
    lab.add_pod(1);
    wait_all_routes(&lab);
    let k0 = lab.subnet_key(0);
    let lease_before = lease_of(&lab, &k0);

    let outage = Duration::from_secs(10);
    let ping = spawn_ping(&lab, 0, 1, 70); // 14 s: across the whole outage
    std::thread::sleep(Duration::from_secs(1));
    lab.etcd.stop();
    let stopped = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let s2 = lab.subnet(2).to_string();
    let t = Instant::now();
    lab.nodes[0].ns.ip(&["route", "del", &s2]);
    lab.wait_route(0, &s2, true, Duration::from_secs(5));
    eprintln!("during the outage: route repaired after {:?}", t.elapsed());
    std::thread::sleep(outage.saturating_sub(stopped.elapsed()));

    lab.etcd.restart();
    let back = Instant::now();
    lab.etcd
        .put(&format!("{PREFIX}/subnets/10.244.250.0-24"), FAKE_PEER);
    lab.wait_route(0, "10.244.250.0/24", true, Duration::from_secs(5));
    eprintln!(
        "recovery: node0 programmed a lease written after etcd's return {:?} after the restart",
        back.elapsed()
    );
    let summary = ping_summary(ping);
    eprintln!("ping across a {outage:?} etcd outage: {summary}");
    assert!(summary.contains(" 0% packet loss"), "{summary}");
    assert_eq!(lease_of(&lab, &k0), lease_before, "node0's lease changed");
    assert!(!log(&lab, 0).contains("leasing the same subnet again"));
}

#[test]
fn lease_lost_while_cut_off_is_taken_back_if_free_and_refused_if_taken() {
    if !require_root("lease_lost_while_cut_off_is_taken_back_if_free_and_refused_if_taken") {
        return;
    }
    let mut lab = Lab::new(DEFAULT_CONFIG);
    let metrics = format!("127.0.0.1:{METRICS_PORT}");
    // The lab points each daemon at its node's plugin store: it counts its pods' addresses there.
    lab.add_node(&["--lease-ttl", "4s", "--metrics-addr", &metrics]);
    lab.add_node(&[]);
    lab.add_pod(0);
    wait_all_routes(&lab);
    let subnet0 = lab.subnet(0);
    let k0 = lab.subnet_key(0);
    let port = lab
        .etcd
        .endpoint
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_string();
    let rule = |op: &str| {
        lab.nodes[0]
            .ns
            .cmd("iptables")
            .args([
                op,
                "OUTPUT",
                "-p",
                "tcp",
                "-d",
                "192.0.2.254",
                "--dport",
                &port,
                "-j",
                "DROP",
            ])
            .status()
            .expect("iptables")
            .success()
    };

    // 1. Cut off longer than the TTL, the subnet still free: taken back.
    assert!(rule("-I"));
    wait_for(
        "node0's key to expire in etcd",
        Duration::from_secs(20),
        || lab.etcd.get(&k0).is_none().then_some(()),
    );
    assert!(rule("-D"));
    let back = Instant::now();
    wait_for(
        "node0 to lease its subnet again",
        Duration::from_secs(60),
        || {
            lab.etcd
                .get(&k0)
                .filter(|v| v.contains("192.0.2.10"))
                .map(|_| ())
        },
    );
    eprintln!(
        "lease lost while cut off: subnet {subnet0} leased again {:?} after the cut ended",
        back.elapsed()
    );
    assert_eq!(lab.subnet(0), subnet0);

    // 2. Cut off again, and another node takes the subnet meanwhile: refused, not ready.
    assert!(rule("-I"));
    wait_for(
        "node0's key to expire again",
        Duration::from_secs(20),
        || lab.etcd.get(&k0).is_none().then_some(()),
    );
    let other = r#"{"PublicIP":"192.0.2.77","BackendType":"vxlan","NodeName":"node-77","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:4d"}}"#;
    lab.etcd.put(&k0, other);
    assert!(rule("-D"));
    if let Some(d) = lab.nodes[0].daemon.as_mut() {
        d.wait_log("refusing to renumber this node", Duration::from_secs(60));
    }
    let (code, body) = wait_for(
        "node0's /readyz to say why",
        Duration::from_secs(10),
        || {
            lab.http_get(0, METRICS_PORT, "/readyz")
                .filter(|(_, b)| b.contains("leased by another node"))
        },
    );
    assert_eq!(code, 503, "{body}");
    assert_eq!(lab.subnet(0), subnet0, "node0 renumbered");
    assert_eq!(lab.etcd.get(&k0).as_deref(), Some(other));

    // 3. Also after a restart, while its pod still holds an address from the subnet.
    lab.stop_daemon(0, "TERM");
    lab.spawn_daemon(0);
    if let Some(d) = lab.nodes[0].daemon.as_mut() {
        d.wait_log("refusing to take another subnet", Duration::from_secs(20));
    }
    let (code, body) = wait_for(
        "node0's /readyz after the restart",
        Duration::from_secs(10),
        || {
            lab.http_get(0, METRICS_PORT, "/readyz")
                .filter(|(_, b)| b.contains("pod address"))
        },
    );
    assert_eq!(code, 503, "{body}");
    assert_eq!(lab.subnet(0), subnet0, "node0 renumbered after a restart");
    let keys = lab.etcd.keys(&format!("{PREFIX}/subnets/"));
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(!log(&lab, 0).contains("leased subnet"), "{}", log(&lab, 0));
}
