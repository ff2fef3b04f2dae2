//! `overlayd run`: lease this node's subnet, publish it to the CNI plugin, and keep the data plane
//! equal to the set of leases until SIGTERM/SIGINT. Exiting never revokes the lease: a restarted
//! daemon must come back with the same subnet while pods keep running.

use std::collections::{BTreeMap, HashMap};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use overlay_state::{ipam_store, SubnetFile};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::backoff::Backoff;
use crate::cli::{EtcdArgs, RunArgs};
use crate::config::{NetworkConfig, VXLAN_OVERHEAD};
use crate::dataplane::probe::ProbeConfig;
use crate::dataplane::{monitor, nft_events, Dataplane, Plan};
use crate::health::{self, Health};
use crate::iptables_tools::Backend;
use crate::lease_guard::{guard_lease, Task, REFUSED_RECHECK};
use crate::node;
use crate::registry::screen::Ignored;
use crate::registry::{
    self, AcquireError, AcquireRequest, Acquired, LeaseSet, LeaseValue, Registry, RegistryError,
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

/// Waits for etcd and a valid config, saying every time why it is still waiting. A TLS handshake
/// etcd or we refuse ends the wait: the files must change first.
pub async fn wait_for_config(reg: &Registry) -> Result<NetworkConfig, RegistryError> {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
    loop {
        match reg.network_config().await {
            Ok((cfg, warnings)) => {
                for w in warnings {
                    warn!("{w}");
                }
                return Ok(cfg);
            }
            Err(e @ RegistryError::TlsRejected { .. }) => return Err(e),
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
    health.set_settings(health::Settings {
        lease_only: args.lease_only,
        etcd_heard_within: args.etcd_heard_within,
    });
    if let Some(addr) = args.metrics_addr {
        tokio::spawn(health::serve(addr, health.clone()));
    }
    let reg = connect(&args.etcd).await?;
    health.set_etcd(&reg);
    info!(
        endpoints = reg.endpoints(),
        prefix = reg.keys.prefix(),
        "reading network config"
    );
    let cfg = wait_for_config(&reg).await?;
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
    health.set_node(&node);

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
    // Pods still holding addresses from the previous subnet pin the node to it (see acquire).
    let previous_in_use = previous
        .map(|p| {
            ipam_store::usage(&args.node.cni_data_dir, p)
                .iter()
                .filter_map(|u| u.allocated.as_ref().ok())
                .sum()
        })
        .unwrap_or(0);
    let req = AcquireRequest {
        value: LeaseValue::vxlan(node.public_ip, cfg.backend.vni, node.vtep_mac, &node.name),
        previous,
        previous_in_use,
        ttl: args.lease_ttl,
    };
    let acquired = acquire_until_done(&reg, &cfg, &req, &health).await?;
    let mtu = cfg
        .backend
        .mtu
        .unwrap_or_else(|| node.iface_mtu.saturating_sub(VXLAN_OVERHEAD));
    health.set_config(
        &cfg,
        mtu,
        args.ip_masq,
        args.lease_ttl,
        args.resync_interval,
    );
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
        health.set_devices(handle.clone(), dp.plan());
        if args.peer_probe {
            health.start_probes(
                reg.clone(),
                acquired.subnet.network(),
                cfg.backend.port,
                ProbeConfig::new(args.peer_probe_interval).with_max_rate(args.peer_probe_max_rate),
            );
        }
        let installed = dp.ensure_iptables().await;
        health.record_iptables(&installed);
        installed?;
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
    let _reclaimer = Task(tokio::spawn(crate::ipam_reclaim::run(
        health.clone(),
        args.ipam_reclaim_interval,
    )));
    health.set_lease(&acquired);
    supervise(
        &reg,
        &cfg,
        &req,
        acquired,
        &args,
        dataplane.as_mut(),
        health,
    )
    .await
}

/// Leases a subnet, waiting out etcd outages and a full network. Refusing to renumber waits too,
/// not ready and saying why, until the old subnet is free; another node with this node's PublicIP
/// ends the daemon.
async fn acquire_until_done(
    reg: &Registry,
    cfg: &NetworkConfig,
    req: &AcquireRequest,
    health: &Health,
) -> anyhow::Result<Acquired> {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut last_refusal = String::new();
    loop {
        match registry::acquire(reg, cfg, req).await {
            Ok(a) => {
                health.set_refused(None);
                return Ok(a);
            }
            Err(e @ AcquireError::PublicIpInUse { .. }) => return Err(e.into()),
            Err(e @ AcquireError::PreviousTaken { .. }) => {
                let msg = e.to_string();
                if msg != last_refusal {
                    error!("{msg}; checking again every {}s", REFUSED_RECHECK.as_secs());
                    last_refusal = msg.clone();
                }
                health.set_refused(Some(msg));
                tokio::time::sleep(REFUSED_RECHECK).await;
            }
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

/// Runs until a fatal condition: follows all leases, guards our key (in its own task), and keeps
/// the data plane equal to the leases.
async fn supervise(
    reg: &Registry,
    cfg: &NetworkConfig,
    req: &AcquireRequest,
    acquired: Acquired,
    args: &RunArgs,
    mut dataplane: Option<&mut Dataplane>,
    health: Arc<Health>,
) -> anyhow::Result<ExitCode> {
    let subnet = acquired.subnet;
    let (tx, mut rx) = watch::channel(Arc::new(LeaseSet::default()));
    // The config as running; only Backend.DirectRouting changes are applied live.
    let mut running = cfg.clone();
    let (cfg_tx, mut cfg_rx) = watch::channel(Arc::new(cfg.clone()));
    // One watch stream for both the leases and the config.
    let _follower = Task(tokio::spawn(registry::watch::follow(
        reg.clone(),
        registry::watch::Outputs {
            leases: tx,
            config: Some(cfg_tx),
            observer: health.clone(),
        },
    )));
    let mut guard = Task(tokio::spawn(guard_lease(
        reg.clone(),
        req.clone(),
        acquired,
        rx.clone(),
        health.clone(),
    )));
    let mut tick = tokio::time::interval(args.resync_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // iptables checks spawn processes: less often than the netlink reconcile.
    // With nf_tables, a change of any ruleset is notified: the check runs then, and the timer is
    // only a net. The legacy backend is polled.
    let mut nft_changes = match dataplane.as_deref().and_then(|dp| dp.iptables_backend()) {
        Some(Backend::Nft) => nft_events::spawn(),
        _ => None,
    };
    let mut iptables_tick = tokio::time::interval(if nft_changes.is_some() {
        IPTABLES_NET
    } else {
        IPTABLES_CHECK
    });
    iptables_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut iptables_due: Option<tokio::time::Instant> = None;
    let mut last_iptables_check = tokio::time::Instant::now();
    // Failed peers are retried on their own backoff, between full passes; an idle check.
    let mut retry_tick = tokio::time::interval(Duration::from_secs(1));
    retry_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut kernel_events = if dataplane.is_some() {
        Some(monitor::spawn())
    } else {
        None
    };
    let mut latest = Arc::new(LeaseSet::default());
    // A failure that repeats every pass is logged once, not every second.
    let mut last_error = String::new();
    let mut last_iptables_error = String::new();
    // Ignored keys already logged and counted, with the revision they were written at.
    let mut ignored_seen: HashMap<String, i64> = HashMap::new();

    loop {
        // A watch event is applied as a diff, a retry writes only what failed; everything else
        // checks the kernel in full.
        let mut full_pass = true;
        let mut retry_only = false;
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    anyhow::bail!("the lease watcher stopped unexpectedly");
                }
                let set = rx.borrow_and_update().clone();
                if set.revision == 0 {
                    continue;
                }
                let (usable, ignored) = registry::screen::screen_shared(&set, cfg, subnet);
                note_ignored(reg, &ignored, &mut ignored_seen, &health);
                latest = usable;
                full_pass = false;
                health.leases.set(set.leases.len() as i64);
            }
            _ = &mut guard.0 => {
                anyhow::bail!("the lease guard stopped unexpectedly");
            }
            changed = cfg_rx.changed() => {
                if changed.is_err() {
                    anyhow::bail!("the network config follower stopped unexpectedly");
                }
                let new = cfg_rx.borrow_and_update().clone();
                apply_config(&mut running, &new, dataplane.as_deref_mut());
                health.set_direct_routing(running.backend.direct_routing);
            }
            _ = tick.tick() => {}
            _ = retry_tick.tick() => {
                if !dataplane.as_deref().is_some_and(|dp| dp.retry_due()) {
                    continue;
                }
                retry_only = true;
            }
            Some(ev) = next_on(&mut kernel_events) => {
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
                    check_iptables(dp, &health, &mut last_iptables_error).await;
                    last_iptables_check = tokio::time::Instant::now();
                }
                continue;
            }
            Some(()) = next_on(&mut nft_changes) => {
                // An iptables-restore is a burst of messages, and kube-proxy restores several
                // tables: one check once it settles. At most one a second, so a rule that keeps
                // failing to apply cannot turn our own writes' notifications into a loop.
                let at = (tokio::time::Instant::now() + NFT_SETTLE).max(last_iptables_check + NFT_MIN_GAP);
                iptables_due.get_or_insert(at);
                continue;
            }
            _ = sleep_until(iptables_due) => {
                iptables_due = None;
                if let Some(dp) = dataplane.as_deref_mut() {
                    check_iptables(dp, &health, &mut last_iptables_error).await;
                    last_iptables_check = tokio::time::Instant::now();
                }
                continue;
            }
        }
        if latest.revision == 0 {
            continue; // nothing listed yet: never remove peers on an empty view
        }
        if let Some(dp) = dataplane.as_deref_mut() {
            let pass = if retry_only {
                dp.retry(&latest).await
            } else if full_pass {
                dp.reconcile(&latest).await
            } else {
                dp.apply(&latest).await
            };
            health.record_pass(
                &latest,
                dp.peers(),
                dp.failures().current(),
                pass.as_ref()
                    .map(|c| *c)
                    .map_err(|e| e as &dyn std::fmt::Display),
            );
            // A full pass and a large diff (the first programming) are the peaks of the heap.
            if full_pass
                || pass
                    .as_ref()
                    .is_ok_and(|c| c.added + c.removed > TRIM_AFTER)
            {
                crate::allocator::trim();
            }
            match pass {
                Ok(_) => {
                    if !last_error.is_empty() {
                        info!("data plane recovered");
                        last_error.clear();
                    }
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
                }
            }
        }
    }
}

/// Logs and counts each ignored key once per write of it.
fn note_ignored(
    reg: &Registry,
    ignored: &BTreeMap<String, Ignored>,
    seen: &mut HashMap<String, i64>,
    health: &Health,
) {
    for (key, i) in ignored {
        if seen.get(key) == Some(&i.mod_revision) {
            continue;
        }
        warn!(
            reason = i.reason.label(),
            "ignoring {}{key}: {}; the other leases are used as usual",
            reg.keys.subnets(),
            i.reason.describe()
        );
        health.count_ignored(i.reason.label());
        seen.insert(key.clone(), i.mod_revision);
    }
    seen.retain(|k, _| ignored.contains_key(k));
}

/// A config changed in etcd: `Backend.DirectRouting` is applied now (the next pass moves the
/// peers), whatever needs a restart is said once.
fn apply_config(running: &mut NetworkConfig, new: &NetworkConfig, dp: Option<&mut Dataplane>) {
    let later = running.restart_needed_for(new);
    if !later.is_empty() {
        warn!(
            "the network config in etcd changed {}: overlayd applies that only when it restarts \
             (a new Network or VNI cuts running pods off: restart every node in a planned window)",
            later.join(", ")
        );
    }
    if new.backend.direct_routing != running.backend.direct_routing {
        running.backend.direct_routing = new.backend.direct_routing;
        if let Some(dp) = dp {
            dp.set_direct_routing(new.backend.direct_routing);
        }
        info!(
            direct_routing = new.backend.direct_routing,
            "applied Backend.DirectRouting from the changed network config"
        );
    }
}

/// How often our iptables chains are checked: iptables sends no notifications, and each check
/// spawns the tools, so it is a fixed, slower period than the kernel's events.
const IPTABLES_CHECK: Duration = Duration::from_secs(5);
/// The iptables check's period when nftables notifies changes: a net under the notifications.
const IPTABLES_NET: Duration = Duration::from_secs(60);
/// How long a burst of nftables notifications is let settle before the check.
const NFT_SETTLE: Duration = Duration::from_millis(200);
/// The shortest time between two checks started by notifications.
const NFT_MIN_GAP: Duration = Duration::from_secs(1);

/// Checks our iptables rules, restores them if needed, and logs a failure once until it changes.
async fn check_iptables(dp: &mut Dataplane, health: &Health, last_error: &mut String) {
    let checked = dp.ensure_iptables().await;
    health.record_iptables(&checked);
    match checked {
        Ok(_) => last_error.clear(),
        Err(e) if e.to_string() != *last_error => {
            error!("{e}; checking again within {:?}", IPTABLES_CHECK);
            *last_error = e.to_string();
        }
        Err(_) => {}
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Entries written or removed by one diff past which the allocator is trimmed after it.
const TRIM_AFTER: usize = 1000;

/// The next message of an optional receiver (kernel notifications, nftables changes), or never
/// when nothing listens (lease-only, or no socket: the periodic checks do the work).
async fn next_on<T>(rx: &mut Option<tokio::sync::mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
