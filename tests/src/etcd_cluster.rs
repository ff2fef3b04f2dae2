//! A three-member etcd cluster for tests (Debian's `etcd-server`): each member in its own lab
//! namespace on an underlay bridge, so one member can be killed, or cut off from the other two by
//! dropping its peer traffic with iptables inside its own namespace. Needs root.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use crate::netns::{try_run, veth};
use crate::{unique, wait_for, Daemon, Netns};

const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;
/// The underlay bridge's own address, where etcdctl runs from.
pub const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

pub struct Member {
    daemon: Option<Daemon>,
    pub name: String,
    pub ip: Ipv4Addr,
    pub endpoint: String,
    pub ns: Netns,
    args: Vec<String>,
    log: PathBuf,
}

pub struct EtcdCluster {
    // Drop order: members (their servers, then their namespaces), then the underlay.
    pub members: Vec<Member>,
    pub underlay: Netns,
    dir: tempfile::TempDir,
    links: u32,
}

fn etcd_cmd(ns: &Netns, args: &[String]) -> Command {
    let mut c = ns.cmd("etcd");
    c.args(args);
    c
}

impl EtcdCluster {
    /// Three members at 192.0.2.201-203 on a fresh underlay bridge; returns once all three answer.
    pub fn start() -> EtcdCluster {
        let underlay = Netns::new("ec");
        underlay.ip(&["link", "add", "br0", "type", "bridge"]);
        underlay.ip(&["addr", "add", &format!("{BRIDGE_IP}/24"), "dev", "br0"]);
        underlay.ip(&["link", "set", "br0", "up"]);
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cluster = EtcdCluster {
            members: Vec::new(),
            underlay,
            dir,
            links: 0,
        };
        let ips: Vec<Ipv4Addr> = (1..=3).map(|i| Ipv4Addr::new(192, 0, 2, 200 + i)).collect();
        let initial: Vec<String> = ips
            .iter()
            .enumerate()
            .map(|(i, ip)| format!("m{i}=http://{ip}:{PEER_PORT}"))
            .collect();
        let token = unique("tok");
        for (i, ip) in ips.iter().enumerate() {
            let ns = Netns::new("em");
            cluster.attach(&ns, *ip);
            let name = format!("m{i}");
            let endpoint = format!("http://{ip}:{CLIENT_PORT}");
            let args: Vec<String> = vec![
                "--name".into(),
                name.clone(),
                "--data-dir".into(),
                cluster.dir.path().join(&name).display().to_string(),
                "--listen-client-urls".into(),
                endpoint.clone(),
                "--advertise-client-urls".into(),
                endpoint.clone(),
                "--listen-peer-urls".into(),
                format!("http://{ip}:{PEER_PORT}"),
                "--initial-advertise-peer-urls".into(),
                format!("http://{ip}:{PEER_PORT}"),
                "--initial-cluster".into(),
                initial.join(","),
                "--initial-cluster-token".into(),
                token.clone(),
                "--initial-cluster-state".into(),
                "new".into(),
                "--log-level".into(),
                "warn".into(),
            ];
            let log = cluster.dir.path().join(format!("{name}.log"));
            let daemon = Daemon::spawn(&format!("etcd {name}"), etcd_cmd(&ns, &args), log.clone());
            cluster.members.push(Member {
                daemon: Some(daemon),
                name,
                ip: *ip,
                endpoint,
                ns,
                args,
                log,
            });
        }
        for i in 0..3 {
            cluster.wait_healthy(i);
        }
        cluster
    }

    /// Joins `ns` to the underlay bridge as `eth0` with `ip`/24.
    pub fn attach(&mut self, ns: &Netns, ip: Ipv4Addr) {
        self.links += 1;
        let port = format!("p{}", self.links);
        veth(ns, "eth0", &self.underlay, &port);
        self.underlay
            .ip(&["link", "set", &port, "master", "br0", "up"]);
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
    }

    /// All client endpoints, comma-separated (what `--etcd-endpoints` takes).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.endpoint.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn ctl_on(&self, endpoints: &str, args: &[&str]) -> Result<Output, String> {
        try_run(
            self.underlay
                .cmd("etcdctl")
                .env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={endpoints}"))
                .arg("--command-timeout=5s")
                .args(args),
        )
    }

    /// `etcdctl <args>` against the members still running and not cut off; stdout as text.
    pub fn ctl(&self, args: &[&str]) -> String {
        let endpoints: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.daemon.is_some())
            .map(|m| m.endpoint.clone())
            .collect();
        match self.ctl_on(&endpoints.join(","), args) {
            Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
            Err(e) => panic!("etcdctl failed: {e}"),
        }
    }

    pub fn put(&self, key: &str, value: &str) {
        self.ctl(&["put", key, value]);
    }

    /// `etcdctl <args>` through member `i` only; stdout as text.
    pub fn ctl_via(&self, i: usize, args: &[&str]) -> String {
        match self.ctl_on(&self.members[i].endpoint, args) {
            Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
            Err(e) => panic!("etcdctl via m{i} failed: {e}"),
        }
    }

    /// `etcdctl put` through member `i` only.
    pub fn put_via(&self, i: usize, key: &str, value: &str) {
        if let Err(e) = self.ctl_on(&self.members[i].endpoint, &["put", key, value]) {
            panic!("etcdctl put via m{i} failed: {e}");
        }
    }

    pub fn get(&self, key: &str) -> Option<String> {
        let out = self.ctl(&["get", key, "--print-value-only"]);
        let v = out.trim_end_matches('\n');
        (!v.is_empty()).then(|| v.to_string())
    }

    fn wait_healthy(&self, i: usize) {
        let ep = self.members[i].endpoint.clone();
        wait_for(
            &format!("etcd member m{i} to answer"),
            Duration::from_secs(30),
            || self.ctl_on(&ep, &["endpoint", "health"]).ok().map(|_| ()),
        );
    }

    /// The member that is the leader now, as the members say.
    pub fn leader(&self) -> Option<usize> {
        self.members.iter().position(|m| {
            m.daemon.is_some()
                && self
                    .ctl_on(&m.endpoint, &["endpoint", "status", "-w", "json"])
                    .ok()
                    .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
                    .is_some_and(|v| {
                        let s = &v[0]["Status"];
                        s["leader"].as_u64().is_some() && s["leader"] == s["header"]["member_id"]
                    })
        })
    }

    /// kill -9 member `i` (its data stays).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut d) = self.members[i].daemon.take() {
            d.signal("KILL");
        }
    }

    /// Starts member `i` again on its data.
    pub fn restart(&mut self, i: usize) {
        let m = &mut self.members[i];
        m.daemon = Some(Daemon::spawn(
            &format!("etcd {}", m.name),
            etcd_cmd(&m.ns, &m.args),
            m.log.clone(),
        ));
        self.wait_healthy(i);
    }

    fn peer_rules(&self, i: usize, op: &str) {
        let ns = &self.members[i].ns;
        // Both ports: raft messages also come back over connections this member dialled.
        for (chain, dir) in [
            ("INPUT", "--dport"),
            ("INPUT", "--sport"),
            ("OUTPUT", "--dport"),
            ("OUTPUT", "--sport"),
        ] {
            crate::run(ns.cmd("iptables").args([
                op,
                chain,
                "-p",
                "tcp",
                dir,
                &PEER_PORT.to_string(),
                "-j",
                "DROP",
            ]));
        }
    }

    /// Cuts member `i` off from the other two: its peer traffic is dropped in its own namespace;
    /// clients still reach it.
    pub fn isolate(&self, i: usize) {
        self.peer_rules(i, "-A");
    }

    pub fn heal(&self, i: usize) {
        self.peer_rules(i, "-D");
    }

    pub fn is_running(&mut self, i: usize) -> bool {
        self.members[i]
            .daemon
            .as_mut()
            .is_some_and(|d| d.is_running())
    }
}
