//! The SVG plots: one line chart per metric, the rule count on the x axis and one line
//! per mechanism through its medians, with min–max bars.
use std::fmt::Write as _;

use crate::bench::suite::Suite;

use super::{
    metrics::{Metric, as_ratio, mech_index, shown_mechanisms, values},
    numbers::count,
    stats::Stat,
};

/// One colour per mechanism, by its position in `MECHANISMS`.
const COLORS: [&str; 5] = ["#7f7f7f", "#d62728", "#ff7f0e", "#2ca02c", "#1f77b4"];

/// `metric`'s plot over this run's sizes (the ratio metrics in % of the paired baseline);
/// None if no mechanism of the run has it.
pub fn plot(suite: &Suite, metric: &Metric) -> Option<String> {
    let mechs = shown_mechanisms(suite, metric);
    if mechs.is_empty() {
        return None;
    }
    let ratio = as_ratio(suite, metric);
    let mut series = Vec::new();
    for &m in &mechs {
        // Ratio plots leave out the baseline (100% by construction: a reference line).
        if ratio && m == "none" {
            continue;
        }
        let mi = mech_index(m);
        let points: Vec<(usize, Stat)> = suite
            .sizes
            .iter()
            .filter_map(|&n| {
                let mut st = Stat::of(&values(suite, mi, n, metric, ratio))?;
                if ratio {
                    st.median *= 100.0;
                    st.min *= 100.0;
                    st.max *= 100.0;
                }
                Some((n, st))
            })
            .collect();
        series.push((m, COLORS[mi % COLORS.len()], points));
    }
    let (title, unit, log_y) = if ratio {
        (
            format!("{}: % of the paired no-filter baseline", metric.title),
            "% of no filter (paired)".to_owned(),
            false,
        )
    } else {
        (
            format!("{} ({})", metric.title, metric.unit),
            metric.unit.to_owned(),
            metric.log_y,
        )
    };
    Some(chart(&title, &unit, log_y, ratio.then_some(100.0), &series))
}

/// (mechanism, colour, (N, median/min/max) points).
type Series<'a> = (&'a str, &'a str, Vec<(usize, Stat)>);

/// Round tick values covering [lo, hi]: steps of 1, 2 or 5 × 10^k, at most ~7 ticks.
fn linear_ticks(lo: f64, hi: f64) -> (f64, f64, Vec<f64>) {
    let span = (hi - lo).max(1e-9);
    let raw = span / 6.0;
    let p = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * p);
    let lo = (lo / step).floor() * step;
    let hi = (hi / step).ceil() * step;
    let n = ((hi - lo) / step).round() as usize;
    (lo, hi, (0..=n).map(|i| lo + step * i as f64).collect())
}

/// Decimals that show a round tick value (1, 2 or 5 × 10^e) exactly.
fn tick_decimals(v: f64) -> usize {
    if v == 0.0 {
        0
    } else {
        (-(v.abs().log10() + 1e-9).floor()).max(0.0) as usize
    }
}

/// A line chart: x = rule count (log scale, decades), one line per mechanism through the
/// medians with min–max error bars; y linear (round ticks, from 0) or logarithmic
/// (decades, with 2 and 5 when the range is short). `reference`: a dashed horizontal
/// line (100% for the ratio plots: the paired baseline).
fn chart(
    title: &str,
    unit: &str,
    log_y: bool,
    reference: Option<f64>,
    series: &[Series<'_>],
) -> String {
    let (w, h, left, right, top, bottom) = (860.0, 420.0, 80.0, 170.0, 40.0, 50.0);
    let points: Vec<(usize, Stat)> = series
        .iter()
        .flat_map(|(_, _, p)| p.iter().copied())
        .filter(|(_, st)| st.median.is_finite() && (!log_y || st.min > 0.0))
        .collect();
    let lx = |n: usize| (n.max(1) as f64).log10();
    let (min_x, max_x) = if points.is_empty() {
        (1.0, 7.0)
    } else {
        let lo = points.iter().map(|p| lx(p.0)).fold(f64::MAX, f64::min);
        let hi = points.iter().map(|p| lx(p.0)).fold(f64::MIN, f64::max);
        // Half a decade of margin, so single sizes and error bars are not on the frame.
        (lo.floor().min(lo - 0.3), hi.ceil().max(hi + 0.3))
    };
    let data_hi = points
        .iter()
        .map(|p| p.1.max)
        .chain(reference)
        .fold(0.0f64, f64::max);
    // Labels: log ticks each with their own decimals, linear ones with the step's.
    let (lo, hi, ticks) = if log_y {
        let lo = points
            .iter()
            .map(|p| p.1.min.log10())
            .fold(f64::MAX, f64::min);
        let hi = points
            .iter()
            .map(|p| p.1.max.log10())
            .fold(f64::MIN, f64::max);
        let (lo, hi) = if points.is_empty() {
            (0.0, 1.0)
        } else {
            (lo.floor(), hi.ceil().max(lo.floor() + 1.0))
        };
        let mults: &[f64] = if hi - lo <= 2.0 {
            &[1.0, 2.0, 5.0]
        } else {
            &[1.0]
        };
        let mut ticks = Vec::new();
        for e in (lo as i32)..=(hi as i32) {
            for m in mults {
                let v = m * 10f64.powi(e);
                if v.log10() <= hi + 1e-9 {
                    ticks.push(v);
                }
            }
        }
        (lo, hi, ticks)
    } else {
        linear_ticks(0.0, data_hi.max(1e-9) * 1.05)
    };
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let x = |n: usize| left + (lx(n) - min_x) / (max_x - min_x) * plot_w;
    let y = |v: f64| {
        let t = if log_y {
            (v.log10() - lo) / (hi - lo)
        } else {
            (v - lo) / (hi - lo)
        };
        top + plot_h * (1.0 - t)
    };
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"22\" font-size=\"14\">{}</text>\n",
        escape(title)
    );
    // Grid and axes: x at every decade.
    for e in (min_x.ceil() as i32)..=(max_x.floor() as i32) {
        let gx = left + (f64::from(e) - min_x) / (max_x - min_x) * plot_w;
        let _ = writeln!(
            s,
            "<line x1=\"{gx:.1}\" y1=\"{top}\" x2=\"{gx:.1}\" y2=\"{:.1}\" stroke=\"#e0e0e0\"/>\
             <text x=\"{gx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            top + plot_h,
            top + plot_h + 16.0,
            count(10usize.pow(e.max(0) as u32))
        );
    }
    let step_decimals = if log_y || ticks.len() < 2 {
        None
    } else {
        Some(tick_decimals(ticks[1] - ticks[0]))
    };
    for v in ticks {
        let gy = y(v);
        let d = step_decimals.unwrap_or_else(|| tick_decimals(v));
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{gy:.1}\" x2=\"{:.1}\" y2=\"{gy:.1}\" stroke=\"#e0e0e0\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{v:.d$}</text>",
            left + plot_w,
            left - 6.0,
            gy + 4.0,
        );
    }
    let _ = writeln!(
        s,
        "<rect x=\"{left}\" y=\"{top}\" width=\"{plot_w}\" height=\"{plot_h}\" fill=\"none\" stroke=\"black\"/>\n\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">rules (log scale); points: median, bars: min–max over repetitions</text>\n\
         <text transform=\"translate(18 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}{}</text>",
        left + plot_w / 2.0,
        h - 10.0,
        top + plot_h / 2.0,
        escape(unit),
        if log_y { " (log scale)" } else { "" }
    );
    let legend_x = left + plot_w + 14.0;
    let mut legend_row = 0usize;
    if let Some(r) = reference {
        let ry = y(r);
        let ly = top + 10.0;
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{ry:.1}\" x2=\"{:.1}\" y2=\"{ry:.1}\" stroke=\"#7f7f7f\" stroke-width=\"1.5\" stroke-dasharray=\"6 4\"/>\
             <line x1=\"{legend_x}\" y1=\"{ly}\" x2=\"{:.1}\" y2=\"{ly}\" stroke=\"#7f7f7f\" stroke-width=\"3\" stroke-dasharray=\"6 4\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">no filter (paired)</text>",
            left + plot_w,
            legend_x + 22.0,
            legend_x + 28.0,
            ly + 4.0
        );
        legend_row += 1;
    }
    // Series side by side within a size (a few pixels apart), so error bars do not hide
    // each other.
    let k = series.len().max(1) as f64;
    for (i, (name, color, pts)) in series.iter().enumerate() {
        let dx = (i as f64 - (k - 1.0) / 2.0) * 4.0;
        let pts: Vec<&(usize, Stat)> = pts
            .iter()
            .filter(|(_, st)| st.median.is_finite() && (!log_y || st.min > 0.0))
            .collect();
        let line: Vec<String> = pts
            .iter()
            .map(|(n, st)| format!("{:.1},{:.1}", x(*n) + dx, y(st.median)))
            .collect();
        let dash = if *name == "none" {
            " stroke-dasharray=\"6 4\""
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"{dash} points=\"{}\"/>",
            line.join(" ")
        );
        for (n, st) in &pts {
            let cx = x(*n) + dx;
            if st.n > 1 {
                let (y0, y1) = (y(st.min), y(st.max));
                let _ = writeln!(
                    s,
                    "<line x1=\"{cx:.1}\" y1=\"{y0:.1}\" x2=\"{cx:.1}\" y2=\"{y1:.1}\" stroke=\"{color}\" stroke-width=\"1.5\"/>\
                     <line x1=\"{:.1}\" y1=\"{y0:.1}\" x2=\"{:.1}\" y2=\"{y0:.1}\" stroke=\"{color}\" stroke-width=\"1.5\"/>\
                     <line x1=\"{:.1}\" y1=\"{y1:.1}\" x2=\"{:.1}\" y2=\"{y1:.1}\" stroke=\"{color}\" stroke-width=\"1.5\"/>",
                    cx - 4.0,
                    cx + 4.0,
                    cx - 4.0,
                    cx + 4.0
                );
            }
            let _ = writeln!(
                s,
                "<circle cx=\"{cx:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{color}\"><title>{name} {n}: {:.4} ({:.4}–{:.4}, n={})</title></circle>",
                y(st.median),
                st.median,
                st.min,
                st.max,
                st.n
            );
        }
        let ly = top + 10.0 + 20.0 * legend_row as f64;
        legend_row += 1;
        let _ = writeln!(
            s,
            "<line x1=\"{legend_x}\" y1=\"{ly}\" x2=\"{:.1}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"3\"{dash}/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{name}</text>",
            legend_x + 22.0,
            legend_x + 28.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Text for SVG: the markup characters as entities.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
