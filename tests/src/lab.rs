//! A cluster on one machine for end-to-end tests: an underlay namespace with a bridge and etcd,
//! node namespaces running the real `overlayd`, pod namespaces made by the real `overlay` plugin.
//! Everything is removed on drop, pods first, then nodes, etcd and the underlay.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use crate::{bin, netns::Netns, wait_for, Daemon, Etcd};

pub const PREFIX: &str = "/coreos.com/network";
pub const ETCD_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 254);
pub const DEFAULT_CONFIG: &str =
    r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1}}"#;

pub struct Pod {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub id: String,
}

pub struct LabNode {
    pub pods: Vec<Pod>,
    pub daemon: Option<Daemon>,
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub name: String,
    pub subnet_file: PathBuf,
    pub ipam_dir: PathBuf,
    pub extra_args: Vec<String>,
    /// The underlay router this node's default route points at.
    pub gateway: Ipv4Addr,
    restarts: u32,
}

pub struct Lab {
    // Drop order: nodes (and their pods and daemons), then etcd, then the underlay.
    pub nodes: Vec<LabNode>,
    pub etcd: Etcd,
    pub underlay: Netns,
    pub dir: tempfile::TempDir,
    /// MTU of the nodes' underlay links.
    pub underlay_mtu: u32,
}

impl Lab {
    /// Underlay + etcd, seeded with `config`.
    pub fn new(config: &str) -> Lab {
        Self::with_mtu(config, 1500)
    }

    pub fn with_mtu(config: &str, underlay_mtu: u32) -> Lab {
        let underlay = Netns::new("ul");
        underlay.ip(&["link", "add", "br0", "type", "bridge"]);
        underlay.ip(&["addr", "add", &format!("{ETCD_IP}/24"), "dev", "br0"]);
        underlay.ip(&["link", "set", "br0", "mtu", &underlay_mtu.to_string(), "up"]);
        let etcd = Etcd::start_on(Some(&underlay), ETCD_IP);
        etcd.put(&format!("{PREFIX}/config"), config);
        Lab {
            nodes: Vec::new(),
            etcd,
            underlay,
            dir: tempfile::tempdir().expect("tempdir"),
            underlay_mtu,
        }
    }

    /// Adds node N (index returned) at 192.0.2.(10+N) and starts its daemon; waits for its lease.
    pub fn add_node(&mut self, extra_args: &[&str]) -> usize {
        self.add_node_prepared(extra_args, |_| {})
    }

    /// Like [`Lab::add_node`], with `prepare` run in the new node's namespace before its daemon
    /// starts (to dress the node up as one that already has other software's rules).
    pub fn add_node_prepared(
        &mut self,
        extra_args: &[&str],
        prepare: impl FnOnce(&Netns),
    ) -> usize {
        let ip = Ipv4Addr::new(192, 0, 2, 10 + self.nodes.len() as u8);
        self.add_node_with(ip, ETCD_IP, extra_args, prepare)
    }

    /// Adds a node at `ip` (a /24 on the underlay bridge) whose default route goes via `gateway`,
    /// e.g. on a second underlay subnet made with [`Lab::add_underlay_subnet`].
    pub fn add_node_at(&mut self, ip: Ipv4Addr, gateway: Ipv4Addr, extra_args: &[&str]) -> usize {
        self.add_node_with(ip, gateway, extra_args, |_| {})
    }

    /// Makes the underlay namespace route between its subnets and gives it `gateway`/24 too, so
    /// nodes on that subnet reach etcd and the other nodes through it (a router, not one L2).
    pub fn add_underlay_subnet(&self, gateway: Ipv4Addr) {
        self.underlay
            .ip(&["addr", "add", &format!("{gateway}/24"), "dev", "br0"]);
        crate::run(
            self.underlay
                .cmd("sysctl")
                .args(["-qw", "net.ipv4.ip_forward=1"]),
        );
    }

    fn add_node_with(
        &mut self,
        ip: Ipv4Addr,
        gateway: Ipv4Addr,
        extra_args: &[&str],
        prepare: impl FnOnce(&Netns),
    ) -> usize {
        let i = self.nodes.len();
        let ns = Netns::new("nd");
        self.plumb(&ns, i, ip, gateway);
        prepare(&ns);
        let name = format!("node{i}");
        let node = LabNode {
            pods: Vec::new(),
            daemon: None,
            subnet_file: self.dir.path().join(format!("{name}.env")),
            ipam_dir: self.dir.path().join(format!("{name}-ipam")),
            ns,
            ip,
            name,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            gateway,
            restarts: 0,
        };
        self.nodes.push(node);
        self.start_daemon(i);
        i
    }

    /// Wires `ns` to the underlay bridge as node `i` (`eth0` ↔ `n<i>`) with `ip`/24 and a
    /// default route via `gateway`.
    fn plumb(&self, ns: &Netns, i: usize, ip: Ipv4Addr, gateway: Ipv4Addr) {
        let peer = format!("n{i}");
        let mtu = self.underlay_mtu.to_string();
        ns.ip(&[
            "link",
            "add",
            "eth0",
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            &self.underlay.name,
        ]);
        self.underlay
            .ip(&["link", "set", &peer, "mtu", &mtu, "master", "br0", "up"]);
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&["route", "add", "default", "via", &gateway.to_string()]);
    }

    /// A reboot of node `i`: its daemon dies (KILL), its pods and its whole namespace go (links,
    /// routes, iptables, /run with the subnet file), then a fresh namespace with the same IP and
    /// config boots overlayd again. The IPAM dir (on disk, like /var/lib/cni) survives.
    pub fn reboot_node(&mut self, i: usize) {
        self.stop_daemon(i, "KILL");
        self.nodes[i].pods.clear();
        let gateway = self.nodes[i].gateway;
        let old = std::mem::replace(&mut self.nodes[i].ns, Netns::new("nd"));
        drop(old);
        // The namespace's veth end takes its underlay peer with it, asynchronously.
        let peer = format!("n{i}");
        wait_for(
            &format!("{peer} to leave the underlay"),
            Duration::from_secs(10),
            || {
                (!self
                    .underlay
                    .ip_out(&["link", "show"])
                    .contains(&format!(" {peer}@")))
                .then_some(())
            },
        );
        let _ = std::fs::remove_file(&self.nodes[i].subnet_file);
        self.plumb(&self.nodes[i].ns, i, self.nodes[i].ip, gateway);
        self.start_daemon(i);
    }

    /// Starts (or restarts) node `i`'s daemon and waits until it has written its subnet file.
    pub fn start_daemon(&mut self, i: usize) {
        self.spawn_daemon(i);
        if let Some(d) = self.nodes[i].daemon.as_mut() {
            d.wait_log("leased subnet", Duration::from_secs(30));
        }
    }

    /// Starts (or restarts) node `i`'s daemon without waiting for its lease.
    pub fn spawn_daemon(&mut self, i: usize) {
        let endpoint = self.etcd.endpoint.clone();
        let node = &mut self.nodes[i];
        node.restarts += 1;
        let mut cmd = node.ns.cmd(bin("overlayd").to_str().expect("utf8 path"));
        cmd.args([
            "run",
            "--etcd-endpoints",
            &endpoint,
            "--node-name",
            &node.name,
        ])
        .arg("--subnet-file")
        .arg(&node.subnet_file)
        // The store the lab's plugin calls use (`cni`): what the daemon counts and reclaims.
        .arg("--cni-data-dir")
        .arg(&node.ipam_dir)
        .args(&node.extra_args)
        .env("RUST_LOG", "info");
        let log = self
            .dir
            .path()
            .join(format!("{}-{}.log", node.name, node.restarts));
        node.daemon = Some(Daemon::spawn(&format!("overlayd {}", node.name), cmd, log));
    }

    /// Stops node `i`'s daemon with `sig` (TERM keeps the lease, KILL just stops keep-alives).
    pub fn stop_daemon(&mut self, i: usize, sig: &str) {
        if let Some(mut d) = self.nodes[i].daemon.take() {
            d.signal(sig);
        }
    }

    pub fn subnet(&self, i: usize) -> ipnetwork::Ipv4Network {
        let text = std::fs::read_to_string(&self.nodes[i].subnet_file).expect("subnet file");
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("OVERLAY_SUBNET="))
            .expect("OVERLAY_SUBNET");
        let n: ipnetwork::Ipv4Network = line.parse().expect("subnet");
        ipnetwork::Ipv4Network::new(n.network(), n.prefix()).expect("subnet")
    }

    pub fn subnet_key(&self, i: usize) -> String {
        let s = self.subnet(i);
        format!("{PREFIX}/subnets/{}-{}", s.network(), s.prefix())
    }

    /// Runs the real plugin inside node `i`'s namespace, as a container runtime would.
    pub fn cni(&self, i: usize, command: &str, pod_ns: &Netns, id: &str) -> Output {
        let node = &self.nodes[i];
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "lab",
            "type": "overlay",
            "subnetFile": node.subnet_file,
            "dataDir": node.ipam_dir,
        });
        let mut child = node
            .ns
            .cmd(bin("overlay").to_str().expect("utf8 path"))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", pod_ns.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", bin("overlay").parent().expect("bin dir"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn overlay plugin");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(conf.to_string().as_bytes())
            .expect("write conf");
        child.wait_with_output().expect("plugin output")
    }

    /// Node `i`'s `overlay` entry for a conflist (the list adds `cniVersion` and `name`), for
    /// chains run with [`crate::cni_chain`].
    pub fn overlay_plugin(&self, i: usize) -> serde_json::Value {
        let node = &self.nodes[i];
        serde_json::json!({
            "type": "overlay",
            "subnetFile": node.subnet_file,
            "dataDir": node.ipam_dir,
        })
    }

    /// A pod on node `i`, networked by the plugin. Returns its index on the node.
    pub fn add_pod(&mut self, i: usize) -> usize {
        let ns = Netns::new("pd");
        let id = format!("{}-pod{}", self.nodes[i].name, self.nodes[i].pods.len());
        let out = self.cni(i, "ADD", &ns, &id);
        assert!(
            out.status.success(),
            "CNI ADD failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let result: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("CNI result JSON");
        let addr = result["ips"][0]["address"]
            .as_str()
            .expect("ips[0].address");
        let ip: Ipv4Addr = addr
            .split('/')
            .next()
            .and_then(|s| s.parse().ok())
            .expect("pod IP");
        self.nodes[i].pods.push(Pod { ns, ip, id });
        self.nodes[i].pods.len() - 1
    }

    pub fn pod(&self, node: usize, pod: usize) -> &Pod {
        &self.nodes[node].pods[pod]
    }

    /// Every pod, with its node index.
    pub fn all_pods(&self) -> Vec<(usize, &Pod)> {
        self.nodes
            .iter()
            .enumerate()
            .flat_map(|(i, n)| n.pods.iter().map(move |p| (i, p)))
            .collect()
    }

    /// GET `path` from a server on node `i`'s own loopback (its daemon's `--metrics-addr`), with
    /// curl run inside the node's namespace: the status code and the body, `None` if nothing
    /// answers.
    pub fn http_get(&self, i: usize, port: u16, path: &str) -> Option<(u16, String)> {
        let out = self.nodes[i]
            .ns
            .cmd("curl")
            .args(["-s", "--max-time", "5", "-w", "\n%{http_code}"])
            .arg(format!("http://127.0.0.1:{port}{path}"))
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n')?;
        let code: u16 = code.trim().parse().ok()?;
        (code != 0).then(|| (code, body.to_string()))
    }

    /// Waits until node `from`'s kernel has a route to node `to`'s subnet (or its absence).
    pub fn wait_route(&self, from: usize, subnet: &str, present: bool, timeout: Duration) {
        wait_for(
            &format!(
                "route to {subnet} on node{from} to be {}",
                if present { "present" } else { "absent" }
            ),
            timeout,
            || {
                (self.nodes[from]
                    .ns
                    .ip_out(&["route", "show", subnet])
                    .contains("via")
                    == present)
                    .then_some(())
            },
        );
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Pods before their nodes: a pod namespace holds the veth end of its node's bridge.
        for n in &mut self.nodes {
            n.pods.clear();
            if let Some(mut d) = n.daemon.take() {
                d.signal("KILL");
            }
        }
    }
}

/// `cmd` as text, failures allowed (for assertions on command output).
pub fn text(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run command");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
