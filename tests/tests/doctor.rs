//! `overlayd doctor` on a lab node: healthy, every check PASSes; then each fault is made for real
//! (in the node's namespace, in etcd, or in the temp dirs passed by flags), its check must turn
//! FAIL (or WARN) and come back to PASS once the fault is fixed.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use overlay_testlab::lab::{Lab, DEFAULT_CONFIG, PREFIX};
use overlay_testlab::{bin, require_root, wait_for};
use serde_json::Value;

const PORT: u16 = 9472;

struct Node {
    lab: Lab,
    conf: PathBuf,
    bins: PathBuf,
    kubelet: PathBuf,
    proc_dir: PathBuf,
    aws_state: PathBuf,
    user: Option<(String, String)>,
}

impl Node {
    fn doctor(&self) -> (Output, BTreeMap<String, (String, String)>) {
        let n = &self.lab.nodes[0];
        let path = |p: &Path| p.to_str().expect("utf8").to_string();
        let mut cmd = n.ns.cmd(bin("overlayd").to_str().expect("utf8"));
        cmd.args(["doctor", "--output", "json", "--etcd-endpoints"])
            .arg(&self.lab.etcd.endpoint)
            .args(["--subnet-file", &path(&n.subnet_file)])
            .args(["--cni-data-dir", &path(&n.ipam_dir)])
            .args(["--cni-conf-dir", &path(&self.conf)])
            .args(["--cni-bin-dir", &path(&self.bins)])
            .args(["--kubelet-config", &path(&self.kubelet)])
            .args(["--proc-dir", &path(&self.proc_dir)])
            .args(["--aws-node-state-dir", &path(&self.aws_state)])
            .env("OVERLAYD_METRICS_ADDR", format!("0.0.0.0:{PORT}"));
        if let Some((u, p)) = &self.user {
            cmd.args(["--etcd-username", u])
                .env("OVERLAYD_ETCD_PASSWORD", p);
        }
        let out = cmd.output().expect("run overlayd doctor");
        let j: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "doctor --output json: {e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        let mut checks = BTreeMap::new();
        for c in j["checks"].as_array().expect("checks") {
            checks.insert(
                c["check"].as_str().expect("check").to_string(),
                (
                    c["verdict"].as_str().expect("verdict").to_string(),
                    format!("{} | fix: {}", c["detail"], c["fix"]),
                ),
            );
        }
        (out, checks)
    }

    /// Waits (bounded) until `check` has `verdict`; returns its detail.
    fn expect(&self, check: &str, verdict: &str) -> String {
        let mut last = String::new();
        for _ in 0..40 {
            let (out, checks) = self.doctor();
            let (v, detail) = checks.get(check).cloned().unwrap_or_default();
            if v == verdict {
                assert_eq!(
                    out.status.code(),
                    Some(if checks.values().any(|(v, _)| v == "FAIL") {
                        1
                    } else {
                        0
                    }),
                    "exit code against {checks:#?}"
                );
                return detail;
            }
            last = format!("{check} is {v}: {detail}\nall: {checks:#?}");
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("{check} never turned {verdict}; last: {last}");
    }

    fn sh(&self, script: &str) {
        let out = self.lab.nodes[0]
            .ns
            .cmd("sh")
            .args(["-c", script])
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn executable(path: &Path) {
    std::fs::write(path, "#!/bin/sh\n").expect("write plugin");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

fn node() -> Node {
    let mut lab = Lab::new(DEFAULT_CONFIG);
    lab.add_node(&[
        "--metrics-addr",
        &format!("127.0.0.1:{PORT}"),
        "--peer-probe-interval",
        "2s",
    ]);
    lab.add_node(&[]);
    let d = lab.dir.path().to_path_buf();
    let (conf, bins, proc_dir, aws_state) = (
        d.join("net.d"),
        d.join("bin"),
        d.join("proc"),
        d.join("aws-node"),
    );
    for dir in [&conf, &bins, &proc_dir, &aws_state] {
        std::fs::create_dir_all(dir).expect("mkdir");
    }
    std::fs::write(
        conf.join("00-overlay.conflist"),
        r#"{"cniVersion":"1.0.0","name":"lab","plugins":[{"type":"overlay"},{"type":"portmap","capabilities":{"portMappings":true}}]}"#,
    )
    .expect("conflist");
    executable(&bins.join("overlay"));
    executable(&bins.join("portmap"));
    let kubelet = d.join("kubelet-config.json");
    std::fs::write(&kubelet, r#"{"kind":"KubeletConfiguration","maxPods":250}"#).expect("kubelet");
    Node {
        lab,
        conf,
        bins,
        kubelet,
        proc_dir,
        aws_state,
        user: None,
    }
}

#[test]
fn doctor_fails_each_fault_on_a_lab_node_and_passes_after_the_fix() {
    if !require_root("doctor_fails_each_fault_on_a_lab_node_and_passes_after_the_fix") {
        return;
    }
    let mut n = node();
    let s0 = n.lab.subnet(0);
    n.lab.wait_route(
        0,
        &n.lab.subnet(1).to_string(),
        true,
        Duration::from_secs(10),
    );

    // Healthy: everything passes (wait for readiness: etcd contact and peers come first).
    wait_for("a healthy doctor", Duration::from_secs(20), || {
        let (out, checks) = n.doctor();
        (out.status.success() && checks.values().all(|(v, _)| v == "PASS")).then_some(())
    });
    let (out, _) = n.doctor();
    eprintln!("healthy:\n{}", String::from_utf8_lossy(&out.stdout));

    // CNI config: another file sorting first; aws-cni still chained; a missing plugin binary.
    std::fs::write(
        n.conf.join("00-aaa.conf"),
        r#"{"cniVersion":"0.4.0","name":"x","type":"bridge"}"#,
    )
    .unwrap();
    assert!(n
        .expect("cni-config", "FAIL")
        .contains("00-aaa.conf sorts before"));
    std::fs::remove_file(n.conf.join("00-aaa.conf")).unwrap();
    n.expect("cni-config", "PASS");
    std::fs::write(
        n.conf.join("10-aws.conflist"),
        r#"{"cniVersion":"0.4.0","name":"aws-cni","plugins":[{"type":"aws-cni","vethPrefix":"eni"}]}"#,
    )
    .unwrap();
    assert!(n.expect("cni-config", "FAIL").contains("aws-cni"));
    assert!(n.expect("aws-node", "FAIL").contains("leftover"));
    std::fs::remove_file(n.conf.join("10-aws.conflist")).unwrap();
    n.expect("cni-config", "PASS");
    n.expect("aws-node", "PASS");
    std::fs::remove_file(n.bins.join("portmap")).unwrap();
    assert!(n.expect("cni-plugins", "FAIL").contains("portmap"));
    executable(&n.bins.join("portmap"));
    n.expect("cni-plugins", "PASS");

    // aws-node: its ipamd running, then one of its iptables chains left behind.
    let pid = n.proc_dir.join("4242");
    std::fs::create_dir(&pid).unwrap();
    std::fs::write(pid.join("comm"), "aws-k8s-agent\n").unwrap();
    assert!(n.expect("aws-node", "FAIL").contains("still runs"));
    std::fs::remove_dir_all(&pid).unwrap();
    n.expect("aws-node", "PASS");
    n.sh("iptables -t nat -N AWS-SNAT-CHAIN-0");
    assert!(n.expect("aws-node", "FAIL").contains("AWS-SNAT-CHAIN-0"));
    n.sh("iptables -t nat -X AWS-SNAT-CHAIN-0");
    n.expect("aws-node", "PASS");

    // Kernel switches, in the node's own namespace.
    n.sh("echo 0 > /proc/sys/net/bridge/bridge-nf-call-iptables");
    n.expect("br-netfilter", "FAIL");
    n.sh("echo 1 > /proc/sys/net/bridge/bridge-nf-call-iptables");
    n.expect("br-netfilter", "PASS");
    n.sh("echo 0 > /proc/sys/net/ipv4/ip_forward");
    n.expect("ip-forward", "FAIL");
    n.sh("echo 1 > /proc/sys/net/ipv4/ip_forward");
    n.expect("ip-forward", "PASS");
    n.sh("echo 1 > /proc/sys/net/ipv4/conf/overlay.1/rp_filter");
    assert!(n.expect("rp-filter", "FAIL").contains("overlay.1"));
    n.sh("echo 0 > /proc/sys/net/ipv4/conf/overlay.1/rp_filter");
    n.expect("rp-filter", "PASS");

    // MTU: a pod's host veth above the VTEP's.
    n.lab.add_pod(0);
    let veth = n.lab.nodes[0]
        .ns
        .ip_out(&["-o", "link", "show", "master", "cni0"]);
    let veth = veth
        .split(':')
        .nth(1)
        .and_then(|s| s.trim().split('@').next())
        .expect("a host veth on cni0")
        .to_string();
    n.sh(&format!("ip link set {veth} mtu 1500"));
    assert!(n.expect("mtu", "FAIL").contains("1500"));
    n.sh(&format!("ip link set {veth} mtu 1450"));
    n.expect("mtu", "PASS");

    // IPAM: near full, then full (address files as the plugin's store holds them).
    let store = n.lab.nodes[0].ipam_dir.join("lab");
    let hosts: Vec<std::net::Ipv4Addr> = (2..255u32)
        .map(|h| std::net::Ipv4Addr::from(u32::from(s0.network()) + h))
        .collect();
    let fake: Vec<PathBuf> = hosts
        .iter()
        .map(|ip| store.join(ip.to_string()))
        .filter(|p| !p.exists())
        .collect();
    for p in &fake[..230] {
        std::fs::write(p, "fake\neth0").unwrap();
    }
    n.expect("ipam", "WARN");
    for p in &fake[230..] {
        std::fs::write(p, "fake\neth0").unwrap();
    }
    assert!(n
        .expect("ipam", "FAIL")
        .contains("new pods on this node fail"));
    for p in &fake {
        std::fs::remove_file(p).unwrap();
    }
    n.expect("ipam", "PASS");

    // kubelet's maxPods: ENI-bound on AL2, then an AL2023 drop-in that lowers it again.
    std::fs::write(&n.kubelet, r#"{"maxPods":17}"#).unwrap();
    assert!(n.expect("kubelet-max-pods", "WARN").contains("17"));
    std::fs::write(&n.kubelet, r#"{"maxPods":250}"#).unwrap();
    n.expect("kubelet-max-pods", "PASS");
    let dropins = PathBuf::from(format!("{}.d", n.kubelet.display()));
    std::fs::create_dir(&dropins).unwrap();
    std::fs::write(dropins.join("00-nodeadm.conf"), r#"{"maxPods":29}"#).unwrap();
    assert!(n.expect("kubelet-max-pods", "WARN").contains("29"));
    std::fs::remove_dir_all(&dropins).unwrap();
    n.expect("kubelet-max-pods", "PASS");

    // A peer that stops answering through the overlay (its VXLAN port blocked, as a security
    // group without UDP 8472 does): the probes see it (node0 probes every 2 s here).
    let block = ["-p", "udp", "--dport", "8472", "-j", "DROP"];
    assert!(n.lab.nodes[1]
        .ns
        .ok("iptables", &[&["-I", "INPUT"][..], &block].concat()));
    n.expect("peers", "FAIL");
    // The cause follows within a second or so (looked up in etcd).
    wait_for(
        "the cause in the peers check",
        Duration::from_secs(10),
        || {
            let (_, checks) = n.doctor();
            let (v, detail) = checks.get("peers").cloned().unwrap_or_default();
            (v == "FAIL" && detail.contains("no VXLAN reply from 192.0.2.11 (UDP 8472)"))
                .then_some(())
        },
    );
    assert!(n.lab.nodes[1]
        .ns
        .ok("iptables", &[&["-D", "INPUT"][..], &block].concat()));
    n.expect("peers", "PASS");

    // The network config: invalid, then fixed.
    n.lab
        .etcd
        .put(&format!("{PREFIX}/config"), r#"{"Network":"bogus"}"#);
    assert!(n.expect("network-config", "FAIL").contains("Network"));
    n.lab.etcd.put(&format!("{PREFIX}/config"), DEFAULT_CONFIG);
    n.expect("network-config", "PASS");

    // iptables, with the daemon stopped (it would repair at once): our jump ahead of
    // kube-proxy's, then our chains gone. The restarted daemon puts both right.
    n.lab.stop_daemon(0, "TERM");
    n.expect("daemon", "FAIL");
    n.sh("iptables -N KUBE-FORWARD && iptables -A FORWARD -j KUBE-FORWARD");
    assert!(n
        .expect("iptables", "FAIL")
        .contains("ahead of kube-proxy's KUBE-FORWARD"));
    n.sh("iptables -D FORWARD -m comment --comment 'overlayd: pod forwarding' -j OVERLAY-FWD && iptables -F OVERLAY-FWD && iptables -X OVERLAY-FWD");
    assert!(n.expect("iptables", "FAIL").contains("OVERLAY-FWD"));
    // The lease, too: its key deleted while the daemon is away.
    n.lab.etcd.ctl(&["del", &n.lab.subnet_key(0)]);
    assert!(n.expect("lease", "FAIL").contains("no key in etcd"));
    n.lab.start_daemon(0);
    n.expect("iptables", "PASS");
    n.expect("lease", "PASS");
    n.expect("daemon", "PASS");

    // etcd away, then back.
    n.lab.etcd.stop();
    n.expect("etcd", "FAIL");
    n.lab.etcd.restart();
    n.expect("etcd", "PASS");

    // etcd's users: a wrong password, and a user who may only read the prefix.
    n.lab.etcd.enable_auth("overlayd", "pw", PREFIX);
    n.user = Some(("overlayd".into(), "wrong".into()));
    assert!(n
        .expect("etcd", "FAIL")
        .contains("wrong username or password"));
    n.lab.etcd.ctl(&["role", "add", "reader"]);
    n.lab.etcd.ctl(&[
        "role",
        "grant-permission",
        "reader",
        "read",
        PREFIX,
        "--prefix",
    ]);
    n.lab.etcd.ctl(&["user", "add", "reader:rpw"]);
    n.lab.etcd.ctl(&["user", "grant-role", "reader", "reader"]);
    n.user = Some(("reader".into(), "rpw".into()));
    assert!(n.expect("etcd-permission", "FAIL").contains("readwrite"));
    n.user = Some(("overlayd".into(), "pw".into()));
    n.expect("etcd-permission", "PASS");
}
