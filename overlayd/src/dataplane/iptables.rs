//! iptables rules in chains of our own, applied atomically with `iptables-restore --noflush`.
//!
//! - nat `OVERLAY-POSTRTG` (jumped to from POSTROUTING): leave packets kube-proxy marked for
//!   masquerade (0x4000) and traffic inside `Network` alone; masquerade pods' traffic leaving
//!   `Network` (`--ip-masq`), and outside traffic to other nodes' pods, as flannel does.
//! - filter `OVERLAY-FWD` (jumped to from FORWARD): accept `Network` both ways, so a default-drop
//!   FORWARD policy (Docker's) does not cut pods off.
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
const NAT_JUMP: &str =
    "-A POSTROUTING -m comment --comment \"overlayd: pod masquerade\" -j OVERLAY-POSTRTG";
const FWD_JUMP: &str =
    "-A FORWARD -m comment --comment \"overlayd: pod forwarding\" -j OVERLAY-FWD";

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

    async fn save(&self, table: &str) -> Result<String, DataplaneError> {
        iptables_tools::save(self.backend, &["-t", table])
            .await
            .map_err(tool_err)
    }

    async fn restore(&self, input: &str) -> Result<(), DataplaneError> {
        iptables_tools::restore_noflush(self.backend, input)
            .await
            .map_err(|e| DataplaneError::Iptables(format!("overlayd's rules were rejected: {e}")))
    }

    /// Our chain in `table`, read with one `-save`.
    async fn chain(&self, table: &str, chain: &'static str) -> Result<ChainState, DataplaneError> {
        Ok(ChainState::parse(&self.save(table).await?, chain))
    }

    /// Brings the rules to `r` if they differ (or were flushed). Returns whether it wrote anything.
    pub async fn ensure(&self, r: &Rules) -> Result<bool, DataplaneError> {
        let nat_now = self.chain("nat", NAT_CHAIN).await?;
        let fwd_now = self.chain("filter", FWD_CHAIN).await?;
        let (nat, fwd) = self.chains_text(r);
        let body = |text: &str| -> Vec<String> {
            text.lines()
                .filter(|l| l.starts_with("-A"))
                .map(str::to_string)
                .collect()
        };
        let nat_ok = nat_now.jumps(NAT_JUMP) == 1 && same_rules(&nat_now.rules, &body(&nat));
        let fwd_ok = fwd_now.jumps(FWD_JUMP) == 1 && same_rules(&fwd_now.rules, &body(&fwd));
        if nat_ok && fwd_ok {
            return Ok(false);
        }
        let mut input = String::from("*nat\n");
        input.push_str(&nat);
        input.push_str(&fix_jumps(nat_now.jumps(NAT_JUMP), NAT_JUMP));
        input.push_str("COMMIT\n*filter\n");
        input.push_str(&fwd);
        input.push_str(&fix_jumps(fwd_now.jumps(FWD_JUMP), FWD_JUMP));
        input.push_str("COMMIT\n");
        self.restore(&input).await?;
        if nat_now.rules.is_empty() && fwd_now.rules.is_empty() {
            info!(backend = %self.backend, masquerade = r.ip_masq, "installed iptables rules");
        } else {
            warn!(backend = %self.backend, "iptables rules had drifted (flushed or edited); restored them");
        }
        Ok(true)
    }

    /// Removes our chains and the jumps to them. Missing ones are fine.
    pub async fn remove(&self) -> Result<bool, DataplaneError> {
        let nat = self.chain("nat", NAT_CHAIN).await?;
        let fwd = self.chain("filter", FWD_CHAIN).await?;
        if !nat.declared && !fwd.declared {
            return Ok(false);
        }
        let mut input = String::new();
        for (table, chain, state) in [("nat", NAT_CHAIN, &nat), ("filter", FWD_CHAIN, &fwd)] {
            input.push_str(&format!("*{table}\n"));
            for j in &state.jump_rules {
                input.push_str(&format!("-D{}\n", &j[2..]));
            }
            if state.declared {
                input.push_str(&format!(":{chain} - [0:0]\n-X {chain}\n"));
            }
            input.push_str("COMMIT\n");
        }
        self.restore(&input).await?;
        Ok(true)
    }
}

/// One of our chains as `iptables-save` shows it.
struct ChainState {
    declared: bool,
    /// `-A <chain> …` lines.
    rules: Vec<String>,
    /// Rules elsewhere that jump to the chain.
    jump_rules: Vec<String>,
}

impl ChainState {
    fn parse(saved: &str, chain: &str) -> ChainState {
        let decl = format!(":{chain} ");
        let body = format!("-A {chain} ");
        let jump = format!("-j {chain}");
        let mut state = ChainState {
            declared: false,
            rules: Vec::new(),
            jump_rules: Vec::new(),
        };
        for l in saved.lines() {
            if l.starts_with(&decl) {
                state.declared = true;
            } else if l.starts_with(&body) {
                state.rules.push(l.to_string());
            } else if l.ends_with(&jump) {
                state.jump_rules.push(l.to_string());
            }
        }
        state
    }

    /// How many of the jumps are exactly `jump`.
    fn jumps(&self, jump: &str) -> usize {
        self.jump_rules
            .iter()
            .filter(|l| l.as_str() == jump)
            .count()
    }
}

/// `iptables-save` prints what we wrote in its own canonical form; compare ignoring the order of
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

/// Restore input that leaves exactly one `jump` rule: adds it when missing, deletes duplicates.
fn fix_jumps(count: usize, jump: &str) -> String {
    match count {
        0 => format!(
            "{}\n",
            jump.replacen("-A ", "-I ", 1).replacen(" -m", " 1 -m", 1)
        ),
        1 => String::new(),
        n => (1..n).map(|_| format!("-D{}\n", &jump[2..])).collect(),
    }
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

    #[test]
    fn jump_is_inserted_first_when_missing() {
        assert_eq!(
            fix_jumps(0, NAT_JUMP),
            "-I POSTROUTING 1 -m comment --comment \"overlayd: pod masquerade\" -j OVERLAY-POSTRTG\n"
        );
        assert_eq!(
            fix_jumps(2, NAT_JUMP),
            "-D POSTROUTING -m comment --comment \"overlayd: pod masquerade\" -j OVERLAY-POSTRTG\n"
        );
    }
}
