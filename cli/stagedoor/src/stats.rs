//! Latency figures of a load run: throughput and percentiles from every call's own timing.

use std::time::Duration;

/// Timings of one scenario's calls.
pub struct Summary {
    pub name: String,
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
    pub errors: usize,
}

impl Summary {
    /// Successful calls per second over the whole run.
    pub fn throughput(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    /// The `q` quantile (0..=1) of the successful calls' latencies (nearest rank).
    pub fn quantile(&self, q: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1]
    }

    /// One line for people (and BENCHMARKS.md).
    pub fn line(&self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        format!(
            "{:<14} {:>8} ok {:>6} err {:>8.2} s {:>10.0} /s   p50 {:>7.2} ms   p99 {:>7.2} ms   max {:>7.2} ms",
            self.name,
            self.latencies.len(),
            self.errors,
            self.elapsed.as_secs_f64(),
            self.throughput(),
            ms(self.quantile(0.50)),
            ms(self.quantile(0.99)),
            ms(self.quantile(1.0)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        let summary = Summary {
            name: "t".into(),
            elapsed: Duration::from_secs(2),
            latencies: (1..=100).map(Duration::from_millis).collect(),
            errors: 0,
        };
        assert_eq!(summary.quantile(0.5), Duration::from_millis(50));
        assert_eq!(summary.quantile(0.99), Duration::from_millis(99));
        assert_eq!(summary.quantile(1.0), Duration::from_millis(100));
        assert_eq!(summary.throughput(), 50.0);
    }
}
