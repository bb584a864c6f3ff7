//! Measurements by BPF_PROG_TEST_RUN: ns per verdict of a program on one frame, and
//! `bench_random`'s ns per lookup with pseudo-random destinations, every run's return
//! value checked.
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, ensure};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};

use crate::packet;

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_UNSPEC: u32 = u32::MAX;

/// `bench_random`'s first packet byte: what each run looks up.
pub const WHAT_NONE: u8 = 0;
pub const WHAT_TABLE: u8 = 1;
pub const WHAT_TRIE: u8 = 2;
pub const WHAT_TABLE_V6: u8 = 3;
/// Working sets (0 = uniformly random destinations), in the columns' order.
pub const WORKING_SETS: [u32; 3] = [0, 4096, 64];
/// Single-lookup runs per (structure, working set) whose verdicts are counted and
/// compared with the share of destinations the rules deny.
pub const VERDICT_SAMPLES: usize = 1000;

/// Median, min and max over `runs` test runs (ns).
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Timing {
    pub fn of(mut samples: Vec<f64>) -> Self {
        samples.sort_by(f64::total_cmp);
        Timing {
            median: samples[samples.len() / 2],
            min: samples[0],
            max: samples[samples.len() - 1],
        }
    }

    pub fn cell(&self) -> String {
        format!("{:.0} ({:.0}–{:.0})", self.median, self.min, self.max)
    }
}

pub fn frame_v4(dst: Ipv4Addr) -> Vec<u8> {
    packet::ethernet(
        &[],
        packet::ETH_P_IP,
        &packet::ipv4(Ipv4Addr::new(10, 0, 0, 1), dst, &Default::default()),
    )
}

pub fn frame_v6(dst: Ipv6Addr) -> Vec<u8> {
    packet::ethernet(
        &[],
        packet::ETH_P_IPV6,
        &packet::ipv6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1), dst),
    )
}

/// One BPF_PROG_TEST_RUN: (return value, the kernel's average ns per program run).
fn test_run(prog: &SchedClassifier, data: &[u8], repeat: u32) -> Result<(u32, f64)> {
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(data);
    opts.repeat = repeat;
    let r = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    Ok((r.return_value, r.duration.as_nanos() as f64))
}

/// Runs the program `runs` times with `repeat` iterations each; every run must return
/// `expect` (a broken program or rule set cannot report a number).
pub fn ns_per_verdict(
    prog: &SchedClassifier,
    frame: &[u8],
    repeat: u32,
    runs: usize,
    expect: u32,
) -> Result<Timing> {
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let (ret, ns) = test_run(prog, frame, repeat)?;
        ensure!(
            ret == expect,
            "verdict {} != expected {}",
            ret as i32,
            expect as i32
        );
        samples.push(ns);
    }
    Ok(Timing::of(samples))
}

/// `bench_random`'s test packet: `[what, 0, 0, 0, working_set LE]`, padded to a
/// minimal Ethernet frame (BPF_PROG_TEST_RUN for tc needs at least the 14-byte header).
fn bench_packet(what: u8, working_set: u32) -> Vec<u8> {
    let mut p = vec![0u8; 64];
    p[0] = what;
    p[4..8].copy_from_slice(&working_set.to_le_bytes());
    p
}

/// `bench_random` must return a verdict: 0 (not denied) or 2 (denied); -1 means the
/// table could not be read, 0/1 are the baseline loop's only values.
fn check_random_return(what: u8, ret: u32) -> Result<()> {
    let ok = match what {
        WHAT_NONE => ret <= 1,
        _ => ret == TC_ACT_OK || ret == TC_ACT_SHOT,
    };
    ensure!(
        ok,
        "bench_random (what={what}) returned {}: {}",
        ret as i32,
        if ret == u32::MAX {
            "the table is unreadable"
        } else {
            "not a verdict"
        }
    );
    Ok(())
}

/// ns per lookup with pseudo-random destinations: per run, the loop without a lookup
/// and then the one with it (each `repeat` runs), the difference; median over `runs`.
#[derive(Clone, Copy, Debug)]
pub struct RandomCost {
    pub lookup: Timing,
    /// The subtracted loop (draw + packet handling), median.
    pub baseline: f64,
}

pub fn random_cost(
    bench: &SchedClassifier,
    what: u8,
    working_set: u32,
    repeat: u32,
    runs: usize,
) -> Result<RandomCost> {
    let base_packet = bench_packet(WHAT_NONE, working_set);
    let packet = bench_packet(what, working_set);
    let (mut diffs, mut bases) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for _ in 0..runs {
        let (ret, base) = test_run(bench, &base_packet, repeat)?;
        check_random_return(WHAT_NONE, ret)?;
        let (ret, ns) = test_run(bench, &packet, repeat)?;
        check_random_return(what, ret)?;
        diffs.push(ns - base);
        bases.push(base);
    }
    Ok(RandomCost {
        lookup: Timing::of(diffs),
        baseline: Timing::of(bases).median,
    })
}

/// Share of `VERDICT_SAMPLES` single-lookup runs that `bench_random` denied.
fn observed_deny_share(bench: &SchedClassifier, what: u8, working_set: u32) -> Result<f64> {
    let packet = bench_packet(what, working_set);
    let mut denied = 0;
    for _ in 0..VERDICT_SAMPLES {
        let (ret, _) = test_run(bench, &packet, 1)?;
        check_random_return(what, ret)?;
        denied += usize::from(ret == TC_ACT_SHOT);
    }
    Ok(denied as f64 / VERDICT_SAMPLES as f64)
}

/// The lookups must decide like the rules: the denied share of random single lookups
/// has to match the share of the destination space (or of the working set) the rules
/// cover, computed here from the rules themselves, within 6 standard deviations + 1%.
pub fn check_deny_share(
    bench: &SchedClassifier,
    what: u8,
    working_set: u32,
    expected: f64,
    label: &str,
) -> Result<f64> {
    let observed = observed_deny_share(bench, what, working_set)?;
    let sigma = (expected * (1.0 - expected) / VERDICT_SAMPLES as f64).sqrt();
    ensure!(
        (observed - expected).abs() <= 6.0 * sigma + 0.01,
        "{label}, working set {working_set}: {observed:.3} of random lookups denied, but the \
         rules cover {expected:.3} of those destinations"
    );
    Ok(observed)
}
