//! A row's samples and the numbers the table prints of them.

use std::time::Duration;

/// What a row's samples measure; decides how values print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Milliseconds (printed as ms or s).
    Millis,
    /// Mebibytes.
    MiB,
    /// Mebibytes per second.
    MiBps,
    /// A count (agent calls).
    Count,
}

/// Sample values in the row's unit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Samples(Vec<f64>);

impl Samples {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn from_values(values: impl IntoIterator<Item = f64>) -> Self {
        Self(values.into_iter().collect())
    }

    pub fn push(&mut self, v: f64) {
        self.0.push(v);
    }

    pub fn push_duration(&mut self, d: Duration) {
        self.0.push(d.as_secs_f64() * 1000.0);
    }

    pub fn n(&self) -> usize {
        self.0.len()
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    /// The middle value (mean of the two middle ones for an even count).
    pub fn median(&self) -> Option<f64> {
        let v = self.sorted();
        let n = v.len();
        match n {
            0 => None,
            _ if n % 2 == 1 => Some(v[n / 2]),
            _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
        }
    }

    /// Nearest-rank percentile: the smallest sample with at least `p` of them at or
    /// below it. With few samples the p90 is simply the worst but one or the worst.
    pub fn percentile(&self, p: f64) -> Option<f64> {
        let v = self.sorted();
        if v.is_empty() {
            return None;
        }
        let rank = (p * v.len() as f64).ceil().max(1.0) as usize;
        Some(v[rank.min(v.len()) - 1])
    }

    pub fn p90(&self) -> Option<f64> {
        self.percentile(0.9)
    }

    pub fn max(&self) -> Option<f64> {
        self.0.iter().copied().max_by(f64::total_cmp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_p90_follow_nearest_rank() {
        let s = Samples::from_values((1..=10).map(f64::from));
        assert_eq!(s.median(), Some(5.5));
        assert_eq!(s.p90(), Some(9.0));
        let s = Samples::from_values([3.0, 1.0, 2.0]);
        assert_eq!(s.median(), Some(2.0));
        assert_eq!(s.p90(), Some(3.0));
        let one = Samples::from_values([7.0]);
        assert_eq!((one.median(), one.p90()), (Some(7.0), Some(7.0)));
        assert_eq!(Samples::new().median(), None);
        assert_eq!(s.max(), Some(3.0));
        assert_eq!(Samples::new().max(), None);
    }

    #[test]
    fn durations_are_kept_in_milliseconds() {
        let mut s = Samples::new();
        s.push_duration(Duration::from_micros(2500));
        assert_eq!(s.median(), Some(2.5));
    }
}
