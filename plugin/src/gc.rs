//! GC: remove this network's attachments (records, links, pins without a record) the
//! runtime no longer lists in `cni.dev/valid-attachments`. The list speaks for one
//! network only: other networks' attachments are never touched.
use std::collections::HashSet;

use egress_deny_datapath::lifecycle;

use crate::{Output, error::PluginError, skel::Invocation};

pub fn run(inv: &Invocation) -> Output {
    let conf = inv.config();
    let Some(valid) = &conf.valid_attachments else {
        // Without the runtime's list, removing anything would be a guess.
        log::warn!("GC without cni.dev/valid-attachments: nothing removed");
        return Ok(None);
    };
    let keep: HashSet<(String, String)> = valid
        .iter()
        .map(|a| (a.container_id.clone(), a.ifname.clone()))
        .collect();
    let outcome =
        lifecycle::collect_garbage(&conf.pin_layout(), &conf.state_layout(), &conf.name, &keep)
            .map_err(|e| PluginError::datapath("collecting garbage", e))?;
    log::info!(
        "GC of network {:?}: removed {} stale attachment(s) or pin(s), kept {}",
        conf.name,
        outcome.removed,
        outcome.kept
    );
    Ok(None)
}
