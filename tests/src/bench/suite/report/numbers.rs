//! How the report writes numbers: fixed decimals, percentages (factors from ×10), rule
//! counts (10k, 1M), and a duration that may be missing as seconds (NaN then).
use std::time::Duration;

/// Seconds; NaN for a step that never finished.
pub fn secs(d: Option<Duration>) -> f64 {
    d.map(|d| d.as_secs_f64()).unwrap_or(f64::NAN)
}

/// Fixed decimals; a dash for what was not measured.
pub fn fmt(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "—".into()
    }
}

/// A ratio in percent (two decimals below 10%), as a factor from ×10 on.
pub fn pct(v: f64) -> String {
    if v.is_finite() && v >= 10.0 {
        format!("×{v:.0}")
    } else if v.is_finite() && v < 0.1 {
        format!("{:.2}%", 100.0 * v)
    } else if v.is_finite() {
        format!("{:.1}%", 100.0 * v)
    } else {
        "—".into()
    }
}

/// A rule count as the tables and axes write it: 10k, 1M.
pub fn count(n: usize) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}
