//! `overlayd doctor`: runs every check in [`crate::doctor`] and prints PASS/WARN/FAIL with the
//! fix, as text or JSON. Exit 1 when any check FAILs.

use std::process::ExitCode;
use std::time::Duration;

use overlay_state::SubnetFile;
use serde_json::json;

use crate::cli::{DoctorArgs, OutputFormat};
use crate::doctor::{self, Context, Verdict};
use crate::health::http;
use crate::health::report::StatusReport;

pub async fn run(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let addr = http::local_target(args.metrics_addr);
    let status = match http::get(addr, "/status", Duration::from_secs(5)).await {
        Ok((200, body)) => serde_json::from_str::<StatusReport>(&body)
            .map_err(|e| format!("{addr}/status is not overlayd's status ({e})")),
        Ok((code, _)) => Err(format!("{addr}/status answers HTTP {code}")),
        Err(e) => Err(e.to_string()),
    };
    let subnet_file = SubnetFile::read(&args.node.subnet_file).map_err(|e| e.to_string());
    let output = args.output;
    let cx = Context {
        args,
        status,
        subnet_file,
    };
    let findings = doctor::run_all(&cx).await;
    let failed = findings.iter().any(|f| f.verdict == Verdict::Fail);
    match output {
        OutputFormat::Text => print!("{}", doctor::render_text(&findings)),
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({"ok": !failed, "checks": findings}))?
        ),
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
