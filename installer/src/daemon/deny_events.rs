//! The deny-event logger: drops the datapath reports (already rate-limited per
//! attachment in the kernel), one log line each, naming the pod or host interface.
use std::{
    os::fd::AsRawFd,
    thread,
    time::{Duration, Instant},
};

use egress_deny_datapath::{
    events::EventReader,
    paths::{PinLayout, StateLayout},
};

use crate::attachments::attachments;

/// Logs deny events (already rate-limited per attachment in the kernel) with the pod
/// they came from.
pub(super) fn log_deny_events(layout: PinLayout, state: StateLayout) {
    let spawned = thread::Builder::new()
        .name("deny-events".into())
        .spawn(move || {
            let mut reader = match EventReader::open(&layout) {
                Ok(reader) => reader,
                Err(e) => {
                    log::warn!("deny events unavailable: {e}");
                    return;
                }
            };
            let fd = reader.as_raw_fd();
            let mut names: Vec<(u32, String)> = Vec::new();
            let mut names_at = Instant::now() - Duration::from_secs(60);
            loop {
                let mut pollfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pollfd, 1, 1000) };
                while let Some(event) = reader.next_event() {
                    if names_at.elapsed() > Duration::from_secs(1) {
                        names = attachment_names(&layout, &state);
                        names_at = Instant::now();
                    }
                    let who = names
                        .iter()
                        .find(|(i, _)| *i == event.ifindex)
                        .map(|(_, n)| n.clone())
                        .unwrap_or_else(|| format!("ifindex {}", event.ifindex));
                    match (event.destination, event.rule) {
                        (Some(dst), Some(rule)) => log::warn!(
                            "denied: {who} -> {dst} (rule {rule}, {} bytes)",
                            event.packet_len
                        ),
                        _ => {
                            log::warn!("denied: {who}: IP packet too short to read its destination")
                        }
                    }
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("deny events: {e}");
    }
}

fn attachment_names(layout: &PinLayout, state: &StateLayout) -> Vec<(u32, String)> {
    attachments(layout, state)
        .into_iter()
        .map(|a| (a.ifindex, a.to_string()))
        .collect()
}
