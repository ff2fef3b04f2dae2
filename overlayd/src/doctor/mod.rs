//! `overlayd doctor`: every pitfall we know of on a node, one check each, PASS/WARN/FAIL with the
//! fix. Checks only read (the node, its files, etcd, the local daemon's `/status`); the one etcd
//! write permission test is a transaction whose guard never holds, so nothing is ever written.

pub mod cni;
pub mod etcd;
pub mod kernel;
pub mod node;

use serde::Serialize;

use crate::cli::DoctorArgs;
use crate::health::report::StatusReport;
use overlay_state::SubnetFile;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    Pass,
    /// Nothing to check here (e.g. no kubelet config where EKS AMIs put it).
    Skip,
    Warn,
    Fail,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Skip => "SKIP",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub check: &'static str,
    pub verdict: Verdict,
    pub detail: String,
    /// What to do about a WARN or FAIL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    pub fn pass(check: &'static str, detail: impl Into<String>) -> Finding {
        Finding {
            check,
            verdict: Verdict::Pass,
            detail: detail.into(),
            fix: None,
        }
    }
    pub fn skip(check: &'static str, detail: impl Into<String>) -> Finding {
        Finding {
            check,
            verdict: Verdict::Skip,
            detail: detail.into(),
            fix: None,
        }
    }
    pub fn warn(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding {
            check,
            verdict: Verdict::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
    pub fn fail(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding {
            check,
            verdict: Verdict::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// What the checks share: the flags, the local daemon's view and the subnet file, read once.
pub struct Context {
    pub args: DoctorArgs,
    /// The local daemon's `/status`, or why it could not be read.
    pub status: Result<StatusReport, String>,
    pub subnet_file: Result<SubnetFile, String>,
}

/// Runs every check, in the order a person would fix things.
pub async fn run_all(cx: &Context) -> Vec<Finding> {
    let mut out = Vec::new();
    out.push(node::daemon(cx));
    out.extend(cni::checks(cx));
    out.push(node::aws_node(cx).await);
    out.extend(kernel::sysctls(cx));
    out.push(kernel::mtu(cx).await);
    out.extend(etcd::checks(cx).await);
    out.push(node::peers(cx));
    out.push(node::iptables().await);
    out.push(node::ipam(cx));
    out.push(node::kubelet_max_pods(cx));
    out
}

pub fn render_text(findings: &[Finding]) -> String {
    let mut o = String::new();
    for f in findings {
        o.push_str(&format!(
            "{}  {:<17} {}\n",
            f.verdict.label(),
            f.check,
            f.detail
        ));
        if let Some(fix) = &f.fix {
            o.push_str(&format!("      {:<17} fix: {fix}\n", ""));
        }
    }
    let count = |v| findings.iter().filter(|f| f.verdict == v).count();
    o.push_str(&format!(
        "summary: {} PASS, {} WARN, {} FAIL, {} SKIP\n",
        count(Verdict::Pass),
        count(Verdict::Warn),
        count(Verdict::Fail),
        count(Verdict::Skip)
    ));
    o
}
