//! aws-node's iptables state, in either backend (legacy and nf_tables can both hold some):
//!
//! - chains `AWS-SNAT-CHAIN-<n>` and `AWS-CONNMARK-CHAIN-<n>` (nat; older releases chain
//!   `-0 … -N` together with `! -d <cidr> -j …-CHAIN-<i+1>`, v1.16+ has only `-0`);
//! - rules outside those chains that jump into them (POSTROUTING "AWS SNAT CHAIN", PREROUTING
//!   "AWS, outbound connections") or carry one of aws-node's comments (nat PREROUTING
//!   "AWS, CONNMARK" restore-mark, mangle PREROUTING "AWS, primary ENI" ×3, very old releases'
//!   POSTROUTING "AWS, SNAT", filter FORWARD "Block Node Local Pod access via IPv4").
//!
//! Read with `<backend>-save`, removed with one `<backend>-restore --noflush` per table (deletes,
//! then flush and delete of the chains), so each table changes atomically. If that transaction
//! fails, each item is retried on its own so the rest still goes, and the failures are reported.
//! KUBE-* chains are never touched.

use std::fmt;

use thiserror::Error;

use super::iptables_save::{self, SaveFormatError, SavedRule, SavedTable};
use crate::iptables_tools::{self, ToolError};

/// Chain name prefixes aws-node creates (followed by a number).
const AWS_CHAIN_PREFIXES: [&str; 2] = ["AWS-SNAT-CHAIN-", "AWS-CONNMARK-CHAIN-"];

/// Comments aws-node puts on its rules (every release we know of).
const AWS_COMMENTS: [&str; 9] = [
    "AWS SNAT CHAIN",
    "AWS SNAT CHAIN EXCLUSION",
    "AWS, SNAT",
    "AWS, outbound connections",
    "AWS, CONNMARK",
    "AWS, primary ENI",
    "AWS CONNMARK CHAIN, VPC CIDR",
    "AWS CONNMARK CHAIN, EXCLUDED CIDR",
    "Block Node Local Pod access via IPv4",
];

#[derive(Debug, Error)]
pub enum IptablesError {
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("cannot read the output of {tool}: {source}")]
    Format {
        tool: &'static str,
        source: SaveFormatError,
    },
}

pub use crate::iptables_tools::Backend;

/// An aws-node chain and the rules in it (they go with the chain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsChain {
    pub name: String,
    pub rules: Vec<SavedRule>,
    /// Rules that jump here and stay (they sit in KUBE-* chains): the chain cannot be deleted.
    pub kept_references: Vec<SavedRule>,
}

/// One thing to remove from a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IptablesItem {
    /// A rule in a chain that stays (deleted with `-D`).
    Rule(SavedRule),
    /// A whole aws-node chain (flushed and deleted).
    Chain(AwsChain),
}

impl fmt::Display for IptablesItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IptablesItem::Rule(r) => f.write_str(&r.to_save_line()),
            IptablesItem::Chain(c) => write!(f, "chain {} ({} rules)", c.name, c.rules.len()),
        }
    }
}

/// aws-node's leftovers in one table of one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableLeftovers {
    pub table: String,
    /// Rules first, then chains: the order they are removed in.
    pub items: Vec<IptablesItem>,
}

impl TableLeftovers {
    /// The `iptables-restore --noflush` input that removes every item in one transaction.
    pub fn restore_script(&self) -> String {
        script(&self.table, &self.items)
    }
}

/// True for the chains aws-node creates.
pub fn is_aws_chain(name: &str) -> bool {
    AWS_CHAIN_PREFIXES.iter().any(|p| {
        name.strip_prefix(p)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

fn is_aws_rule(rule: &SavedRule) -> bool {
    rule.target().is_some_and(is_aws_chain)
        || rule.comment().is_some_and(|c| AWS_COMMENTS.contains(&c))
}

/// aws-node's leftovers in parsed tables; tables without any are left out.
pub fn find(tables: &[SavedTable]) -> Vec<TableLeftovers> {
    let mut out = Vec::new();
    for table in tables {
        let mut items: Vec<IptablesItem> = table
            .rules
            .iter()
            .filter(|r| !is_aws_chain(&r.chain) && !r.chain.starts_with("KUBE-"))
            .filter(|r| is_aws_rule(r))
            .cloned()
            .map(IptablesItem::Rule)
            .collect();
        items.extend(table.chains.iter().filter(|c| is_aws_chain(c)).map(|c| {
            IptablesItem::Chain(AwsChain {
                name: c.clone(),
                rules: table
                    .rules
                    .iter()
                    .filter(|r| &r.chain == c)
                    .cloned()
                    .collect(),
                kept_references: table
                    .rules
                    .iter()
                    .filter(|r| r.chain.starts_with("KUBE-"))
                    .filter(|r| r.target() == Some(c.as_str()))
                    .cloned()
                    .collect(),
            })
        }));
        if !items.is_empty() {
            out.push(TableLeftovers {
                table: table.name.clone(),
                items,
            });
        }
    }
    out
}

fn script(table: &str, items: &[IptablesItem]) -> String {
    let mut s = format!("*{table}\n");
    for item in items {
        if let IptablesItem::Rule(r) = item {
            s.push_str(&format!("-D {} {}\n", r.chain, r.spec));
        }
    }
    // Flush every chain before deleting any: older releases chain them to each other.
    for item in items {
        if let IptablesItem::Chain(c) = item {
            s.push_str(&format!("-F {}\n", c.name));
        }
    }
    for item in items {
        if let IptablesItem::Chain(c) = item {
            s.push_str(&format!("-X {}\n", c.name));
        }
    }
    s.push_str("COMMIT\n");
    s
}

/// What reading a backend gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Saved {
    Tables(Vec<SavedTable>),
    /// The backend cannot hold anything here (tool not installed, or the kernel lacks it): why.
    Unavailable(String),
}

/// True for the errors a kernel without the backend gives ("Protocol not supported", …).
pub fn kernel_lacks_it(stderr: &str) -> bool {
    stderr.to_ascii_lowercase().contains("not supported")
}

/// Reads one backend.
pub async fn read(backend: Backend) -> Result<Saved, IptablesError> {
    let tool = backend.save_tool();
    let text = match iptables_tools::save(backend, &[]).await {
        Ok(t) => t,
        Err(e) if e.is_missing() => {
            return Ok(Saved::Unavailable(format!("{tool} is not installed")))
        }
        Err(ToolError::Failed { stderr, .. }) if kernel_lacks_it(&stderr) => {
            return Ok(Saved::Unavailable(format!(
                "the kernel does not support this backend ({tool}: {stderr})"
            )))
        }
        Err(e) => return Err(e.into()),
    };
    iptables_save::parse(&text)
        .map(Saved::Tables)
        .map_err(|source| IptablesError::Format { tool, source })
}

/// Feeds `input` to `<backend>-restore --noflush`.
async fn restore(backend: Backend, input: &str) -> Result<(), IptablesError> {
    Ok(iptables_tools::restore_noflush(backend, input).await?)
}

/// Removes one table's leftovers: all at once, else item by item. One result per item, in order.
pub async fn remove(
    backend: Backend,
    leftovers: &TableLeftovers,
) -> Vec<(IptablesItem, Result<(), IptablesError>)> {
    if restore(backend, &leftovers.restore_script()).await.is_ok() {
        return leftovers
            .items
            .iter()
            .cloned()
            .map(|i| (i, Ok(())))
            .collect();
    }
    tracing::warn!(
        %backend,
        table = %leftovers.table,
        "removing all aws-node rules in one transaction failed; retrying one by one"
    );
    let mut results = Vec::new();
    let table = &leftovers.table;
    for item in &leftovers.items {
        if let IptablesItem::Rule(_) = item {
            let r = restore(backend, &script(table, std::slice::from_ref(item))).await;
            results.push((item.clone(), r));
        }
    }
    let chains: Vec<&AwsChain> = leftovers
        .items
        .iter()
        .filter_map(|i| match i {
            IptablesItem::Chain(c) => Some(c),
            IptablesItem::Rule(_) => None,
        })
        .collect();
    // Flush each chain on its own first (so one that is gone does not stop the others), then
    // delete each; a chain still referenced by a rule that could not be deleted stays, with its error.
    for c in &chains {
        let _ = restore(backend, &format!("*{table}\n-F {}\nCOMMIT\n", c.name)).await;
    }
    for c in chains {
        let r = restore(backend, &format!("*{table}\n-X {}\nCOMMIT\n", c.name)).await;
        results.push((IptablesItem::Chain(c.clone()), r));
    }
    // Something else may have removed an item meanwhile: what is gone is not a failure.
    if results.iter().any(|(_, r)| r.is_err()) {
        if let Ok(Saved::Tables(now)) = read(backend).await {
            let left = find(&now);
            let still_there = |item: &IptablesItem| {
                left.iter()
                    .filter(|t| &t.table == table)
                    .flat_map(|t| t.items.iter())
                    .any(|i| same_item(i, item))
            };
            for (item, r) in results.iter_mut() {
                if r.is_err() && !still_there(item) {
                    *r = Ok(());
                }
            }
        }
    }
    results
}

/// The same rule, or the same chain (whatever it holds now).
fn same_item(a: &IptablesItem, b: &IptablesItem) -> bool {
    match (a, b) {
        (IptablesItem::Rule(x), IptablesItem::Rule(y)) => x == y,
        (IptablesItem::Chain(x), IptablesItem::Chain(y)) => x.name == y.name,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAT: &str = r#"*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:AWS-CONNMARK-CHAIN-0 - [0:0]
:AWS-SNAT-CHAIN-0 - [0:0]
:AWS-SNAT-CHAIN-1 - [0:0]
:KUBE-SERVICES - [0:0]
:AWS-CUSTOM - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -i eni+ -m comment --comment "AWS, outbound connections" -j AWS-CONNMARK-CHAIN-0
-A PREROUTING -m comment --comment "AWS, CONNMARK" -j CONNMARK --restore-mark --nfmask 0x80 --ctmask 0x80
-A POSTROUTING -m comment --comment "AWS SNAT CHAIN" -j AWS-SNAT-CHAIN-0
-A POSTROUTING -s 10.99.0.0/16 ! -d 10.99.0.0/16 -j MASQUERADE
-A POSTROUTING -m comment --comment "someone else's AWS thing" -j AWS-CUSTOM
-A AWS-CONNMARK-CHAIN-0 -m comment --comment "AWS, CONNMARK" -j CONNMARK --set-xmark 0x80/0x80
-A AWS-SNAT-CHAIN-0 ! -d 192.168.0.0/16 -m comment --comment "AWS SNAT CHAIN" -j AWS-SNAT-CHAIN-1
-A AWS-SNAT-CHAIN-1 ! -o vlan+ -m comment --comment "AWS, SNAT" -m addrtype ! --dst-type LOCAL -j SNAT --to-source 192.168.10.20 --random-fully
-A KUBE-SERVICES -m comment --comment "AWS, SNAT" -j RETURN
-A KUBE-SERVICES -j AWS-SNAT-CHAIN-1
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
-A PREROUTING -i eth0 -j MARK --set-xmark 0x1/0x1
COMMIT
"#;

    #[test]
    fn aws_chain_names() {
        assert!(is_aws_chain("AWS-SNAT-CHAIN-0"));
        assert!(is_aws_chain("AWS-CONNMARK-CHAIN-12"));
        assert!(!is_aws_chain("AWS-SNAT-CHAIN-"));
        assert!(!is_aws_chain("AWS-SNAT-CHAIN-X"));
        assert!(!is_aws_chain("AWS-CUSTOM"));
        assert!(!is_aws_chain("KUBE-SERVICES"));
    }

    #[test]
    fn finds_only_aws_items_and_scripts_their_removal() {
        let tables = iptables_save::parse(NAT).expect("parse");
        let found = find(&tables);
        assert_eq!(found.len(), 1, "mangle has nothing of aws-node's");
        let nat = &found[0];
        assert_eq!(nat.table, "nat");
        let shown: Vec<String> = nat.items.iter().map(|i| i.to_string()).collect();
        assert_eq!(
            shown,
            [
                r#"-A PREROUTING -i eni+ -m comment --comment "AWS, outbound connections" -j AWS-CONNMARK-CHAIN-0"#,
                r#"-A PREROUTING -m comment --comment "AWS, CONNMARK" -j CONNMARK --restore-mark --nfmask 0x80 --ctmask 0x80"#,
                r#"-A POSTROUTING -m comment --comment "AWS SNAT CHAIN" -j AWS-SNAT-CHAIN-0"#,
                "chain AWS-CONNMARK-CHAIN-0 (1 rules)",
                "chain AWS-SNAT-CHAIN-0 (1 rules)",
                "chain AWS-SNAT-CHAIN-1 (1 rules)",
            ]
        );
        let IptablesItem::Chain(snat1) = &nat.items[5] else {
            panic!("not a chain: {:?}", nat.items[5]);
        };
        assert_eq!(
            snat1
                .kept_references
                .iter()
                .map(|r| r.to_save_line())
                .collect::<Vec<_>>(),
            ["-A KUBE-SERVICES -j AWS-SNAT-CHAIN-1"],
            "kube-proxy's rules stay, and are named as what keeps the chain"
        );
        let script = nat.restore_script();
        assert_eq!(
            script,
            r#"*nat
-D PREROUTING -i eni+ -m comment --comment "AWS, outbound connections" -j AWS-CONNMARK-CHAIN-0
-D PREROUTING -m comment --comment "AWS, CONNMARK" -j CONNMARK --restore-mark --nfmask 0x80 --ctmask 0x80
-D POSTROUTING -m comment --comment "AWS SNAT CHAIN" -j AWS-SNAT-CHAIN-0
-F AWS-CONNMARK-CHAIN-0
-F AWS-SNAT-CHAIN-0
-F AWS-SNAT-CHAIN-1
-X AWS-CONNMARK-CHAIN-0
-X AWS-SNAT-CHAIN-0
-X AWS-SNAT-CHAIN-1
COMMIT
"#
        );
    }

    #[test]
    fn nothing_found_in_a_clean_dump() {
        let tables =
            iptables_save::parse("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n").expect("parse");
        assert!(find(&tables).is_empty());
    }
}
