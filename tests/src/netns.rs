//! Network namespaces as lab nodes and pods, removed on drop.

use std::path::PathBuf;
use std::process::{Command, Output};

use crate::{run, unique};

pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `ov<tag><pid><seq>` with loopback up.
    pub fn new(tag: &str) -> Netns {
        let name = unique(tag);
        crate::ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    /// A command that runs inside this namespace.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// `ip <args>` inside the namespace; panics on failure.
    pub fn ip(&self, args: &[&str]) -> Output {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// `ip <args>` inside the namespace, stdout as text, failures allowed.
    pub fn ip_out(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .expect("run ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `program args` in the namespace and returns whether it succeeded.
    pub fn ok(&self, program: &str, args: &[&str]) -> bool {
        self.cmd(program)
            .args(args)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// `bridge fdb show dev <dev>` inside the namespace: the VXLAN forwarding entries.
    pub fn fdb(&self, dev: &str) -> String {
        let out = Command::new("bridge")
            .args(["-n", &self.name, "fdb", "show", "dev", dev])
            .output()
            .expect("run bridge");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// One ping (1 s deadline) from this namespace.
    pub fn ping(&self, dst: &str) -> bool {
        self.ok("ping", &["-c", "1", "-W", "1", "-q", dst])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Killing what still runs inside first lets the namespace really go away.
        let _ = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            });
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Joins two namespaces with a veth pair named `<a_if>`/`<b_if>` (created in `a`, peer moved to `b`).
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    a.ip(&[
        "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ]);
}

/// Runs `f` and maps a failure into an error string instead of panicking.
pub fn try_run(cmd: &mut Command) -> Result<Output, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
