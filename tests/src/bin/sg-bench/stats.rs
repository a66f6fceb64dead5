//! Repeats, their summaries, and ratios taken round by round.
//!
//! A ratio is computed within each round (candidate and baseline measured back to back, so a
//! busy moment of the shared machine lands on both), then summarised like any other figure.

use serde::Serialize;

#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Summary {
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub n: usize,
}

impl Summary {
    pub fn of(v: &[f64]) -> Self {
        let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        if s.is_empty() {
            return Self {
                min: f64::NAN,
                median: f64::NAN,
                max: f64::NAN,
                n: 0,
            };
        }
        s.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        Self {
            min: s[0],
            median,
            max: s[n - 1],
            n,
        }
    }

    /// `median (min–max)` with `f` formatting each number.
    pub fn show(&self, f: impl Fn(f64) -> String) -> String {
        if self.n == 0 {
            return "–".into();
        }
        if self.n == 1 || self.min == self.max {
            return f(self.median);
        }
        format!("{} ({}–{})", f(self.median), f(self.min), f(self.max))
    }
}

/// Element-wise `a[i] / b[i]`.
pub fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

pub fn ratio(a: &[f64], b: &[f64]) -> Summary {
    Summary::of(&ratios(a, b))
}

/// Formatting helpers.
pub fn ns(x: f64) -> String {
    format!("{x:.0}")
}

pub fn times(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}×")
    } else if x >= 10.0 {
        format!("{x:.1}×")
    } else {
        format!("{x:.2}×")
    }
}

pub fn pct(x: f64) -> String {
    format!("{:.0}%", x * 100.0)
}

pub fn kpps(x: f64) -> String {
    if x >= 100_000.0 {
        format!("{:.0}k", x / 1000.0)
    } else {
        format!("{:.1}k", x / 1000.0)
    }
}

pub fn gbps(x: f64) -> String {
    format!("{:.2}", x / 1e9)
}

/// Milliseconds from seconds.
pub fn ms(x: f64) -> String {
    let m = x * 1e3;
    if m >= 100.0 {
        format!("{m:.0}")
    } else if m >= 10.0 {
        format!("{m:.1}")
    } else {
        format!("{m:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries() {
        let s = Summary::of(&[3.0, 1.0, 2.0, 10.0]);
        assert_eq!((s.min, s.median, s.max, s.n), (1.0, 2.5, 10.0, 4));
        assert_eq!(Summary::of(&[2.0]).show(ns), "2");
        assert_eq!(ratio(&[2.0, 6.0], &[1.0, 2.0]).median, 2.5);
    }
}
