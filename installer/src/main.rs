//! `egress-deny-installer`: the per-node daemon and its CLI.
mod cli;
mod conflist;
mod daemon;
mod metrics;
mod node;
mod plan;
mod repair;
mod rules;
mod status;
mod sync;
mod uninstall;
mod verify;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = cli::Cli::parse();
    let result = match &cli.command {
        cli::Command::Run(args) => daemon::run(args),
        cli::Command::Uninstall(args) => uninstall::run(args),
        cli::Command::Status(args) => status::run_status(args),
        cli::Command::Lookup(args) => status::run_lookup(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
