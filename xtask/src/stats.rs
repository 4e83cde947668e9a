//! Small-sample statistics for the report: a mean over seeds with its sample standard
//! deviation and a 95% Student-t confidence interval. A handful of seeds is the usual
//! case, where the normal 1.96 would make intervals far too narrow.

/// Two-sided 95% Student-t quantiles t(0.975, df) for df = 1..=30, from the standard
/// tables (rounded to three decimals, as tables print them).
const T_975: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
    2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
    2.052, 2.048, 2.045, 2.042,
];

/// t(0.975, df); `None` for df = 0, where no interval exists.
///
/// Beyond the table, the Cornish-Fisher expansion of t around the normal quantile: at
/// df = 30 it gives 2.0423 against the table's 2.042, and it falls towards 1.960.
pub fn t_975(df: usize) -> Option<f64> {
    match df {
        0 => None,
        1..=30 => Some(T_975[df - 1]),
        _ => {
            let z = 1.959_963_984_540_054_f64;
            let v = df as f64;
            let (z3, z5, z7) = (z.powi(3), z.powi(5), z.powi(7));
            Some(
                z + (z3 + z) / (4.0 * v)
                    + (5.0 * z5 + 16.0 * z3 + 3.0 * z) / (96.0 * v * v)
                    + (3.0 * z7 + 19.0 * z5 + 17.0 * z3 - 15.0 * z) / (384.0 * v * v * v),
            )
        }
    }
}

/// Mean over seeds (or over paired seeds, for a difference) with its spread.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    pub n: usize,
    pub mean: f64,
    /// Sample (n − 1) standard deviation; `None` for n = 1, where it is undefined.
    pub std: Option<f64>,
    /// Half-width of the 95% Student-t interval, t(0.975, n − 1) · std / √n; `None`
    /// for n = 1.
    pub ci: Option<f64>,
}

impl Stat {
    /// `None` for no values: a mean of nothing is not a number worth printing.
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let n = values.len();
        let mean = values.iter().sum::<f64>() / n as f64;
        let std = (n >= 2).then(|| {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        });
        let ci = std.and_then(|s| t_975(n - 1).map(|t| t * s / (n as f64).sqrt()));
        Some(Self { n, mean, std, ci })
    }

    /// The interval's ends, when there is one.
    pub fn interval(&self) -> Option<(f64, f64)> {
        self.ci.map(|h| (self.mean - h, self.mean + h))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// 1, 2, 4: mean 7/3, squares about the mean 16/9 + 1/9 + 25/9 = 42/9, variance
    /// 42/18 = 7/3, std √(7/3); half-width 4.303 · √(7/3) / √3 = 4.303 · √7 / 3.
    #[test]
    fn three_values_by_hand() {
        let s = Stat::of(&[1.0, 2.0, 4.0]).unwrap();
        assert_eq!(s.n, 3);
        assert!((s.mean - 7.0 / 3.0).abs() < 1e-12);
        assert!((s.std.unwrap() - (7.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert!((s.ci.unwrap() - 4.303 * 7f64.sqrt() / 3.0).abs() < 1e-12);
        let (lo, hi) = s.interval().unwrap();
        assert!((hi - lo - 2.0 * s.ci.unwrap()).abs() < 1e-12);
    }

    /// Two values a, b: std |a − b| / √2, half-width 12.706 · |a − b| / 2.
    #[test]
    fn two_values_and_one() {
        let s = Stat::of(&[0.5, 0.7]).unwrap();
        assert!((s.ci.unwrap() - 12.706 * 0.1).abs() < 1e-12);
        let one = Stat::of(&[3.0]).unwrap();
        assert_eq!((one.n, one.mean, one.std, one.ci), (1, 3.0, None, None));
        assert!(Stat::of(&[]).is_none());
        let same = Stat::of(&[2.0, 2.0, 2.0]).unwrap();
        assert_eq!((same.std, same.ci), (Some(0.0), Some(0.0)));
    }

    #[test]
    fn t_quantiles() {
        assert_eq!(t_975(0), None);
        assert_eq!(t_975(1), Some(12.706));
        assert_eq!(t_975(2), Some(4.303));
        assert_eq!(t_975(4), Some(2.776));
        assert_eq!(t_975(30), Some(2.042));
        // The expansion joins the table without a jump and decreases towards 1.96.
        let t31 = t_975(31).unwrap();
        assert!((t31 - 2.040).abs() < 1e-3, "{t31}");
        assert!((t_975(60).unwrap() - 2.000).abs() < 1e-3);
        assert!((t_975(120).unwrap() - 1.980).abs() < 1e-3);
        assert!(t_975(10_000).unwrap() > 1.96 && t_975(10_000).unwrap() < 1.961);
    }
}
