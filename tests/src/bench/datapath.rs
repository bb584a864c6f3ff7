//! bench-datapath's parts: the [`rules`] sets measured, the [`structures`] holding them
//! (compiled tables, the LPM trie), the [`test_run`] measurements, one size [`measure`]d
//! in every structure, the [`events`]' cost, and the result [`rows`] and [`report`].
pub mod events;
pub mod measure;
pub mod report;
pub mod rows;
pub mod rules;
pub mod structures;
pub mod test_run;

/// The command line's settings the measurements and the report use.
pub struct Settings {
    /// Largest IPv4 rule count.
    pub max_rules: usize,
    /// Program runs per BPF_PROG_TEST_RUN.
    pub repeat: u32,
    /// BPF_PROG_TEST_RUN calls per measurement.
    pub runs: usize,
    /// IPv6 rules as given (None: as many as the largest IPv4 size).
    pub v6_rules: Option<usize>,
}
