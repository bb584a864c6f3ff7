//! `egress-deny`: chained CNI plugin. Attaches the node-wide egress-deny tc program
//! (pinned by egress-deny-installer) to each pod's host-side veth on tc ingress.
//!
//! `main` only dispatches; each CNI command lives in its own file. stdout carries only
//! CNI results and CNI error JSON; logs go to syslog (or the configured target).
mod add;
mod check;
mod config;
mod del;
mod error;
mod gc;
mod logging;
mod pod;
mod skel;
mod spec;
mod status;
mod version;

use std::process::ExitCode;

use error::PluginError;
use spec::Command;

fn main() -> ExitCode {
    let (invocation, requested_version) = skel::Invocation::from_process();
    logging::init(
        invocation
            .as_ref()
            .ok()
            .and_then(|i| i.config.as_ref())
            .map(|c| &c.log),
    );
    let outcome = invocation.and_then(|inv| {
        log::debug!(
            "{:?} container={} ifname={}",
            inv.command,
            inv.container_id,
            inv.ifname
        );
        match inv.command {
            Command::Add => add::run(&inv),
            Command::Del => del::run(&inv),
            Command::Check => check::run(&inv),
            Command::Gc => gc::run(&inv),
            Command::Status => status::run(&inv),
            Command::Version => version::run(&inv),
        }
    });
    match outcome {
        Ok(output) => {
            if let Some(json) = output {
                println!("{json}");
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            log::error!("{err}");
            let cni_version = spec::reply_version(requested_version.as_deref());
            println!("{}", err.to_cni_json(cni_version));
            ExitCode::FAILURE
        }
    }
}

/// What a command prints on success (None: nothing, e.g. DEL).
pub type Output = Result<Option<String>, PluginError>;
