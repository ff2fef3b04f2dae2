//! kube-proxy's iptables rules (iptables mode) for a few Services, written into a lab node the way
//! kube-proxy writes them, so tests see overlayd next to a node as Kubernetes builds it.
//!
//! The shapes are facts taken from kube-proxy's own source, `pkg/proxy/iptables/proxier.go` of
//! the Kubernetes 1.29/1.30 generation (the one with `KUBE-PROXY-FIREWALL`, the
//! `conntrackTCPLiberal` switch for the INVALID drop and `OnServiceCIDRsChanged`):
//! - `iptablesJumpChains`: each jump is made with `EnsureRule(Prepend, …)`, i.e. `iptables -C`
//!   and, when missing, `iptables -I <chain>` (first position). Filter: `KUBE-EXTERNAL-SERVICES`
//!   from INPUT and FORWARD (`-m conntrack --ctstate NEW`), `KUBE-NODEPORTS` from INPUT,
//!   `KUBE-SERVICES` from FORWARD and OUTPUT (ctstate NEW), `KUBE-FORWARD` from FORWARD,
//!   `KUBE-PROXY-FIREWALL` from INPUT, OUTPUT and FORWARD (ctstate NEW). Nat: `KUBE-SERVICES` from
//!   OUTPUT and PREROUTING, `KUBE-POSTROUTING` from POSTROUTING. kubelet's `KUBE-FIREWALL` from
//!   INPUT and OUTPUT (no comment).
//! - Then one `iptables-restore --noflush` of the chains: `KUBE-POSTROUTING` (return unless
//!   marked 0x4000, clear the mark, MASQUERADE), `KUBE-MARK-MASQ` (or-mark 0x4000), per Service
//!   `KUBE-SERVICES` → `KUBE-SVC-*` (mark off-cluster sources), `KUBE-SVC-*` → `KUBE-SEP-*` (random
//!   probability for all but the last), `KUBE-SEP-*` (mark hairpin, DNAT), NodePorts through
//!   `KUBE-NODEPORTS` → `KUBE-EXT-*` (mark, then the SVC chain), the last `KUBE-SERVICES` rule to
//!   `KUBE-NODEPORTS` for local destinations; filter `KUBE-SERVICES` REJECT for a Service without
//!   endpoints (and `KUBE-EXTERNAL-SERVICES` for its NodePort), `KUBE-FORWARD` (INVALID drop,
//!   accept marked, accept RELATED/ESTABLISHED).
//!
//! Chain names hash the service port name as kube-proxy does (SHA-256, base32, 16 characters).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Command;

use crate::netns::Netns;

/// kube-proxy's default `--iptables-masquerade-bit` 14.
pub const MASQ_MARK: &str = "0x4000";

#[derive(Debug, Clone)]
pub struct Service {
    /// `namespace/name:port-name`, kube-proxy's service port name.
    pub name: String,
    /// `tcp` or `udp`.
    pub protocol: &'static str,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub node_port: Option<u16>,
    pub endpoints: Vec<SocketAddrV4>,
}

impl Service {
    pub fn tcp(name: &str, cluster_ip: Ipv4Addr, port: u16, endpoints: &[SocketAddrV4]) -> Service {
        Service {
            name: name.to_string(),
            protocol: "tcp",
            cluster_ip,
            port,
            node_port: None,
            endpoints: endpoints.to_vec(),
        }
    }

    pub fn with_node_port(mut self, port: u16) -> Service {
        self.node_port = Some(port);
        self
    }

    fn hash(&self, extra: &str) -> String {
        let text = format!("{}{}{}", self.name, self.protocol, extra);
        let out = crate::run(Command::new("sh").args([
            "-c",
            "printf '%s' \"$1\" | sha256sum",
            "sh",
            &text,
        ]));
        let hex = String::from_utf8_lossy(&out.stdout);
        let bytes: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("sha256sum hex"))
            .collect();
        base32(&bytes)[..16].to_string()
    }

    pub fn svc_chain(&self) -> String {
        format!("KUBE-SVC-{}", self.hash(""))
    }

    pub fn ext_chain(&self) -> String {
        format!("KUBE-EXT-{}", self.hash(""))
    }

    pub fn sep_chain(&self, ep: &SocketAddrV4) -> String {
        format!("KUBE-SEP-{}", self.hash(&ep.to_string()))
    }
}

/// RFC 4648 base32 with padding (Go's `base32.StdEncoding`).
fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    for chunk in data.chunks(5) {
        let mut buf = [0u8; 5];
        buf[..chunk.len()].copy_from_slice(chunk);
        let n = u64::from_be_bytes([0, 0, 0, buf[0], buf[1], buf[2], buf[3], buf[4]]);
        let chars = (chunk.len() * 8).div_ceil(5);
        for i in 0..8 {
            if i < chars {
                out.push(ALPHABET[((n >> (35 - 5 * i)) & 31) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// One kube-proxy: its `--cluster-cidr` (local traffic detection) and the Services it proxies.
#[derive(Debug, Clone)]
pub struct KubeProxy {
    pub cluster_cidr: String,
    pub services: Vec<Service>,
}

/// (table, chain jumped to, built-in chain, comment, extra matches), in kube-proxy's order.
const JUMPS: &[(&str, &str, &str, &str, &str)] = &[
    (
        "filter",
        "KUBE-EXTERNAL-SERVICES",
        "INPUT",
        "kubernetes externally-visible service portals",
        "-m conntrack --ctstate NEW",
    ),
    (
        "filter",
        "KUBE-EXTERNAL-SERVICES",
        "FORWARD",
        "kubernetes externally-visible service portals",
        "-m conntrack --ctstate NEW",
    ),
    (
        "filter",
        "KUBE-NODEPORTS",
        "INPUT",
        "kubernetes health check service ports",
        "",
    ),
    (
        "filter",
        "KUBE-SERVICES",
        "FORWARD",
        "kubernetes service portals",
        "-m conntrack --ctstate NEW",
    ),
    (
        "filter",
        "KUBE-SERVICES",
        "OUTPUT",
        "kubernetes service portals",
        "-m conntrack --ctstate NEW",
    ),
    (
        "filter",
        "KUBE-FORWARD",
        "FORWARD",
        "kubernetes forwarding rules",
        "",
    ),
    (
        "filter",
        "KUBE-PROXY-FIREWALL",
        "INPUT",
        "kubernetes load balancer firewall",
        "-m conntrack --ctstate NEW",
    ),
    (
        "filter",
        "KUBE-PROXY-FIREWALL",
        "OUTPUT",
        "kubernetes load balancer firewall",
        "-m conntrack --ctstate NEW",
    ),
    (
        "filter",
        "KUBE-PROXY-FIREWALL",
        "FORWARD",
        "kubernetes load balancer firewall",
        "-m conntrack --ctstate NEW",
    ),
    (
        "nat",
        "KUBE-SERVICES",
        "OUTPUT",
        "kubernetes service portals",
        "",
    ),
    (
        "nat",
        "KUBE-SERVICES",
        "PREROUTING",
        "kubernetes service portals",
        "",
    ),
    (
        "nat",
        "KUBE-POSTROUTING",
        "POSTROUTING",
        "kubernetes postrouting rules",
        "",
    ),
    // kubelet's (iptablesKubeletJumpChains): no comment.
    ("filter", "KUBE-FIREWALL", "INPUT", "", ""),
    ("filter", "KUBE-FIREWALL", "OUTPUT", "", ""),
];

impl KubeProxy {
    pub fn new(cluster_cidr: &str, services: Vec<Service>) -> KubeProxy {
        KubeProxy {
            cluster_cidr: cluster_cidr.to_string(),
            services,
        }
    }

    /// A full sync, as kube-proxy does at start and after its canary says the tables were
    /// flushed: jumps first, then the chains in one restore.
    pub fn install(&self, ns: &Netns) {
        for t in ["mangle", "nat", "filter"] {
            // kubelet's and kube-proxy's canaries (their flush detectors).
            let _ = ns
                .cmd("iptables")
                .args(["-w", "5", "-t", t, "-N", "KUBE-KUBELET-CANARY"])
                .output();
            let _ = ns
                .cmd("iptables")
                .args(["-w", "5", "-t", t, "-N", "KUBE-PROXY-CANARY"])
                .output();
        }
        self.ensure_jumps(ns);
        let input = self.restore_input();
        let mut child = ns
            .cmd("iptables-restore")
            .args(["--noflush", "-w", "5"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn iptables-restore");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write rules");
        let out = child.wait_with_output().expect("iptables-restore");
        assert!(
            out.status.success(),
            "kube-proxy's rules were rejected: {}\n{input}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `EnsureChain` + `EnsureRule(Prepend, …)` for every jump: `-C`, and `-I` when missing.
    pub fn ensure_jumps(&self, ns: &Netns) {
        for (table, chain, from, comment, extra) in JUMPS {
            let _ = ns
                .cmd("iptables")
                .args(["-w", "5", "-t", table, "-N", chain])
                .output();
            let mut args: Vec<String> = extra.split_whitespace().map(str::to_string).collect();
            if !comment.is_empty() {
                args.extend(["-m", "comment", "--comment", comment].map(str::to_string));
            }
            args.extend(["-j".to_string(), chain.to_string()]);
            let exists = ns
                .cmd("iptables")
                .args(["-w", "5", "-t", table, "-C", from])
                .args(&args)
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if !exists {
                crate::run(
                    ns.cmd("iptables")
                        .args(["-w", "5", "-t", table, "-I", from])
                        .args(&args),
                );
            }
        }
    }

    /// The restore input of one sync (filter, then nat, as kube-proxy writes it).
    pub fn restore_input(&self) -> String {
        let mut f = String::from("*filter\n");
        for c in [
            "KUBE-SERVICES",
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-FORWARD",
            "KUBE-NODEPORTS",
            "KUBE-PROXY-FIREWALL",
            "KUBE-FIREWALL",
        ] {
            f.push_str(&format!(":{c} - [0:0]\n"));
        }
        f.push_str(
            "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n",
        );
        let mut n = String::from("*nat\n");
        let mut nat_rules = String::new();
        for c in [
            "KUBE-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-POSTROUTING",
            "KUBE-MARK-MASQ",
        ] {
            n.push_str(&format!(":{c} - [0:0]\n"));
        }
        let m = MASQ_MARK;
        nat_rules.push_str(&format!(
            "-A KUBE-POSTROUTING -m mark ! --mark {m}/{m} -j RETURN\n\
             -A KUBE-POSTROUTING -j MARK --xor-mark {m}\n\
             -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
             -A KUBE-MARK-MASQ -j MARK --or-mark {m}\n"
        ));
        for s in &self.services {
            let (p, name, cip, port) = (s.protocol, &s.name, s.cluster_ip, s.port);
            if s.endpoints.is_empty() {
                f.push_str(&format!(
                    "-A KUBE-SERVICES -m comment --comment \"{name} has no endpoints\" -m {p} -p {p} -d {cip} --dport {port} -j REJECT\n"
                ));
                if let Some(np) = s.node_port {
                    f.push_str(&format!(
                        "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{name} has no endpoints\" -m addrtype --dst-type LOCAL -m {p} -p {p} --dport {np} -j REJECT\n"
                    ));
                }
                continue;
            }
            let svc = s.svc_chain();
            n.push_str(&format!(":{svc} - [0:0]\n"));
            nat_rules.push_str(&format!(
                "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m {p} -p {p} -d {cip} --dport {port} -j {svc}\n"
            ));
            if let Some(np) = s.node_port {
                let ext = s.ext_chain();
                n.push_str(&format!(":{ext} - [0:0]\n"));
                nat_rules.push_str(&format!(
                    "-A KUBE-NODEPORTS -m comment --comment {name} -m {p} -p {p} --dport {np} -j {ext}\n\
                     -A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ\n\
                     -A {ext} -j {svc}\n"
                ));
            }
            nat_rules.push_str(&format!(
                "-A {svc} -m comment --comment \"{name} cluster IP\" -m {p} -p {p} -d {cip} --dport {port} ! -s {} -j KUBE-MARK-MASQ\n",
                self.cluster_cidr
            ));
            let count = s.endpoints.len();
            for (i, ep) in s.endpoints.iter().enumerate() {
                let sep = s.sep_chain(ep);
                n.push_str(&format!(":{sep} - [0:0]\n"));
                let chance = if i + 1 < count {
                    format!(
                        " -m statistic --mode random --probability {:.10}",
                        1.0 / (count - i) as f64
                    )
                } else {
                    String::new()
                };
                nat_rules.push_str(&format!(
                    "-A {svc} -m comment --comment \"{name} -> {ep}\"{chance} -j {sep}\n\
                     -A {sep} -m comment --comment {name} -s {} -j KUBE-MARK-MASQ\n\
                     -A {sep} -m comment --comment {name} -m {p} -p {p} -j DNAT --to-destination {ep}\n",
                    ep.ip()
                ));
            }
        }
        nat_rules.push_str(
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
        );
        // conntrackTCPLiberal off (the default): INVALID packets are dropped.
        f.push_str(&format!(
            "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
             -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {m}/{m} -j ACCEPT\n\
             -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
             COMMIT\n"
        ));
        n.push_str(&nat_rules);
        n.push_str("COMMIT\n");
        f + &n
    }
}

/// node-local-dns's rules for a cache listening on `local_ip:53`, as `k8s.io/dns`
/// cmd/node-cache/app/cache_app.go (`initIptables`) writes them, each with
/// `EnsureRule(Prepend, …)`: NOTRACK in raw PREROUTING/OUTPUT both ways and ACCEPT in filter
/// INPUT/OUTPUT, so the cache's traffic skips conntrack (and with it every NAT rule).
pub fn install_node_local_dns(ns: &Netns, local_ip: Ipv4Addr) {
    let ip = local_ip.to_string();
    let skip = "NodeLocal DNS Cache: skip conntrack";
    let allow = "NodeLocal DNS Cache: allow DNS traffic";
    // (table, chain, address match, port match, target), each for tcp and udp, in cache_app.go's
    // order.
    let shapes = [
        ("raw", "PREROUTING", "-d", "--dport", "NOTRACK"),
        ("filter", "INPUT", "-d", "--dport", "ACCEPT"),
        ("raw", "OUTPUT", "-s", "--sport", "NOTRACK"),
        ("filter", "OUTPUT", "-s", "--sport", "ACCEPT"),
        ("raw", "OUTPUT", "-d", "--dport", "NOTRACK"),
    ];
    let mut rules: Vec<(&str, &str, Vec<&str>)> = Vec::new();
    for (table, chain, addr, port, target) in shapes {
        let comment = if target == "NOTRACK" { skip } else { allow };
        for p in ["tcp", "udp"] {
            rules.push((
                table,
                chain,
                vec![
                    "-p",
                    p,
                    addr,
                    &ip,
                    port,
                    "53",
                    "-j",
                    target,
                    "-m",
                    "comment",
                    "--comment",
                    comment,
                ],
            ));
        }
    }
    for (table, chain, args) in rules {
        let exists = ns
            .cmd("iptables")
            .args(["-w", "5", "-t", table, "-C", chain])
            .args(&args)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !exists {
            crate::run(
                ns.cmd("iptables")
                    .args(["-w", "5", "-t", table, "-I", chain])
                    .args(&args),
            );
        }
    }
}

/// Packets counted by the rules of `chain` whose target is `target` (`iptables -L -v -x`).
pub fn packets(ns: &Netns, table: &str, chain: &str, target: &str) -> u64 {
    let out = ns
        .cmd("iptables")
        .args(["-w", "5", "-t", table, "-L", chain, "-v", "-x", "-n"])
        .output()
        .expect("iptables -L");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.get(2) == Some(&target))
                .then(|| w[0].parse::<u64>().ok())
                .flatten()
        })
        .sum()
}

/// `iptables -S <chain>` in `table` of `ns` (kube-proxy's backend: the `iptables` alternative).
pub fn chain_rules(ns: &Netns, table: &str, chain: &str) -> Vec<String> {
    let out = ns
        .cmd("iptables")
        .args(["-w", "5", "-t", table, "-S", chain])
        .output()
        .expect("iptables -S");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("-A "))
        .map(str::to_string)
        .collect()
}

/// Position of the first rule of `chain` whose target is `target`.
pub fn position(rules: &[String], target: &str) -> Option<usize> {
    let jump = format!("-j {target}");
    rules
        .iter()
        .position(|l| l.ends_with(&jump) || l.contains(&format!("{jump} ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_matches_rfc4648_vectors() {
        assert_eq!(base32(b""), "");
        assert_eq!(base32(b"f"), "MY======");
        assert_eq!(base32(b"fooba"), "MZXW6YTB");
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI======");
    }

    #[test]
    fn chain_names_hash_like_kube_proxy() {
        // The names kube-proxy's own proxier_test.go expects for this service and endpoint.
        let ep = SocketAddrV4::new(Ipv4Addr::new(10, 180, 0, 1), 80);
        let s = Service::tcp("ns1/svc1:p80", Ipv4Addr::new(172, 30, 0, 41), 80, &[ep]);
        assert_eq!(s.svc_chain(), "KUBE-SVC-XPGD46QRK7WJZT7O");
        assert_eq!(s.sep_chain(&ep), "KUBE-SEP-SXIVWICOYRO3J4NJ");
        assert_eq!(s.ext_chain(), "KUBE-EXT-XPGD46QRK7WJZT7O");
    }
}
