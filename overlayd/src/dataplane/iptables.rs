//! iptables rules in chains of our own, applied atomically with `iptables-restore --noflush`.
//!
//! - nat `OVERLAY-POSTRTG` (jumped to from POSTROUTING): leave packets kube-proxy marked for
//!   masquerade (0x4000) and traffic inside `Network` alone; masquerade pods' traffic leaving
//!   `Network` (`--ip-masq`), and outside traffic to other nodes' pods, as flannel does.
//! - filter `OVERLAY-FWD` (jumped to from FORWARD): accept `Network` both ways, so a default-drop
//!   FORWARD policy (Docker's) does not cut pods off. Its jump is *appended* (as flannel does) and
//!   kept behind kube-proxy's: kube-proxy prepends `KUBE-PROXY-FIREWALL`, `KUBE-FORWARD`,
//!   `KUBE-SERVICES` and `KUBE-EXTERNAL-SERVICES` to FORWARD (`EnsureRule(Prepend, …)`, i.e. `-C`,
//!   then `-I FORWARD` when missing, in pkg/proxy/iptables/proxier.go, Kubernetes 1.29/1.30), and
//!   their INVALID drop and their REJECT for Services without endpoints must see pod traffic
//!   before our ACCEPT does. A jump of ours found ahead of any `KUBE-*` jump (left by an older
//!   overlayd, or re-added first after a flush) is drift and moves to the end.
//! - The POSTROUTING jump goes first; that is safe because the chain's first rule returns for
//!   packets kube-proxy marked (0x4000): its `KUBE-POSTROUTING` masquerades those, once.
//!
//! Checks read only the chains involved (`iptables -S <chain>`), never a dump of whole tables.
//!
//! The backend (legacy or nf_tables) is chosen the way kube-proxy's iptables wrapper does: where
//! kubelet's canary chains live, else where more rules live. The iptables tools are spawned here:
//! their restore format is the stable, atomic interface to both backends.

use std::fmt::Write as _;

use ipnetwork::Ipv4Network;
use tracing::{info, warn};

use super::DataplaneError;
use crate::iptables_tools::{self, ToolError};

pub const NAT_CHAIN: &str = "OVERLAY-POSTRTG";
pub const FWD_CHAIN: &str = "OVERLAY-FWD";

/// Where a jump to one of our chains belongs in its built-in chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// Inserted first when missing; wherever it is later is fine.
    First,
    /// Appended, and never ahead of a jump to a `KUBE-*` chain.
    AfterKube,
}

struct Jump {
    table: &'static str,
    parent: &'static str,
    chain: &'static str,
    /// The rule exactly as `iptables -S` prints it.
    rule: &'static str,
    place: Place,
}

const NAT_JUMP: Jump = Jump {
    table: "nat",
    parent: "POSTROUTING",
    chain: NAT_CHAIN,
    rule: "-A POSTROUTING -m comment --comment \"overlayd: pod masquerade\" -j OVERLAY-POSTRTG",
    place: Place::First,
};
const FWD_JUMP: Jump = Jump {
    table: "filter",
    parent: "FORWARD",
    chain: FWD_CHAIN,
    rule: "-A FORWARD -m comment --comment \"overlayd: pod forwarding\" -j OVERLAY-FWD",
    place: Place::AfterKube,
};

pub use crate::iptables_tools::Backend;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub network: Ipv4Network,
    pub subnet: Ipv4Network,
    pub ip_masq: bool,
}

pub struct Iptables {
    backend: Backend,
    random_fully: bool,
}

fn tool_err(e: ToolError) -> DataplaneError {
    if e.is_missing() {
        DataplaneError::Iptables(format!("{e}; install the iptables package (>= 1.8)"))
    } else {
        DataplaneError::Iptables(e.to_string())
    }
}

impl Iptables {
    /// Picks the backend as kube-proxy's wrapper does.
    pub async fn detect() -> Result<Iptables, DataplaneError> {
        let nft = iptables_tools::save(Backend::Nft, &[]).await.ok();
        let legacy = iptables_tools::save(Backend::Legacy, &[]).await.ok();
        let canary = |s: &Option<String>| {
            s.as_deref().is_some_and(|t| {
                t.contains("KUBE-IPTABLES-HINT") || t.contains("KUBE-KUBELET-CANARY")
            })
        };
        let rules = |s: &Option<String>| {
            s.as_deref()
                .map_or(0, |t| t.lines().filter(|l| l.starts_with("-A")).count())
        };
        let backend = match (&nft, &legacy) {
            (None, None) => {
                return Err(DataplaneError::Iptables(
                    "neither iptables-nft-save nor iptables-legacy-save works; install iptables (>= 1.8)".into(),
                ))
            }
            (Some(_), None) => Backend::Nft,
            (None, Some(_)) => Backend::Legacy,
            _ if canary(&nft) => Backend::Nft,
            _ if canary(&legacy) => Backend::Legacy,
            _ if rules(&legacy) > rules(&nft) => Backend::Legacy,
            _ => Backend::Nft,
        };
        let version = iptables_tools::output(backend.iptables_tool(), &["--version"])
            .await
            .unwrap_or_default();
        Ok(Iptables {
            backend,
            random_fully: supports_random_fully(&version),
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    fn chains_text(&self, r: &Rules) -> (String, String) {
        let n = r.network;
        let s = r.subnet;
        let rf = if self.random_fully {
            " --random-fully"
        } else {
            ""
        };
        let mut nat = format!(":{NAT_CHAIN} - [0:0]\n");
        if r.ip_masq {
            let c = NAT_CHAIN;
            let _ = write!(
                nat,
                "-A {c} -m mark --mark 0x4000/0x4000 -m comment --comment \"overlayd: kube-proxy masquerades these\" -j RETURN\n\
                 -A {c} -s {n} -d {n} -m comment --comment \"overlayd: pod to pod\" -j RETURN\n\
                 -A {c} -s {n} ! -d 224.0.0.0/4 -m comment --comment \"overlayd: pods to outside\" -j MASQUERADE{rf}\n\
                 -A {c} ! -s {n} -d {s} -m comment --comment \"overlayd: outside to local pods\" -j RETURN\n\
                 -A {c} ! -s {n} -d {n} -m comment --comment \"overlayd: outside to remote pods\" -j MASQUERADE{rf}\n"
            );
        }
        let fwd = format!(
            ":{FWD_CHAIN} - [0:0]\n\
             -A {FWD_CHAIN} -s {n} -m comment --comment \"overlayd: from pods\" -j ACCEPT\n\
             -A {FWD_CHAIN} -d {n} -m comment --comment \"overlayd: to pods\" -j ACCEPT\n"
        );
        (nat, fwd)
    }

    async fn restore(&self, input: &str) -> Result<(), DataplaneError> {
        iptables_tools::restore_noflush(self.backend, input)
            .await
            .map_err(|e| DataplaneError::Iptables(format!("overlayd's rules were rejected: {e}")))
    }

    /// The `-A` rules of `chain`; `None` when it does not exist. Any failure reads as "does not
    /// exist": the repair then re-declares the chain, which is harmless.
    async fn own_chain(&self, table: &str, chain: &str) -> Option<Vec<String>> {
        iptables_tools::list_chain(self.backend, table, chain)
            .await
            .ok()
            .map(|t| rule_lines(&t))
    }

    /// The `-A` rules of a built-in chain (which always exists, so a failure is an error).
    async fn builtin_chain(&self, table: &str, chain: &str) -> Result<Vec<String>, DataplaneError> {
        iptables_tools::list_chain(self.backend, table, chain)
            .await
            .map(|t| rule_lines(&t))
            .map_err(tool_err)
    }

    /// Brings the rules to `r` if they differ, were flushed or our FORWARD jump got ahead of
    /// kube-proxy's. Returns whether it wrote anything.
    pub async fn ensure(&self, r: &Rules) -> Result<bool, DataplaneError> {
        let nat_now = self.own_chain("nat", NAT_CHAIN).await;
        let fwd_now = self.own_chain("filter", FWD_CHAIN).await;
        let postrouting = self.builtin_chain("nat", NAT_JUMP.parent).await?;
        let forward = self.builtin_chain("filter", FWD_JUMP.parent).await?;
        let (nat, fwd) = self.chains_text(r);
        let nat_fix = NAT_JUMP.fix(&postrouting);
        let fwd_fix = FWD_JUMP.fix(&forward);
        let same = |now: &Option<Vec<String>>, text: &str| {
            now.as_ref()
                .is_some_and(|rules| same_rules(rules, &rule_lines(text)))
        };
        let nat_ok = nat_fix.is_none() && same(&nat_now, &nat);
        let fwd_ok = fwd_fix.is_none() && same(&fwd_now, &fwd);
        if nat_ok && fwd_ok {
            return Ok(false);
        }
        let mut input = String::from("*nat\n");
        input.push_str(&nat);
        input.push_str(&nat_fix.as_ref().map_or(String::new(), |f| f.input.clone()));
        input.push_str("COMMIT\n*filter\n");
        input.push_str(&fwd);
        input.push_str(&fwd_fix.as_ref().map_or(String::new(), |f| f.input.clone()));
        input.push_str("COMMIT\n");
        self.restore(&input).await?;
        let fresh = |now: &Option<Vec<String>>| now.as_ref().is_none_or(Vec::is_empty);
        if fresh(&nat_now) && fresh(&fwd_now) {
            info!(backend = %self.backend, masquerade = r.ip_masq, "installed iptables rules");
        } else if fwd_fix.as_ref().is_some_and(|f| f.misplaced) {
            warn!(
                backend = %self.backend,
                "overlayd's FORWARD jump was ahead of kube-proxy's KUBE-* jumps (their INVALID drop and \
                 REJECT for Services without endpoints would not apply to pods); moved it to the end"
            );
        } else {
            warn!(backend = %self.backend, "iptables rules had drifted (flushed or edited); restored them");
        }
        Ok(true)
    }

    /// Removes our chains and the jumps to them. Missing ones are fine.
    pub async fn remove(&self) -> Result<bool, DataplaneError> {
        let mut input = String::new();
        let mut any = false;
        for jump in [&NAT_JUMP, &FWD_JUMP] {
            let declared = self.own_chain(jump.table, jump.chain).await.is_some();
            let parent = self.builtin_chain(jump.table, jump.parent).await?;
            let target = format!("-j {}", jump.chain);
            let jumps: Vec<&String> = parent.iter().filter(|l| l.ends_with(&target)).collect();
            if !declared && jumps.is_empty() {
                continue;
            }
            any = true;
            input.push_str(&format!("*{}\n", jump.table));
            for j in jumps {
                input.push_str(&format!("-D{}\n", &j[2..]));
            }
            if declared {
                input.push_str(&format!(":{0} - [0:0]\n-X {0}\n", jump.chain));
            }
            input.push_str("COMMIT\n");
        }
        if !any {
            return Ok(false);
        }
        self.restore(&input).await?;
        Ok(true)
    }
}

/// The `-A …` lines of `iptables -S` / `-save` output.
fn rule_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with("-A "))
        .map(str::to_string)
        .collect()
}

/// The target of a rule (`-j X`), if it jumps.
fn target(rule: &str) -> Option<&str> {
    let words: Vec<&str> = rule.split_whitespace().collect();
    words
        .iter()
        .rposition(|w| *w == "-j")
        .and_then(|i| words.get(i + 1).copied())
}

/// Restore lines that put a jump right, and whether it was out of place.
#[derive(Debug, PartialEq, Eq)]
struct JumpFix {
    input: String,
    misplaced: bool,
}

impl Jump {
    /// What to change in `parent` (its `-A` rules, in order) so that it holds exactly one copy of
    /// this jump, in its place; `None` when it already does.
    fn fix(&self, parent: &[String]) -> Option<JumpFix> {
        let ours: Vec<usize> = parent
            .iter()
            .enumerate()
            .filter(|(_, l)| l.as_str() == self.rule)
            .map(|(i, _)| i)
            .collect();
        let last_kube = parent
            .iter()
            .rposition(|l| target(l).is_some_and(|t| t.starts_with("KUBE-")));
        let misplaced = self.place == Place::AfterKube
            && matches!((ours.first(), last_kube), (Some(o), Some(k)) if *o < k);
        let delete = || format!("-D{}\n", &self.rule[2..]);
        let add = || match self.place {
            Place::First => format!(
                "{}\n",
                self.rule
                    .replacen("-A ", "-I ", 1)
                    .replacen(" -m", " 1 -m", 1)
            ),
            Place::AfterKube => format!("{}\n", self.rule),
        };
        let input = match (ours.len(), misplaced) {
            (1, false) => return None,
            (0, _) => add(),
            (n, false) => (1..n).map(|_| delete()).collect(),
            (n, true) => (0..n).map(|_| delete()).chain([add()]).collect(),
        };
        Some(JumpFix { input, misplaced })
    }
}

/// `iptables -S` prints what we wrote in its own canonical form; compare ignoring the order of
/// matches within a rule, which is all it changes for our rules.
fn same_rules(now: &[String], want: &[String]) -> bool {
    let norm = |l: &String| {
        let mut words: Vec<String> = l
            .replace('"', "")
            .split_whitespace()
            .map(str::to_string)
            .collect();
        words.sort();
        words
    };
    now.len() == want.len() && now.iter().zip(want).all(|(a, b)| norm(a) == norm(b))
}

/// `--random-fully` needs iptables >= 1.6.2.
fn supports_random_fully(version_output: &str) -> bool {
    let v = version_output
        .split_whitespace()
        .find(|w| w.starts_with('v'))
        .map(|w| w.trim_start_matches('v'))
        .unwrap_or("");
    let parts: Vec<u32> = v.split('.').filter_map(|p| p.parse().ok()).collect();
    parts.as_slice() >= [1, 6, 2].as_slice()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_fully_needs_1_6_2() {
        assert!(supports_random_fully("iptables v1.8.9 (nf_tables)"));
        assert!(supports_random_fully("iptables v1.6.2"));
        assert!(!supports_random_fully("iptables v1.6.1"));
        assert!(!supports_random_fully(""));
    }

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    // kube-proxy's FORWARD jumps as `iptables -S FORWARD` prints them (1.29/1.30 proxier.go).
    const KUBE_FWD: &[&str] = &[
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
        "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD",
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES",
    ];

    #[test]
    fn nat_jump_is_inserted_first_when_missing() {
        let fix = NAT_JUMP.fix(&[]).unwrap();
        assert_eq!(
            fix.input,
            "-I POSTROUTING 1 -m comment --comment \"overlayd: pod masquerade\" -j OVERLAY-POSTRTG\n"
        );
        let twice = lines(&[NAT_JUMP.rule, NAT_JUMP.rule]);
        assert_eq!(
            NAT_JUMP.fix(&twice).unwrap().input,
            "-D POSTROUTING -m comment --comment \"overlayd: pod masquerade\" -j OVERLAY-POSTRTG\n"
        );
        // Behind KUBE-POSTROUTING is fine too: our chain returns for marked packets first.
        let mut behind = lines(&["-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING"]);
        behind.push(NAT_JUMP.rule.into());
        assert_eq!(NAT_JUMP.fix(&behind), None);
    }

    #[test]
    fn forward_jump_is_appended_after_kube_proxy_jumps() {
        let fix = FWD_JUMP.fix(&lines(KUBE_FWD)).unwrap();
        assert_eq!(fix.input, format!("{}\n", FWD_JUMP.rule));
        assert!(!fix.misplaced);
        let mut after = lines(KUBE_FWD);
        after.push(FWD_JUMP.rule.into());
        assert_eq!(FWD_JUMP.fix(&after), None);
        // Other agents' rules after ours are theirs to place.
        after.push("-A FORWARD -j DOCKER-USER".into());
        assert_eq!(FWD_JUMP.fix(&after), None);
    }

    #[test]
    fn forward_jump_ahead_of_a_kube_jump_moves_to_the_end() {
        let mut ahead = lines(&[FWD_JUMP.rule]);
        ahead.extend(lines(KUBE_FWD));
        let fix = FWD_JUMP.fix(&ahead).unwrap();
        assert!(fix.misplaced);
        assert_eq!(
            fix.input,
            format!("-D{}\n{}\n", &FWD_JUMP.rule[2..], FWD_JUMP.rule)
        );
        // Between two of kube-proxy's jumps is out of place as well; duplicates all go.
        let mut between = lines(&KUBE_FWD[..2]);
        between.push(FWD_JUMP.rule.into());
        between.extend(lines(&KUBE_FWD[2..]));
        between.push(FWD_JUMP.rule.into());
        let fix = FWD_JUMP.fix(&between).unwrap();
        assert!(fix.misplaced);
        assert_eq!(fix.input.matches("-D FORWARD").count(), 2);
        assert!(fix.input.ends_with(&format!("{}\n", FWD_JUMP.rule)));
    }

    #[test]
    fn target_is_the_word_after_the_last_dash_j() {
        assert_eq!(target(KUBE_FWD[1]), Some("KUBE-FORWARD"));
        assert_eq!(target("-A FORWARD -s 10.0.0.0/8 -j ACCEPT"), Some("ACCEPT"));
        assert_eq!(target("-A FORWARD -s 10.0.0.0/8"), None);
    }
}
