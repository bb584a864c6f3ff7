//! The two result tables' rows (one structure holding one rule set) and their markdown:
//! load, memory and same-packet verdicts; random-destination lookups per working set.
use std::time::Duration;

use egress_deny_datapath::rules::Swap;

use super::{
    structures::TRIE,
    test_run::{RandomCost, Timing, WORKING_SETS},
};

/// The size the random-destination costs are compared with (issue 11's target: at 1M
/// and 10M rules at most twice this row's cost).
pub const BASE_SIZE: usize = 1_000;

/// One structure holding one rule set: load, memory, same-packet verdicts.
pub struct Row {
    pub family: &'static str,
    pub n: usize,
    pub structure: &'static str,
    /// `None` for the trie.
    pub swap: Option<Swap>,
    /// Tables: compile + write; trie: the per-entry insert loop.
    pub build: Duration,
    pub memlock: Option<u64>,
    pub hit: Option<Timing>,
    pub miss: Timing,
}

/// Same-packet ns/verdict: on the hit destination (when the rules hold it), on the miss.
pub type Verdicts = (Option<Timing>, Timing);

impl Row {
    /// A compiled table, as the installer's swap put it in force.
    pub fn table(
        family: &'static str,
        n: usize,
        structure: &'static str,
        swap: Swap,
        memlock: u64,
        (hit, miss): Verdicts,
    ) -> Self {
        Self {
            family,
            n,
            structure,
            swap: Some(swap),
            build: swap.build,
            memlock: Some(memlock),
            hit,
            miss,
        }
    }

    /// The reference trie (IPv4), filled in `fill`.
    pub fn trie(n: usize, fill: Duration, (hit, miss): Verdicts) -> Self {
        Self {
            family: "IPv4",
            n,
            structure: TRIE,
            swap: None,
            build: fill,
            memlock: None,
            hit,
            miss,
        }
    }

    pub fn load(&self) -> Duration {
        self.build + self.swap.map_or(Duration::ZERO, |s| s.swap)
    }

    pub fn bytes_per_rule(&self) -> Option<f64> {
        let swap = self.swap?;
        (self.n > 0).then(|| swap.summary.bytes as f64 / self.n as f64)
    }

    pub fn markdown(&self) -> String {
        let dash = || "—".to_owned();
        let per_rule = |bytes: u64| {
            if self.n == 0 {
                dash()
            } else {
                format!("{:.1}", bytes as f64 / self.n as f64)
            }
        };
        let load = match self.swap {
            Some(s) => format!(
                "{} ({} + {})",
                duration(self.load()),
                duration(self.build),
                duration(s.swap)
            ),
            None => format!("{} (inserts)", duration(self.build)),
        };
        let rate = if self.n == 0 {
            dash()
        } else {
            format!("{:.0}", self.n as f64 / self.load().as_secs_f64().max(1e-9))
        };
        let (bits, ranges, size, bytes) = match self.swap {
            Some(s) => (
                s.summary.direct_bits.to_string(),
                s.summary.ranges.to_string(),
                format!("{:.2}", s.summary.bytes as f64 / (1 << 20) as f64),
                per_rule(s.summary.bytes),
            ),
            None => (dash(), dash(), dash(), dash()),
        };
        format!(
            "| {} | {} | {} | {bits} | {ranges} | {load} | {rate} | {size} | {bytes} | {} | {} | {} |",
            self.family,
            self.n,
            self.structure,
            self.memlock.map_or_else(dash, per_rule),
            self.hit
                .map(|t| t.cell())
                .unwrap_or_else(|| "— (no rule)".into()),
            self.miss.cell(),
        )
    }
}

/// Seconds from 1 s up, else milliseconds.
fn duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 1.0 {
        format!("{s:.2} s")
    } else {
        format!("{:.1} ms", s * 1e3)
    }
}

pub const HEADER: &str = "| family | rules | structure | direct bits | ranges | load: total (build + swap) | rules/s | table MiB | B/rule | memlock B/rule | ns/verdict hit | ns/verdict miss |\n\
                      |---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|";

/// One structure's random-destination costs at one size, per working set.
pub struct RandomRow {
    pub family: &'static str,
    pub n: usize,
    pub structure: &'static str,
    pub costs: [RandomCost; 3],
    /// (observed, expected) denied share of single random lookups, per working set.
    pub shares: [(f64, f64); 3],
}

impl RandomRow {
    pub fn markdown(&self, rows: &[RandomRow]) -> String {
        let base = rows
            .iter()
            .find(|r| r.family == self.family && r.n == BASE_SIZE && r.structure == self.structure);
        let cells: Vec<String> = (0..WORKING_SETS.len())
            .map(|i| {
                let t = self.costs[i].lookup;
                let ratio = base
                    .map(|b| b.costs[i].lookup.median)
                    .filter(|&b| b > 0.0)
                    .map_or_else(|| "—".to_owned(), |b| format!("{:.1}×", t.median / b));
                format!("{} | {ratio}", t.cell())
            })
            .collect();
        let baselines: Vec<String> = self
            .costs
            .iter()
            .map(|c| format!("{:.0}", c.baseline))
            .collect();
        let denied: Vec<String> = self
            .shares
            .iter()
            .map(|(o, e)| format!("{:.1}/{:.1}", o * 100.0, e * 100.0))
            .collect();
        format!(
            "| {} | {} | {} | {} | {} | {} |",
            self.family,
            self.n,
            self.structure,
            cells.join(" | "),
            baselines.join(" / "),
            denied.join(" · "),
        )
    }

    pub fn raw(&self) -> String {
        let cells: Vec<String> = WORKING_SETS
            .iter()
            .zip(&self.costs)
            .zip(&self.shares)
            .map(|((w, c), (o, e))| {
                format!(
                    "W={w}: {:.1} ns (min {:.1}, max {:.1}) loop {:.1} ns, denied {o:.3} (rules {e:.3})",
                    c.lookup.median, c.lookup.min, c.lookup.max, c.baseline
                )
            })
            .collect();
        format!(
            "random {} n={} {}: {}",
            self.family,
            self.n,
            self.structure,
            cells.join("; ")
        )
    }
}

pub const RANDOM_HEADER: &str = "| family | rules | structure | uniform ns/lookup | × 1k | 4096 dest. ns/lookup | × 1k | 64 dest. ns/lookup | × 1k | loop ns subtracted (uniform / 4096 / 64) | denied % observed/rules (uniform · 4096 · 64) |\n\
                             |---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|";
