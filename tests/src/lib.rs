//! The test lab: real parts for tests on one machine.
//!
//! - [`Etcd`]: Debian's `etcd` binary on a free port with a temp data dir, stopped on drop.
//! - [`Netns`]: a network namespace with a unique name, deleted on drop (also when a test panics).
//! - [`bin`]: the workspace's own binaries (`overlayd`, `overlay`), built by `scripts/test.sh`.
//!
//! Tests shell out to `ip` to *build* the lab (that is the test's business, not the product's); the
//! product itself talks netlink.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub mod cni_chain;
pub mod etcd;
pub mod etcd_cluster;
pub mod idle_proxy;
pub mod kube_proxy;
pub mod lab;
pub mod netns;
pub mod probe;

pub use etcd::Etcd;
pub use netns::Netns;

/// True when the test may touch namespaces. Prints why it skips otherwise.
pub fn require_root(test: &str) -> bool {
    if nix_is_root() {
        return true;
    }
    eprintln!("SKIP {test}: needs root (network namespaces); CI runs the suite as root");
    false
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this process and call, for namespaces and links (≤ 15 chars with `tag`).
pub fn unique(tag: &str) -> String {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id() % 100_000;
    let tag: String = tag.chars().take(4).collect();
    format!("ov{tag}{pid:05}{n:x}")
}

/// A TCP port free on `ip` right now.
pub fn free_port(ip: Ipv4Addr) -> u16 {
    for _ in 0..50 {
        if let Ok(l) = TcpListener::bind((ip, 0)) {
            if let Ok(a) = l.local_addr() {
                return a.port();
            }
        }
    }
    panic!("no free TCP port on {ip}");
}

/// Path of a workspace binary in the same target dir as the running test.
pub fn bin(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("OVERLAY_BIN_DIR") {
        return Path::new(&dir).join(name);
    }
    // target/debug/deps/<test> → target/debug/<name>
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("deps dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Runs a command, panicking with its stderr on failure.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `ip <args>` in the host namespace (only for creating lab namespaces and links with our prefix).
pub fn ip(args: &[&str]) -> Output {
    run(Command::new("ip").args(args))
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `timeout` with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed on drop; its output goes to a log file that is printed if the test fails.
pub struct Daemon {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Daemon {
        let file = std::fs::File::create(&log).expect("create log");
        let err = file.try_clone().expect("clone log fd");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Daemon {
            name: name.to_string(),
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`, or panics with the log.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        loop {
            if self.log_text().contains(needle) {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!(
                        "{} exited ({status}) before logging {needle:?}:\n{}",
                        self.name,
                        self.log_text()
                    );
                }
            }
            if start.elapsed() > timeout {
                panic!(
                    "{} did not log {needle:?} within {timeout:?}:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a signal and waits (bounded) for the exit status.
    pub fn signal(&mut self, sig: &str) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(s)) = child.try_wait() {
                self.child = None;
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Waits (bounded) for the process to exit on its own; None if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(s)) = child.try_wait() {
                self.child = None;
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- log of {} ----\n{}", self.name, self.log_text());
        }
    }
}
