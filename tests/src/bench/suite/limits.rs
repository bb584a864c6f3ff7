//! When a mechanism is not tried at the next size: its set-up or its per-packet cost,
//! extrapolated linearly from the previous size, would exceed the run's limits.
use std::{collections::BTreeMap, time::Duration};

use super::measurement::setup_time::Setup;

pub struct Limits {
    setup_budget: Duration,
    max_packet_ms: f64,
    /// Last successful apply per mechanism: (N, total, size-dependent part).
    last_apply: BTreeMap<&'static str, (usize, Duration, Duration)>,
    /// Last ICMP average per mechanism: (N, ms).
    last_ping: BTreeMap<&'static str, (usize, f64)>,
}

impl Limits {
    pub fn new(setup_budget: Duration, max_packet_ms: f64) -> Self {
        Self {
            setup_budget,
            max_packet_ms,
            last_apply: BTreeMap::new(),
            last_ping: BTreeMap::new(),
        }
    }

    pub fn record_setup(&mut self, mechanism: &'static str, n: usize, setup: &Setup) {
        let total = setup.apply.unwrap_or_default();
        self.last_apply
            .insert(mechanism, (n, total, setup.size_dependent()));
    }

    pub fn record_ping(&mut self, mechanism: &'static str, n: usize, ping_avg_ms: f64) {
        self.last_ping.insert(mechanism, (n, ping_avg_ms));
    }

    /// Why `mechanism` is not to be tried at `n` rules (None: it is).
    pub fn why_stop(&self, mechanism: &str, n: usize) -> Option<String> {
        let setup_budget = self.setup_budget;
        let mut why = Vec::new();
        // The size-dependent phase (restore, inserts) scaled linearly, the rest (program
        // load, attach, process start) kept.
        let predicted = self.last_apply.get(mechanism).map(|&(prev_n, total, dep)| {
            (
                prev_n,
                total,
                total - dep + dep.mul_f64(n as f64 / prev_n as f64),
            )
        });
        if let Some((prev_n, prev, predicted)) = predicted
            && predicted > setup_budget
        {
            why.push(format!(
                "its set-up is predicted at {:.0} s ({:.1} s at {prev_n} rules, the rule loading scaled linearly), over the {} s set-up budget",
                predicted.as_secs_f64(),
                prev.as_secs_f64(),
                setup_budget.as_secs()
            ));
        }
        if let Some(&(prev_n, ping_ms)) = self.last_ping.get(mechanism) {
            let predicted = ping_ms * n as f64 / prev_n as f64;
            if ping_ms > 1.0 && predicted > self.max_packet_ms {
                why.push(format!(
                    "its per-packet cost grows linearly (ICMP round trip {ping_ms:.1} ms at {prev_n} rules, predicted {predicted:.0} ms), over the {:.0} ms limit: every test would leave a backlog that takes minutes to drain",
                    self.max_packet_ms
                ));
            }
        }
        if why.is_empty() {
            return None;
        }
        if let Some((_, _, predicted)) = predicted
            && predicted <= setup_budget
        {
            why.push(format!(
                "(its set-up would take about {:.0} s)",
                predicted.as_secs_f64()
            ));
        }
        Some(why.join("; ").replace("; (", " ("))
    }
}
