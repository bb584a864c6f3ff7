//! One repetition at one size: every mechanism's rule set applied afresh (set-up timed),
//! then every test run for each mechanism between two no-filter runs (its paired
//! baseline), then everything unloaded and the kernel's background freeing waited out.
use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::{
    Run, Suite,
    limits::Limits,
    measurement::{
        Measurer, TESTS,
        cpu::kernel_share,
        sample::Sample,
        setup_time::{Applied, Setup, apply_timed},
    },
    mechanisms::{Applier, Filter, MECHANISMS, Prepared},
    processes::TimedOut,
    topology::SERVER_ADDR,
};

/// What every repetition shares.
pub struct Repeater<'a> {
    pub applier: Applier<'a>,
    pub iperf_server_pid: u32,
    pub secs: u32,
    pub blast_secs: f64,
    pub limits: Limits,
}

/// A mechanism loaded for this repetition (switched off), with its results so far.
struct Loaded {
    /// Position in [`MECHANISMS`] (what the report looks up), not in the selection.
    mi: usize,
    mechanism: &'static str,
    filter: Filter,
    run: Run,
}

/// The same destinations for every mechanism at one size.
pub struct Traffic<'a> {
    pub prepared: &'a Prepared,
    pub many: Arc<Vec<(Ipv4Addr, bool)>>,
}

impl Repeater<'_> {
    /// Repetition `rep` (from 0) at `n` rules; its runs go into `suite.results`.
    pub fn run(
        &mut self,
        suite: &mut Suite,
        n: usize,
        rep: usize,
        traffic: &Traffic,
    ) -> Result<()> {
        let rep_started = Instant::now();
        let mut loaded = self.apply_all(suite, n, rep, traffic.prepared)?;
        let tests_started = Instant::now();
        self.paired_tests(&mut suite.notes, &mut loaded, n, rep, traffic)?;
        let tests = tests_started.elapsed();
        // Unload everything; the kernel frees big tries (kworker) and sets (RCU
        // callbacks, in softirq) after that returns: let it finish before the next
        // set-up. Kernel time, not busy time (a shared machine's builds are mostly user
        // time), and capped (others' kernel work may never stop).
        for l in &mut loaded {
            let torn = Instant::now();
            self.applier
                .remove(std::mem::replace(&mut l.filter, Filter::None));
            l.run.teardown = torn.elapsed();
        }
        let settled = Instant::now();
        let cap = Duration::from_secs((n / 700_000).min(15) as u64);
        while settled.elapsed() < cap && kernel_share(Duration::from_millis(250)) > 0.12 {}
        let settle = settled.elapsed();
        println!(
            "N={n} rep {}: traffic tests {:.0} s, settled {:.1} s",
            rep + 1,
            tests.as_secs_f64(),
            settle.as_secs_f64()
        );
        suite.rep_times.push((n, rep, rep_started.elapsed()));
        for Loaded {
            mi,
            mechanism,
            mut run,
            ..
        } in loaded
        {
            run.settle = settle;
            print_run(mechanism, n, &run);
            if run.sample.ping_avg_ms.is_finite() {
                self.limits
                    .record_ping(mechanism, n, run.sample.ping_avg_ms);
            }
            suite.results.entry((mi, n)).or_default().push(run);
        }
        Ok(())
    }

    /// Every mechanism's rule set applied afresh (set-up timed), then switched off but
    /// kept loaded; a mechanism that cannot be (or is not to be) set up at `n` stops.
    fn apply_all(
        &mut self,
        suite: &mut Suite,
        n: usize,
        rep: usize,
        prepared: &Prepared,
    ) -> Result<Vec<Loaded>> {
        let mut loaded = Vec::new();
        for mechanism in suite.mechanisms.clone() {
            let mi = MECHANISMS.iter().position(|m| *m == mechanism).unwrap_or(0);
            if suite.stopped.contains_key(mechanism) {
                continue;
            }
            if rep == 0
                && mechanism != "none"
                && let Some(why) = self.limits.why_stop(mechanism, n)
            {
                println!("{mechanism:>14} N={n:>8}: stopped: {why}");
                suite.stopped.insert(mechanism, (n, why));
                continue;
            }
            let label = format!("{mechanism} N={n} rep {}", rep + 1);
            let applied = if mechanism == "none" {
                Applied {
                    filter: Filter::None,
                    setup: Setup::default(),
                }
            } else {
                match apply_timed(&mut self.applier, mechanism, prepared) {
                    Ok(a) => a,
                    Err(e) => {
                        let why = if e.downcast_ref::<TimedOut>().is_some() {
                            format!(
                                "set-up of {n} rules did not finish within the {} s set-up budget",
                                self.applier.setup_budget.as_secs()
                            )
                        } else {
                            format!("set-up of {n} rules failed: {e:#}")
                        };
                        println!("{mechanism:>14} N={n:>8}: stopped: {why}");
                        suite.stopped.insert(mechanism, (n, why));
                        continue;
                    }
                }
            };
            let Applied { mut filter, setup } = applied;
            if mechanism != "none" {
                self.limits.record_setup(mechanism, n, &setup);
                if setup.effective.is_none() {
                    suite.notes.insert(format!(
                        "{label}: FAILED: the destination inside the list was not dropped within 20 s"
                    ));
                }
                println!(
                    "{mechanism:>14} N={n:>8} rep {}: set-up {} (apply {:.3} s: {})",
                    rep + 1,
                    setup
                        .effective
                        .map(|d| format!("{:.3} s", d.as_secs_f64()))
                        .unwrap_or_else(|| "NOT DROPPED".into()),
                    setup.apply.unwrap_or_default().as_secs_f64(),
                    setup
                        .phases
                        .iter()
                        .map(|(p, d)| format!("{p} {:.3}", d.as_secs_f64()))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            self.applier
                .set_enabled(&mut filter, false)
                .with_context(|| format!("{label}: switching the filter off"))?;
            loaded.push(Loaded {
                mi,
                mechanism,
                filter,
                run: Run {
                    rep,
                    sample: Sample::default(),
                    base: Sample::default(),
                    setup,
                    teardown: Duration::ZERO,
                    settle: Duration::ZERO,
                },
            });
        }
        Ok(loaded)
    }

    /// Each test runs for every mechanism back to back, one filter switched on at a time,
    /// with a no-filter run before the first and after every mechanism (none, A, none, B,
    /// none, …): each mechanism's baseline is the mean of the two no-filter runs around
    /// it, seconds away, so slow drift of a shared machine cancels (to first order) in the
    /// ratio. The mechanisms' order rotates with the repetition.
    fn paired_tests(
        &self,
        notes: &mut BTreeSet<String>,
        loaded: &mut [Loaded],
        n: usize,
        rep: usize,
        traffic: &Traffic,
    ) -> Result<()> {
        let applier = &self.applier;
        let mut measurer = Measurer {
            topo: applier.topo,
            server_pid: self.iperf_server_pid,
            secs: self.secs,
            blast_secs: self.blast_secs,
            many: traffic.many.clone(),
            single: Arc::new(vec![(SERVER_ADDR, false)]),
            notes,
        };
        let none_pos = loaded.iter().position(|l| l.mechanism == "none");
        let others: Vec<usize> = (0..loaded.len()).filter(|i| Some(*i) != none_pos).collect();
        let rotated: Vec<usize> = (0..others.len())
            .map(|j| others[(j + rep) % others.len()])
            .collect();
        let order: Vec<usize> = match none_pos {
            Some(np) => std::iter::once(np)
                .chain(rotated.iter().flat_map(|&i| [i, np]))
                .collect(),
            None => rotated,
        };
        for test in TESTS {
            let mut got = Vec::with_capacity(order.len());
            for &i in &order {
                let Loaded {
                    mechanism, filter, ..
                } = &mut loaded[i];
                let label = format!("{mechanism} N={n} rep {}", rep + 1);
                if let Err(e) = applier.set_enabled(filter, true) {
                    measurer
                        .notes
                        .insert(format!("{label}: switching the filter on failed: {e:#}"));
                    got.push(Sample::default());
                    continue;
                }
                got.push(measurer.run(test, &label, filter));
                applier
                    .set_enabled(filter, false)
                    .with_context(|| format!("{label}: switching the filter off"))?;
            }
            for (pos, &i) in order.iter().enumerate() {
                if Some(i) == none_pos {
                    continue;
                }
                let run = &mut loaded[i].run;
                run.sample.merge(&got[pos]);
                if none_pos.is_some() {
                    run.base.merge(&Sample::mean(&[got[pos - 1], got[pos + 1]]));
                }
            }
            if let Some(np) = none_pos {
                let nones: Vec<Sample> = order
                    .iter()
                    .zip(&got)
                    .filter(|(i, _)| **i == np)
                    .map(|(_, s)| *s)
                    .collect();
                let mean = Sample::mean(&nones);
                loaded[np].run.sample.merge(&mean);
                loaded[np].run.base.merge(&mean);
            }
        }
        Ok(())
    }
}

/// One line per mechanism and repetition: each number with its paired ratio.
fn print_run(mechanism: &str, n: usize, run: &Run) {
    let (sample, base) = (&run.sample, &run.base);
    println!(
        "{mechanism:>14} N={n:>8} rep {}: {:>6.0} Mbit/s ({:.3}) pps {:>7.0} ({:.3}) many {:>7.0} ({:.3}, leaked {:.2}) ns/pkt {:.0}/{:.0} cpu@1G {:.0} ns/pkt {:.1}% ({:.0} Mbit/s) ping {:.3}/{:.3} ms rr {:.0}/{:.0} us teardown {:.2} s",
        run.rep + 1,
        sample.udp_mbps,
        sample.udp_mbps / base.udp_mbps,
        sample.pps,
        sample.pps / base.pps,
        sample.pps_many,
        sample.pps_many / base.pps_many,
        sample.many_denied_arrived,
        sample.ns_pkt,
        sample.ns_pkt_many,
        sample.cpu_ns_pkt,
        sample.cpu_pct,
        sample.cpu_rate_mbps,
        sample.ping_avg_ms,
        sample.ping_p99_ms,
        sample.rr_p50_us,
        sample.rr_p99_us,
        run.teardown.as_secs_f64(),
    );
}
