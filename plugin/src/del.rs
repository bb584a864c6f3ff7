//! DEL: best-effort and idempotent. Whatever is already gone (namespace, veth, link,
//! record) counts as removed; DEL twice, or without prevResult, succeeds. Only this
//! network's attachment of (container, ifname) is touched.
use egress_deny_datapath::lifecycle::{self, Detached};

use crate::{Output, skel::Invocation};

pub fn run(inv: &Invocation) -> Output {
    let conf = inv.config();
    let id = conf.attachment_id(&inv.container_id, &inv.ifname);
    match lifecycle::detach_pod(&conf.pin_layout(), &conf.state_layout(), &id) {
        Ok(Detached::WasRecorded) => log::info!("{id}: detached"),
        Ok(Detached::NothingRecorded) => log::info!("{id}: detached (nothing recorded)"),
        Err(e) => log::warn!("{id}: detaching: {e}"),
    }
    Ok(None)
}
