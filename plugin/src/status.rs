//! STATUS: ready when the installer's pinned program and maps are there.
use crate::{Output, error::PluginError, pod, skel::Invocation};

pub fn run(inv: &Invocation) -> Output {
    pod::installed(&inv.config().pin_layout()).map_err(PluginError::NotAvailable)?;
    Ok(None)
}
