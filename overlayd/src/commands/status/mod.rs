//! `overlayd status`: what an operator asks first on a node. It reads the local daemon's `/status`
//! (found from OVERLAYD_METRICS_ADDR, which the DaemonSet's environment sets); with the daemon
//! down it says so first and shows what it can read itself. Exit 0 when all is well, 1 otherwise.

mod offline;
mod text;

use std::process::ExitCode;
use std::time::Duration;

use crate::cli::{OutputFormat, StatusArgs};
use crate::health::http;
use crate::health::report::StatusReport;

const ASK_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let addr = http::local_target(args.metrics_addr);
    let why_not = match http::get(addr, "/status", ASK_TIMEOUT).await {
        Ok((200, body)) => match serde_json::from_str::<StatusReport>(&body) {
            Ok(report) => {
                match args.output {
                    OutputFormat::Json => print!("{body}"),
                    OutputFormat::Text => print!("{}", text::render(&report, addr)),
                }
                return Ok(exit(report.ready));
            }
            Err(e) => format!("{addr}/status is not overlayd's status ({e})"),
        },
        Ok((code, _)) => format!(
            "{addr}/status answers HTTP {code} (an overlayd older than this command, or another server on that port?)"
        ),
        Err(e) => e.to_string(),
    };
    let out = offline::collect(&args, &why_not).await;
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&out.json)?),
        OutputFormat::Text => {
            for l in &out.lines {
                println!("{l}");
            }
        }
    }
    // A daemon that does not answer is itself the finding: this node takes no lease changes.
    Ok(exit(false))
}

fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
