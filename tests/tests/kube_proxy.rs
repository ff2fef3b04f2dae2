//! overlayd next to kube-proxy (iptables mode): kube-proxy's own rules (see
//! `overlay_testlab::kube_proxy` for where their shapes come from) written into lab nodes before
//! and after overlayd starts, and pods that use Services across the overlay. Needs root.

use std::net::Ipv4Addr;
use std::time::Duration;

use overlay_testlab::kube_proxy::{chain_rules, position, KubeProxy, Service};
use overlay_testlab::lab::{Lab, DEFAULT_CONFIG, ETCD_IP};
use overlay_testlab::{require_root, wait_for, Netns};

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

/// A TCP connect from `ns` with a `timeout_ms` bound: ("refused" | "connected" | "timeout" |
/// "error: …", milliseconds the connect took, measured inside the client so that process start
/// is not counted).
fn tcp_connect(ns: &Netns, ip: Ipv4Addr, port: u16, timeout_ms: u64) -> (String, f64) {
    let script = r#"
import socket, sys, time
s = socket.socket()
s.settimeout(float(sys.argv[3]) / 1000)
t = time.monotonic()
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    r = "connected"
except ConnectionRefusedError:
    r = "refused"
except socket.timeout:
    r = "timeout"
except OSError as e:
    r = "error: " + str(e)
print(r, (time.monotonic() - t) * 1000)
"#;
    let out = ns
        .cmd("/usr/bin/python3")
        .args(["-c", script, &ip.to_string(), &port.to_string()])
        .arg(timeout_ms.to_string())
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (what, ms) = text.rsplit_once(' ').unwrap_or((&text, "nan"));
    (
        what.to_string(),
        ms.parse().unwrap_or_else(|_| {
            panic!(
                "client output {text:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        }),
    )
}

/// The pod's connect to the Service without endpoints is refused at once (kube-proxy's REJECT
/// applied), not left to time out.
fn assert_refused_at_once(ns: &Netns, when: &str) {
    let (what, ms) = tcp_connect(ns, EMPTY_SVC_IP, 80, 3000);
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
