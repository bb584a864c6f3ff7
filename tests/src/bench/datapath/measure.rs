//! One rule-set size measured in every structure: each table layout and the trie loaded
//! with the same IPv4 rules (and, at the largest size, the IPv6 table), then their
//! same-packet verdicts, random-destination lookups and, at 1M rules, the events' cost.
use anyhow::{Result, ensure};
use aya::programs::SchedClassifier;
use egress_deny_datapath::{events, paths::ProgramKind, rules::RuleTables};

use super::{
    Settings,
    events::{INSTALLER_EVENTS_PER_SECOND, event_costs},
    rows::{RandomRow, Row, Verdicts},
    rules::{
        HIT_V4, HIT_V6, MISS_V4, MISS_V6, covered_share_v4, covered_share_v6, mix, v4_rules,
        v6_rules, working_set_share_v4, working_set_share_v6,
    },
    structures::{
        Candidate, TABLE_V6, TRIE, check_decisions, fill_trie, load_reference, program, settle,
        table_memlock,
    },
    test_run::{
        TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC, WHAT_TABLE, WHAT_TABLE_V6, WHAT_TRIE, WORKING_SETS,
        check_deny_share, frame_v4, frame_v6, ns_per_verdict, random_cost,
    },
};
use crate::{PinDir, bench::deny_entries};

/// The share of `bench_random`'s destinations a rule set denies, from the rules.
struct Expected<'a> {
    /// Of the whole space (uniformly random destinations).
    uniform: f64,
    /// Of a working set of that many destinations.
    working_set: &'a dyn Fn(u32) -> f64,
}

impl Expected<'_> {
    fn share(&self, working_set: u32) -> f64 {
        if working_set == 0 {
            self.uniform
        } else {
            (self.working_set)(working_set)
        }
    }
}

/// Everything the run measured, in the order it was measured.
pub struct Measurements<'a> {
    settings: &'a Settings,
    /// IPv4 hit, IPv4 miss, IPv6 hit, IPv6 miss.
    pub frames: [Vec<u8>; 4],
    pub rows: Vec<Row>,
    pub random_rows: Vec<RandomRow>,
    pub event_rows: Vec<String>,
    /// Each rule set's actual prefix-length mix.
    pub mixes: Vec<String>,
}

impl<'a> Measurements<'a> {
    pub fn new(settings: &'a Settings) -> Self {
        Self {
            settings,
            frames: [
                frame_v4(HIT_V4),
                frame_v4(MISS_V4),
                frame_v6(HIT_V6),
                frame_v6(MISS_V6),
            ],
            rows: Vec::new(),
            random_rows: Vec::new(),
            event_rows: Vec::new(),
            mixes: Vec::new(),
        }
    }

    /// `n` IPv4 rules, and `v6_count` IPv6 rules next to them when not 0.
    pub fn size(&mut self, n: usize, v6_count: usize) -> Result<()> {
        let rules = v4_rules(n);
        ensure!(
            rules.len() == n,
            "generated {} rules, wanted {n}",
            rules.len()
        );
        if n > 0 {
            self.mixes
                .push(format!("IPv4 {n}: {}", mix(&rules, [32, 24, 16])));
        }
        let entries = deny_entries(&rules);
        let expected_v4 = Expected {
            uniform: covered_share_v4(&rules),
            working_set: &|w| working_set_share_v4(&rules, w),
        };
        let pins = PinDir::new()?;
        events::set_events_per_second(&pins.layout, INSTALLER_EVENTS_PER_SECOND)?;
        let tables = RuleTables::open(&pins.layout)?;
        let prog = SchedClassifier::from_pin(pins.layout.program(ProgramKind::Ethernet))?;
        let mut reference = load_reference(&pins)?;
        let trie_fill = fill_trie(&mut reference, &rules)?;

        for candidate in Candidate::ALL {
            let swap = tables.replace_v4_with(&entries, candidate.layout())?;
            let memlock = table_memlock(&swap)?;
            check_decisions(&tables, HIT_V4.into(), MISS_V4.into(), n > 0)?;
            let verdicts = self.verdicts(&prog, 0, n > 0, TC_ACT_UNSPEC)?;
            let name = candidate.name();
            self.push_row(Row::table("IPv4", n, name, swap, memlock, verdicts));
            let bench = program(&reference, "bench_random")?;
            let random = self.random_row(bench, "IPv4", n, name, WHAT_TABLE, &expected_v4)?;
            self.random_rows.push(random);
            if n == 1_000_000 && candidate == Candidate::Adaptive {
                self.event_rows = event_costs(
                    &pins,
                    &prog,
                    program(&reference, "reference_lpm")?,
                    &self.frames,
                    self.settings,
                )?;
            }
        }

        let lpm = program(&reference, "reference_lpm")?;
        let verdicts = self.verdicts(lpm, 0, n > 0, TC_ACT_OK)?;
        self.push_row(Row::trie(n, trie_fill, verdicts));
        let bench = program(&reference, "bench_random")?;
        let random = self.random_row(bench, "IPv4", n, TRIE, WHAT_TRIE, &expected_v4)?;
        self.random_rows.push(random);

        if v6_count > 0 {
            let v6 = v6_rules(v6_count);
            self.mixes
                .push(format!("IPv6 {}: {}", v6.len(), mix(&v6, [128, 64, 48])));
            let swap = tables.replace_v6(&deny_entries(&v6))?;
            let memlock = table_memlock(&swap)?;
            check_decisions(&tables, HIT_V6.into(), MISS_V6.into(), true)?;
            let verdicts = self.verdicts(&prog, 2, true, TC_ACT_UNSPEC)?;
            self.push_row(Row::table(
                "IPv6",
                v6.len(),
                TABLE_V6,
                swap,
                memlock,
                verdicts,
            ));
            let expected_v6 = Expected {
                uniform: covered_share_v6(&v6),
                working_set: &|w| working_set_share_v6(&v6, w),
            };
            let bench = program(&reference, "bench_random")?;
            let random = self.random_row(
                bench,
                "IPv6",
                v6.len(),
                TABLE_V6,
                WHAT_TABLE_V6,
                &expected_v6,
            )?;
            self.random_rows.push(random);
        }
        drop(reference); // frees the trie (in a kernel worker)
        drop(prog);
        drop(tables);
        drop(pins); // unpins: the kernel frees the tables
        settle();
        Ok(())
    }

    /// Same-packet verdicts of `prog` on the frames from `frames[first]` (hit, which it
    /// must deny, measured when `has_hit`) and `frames[first + 1]` (miss: `miss_verdict`).
    fn verdicts(
        &self,
        prog: &SchedClassifier,
        first: usize,
        has_hit: bool,
        miss_verdict: u32,
    ) -> Result<Verdicts> {
        let (repeat, runs) = (self.settings.repeat, self.settings.runs);
        let (hit_frame, miss_frame) = (&self.frames[first], &self.frames[first + 1]);
        let hit = if has_hit {
            Some(ns_per_verdict(prog, hit_frame, repeat, runs, TC_ACT_SHOT)?)
        } else {
            None
        };
        let miss = ns_per_verdict(prog, miss_frame, repeat, runs, miss_verdict)?;
        Ok((hit, miss))
    }

    fn push_row(&mut self, row: Row) {
        println!("{}", row.markdown());
        self.rows.push(row);
    }

    /// Random-destination costs and verdict check of one structure, all working sets.
    fn random_row(
        &self,
        bench: &SchedClassifier,
        family: &'static str,
        n: usize,
        structure: &'static str,
        what: u8,
        expected: &Expected,
    ) -> Result<RandomRow> {
        let (repeat, runs) = (self.settings.repeat, self.settings.runs);
        let mut costs = Vec::new();
        let mut shares = Vec::new();
        for w in WORKING_SETS {
            costs.push(random_cost(bench, what, w, repeat, runs)?);
            let e = expected.share(w);
            let label = format!("{family} {n} {structure}");
            shares.push((check_deny_share(bench, what, w, e, &label)?, e));
        }
        let row = RandomRow {
            family,
            n,
            structure,
            costs: costs.try_into().expect("one per working set"),
            shares: shares.try_into().expect("one per working set"),
        };
        eprintln!("  {}", row.raw());
        Ok(row)
    }
}
