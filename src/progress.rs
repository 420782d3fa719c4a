//! When a batch in progress reports it (`batch.progress`), and what it says: a pure throttle
//! and the arithmetic of the ETA. The worker's session calls it as images are stored and does
//! the publishing.
//!
//! A batch reports at most once per [`Throttle::interval`] and at most once per GPU batch (a GPU
//! batch that stores several of its images is one step forward, not several), never for its last
//! image: `batch.completed` says that.
use std::time::{Duration, Instant};

/// Default minimum time between two progress reports of one batch.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

/// The per-batch throttle.
#[derive(Debug, Clone)]
pub struct Throttle {
    interval: Duration,
    last_emit: Option<Instant>,
    last_gpu_batch: Option<u64>,
}

impl Throttle {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last_emit: None,
            last_gpu_batch: None,
        }
    }

    /// Whether a report was made (so a progress object may exist).
    pub fn reported(&self) -> bool {
        self.last_emit.is_some()
    }

    /// An image of GPU batch `gpu_batch` was stored at `now`, making `done` of `total`: whether
    /// to report (and if so, the report is counted as made).
    pub fn should_emit(&mut self, now: Instant, gpu_batch: u64, done: usize, total: usize) -> bool {
        if done >= total || self.last_gpu_batch == Some(gpu_batch) {
            return false;
        }
        if let Some(last) = self.last_emit
            && now.saturating_duration_since(last) < self.interval
        {
            return false;
        }
        self.last_emit = Some(now);
        self.last_gpu_batch = Some(gpu_batch);
        true
    }
}

/// Images per second and the seconds left, from the images made since the batch was taken
/// (`done - resumed` in `elapsed`; images an earlier delivery stored cost nothing now). `None`
/// before the first image or when no time has passed.
pub fn rate_and_eta(
    done: usize,
    resumed: usize,
    total: usize,
    elapsed: Duration,
) -> Option<(f64, f64)> {
    let made = done.saturating_sub(resumed);
    let secs = elapsed.as_secs_f64();
    if made == 0 || secs <= 0.0 {
        return None;
    }
    let rate = made as f64 / secs;
    Some((rate, total.saturating_sub(done) as f64 / rate))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_once_per_interval_and_per_gpu_batch_never_for_the_last_image() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut th = Throttle::new(Duration::from_secs(5));
        assert!(th.should_emit(s(0), 1, 1, 10));
        // The same GPU batch's other images: no.
        assert!(!th.should_emit(s(10), 1, 2, 10));
        // Another GPU batch within the interval: no; after it: yes.
        assert!(!th.should_emit(s(3), 2, 3, 10));
        assert!(th.should_emit(s(6), 2, 4, 10));
        // The last image: never (the completion event says it).
        assert!(!th.should_emit(s(60), 3, 10, 10));
        // Interval zero: once per GPU batch.
        let mut th = Throttle::new(Duration::ZERO);
        assert!(th.should_emit(s(0), 7, 1, 3));
        assert!(!th.should_emit(s(0), 7, 2, 3));
        assert!(th.should_emit(s(0), 8, 2, 3));
    }

    #[test]
    fn eta_from_the_images_made_in_this_delivery() {
        assert_eq!(rate_and_eta(0, 0, 10, Duration::from_secs(5)), None);
        assert_eq!(rate_and_eta(4, 4, 10, Duration::from_secs(5)), None);
        assert_eq!(rate_and_eta(3, 0, 10, Duration::ZERO), None);
        // 2 made (4 done, 2 resumed) in 4 s: 0.5/s, 6 left: 12 s.
        assert_eq!(
            rate_and_eta(4, 2, 10, Duration::from_secs(4)),
            Some((0.5, 12.0))
        );
    }
}
