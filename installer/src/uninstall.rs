//! `uninstall`: the explicit removal. Every step tolerates "already gone", so running it
//! twice (or after a partial run) is fine.
use anyhow::Result;
use egress_deny_datapath::{
    attach::{self, AttachMode, Hook},
    loader,
    paths::{PinLayout, StateLayout},
    records::AttachmentRecord,
};

use crate::{cli::UninstallArgs, conflist};

pub fn run(args: &UninstallArgs) -> Result<()> {
    // First the conflist entry: no new pod gets attached from here on.
    for path in conflist::remove(&args.cni.cni_conf_dir)? {
        log::info!("removed the egress-deny entry from {}", path.display());
    }
    let layout = PinLayout::new(&args.state.pin_dir);
    let state = StateLayout::new(&args.state.state_dir);
    for (path, record) in AttachmentRecord::list(&state).unwrap_or_default() {
        let mode = AttachMode::parse(&record.mode).unwrap_or(AttachMode::Tcx);
        let link_pin = layout.pod_link(&record.container_id, &record.ifname);
        if let Err(e) = attach::detach(Some(&record.host_ifname), Hook::Ingress, &link_pin, mode) {
            log::warn!("detaching {}: {e}", record.host_ifname);
        }
        let _ = std::fs::remove_file(path);
    }
    // Remaining pins (host links, programs, maps) go with the pin dir: a TCX link is
    // detached once its pin is gone.
    loader::unpin_all(&layout)?;
    let _ = std::fs::remove_file(crate::status::status_path(&args.state.state_dir));
    let binary = args.cni.cni_bin_dir.join(crate::daemon::PLUGIN_NAME);
    match std::fs::remove_file(&binary) {
        Ok(()) => log::info!("removed {}", binary.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    log::info!("egress-deny uninstalled");
    Ok(())
}
