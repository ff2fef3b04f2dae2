//! Peer programming on a real kernel: one peer the kernel refuses must not stop the others.
//! Needs root.

use std::time::Duration;

use overlay_testlab::lab::{Lab, PREFIX};
use overlay_testlab::{require_root, wait_for};

/// Node 0 always leases 10.244.5.0/24, so the peers below sort around it.
const CONFIG: &str = r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.5.0","SubnetMax":"10.244.5.0","Backend":{"Type":"vxlan","VNI":1}}"#;
const METRICS: &str = "127.0.0.1:9472";

fn lease(ip: &str, mac: &str) -> String {
    format!(
        r#"{{"PublicIP":"{ip}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    )
}

fn metric(lab: &Lab, name: &str) -> Option<f64> {
    let out = lab.nodes[0]
        .ns
        .cmd("curl")
        .args([
            "-s",
            "--max-time",
            "2",
            &format!("http://{METRICS}/metrics"),
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn a_peer_the_kernel_refuses_does_not_stop_the_others() {
    if !require_root("a_peer_the_kernel_refuses_does_not_stop_the_others") {
        return;
    }
    let mut lab = Lab::new(CONFIG);
    lab.add_node(&["--metrics-addr", METRICS]);
    assert_eq!(lab.subnet(0).to_string(), "10.244.5.0/24");
    // Another agent on node 0 owns 10.244.6.0 (an address on lo). A well-formed peer lease for
    // 10.244.6.0/24 then asks for a route via a local address, which the kernel refuses
    // ("Nexthop has invalid gateway"): nothing in etcd can tell, only the kernel. Good peers sort
    // before and after it.
    lab.nodes[0]
        .ns
        .ip(&["addr", "add", "10.244.6.0/32", "dev", "lo"]);
    let put = |subnet: &str, ip: &str, mac: &str| {
        lab.etcd
            .put(&format!("{PREFIX}/subnets/{subnet}"), &lease(ip, mac))
    };
    put("10.244.4.0-24", "192.0.2.104", "02:aa:00:00:00:04");
    put("10.244.6.0-24", "192.0.2.106", "02:aa:00:00:00:06");
    put("10.244.7.0-24", "192.0.2.107", "02:aa:00:00:00:07");
    put("10.244.8.0-24", "192.0.2.108", "02:aa:00:00:00:08");
    for s in ["10.244.4.0/24", "10.244.7.0/24", "10.244.8.0/24"] {
        lab.wait_route(0, s, true, Duration::from_secs(10));
        let fdb = lab.nodes[0].ns.fdb("overlay.1");
        let last = &s[7..8];
        assert!(
            fdb.contains(&format!("02:aa:00:00:00:0{last} dst 192.0.2.10{last}")),
            "{s}: {fdb}"
        );
    }
    let bad = lab.nodes[0].ns.ip_out(&["route", "show", "10.244.6.0/24"]);
    assert!(
        !bad.contains("via"),
        "the kernel took the route after all: {bad}"
    );

    // Counted, and retried with backoff while failing: several passes later, one log line.
    wait_for(
        "the failing peer in the metrics",
        Duration::from_secs(5),
        || (metric(&lab, "overlayd_peers_failing") == Some(1.0)).then_some(()),
    );
    let errors = metric(&lab, "overlayd_peer_errors_total").unwrap_or(0.0);
    assert!(errors >= 1.0, "overlayd_peer_errors_total = {errors}");
    std::thread::sleep(Duration::from_secs(3));
    let later = metric(&lab, "overlayd_peer_errors_total").unwrap_or(0.0);
    // 1 s, 2 s, 4 s … apart, never once per pass: at most 3 more tries in these 3 s.
    assert!(
        later - errors <= 3.0,
        "retried {} times in 3 s",
        later - errors
    );
    let log = lab.nodes[0].daemon.as_ref().expect("daemon").log_text();
    let lines = log
        .lines()
        .filter(|l| l.contains("peer 10.244.6.0/24:") && l.contains("adding route"))
        .count();
    assert_eq!(lines, 1, "logged {lines} times:\n{log}");

    // The bad lease goes: nothing is left failing.
    lab.etcd
        .ctl(&["del", &format!("{PREFIX}/subnets/10.244.6.0-24")]);
    wait_for("no failing peer", Duration::from_secs(5), || {
        (metric(&lab, "overlayd_peers_failing") == Some(0.0)).then_some(())
    });
    lab.wait_route(0, "10.244.8.0/24", true, Duration::from_secs(1));
}

#[test]
fn vtep_mac_and_peer_entries_survive_a_node_reboot() {
    if !require_root("vtep_mac_and_peer_entries_survive_a_node_reboot") {
        return;
    }
    let mut lab = Lab::new(overlay_testlab::lab::DEFAULT_CONFIG);
    lab.add_node(&[]);
    lab.add_node(&[]);
    lab.add_pod(1);
    let s0 = lab.subnet(0);
    lab.wait_route(1, &s0.to_string(), true, Duration::from_secs(10));
    let mac = |lab: &Lab| {
        let link = lab.nodes[0].ns.ip_out(&["link", "show", "overlay.1"]);
        link.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .map(str::to_string)
            .expect("overlay.1's MAC")
    };
    let before = mac(&lab);
    // What node 1 knows about node 0.
    let view = |lab: &Lab| {
        let ns = &lab.nodes[1].ns;
        let fdb: Vec<String> = ns
            .fdb("overlay.1")
            .lines()
            .filter(|l| l.contains(&format!("dst {} ", lab.nodes[0].ip)))
            .map(str::to_string)
            .collect();
        let arp = ns.ip_out(&[
            "neigh",
            "show",
            &s0.network().to_string(),
            "dev",
            "overlay.1",
        ]);
        (fdb, arp.trim().to_string())
    };
    let peer_view = view(&lab);
    assert_eq!(peer_view.0.len(), 1, "{peer_view:?}");
    assert!(
        peer_view.0[0].starts_with(&before),
        "{peer_view:?} vs {before}"
    );
    assert!(
        peer_view.1.contains(&format!("lladdr {before} PERMANENT")),
        "{peer_view:?}"
    );

    lab.reboot_node(0);
    assert_eq!(lab.subnet(0), s0, "the rebooted node was renumbered");
    assert_eq!(mac(&lab), before, "the VTEP MAC changed across the reboot");
    // Node 1's entries were right all along: the same, and a new pod on node 0 is reachable at
    // once, with no reprogramming on node 1.
    assert_eq!(view(&lab), peer_view);
    let p = lab.add_pod(0);
    let dst = lab.pod(0, p).ip.to_string();
    assert!(
        lab.pod(1, 0).ns.ping(&dst),
        "node 1's pod cannot reach the rebooted node's new pod"
    );
    let log = lab.nodes[1].daemon.as_ref().expect("daemon").log_text();
    assert!(
        !log.contains("removed FDB entry") && !log.contains("removed ARP entry"),
        "node 1 had to rewrite its entries for node 0:\n{log}"
    );
}

/// Routes written before metrics were spread (metric 0) are replaced by the metric-spread ones on
/// the first full pass after an upgrade: one route per peer subnet, never two, never none.
#[test]
fn routes_of_an_older_overlayd_are_replaced_on_start() {
    if !require_root("routes_of_an_older_overlayd_are_replaced_on_start") {
        return;
    }
    let mut lab = Lab::new(overlay_testlab::lab::DEFAULT_CONFIG);
    lab.add_node(&[]);
    lab.add_node(&[]);
    let s1 = lab.subnet(1).to_string();
    lab.wait_route(0, &s1, true, Duration::from_secs(10));
    lab.stop_daemon(0, "KILL");
    let ns = &lab.nodes[0].ns;
    let gw = s1.split('/').next().expect("subnet address").to_string();
    ns.ip(&["route", "del", &s1]);
    ns.ip(&[
        "route",
        "add",
        &s1,
        "via",
        &gw,
        "dev",
        "overlay.1",
        "onlink",
        "proto",
        "76",
    ]);
    let routes = |lab: &Lab| lab.nodes[0].ns.ip_out(&["route", "show", &s1]);
    assert!(!routes(&lab).contains("metric"), "{}", routes(&lab));
    lab.start_daemon(0);
    wait_for(
        "one route with a spread metric",
        Duration::from_secs(10),
        || {
            let r = routes(&lab);
            (r.lines().count() == 1 && r.contains("metric")).then_some(())
        },
    );
}
