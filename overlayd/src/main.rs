//! `overlayd`: the node daemon and its operator commands.

use std::process::ExitCode;

use clap::Parser;

use overlayd::cli::{Cli, Command};
use overlayd::commands;

fn main() -> ExitCode {
    overlayd::allocator::limit_arenas();
    let cli = Cli::parse();
    // The doctor's findings are its output; what the checks it reuses log at info is noise there.
    let quiet = matches!(cli.command, Command::Doctor(_)) && std::env::var_os("RUST_LOG").is_none();
    let level = cli
        .log_level
        .clone()
        .or_else(|| quiet.then(|| "warn".to_string()));
    overlayd::logging::init(level.as_deref(), cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("overlayd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The daemon's failures belong in its log; a command's go to the person who ran it, once.
    let is_daemon = matches!(cli.command, Command::Run(_));
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => commands::run::run(args).await,
            Command::Status(args) => commands::status::run(args).await,
            Command::Doctor(args) => commands::doctor::run(args).await,
            Command::Release(args) => commands::release::run(args).await,
            Command::Uninstall(args) => commands::uninstall::run(args).await,
            Command::Cleanup(args) => commands::cleanup::run(args).await,
            Command::Config(args) => commands::config::run(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            if is_daemon {
                tracing::error!("{e:#}");
            }
            eprintln!("overlayd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
