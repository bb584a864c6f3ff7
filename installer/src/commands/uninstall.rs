//! `uninstall`: the explicit removal. Every step tolerates "already gone", so running it
//! twice (or after a partial run) is fine.
use anyhow::Result;
use clap::Args;
use egress_deny_datapath::{
    lifecycle, loader,
    paths::{PinLayout, StateLayout},
    records::HostRecord,
};

use crate::{
    cli::{CniDirs, StateArgs},
    conflist, daemon, node,
};

#[derive(Args, Debug)]
pub struct UninstallArgs {
    #[command(flatten)]
    pub state: StateArgs,
    #[command(flatten)]
    pub cni: CniDirs,
}

pub fn run(args: &UninstallArgs) -> Result<()> {
    // First the conflist entry: no new pod gets attached from here on.
    for path in conflist::remove(&args.cni.cni_conf_dir)? {
        log::info!("removed the egress-deny entry from {}", path.display());
    }
    let layout = PinLayout::new(&args.state.pin_dir);
    let state = StateLayout::new(&args.state.state_dir);
    // Every pod attachment, legacy-named ones included, by its recorded mode.
    for (path, e) in lifecycle::tear_down_all(&layout, &state) {
        log::warn!("removing the attachment of {}: {e}", path.display());
    }
    // Host interfaces by their records (a cls_bpf filter has no pin to go with).
    for (path, record) in HostRecord::list(&state) {
        daemon::detach_host(&layout, &record);
        let _ = std::fs::remove_file(path);
    }
    // Remaining pins (host links of older versions, programs, maps) go with the pin
    // dir: a TCX link is detached once its pin is gone.
    loader::unpin_all(&layout)?;
    let _ = std::fs::remove_file(state.daemon_status());
    let binary = args.cni.cni_bin_dir.join(node::PLUGIN_NAME);
    match std::fs::remove_file(&binary) {
        Ok(()) => log::info!("removed {}", binary.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    log::info!("egress-deny uninstalled");
    Ok(())
}
