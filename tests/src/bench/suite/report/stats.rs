//! The statistics of the per-repetition values: median, and the spread of a mean with
//! its Student t confidence interval and the repetitions a ±3% interval would take.
/// The spread goal: a 95% confidence interval of the mean paired ratio within ±3% of it.
pub const GOAL: f64 = 0.03;

pub fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let m = values.len() / 2;
    if values.len() % 2 == 1 {
        values[m]
    } else {
        (values[m - 1] + values[m]) / 2.0
    }
}

/// Two-sided 95% Student t quantile for `df` degrees of freedom.
fn t95(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::NAN,
        d if d <= 30 => T[d - 1],
        _ => 1.96,
    }
}

/// Summary of one metric's per-repetition values.
#[derive(Clone, Copy)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
    pub mean: f64,
    /// Sample standard deviation (NaN below 2 values).
    pub sd: f64,
}

impl Stat {
    pub fn of(values: &[f64]) -> Option<Stat> {
        let v: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        let n = v.len();
        let mean = v.iter().sum::<f64>() / n as f64;
        let sd = if n > 1 {
            (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            f64::NAN
        };
        Some(Stat {
            median: median(v.clone()),
            min: v.iter().copied().fold(f64::INFINITY, f64::min),
            max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            n,
            mean,
            sd,
        })
    }

    /// Half-width of the 95% confidence interval of the mean, relative to the mean.
    pub fn ci_rel(&self) -> f64 {
        t95(self.n - 1) * self.sd / (self.n as f64).sqrt() / self.mean.abs()
    }

    /// Repetitions that would bring `ci_rel` under the goal at this spread (the sample
    /// standard deviation taken as the true one).
    pub fn reps_for_goal(&self) -> Option<usize> {
        let rel = self.sd / self.mean.abs();
        if !rel.is_finite() {
            return None;
        }
        (2..=500).find(|&n| t95(n - 1) * rel / (n as f64).sqrt() <= GOAL)
    }
}
