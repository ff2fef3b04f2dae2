//! The iptables command-line tools, the one interface that reaches both backends (legacy and
//! nf_tables) with atomic, whole-table updates: `<backend>-save` to read, `<backend>-restore
//! --noflush` to change. Used by the data plane (our chains) and by cleanup (aws-node's).

use std::fmt;
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// How long `-restore` waits for the xtables lock kube-proxy also takes.
const XTABLES_LOCK_WAIT_SECS: &str = "10";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Legacy,
    Nft,
}

impl Backend {
    pub const ALL: [Backend; 2] = [Backend::Legacy, Backend::Nft];

    pub fn save_tool(self) -> &'static str {
        match self {
            Backend::Legacy => "iptables-legacy-save",
            Backend::Nft => "iptables-nft-save",
        }
    }

    pub fn restore_tool(self) -> &'static str {
        match self {
            Backend::Legacy => "iptables-legacy-restore",
            Backend::Nft => "iptables-nft-restore",
        }
    }

    pub fn iptables_tool(self) -> &'static str {
        match self {
            Backend::Legacy => "iptables-legacy",
            Backend::Nft => "iptables-nft",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Legacy => "legacy",
            Backend::Nft => "nft",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("cannot run {tool}: {source}")]
    Spawn {
        tool: &'static str,
        source: std::io::Error,
    },
    #[error("{tool} failed ({status}): {stderr}")]
    Failed {
        tool: &'static str,
        status: String,
        stderr: String,
    },
}

impl ToolError {
    /// The tool is not installed.
    pub fn is_missing(&self) -> bool {
        matches!(self, ToolError::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// Runs `tool args` and returns its stdout.
pub async fn output(tool: &'static str, args: &[&str]) -> Result<String, ToolError> {
    let out = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| ToolError::Spawn { tool, source })?;
    if !out.status.success() {
        return Err(ToolError::Failed {
            tool,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `<backend>-save [args]`.
pub async fn save(backend: Backend, args: &[&str]) -> Result<String, ToolError> {
    output(backend.save_tool(), args).await
}

/// `<backend> -t <table> -S <chain>`: one chain's rules in `-save` form, without dumping the
/// table (a node with thousands of Service rules pays for a full dump on every check).
pub async fn list_chain(backend: Backend, table: &str, chain: &str) -> Result<String, ToolError> {
    output(
        backend.iptables_tool(),
        &["-w", XTABLES_LOCK_WAIT_SECS, "-t", table, "-S", chain],
    )
    .await
}

/// Feeds `input` to `<backend>-restore --noflush`: every table in it changes atomically.
pub async fn restore_noflush(backend: Backend, input: &str) -> Result<(), ToolError> {
    let tool = backend.restore_tool();
    let mut child = Command::new(tool)
        .args(["--noflush", "--wait", XTABLES_LOCK_WAIT_SECS])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ToolError::Spawn { tool, source })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .await
            .map_err(|source| ToolError::Spawn { tool, source })?;
        // Dropping stdin closes it, so the tool sees the end of its input.
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|source| ToolError::Spawn { tool, source })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ToolError::Failed {
            tool,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}
