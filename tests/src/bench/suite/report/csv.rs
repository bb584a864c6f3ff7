//! results.csv: every repetition of every (mechanism, N), its paired baseline's numbers
//! beside its own (`base_*`), and its set-up and teardown times.
use std::fmt::Write as _;

use crate::bench::suite::{Suite, measurement::sample::Sample, mechanisms::MECHANISMS};

use super::numbers::secs;

pub fn table(suite: &Suite) -> String {
    let mut s = String::from("mechanism,rules,rep,");
    s.push_str(&Sample::NAMES.join(","));
    for name in Sample::NAMES {
        let _ = write!(s, ",base_{name}");
    }
    s.push_str(",apply_s,setup_s,teardown_s,settle_s,phases\n");
    let num = |v: f64| {
        if v.is_finite() {
            format!("{v:.4}")
        } else {
            String::new()
        }
    };
    for ((mi, n), runs) in &suite.results {
        for r in runs {
            let phases: Vec<String> = r
                .setup
                .phases
                .iter()
                .map(|(p, d)| format!("{p}={:.4}", d.as_secs_f64()))
                .collect();
            let values: Vec<String> = r
                .sample
                .values()
                .into_iter()
                .chain(r.base.values())
                .map(num)
                .collect();
            let _ = writeln!(
                s,
                "{},{n},{},{},{},{},{:.4},{:.2},{}",
                MECHANISMS[*mi],
                r.rep + 1,
                values.join(","),
                num(secs(r.setup.apply)),
                num(secs(r.setup.effective)),
                r.teardown.as_secs_f64(),
                r.settle.as_secs_f64(),
                phases.join(";")
            );
        }
    }
    s
}
