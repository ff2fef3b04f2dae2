//! overlayd against a three-member etcd cluster (issue 10): the member it talks to is killed, or
//! cut off from the other two while it still answers clients, or two members die and the third is
//! left without a quorum. Each member runs in its own lab namespace; overlayd runs in a node
//! namespace on the same underlay (`--lease-only`, or with its data plane). Needs root.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use overlay_testlab::etcd_cluster::EtcdCluster;
use overlay_testlab::{bin, require_root, wait_for, Daemon, Netns};

const PREFIX: &str = "/coreos.com/network";
const CONFIG: &str =
    r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1}}"#;
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const METRICS: &str = "127.0.0.1:9472";

fn peer(n: u8) -> String {
    format!(
        r#"{{"PublicIP":"192.0.2.{n}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"02:00:00:00:00:{n:02x}"}}}}"#
    )
}

struct Node {
    daemon: Daemon,
    ns: Netns,
    _dir: tempfile::TempDir,
}

/// A node whose overlayd is connected to member 0 only: the others are unreachable from the
/// node (TCP reset) until it has leased and its watch runs, then reachable again. So "the member
/// overlayd talks to" is known.
fn node_on_member0(cluster: &mut EtcdCluster) -> Node {
    let ns = Netns::new("en");
    cluster.attach(&ns, NODE_IP);
    let others: Vec<String> = cluster.members[1..]
        .iter()
        .map(|m| m.ip.to_string())
        .collect();
    let block = |ns: &Netns, op: &str| {
        for ip in &others {
            overlay_testlab::run(ns.cmd("iptables").args([
                op,
                "OUTPUT",
                "-d",
                ip,
                "-p",
                "tcp",
                "-j",
                "REJECT",
                "--reject-with",
                "tcp-reset",
            ]));
        }
    };
    block(&ns, "-A");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = ns.cmd(bin("overlayd").to_str().expect("utf8 path"));
    cmd.args([
        "run",
        "--lease-only",
        "--iface",
        "eth0",
        "--node-name",
        "node0",
    ])
    .args(["--etcd-endpoints", &cluster.endpoints()])
    .args(["--lease-ttl", "6s", "--metrics-addr", METRICS])
    .arg("--subnet-file")
    .arg(dir.path().join("subnet.env"))
    .env("RUST_LOG", "info");
    let mut daemon = Daemon::spawn("overlayd node0", cmd, dir.path().join("node0.log"));
    daemon.wait_log("leased subnet", Duration::from_secs(30));
    let node = Node {
        daemon,
        ns,
        _dir: dir,
    };
    // The watch runs on member 0 (it delivers a lease written there) before the others become
    // reachable: `leases_seen` is 2 from here on.
    cluster.put_via(0, &format!("{PREFIX}/subnets/10.244.199.0-24"), &peer(199));
    wait_for(
        "the node's watch on member 0",
        Duration::from_secs(10),
        || (leases_seen(&node) == Some(2)).then_some(()),
    );
    block(&node.ns, "-D");
    node
}

fn leases_seen(node: &Node) -> Option<u64> {
    metric(&node.ns, "overlayd_subnet_leases")
}

/// One unlabelled series of the daemon's /metrics in `ns`.
fn metric(ns: &Netns, name: &str) -> Option<u64> {
    let out = ns
        .cmd("curl")
        .args(["-s", "--max-time", "2"])
        .arg(format!("http://{METRICS}/metrics"))
        .output()
        .ok()?;
    let prefix = format!("{name} ");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// The node's own key and the etcd lease behind it, read through member `via`.
fn own_key(cluster: &EtcdCluster, via: usize) -> (String, i64) {
    let out = cluster.ctl_via(
        via,
        &[
            "get",
            &format!("{PREFIX}/subnets/"),
            "--prefix",
            "-w",
            "json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
    let kvs = v["kvs"].as_array().cloned().unwrap_or_default();
    for kv in kvs {
        let value = kv["value"].as_str().map(b64).unwrap_or_default();
        if value.contains(&NODE_IP.to_string()) {
            let key = kv["key"].as_str().map(b64).unwrap_or_default();
            return (key, kv["lease"].as_i64().unwrap_or(0));
        }
    }
    panic!("no key for {NODE_IP}: {out}");
}

/// etcdctl's JSON has keys and values in base64.
fn b64(s: &str) -> String {
    let out = std::process::Command::new("base64")
        .arg("-d")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("stdin").write_all(s.as_bytes())?;
            c.wait_with_output()
        })
        .expect("base64");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn killing_the_member_overlayd_talks_to_keeps_the_lease_and_the_updates() {
    if !require_root("killing_the_member_overlayd_talks_to_keeps_the_lease_and_the_updates") {
        return;
    }
    let mut cluster = EtcdCluster::start();
    cluster.put(&format!("{PREFIX}/config"), CONFIG);
    let mut node = node_on_member0(&mut cluster);
    let (key, lease) = own_key(&cluster, 1);

    cluster.kill(0);
    let killed = Instant::now();
    // If member 0 led, the others elect a new leader first; writes wait for it.
    wait_for(
        "members 1 and 2 to have a leader",
        Duration::from_secs(15),
        || cluster.leader().filter(|l| *l != 0).map(|_| ()),
    );
    cluster.put_via(1, &format!("{PREFIX}/subnets/10.244.200.0-24"), &peer(200));
    let written = Instant::now();
    wait_for(
        "the node to see a lease written after the kill",
        Duration::from_secs(5),
        || (leases_seen(&node) == Some(3)).then_some(()),
    );
    eprintln!(
        "failover: member 0 killed; a lease written {:?} after the kill seen by the node {:?} \
         after the write",
        written - killed,
        written.elapsed()
    );
    cluster.put_via(2, &format!("{PREFIX}/subnets/10.244.201.0-24"), &peer(201));
    wait_for("the next update", Duration::from_secs(5), || {
        (leases_seen(&node) == Some(4)).then_some(())
    });
    // Two TTLs (6 s) later the same key and lease are there: keep-alives moved on too.
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(
        own_key(&cluster, 1),
        (key, lease),
        "{}",
        node.daemon.log_text()
    );
    assert!(node.daemon.is_running());
    assert!(!node
        .daemon
        .log_text()
        .contains("leasing the same subnet again"));
}

#[test]
fn member_cut_off_from_the_others_is_left_for_one_with_a_leader() {
    if !require_root("member_cut_off_from_the_others_is_left_for_one_with_a_leader") {
        return;
    }
    let mut cluster = EtcdCluster::start();
    cluster.put(&format!("{PREFIX}/config"), CONFIG);
    let mut node = node_on_member0(&mut cluster);
    let (key, lease) = own_key(&cluster, 1);

    // Member 0 keeps answering clients but loses the others: no leader on its side.
    cluster.isolate(0);
    let cut = Instant::now();
    wait_for(
        "members 1 and 2 to have a leader",
        Duration::from_secs(15),
        || cluster.leader().filter(|l| *l != 0).map(|_| ()),
    );
    cluster.put_via(1, &format!("{PREFIX}/subnets/10.244.200.0-24"), &peer(200));
    wait_for(
        "the node to see a lease written on the majority side",
        Duration::from_secs(10),
        || (leases_seen(&node) == Some(3)).then_some(()),
    );
    eprintln!(
        "partition: member 0 cut off; a lease written on the majority seen {:?} after the cut",
        cut.elapsed()
    );
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(
        own_key(&cluster, 1),
        (key, lease),
        "{}",
        node.daemon.log_text()
    );
    assert!(node.daemon.is_running());
    cluster.heal(0);
}

/// A node with its data plane (VXLAN device, bridge, routes to peers) on the cluster's underlay,
/// told every member's endpoint.
fn node_with_dataplane(cluster: &mut EtcdCluster) -> Node {
    let ns = Netns::new("en");
    cluster.attach(&ns, NODE_IP);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = ns.cmd(bin("overlayd").to_str().expect("utf8 path"));
    cmd.args(["run", "--iface", "eth0", "--node-name", "node0"])
        .args(["--etcd-endpoints", &cluster.endpoints()])
        .args(["--metrics-addr", METRICS, "--peer-probe", "false"])
        .arg("--subnet-file")
        .arg(dir.path().join("subnet.env"))
        .arg("--cni-data-dir")
        .arg(dir.path().join("cni"))
        .env("RUST_LOG", "info");
    let mut daemon = Daemon::spawn("overlayd node0", cmd, dir.path().join("node0.log"));
    daemon.wait_log("leased subnet", Duration::from_secs(30));
    Node {
        daemon,
        ns,
        _dir: dir,
    }
}

/// The routes the node's kernel has to `subnet` (empty when none).
fn route_to(node: &Node, subnet: &str) -> String {
    node.ns.ip_out(&["route", "show", subnet])
}

#[test]
fn without_a_quorum_the_watch_backs_off_the_routes_stay_and_a_new_lease_follows_quorum() {
    if !require_root(
        "without_a_quorum_the_watch_backs_off_the_routes_stay_and_a_new_lease_follows_quorum",
    ) {
        return;
    }
    let mut cluster = EtcdCluster::start();
    cluster.put(&format!("{PREFIX}/config"), CONFIG);
    for n in [199, 198] {
        cluster.put(&format!("{PREFIX}/subnets/10.244.{n}.0-24"), &peer(n));
    }
    let mut node = node_with_dataplane(&mut cluster);
    for n in [199, 198] {
        wait_for(
            &format!("the route to peer {n}"),
            Duration::from_secs(10),
            || {
                route_to(&node, &format!("10.244.{n}.0/24"))
                    .contains("via")
                    .then_some(())
            },
        );
    }
    let routes = || node.ns.ip_out(&["route", "show"]);
    let before = routes();
    let restarts = |node: &Node| metric(&node.ns, "overlayd_etcd_watch_restarts_total");
    let base = wait_for("the restart counter", Duration::from_secs(5), || {
        restarts(&node)
    });

    // Members 1 and 2 die: member 0 is left without a leader, and refuses every watch ("no
    // leader": each call requires one). The window starts at the first failed watch.
    cluster.kill(1);
    cluster.kill(2);
    wait_for(
        "the watch to fail on the member without a quorum",
        Duration::from_secs(20),
        || restarts(&node).filter(|n| *n > base),
    );
    let (start, from) = (Instant::now(), restarts(&node).unwrap_or(base));
    let window = Duration::from_secs(20);
    while start.elapsed() < window {
        assert_eq!(
            routes(),
            before,
            "the routes changed without a quorum:\n{}",
            node.daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let attempts = restarts(&node).unwrap_or(0) - from;
    let log = node.daemon.log_text();
    // Which case this is: refused at once (the config read or the watch's creation), or created
    // and then cancelled or lost.
    eprintln!(
        "no quorum for {window:?}: {attempts} watch restarts; the log has {} starts refused \
         (\"cannot read the network config\" or \"cannot watch\"), {} watches cancelled and {} lost",
        log.matches("cannot read the network config").count()
            + log.matches("cannot watch subnet leases").count(),
        log.matches("etcd canceled the").count(),
        log.matches("watch lost").count()
    );
    // Waits of half to all of 0.5, 1, 2, then 4 s: at least 0.25 + 0.5 + 1 + 2 s and then 2 s
    // each, so at most 4 + 9 = 13 restarts fit in 20 s (without a backoff: hundreds). At most
    // 0.5 + 1 + 2 + 4 s and then 4 s each: at least 6 from the first failure; 3 leave room for
    // slow attempts, and show the watch keeps trying.
    assert!(
        (3..=13).contains(&attempts),
        "{attempts} watch restarts in {window:?} without a quorum:\n{log}"
    );

    // Quorum back (members 0 and 1): a lease written then is programmed within 5 s.
    cluster.restart(1);
    let quorum = Instant::now();
    wait_for("a leader again", Duration::from_secs(15), || {
        cluster.leader().map(|_| ())
    });
    cluster.put_via(1, &format!("{PREFIX}/subnets/10.244.200.0-24"), &peer(200));
    let written = Instant::now();
    wait_for(
        "the route to a lease written after the quorum returned",
        Duration::from_secs(5),
        || {
            route_to(&node, "10.244.200.0/24")
                .contains("via")
                .then_some(())
        },
    );
    eprintln!(
        "quorum back: a new lease programmed {:?} after its write, {:?} after member 1 answered \
         again",
        written.elapsed(),
        quorum.elapsed()
    );
    assert!(node.daemon.is_running());
}
