//! `overlayd run`: lease this node's subnet, publish it to the CNI plugin, and keep the data plane
//! equal to the set of leases until SIGTERM/SIGINT. Exiting never revokes the lease: a restarted
//! daemon must come back with the same subnet while pods keep running.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ipnetwork::Ipv4Network;
use overlay_state::SubnetFile;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::backoff::Backoff;
use crate::cli::{EtcdArgs, RunArgs};
use crate::config::{NetworkConfig, VXLAN_OVERHEAD};
use crate::dataplane::{monitor, Dataplane, Plan};
use crate::health::{self, Health};
use crate::node::{self, Node};
use crate::registry::{
    self, AcquireRequest, Acquired, LeaseSet, LeaseValue, Registry, RegistryError,
};

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    tokio::select! {
        r = daemon(args) => r,
        sig = shutdown_signal() => {
            info!("{sig}: exiting; the lease stays so a restart keeps this node's subnet (`overlayd release` gives it back)");
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the default action (exit) still applies.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// Connects to etcd, waiting while it cannot be reached (with credentials, connecting is already a
/// call). Wrong credentials or unreadable TLS files end the daemon: waiting cannot fix them.
async fn connect(args: &EtcdArgs) -> Result<Registry, RegistryError> {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
    loop {
        match Registry::connect(args).await {
            Err(e) if e.is_transient() => {
                let wait = backoff.next_delay();
                warn!("{e}; retrying in {}s", wait.as_secs_f32());
                tokio::time::sleep(wait).await;
            }
            other => return other,
        }
    }
}

/// Waits for etcd and a valid config, saying every time why it is still waiting.
pub async fn wait_for_config(reg: &Registry) -> NetworkConfig {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
    loop {
        match reg.network_config().await {
            Ok((cfg, warnings)) => {
                for w in warnings {
                    warn!("{w}");
                }
                return cfg;
            }
            Err(e) => {
                let wait = backoff.next_delay();
                match &e {
                    RegistryError::Unreachable { .. } => {
                        warn!("{e}; retrying in {}s", wait.as_secs_f32())
                    }
                    _ => error!("{e}; checking again in {}s", wait.as_secs_f32()),
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

async fn daemon(args: RunArgs) -> anyhow::Result<ExitCode> {
    let health = Arc::new(Health::new());
    if let Some(addr) = args.metrics_addr {
        tokio::spawn(health::serve(addr, health.clone()));
    }
    let reg = connect(&args.etcd).await?;
    info!(
        endpoints = reg.endpoints(),
        prefix = reg.keys.prefix(),
        "reading network config"
    );
    let cfg = wait_for_config(&reg).await;
    info!(
        network = %cfg.network,
        subnet_len = cfg.subnet_len,
        vni = cfg.backend.vni,
        port = cfg.backend.port,
        "network config"
    );

    let (conn, handle, _) = rtnetlink::new_connection().context("cannot open a netlink socket")?;
    tokio::spawn(conn);
    let node = node::discover(&handle, &args.node, cfg.backend.vni).await?;
    info!(
        iface = node.iface,
        public_ip = %node.public_ip,
        node = node.name,
        vtep_mac = %node.vtep_mac,
        "node identity"
    );

    let previous = match SubnetFile::read(&args.node.subnet_file) {
        Ok(f) if f.network == cfg.network => Some(f.subnet),
        Ok(f) => {
            warn!(
                "subnet file {} is for network {}, not {}; ignoring it",
                args.node.subnet_file.display(),
                f.network,
                cfg.network
            );
            None
        }
        Err(_) => None,
    };
    let req = AcquireRequest {
        value: LeaseValue::vxlan(node.public_ip, cfg.backend.vni, node.vtep_mac, &node.name),
        previous,
        ttl: args.lease_ttl,
    };
    let acquired = acquire_until_done(&reg, &cfg, &req).await;
    let mtu = cfg
        .backend
        .mtu
        .unwrap_or_else(|| node.iface_mtu.saturating_sub(VXLAN_OVERHEAD));
    let subnet_file = SubnetFile {
        network: cfg.network,
        subnet: acquired.subnet,
        mtu,
        ip_masq: args.ip_masq,
    };

    let mut dataplane = if args.lease_only {
        None
    } else {
        let plan = Plan::new(
            &cfg,
            &node,
            acquired.subnet,
            mtu,
            args.ip_masq,
            node.underlay_net,
        );
        let mut dp = Dataplane::new(handle.clone(), plan);
        dp.ensure_sysctls().await?;
        dp.ensure_devices().await?;
        dp.ensure_iptables().await?;
        Some(dp)
    };
    // Written only once the bridge and VTEP exist: the plugin takes the file as "ready".
    subnet_file.write_atomic(&args.node.subnet_file)?;
    info!(
        subnet = %acquired.subnet,
        lease = %acquired.lease_id.map(|l| format!("{l:x}")).unwrap_or_else(|| "none (reservation)".into()),
        mtu,
        "leased subnet {} ({}); wrote {}",
        acquired.subnet,
        acquired.how,
        args.node.subnet_file.display()
    );

    health.set_ipam(args.node.cni_data_dir.clone(), acquired.subnet);
    health.set_leased(true);
    supervise(
        &reg,
        &node,
        &req,
        acquired,
        &args,
        dataplane.as_mut(),
        &health,
    )
    .await
}

async fn acquire_until_done(reg: &Registry, cfg: &NetworkConfig, req: &AcquireRequest) -> Acquired {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        match registry::acquire(reg, cfg, req).await {
            Ok(a) => return a,
            Err(e) => {
                let wait = backoff.next_delay();
                if e.is_transient() {
                    warn!(
                        "cannot lease a subnet yet: {e}; retrying in {}s",
                        wait.as_secs_f32()
                    );
                } else {
                    error!(
                        "cannot lease a subnet: {e}; retrying in {}s",
                        wait.as_secs_f32()
                    );
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

fn spawn_keepalive(reg: &Registry, a: &Acquired, ttl: Duration) -> Option<JoinHandle<()>> {
    a.lease_id
        .map(|id| tokio::spawn(registry::keepalive::keep_alive(reg.clone(), id, ttl)))
}

/// Runs until a fatal condition: follows all leases, keeps ours alive, re-asserts our key if it
/// disappears, and keeps the data plane equal to the leases.
async fn supervise(
    reg: &Registry,
    node: &Node,
    req: &AcquireRequest,
    mut acquired: Acquired,
    args: &RunArgs,
    mut dataplane: Option<&mut Dataplane>,
    health: &Health,
) -> anyhow::Result<ExitCode> {
    let subnet: Ipv4Network = acquired.subnet;
    let (tx, mut rx) = watch::channel(Arc::new(LeaseSet::default()));
    let follower = tokio::spawn(registry::watch::follow(reg.clone(), tx));
    let mut keeper = spawn_keepalive(reg, &acquired, args.lease_ttl);
    let mut tick = tokio::time::interval(args.resync_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // iptables checks spawn processes: less often than the netlink reconcile.
    let mut iptables_tick = tokio::time::interval(IPTABLES_CHECK);
    iptables_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut kernel_events = if dataplane.is_some() {
        Some(monitor::spawn())
    } else {
        None
    };
    let mut latest = Arc::new(LeaseSet::default());
    // A failure that repeats every pass is logged once, not every second.
    let mut last_error = String::new();
    let mut last_iptables_error = String::new();

    let result = loop {
        // A watch event is applied as a diff; everything else checks the kernel in full.
        let mut full_pass = true;
        let keeper_done = async {
            match keeper.as_mut() {
                Some(k) => {
                    let _ = k.await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    break Err(anyhow::anyhow!("the lease watcher stopped unexpectedly"));
                }
                let set = rx.borrow_and_update().clone();
                if set.revision == 0 {
                    continue;
                }
                latest = set.clone();
                full_pass = false;
                health.leases.set(set.leases.len() as i64);
                let current = set.leases.get(&subnet);
                let intact = current.and_then(|l| l.value.as_ref()) == Some(&req.value);
                if !intact {
                    match current.and_then(|l| l.public_ip()) {
                        Some(ip) if ip == node.public_ip => warn!("this node's lease value for {subnet} was changed in etcd; writing it back"),
                        _ => warn!("this node's subnet key for {subnet} is gone or changed hands in etcd; putting it back"),
                    }
                    match reassert_until_done(reg, subnet, req).await {
                        Ok(a) => {
                            if a.lease_id != acquired.lease_id {
                                if let Some(k) = keeper.take() { k.abort(); }
                                keeper = spawn_keepalive(reg, &a, args.lease_ttl);
                            }
                            acquired = a;
                            info!("subnet {subnet} is this node's again");
                        }
                        Err(e) => break Err(e.into()),
                    }
                }
            }
            _ = keeper_done => {
                keeper = None;
                warn!("etcd says this node's lease for {subnet} expired; leasing the same subnet again");
                match reassert_until_done(reg, subnet, req).await {
                    Ok(a) => {
                        keeper = spawn_keepalive(reg, &a, args.lease_ttl);
                        acquired = a;
                        info!("subnet {subnet} is this node's again");
                    }
                    Err(e) => break Err(e.into()),
                }
            }
            _ = tick.tick() => {}
            Some(ev) = next_event(&mut kernel_events) => {
                let mut drift = dataplane.as_deref().is_some_and(|dp| dp.is_drift(&ev));
                // Drain what is queued; a burst (a flushed table) becomes one pass.
                if let Some(rx) = kernel_events.as_mut() {
                    while let Ok(ev) = rx.try_recv() {
                        drift |= dataplane.as_deref().is_some_and(|dp| dp.is_drift(&ev));
                    }
                }
                if !drift {
                    continue;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                if let Some(rx) = kernel_events.as_mut() {
                    while rx.try_recv().is_ok() {}
                }
            }
            _ = iptables_tick.tick() => {
                if let Some(dp) = dataplane.as_deref_mut() {
                    match dp.ensure_iptables().await {
                        Ok(_) => last_iptables_error.clear(),
                        Err(e) if e.to_string() != last_iptables_error => {
                            error!("{e}; checking again every {:?}", iptables_tick.period());
                            last_iptables_error = e.to_string();
                        }
                        Err(_) => {}
                    }
                }
                continue;
            }
        }
        if latest.revision == 0 {
            continue; // nothing listed yet: never remove peers on an empty view
        }
        if let Some(dp) = dataplane.as_deref_mut() {
            let pass = if full_pass {
                dp.reconcile(&latest).await
            } else {
                dp.apply(&latest).await
            };
            match pass {
                Ok(changes) => {
                    if !last_error.is_empty() {
                        info!("data plane recovered");
                        last_error.clear();
                    }
                    health.count_changes(changes.added, changes.removed);
                    health.peer_errors.inc_by(changes.errors as u64);
                    health.peers_failing.set(changes.failing as i64);
                    health.peers.set(dp.peer_count() as i64);
                    health.set_dataplane_ok(true);
                }
                Err(e) => {
                    let msg = e.to_string();
                    if msg != last_error {
                        error!(
                            "data plane: {msg}; retrying every {:?}",
                            args.resync_interval
                        );
                        last_error = msg;
                    }
                    health.errors.inc();
                    health.set_dataplane_ok(false);
                }
            }
        }
    };
    follower.abort();
    if let Some(k) = keeper {
        k.abort();
    }
    result
}

/// How often our iptables chains are checked: iptables sends no notifications, and each check
/// spawns the tools, so it is a fixed, slower period than the kernel's events.
const IPTABLES_CHECK: Duration = Duration::from_secs(5);

/// The next kernel notification, or never when nothing listens (lease-only, or no socket).
async fn next_event(
    rx: &mut Option<tokio::sync::mpsc::Receiver<monitor::KernelEvent>>,
) -> Option<monitor::KernelEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Re-asserts `subnet`, waiting out etcd outages; only another node holding it is final.
async fn reassert_until_done(
    reg: &Registry,
    subnet: Ipv4Network,
    req: &AcquireRequest,
) -> Result<Acquired, registry::ReassertError> {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        match registry::reassert(reg, subnet, req).await {
            Ok(a) => return Ok(a),
            Err(e @ registry::ReassertError::Taken { .. }) => return Err(e),
            Err(e) => {
                let wait = backoff.next_delay();
                warn!(
                    "cannot re-assert subnet {subnet}: {e}; retrying in {}s",
                    wait.as_secs_f32()
                );
                tokio::time::sleep(wait).await;
            }
        }
    }
}
