//! The node itself: the local daemon, aws-node, our iptables chains, pod addresses and kubelet.

use std::path::Path;

use serde_json::Value;

use super::{Context, Finding};
use crate::cleanup::aws_vpc_cni::{self, ReportSink};
use crate::dataplane::iptables::{Iptables, FWD_CHAIN, NAT_CHAIN};
use crate::iptables_tools;
use overlay_state::ipam_store;

/// kubelet's own default when its config names no maxPods.
const KUBELET_DEFAULT_MAX_PODS: u64 = 110;

pub fn daemon(cx: &Context) -> Finding {
    match &cx.status {
        Ok(s) if s.ready => Finding::pass("daemon", "overlayd answers and is ready"),
        Ok(s) => Finding::fail(
            "daemon",
            format!(
                "overlayd answers but is not ready: {}",
                s.checks
                    .iter()
                    .filter(|c| !c.ok)
                    .map(|c| format!("{}: {}", c.name, c.detail))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            "see the checks below and `overlayd status`",
        ),
        Err(e) => Finding::fail(
            "daemon",
            format!("overlayd does not answer: {e}"),
            "is the overlayd DaemonSet pod running on this node? `kubectl -n kube-system logs` of it says why not; pass --metrics-addr if it serves elsewhere",
        ),
    }
}

struct Lines(Vec<String>);

impl ReportSink for Lines {
    fn line(&mut self, text: &str) {
        self.0.push(text.to_string());
    }
}

/// aws-node still running, or anything it left: the cleanup command's own dry run.
pub async fn aws_node(cx: &Context) -> Finding {
    let opts = aws_vpc_cni::Options {
        dry_run: true,
        cni_conf_dir: cx.args.cni_conf_dir.clone(),
        state_dir: cx.args.aws_node_state_dir.clone(),
        keep_running_pods: false,
        proc_dir: cx.args.proc_dir.clone(),
    };
    let mut lines = Lines(Vec::new());
    let summary = aws_vpc_cni::cleanup(&opts, &mut lines).await;
    if summary.aws_node_running {
        return Finding::fail(
            "aws-node",
            "aws-node's ipamd (aws-k8s-agent) still runs on this node: it puts its rules and config back",
            "kubectl -n kube-system delete daemonset aws-node, then `overlayd cleanup aws-vpc-cni` on each node",
        );
    }
    let items: Vec<String> = lines
        .0
        .iter()
        .filter_map(|l| l.trim_start().strip_prefix("would "))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    if summary.found == 0 && summary.failed == 0 {
        Finding::pass("aws-node", "not running, nothing of it left on this node")
    } else if summary.found == 0 {
        Finding::warn(
            "aws-node",
            format!("could not look everywhere: {}", lines.0.join(" / ")),
            "run `overlayd cleanup aws-vpc-cni --dry-run` to see what it cannot read",
        )
    } else {
        let shown: Vec<&String> = items.iter().take(5).collect();
        Finding::fail(
            "aws-node",
            format!(
                "{} leftover(s) of aws-node: {}{}",
                summary.found,
                shown
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
                if items.len() > 5 { "; …" } else { "" }
            ),
            "overlayd cleanup aws-vpc-cni (add --keep-running-pods while old pods still run)",
        )
    }
}

/// Every peer programmed (from the daemon's view), and answering once probes report.
pub fn peers(cx: &Context) -> Finding {
    let Ok(s) = &cx.status else {
        return Finding::skip(
            "peers",
            "the daemon does not answer, so its peers are unknown",
        );
    };
    let bad: Vec<String> = s
        .peers
        .iter()
        .filter(|p| p.state != "programmed")
        .map(|p| format!("{} ({}): {}", p.subnet, p.public_ip, p.state))
        .collect();
    let unreachable: Vec<String> = s
        .peers
        .iter()
        .filter_map(|p| {
            let pr = p.probe.as_ref()?;
            (pr.reachable == Some(false)).then(|| {
                format!(
                    "{} ({}): {}",
                    p.subnet,
                    p.node_name.as_deref().unwrap_or(&p.public_ip),
                    pr.cause.as_deref().unwrap_or("no reply")
                )
            })
        })
        .collect();
    let probed = s.peers.iter().filter(|p| p.probe.is_some()).count();
    if bad.is_empty() && !unreachable.is_empty() {
        Finding::fail(
            "peers",
            format!(
                "{} of {} peers unreachable through the overlay: {}",
                unreachable.len(),
                s.peers.len(),
                unreachable.join("; ")
            ),
            "allow UDP 8472 (Backend.Port) between all nodes in their security groups; for a stale lease, check that the peer node and its overlayd pod are up",
        )
    } else if bad.is_empty() {
        Finding::pass(
            "peers",
            format!(
                "all {} peers programmed{}",
                s.peers.len(),
                if probed > 0 {
                    ", none unreachable through the overlay"
                } else {
                    ""
                }
            ),
        )
    } else {
        Finding::fail(
            "peers",
            format!(
                "{} of {} peers not right: {}",
                bad.len(),
                s.peers.len(),
                bad.join("; ")
            ),
            "see the overlayd log for the kernel's error; `overlayd status` shows each peer",
        )
    }
}

/// Our chains exist, and our FORWARD jump comes after kube-proxy's (its INVALID drop and its
/// REJECT for Services without endpoints must see pod traffic first).
pub async fn iptables() -> Finding {
    const CHECK: &str = "iptables";
    let ipt = match Iptables::detect().await {
        Ok(i) => i,
        Err(e) => {
            return Finding::fail(
                CHECK,
                e.to_string(),
                "install iptables (legacy and nft tools)",
            )
        }
    };
    let backend = ipt.backend();
    let fix =
        "restart the overlayd pod: it installs its chains and moves its jump after kube-proxy's";
    let mut missing = Vec::new();
    for (table, chain) in [("nat", NAT_CHAIN), ("filter", FWD_CHAIN)] {
        if iptables_tools::list_chain(backend, table, chain)
            .await
            .is_err()
        {
            missing.push(format!("{table} {chain}"));
        }
    }
    if !missing.is_empty() {
        return Finding::fail(
            CHECK,
            format!("missing ({backend}): {}", missing.join(", ")),
            fix,
        );
    }
    let forward = match iptables_tools::list_chain(backend, "filter", "FORWARD").await {
        Ok(t) => t,
        Err(e) => return Finding::fail(CHECK, format!("cannot list FORWARD: {e}"), "run as root"),
    };
    let rules: Vec<&str> = forward.lines().filter(|l| l.starts_with("-A ")).collect();
    let ours = rules
        .iter()
        .position(|r| r.ends_with(&format!("-j {FWD_CHAIN}")));
    let kube: Vec<(usize, &str)> = rules
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            r.rsplit_once("-j ")
                .map(|(_, t)| t.trim())
                .filter(|t| t.starts_with("KUBE-"))
                .map(|t| (i, t))
        })
        .collect();
    match ours {
        None => Finding::fail(CHECK, format!("FORWARD has no jump to {FWD_CHAIN} ({backend})"), fix),
        Some(i) => match kube.iter().find(|(k, _)| *k > i) {
            Some((_, name)) => Finding::fail(
                CHECK,
                format!("our FORWARD jump to {FWD_CHAIN} is ahead of kube-proxy's {name} ({backend}): its INVALID drop and Service REJECTs do not apply to pods"),
                fix,
            ),
            None => Finding::pass(
                CHECK,
                format!(
                    "{NAT_CHAIN} and {FWD_CHAIN} in place ({backend}){}",
                    if kube.is_empty() {
                        ", no kube-proxy chains in FORWARD".to_string()
                    } else {
                        format!(
                            ", FORWARD jump after {}",
                            kube.iter().map(|(_, n)| *n).collect::<Vec<_>>().join(", ")
                        )
                    }
                ),
            ),
        },
    }
}

/// Pod addresses in use against the subnet's: WARN from 90 %, FAIL when full.
pub fn ipam(cx: &Context) -> Finding {
    let Ok(f) = &cx.subnet_file else {
        return Finding::skip("ipam", "no subnet file yet");
    };
    let capacity = ipam_store::pod_capacity(f.subnet);
    let stores = ipam_store::usage(&cx.args.node.cni_data_dir, f.subnet);
    let mut worst = Finding::pass(
        "ipam",
        format!(
            "{} of {capacity} pod addresses in use",
            stores
                .iter()
                .filter_map(|u| u.allocated.as_ref().ok())
                .sum::<usize>()
        ),
    );
    for u in stores {
        let used = match u.allocated {
            Ok(n) => n,
            Err(e) => {
                return Finding::fail(
                    "ipam",
                    format!("cannot read the IPAM store {}: {e}", u.dir.display()),
                    "check --cni-data-dir (the plugin's dataDir)",
                )
            }
        };
        let fix = "delete finished pods, or run the runtime's CNI GC to release leaked addresses; the node's subnet length (SubnetLen) bounds its pods";
        if used >= capacity {
            return Finding::fail(
                "ipam",
                format!(
                    "network {}: all {capacity} pod addresses in use: new pods on this node fail",
                    u.network
                ),
                fix,
            );
        }
        if used * 10 >= capacity * 9 {
            worst = Finding::warn(
                "ipam",
                format!(
                    "network {}: {used} of {capacity} pod addresses in use",
                    u.network
                ),
                fix,
            );
        }
    }
    worst
}

/// The first kubelet config that exists, with its `config.json.d/` drop-ins merged over it (as
/// kubelet does on AL2023); the later key wins.
fn kubelet_config(paths: &[std::path::PathBuf]) -> Option<(String, Value)> {
    for p in paths {
        let Ok(raw) = std::fs::read(p) else { continue };
        let mut v: Value = serde_json::from_slice(&raw).ok()?;
        let mut used = vec![p.display().to_string()];
        let dropins = Path::new(&format!("{}.d", p.display())).to_path_buf();
        if let Ok(entries) = std::fs::read_dir(&dropins) {
            let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
            files.sort();
            for f in files {
                let Ok(Value::Object(o)) = std::fs::read(&f)
                    .map_err(|_| ())
                    .and_then(|b| serde_json::from_slice::<Value>(&b).map_err(|_| ()))
                else {
                    continue;
                };
                if let Value::Object(base) = &mut v {
                    base.extend(o);
                }
                used.push(f.display().to_string());
            }
        }
        return Some((used.join(" + "), v));
    }
    None
}

/// On EKS AMIs the kubelet's maxPods comes from the ENI table (17 on a t3.medium); with overlayd
/// the node's subnet is the limit, so an ENI-bound maxPods wastes it.
pub fn kubelet_max_pods(cx: &Context) -> Finding {
    const CHECK: &str = "kubelet-max-pods";
    let Some((from, cfg)) = kubelet_config(&cx.args.kubelet_config) else {
        return Finding::skip(
            CHECK,
            format!(
                "no kubelet config at {} (pass --kubelet-config where the host's is mounted)",
                cx.args
                    .kubelet_config
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    };
    let max_pods = cfg
        .get("maxPods")
        .and_then(Value::as_u64)
        .unwrap_or(KUBELET_DEFAULT_MAX_PODS);
    let capacity = cx
        .subnet_file
        .as_ref()
        .map(|f| ipam_store::pod_capacity(f.subnet) as u64)
        .unwrap_or(253);
    if max_pods < capacity.min(KUBELET_DEFAULT_MAX_PODS) {
        Finding::warn(
            CHECK,
            format!("kubelet maxPods {max_pods} ({from}) looks ENI-bound, while this node's subnet holds {capacity} pods"),
            format!(
                "raise it: AL2 `bootstrap.sh --use-max-pods false --kubelet-extra-args '--max-pods={}'`; AL2023 nodeadm NodeConfig `spec.kubelet.config.maxPods: {}` (see docs/eks.md)",
                capacity.min(250),
                capacity.min(250)
            ),
        )
    } else {
        Finding::pass(
            CHECK,
            format!("kubelet maxPods {max_pods} ({from}); the subnet holds {capacity}"),
        )
    }
}
