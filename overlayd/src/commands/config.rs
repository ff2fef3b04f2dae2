//! `overlayd config validate|show|put`: the network config next to etcdctl, checked by the daemon's
//! own parser, so what these commands accept is exactly what `overlayd run` will accept.
//!
//! etcdctl stays the documented way to seed; `put` adds what etcdctl cannot: validation before the
//! write, no overwrite of an existing config by accident (the write is one transaction guarded on
//! the key's revision), and a refusal to move the network out from under leased subnets.

use std::io::Read;
use std::process::ExitCode;

use anyhow::Context;
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use serde::Serialize;
use serde_json::{json, Value};

use crate::cli::{ConfigAction, ConfigArgs, EtcdArgs, OutputFormat};
use crate::config::{NetworkConfig, VXLAN_OVERHEAD};
use crate::registry::{Lease, Registry};

pub async fn run(args: ConfigArgs) -> anyhow::Result<ExitCode> {
    match args.action {
        ConfigAction::Validate { config } => validate(&config),
        ConfigAction::Show { etcd, output } => show(&etcd, output).await,
        ConfigAction::Put {
            config,
            force,
            etcd,
        } => put(&config, force, &etcd).await,
    }
}

/// The JSON given on the command line, or standard input for `-`.
fn read_input(arg: &str) -> anyhow::Result<Vec<u8>> {
    if arg == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("cannot read the config from standard input")?;
        Ok(buf)
    } else {
        Ok(arg.as_bytes().to_vec())
    }
}

/// Parses with the daemon's parser; prints the problem and returns None when it is invalid.
fn parse(raw: &[u8]) -> Option<(NetworkConfig, Vec<String>)> {
    match NetworkConfig::parse(raw) {
        Ok(parsed) => Some(parsed),
        Err(e) => {
            println!("{e}");
            None
        }
    }
}

fn validate(arg: &str) -> anyhow::Result<ExitCode> {
    let raw = read_input(arg)?;
    let Some((cfg, warnings)) = parse(&raw) else {
        return Ok(ExitCode::FAILURE);
    };
    for w in &warnings {
        println!("warning: {w}");
    }
    println!("valid: {}", effective_text(&cfg));
    println!("{}", capacity_line(&cfg));
    Ok(ExitCode::SUCCESS)
}

/// The config with every default filled in, in flannel's field names and order.
#[derive(Serialize)]
struct Effective {
    #[serde(rename = "Network")]
    network: String,
    #[serde(rename = "SubnetLen")]
    subnet_len: u8,
    #[serde(rename = "SubnetMin")]
    subnet_min: String,
    #[serde(rename = "SubnetMax")]
    subnet_max: String,
    #[serde(rename = "Backend")]
    backend: EffectiveBackend,
}

#[derive(Serialize)]
struct EffectiveBackend {
    #[serde(rename = "Type")]
    kind: &'static str,
    #[serde(rename = "VNI")]
    vni: u32,
    #[serde(rename = "Port")]
    port: u16,
    #[serde(rename = "MTU", skip_serializing_if = "Option::is_none")]
    mtu: Option<u32>,
    #[serde(rename = "DirectRouting")]
    direct_routing: bool,
}

pub fn effective(cfg: &NetworkConfig) -> Value {
    serde_json::to_value(effective_of(cfg)).unwrap_or(Value::Null)
}

fn effective_text(cfg: &NetworkConfig) -> String {
    serde_json::to_string(&effective_of(cfg)).unwrap_or_default()
}

fn effective_of(cfg: &NetworkConfig) -> Effective {
    Effective {
        network: cfg.network.to_string(),
        subnet_len: cfg.subnet_len,
        subnet_min: cfg.subnet_min.to_string(),
        subnet_max: cfg.subnet_max.to_string(),
        backend: EffectiveBackend {
            kind: "vxlan",
            vni: cfg.backend.vni,
            port: cfg.backend.port,
            mtu: cfg.backend.mtu,
            direct_routing: cfg.backend.direct_routing,
        },
    }
}

fn capacity_line(cfg: &NetworkConfig) -> String {
    let pods = overlay_state::ipam_store::pod_capacity(
        ipnetwork::Ipv4Network::new(cfg.subnet_min, cfg.subnet_len).unwrap_or(cfg.network),
    );
    format!(
        "holds {} node subnets of /{} ({} to {}), {pods} pod addresses each; MTU {}",
        cfg.capacity(),
        cfg.subnet_len,
        cfg.subnet_min,
        cfg.subnet_max,
        cfg.backend
            .mtu
            .map_or_else(|| format!("underlay - {VXLAN_OVERHEAD}"), |m| m.to_string()),
    )
}

/// The raw config key: its value and mod revision, or None when it does not exist.
async fn read_raw(reg: &Registry) -> anyhow::Result<Option<(Vec<u8>, i64)>> {
    let key = reg.keys.config();
    let key = key.as_str();
    let resp = reg
        .call(|mut c| async move { c.get(key, None).await })
        .await?;
    Ok(resp
        .kvs()
        .first()
        .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
}

async fn show(etcd: &EtcdArgs, output: OutputFormat) -> anyhow::Result<ExitCode> {
    let reg = Registry::connect(etcd).await?;
    let key = reg.keys.config();
    let Some((raw, revision)) = read_raw(&reg).await? else {
        // The same message the daemon logs, with the seed command.
        println!(
            "{}",
            crate::registry::RegistryError::ConfigMissing {
                key,
                endpoints: reg.endpoints().to_string(),
            }
        );
        return Ok(ExitCode::FAILURE);
    };
    let raw_text = String::from_utf8_lossy(&raw).into_owned();
    let parsed = NetworkConfig::parse(&raw);
    let leases = reg.list_leases().await?;
    let all: Vec<&Lease> = leases.leases.values().map(|l| &**l).collect();
    let (ok, code) = match &parsed {
        Ok(_) => (true, ExitCode::SUCCESS),
        Err(_) => (false, ExitCode::FAILURE),
    };
    let counts = parsed
        .as_ref()
        .ok()
        .map(|(cfg, _)| LeaseCounts::of(cfg, &all));
    match output {
        OutputFormat::Json => {
            let mut out = json!({
                "endpoints": reg.endpoints(),
                "key": key,
                "modRevision": revision,
                "raw": raw_text,
                "valid": ok,
            });
            match &parsed {
                Ok((cfg, warnings)) => {
                    out["effective"] = effective(cfg);
                    out["warnings"] = json!(warnings);
                    if let Some(c) = &counts {
                        out["subnets"] = json!({
                            "total": cfg.capacity(),
                            "leased": c.leased,
                            "reservations": c.reservations,
                            "free": cfg.capacity().saturating_sub(c.leased + c.reservations),
                            "outsideConfig": c.outside,
                        });
                    }
                }
                Err(e) => out["error"] = json!(e.to_string()),
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        OutputFormat::Text => {
            println!(
                "etcd {}: key {key} (mod revision {revision})",
                reg.endpoints()
            );
            println!("raw:       {raw_text}");
            match &parsed {
                Ok((cfg, warnings)) => {
                    println!("effective: {}", effective_text(cfg));
                    for w in warnings {
                        println!("warning:   {w}");
                    }
                    println!("{}", capacity_line(cfg));
                    if let Some(c) = &counts {
                        println!(
                            "subnets:   {} of {} leased ({} by etcd lease, {} reserved), {} free",
                            c.leased + c.reservations,
                            cfg.capacity(),
                            c.leased,
                            c.reservations,
                            cfg.capacity().saturating_sub(c.leased + c.reservations)
                        );
                        if c.outside > 0 {
                            println!(
                                "WARNING:   {} subnet key(s) under {} do not fit this config \
                                 (another Network or SubnetLen); `overlayd run` ignores them",
                                c.outside,
                                reg.keys.subnets()
                            );
                        }
                    }
                }
                Err(e) => println!("INVALID:   {e}"),
            }
        }
    }
    Ok(code)
}

struct LeaseCounts {
    leased: u32,
    reservations: u32,
    /// Keys that this config would not let a node lease.
    outside: u32,
}

impl LeaseCounts {
    fn of(cfg: &NetworkConfig, leases: &[&Lease]) -> LeaseCounts {
        let mut c = LeaseCounts {
            leased: 0,
            reservations: 0,
            outside: 0,
        };
        for l in leases {
            if !cfg.is_leasable(&l.subnet) {
                c.outside += 1;
            } else if l.is_reservation() {
                c.reservations += 1;
            } else {
                c.leased += 1;
            }
        }
        c
    }
}

async fn put(arg: &str, force: bool, etcd: &EtcdArgs) -> anyhow::Result<ExitCode> {
    let raw = read_input(arg)?;
    let Some((cfg, warnings)) = parse(&raw) else {
        println!("nothing written");
        return Ok(ExitCode::FAILURE);
    };
    for w in &warnings {
        println!("warning: {w}");
    }
    let reg = Registry::connect(etcd).await?;
    let key = reg.keys.config();
    // What is stored is what was given (trimmed), as `etcdctl put` would store it: the daemon
    // fills in defaults itself, and a later default change then applies to this cluster too.
    let value = String::from_utf8_lossy(&raw).trim().to_string();
    let existing = read_raw(&reg).await?;
    let guard = match &existing {
        None => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
        Some((old, rev)) => {
            let old_cfg = NetworkConfig::parse(old).ok().map(|(c, _)| c);
            if old_cfg.as_ref() == Some(&cfg) {
                println!(
                    "{key} already holds this config (mod revision {rev}); nothing written: {}",
                    String::from_utf8_lossy(old)
                );
                return Ok(ExitCode::SUCCESS);
            }
            if !force {
                println!(
                    "{key} already holds another config; nothing written.\n  \
                     in etcd: {}\n  given:   {value}\n\
                     Changing the network of a running cluster renumbers nothing by itself: nodes \
                     keep their subnets until restarted. Pass --force to replace it.",
                    String::from_utf8_lossy(old)
                );
                return Ok(ExitCode::FAILURE);
            }
            let leases = reg.list_leases().await?;
            let stranded: Vec<String> = leases
                .leases
                .values()
                .filter(|l| {
                    !cfg.network.contains(l.subnet.network()) || l.subnet.prefix() != cfg.subnet_len
                })
                .map(
                    |l| match l.value.as_ref().and_then(|v| v.node_name.as_deref()) {
                        Some(n) => format!("{} ({n})", l.subnet),
                        None => l.subnet.to_string(),
                    },
                )
                .collect();
            if !stranded.is_empty() {
                println!(
                    "refusing to replace {key}: {} subnet(s) are leased outside the new Network {} \
                     /{}: {}. Their nodes would be stranded. Run `overlayd release` on those nodes \
                     (or let their leases expire) first; nothing written",
                    stranded.len(),
                    cfg.network,
                    cfg.subnet_len,
                    stranded.join(", ")
                );
                return Ok(ExitCode::FAILURE);
            }
            Compare::mod_revision(key.as_str(), CompareOp::Equal, *rev)
        }
    };
    let txn = Txn::new()
        .when([guard])
        .and_then([TxnOp::put(key.as_str(), value.as_str(), None)]);
    let txn = &txn;
    if !reg
        .call(|mut c| async move { c.txn(txn.clone()).await })
        .await?
        .succeeded()
    {
        println!(
            "{key} changed while this command ran (someone else wrote it); nothing written. Run \
             `overlayd config show` and try again"
        );
        return Ok(ExitCode::FAILURE);
    }
    println!("wrote {key}: {value}");
    println!("effective: {}", effective_text(&cfg));
    println!("{}", capacity_line(&cfg));
    println!(
        "the same with etcdctl:\n  ETCDCTL_API=3 etcdctl --endpoints={} put {key} '{value}'",
        reg.endpoints()
    );
    Ok(ExitCode::SUCCESS)
}
