//! The daemon's sync status (persisted in the state dir, atomically) and the `status`
//! and `lookup` subcommands, which read the live pinned state.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use egress_deny_datapath::{
    attach,
    counters::CounterMap,
    paths::{PinLayout, StateLayout, host_link_ifname},
    records::{AttachmentRecord, write_atomically},
    rules::{RuleTables, Swap},
};
use serde::{Deserialize, Serialize};

use crate::{
    cli::{LookupArgs, StateArgs},
    rules::RuleSet,
};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RuleCounts {
    pub v4_deny: usize,
    pub v4_allow: usize,
    pub v6_deny: usize,
    pub v6_allow: usize,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncStatus {
    /// Unix seconds of the last sync attempt.
    pub time: u64,
    pub duration_ms: u64,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Rules enforced after it (the previous set when it failed).
    pub rules: RuleCounts,
    /// Tables swapped in by it (0-2: only families whose rules changed).
    pub operations: usize,
    pub files: usize,
    /// The tables in force and how the last of each was built.
    #[serde(default)]
    pub tables: Vec<TableStatus>,
}

/// One family's table in force.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TableStatus {
    pub family: u8,
    /// Kernel memory of the table (its map's blocks).
    pub bytes: u64,
    pub ranges: u32,
    pub rules: u64,
    /// Compiling and writing it, and the swap that put it in force; absent for a table
    /// a previous daemon built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_seconds: Option<f64>,
}

impl TableStatus {
    pub fn of(family: u8, swap: &Swap) -> Self {
        Self {
            family,
            bytes: swap.summary.bytes,
            ranges: swap.summary.ranges,
            rules: swap.summary.deny_rules + swap.summary.allow_rules,
            build_seconds: Some(swap.build.as_secs_f64()),
            swap_seconds: Some(swap.swap.as_secs_f64()),
        }
    }

    /// The tables in force now, read from the kernel (no timings).
    pub fn in_force(layout: &PinLayout) -> Vec<Self> {
        let Ok(snapshot) = RuleTables::open(layout).and_then(|t| t.snapshot()) else {
            return Vec::new();
        };
        [4u8, 6]
            .into_iter()
            .filter_map(|family| {
                let header = snapshot.header(family)?;
                Some(Self {
                    family,
                    bytes: snapshot.table_bytes(family),
                    ranges: header.ranges,
                    rules: header.deny_rules + header.allow_rules,
                    build_seconds: None,
                    swap_seconds: None,
                })
            })
            .collect()
    }
}

/// What the daemon last enforced, so that a restarted daemon with unchanged rules need
/// not read millions of entries back from the maps. Absent while an update is being
/// applied (the maps are then a mix, and a restarted daemon reads them back).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EnforcedRecord {
    /// `RuleSet::digest` in hex (JSON numbers lose precision past 2^53).
    pub digest: String,
    /// Kernel IDs of the (IPv4, IPv6) maps it is about: a replaced map is not.
    pub map_ids: [u32; 2],
    pub rules: RuleCounts,
}

impl EnforcedRecord {
    pub fn new(set: &RuleSet, map_ids: [u32; 2]) -> Self {
        let c = set.counts();
        Self {
            digest: format!("{:016x}", set.digest()),
            map_ids,
            rules: RuleCounts {
                v4_deny: c.v4_deny,
                v4_allow: c.v4_allow,
                v6_deny: c.v6_deny,
                v6_allow: c.v6_allow,
            },
        }
    }

    pub fn matches(&self, set: &RuleSet) -> bool {
        self.digest == format!("{:016x}", set.digest())
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DaemonStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforced: Option<EnforcedRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync: Option<SyncStatus>,
    /// Unix seconds of the last successful sync.
    #[serde(default)]
    pub last_success: u64,
    #[serde(default)]
    pub sync_errors_total: u64,
    #[serde(default)]
    pub host_interfaces: Vec<String>,
    /// Host interfaces that should be filtered but are not, with why (a link type we
    /// cannot parse, an attach error): node traffic through them is not judged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_interfaces_unfiltered: Vec<(String, String)>,
    #[serde(default)]
    pub conflist: Option<String>,
}

pub fn status_path(state_dir: &Path) -> PathBuf {
    state_dir.join("status.json")
}

impl DaemonStatus {
    pub fn save(&self, state_dir: &Path) {
        let json = serde_json::to_vec_pretty(self).expect("serializable");
        if let Err(e) = write_atomically(&status_path(state_dir), &json) {
            log::warn!("saving status: {e}");
        }
    }

    pub fn load(state_dir: &Path) -> Option<Self> {
        let bytes = std::fs::read(status_path(state_dir)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, proleptic Gregorian).
pub fn rfc3339(unix: u64) -> String {
    let (days, secs) = (unix / 86_400, unix % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One live attachment, as `status` and `/metrics` show it.
#[derive(Clone, Debug)]
pub struct LiveAttachment {
    pub kind: &'static str,
    pub ifname: String,
    pub ifindex: u32,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub container_id: Option<String>,
}

pub fn attachments(layout: &PinLayout, state: &StateLayout) -> Vec<LiveAttachment> {
    let mut out = Vec::new();
    for (_, r) in AttachmentRecord::list(state).unwrap_or_default() {
        out.push(LiveAttachment {
            kind: "pod",
            ifname: r.host_ifname,
            ifindex: r.host_ifindex,
            pod_namespace: r.pod_namespace,
            pod_name: r.pod_name,
            container_id: Some(r.container_id),
        });
    }
    // Host attachments: recorded (any mode), then pins of older versions without one.
    let recorded = egress_deny_datapath::records::HostRecord::list(state);
    for (_, r) in &recorded {
        out.push(LiveAttachment {
            kind: "host",
            ifname: r.ifname.clone(),
            ifindex: r.ifindex,
            pod_namespace: None,
            pod_name: None,
            container_id: None,
        });
    }
    if let Ok(entries) = std::fs::read_dir(layout.links_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(ifname) = host_link_ifname(&name) else {
                continue;
            };
            if recorded.iter().any(|(_, r)| r.ifname == ifname) {
                continue;
            }
            let ifindex = attach::pinned_link_state(&entry.path())
                .ok()
                .flatten()
                .map(|s| s.ifindex)
                .unwrap_or(0);
            out.push(LiveAttachment {
                kind: "host",
                ifname,
                ifindex,
                pod_namespace: None,
                pod_name: None,
                container_id: None,
            });
        }
    }
    out
}

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
pub fn run_status(args: &StateArgs) -> Result<u8> {
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
    match DaemonStatus::load(&args.state_dir) {
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
                    "last sync: {} ({}s ago), {} ms, {} tables swapped, {}",
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
        let who = match (&a.pod_namespace, &a.pod_name) {
            (Some(ns), Some(name)) => format!(" pod {ns}/{name}"),
            _ => a
                .container_id
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
            if a.kind == "host" {
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
    let status = DaemonStatus::load(&args.state_dir);
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

pub fn run_lookup(args: &LookupArgs) -> Result<()> {
    let layout = PinLayout::new(&args.state.pin_dir);
    let tables = RuleTables::open(&layout)
        .and_then(|t| t.snapshot())
        .context("opening the rule tables")?;
    let state = StateLayout::new(&args.state.state_dir);
    let live = attachments(&layout, &state);
    let counters = CounterMap::open(&layout).ok();
    // An older datapath has no settings map: no NAT64 prefixes then.
    let nat64 = egress_deny_datapath::settings::read(&layout)
        .map(|s| s.nat64_prefixes)
        .unwrap_or_default();
    for addr in &args.addresses {
        let d = tables.decide(*addr, &nat64)?;
        let prefix = d
            .prefix
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".into());
        println!("{addr} {} {prefix}", d.action.as_str());
        if let Some((nat64_prefix, embedded)) = d.via_nat64 {
            println!(
                "  IPv4 rule: {addr} is {embedded} through the NAT64 prefix {nat64_prefix} (--nat64-prefixes)"
            );
        }
        if d.action == egress_deny_datapath::rules::Action::Deny {
            println!("  dropped by every attachment ({}):", live.len());
            for a in &live {
                let c = counters
                    .as_ref()
                    .and_then(|m| m.get(a.ifindex).ok())
                    .unwrap_or_default();
                let who = match (&a.pod_namespace, &a.pod_name) {
                    (Some(ns), Some(name)) => format!("pod {ns}/{name} via {}", a.ifname),
                    _ => format!("{} {}", a.kind, a.ifname),
                };
                println!("    {who}: denied {} packets so far", c.denied_packets);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_350_245), "2026-11-22T12:24:05Z");
    }
}
