//! SIGTERM and SIGINT: cancel long work between two operations and stop the loop;
//! enforcement stays in place.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::Sender,
    },
    thread,
};

use anyhow::Result;
use signal_hook::{
    consts::{SIGINT, SIGTERM},
    iterator::Signals,
};

use super::Event;

pub(super) fn stop_on_signals(tx: Sender<Event>, cancel: Arc<AtomicBool>) -> Result<()> {
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                cancel.store(true, Ordering::Relaxed);
                if tx.send(Event::Stop).is_err() {
                    // Still starting up (no event loop yet): nothing to finish.
                    log::info!("stopping during start-up; enforcement stays in place");
                    std::process::exit(0);
                }
            }
        })?;
    Ok(())
}
