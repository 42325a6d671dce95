//! Distributions of measured values: median, nearest-rank p90 and max, and
//! ratios between medians.

use serde::Serialize;

/// Distribution of one metric.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub median: f64,
    pub p90: f64,
    pub max: f64,
}

/// Median, p90 (nearest rank) and max of the finite values; `None` if none.
pub fn summarize(xs: &[f64]) -> Option<Summary> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Summary {
        n,
        min: v[0],
        median,
        p90: nearest_rank(&v, 90.0),
        max: v[n - 1],
    })
}

/// Nearest-rank percentile of a sorted, non-empty slice: always an observed value.
fn nearest_rank(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `a / b`, or `None` when either is missing or `b` is not positive.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => Some(a / b),
        _ => None,
    }
}

pub(super) fn median_of(xs: &[f64]) -> Option<f64> {
    summarize(xs).map(|s| s.median)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_odd_and_even_samples() {
        let s = summarize(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!(
            (s.n, s.min, s.median, s.p90, s.max),
            (3, 1.0, 3.0, 5.0, 5.0)
        );
        let s = summarize(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert_eq!(s.p90, 4.0);
        assert_eq!(summarize(&[7.5]).unwrap().p90, 7.5);
    }

    #[test]
    fn p90_is_nearest_rank() {
        let xs: Vec<f64> = (1..=10).map(f64::from).collect();
        let s = summarize(&xs).unwrap();
        assert_eq!(s.median, 5.5);
        assert_eq!(s.p90, 9.0);
        assert_eq!(s.max, 10.0);
        let xs: Vec<f64> = (1..=20).rev().map(f64::from).collect();
        assert_eq!(summarize(&xs).unwrap().p90, 18.0);
        let xs: Vec<f64> = (1..=11).map(f64::from).collect();
        // ceil(0.9 * 11) = 10
        assert_eq!(summarize(&xs).unwrap().p90, 10.0);
    }

    #[test]
    fn empty_and_non_finite_samples() {
        assert_eq!(summarize(&[]), None);
        assert_eq!(summarize(&[f64::NAN, f64::INFINITY]), None);
        let s = summarize(&[f64::NAN, 2.0]).unwrap();
        assert_eq!((s.n, s.median), (1, 2.0));
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio(Some(30.0), Some(10.0)), Some(3.0));
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(1.0)), None);
        assert_eq!(ratio(Some(1.0), None), None);
    }
}
