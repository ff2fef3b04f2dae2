//! A lab node for the plugin's tests: a network namespace the plugin runs in (so the bridge and
//! host veths land there, never on the host), a subnet file and an IPAM store in a temp dir.
//! Everything is removed on drop, also when a test panics.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use overlay_testlab::Netns;
use serde_json::{json, Value};

pub const PLUGIN: &str = env!("CARGO_BIN_EXE_overlay");
pub const NETWORK: &str = "labnet";
pub const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

pub struct Node {
    pub ns: Netns,
    pub dir: tempfile::TempDir,
    pub subnet_file: PathBuf,
    pub data_dir: PathBuf,
}

/// What one plugin run returned.
#[derive(Debug)]
pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.status.success()
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {:?} / {}",
                self.stdout, self.stderr
            )
        })
    }

    /// The CNI error code, asserting the run failed with a well-formed error.
    pub fn error_code(&self) -> u64 {
        assert!(!self.ok(), "expected failure, got success: {}", self.stdout);
        let v = self.json();
        assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(v["cniVersion"].is_string(), "{v}");
        v["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("no code in {v}"))
    }

    pub fn expect_ok(self) -> Self {
        assert!(self.ok(), "plugin failed: {} {}", self.stdout, self.stderr);
        self
    }
}

/// A running plugin process.
pub struct Running {
    pub child: Child,
    started: Instant,
}

impl Running {
    /// Waits at most `limit`; a plugin that takes longer is killed and the test fails.
    pub fn wait(mut self, limit: Duration) -> Outcome {
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if self.started.elapsed() > limit => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!("plugin did not finish within {limit:?}");
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(2)),
                Err(e) => panic!("wait: {e}"),
            }
        }
        let out = self.child.wait_with_output().expect("plugin output");
        Outcome {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Node {
    /// A node whose overlayd leased `subnet` (gateway form, e.g. `10.244.7.1/24`).
    pub fn new(subnet: &str) -> Node {
        let node = Node::without_lease();
        node.write_subnet_file(subnet);
        node
    }

    /// A node whose overlayd has not written its subnet file yet.
    pub fn without_lease() -> Node {
        let ns = Netns::new("cn");
        let dir = tempfile::tempdir().expect("tempdir");
        Node {
            subnet_file: dir.path().join("run/subnet.env"),
            data_dir: dir.path().join("ipam"),
            ns,
            dir,
        }
    }

    pub fn write_subnet_file(&self, subnet: &str) {
        std::fs::create_dir_all(self.subnet_file.parent().expect("dir")).expect("mkdir");
        std::fs::write(
            &self.subnet_file,
            format!(
                "OVERLAY_NETWORK=10.244.0.0/16\nOVERLAY_SUBNET={subnet}\nOVERLAY_MTU=1450\nOVERLAY_IPMASQ=true\n"
            ),
        )
        .expect("write subnet file");
    }

    pub fn conf(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": NETWORK,
            "type": "overlay",
            "subnetFile": self.subnet_file,
            "dataDir": self.data_dir,
        })
    }

    /// Starts the plugin inside the node's namespace, as a runtime would, with `env` as the only
    /// `CNI_*` variables and `stdin` as the config.
    pub fn start(&self, env: &[(&str, &str)], stdin: &[u8]) -> Running {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns.name, PLUGIN]);
        for (k, _) in std::env::vars() {
            if k.starts_with("CNI_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn plugin");
        let mut input = child.stdin.take().expect("stdin");
        // A killed plugin closes the pipe early; that is the test's intent, not a failure.
        let _ = input.write_all(stdin);
        drop(input);
        Running {
            child,
            started: Instant::now(),
        }
    }

    pub fn run(&self, env: &[(&str, &str)], conf: &Value) -> Outcome {
        self.start(env, conf.to_string().as_bytes())
            .wait(Duration::from_secs(30))
    }

    pub fn cmd(
        &self,
        command: &str,
        id: &str,
        pod: Option<&Netns>,
        ifname: &str,
        conf: &Value,
    ) -> Outcome {
        let path = pod.map(|p| p.path().display().to_string());
        let mut env = vec![
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", id),
            ("CNI_IFNAME", ifname),
            ("CNI_PATH", "/opt/cni/bin"),
        ];
        if let Some(p) = &path {
            env.push(("CNI_NETNS", p));
        }
        self.run(&env, conf)
    }

    pub fn add(&self, id: &str, pod: &Netns) -> Value {
        self.cmd("ADD", id, Some(pod), "eth0", &self.conf("1.1.0"))
            .expect_ok()
            .json()
    }

    pub fn del(&self, id: &str, pod: Option<&Netns>) -> Outcome {
        self.cmd("DEL", id, pod, "eth0", &self.conf("1.1.0"))
    }

    /// The IPs allocated in the store (file names), sorted.
    pub fn store_ips(&self) -> Vec<String> {
        let dir = self.data_dir.join(NETWORK);
        let mut ips: Vec<String> = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .filter(|n| n.parse::<std::net::Ipv4Addr>().is_ok())
                    .collect()
            })
            .unwrap_or_default();
        ips.sort();
        ips
    }

    /// How many index entries (`key.*`) the store holds.
    pub fn store_index_entries(&self) -> usize {
        self.store_entries("key.")
    }

    /// How many spare files (`spare.*`) the store holds for the next ADDs.
    pub fn store_spares(&self) -> usize {
        self.store_entries("spare.")
    }

    fn store_entries(&self, prefix: &str) -> usize {
        std::fs::read_dir(self.data_dir.join(NETWORK))
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                    .count()
            })
            .unwrap_or(0)
    }

    /// The container id and ifname stored for `ip`.
    pub fn store_owner(&self, ip: &str) -> Option<(String, String)> {
        let text = std::fs::read_to_string(self.data_dir.join(NETWORK).join(ip)).ok()?;
        let mut l = text.lines();
        Some((l.next()?.to_string(), l.next()?.to_string()))
    }

    /// Names of the node's links other than `lo`.
    pub fn links(&self) -> BTreeSet<String> {
        links_of(&self.ns)
    }

    /// Waits until the node's links are exactly `want`. DEL leaves the pair to the removal of the
    /// pod's netns, which the kernel finishes in the background, so a host veth may linger.
    pub fn wait_links(&self, want: &[&str]) {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        overlay_testlab::wait_for(
            &format!("node links to be {want:?}"),
            Duration::from_secs(30),
            || (self.links() == want).then_some(()),
        );
    }
}

pub fn links_of(ns: &Netns) -> BTreeSet<String> {
    ns.ip_out(&["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n != "lo")
        .collect()
}

/// The pod address (without prefix) of an ADD result.
pub fn result_ip(result: &Value) -> String {
    let ips = result["ips"].as_array().expect("ips");
    let addr = ips.last().expect("one ip")["address"]
        .as_str()
        .expect("address");
    addr.split('/').next().expect("ip").to_string()
}

/// The IPv4 addresses on `ifname` in `ns`.
pub fn addrs_of(ns: &Netns, ifname: &str) -> Vec<String> {
    ns.ip_out(&["-4", "-o", "addr", "show", "dev", ifname])
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .map(|a| a.split('/').next().unwrap_or(a).to_string())
        .collect()
}

/// A small deterministic PRNG (xorshift), seeded per run and printed, so a failure can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn from_env_or_time(var: &str) -> Rng {
        let seed = std::env::var(var)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            })
            | 1;
        eprintln!("random seed: {var}={seed}");
        Rng(seed)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}
