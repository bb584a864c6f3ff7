//! Datapath benchmark of the compiled rule tables, IPv4 at 0 … 10M rules of the published
//! egress-filtering benchmark's mix (plus one IPv6 set at the largest size), two table
//! layouts side by side and the kernel's LPM trie as the reference:
//!
//! - load time (compile + write the inner map, then the one-update swap) and the table's
//!   exact kernel memory per rule;
//! - ns per verdict of the real program on one packet (BPF_PROG_TEST_RUN), hit and miss;
//! - ns per lookup with pseudo-random destinations (the reference object's
//!   `bench_random`: uniformly random, or folded onto 4096 / 64 destinations), minus the
//!   same loop without the lookup;
//! - the cost of deny events and counters at 1M rules.
//!
//! ```text
//! cargo run --release -p egress-deny-tests --bin bench-datapath -- \
//!     [--max-rules N] [--repeat N] [--runs K] [--v6-rules N] [--out FILE]
//! ```
//!
//! Writes its section of `tests/BENCHMARKS.md` (or `--out`) between
//! `<!-- begin datapath -->` / `<!-- end datapath -->`; other sections are left alone.
//!
//! This file is the command line and the run's order; the parts are in
//! `egress_deny_tests::bench::datapath` (tests/src/bench/datapath/).
use std::path::PathBuf;

use anyhow::{Result, ensure};
use clap::Parser;
use egress_deny_tests::{
    bench::{
        datapath::{
            Settings,
            measure::Measurements,
            report::{document, loadavg, targets},
            rows::{HEADER, RANDOM_HEADER},
        },
        write_section,
    },
    require_root,
};

const SIZES: [usize; 5] = [0, 1_000, 100_000, 1_000_000, 10_000_000];

#[derive(Parser)]
#[command(about = "Datapath benchmark: compiled rule tables (two layouts) vs the LPM trie")]
struct Args {
    /// Largest IPv4 rule count (sizes 0, 1k, 100k, 1M, 10M up to it, and it).
    #[arg(long, default_value_t = 10_000_000)]
    max_rules: usize,
    /// Program runs per BPF_PROG_TEST_RUN (the kernel reports their average).
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// BPF_PROG_TEST_RUN calls per measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// IPv6 rules, loaded at the largest IPv4 size (default: that size; 0 skips IPv6).
    #[arg(long)]
    v6_rules: Option<usize>,
    /// The benchmark document whose datapath section is (re)written.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/BENCHMARKS.md"))]
    out: PathBuf,
}

fn main() -> Result<()> {
    require_root();
    let args = Args::parse();
    ensure!(
        args.repeat >= 1 && args.runs >= 1,
        "--repeat and --runs must be >= 1"
    );
    let mut sizes: Vec<usize> = SIZES
        .iter()
        .copied()
        .filter(|&n| n <= args.max_rules)
        .collect();
    if !sizes.contains(&args.max_rules) {
        sizes.push(args.max_rules);
    }
    let largest = *sizes.last().unwrap_or(&0);
    let v6_count = args.v6_rules.unwrap_or(largest);
    let load_at_start = loadavg();
    let settings = Settings {
        max_rules: args.max_rules,
        repeat: args.repeat,
        runs: args.runs,
        v6_rules: args.v6_rules,
    };
    let mut measured = Measurements::new(&settings);

    println!("{HEADER}");
    for &n in &sizes {
        // IPv6 once, next to the largest IPv4 set.
        measured.size(n, if n == largest { v6_count } else { 0 })?;
    }

    println!("\n{RANDOM_HEADER}");
    for row in &measured.random_rows {
        println!("{}", row.markdown(&measured.random_rows));
    }
    let targets = targets(&measured.rows, &measured.random_rows);
    println!("\n{targets}");

    let loadavg = format!("{load_at_start} at start, {} at the end", loadavg());
    let body = document(&settings, &measured, &targets, &loadavg);
    write_section(&args.out, "datapath", &body)?;
    println!("\nwrote the datapath section of {}", args.out.display());
    Ok(())
}
