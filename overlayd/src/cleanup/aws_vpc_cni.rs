//! `overlayd cleanup aws-vpc-cni`: remove what the AWS VPC CNI (aws-node) leaves on a live node, so
//! the next CNI works without rolling the node.
//!
//! Groups, in the order they are handled: iptables (legacy, then nft backend), the nftables table
//! `ip aws-cni`, ip rules, routes, files. Each group is read, then (unless `--dry-run`) removed
//! best-effort: a failure is reported and the rest still goes. What was found, removed, kept or failed
//! goes to stdout, grouped, so it reads well in pod logs.
//!
//! Exit codes: 0 nothing left (or dry run listed everything), 1 something could not be read or
//! removed (see the FAILED lines), 2 usage, 3 aws-node's ipamd is still running (nothing changed).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::cli::AwsCleanupArgs;

use super::cni_files;
use super::iptables_leftovers::{self, Backend, IptablesItem, Saved};
use super::nft_table::{self, NftState};
use super::pod_veth::{self, VethNames};
use super::policy_routing::{self, Decision, DescribedRoute};
use super::{aws_node_process, ip_rules};

pub const EXIT_CLEAN: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_AWS_NODE_RUNNING: u8 = 3;

/// What the command does, independent of how it was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    pub dry_run: bool,
    pub cni_conf_dir: PathBuf,
    pub state_dir: PathBuf,
    pub keep_running_pods: bool,
    /// Where to look for a running ipamd (`/proc`).
    pub proc_dir: PathBuf,
}

impl From<&AwsCleanupArgs> for Options {
    fn from(a: &AwsCleanupArgs) -> Self {
        Options {
            dry_run: a.dry_run,
            cni_conf_dir: a.cni_conf_dir.clone(),
            state_dir: a.aws_node_state_dir.clone(),
            keep_running_pods: a.keep_running_pods,
            proc_dir: a.proc_dir.clone(),
        }
    }
}

pub async fn run(args: &AwsCleanupArgs) -> anyhow::Result<ExitCode> {
    let summary = cleanup(&Options::from(args), &mut Stdout).await;
    Ok(ExitCode::from(summary.exit_code()))
}

/// Where the human report goes (stdout in the binary).
pub trait ReportSink {
    fn line(&mut self, text: &str);
}

struct Stdout;

impl ReportSink for Stdout {
    fn line(&mut self, text: &str) {
        // A closed stdout must not stop the cleanup halfway.
        let _ = writeln!(std::io::stdout().lock(), "{text}");
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    WouldRemove,
    Removed,
    Kept,
    Failed,
}

/// Totals over the whole run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub dry_run: bool,
    pub found: usize,
    pub removed: usize,
    pub kept: usize,
    pub failed: usize,
    pub aws_node_running: bool,
}

impl Summary {
    pub fn exit_code(&self) -> u8 {
        if self.aws_node_running && !self.dry_run {
            EXIT_AWS_NODE_RUNNING
        } else if self.failed > 0 {
            EXIT_FAILED
        } else {
            EXIT_CLEAN
        }
    }
}

/// One group of the report, printed as soon as it is done.
struct Group<'a> {
    dry_run: bool,
    /// How a removal reads: ("would remove", "removed"), or ("would move", "moved") for files.
    verbs: (&'static str, &'static str),
    out: &'a mut dyn ReportSink,
    summary: &'a mut Summary,
    empty: bool,
}

impl<'a> Group<'a> {
    fn start(
        title: &str,
        dry_run: bool,
        out: &'a mut dyn ReportSink,
        summary: &'a mut Summary,
    ) -> Self {
        out.line(&format!("{title}:"));
        Group {
            dry_run,
            verbs: ("would remove", "removed"),
            out,
            summary,
            empty: true,
        }
    }

    fn item(&mut self, outcome: Outcome, text: &str, details: &[String]) {
        self.empty = false;
        match outcome {
            Outcome::WouldRemove => self.summary.found += 1,
            Outcome::Removed => {
                self.summary.found += 1;
                self.summary.removed += 1;
            }
            Outcome::Kept => self.summary.kept += 1,
            Outcome::Failed => {
                self.summary.found += 1;
                self.summary.failed += 1;
            }
        }
        let label = match (outcome, self.dry_run) {
            (Outcome::WouldRemove, _) => self.verbs.0,
            (Outcome::Removed, _) => self.verbs.1,
            (Outcome::Kept, true) => "would keep",
            (Outcome::Kept, false) => "kept",
            (Outcome::Failed, _) => "FAILED",
        };
        self.out.line(&format!("  {label:<12}  {text}"));
        for d in details {
            self.out.line(&format!("                  {d}"));
        }
    }

    /// A removal: "would remove" in a dry run, else "removed" or "FAILED" with the error.
    fn removal<E: std::fmt::Display>(&mut self, text: &str, result: Option<Result<(), E>>) {
        match result {
            None => self.item(Outcome::WouldRemove, text, &[]),
            Some(Ok(())) => self.item(Outcome::Removed, text, &[]),
            Some(Err(e)) => self.item(Outcome::Failed, text, &[format!("error: {e}")]),
        }
    }

    /// Something could not even be looked at: counts as a failure.
    fn error(&mut self, text: &str) {
        self.empty = false;
        self.summary.failed += 1;
        self.out.line(&format!("  {:<12}  {text}", "FAILED"));
    }

    fn note(&mut self, text: &str) {
        self.out.line(&format!("  note: {text}"));
    }

    fn finish(self) {
        if self.empty {
            self.out.line("  nothing of aws-node's");
        }
    }
}

/// The whole command, with its report written to `out`.
pub async fn cleanup(opts: &Options, out: &mut dyn ReportSink) -> Summary {
    let mut summary = Summary {
        dry_run: opts.dry_run,
        ..Summary::default()
    };
    out.line(&format!(
        "overlayd cleanup aws-vpc-cni{}: aws-node leftovers on this node{}",
        if opts.dry_run { " --dry-run" } else { "" },
        if opts.dry_run {
            " (dry run: nothing is changed)"
        } else {
            ""
        }
    ));

    if let Err(e) = std::fs::read_dir(&opts.proc_dir) {
        out.line(&format!(
            "warning: cannot read {} ({e}), so a running aws-node cannot be seen: mount the node's \
             /proc there (read-only) or pass --proc-dir /proc with the host's PID namespace",
            opts.proc_dir.display()
        ));
    }
    if let Some(pid) = aws_node_process::find_ipamd(&opts.proc_dir) {
        summary.aws_node_running = true;
        out.line(&format!(
            "aws-node's ipamd ({}) is still running as pid {pid}: it would put its rules back. \
             Delete the aws-node DaemonSet first (kubectl -n kube-system delete daemonset aws-node).",
            aws_node_process::IPAMD_COMM
        ));
        if !opts.dry_run {
            out.line("Nothing was changed.");
            return summary;
        }
    } else if aws_node_process::ipamd_port_open().await {
        out.line(&format!(
            "warning: something listens on 127.0.0.1:{} (aws-node's ipamd?); if aws-node still runs \
             on this node it will put its rules back",
            aws_node_process::IPAMD_PORT
        ));
    }

    let veths = veth_names(&opts.cni_conf_dir, out);

    for backend in Backend::ALL {
        iptables_group(backend, opts, out, &mut summary).await;
    }
    nft_group(opts, out, &mut summary).await;
    routing_groups(opts, &veths, out, &mut summary).await;
    files_group(opts, out, &mut summary);

    let verb = if opts.dry_run {
        "would be removed"
    } else {
        "removed"
    };
    let done = if opts.dry_run {
        summary.found
    } else {
        summary.removed
    };
    let mut last = format!("summary: {done} item(s) {verb}");
    if summary.kept > 0 {
        let _ = write!(last, ", {} kept (running pods)", summary.kept);
    }
    if summary.failed > 0 {
        let _ = write!(last, ", {} FAILED", summary.failed);
    }
    if summary.aws_node_running {
        last.push_str(", aws-node still running");
    }
    let _ = write!(last, "; exit {}", summary.exit_code());
    out.line(&last);
    tracing::info!(?summary, "aws-vpc-cni cleanup done");
    summary
}

async fn iptables_group(
    backend: Backend,
    opts: &Options,
    out: &mut dyn ReportSink,
    summary: &mut Summary,
) {
    let mut g = Group::start(&format!("iptables {backend}"), opts.dry_run, out, summary);
    let tables = match iptables_leftovers::read(backend).await {
        Ok(Saved::Tables(t)) => t,
        Ok(Saved::Unavailable(why)) => {
            g.note(&format!("{why}; skipped"));
            return g.finish();
        }
        Err(e) => {
            g.error(&e.to_string());
            return g.finish();
        }
    };
    for table in iptables_leftovers::find(&tables) {
        let results = if opts.dry_run {
            table
                .items
                .iter()
                .cloned()
                .map(|i| (i, None))
                .collect::<Vec<_>>()
        } else {
            iptables_leftovers::remove(backend, &table)
                .await
                .into_iter()
                .map(|(i, r)| (i, Some(r)))
                .collect()
        };
        for (item, result) in results {
            let text = format!("{}: {item}", table.table);
            let (mut details, blockers): (Vec<String>, Vec<String>) = match &item {
                IptablesItem::Chain(c) => (
                    c.rules.iter().map(|r| r.to_save_line()).collect(),
                    c.kept_references
                        .iter()
                        .map(|r| {
                            format!(
                                "note: still referenced by `{}`, which is left alone \
                                 (KUBE-* chains are kube-proxy's); remove that jump first",
                                r.to_save_line()
                            )
                        })
                        .collect(),
                ),
                IptablesItem::Rule(_) => (Vec::new(), Vec::new()),
            };
            match result {
                None => {
                    details.extend(blockers);
                    g.item(Outcome::WouldRemove, &text, &details)
                }
                Some(Ok(())) => g.item(Outcome::Removed, &text, &details),
                Some(Err(e)) => {
                    let mut why = vec![format!("error: {e}")];
                    why.extend(blockers);
                    g.item(Outcome::Failed, &text, &why)
                }
            }
        }
    }
    g.finish();
}

async fn nft_group(opts: &Options, out: &mut dyn ReportSink, summary: &mut Summary) {
    let mut g = Group::start("nftables", opts.dry_run, out, summary);
    match nft_table::find().await {
        Ok(NftState::Unavailable(why)) => g.note(&format!("{why}; skipped")),
        Ok(NftState::Absent) => {}
        Ok(NftState::Present { listing }) => {
            let text = format!(
                "table {} {} (chains: {})",
                nft_table::FAMILY,
                nft_table::TABLE,
                nft_table::chain_names(&listing).join(", ")
            );
            if opts.dry_run {
                let details: Vec<String> = listing
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| l.replace('\t', "  "))
                    .collect();
                g.item(Outcome::WouldRemove, &text, &details);
            } else {
                g.removal(&text, Some(nft_table::delete().await));
            }
        }
        Err(e) => g.error(&e.to_string()),
    }
    g.finish();
}

async fn routing_groups(
    opts: &Options,
    veths: &VethNames,
    out: &mut dyn ReportSink,
    summary: &mut Summary,
) {
    let snapshot = match policy_routing::connect() {
        Ok(handle) => policy_routing::read(&handle).await.map(|s| (handle, s)),
        Err(e) => Err(e),
    };
    let (handle, snap) = match snapshot {
        Ok(hs) => hs,
        Err(e) => {
            for title in ["ip rules", "routes"] {
                let mut g = Group::start(title, opts.dry_run, out, summary);
                g.error(&e.to_string());
                g.finish();
            }
            return;
        }
    };
    let plan = policy_routing::plan(&snap, opts.keep_running_pods, veths);

    let mut g = Group::start("ip rules", opts.dry_run, out, summary);
    for r in &plan.rules {
        let text = ip_rules::Described(&r.msg).to_string();
        match &r.decision {
            Decision::Keep(why) => g.item(Outcome::Kept, &format!("{text}  ({why})"), &[]),
            Decision::Remove if opts.dry_run => g.removal::<String>(&text, None),
            Decision::Remove => {
                let res = policy_routing::delete_rule(&handle, &r.msg).await;
                g.removal(&text, Some(res));
            }
        }
    }
    g.finish();

    let mut g = Group::start("routes", opts.dry_run, out, summary);
    for r in &plan.routes {
        let text = DescribedRoute(&r.msg, &snap.links).to_string();
        match &r.decision {
            Decision::Keep(why) => g.item(Outcome::Kept, &format!("{text}  ({why})"), &[]),
            Decision::Remove if opts.dry_run => g.removal::<String>(&text, None),
            Decision::Remove => {
                let res = policy_routing::delete_route(&handle, &r.msg).await;
                g.removal(&text, Some(res));
            }
        }
    }
    g.finish();
}

fn files_group(opts: &Options, out: &mut dyn ReportSink, summary: &mut Summary) {
    let mut g = Group::start("files", opts.dry_run, out, summary);
    g.verbs = ("would move", "moved");
    match cni_files::find(&opts.cni_conf_dir, &opts.state_dir) {
        Ok(found) => {
            for m in &found.moves {
                let text = format!("{} -> {}", m.from.display(), file_name(&m.to));
                if opts.dry_run {
                    g.removal::<String>(&text, None);
                } else {
                    g.removal(&text, Some(cni_files::apply(m)));
                }
            }
            for w in &found.warnings {
                g.note(w);
            }
        }
        Err(e) => g.error(&e.to_string()),
    }
    g.finish();
}

/// How aws-node named pods' veths on this node (its `vethPrefix`), said out loud when not the default.
fn veth_names(conf_dir: &Path, out: &mut dyn ReportSink) -> VethNames {
    let Some((prefix, file)) = cni_files::aws_veth_prefix(conf_dir) else {
        return VethNames::default();
    };
    match VethNames::new(&prefix) {
        Ok(v) => {
            if v.prefix() != pod_veth::DEFAULT_PREFIX {
                out.line(&format!(
                    "aws-node named pod veths {prefix}<hash> (vethPrefix in {})",
                    file.display()
                ));
            }
            v
        }
        Err(e) => {
            out.line(&format!(
                "note: {e} ({}); looking for {}<hash> veths",
                file.display(),
                pod_veth::DEFAULT_PREFIX
            ));
            VethNames::default()
        }
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        let mut s = Summary::default();
        assert_eq!(s.exit_code(), EXIT_CLEAN);
        s.failed = 1;
        assert_eq!(s.exit_code(), EXIT_FAILED);
        s.aws_node_running = true;
        assert_eq!(s.exit_code(), EXIT_AWS_NODE_RUNNING);
        s.dry_run = true;
        assert_eq!(s.exit_code(), EXIT_FAILED);
    }
}
