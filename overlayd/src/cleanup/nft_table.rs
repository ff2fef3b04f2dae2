//! aws-node's own nftables table `ip aws-cni` (chains `nat-prerouting`, `snat-mark`), written by
//! VPC CNI v1.23+ when iptables runs on nf_tables. The whole table is aws-node's: it goes in one
//! `nft delete table ip aws-cni`.

use std::process::Stdio;

use thiserror::Error;
use tokio::process::Command;

pub const FAMILY: &str = "ip";
pub const TABLE: &str = "aws-cni";

#[derive(Debug, Error)]
pub enum NftError {
    #[error("cannot run nft: {0}")]
    Spawn(std::io::Error),
    #[error("nft {args} failed ({status}): {stderr}")]
    Failed {
        args: String,
        status: String,
        stderr: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NftState {
    /// `nft` is not installed or the kernel has no nf_tables, so aws-node could not have written
    /// the table either: why.
    Unavailable(String),
    Absent,
    /// The table, as `nft list table` prints it.
    Present {
        listing: String,
    },
}

async fn nft(args: &[&str]) -> Result<Option<String>, NftError> {
    let out = match Command::new("nft")
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
    {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(NftError::Spawn(e)),
    };
    if !out.status.success() {
        return Err(NftError::Failed {
            args: args.join(" "),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// True when `nft list tables <family>` output names the table.
fn lists_table(tables: &str) -> bool {
    tables.lines().any(|l| {
        let mut w = l.split_whitespace();
        w.next() == Some("table") && w.next() == Some(FAMILY) && w.next() == Some(TABLE)
    })
}

pub async fn find() -> Result<NftState, NftError> {
    let tables = match nft(&["list", "tables", FAMILY]).await {
        Ok(Some(t)) => t,
        Ok(None) => return Ok(NftState::Unavailable("nft is not installed".into())),
        Err(NftError::Failed { stderr, .. })
            if super::iptables_leftovers::kernel_lacks_it(&stderr) =>
        {
            return Ok(NftState::Unavailable(format!(
                "the kernel does not support nftables ({stderr})"
            )))
        }
        Err(e) => return Err(e),
    };
    if !lists_table(&tables) {
        return Ok(NftState::Absent);
    }
    let listing = nft(&["list", "table", FAMILY, TABLE])
        .await?
        .unwrap_or_default();
    Ok(NftState::Present { listing })
}

pub async fn delete() -> Result<(), NftError> {
    match nft(&["delete", "table", FAMILY, TABLE]).await? {
        Some(_) => Ok(()),
        None => Err(NftError::Spawn(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "nft is not installed",
        ))),
    }
}

/// Chain names in a `nft list table` listing, for a one-line summary.
pub fn chain_names(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("chain")).then(|| w.next().map(str::to_string))?
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_table_by_exact_name() {
        assert!(lists_table("table ip nat\ntable ip aws-cni\n"));
        assert!(!lists_table("table ip nat\ntable ip aws-cni-other\n"));
        assert!(!lists_table("table ip6 aws-cni\n"));
        assert!(!lists_table(""));
    }

    #[test]
    fn chain_names_of_a_listing() {
        let listing = "table ip aws-cni {\n\tchain nat-prerouting {\n\t\ttype nat hook prerouting priority dstnat + 10; policy accept;\n\t}\n\n\tchain snat-mark {\n\t}\n}\n";
        assert_eq!(chain_names(listing), ["nat-prerouting", "snat-mark"]);
    }
}
