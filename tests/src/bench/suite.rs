//! bench-suite's parts: the [`topology`] it builds, the [`mechanisms`] it compares, the
//! [`measurement`] of each, one paired [`repetition`] of them all at one size, the
//! [`limits`] that stop a mechanism before a size it cannot handle, the [`processes`]
//! and everything else it owns until it exits, and the [`report`] of what it measured
//! ([`Suite`]).
pub mod limits;
pub mod measurement;
pub mod mechanisms;
pub mod processes;
pub mod repetition;
pub mod report;
pub mod topology;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use self::measurement::{sample::Sample, setup_time::Setup};

/// One repetition of one (mechanism, N).
#[derive(Clone, Debug)]
pub struct Run {
    pub rep: usize,
    pub sample: Sample,
    /// The paired baseline: for each test, the mean of the no-filter runs right before
    /// and right after this mechanism's run (same repetition). For `none` itself, the
    /// mean of all its runs in the repetition (so its ratio is 1).
    pub base: Sample,
    pub setup: Setup,
    pub teardown: Duration,
    /// After the teardown, until the kernel's background freeing had finished.
    pub settle: Duration,
}

pub type Results = BTreeMap<(usize, usize), Vec<Run>>; // (mechanism index, N)

/// A whole run: its settings and everything it measured.
pub struct Suite {
    pub quick: bool,
    pub sizes: Vec<usize>,
    pub mechanisms: Vec<&'static str>,
    pub reps: usize,
    pub secs: u32,
    pub blast_secs: f64,
    pub destinations: usize,
    pub deny_share: f64,
    pub seed: u64,
    pub setup_budget: Duration,
    /// How the kernel's per-program run time accounting was switched on.
    pub stats_mode: String,
    /// Wall time of each (N, repetition): set-up, traffic tests, teardown.
    pub rep_times: Vec<(usize, usize, Duration)>,
    pub results: Results,
    pub notes: BTreeSet<String>,
    /// Why a mechanism stopped, and at which N.
    pub stopped: BTreeMap<&'static str, (usize, String)>,
    pub took: Duration,
    pub background_before: f64,
    pub background_after: f64,
    pub command: String,
}
