//! `egress-deny-installer`: the per-node daemon and its CLI. Parses the command line and
//! runs the subcommand (`commands/`).
mod attachments;
mod cli;
mod commands;
mod conflist;
mod daemon;
mod http;
mod logging;
mod metrics;
mod node;
mod repair;
mod rules;
mod rules_tools;
mod status;
mod verify;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = commands::Cli::parse();
    logging::init(cli.command.log_format());
    match cli.command.run() {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::from(commands::status::exit::ERROR)
        }
    }
}
