//! Helpers the daemon and registry tests share: overlayd processes on loopback against a real etcd,
//! the lease follower with its log captured, and plain HTTP to the health server.
#![allow(dead_code)] // each test binary uses a part of it

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;
use overlay_testlab::{Daemon, Etcd};
use overlayd::cli::EtcdArgs;
use overlayd::node::Mac;
use overlayd::registry::{self, AcquireRequest, LeaseValue, Registry};

pub const PREFIX: &str = "/coreos.com/network";
pub const CONFIG: &str =
    r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1}}"#;

pub fn overlayd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_overlayd"))
}

pub fn daemon(etcd_endpoint: &str, ip: &str, dir: &Path, extra: &[&str]) -> Daemon {
    let cmd = daemon_cmd(etcd_endpoint, ip, dir, extra);
    Daemon::spawn(
        &format!("overlayd {ip}"),
        cmd,
        dir.join(format!("{ip}.log")),
    )
}

pub fn daemon_cmd(etcd_endpoint: &str, ip: &str, dir: &Path, extra: &[&str]) -> Command {
    let mut cmd = overlayd();
    cmd.args(["run", "--lease-only", "--iface", "lo", "--public-ip", ip])
        .arg("--etcd-endpoints")
        .arg(etcd_endpoint)
        .arg("--node-name")
        .arg(format!("node-{ip}"))
        .arg("--subnet-file")
        .arg(dir.join(format!("{ip}.env")))
        .args(extra)
        .env("RUST_LOG", "info");
    cmd
}

/// A daemon that has leased its subnet.
pub fn leased(etcd_endpoint: &str, ip: &str, dir: &Path, extra: &[&str]) -> Daemon {
    let mut d = daemon(etcd_endpoint, ip, dir, extra);
    d.wait_log("leased subnet", Duration::from_secs(20));
    d
}

/// etcd seeded with the default config, and a temp dir for subnet files and logs.
pub fn seeded() -> (Etcd, tempfile::TempDir) {
    let etcd = Etcd::start();
    etcd.put(&format!("{PREFIX}/config"), CONFIG);
    (etcd, tempfile::tempdir().unwrap())
}

pub fn leased_subnet(d: &Daemon) -> Ipv4Network {
    let log = d.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("leased subnet "))
        .unwrap_or_else(|| panic!("no lease in log:\n{log}"));
    let rest = &line[line.find("leased subnet ").unwrap_or(0) + 14..];
    rest.split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse subnet from {line:?}"))
}

pub fn etcd_args(endpoint: &str) -> EtcdArgs {
    EtcdArgs {
        etcd_endpoints: vec![endpoint.to_string()],
        etcd_prefix: PREFIX.into(),
        etcd_cafile: None,
        etcd_certfile: None,
        etcd_keyfile: None,
        etcd_username: None,
        etcd_password: None,
        etcd_watch_silence: Duration::from_secs(10),
    }
}

pub fn request(ip: Ipv4Addr, ttl: Duration) -> AcquireRequest {
    AcquireRequest {
        value: LeaseValue::vxlan(ip, 1, Mac::for_vtep(ip, 1), &format!("node-{ip}")),
        previous: None,
        previous_in_use: 0,
        ttl,
    }
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

pub fn subnet_key(s: &Ipv4Network) -> String {
    format!("{PREFIX}/subnets/{}-{}", s.network(), s.prefix())
}

/// Runs the lease follower with its log captured; returns the receiver and the log.
pub type Log = std::sync::Arc<std::sync::Mutex<Vec<u8>>>;
pub type Leases = tokio::sync::watch::Receiver<std::sync::Arc<registry::LeaseSet>>;

pub fn follow_with_log(
    rt: &tokio::runtime::Runtime,
    etcd: &Etcd,
    start: Option<registry::LeaseSet>,
) -> (Leases, Log) {
    let reg = rt
        .block_on(Registry::connect(&etcd_args(&etcd.endpoint)))
        .unwrap();
    follow_registry_with_log(rt, reg, start)
}

/// [`follow_with_log`] on a registry connected by the caller (as a user, over TLS...).
pub fn follow_registry_with_log(
    rt: &tokio::runtime::Runtime,
    reg: Registry,
    start: Option<registry::LeaseSet>,
) -> (Leases, Log) {
    follow_observed(rt, reg, start, std::sync::Arc::new(registry::Unobserved))
}

/// [`follow_registry_with_log`], reporting to `observer`.
pub fn follow_observed(
    rt: &tokio::runtime::Runtime,
    reg: Registry,
    start: Option<registry::LeaseSet>,
    observer: std::sync::Arc<dyn registry::Observer>,
) -> (Leases, Log) {
    follow_inner(rt, reg, start, observer, None)
}

pub type Configs = tokio::sync::watch::Receiver<std::sync::Arc<overlayd::config::NetworkConfig>>;

/// The follower as the daemon runs it: leases and the network config (starting from `running`)
/// on one watch stream.
pub fn follow_leases_and_config(
    rt: &tokio::runtime::Runtime,
    reg: Registry,
    running: overlayd::config::NetworkConfig,
) -> (Leases, Configs, Log) {
    let (tx, rx) = tokio::sync::watch::channel(std::sync::Arc::new(running));
    let (leases, log) = follow_inner(
        rt,
        reg,
        None,
        std::sync::Arc::new(registry::Unobserved),
        Some(tx),
    );
    (leases, rx, log)
}

fn follow_inner(
    rt: &tokio::runtime::Runtime,
    reg: Registry,
    start: Option<registry::LeaseSet>,
    observer: std::sync::Arc<dyn registry::Observer>,
    config: Option<tokio::sync::watch::Sender<std::sync::Arc<overlayd::config::NetworkConfig>>>,
) -> (Leases, Log) {
    use tracing::instrument::WithSubscriber;
    let log: Log = Default::default();
    let sink = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || LogSink(sink.clone()))
        .finish();
    let (tx, rx) = tokio::sync::watch::channel(std::sync::Arc::new(registry::LeaseSet::default()));
    let out = registry::watch::Outputs {
        leases: tx,
        config,
        observer,
    };
    rt.spawn(registry::watch::follow_from(reg, out, start).with_subscriber(subscriber));
    (rx, log)
}

/// Text logged so far.
pub fn log_text(log: &Log) -> String {
    String::from_utf8_lossy(&log.lock().unwrap()).into_owned()
}

pub fn wait_for_set(
    rt: &tokio::runtime::Runtime,
    rx: &mut Leases,
    want: &[&str],
    timeout: Duration,
) {
    let subnets =
        |rx: &Leases| -> Vec<String> { rx.borrow().leases.keys().map(|s| s.to_string()).collect() };
    let deadline = Instant::now() + timeout;
    while subnets(rx) != want {
        assert!(
            Instant::now() < deadline,
            "lease set {:?}, expected {want:?}",
            subnets(rx)
        );
        let _ = rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(200), rx.changed()).await
        });
    }
}

pub struct LogSink(pub Log);

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// GET `path` from `addr` over plain HTTP/1.1 on loopback; returns (status, body).
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

pub const PEER: &str = r#"{"PublicIP":"192.0.2.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}}"#;

pub fn key(s: &str) -> String {
    format!("{PREFIX}/subnets/{s}")
}

/// `overlayd_subnet_leases` from the daemon's /metrics at `addr`: how many leases it sees.
pub fn leases_gauge(addr: &str) -> Option<i64> {
    let (_, body) = http_get(addr, "/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix("overlayd_subnet_leases "))
        .and_then(|v| v.trim().parse().ok())
}

/// What etcd's own /metrics count per gRPC method: (calls or streams started, handled), keyed by
/// method and type (`unary`, `bidi_stream`...). A stream open now is started but not handled.
pub fn etcd_rpcs(
    etcd_endpoint: &str,
) -> Option<std::collections::BTreeMap<(String, String), (f64, f64)>> {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5"])
        .arg(format!("{etcd_endpoint}/metrics"))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut counts = std::collections::BTreeMap::new();
    for line in text.lines() {
        let (started, rest) = if let Some(r) = line.strip_prefix("grpc_server_started_total{") {
            (true, r)
        } else if let Some(r) = line.strip_prefix("grpc_server_handled_total{") {
            (false, r)
        } else {
            continue;
        };
        let (labels, value) = rest.split_once("} ")?;
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|l| l.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
        };
        // etcd's own services only: grpc.health.v1.Health has a Watch method too.
        if !label("grpc_service")?.starts_with("etcdserverpb.") {
            continue;
        }
        let key = (label("grpc_method")?, label("grpc_type")?);
        let n: f64 = value.trim().parse().ok()?;
        let e = counts.entry(key).or_insert((0.0, 0.0));
        if started {
            e.0 += n;
        } else {
            e.1 += n;
        }
    }
    (!counts.is_empty()).then_some(counts)
}

/// Streams of `method` etcd has open now.
pub fn etcd_streams_open(etcd_endpoint: &str, method: &str) -> Option<f64> {
    let c = etcd_rpcs(etcd_endpoint)?;
    Some(
        c.iter()
            .filter(|((m, _), _)| m == method)
            .map(|(_, (s, h))| s - h)
            .sum(),
    )
}

/// Unary calls etcd has served so far, by method.
pub fn etcd_unary_calls(etcd_endpoint: &str) -> Option<std::collections::BTreeMap<String, f64>> {
    let c = etcd_rpcs(etcd_endpoint)?;
    Some(
        c.into_iter()
            .filter(|((_, t), _)| t == "unary")
            .map(|((m, _), (s, _))| (m, s))
            .collect(),
    )
}
