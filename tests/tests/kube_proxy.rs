//! overlayd next to kube-proxy (iptables mode): kube-proxy's own rules (see
//! `overlay_testlab::kube_proxy` for where their shapes come from) written into lab nodes before
//! and after overlayd starts, and pods that use Services across the overlay. Needs root.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use overlay_testlab::cni_chain::{self, Invocation};
use overlay_testlab::kube_proxy::{
    chain_rules, install_node_local_dns, packets, position, KubeProxy, Service,
};
use overlay_testlab::lab::{Lab, Pod, DEFAULT_CONFIG, ETCD_IP};
use overlay_testlab::{bin, probe, require_root, wait_for, Daemon, Netns};

const CLUSTER_CIDR: &str = "10.244.0.0/16";
const EMPTY_SVC_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const FWD_JUMP_RULE: &str =
    "-A FORWARD -m comment --comment \"overlayd: pod forwarding\" -j OVERLAY-FWD";

fn no_endpoints() -> KubeProxy {
    KubeProxy::new(
        CLUSTER_CIDR,
        vec![Service::tcp("default/empty:http", EMPTY_SVC_IP, 80, &[])],
    )
}

/// The pod's connect to the Service without endpoints is refused at once (kube-proxy's REJECT
/// applied), not left to time out.
fn assert_refused_at_once(ns: &Netns, when: &str) {
    let probe::Outcome { what, ms } = probe::tcp(ns, EMPTY_SVC_IP, 80, 3000);
    println!("{when}: connect to {EMPTY_SVC_IP}:80 (no endpoints): {what} after {ms:.1} ms");
    assert_eq!(
        what, "refused",
        "{when}: a Service without endpoints must be refused"
    );
    assert!(ms < 100.0, "{when}: refused only after {ms:.1} ms");
}

/// Our FORWARD jump is present once and behind every kube-proxy jump.
fn forward_order_ok(node: &Netns) -> bool {
    let rules = chain_rules(node, "filter", "FORWARD");
    let ours: Vec<usize> = rules
        .iter()
        .enumerate()
        .filter(|(_, l)| l.as_str() == FWD_JUMP_RULE)
        .map(|(i, _)| i)
        .collect();
    let last_kube = rules.iter().rposition(|l| l.contains("-j KUBE-"));
    ours.len() == 1 && last_kube.is_some_and(|k| ours[0] > k)
}

fn wait_forward_order(node: &Netns, what: &str, timeout: Duration) {
    wait_for(what, timeout, || forward_order_ok(node).then_some(()));
}

#[test]
fn service_without_endpoints_is_refused_at_once_when_kube_proxy_wrote_first() {
    if !require_root("service_without_endpoints_is_refused_at_once_when_kube_proxy_wrote_first") {
        return;
    }
    let mut lab = Lab::new(DEFAULT_CONFIG);
    let kp = no_endpoints();
    let n = lab.add_node_prepared(&[], |ns| kp.install(ns));
    let p = lab.add_pod(n);
    let node = &lab.nodes[n].ns;
    wait_for("overlayd's FORWARD jump", Duration::from_secs(10), || {
        position(&chain_rules(node, "filter", "FORWARD"), "OVERLAY-FWD").map(|_| ())
    });
    assert_refused_at_once(&lab.pod(n, p).ns, "kube-proxy first");
    let forward = chain_rules(node, "filter", "FORWARD");
    assert!(
        forward_order_ok(node),
        "overlayd's jump must come after kube-proxy's:\n{}",
        forward.join("\n")
    );
    // Pods still reach the outside through FORWARD (our ACCEPT applies after kube-proxy's).
    assert!(lab.pod(n, p).ns.ping(&ETCD_IP.to_string()));
}

#[test]
fn forward_jump_stays_behind_kube_proxy_after_a_flush_and_an_upgrade() {
    if !require_root("forward_jump_stays_behind_kube_proxy_after_a_flush_and_an_upgrade") {
        return;
    }
    let mut lab = Lab::new(DEFAULT_CONFIG);
    let n = lab.add_node(&[]);
    let p = lab.add_pod(n);
    let kp = no_endpoints();
    let node = lab.nodes[n].ns.name.clone();
    let node_ns = &lab.nodes[n].ns;
    wait_for("overlayd's FORWARD jump", Duration::from_secs(10), || {
        position(&chain_rules(node_ns, "filter", "FORWARD"), "OVERLAY-FWD").map(|_| ())
    });
    // kube-proxy starts second: its jumps are prepended.
    kp.install(node_ns);
    wait_forward_order(node_ns, "kube-proxy second", Duration::from_secs(1));
    assert_refused_at_once(&lab.pod(n, p).ns, "kube-proxy second");

    // Someone flushes FORWARD; kube-proxy's canary sees it and it re-adds its jumps at once,
    // overlayd re-adds its own at its next check: ours must still end up behind.
    assert!(node_ns.ok("iptables", &["-w", "5", "-F", "FORWARD"]));
    kp.ensure_jumps(node_ns);
    wait_forward_order(
        node_ns,
        "overlayd's jump back, behind kube-proxy's, after a flush",
        Duration::from_secs(15),
    );
    assert_refused_at_once(&lab.pod(n, p).ns, "after a flush of FORWARD");

    // An older overlayd left its jump first in FORWARD: the check moves it behind.
    assert!(node_ns.ok(
        "iptables",
        &[
            "-w",
            "5",
            "-D",
            "FORWARD",
            "-m",
            "comment",
            "--comment",
            "overlayd: pod forwarding",
            "-j",
            "OVERLAY-FWD"
        ]
    ));
    assert!(node_ns.ok(
        "iptables",
        &[
            "-w",
            "5",
            "-I",
            "FORWARD",
            "1",
            "-m",
            "comment",
            "--comment",
            "overlayd: pod forwarding",
            "-j",
            "OVERLAY-FWD"
        ]
    ));
    assert!(!forward_order_ok(node_ns));
    wait_forward_order(
        node_ns,
        "overlayd to move its jump behind kube-proxy's",
        Duration::from_secs(15),
    );
    assert_refused_at_once(&lab.pod(n, p).ns, "after the jump was moved");
    let log = lab.nodes[n].daemon.as_ref().expect("daemon").log_text();
    assert!(
        log.contains("moved it to the end"),
        "node {node}: no word of the move in the log:\n{log}"
    );
}

// ---- Services across the overlay, kube-proxy writing before or after overlayd ----

const WEB_SVC_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const WEB_NODE_PORT: u16 = 30080;
const WEB_PORT: u16 = 8080;
const NODE_LOCAL_DNS: Ipv4Addr = Ipv4Addr::new(169, 254, 20, 10);
const HOST_PORT: u16 = 8088;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    KubeProxyFirst,
    OverlaydFirst,
}

/// `default/web` (ClusterIP + NodePort, its endpoint a pod on node 1, once known) and
/// `default/empty` (no endpoints).
fn services(web_endpoint: Option<SocketAddrV4>) -> KubeProxy {
    KubeProxy::new(
        CLUSTER_CIDR,
        vec![
            Service::tcp(
                "default/web:http",
                WEB_SVC_IP,
                80,
                &web_endpoint.into_iter().collect::<Vec<_>>(),
            )
            .with_node_port(WEB_NODE_PORT),
            Service::tcp("default/empty:http", EMPTY_SVC_IP, 80, &[]),
        ],
    )
}

struct Setup {
    // Servers before the lab: they run inside its namespaces.
    _servers: Vec<Daemon>,
    lab: Lab,
    kp: KubeProxy,
}

/// Two nodes, a client pod on node 0 and the web pod on node 1; kube-proxy's rules (and
/// node-local-dns's on node 0) written before overlayd starts or after.
fn build(order: Order) -> Setup {
    let mut lab = Lab::new(DEFAULT_CONFIG);
    for i in 0..2 {
        match order {
            // No endpoint is known before pods exist: kube-proxy's first sync writes the jumps
            // and a REJECT for web; its next sync (below) adds the endpoint.
            Order::KubeProxyFirst => lab.add_node_prepared(&[], |ns| {
                services(None).install(ns);
                if i == 0 {
                    install_node_local_dns(ns, NODE_LOCAL_DNS);
                }
            }),
            Order::OverlaydFirst => lab.add_node(&[]),
        };
    }
    lab.add_pod(0);
    lab.add_pod(1);
    for (from, to) in [(0, 1), (1, 0)] {
        let s = lab.subnet(to).to_string();
        lab.wait_route(from, &s, true, Duration::from_secs(10));
    }
    let web = lab.pod(1, 0);
    let mut servers = vec![probe::tcp_server(
        &web.ns,
        Ipv4Addr::UNSPECIFIED,
        WEB_PORT,
        &lab.dir.path().join("web.log"),
    )];
    let kp = services(Some(SocketAddrV4::new(web.ip, WEB_PORT)));
    for i in 0..2 {
        let ns = &lab.nodes[i].ns;
        kp.install(ns);
        if i == 0 && order == Order::OverlaydFirst {
            install_node_local_dns(ns, NODE_LOCAL_DNS);
        }
    }
    // The node-local cache: a UDP server on the link-local address, on node 0 itself.
    let n0 = &lab.nodes[0].ns;
    n0.ip(&["addr", "add", &format!("{NODE_LOCAL_DNS}/32"), "dev", "lo"]);
    servers.push(probe::udp_server(
        n0,
        NODE_LOCAL_DNS,
        53,
        &lab.dir.path().join("dns.log"),
    ));
    for i in 0..2 {
        wait_forward_order(
            &lab.nodes[i].ns,
            &format!("node{i}: overlayd's FORWARD jump behind kube-proxy's"),
            Duration::from_secs(10),
        );
    }
    Setup {
        _servers: servers,
        lab,
        kp,
    }
}

fn assert_cluster_ip_across_the_overlay(lab: &Lab, when: &str) {
    let client = lab.pod(0, 0);
    let out = probe::tcp(&client.ns, WEB_SVC_IP, 80, 3000);
    println!(
        "{when}: pod {} -> {WEB_SVC_IP}:80 -> pod {}: {out:?}",
        client.ip,
        lab.pod(1, 0).ip
    );
    // An answer at all means the reply was un-DNATed (the client talks to the ClusterIP); the
    // address it saw says no one masqueraded pod-to-pod traffic on the way.
    assert_eq!(
        out.seen(),
        Some(client.ip.to_string().as_str()),
        "{when}: ClusterIP across the overlay"
    );
}

fn check_services(setup: &Setup, order: Order) {
    let lab = &setup.lab;
    let label = format!("{order:?}");
    let client = lab.pod(0, 0);
    let web = lab.pod(1, 0);

    assert_cluster_ip_across_the_overlay(lab, &label);

    // Pod to pod inside Network: the receiver sees the sender's pod IP.
    let direct = probe::tcp(&client.ns, web.ip, WEB_PORT, 3000);
    assert_eq!(
        direct.seen(),
        Some(client.ip.to_string().as_str()),
        "{label}: pod to pod"
    );

    assert_refused_at_once(&client.ns, &label);

    // NodePort on node 0 from outside the cluster (the underlay), endpoint on node 1.
    // kube-proxy marks it (KUBE-EXT → KUBE-MARK-MASQ); KUBE-POSTROUTING masquerades it, once:
    // our chain returns for the mark and none of our MASQUERADE rules sees the packet.
    let n0 = &lab.nodes[0].ns;
    for (t, c) in [("nat", "KUBE-POSTROUTING"), ("nat", "OVERLAY-POSTRTG")] {
        assert!(n0.ok("iptables", &["-w", "5", "-t", t, "-Z", c]));
    }
    let np = probe::tcp(&lab.underlay, lab.nodes[0].ip, WEB_NODE_PORT, 3000);
    let vtep0 = lab.subnet(0).network().to_string();
    println!(
        "{label}: underlay -> node0:{WEB_NODE_PORT} -> pod {}: {np:?}",
        web.ip
    );
    assert_eq!(
        np.seen(),
        Some(vtep0.as_str()),
        "{label}: NodePort, masqueraded by node 0"
    );
    let kube_masq = packets(n0, "nat", "KUBE-POSTROUTING", "MASQUERADE");
    let our_masq = packets(n0, "nat", "OVERLAY-POSTRTG", "MASQUERADE");
    assert_eq!(
        (kube_masq, our_masq),
        (1, 0),
        "{label}: (KUBE-POSTROUTING, OVERLAY-POSTRTG) masquerades for one NodePort connection"
    );

    // node-local-dns: NOTRACK in raw for a link-local address; the pod's query is answered.
    assert!(n0.ok("iptables", &["-w", "5", "-t", "raw", "-Z", "PREROUTING"]));
    let dns = probe::udp(&client.ns, NODE_LOCAL_DNS, 53, 2000);
    println!("{label}: pod -> {NODE_LOCAL_DNS}:53/udp: {dns:?}");
    assert_eq!(
        dns.seen(),
        Some(client.ip.to_string().as_str()),
        "{label}: node-local DNS"
    );
    // The query really went untracked (iptables-nft shows NOTRACK as target CT).
    let untracked =
        packets(n0, "raw", "PREROUTING", "CT") + packets(n0, "raw", "PREROUTING", "NOTRACK");
    assert!(untracked >= 1, "{label}: the NOTRACK rule matched nothing");
}

/// A pod on node 0 with a hostPort, networked by the chain `overlay` → Debian's `portmap`, reached
/// from node 1.
fn check_host_port(setup: &mut Setup, order: Order) {
    let lab = &mut setup.lab;
    let list = cni_chain::conflist(vec![
        lab.overlay_plugin(0),
        serde_json::json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}),
    ]);
    let pod_ns = Netns::new("pd");
    let id = "node0-hostport";
    let inv = Invocation {
        node: &lab.nodes[0].ns,
        pod: &pod_ns,
        container_id: id,
        ifname: "eth0",
        cni_path: vec![
            bin("overlay").parent().expect("bin dir").to_path_buf(),
            cni_chain::DEBIAN_PLUGINS.into(),
        ],
        runtime_config: serde_json::json!({
            "portMappings": [{"hostPort": HOST_PORT, "containerPort": WEB_PORT, "protocol": "tcp"}]
        }),
    };
    let result = inv
        .add(&list)
        .unwrap_or_else(|e| panic!("{order:?}: chain ADD: {e}"));
    let ip: Ipv4Addr = result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no pod IP in {result}"));
    let server = probe::tcp_server(
        &pod_ns,
        Ipv4Addr::UNSPECIFIED,
        WEB_PORT,
        &lab.dir.path().join("hostport.log"),
    );
    let from = lab.nodes[1].ip;
    let out = probe::tcp(&lab.nodes[1].ns, lab.nodes[0].ip, HOST_PORT, 3000);
    println!("{order:?}: node1 -> node0:{HOST_PORT} (hostPort) -> pod {ip}: {out:?}");
    assert_eq!(
        out.seen(),
        Some(from.to_string().as_str()),
        "{order:?}: hostPort from another node"
    );
    inv.del(&list, Some(&result))
        .unwrap_or_else(|e| panic!("{order:?}: chain DEL: {e}"));
    let gone = probe::tcp(&lab.nodes[1].ns, lab.nodes[0].ip, HOST_PORT, 1000);
    assert!(
        gone.seen().is_none(),
        "{order:?}: hostPort still answers after DEL: {gone:?}"
    );
    drop(server);
    lab.nodes[0].pods.push(Pod {
        ns: pod_ns,
        ip,
        id: id.to_string(),
    });
}

fn restart_and_recheck(setup: &mut Setup, order: Order) {
    for i in 0..2 {
        setup.lab.stop_daemon(i, "TERM");
        setup.lab.start_daemon(i);
    }
    for i in 0..2 {
        wait_forward_order(
            &setup.lab.nodes[i].ns,
            &format!("node{i}: FORWARD order after overlayd restarted"),
            Duration::from_secs(10),
        );
    }
    let label = format!("{order:?}, after overlayd restarted");
    assert_cluster_ip_across_the_overlay(&setup.lab, &label);
    assert_refused_at_once(&setup.lab.pod(0, 0).ns, &label);
    // And kube-proxy's next full sync changes nothing of ours.
    setup.kp.install(&setup.lab.nodes[0].ns);
    assert!(
        forward_order_ok(&setup.lab.nodes[0].ns),
        "{label}: after kube-proxy resynced"
    );
}

fn services_across_the_overlay(order: Order) {
    let mut setup = build(order);
    check_services(&setup, order);
    check_host_port(&mut setup, order);
    restart_and_recheck(&mut setup, order);
}

#[test]
fn services_across_the_overlay_kube_proxy_first() {
    if !require_root("services_across_the_overlay_kube_proxy_first") {
        return;
    }
    services_across_the_overlay(Order::KubeProxyFirst);
}

#[test]
fn services_across_the_overlay_overlayd_first() {
    if !require_root("services_across_the_overlay_overlayd_first") {
        return;
    }
    services_across_the_overlay(Order::OverlaydFirst);
}
