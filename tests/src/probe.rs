//! Tiny servers and clients (Python's standard library, run inside lab namespaces) for traffic
//! tests: each server answers with the source address it saw, so a test can tell whether and by
//! whom a connection was NATed. Every wait is bounded.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use crate::netns::Netns;
use crate::Daemon;

const PYTHON: &str = "/usr/bin/python3";

const TCP_SERVER: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(64)
print("listening", flush=True)
while True:
    c, addr = s.accept()
    try:
        c.sendall((addr[0] + "\n").encode())
    finally:
        c.close()
"#;

const UDP_SERVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
while True:
    data, addr = s.recvfrom(512)
    s.sendto((addr[0] + "\n").encode(), addr)
"#;

/// Connects, reads the server's line. Prints "<outcome> <ms>" where outcome is `ok:<line>`,
/// `refused`, `timeout` or `error:<text>`; the time is measured inside the client, so process
/// start is not counted.
const CLIENT: &str = r#"
import socket, sys, time
proto, ip, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]) / 1000
t = time.monotonic()
try:
    if proto == "tcp":
        s = socket.socket()
        s.settimeout(timeout)
        s.connect((ip, port))
        data = s.recv(512)
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(timeout)
        s.sendto(b"q", (ip, port))
        data, _ = s.recvfrom(512)
    r = "ok:" + data.decode().strip()
except ConnectionRefusedError:
    r = "refused"
except socket.timeout:
    r = "timeout"
except OSError as e:
    r = "error:" + str(e).replace(" ", "_")
print(r, (time.monotonic() - t) * 1000)
"#;

fn server(ns: &Netns, script: &str, bind: Ipv4Addr, port: u16, log: &Path) -> Daemon {
    let mut cmd = ns.cmd(PYTHON);
    cmd.args(["-c", script, &bind.to_string(), &port.to_string()]);
    let mut d = Daemon::spawn(
        &format!("server {bind}:{port} in {}", ns.name),
        cmd,
        log.to_path_buf(),
    );
    d.wait_log("listening", Duration::from_secs(10));
    d
}

/// A TCP server on `bind:port` in `ns` that sends each client the address it came from.
pub fn tcp_server(ns: &Netns, bind: Ipv4Addr, port: u16, log: &Path) -> Daemon {
    server(ns, TCP_SERVER, bind, port, log)
}

/// A UDP server on `bind:port` in `ns` that answers each datagram with its source address.
pub fn udp_server(ns: &Netns, bind: Ipv4Addr, port: u16, log: &Path) -> Daemon {
    server(ns, UDP_SERVER, bind, port, log)
}

/// The outcome of one client call and how long it took (ms).
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// `ok:<source the server saw>`, `refused`, `timeout` or `error:<text>`.
    pub what: String,
    pub ms: f64,
}

impl Outcome {
    /// The source address the server saw, if it answered.
    pub fn seen(&self) -> Option<&str> {
        self.what.strip_prefix("ok:")
    }
}

fn client(ns: &Netns, proto: &str, ip: Ipv4Addr, port: u16, timeout_ms: u64) -> Outcome {
    let out = ns
        .cmd(PYTHON)
        .args(["-c", CLIENT, proto, &ip.to_string(), &port.to_string()])
        .arg(timeout_ms.to_string())
        .output()
        .expect("python3 client");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (what, ms) = text.rsplit_once(' ').unwrap_or((&text, ""));
    Outcome {
        what: what.to_string(),
        ms: ms.parse().unwrap_or_else(|_| {
            panic!(
                "client output {text:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        }),
    }
}

/// TCP connect to `ip:port` from `ns` and read the server's line, bounded by `timeout_ms`.
pub fn tcp(ns: &Netns, ip: Ipv4Addr, port: u16, timeout_ms: u64) -> Outcome {
    client(ns, "tcp", ip, port, timeout_ms)
}

/// One UDP datagram to `ip:port` from `ns` and its answer, bounded by `timeout_ms`.
pub fn udp(ns: &Netns, ip: Ipv4Addr, port: u16, timeout_ms: u64) -> Outcome {
    client(ns, "udp", ip, port, timeout_ms)
}
