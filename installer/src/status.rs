//! The daemon's status as it persists it in the state dir (`status.json`, written
//! atomically): what it enforces, the last sync, host interfaces, the conflist. The
//! daemon writes it; `status` and a restarted daemon read it.
use std::{
    fmt,
    time::{SystemTime, UNIX_EPOCH},
};

use egress_deny_datapath::{
    paths::{PinLayout, StateLayout},
    records::write_atomically,
    rules::{RuleTables, Swap},
};
use serde::{Deserialize, Serialize};

use crate::rules::RuleSet;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RuleCounts {
    pub v4_deny: usize,
    pub v4_allow: usize,
    pub v6_deny: usize,
    pub v6_allow: usize,
}

/// As the daemon logs them: `IPv4 N deny / N allow, IPv6 N deny / N allow`.
impl fmt::Display for RuleCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "IPv4 {} deny / {} allow, IPv6 {} deny / {} allow",
            self.v4_deny, self.v4_allow, self.v6_deny, self.v6_allow
        )
    }
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

impl DaemonStatus {
    pub fn save(&self, state: &StateLayout) {
        let json = serde_json::to_vec_pretty(self).expect("serializable");
        if let Err(e) = write_atomically(&state.daemon_status(), &json) {
            log::warn!("saving status: {e}");
        }
    }

    pub fn load(state: &StateLayout) -> Option<Self> {
        let bytes = std::fs::read(state.daemon_status()).ok()?;
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

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_350_245), "2026-11-22T12:24:05Z");
    }
}
