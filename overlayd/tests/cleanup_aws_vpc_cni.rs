//! `overlayd cleanup aws-vpc-cni` against a network namespace dressed as a node that ran aws-node.
//!
//! The lab writes aws-node's state the way the VPC CNI writes it (iptables in both backends: the older
//! chained AWS-SNAT-CHAIN-0..2 style in legacy, the v1.16+ single-chain style in nft; the mangle
//! CONNMARK rules; the v1.23+ nftables table `ip aws-cni`; ip rules 512/1024/1535/1536, the pre-1.3
//! `not to <VPC>` rule and the priority-10 rules of security groups for pods; per-ENI and branch-ENI
//! tables; main-table routes to pods on `eni…` links; `10-aws.conflist`; `ipam.json`), next to things
//! that are not aws-node's (kube-proxy's chains, an unrelated MASQUERADE and mangle rule, look-alike
//! ip rules at priorities 10 and 512, another table, another CNI's conflist).
//!
//! Every test also builds a *control* namespace holding only what must survive, and compares the
//! lab with it after the cleanup: `iptables-legacy-save`, `iptables-nft-save`, `nft list ruleset`,
//! `ip -4 rule`, `ip -4 route show table all`. Nothing touches the host: the tool runs inside the
//! namespace, files live in temp dirs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::RwLock;

use overlay_testlab::{require_root, run, Netns};

/// Tests that start a fake ipamd (visible to every process on the host) take this exclusively.
static HOST_PROCESSES: RwLock<()> = RwLock::new(());

const OVERLAYD: &str = env!("CARGO_BIN_EXE_overlayd");

/// Older releases: chains -0 … -N linked by `! -d <cidr> -j …-CHAIN-<i+1>`; the NEW-state jump.
const LEGACY_RULES: &str = r#"*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:AWS-SNAT-CHAIN-0 - [0:0]
:AWS-SNAT-CHAIN-1 - [0:0]
:AWS-SNAT-CHAIN-2 - [0:0]
:AWS-CONNMARK-CHAIN-0 - [0:0]
:AWS-CONNMARK-CHAIN-1 - [0:0]
:AWS-CONNMARK-CHAIN-2 - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -i eni+ -m comment --comment "AWS, outbound connections" -m state --state NEW -j AWS-CONNMARK-CHAIN-0
-A PREROUTING -m comment --comment "AWS, CONNMARK" -j CONNMARK --restore-mark --mask 0x80
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -m comment --comment "AWS SNAT CHAIN" -j AWS-SNAT-CHAIN-0
-A POSTROUTING -s 10.99.0.0/16 ! -d 10.99.0.0/16 -m comment --comment "unrelated masquerade" -j MASQUERADE
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A AWS-SNAT-CHAIN-0 ! -d 192.168.0.0/16 -m comment --comment "AWS SNAT CHAIN" -j AWS-SNAT-CHAIN-1
-A AWS-SNAT-CHAIN-1 ! -d 100.64.0.0/16 -m comment --comment "AWS SNAT CHAIN" -j AWS-SNAT-CHAIN-2
-A AWS-SNAT-CHAIN-2 ! -o vlan+ -m comment --comment "AWS, SNAT" -m addrtype ! --dst-type LOCAL -j SNAT --to-source 192.168.10.20 --random-fully
-A AWS-CONNMARK-CHAIN-0 ! -d 192.168.0.0/16 -m comment --comment "AWS CONNMARK CHAIN, VPC CIDR" -j AWS-CONNMARK-CHAIN-1
-A AWS-CONNMARK-CHAIN-1 ! -d 100.64.0.0/16 -m comment --comment "AWS CONNMARK CHAIN, VPC CIDR" -j AWS-CONNMARK-CHAIN-2
-A AWS-CONNMARK-CHAIN-2 -m comment --comment "AWS, CONNMARK" -j CONNMARK --set-xmark 0x80/0x80
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-KUBELET-CANARY - [0:0]
-A PREROUTING -i eth0 -m comment --comment "AWS, primary ENI" -m addrtype --dst-type LOCAL --limit-iface-in -j CONNMARK --set-xmark 0x80/0x80
-A PREROUTING -i eni+ -m comment --comment "AWS, primary ENI" -j CONNMARK --restore-mark --mask 0x80
-A PREROUTING -i vlan+ -m comment --comment "AWS, primary ENI" -j CONNMARK --restore-mark --mask 0x80
-A PREROUTING -i eth0 -p tcp --dport 9999 -m comment --comment "unrelated mark" -j MARK --set-xmark 0x1/0x1
COMMIT
"#;

/// v1.16+: one AWS-SNAT-CHAIN-0 and one AWS-CONNMARK-CHAIN-0 holding RETURN rules per CIDR.
const NFT_BACKEND_RULES: &str = r#"*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:AWS-SNAT-CHAIN-0 - [0:0]
:AWS-CONNMARK-CHAIN-0 - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -i eni+ -m comment --comment "AWS, outbound connections" -j AWS-CONNMARK-CHAIN-0
-A PREROUTING -m comment --comment "AWS, CONNMARK" -j CONNMARK --restore-mark --mask 0x80
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -m comment --comment "AWS SNAT CHAIN" -j AWS-SNAT-CHAIN-0
-A POSTROUTING -s 10.99.0.0/16 ! -d 10.99.0.0/16 -m comment --comment "unrelated masquerade" -j MASQUERADE
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A AWS-SNAT-CHAIN-0 -d 192.168.0.0/16 -m comment --comment "AWS SNAT CHAIN" -j RETURN
-A AWS-SNAT-CHAIN-0 -d 10.60.0.0/16 -m comment --comment "AWS SNAT CHAIN EXCLUSION" -j RETURN
-A AWS-SNAT-CHAIN-0 ! -o vlan+ -m comment --comment "AWS, SNAT" -m addrtype ! --dst-type LOCAL -j SNAT --to-source 192.168.10.20 --random-fully
-A AWS-CONNMARK-CHAIN-0 -d 192.168.0.0/16 -m comment --comment "AWS CONNMARK CHAIN, VPC CIDR" -j RETURN
-A AWS-CONNMARK-CHAIN-0 -m comment --comment "AWS, CONNMARK" -j CONNMARK --set-xmark 0x80/0x80
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -i eth0 -m comment --comment "AWS, primary ENI" -m addrtype --dst-type LOCAL --limit-iface-in -j CONNMARK --set-xmark 0x80/0x80
-A PREROUTING -i eni+ -m comment --comment "AWS, primary ENI" -j CONNMARK --restore-mark --mask 0x80
-A PREROUTING -i eth0 -p tcp --dport 9999 -m comment --comment "unrelated mark" -j MARK --set-xmark 0x1/0x1
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FORWARD - [0:0]
-A FORWARD -d 169.254.172.0/22 -m conntrack --ctstate NEW -m comment --comment "Block Node Local Pod access via IPv4" -j REJECT --reject-with icmp-port-unreachable
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A KUBE-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT
COMMIT
"#;

/// v1.23+ on nf_tables: the connmark logic in aws-node's own table.
const AWS_CNI_NFT_TABLE: &str = r#"table ip aws-cni {
    chain nat-prerouting {
        type nat hook prerouting priority -90; policy accept;
        fib daddr type local return
        iifname "eni*" counter jump snat-mark
        ct mark & 0x80 == 0x0 counter meta mark set meta mark & 0xffffff7f
        ct mark & 0x80 == 0x80 counter meta mark set meta mark | 0x80
    }
    chain snat-mark {
        counter ip daddr 192.168.0.0/16 return
        counter ct mark set ct mark | 0x80
    }
}
"#;

/// True for the iptables lines the control namespace leaves out.
fn is_aws_line(line: &str) -> bool {
    line.contains("AWS") || line.contains("Block Node Local Pod access")
}

/// Whose a lab item is, and whether `--keep-running-pods` keeps it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Owner {
    Someone,
    AwsNode,
    /// aws-node's, belonging to a pod whose `eni…` link still exists.
    AwsLivePod,
}

const LIVE_POD_A_LINK: &str = "eni1111aaaa222";
const LIVE_POD_B_LINK: &str = "eni3333bbbb444";
const LIVE_POD_E_LINK: &str = "eni5555cccc666";
const LIVE_POD_E_VLAN: &str = "vlan.eth.7";

/// `ip` commands of the lab, in order. Links come first and exist in the control namespace too.
/// Pod veths are named like aws-node names them (`eni` + 11 hex digits).
fn netlink_lab() -> Vec<(Owner, Vec<&'static str>)> {
    use Owner::*;
    let mut v: Vec<(Owner, Vec<&'static str>)> = Vec::new();
    // veth pairs (the peer stays in the namespace; the lab does not rely on the dummy module).
    for (link, peer, addr) in [
        ("eth0", "eth0-peer", Some("192.168.10.20/24")),
        ("eth1", "eth1-peer", Some("192.168.20.30/24")),
        ("eth2", "eth2-peer", Some("192.168.30.40/24")),
        (LIVE_POD_A_LINK, "pod-a", None),
        (LIVE_POD_B_LINK, "pod-b", None),
        (LIVE_POD_E_LINK, "pod-e", None),
        (LIVE_POD_E_VLAN, "vlan7-peer", None),
    ] {
        v.push((
            Someone,
            vec!["link", "add", link, "type", "veth", "peer", "name", peer],
        ));
        v.push((Someone, vec!["link", "set", peer, "up"]));
        v.push((Someone, vec!["link", "set", link, "up"]));
        if let Some(a) = addr {
            v.push((Someone, vec!["addr", "add", a, "dev", link]));
        }
    }
    let cmds: &[(Owner, &str)] = &[
        // The node's own routing, someone else's table and rules, a look-alike at priority 512.
        (Someone, "route add default via 192.168.10.1 dev eth0"),
        (Someone, "route add 10.99.5.5/32 dev eth0 scope link"),
        (
            Someone,
            "route add default via 192.168.10.1 dev eth0 table 100",
        ),
        (
            Someone,
            "rule add from 10.99.0.0/16 lookup 100 priority 2000",
        ),
        (Someone, "rule add to 10.99.1.1/32 lookup 100 priority 512"),
        // aws-node, node level.
        (
            AwsNode,
            "rule add fwmark 0x80/0x80 lookup main priority 1024",
        ),
        (
            AwsNode,
            "rule add to 10.50.0.0/16 lookup main priority 1535",
        ),
        // Releases before 1.3.
        (
            AwsNode,
            "rule add not to 192.168.0.0/16 lookup main priority 1024",
        ),
        // Per-ENI tables: eth1 → 2, eth2 → 3.
        (
            AwsLivePod,
            "route add 192.168.20.1/32 dev eth1 scope link table 2",
        ),
        (
            AwsLivePod,
            "route add default via 192.168.20.1 dev eth1 table 2",
        ),
        (
            AwsNode,
            "route add 192.168.30.1/32 dev eth2 scope link table 3",
        ),
        (
            AwsNode,
            "route add default via 192.168.30.1 dev eth2 table 3",
        ),
        // Live pod A on the primary ENI (no from-pod rule), live pod B on eth1.
        (
            AwsLivePod,
            "rule add to 192.168.10.50/32 lookup main priority 512",
        ),
        (
            AwsLivePod,
            "route add 192.168.10.50/32 dev eni1111aaaa222 scope link",
        ),
        (
            AwsLivePod,
            "rule add to 192.168.20.51/32 lookup main priority 512",
        ),
        (
            AwsLivePod,
            "rule add from 192.168.20.51/32 lookup 2 priority 1536",
        ),
        (
            AwsLivePod,
            "route add 192.168.20.51/32 dev eni3333bbbb444 scope link",
        ),
        // Stale pods (their veths are gone, and with them their main-table routes): C on eth2, D on eth1.
        (
            AwsNode,
            "rule add to 192.168.30.52/32 lookup main priority 512",
        ),
        (
            AwsNode,
            "rule add from 192.168.30.52/32 lookup 3 priority 1536",
        ),
        (
            AwsNode,
            "rule add to 192.168.20.53/32 lookup main priority 512",
        ),
        (
            AwsNode,
            "rule add from 192.168.20.53/32 lookup 2 priority 1536",
        ),
        // A second stale pod rule into table 3, to see duplicates of a table handled.
        (
            AwsNode,
            "rule add to 192.168.30.54/32 lookup main priority 512",
        ),
        (
            AwsNode,
            "rule add from 192.168.30.54/32 lookup 3 priority 1536",
        ),
        // Security groups for pods, strict mode: live branch-ENI pod E (VLAN 7, table 107), stale
        // pod F (VLAN 9, links gone, so its table lost its routes), and someone else's rule at 10.
        (Someone, "rule add iif eth0 lookup 100 priority 10"),
        (
            AwsLivePod,
            "route add 192.168.40.1/32 dev vlan.eth.7 scope link table 107",
        ),
        (
            AwsLivePod,
            "route add default via 192.168.40.1 dev vlan.eth.7 table 107",
        ),
        (
            AwsLivePod,
            "route add 192.168.40.61/32 dev eni5555cccc666 scope link table 107",
        ),
        (AwsLivePod, "rule add iif vlan.eth.7 lookup 107 priority 10"),
        (
            AwsLivePod,
            "rule add iif eni5555cccc666 lookup 107 priority 10",
        ),
        (AwsNode, "rule add iif vlan.eth.9 lookup 109 priority 10"),
        (
            AwsNode,
            "rule add iif eni7777dddd888 lookup 109 priority 10",
        ),
    ];
    v.extend(
        cmds.iter()
            .map(|(o, c)| (*o, c.split_whitespace().collect())),
    );
    v
}

const AWS_CONFLIST: &str = r#"{
  "cniVersion": "0.4.0",
  "name": "aws-cni",
  "disableCheck": true,
  "plugins": [
    {"name": "aws-cni", "type": "aws-cni", "vethPrefix": "eni", "mtu": "9001",
     "podSGEnforcingMode": "strict", "pluginLogFile": "/var/log/aws-routed-eni/plugin.log",
     "pluginLogLevel": "DEBUG", "capabilities": {"io.kubernetes.cri.pod-annotations": true}},
    {"name": "egress-cni", "type": "egress-cni", "mtu": "9001", "enabled": "false",
     "randomizeSNAT": "prng", "nodeIP": "",
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "169.254.172.0/22"}]],
              "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "/run/cni/v4pd/egress-v4-ipam"}},
    {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}
  ]
}
"#;

const OTHER_CONFLIST: &str =
    r#"{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"bridge","bridge":"cni0"}]}"#;

/// A namespace plus the temp dirs that stand in for /etc/cni/net.d and /var/run/aws-node.
struct Node {
    ns: Netns,
    _dir: tempfile::TempDir,
    conf_dir: PathBuf,
    state_dir: PathBuf,
}

impl Node {
    /// `keep`: which owners' items to create (the lab has all three; controls leave some out).
    fn build(tag: &str, keep: &[Owner]) -> Node {
        let ns = Netns::new(tag);
        let dir = tempfile::tempdir().expect("tempdir");
        let conf_dir = dir.path().join("net.d");
        let state_dir = dir.path().join("aws-node");
        std::fs::create_dir_all(&conf_dir).expect("mkdir");
        std::fs::create_dir_all(&state_dir).expect("mkdir");
        let node = Node {
            ns,
            _dir: dir,
            conf_dir,
            state_dir,
        };
        let aws = keep.contains(&Owner::AwsNode);

        for (tool, rules) in [
            ("iptables-legacy-restore", LEGACY_RULES),
            ("iptables-nft-restore", NFT_BACKEND_RULES),
        ] {
            let text: String = rules
                .lines()
                .filter(|l| aws || !is_aws_line(l))
                .map(|l| format!("{l}\n"))
                .collect();
            let file = node._dir.path().join(format!("{tool}.rules"));
            std::fs::write(&file, text).expect("write rules");
            run(node.ns.cmd(tool).arg(&file));
        }
        if aws {
            let file = node._dir.path().join("aws-cni.nft");
            std::fs::write(&file, AWS_CNI_NFT_TABLE).expect("write nft");
            run(node.ns.cmd("nft").arg("-f").arg(&file));
        }
        for (owner, args) in netlink_lab() {
            if keep.contains(&owner) {
                node.ns.ip(&args);
            }
        }
        std::fs::write(node.conf_dir.join("20-other.conflist"), OTHER_CONFLIST).expect("write");
        if aws {
            std::fs::write(node.conf_dir.join("10-aws.conflist"), AWS_CONFLIST).expect("write");
            std::fs::write(
                node.state_dir.join("ipam.json"),
                r#"{"version":"vpc-cni-ipam/1"}"#,
            )
            .expect("write");
        }
        node
    }

    fn lab(tag: &str) -> Node {
        Self::build(tag, &[Owner::Someone, Owner::AwsNode, Owner::AwsLivePod])
    }

    fn cleanup(&self, extra: &[&str]) -> Output {
        let out = self
            .ns
            .cmd(OVERLAYD)
            .args(["cleanup", "aws-vpc-cni", "--cni-conf-dir"])
            .arg(&self.conf_dir)
            .arg("--aws-node-state-dir")
            .arg(&self.state_dir)
            .args(extra)
            .output()
            .expect("run overlayd");
        eprintln!(
            "--- overlayd cleanup aws-vpc-cni {extra:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Output of a listing tool, without comments and with packet counters zeroed (the tool's own
    /// loopback probe for ipamd counts as traffic).
    fn text(&self, program: &str, args: &[&str]) -> String {
        let out = run(self.ns.cmd(program).args(args));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{}\n", zero_counters(l)))
            .collect()
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            iptables_legacy: self.text("iptables-legacy-save", &[]),
            iptables_nft: self.text("iptables-nft-save", &[]),
            nft_ruleset: self.text("nft", &["list", "ruleset"]),
            ip_rules: self.ns.ip_out(&["-4", "rule"]),
            routes: self.ns.ip_out(&["-4", "route", "show", "table", "all"]),
            conf_dir: dir_listing(&self.conf_dir),
            state_dir: dir_listing(&self.state_dir),
        }
    }
}

/// Everything the tests compare, as text.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot {
    iptables_legacy: String,
    iptables_nft: String,
    nft_ruleset: String,
    ip_rules: String,
    routes: String,
    conf_dir: Vec<(String, String)>,
    state_dir: Vec<(String, String)>,
}

impl Snapshot {
    /// Field-by-field equality with readable failure output.
    fn assert_same_network(&self, want: &Snapshot, what: &str) {
        assert_eq!(
            self.iptables_legacy, want.iptables_legacy,
            "{what}: iptables-legacy-save"
        );
        assert_eq!(
            self.iptables_nft, want.iptables_nft,
            "{what}: iptables-nft-save"
        );
        assert_eq!(
            self.nft_ruleset, want.nft_ruleset,
            "{what}: nft list ruleset"
        );
        assert_eq!(self.ip_rules, want.ip_rules, "{what}: ip -4 rule");
        assert_eq!(
            self.routes, want.routes,
            "{what}: ip -4 route show table all"
        );
    }
}

/// `:CHAIN POLICY [p:b]` → `[0:0]`; nft's `packets p bytes b` → `packets 0 bytes 0`.
fn zero_counters(line: &str) -> String {
    if line.starts_with(':') {
        if let Some(i) = line.rfind(" [") {
            return format!("{} [0:0]", &line[..i]);
        }
    }
    let mut out: Vec<&str> = Vec::new();
    let mut zero_next = false;
    for tok in line.split(' ') {
        out.push(if zero_next { "0" } else { tok });
        zero_next = tok == "packets" || tok == "bytes";
    }
    out.join(" ")
}

fn dir_listing(dir: &Path) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| {
            let e = e.expect("entry");
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read_to_string(e.path()).unwrap_or_default(),
            )
        })
        .collect();
    v.sort();
    v
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn assert_no_aws_iptables(s: &Snapshot) {
    for (what, text) in [
        ("legacy", &s.iptables_legacy),
        ("nft", &s.iptables_nft),
        ("ruleset", &s.nft_ruleset),
    ] {
        for line in text.lines() {
            assert!(
                !is_aws_line(line) && !line.contains("aws-cni"),
                "{what} still holds aws-node's {line:?}"
            );
        }
    }
}

#[test]
fn dry_run_then_cleanup_then_nothing_left() {
    if !require_root("dry_run_then_cleanup_then_nothing_left") {
        return;
    }
    let _guard = HOST_PROCESSES.read().unwrap_or_else(|e| e.into_inner());
    let lab = Node::lab("awsc");
    let control = Node::build("awsk", &[Owner::Someone]);
    let before = lab.snapshot();
    assert!(
        before.iptables_legacy.contains("AWS-SNAT-CHAIN-2"),
        "lab is built"
    );
    assert!(before.iptables_nft.contains("AWS-SNAT-CHAIN-0"));
    assert!(before.nft_ruleset.contains("table ip aws-cni"));
    assert!(before.ip_rules.contains("1536:"));

    // Dry run: lists every item, grouped, and changes nothing.
    let dry = lab.cleanup(&["--dry-run"]);
    assert_eq!(dry.status.code(), Some(0));
    let out = stdout(&dry);
    for needle in [
        "iptables legacy:",
        "iptables nft:",
        "nftables:",
        "ip rules:",
        "routes:",
        "files:",
        "would remove  nat: chain AWS-SNAT-CHAIN-2",
        "would remove  nat: chain AWS-CONNMARK-CHAIN-0",
        r#"would remove  nat: -A POSTROUTING -m comment --comment "AWS SNAT CHAIN" -j AWS-SNAT-CHAIN-0"#,
        "would remove  mangle: -A PREROUTING -i vlan+",
        "would remove  filter: -A FORWARD -d 169.254.172.0/22",
        "would remove  table ip aws-cni (chains: nat-prerouting, snat-mark)",
        "would remove  1024: from all fwmark 0x80/0x80 lookup main",
        "would remove  1535: from all to 10.50.0.0/16 lookup main",
        "would remove  1024: not from all to 192.168.0.0/16 lookup main",
        "would remove  10: from all iif vlan.eth.7 lookup 107",
        "would remove  10: from all iif eni7777dddd888 lookup 109",
        "would remove  192.168.40.61 dev eni5555cccc666 table 107 scope link",
        "would remove  1536: from 192.168.30.52/32 lookup 3",
        "would remove  512: from all to 192.168.10.50/32 lookup main",
        "would remove  192.168.20.51 dev eni3333bbbb444 scope link",
        "would remove  default via 192.168.30.1 dev eth2 table 3",
        "would remove  default via 192.168.20.1 dev eth1 table 2",
        "10-aws.conflist -> 10-aws.conflist.overlayd-bak",
        "aws-node/ipam.json -> ipam.json.overlayd-bak",
    ] {
        assert!(
            out.contains(needle),
            "dry run does not list {needle:?}:\n{out}"
        );
    }
    assert!(
        !out.contains("KUBE-"),
        "kube-proxy's rules are not listed:\n{out}"
    );
    assert!(
        !out.contains("10.99."),
        "someone else's rules are not listed:\n{out}"
    );
    assert!(!out.contains("20-other.conflist"), "{out}");
    let after_dry = lab.snapshot();
    assert_eq!(after_dry, before, "a dry run changes nothing");

    // Real run: aws-node's state is gone, everything else is exactly as in the control node.
    let real = lab.cleanup(&[]);
    assert_eq!(real.status.code(), Some(0), "{}", stdout(&real));
    assert!(stdout(&real).contains("removed       table ip aws-cni"));
    let after = lab.snapshot();
    assert_no_aws_iptables(&after);
    after.assert_same_network(
        &control.snapshot(),
        "after cleanup vs a node that never ran aws-node",
    );
    assert!(after.iptables_legacy.contains("-j KUBE-POSTROUTING"));
    assert!(after.iptables_nft.contains("unrelated masquerade"));
    assert!(after.iptables_nft.contains("unrelated mark"));
    assert!(after
        .ip_rules
        .contains("512:\tfrom all to 10.99.1.1 lookup 100"));
    assert!(after.routes.contains("default via 192.168.10.1 dev eth0"));
    let conf_names: Vec<&str> = after.conf_dir.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        conf_names,
        ["10-aws.conflist.overlayd-bak", "20-other.conflist"]
    );
    assert_eq!(
        after.conf_dir[0].1, AWS_CONFLIST,
        "the aws config is kept as a backup"
    );
    assert_eq!(after.conf_dir[1].1, OTHER_CONFLIST);
    let state_names: Vec<&str> = after.state_dir.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(state_names, ["ipam.json.overlayd-bak"]);

    // Second run: nothing found, exit 0, nothing changes.
    let again = lab.cleanup(&[]);
    assert_eq!(again.status.code(), Some(0));
    let out = stdout(&again);
    assert!(out.contains("summary: 0 item(s) removed"), "{out}");
    assert_eq!(out.matches("nothing of aws-node's").count(), 6, "{out}");
    assert_eq!(lab.snapshot(), after);
}

#[test]
fn keep_running_pods_keeps_live_pods_routing() {
    if !require_root("keep_running_pods_keeps_live_pods_routing") {
        return;
    }
    let _guard = HOST_PROCESSES.read().unwrap_or_else(|e| e.into_inner());
    let lab = Node::lab("awsp");
    // What must be left: someone else's things plus the live pods' rules, routes and ENI table.
    let control = Node::build("awsq", &[Owner::Someone, Owner::AwsLivePod]);

    let dry = lab.cleanup(&["--dry-run", "--keep-running-pods"]);
    assert_eq!(dry.status.code(), Some(0));
    let out = stdout(&dry);
    assert!(
        out.contains("would keep    512: from all to 192.168.20.51/32 lookup main  (pod 192.168.20.51 still runs behind eni3333bbbb444)"),
        "{out}"
    );
    assert!(
        out.contains("would remove  1536: from 192.168.20.53/32 lookup 2"),
        "{out}"
    );

    let real = lab.cleanup(&["--keep-running-pods"]);
    assert_eq!(real.status.code(), Some(0), "{}", stdout(&real));
    let after = lab.snapshot();
    assert_no_aws_iptables(&after);
    after.assert_same_network(&control.snapshot(), "after --keep-running-pods");
    assert!(after.ip_rules.contains("from 192.168.20.51 lookup 2"));
    assert!(
        !after.ip_rules.contains("192.168.20.53"),
        "stale pod D's rules go"
    );
    assert!(
        !after.ip_rules.contains("192.168.30.52"),
        "stale pod C's rules go"
    );
    assert!(
        !after.routes.contains("table 3"),
        "the stale pods' ENI table is emptied"
    );
    assert!(after
        .routes
        .contains("default via 192.168.20.1 dev eth1 table 2"));
    assert!(after
        .routes
        .contains("192.168.10.50 dev eni1111aaaa222 scope link"));
    assert!(after
        .ip_rules
        .contains("10:\tfrom all iif vlan.eth.7 lookup 107"));
    assert!(after.ip_rules.contains("10:\tfrom all iif eth0 lookup 100"));
    assert!(
        !after.ip_rules.contains("vlan.eth.9"),
        "stale branch-ENI pod F's rules go"
    );
    assert!(after
        .routes
        .contains("default via 192.168.40.1 dev vlan.eth.7 table 107"));

    // Once the pods are gone (their veths deleted), a plain run removes the rest.
    lab.ns.ip(&["link", "del", LIVE_POD_A_LINK]);
    lab.ns.ip(&["link", "del", LIVE_POD_B_LINK]);
    lab.ns.ip(&["link", "del", LIVE_POD_E_LINK]);
    lab.ns.ip(&["link", "del", LIVE_POD_E_VLAN]);
    let last = lab.cleanup(&["--keep-running-pods"]);
    assert_eq!(last.status.code(), Some(0));
    let done = lab.snapshot();
    assert!(
        !done.ip_rules.contains("192.168.20.51"),
        "{}",
        done.ip_rules
    );
    assert!(!done.routes.contains("table 2"), "{}", done.routes);
    assert!(!done.routes.contains("table 107"), "{}", done.routes);
    assert!(!done.ip_rules.contains("lookup 107"), "{}", done.ip_rules);
    assert!(done.ip_rules.contains("from 10.99.0.0/16 lookup 100"));
}

#[test]
fn refuses_while_ipamd_runs() {
    if !require_root("refuses_while_ipamd_runs") {
        return;
    }
    let _guard = HOST_PROCESSES.write().unwrap_or_else(|e| e.into_inner());
    let lab = Node::lab("awsr");
    let before = lab.snapshot();

    // A process named like ipamd (`aws-k8s-agent`): a copy of sleep.
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = dir.path().join("aws-k8s-agent");
    std::fs::copy("/bin/sleep", &fake).expect("copy sleep");
    let mut agent = Command::new(&fake)
        .arg("60")
        .spawn()
        .expect("start fake ipamd");
    overlay_testlab::wait_for(
        "the fake ipamd to show in /proc",
        std::time::Duration::from_secs(5),
        || {
            std::fs::read_to_string(format!("/proc/{}/comm", agent.id()))
                .ok()
                .filter(|c| c.trim_end() == "aws-k8s-agent")
        },
    );

    let real = lab.cleanup(&[]);
    let dry = lab.cleanup(&["--dry-run"]);
    let _ = agent.kill();
    let _ = agent.wait();

    assert_eq!(real.status.code(), Some(3), "{}", stdout(&real));
    assert!(stdout(&real).contains("Nothing was changed."));
    assert!(stdout(&real).contains("kubectl -n kube-system delete daemonset aws-node"));
    assert_eq!(lab.snapshot(), before, "nothing changes while ipamd runs");
    // A dry run still lists, and says why a real run would stop.
    assert_eq!(dry.status.code(), Some(0), "{}", stdout(&dry));
    assert!(stdout(&dry).contains("is still running as pid"));
    assert!(stdout(&dry).contains("would remove"));
}

#[test]
fn a_removal_that_fails_is_reported_and_the_rest_still_goes() {
    if !require_root("a_removal_that_fails_is_reported_and_the_rest_still_goes") {
        return;
    }
    let _guard = HOST_PROCESSES.read().unwrap_or_else(|e| e.into_inner());
    let lab = Node::lab("awsf");
    let control = Node::build("awsg", &[Owner::Someone]);
    // A kube-proxy chain jumping into aws-node's last SNAT chain: the cleanup never touches
    // KUBE-* chains, so that chain cannot be deleted and the nat transaction fails.
    run(lab.ns.cmd("iptables-legacy").args([
        "-t",
        "nat",
        "-A",
        "KUBE-POSTROUTING",
        "-j",
        "AWS-SNAT-CHAIN-2",
    ]));

    let first = lab.cleanup(&[]);
    assert_eq!(first.status.code(), Some(1), "{}", stdout(&first));
    let out = stdout(&first);
    assert!(
        out.contains("FAILED        nat: chain AWS-SNAT-CHAIN-2"),
        "{out}"
    );
    assert!(out.contains(", 1 FAILED; exit 1"), "{out}");
    assert!(
        out.contains("note: still referenced by `-A KUBE-POSTROUTING -j AWS-SNAT-CHAIN-2`"),
        "the report says what keeps the chain: {out}"
    );
    assert!(
        out.contains("removed       nat: chain AWS-SNAT-CHAIN-1"),
        "{out}"
    );

    let after = lab.snapshot();
    let want = control.snapshot();
    // Everything else went: the nft backend, the nft table, rules, routes, files.
    assert_eq!(after.iptables_nft, want.iptables_nft);
    assert_eq!(after.nft_ruleset, want.nft_ruleset);
    assert_eq!(after.ip_rules, want.ip_rules);
    assert_eq!(after.routes, want.routes);
    assert!(after.conf_dir.iter().all(|(n, _)| n != "10-aws.conflist"));
    // In legacy, only the referenced chain is left (flushed), and kube-proxy's jump into it.
    let aws_lines: Vec<&str> = after
        .iptables_legacy
        .lines()
        .filter(|l| is_aws_line(l))
        .collect();
    assert_eq!(
        aws_lines,
        [
            ":AWS-SNAT-CHAIN-2 - [0:0]",
            "-A KUBE-POSTROUTING -j AWS-SNAT-CHAIN-2"
        ]
    );

    // Still there on a second run, still reported, still exit 1.
    let second = lab.cleanup(&[]);
    assert_eq!(second.status.code(), Some(1));
    assert!(stdout(&second).contains("summary: 0 item(s) removed, 1 FAILED; exit 1"));
}

#[test]
fn a_backend_whose_tools_are_missing_is_skipped_with_a_note() {
    if !require_root("a_backend_whose_tools_are_missing_is_skipped_with_a_note") {
        return;
    }
    let _guard = HOST_PROCESSES.read().unwrap_or_else(|e| e.into_inner());
    let lab = Node::lab("awsm");
    let before = lab.snapshot();
    // An image that ships only the nf_tables flavour: PATH holds ip, nft and iptables-nft-*.
    let bin = tempfile::tempdir().expect("tempdir");
    for tool in ["ip", "nft", "iptables-nft-save", "iptables-nft-restore"] {
        let found = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{tool} is not installed"));
        std::os::unix::fs::symlink(&found, bin.path().join(tool)).expect("symlink");
    }
    let out = lab
        .ns
        .cmd(OVERLAYD)
        .env("PATH", bin.path())
        .args(["cleanup", "aws-vpc-cni", "--cni-conf-dir"])
        .arg(&lab.conf_dir)
        .arg("--aws-node-state-dir")
        .arg(&lab.state_dir)
        .output()
        .expect("run overlayd");
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("iptables legacy:\n  note: iptables-legacy-save is not installed; skipped\n  nothing of aws-node's"),
        "{text}"
    );
    let after = lab.snapshot();
    assert_eq!(
        after.iptables_legacy, before.iptables_legacy,
        "legacy was left alone"
    );
    assert!(
        !after.iptables_nft.contains("AWS"),
        "the nft backend was cleaned"
    );
}

#[test]
fn a_custom_veth_prefix_is_read_from_the_conflist() {
    if !require_root("a_custom_veth_prefix_is_read_from_the_conflist") {
        return;
    }
    let _guard = HOST_PROCESSES.read().unwrap_or_else(|e| e.into_inner());
    // A node whose aws-node ran with AWS_VPC_K8S_CNI_VETHPREFIX=abc.
    let node = Node::build("awsv", &[Owner::Someone]);
    let before = node.snapshot();
    std::fs::write(
        node.conf_dir.join("10-aws.conflist"),
        AWS_CONFLIST.replace(r#""vethPrefix": "eni""#, r#""vethPrefix": "abc""#),
    )
    .expect("write");
    for args in [
        "link add abc0123456789a type veth peer name pod-v",
        "link set pod-v up",
        "link set abc0123456789a up",
        "route add 192.168.50.5/32 dev abc0123456789a scope link",
        "rule add to 192.168.50.5/32 lookup main priority 512",
    ] {
        node.ns.ip(&args.split_whitespace().collect::<Vec<_>>());
    }

    let dry = node.cleanup(&["--dry-run", "--keep-running-pods"]);
    let out = stdout(&dry);
    assert_eq!(dry.status.code(), Some(0), "{out}");
    assert!(out.contains("aws-node named pod veths abc<hash>"), "{out}");
    assert!(
        out.contains("would keep    512: from all to 192.168.50.5/32 lookup main  (pod 192.168.50.5 still runs behind abc0123456789a)"),
        "{out}"
    );

    let real = node.cleanup(&[]);
    assert_eq!(real.status.code(), Some(0), "{}", stdout(&real));
    let after = node.snapshot();
    assert_eq!(after.ip_rules, before.ip_rules);
    assert_eq!(after.routes, before.routes);
}
