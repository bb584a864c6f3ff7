//! STATUS: ready when the installer's pinned program and maps are there. With
//! `failurePolicy: ignore` ADD succeeds without them (the pod starts unfiltered), so
//! STATUS must not stop the runtime from scheduling pods either.
use crate::{Output, config::FailurePolicy, error::PluginError, pod, skel::Invocation};

pub fn run(inv: &Invocation) -> Output {
    let conf = inv.config();
    if let Err(why) = pod::installed(&conf.pin_layout()) {
        return match conf.failure_policy {
            FailurePolicy::Fail => Err(PluginError::NotAvailable(why)),
            FailurePolicy::Ignore => {
                log::warn!("STATUS: not filtering (failurePolicy ignore): {why}");
                Ok(None)
            }
        };
    }
    Ok(None)
}
