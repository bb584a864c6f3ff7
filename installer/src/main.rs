//! `egress-deny-installer`: the per-node daemon and its CLI.
mod cli;
mod conflist;
mod daemon;
mod logging;
mod metrics;
mod node;
mod repair;
mod rules;
mod rules_tools;
mod status;
mod sync;
mod uninstall;
mod verify;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    logging::init(match &cli.command {
        cli::Command::Run(args) => args.log_format,
        _ => logging::LogFormat::Text,
    });
    let result = match &cli.command {
        cli::Command::Run(args) => daemon::run(args).map(|()| 0),
        cli::Command::Uninstall(args) => uninstall::run(args).map(|()| 0),
        cli::Command::Status(args) => status::run_status(args),
        cli::Command::Lookup(args) => status::run_lookup(args).map(|()| 0),
        cli::Command::Rules(command) => rules_tools::run(command),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::from(status::exit::ERROR)
        }
    }
}
