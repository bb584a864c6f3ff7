//! `status`: the node's state for a person or a probe: the daemon's persisted status,
//! the tables in force, every attachment and its counters; the exit code says whether
//! the node enforces.
use std::fmt::Write as _;

use anyhow::Result;
use egress_deny_datapath::{
    counters::CounterMap,
    paths::{PinLayout, StateLayout},
};

use crate::{
    attachments::{AttachmentKind, attachments},
    cli::StateArgs,
    status::{DaemonStatus, TableStatus, now, rfc3339},
};

/// `status` exit codes, for scripts and probes (documented in conf/README.md).
pub mod exit {
    /// Enforcing: installed, a valid rule set loaded, last sync fine, nothing unfiltered.
    pub const OK: u8 = 0;
    /// The command itself failed (main's generic error code).
    pub const ERROR: u8 = 1;
    /// Enforcing, but something needs attention: the last update was rejected, or a
    /// host interface is not filtered.
    pub const DEGRADED: u8 = 2;
    /// Not enforcing: nothing installed, or no valid rule set loaded yet.
    pub const NOT_ENFORCING: u8 = 3;
}

/// Prints the node's state; returns the exit code (see [`exit`]).
pub fn run(args: &StateArgs) -> Result<u8> {
    let layout = PinLayout::new(&args.pin_dir);
    let state = StateLayout::new(&args.state_dir);
    let mut out = String::new();
    let installed = layout
        .program(egress_deny_datapath::paths::ProgramKind::Ethernet)
        .exists();
    writeln!(
        out,
        "pin dir: {} ({})",
        layout.root().display(),
        if installed {
            "installed"
        } else {
            "NOT installed"
        }
    )?;
    match DaemonStatus::load(&state) {
        Some(status) => {
            if let Some(sync) = &status.last_sync {
                let r = &sync.rules;
                writeln!(
                    out,
                    "rules: IPv4 {} deny, {} allow; IPv6 {} deny, {} allow",
                    r.v4_deny, r.v4_allow, r.v6_deny, r.v6_allow
                )?;
                writeln!(
                    out,
                    "last sync: {} ({}s ago), {} ms, tables swapped: {}, {}",
                    rfc3339(sync.time),
                    now().saturating_sub(sync.time),
                    sync.duration_ms,
                    sync.operations,
                    if sync.ok {
                        "ok".to_owned()
                    } else {
                        format!("FAILED: {}", sync.error.clone().unwrap_or_default())
                    }
                )?;
            }
            let built = status.last_sync.as_ref().map(|s| s.tables.clone());
            for live in TableStatus::in_force(&layout) {
                let timing = built
                    .iter()
                    .flatten()
                    .find(|t| t.family == live.family && t.ranges == live.ranges)
                    .and_then(|t| Some((t.build_seconds?, t.swap_seconds?)))
                    .map(|(b, s)| {
                        format!(", built in {:.0} ms, swapped in {:.0} µs", b * 1e3, s * 1e6)
                    })
                    .unwrap_or_default();
                writeln!(
                    out,
                    "IPv{} table: {} rules as {} ranges, {:.1} MiB of kernel memory{timing}",
                    live.family,
                    live.rules,
                    live.ranges,
                    live.bytes as f64 / f64::from(1 << 20),
                )?;
            }
            writeln!(out, "sync errors: {}", status.sync_errors_total)?;
            for (ifname, why) in &status.host_interfaces_unfiltered {
                writeln!(out, "host interface {ifname}: NOT filtered: {why}")?;
            }
            if let Some(conflist) = &status.conflist {
                writeln!(out, "conflist: {conflist}")?;
            }
        }
        None => writeln!(
            out,
            "last sync: never (is the daemon running with --state-dir {}?)",
            args.state_dir.display()
        )?,
    }
    let counters = CounterMap::open(&layout).ok();
    let live = attachments(&layout, &state);
    writeln!(out, "attachments: {}", live.len())?;
    for a in live {
        let c = counters
            .as_ref()
            .and_then(|m| m.get(a.ifindex).ok())
            .unwrap_or_default();
        // Keyed by interface (scripts find a pod's line by its veth name), then whose it
        // is: the layout of earlier versions, kept.
        let who = match (&a.pod_namespace, &a.pod_name) {
            (Some(ns), Some(name)) => format!(" pod {ns}/{name}"),
            _ => a
                .container_id
                .as_ref()
                .map(|c| format!(" container {c}"))
                .unwrap_or_default(),
        };
        writeln!(
            out,
            "  {} {} (ifindex {}){who}: denied {} pkts / {} bytes, allowed {} pkts / {} bytes{}",
            a.kind,
            a.ifname,
            a.ifindex,
            c.denied_packets,
            c.denied_bytes,
            c.allowed_packets,
            c.allowed_bytes,
            if a.kind == AttachmentKind::Host {
                format!(
                    " ({} judged before, at a pod's veth)",
                    c.judged_before_packets
                )
            } else {
                String::new()
            }
        )?;
    }
    print!("{out}");
    let status = DaemonStatus::load(&state);
    let rules_loaded =
        installed && egress_deny_datapath::events::rules_loaded(&layout).unwrap_or(false);
    let degraded = status.as_ref().is_some_and(|s| {
        s.last_sync.as_ref().is_some_and(|sync| !sync.ok)
            || !s.host_interfaces_unfiltered.is_empty()
    });
    Ok(if !rules_loaded {
        exit::NOT_ENFORCING
    } else if degraded {
        exit::DEGRADED
    } else {
        exit::OK
    })
}
