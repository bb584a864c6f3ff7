//! bench-suite's output: RESULTS.md (machine, method, headline ratios with their spread,
//! what limits each mechanism, one table + SVG plot per metric), results.csv (every
//! repetition with its paired baseline).
mod csv;
mod machine;
mod markdown;
mod metrics;
mod numbers;
mod plots;
mod stats;

use std::path::Path;

use anyhow::Result;

use self::metrics::METRICS;
use super::Suite;

/// Writes RESULTS.md, results.csv and `{metric}.svg` for every metric the run has.
pub fn write(dir: &Path, suite: &Suite) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for metric in &METRICS {
        if let Some(svg) = plots::plot(suite, metric) {
            std::fs::write(dir.join(format!("{}.svg", metric.key)), svg)?;
        }
    }
    std::fs::write(dir.join("RESULTS.md"), markdown::document(suite))?;
    std::fs::write(dir.join("results.csv"), csv::table(suite))?;
    Ok(())
}
