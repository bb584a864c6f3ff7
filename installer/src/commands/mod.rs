//! The subcommands, one file each, owning its flags (a clap `Args` struct) and what it
//! does; `main` parses and calls [`Command::run`]. The list of subcommands and its
//! dispatch live here, next to the files they name, so that adding one touches only this
//! folder. Flag groups several subcommands take are in `crate::cli`.
pub mod lookup;
pub mod rules;
pub mod run;
pub mod status;
pub mod uninstall;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::{cli::StateArgs, logging::LogFormat};

#[derive(Parser, Debug)]
#[command(
    name = "egress-deny-installer",
    version,
    about = "Node-wide egress deny list: installs the egress-deny CNI plugin, owns its eBPF program and maps, syncs the rules"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the per-node daemon (DaemonSet).
    Run(Box<run::RunArgs>),
    /// Remove the conflist entry, detach everything, unpin, remove the plugin binary.
    Uninstall(uninstall::UninstallArgs),
    /// Rules per family, attachments, last sync.
    Status(StateArgs),
    /// How the live maps decide each address.
    Lookup(lookup::LookupArgs),
    /// Offline tools for rule lists (no node needed): validate, make ConfigMaps.
    #[command(subcommand)]
    Rules(rules::RulesCommand),
}

impl Command {
    /// How to log: only the daemon has a choice (`--log-format`); the other commands
    /// talk to a person or a script and log text.
    pub fn log_format(&self) -> LogFormat {
        match self {
            Command::Run(args) => args.log_format,
            _ => LogFormat::Text,
        }
    }

    /// Runs the command; `Ok` holds the process's exit code.
    pub fn run(&self) -> Result<u8> {
        match self {
            Command::Run(args) => crate::daemon::run(args).map(|()| 0),
            Command::Uninstall(args) => uninstall::run(args).map(|()| 0),
            Command::Status(args) => status::run(args),
            Command::Lookup(args) => lookup::run(args).map(|()| 0),
            Command::Rules(command) => rules::run(command),
        }
    }
}
