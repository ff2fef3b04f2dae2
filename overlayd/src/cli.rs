//! Command-line interface. Every flag also reads an `OVERLAYD_*` environment variable, so the
//! DaemonSet can configure the daemon from a ConfigMap without rewriting its command line.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "overlayd",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("OVERLAYD_GIT_COMMIT"), ")"),
    about = "Flannel-style VXLAN overlay for Kubernetes: per-node subnet leases from an external etcd"
)]
pub struct Cli {
    /// Log filter (e.g. `info`, `debug`, `overlayd=debug`); default: RUST_LOG, else info.
    #[arg(long, global = true, env = "OVERLAYD_LOG_LEVEL")]
    pub log_level: Option<String>,

    /// `text` for people, `json` for log pipelines (one object per line).
    #[arg(
        long,
        global = true,
        env = "OVERLAYD_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: crate::logging::LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Lease this node's subnet and keep the overlay data plane in shape (the DaemonSet's command).
    Run(RunArgs),
    /// What the local daemon knows (its /status: readiness, lease, peers, repairs); when it is
    /// down, what this node shows without it (subnet file, pod addresses, routes, etcd).
    Status(StatusArgs),
    /// Check this node for every pitfall we know: PASS/WARN/FAIL per check with the fix; exit 1 on
    /// a FAIL. Run it on the node or in the DaemonSet's pod (`kubectl exec … overlayd doctor`).
    Doctor(DoctorArgs),
    /// Give this node's subnet back (decommissioning): revoke the etcd lease, remove the subnet file.
    Release(ReleaseArgs),
    /// Remove overlayd's data plane from this node: VTEP, bridge, routes, iptables chains and the
    /// subnet file. The etcd lease is left alone (`overlayd release` gives it back).
    Uninstall(UninstallArgs),
    /// Remove what another CNI left on this node.
    Cleanup(CleanupArgs),
    /// Check, show or seed the network config (`<prefix>/config`) with the daemon's own parser.
    Config(ConfigArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub action: ConfigAction,
}

#[derive(Debug, Clone, Subcommand)]
pub enum ConfigAction {
    /// Check a network config offline; exit 1 naming the field and value that are wrong.
    Validate {
        /// The config JSON, or `-` to read it from standard input.
        config: String,
    },
    /// Show the config in etcd: the raw value, the config with defaults filled in, how many
    /// subnets it holds and how many are leased. Exit 1 if it is missing or invalid.
    Show {
        #[command(flatten)]
        etcd: EtcdArgs,
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
    /// Validate a config and write it, only if no config exists yet (or with --force). Prints what
    /// it wrote and the equivalent `etcdctl put`.
    Put {
        /// The config JSON, or `-` to read it from standard input.
        config: String,
        /// Replace a different existing config; refused while subnets are leased outside the new
        /// Network.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct UninstallArgs {
    /// The pods' bridge to remove.
    #[arg(long, env = "OVERLAYD_BRIDGE", default_value = "cni0")]
    pub bridge: String,
    #[arg(long, env = "OVERLAYD_SUBNET_FILE", default_value = overlay_state::DEFAULT_SUBNET_FILE)]
    pub subnet_file: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma separated.
    #[arg(
        long,
        env = "OVERLAYD_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,
    /// Key prefix of the network (flannel's default, so a cluster seeded for flannel works as is).
    #[arg(
        long,
        env = "OVERLAYD_ETCD_PREFIX",
        default_value = "/coreos.com/network"
    )]
    pub etcd_prefix: String,
    /// CA certificate (PEM) to verify etcd's server certificate.
    #[arg(long, env = "OVERLAYD_ETCD_CAFILE")]
    pub etcd_cafile: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, env = "OVERLAYD_ETCD_CERTFILE", requires = "etcd_keyfile")]
    pub etcd_certfile: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long, env = "OVERLAYD_ETCD_KEYFILE", requires = "etcd_certfile")]
    pub etcd_keyfile: Option<PathBuf>,
    /// etcd user (etcd's own authentication, `etcdctl user add`).
    #[arg(long, env = "OVERLAYD_ETCD_USERNAME", requires = "etcd_password")]
    pub etcd_username: Option<String>,
    /// Password of --etcd-username; prefer the environment variable to the command line.
    #[arg(
        long,
        env = "OVERLAYD_ETCD_PASSWORD",
        requires = "etcd_username",
        hide_env_values = true
    )]
    pub etcd_password: Option<String>,
    /// How long the watch stream may stay silent before etcd is asked for its progress; with no
    /// answer 5 s later it is given up and every lease is listed again (a stream can stay open
    /// and send nothing). Each node asks once per this while nothing changes: 10 000 nodes at
    /// 60 s are 170 requests a second to etcd, at 10 s 1 000. A dead or frozen member, or one
    /// without a leader, is found sooner anyway (gRPC keep-alive, 10 s + 5 s; every call
    /// requires a leader, so etcd cancels the stream).
    #[arg(long, env = "OVERLAYD_ETCD_WATCH_SILENCE", default_value = "60s", value_parser = parse_duration)]
    pub etcd_watch_silence: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// Underlay interface that carries VXLAN traffic; default: the interface of the default route.
    #[arg(long, env = "OVERLAYD_IFACE")]
    pub iface: Option<String>,
    /// This node's address on the underlay; default: the first IPv4 address of --iface.
    #[arg(long, env = "OVERLAYD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,
    /// Name stored in the lease for humans; default: the hostname.
    #[arg(long, env = "OVERLAYD_NODE_NAME")]
    pub node_name: Option<String>,
    /// Where the leased subnet is written for the CNI plugin.
    #[arg(long, env = "OVERLAYD_SUBNET_FILE", default_value = overlay_state::DEFAULT_SUBNET_FILE)]
    pub subnet_file: PathBuf,
    /// The `overlay` CNI plugin's `dataDir`: the pod addresses in use on this node, counted for
    /// `status` and /metrics; `run` also reclaims those of sandboxes gone without DEL.
    #[arg(long, env = "OVERLAYD_CNI_DATA_DIR", default_value = overlay_state::ipam_store::DEFAULT_DATA_DIR)]
    pub cni_data_dir: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(flatten)]
    pub node: NodeArgs,
    /// TTL of the etcd lease behind this node's subnet; kept alive while the daemon runs. Also how
    /// long a node may be cut off from etcd before its subnet can go to another node, and how long
    /// a terminated node's subnet stays out of the pool.
    #[arg(long, env = "OVERLAYD_LEASE_TTL", default_value = "1h", value_parser = parse_duration)]
    pub lease_ttl: Duration,
    /// Masquerade pod traffic that leaves the cluster network.
    #[arg(long, env = "OVERLAYD_IP_MASQ", default_value_t = true, action = clap::ArgAction::Set)]
    pub ip_masq: bool,
    /// How often the whole data plane is checked against the leases even when nothing changed.
    /// Drift is repaired at once from the kernel's change notifications (and a lost notification
    /// starts a full pass); this pass is the net under them. It dumps the routes, ARP and FDB
    /// tables: ~0.1 s of CPU at 10 000 peers, so every 30 s it alone was 0.3% of a core.
    #[arg(long, env = "OVERLAYD_RESYNC_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub resync_interval: Duration,
    /// Serve /healthz, /readyz, /status and /metrics (Prometheus) on this address, e.g.
    /// 0.0.0.0:9472; off when unset.
    #[arg(long, env = "OVERLAYD_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Only lease the subnet and write the subnet file; leave the node's network alone.
    #[arg(long, env = "OVERLAYD_LEASE_ONLY")]
    pub lease_only: bool,
    /// /readyz fails when etcd has not been heard from for this long: an open watch stream counts
    /// (etcd closes it on a member without a leader, gRPC keep-alive on a dead one), and so does
    /// each keep-alive answer; no request is made only for this. The data plane keeps running
    /// either way.
    #[arg(long, env = "OVERLAYD_ETCD_HEARD_WITHIN", default_value = "60s", value_parser = parse_duration)]
    pub etcd_heard_within: Duration,
    /// Probe every peer through the overlay (ICMP echo VTEP to VTEP) and report the ones that
    /// stop answering, with the likely cause (needs CAP_NET_RAW).
    #[arg(long, env = "OVERLAYD_PEER_PROBE", default_value_t = true, action = clap::ArgAction::Set)]
    pub peer_probe: bool,
    /// Each peer is probed once per this interval, at a random point in it, or less often when
    /// that would exceed --peer-probe-max-rate. A peer that stops answering is reported within
    /// about interval + 7 s.
    #[arg(long, env = "OVERLAYD_PEER_PROBE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub peer_probe_interval: Duration,
    /// Probes sent per second at most (retries included): past rate × interval peers (300 at
    /// the defaults) each peer is probed every peers / rate seconds instead (10 000 peers: every
    /// 1 000 s), so the N² probes of a large cluster stay bounded per node.
    #[arg(long, env = "OVERLAYD_PEER_PROBE_MAX_RATE", default_value_t = crate::dataplane::probe::DEFAULT_MAX_RATE, value_parser = parse_rate)]
    pub peer_probe_max_rate: f64,
    /// How often the pod addresses of sandboxes gone without DEL are reclaimed in the
    /// background (at most 16 per network a pass; ADD on a full subnet reclaims them anyway).
    #[arg(long, env = "OVERLAYD_IPAM_RECLAIM_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub ipam_reclaim_interval: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(flatten)]
    pub node: NodeArgs,
    /// The local daemon's --metrics-addr, where its /status is read (in the DaemonSet's pod the
    /// environment already has it); a wildcard address means loopback.
    #[arg(long, env = "OVERLAYD_METRICS_ADDR", default_value = "127.0.0.1:9472")]
    pub metrics_addr: std::net::SocketAddr,
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(flatten)]
    pub node: NodeArgs,
    /// The local daemon's --metrics-addr, where its /status is read; a wildcard means loopback.
    #[arg(long, env = "OVERLAYD_METRICS_ADDR", default_value = "127.0.0.1:9472")]
    pub metrics_addr: std::net::SocketAddr,
    /// The CNI config directory the container runtime reads.
    #[arg(long, env = "OVERLAYD_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// Where the runtime looks for CNI plugin binaries.
    #[arg(long, env = "OVERLAYD_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// kubelet config files to read maxPods from, the first that exists (with its `.d/` drop-ins):
    /// where EKS AMIs put them (AL2, then AL2023). Repeat the flag to replace the list.
    #[arg(
        long,
        env = "OVERLAYD_KUBELET_CONFIG",
        value_delimiter = ',',
        default_value = "/etc/kubernetes/kubelet/kubelet-config.json,/etc/kubernetes/kubelet/config.json"
    )]
    pub kubelet_config: Vec<PathBuf>,
    /// The pods' bridge.
    #[arg(long, env = "OVERLAYD_BRIDGE", default_value = "cni0")]
    pub bridge: String,
    /// Where to look for a running aws-node (`aws-k8s-agent`): the host's /proc.
    #[arg(long, env = "OVERLAYD_PROC_DIR", default_value = "/proc")]
    pub proc_dir: PathBuf,
    /// aws-node's state directory, for its leftovers.
    #[arg(long, default_value = "/var/run/aws-node")]
    pub aws_node_state_dir: PathBuf,
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, Args)]
pub struct ReleaseArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(flatten)]
    pub node: NodeArgs,
}

#[derive(Debug, Clone, Args)]
pub struct CleanupArgs {
    #[command(subcommand)]
    pub target: CleanupTarget,
}

#[derive(Debug, Clone, Subcommand)]
pub enum CleanupTarget {
    /// Remove the AWS VPC CNI's (aws-node) leftovers from this live node: iptables chains and rules,
    /// the nftables table, ip rules, per-ENI routes and its CNI config.
    AwsVpcCni(AwsCleanupArgs),
}

#[derive(Debug, Clone, Args)]
pub struct AwsCleanupArgs {
    /// Print what would be removed and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// CNI config directory holding `10-aws.conflist`.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// Keep ip rules and routes of pods whose host veth (`eni…`) still exists.
    #[arg(long)]
    pub keep_running_pods: bool,
    /// aws-node's state directory (ipamd checkpoint, sockets); its entries are renamed aside.
    #[arg(long, default_value = "/var/run/aws-node")]
    pub aws_node_state_dir: PathBuf,
    /// The node's /proc, where a running aws-node ipamd is looked for: in a pod, the host's /proc
    /// mounted read-only (e.g. at /host/proc) instead of sharing the host's PID namespace.
    #[arg(long, default_value = "/proc")]
    pub proc_dir: PathBuf,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 1.0 => Ok(r),
        _ => Err(format!(
            "{s:?} is not a rate of at least 1 per second; use e.g. 100"
        )),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); use e.g. 90s, 30m, 24h"))?;
    if d < Duration::from_secs(1) {
        return Err(format!("{s:?} is shorter than one second"));
    }
    Ok(d)
}
