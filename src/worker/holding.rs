//! How much work the worker may hold unacknowledged, so that no delivery outlives the broker's
//! consumer timeout.
//!
//! RabbitMQ closes a channel whose delivery stays unacked longer than `consumer_timeout` (30 min
//! by default) and requeues everything the channel held, so every held message loses a delivery
//! and regenerates (now resumes) its work. A fixed prefetch cannot be right for both small and
//! large messages: the worker instead measures its speed (seconds per image-step-megapixel, from
//! its GPU batches) and asks for another message only while the work already in hand plus one
//! more message as large as the largest seen would still finish within a safety fraction of the
//! timeout. Pure arithmetic; the worker applies the result with `basic.qos`.
use std::time::Duration;

/// Weight of the newest measurement in the running speed estimate.
const EWMA_WEIGHT: f64 = 0.3;

#[derive(Debug, Clone)]
pub struct Holding {
    /// Time the work in hand may take: the safety fraction of the consumer timeout.
    budget_secs: f64,
    /// The configured prefetch: the most messages held at once, however fast the GPU.
    max_prefetch: u16,
    /// Seconds per unit of work, once measured.
    secs_per_unit: Option<f64>,
    /// The largest message (in units) seen so far: the size assumed for the next one.
    largest_message: f64,
}

impl Holding {
    pub fn new(consumer_timeout: Duration, safety_fraction: f64, max_prefetch: u16) -> Self {
        Self {
            budget_secs: consumer_timeout.as_secs_f64() * safety_fraction,
            max_prefetch: max_prefetch.max(1),
            secs_per_unit: None,
            largest_message: 0.0,
        }
    }

    /// A GPU batch of `units` work took `seconds`.
    pub fn record_batch(&mut self, units: f64, seconds: f64) {
        if !(units > 0.0 && seconds.is_finite() && seconds >= 0.0) {
            return;
        }
        let sample = seconds / units;
        self.secs_per_unit = Some(match self.secs_per_unit {
            None => sample,
            Some(old) => old + EWMA_WEIGHT * (sample - old),
        });
    }

    /// A message of `units` work arrived.
    pub fn observe_message(&mut self, units: f64) {
        if units.is_finite() {
            self.largest_message = self.largest_message.max(units);
        }
    }

    /// Estimated seconds to finish `units` of work, once the speed is known.
    pub fn seconds_for(&self, units: f64) -> Option<f64> {
        self.secs_per_unit.map(|s| s * units)
    }

    /// The prefetch to ask for while `in_hand` messages with `remaining_units` of work not yet
    /// generated are held. Never 0 (which RabbitMQ reads as "unlimited"); never above the
    /// configured prefetch. Until the speed is measured, one message at a time.
    pub fn prefetch(&self, in_hand: usize, remaining_units: f64) -> u16 {
        let held = u16::try_from(in_hand).unwrap_or(u16::MAX);
        // Messages already held stay held (a lower prefetch does not take them back); with none
        // held, one may always come.
        let base = held.max(1);
        let Some(speed) = self.secs_per_unit else {
            return base;
        };
        let room_secs = self.budget_secs - remaining_units.max(0.0) * speed;
        let next_secs = self.largest_message * speed;
        let more = if room_secs <= 0.0 {
            0
        } else if next_secs <= 0.0 {
            u16::MAX
        } else {
            // Saturating float-to-int conversion.
            (room_secs / next_secs).floor() as u16
        };
        held.saturating_add(more).min(self.max_prefetch).max(base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holding() -> Holding {
        // 100 s budget (timeout 125 s x 0.8), at most 8 messages.
        Holding::new(Duration::from_secs(125), 0.8, 8)
    }

    #[test]
    fn one_message_at_a_time_until_the_speed_is_known() {
        let h = holding();
        assert_eq!(h.prefetch(0, 0.0), 1);
        assert_eq!(h.prefetch(1, 50.0), 1);
        // Messages already held stay held (a lower qos does not take them back).
        assert_eq!(h.prefetch(3, 50.0), 3);
    }

    #[test]
    fn small_messages_batch_large_ones_are_not_hoarded() {
        let mut h = holding();
        h.record_batch(10.0, 10.0); // 1 s per unit
        h.observe_message(10.0); // messages of 10 s
        // Nothing in hand: 100 s of room = 10 messages, capped at 8.
        assert_eq!(h.prefetch(0, 0.0), 8);
        // 2 in hand with 60 s left: room for 4 more.
        assert_eq!(h.prefetch(2, 60.0), 6);
        // A 90 s message seen: the next one is assumed as large.
        h.observe_message(90.0);
        assert_eq!(h.prefetch(1, 5.0), 2);
        assert_eq!(h.prefetch(1, 20.0), 1);
        // Over budget already: no more, but never 0.
        assert_eq!(h.prefetch(0, 500.0), 1);
        assert_eq!(h.prefetch(2, 500.0), 2);
    }

    #[test]
    fn speed_is_a_running_estimate() {
        let mut h = holding();
        h.record_batch(10.0, 10.0);
        h.record_batch(10.0, 20.0);
        let s = h.seconds_for(1.0).unwrap();
        assert!((s - 1.3).abs() < 1e-9, "{s}");
        // Nonsense samples are ignored.
        h.record_batch(0.0, 5.0);
        h.record_batch(1.0, f64::NAN);
        assert_eq!(h.seconds_for(1.0), Some(s));
    }

    #[test]
    fn never_above_the_configured_prefetch_nor_zero() {
        let mut h = Holding::new(Duration::from_secs(3600), 0.8, 3);
        h.record_batch(1.0, 0.001);
        h.observe_message(1.0);
        assert_eq!(h.prefetch(0, 0.0), 3);
        assert_eq!(h.prefetch(5, 0.0), 5);
        let mut zero = Holding::new(Duration::ZERO, 0.8, 0);
        zero.record_batch(1.0, 1.0);
        assert_eq!(zero.prefetch(0, 0.0), 1);
    }
}
