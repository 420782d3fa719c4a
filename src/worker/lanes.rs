//! Which lane the worker takes its next message from: the high lane first, without starving the
//! normal lane. Pure; the session asks it for the order in which to look at the lanes each time
//! it has room for one more message, and tells it which lane the message came from.
//!
//! The rule, with `ratio` = N (`--high-lane-ratio`): while both lanes have waiting messages, the
//! worker takes N from the high lane, then one from the normal lane, and so on (at least one
//! normal message per N high ones, so a steady stream of high batches slows the normal lane down
//! to 1/(N+1) of the worker but never stops it). A lane that is empty does not hold the other
//! back: the order only says which lane is looked at first, and the other is taken when the first
//! has nothing.
use crate::queue::Lane;

/// The default of `--high-lane-ratio`.
pub const DEFAULT_RATIO: u32 = 4;

#[derive(Debug, Clone)]
pub struct LanePolicy {
    /// High messages taken in a row before the normal lane gets its turn (at least 1).
    ratio: u32,
    /// High messages taken since the last normal one.
    high_streak: u32,
}

impl LanePolicy {
    pub fn new(ratio: u32) -> Self {
        Self {
            ratio: ratio.max(1),
            high_streak: 0,
        }
    }

    /// The lanes in the order to look for the next message: the one whose turn it is first.
    pub fn order(&self) -> [Lane; 2] {
        if self.high_streak < self.ratio {
            [Lane::High, Lane::Normal]
        } else {
            [Lane::Normal, Lane::High]
        }
    }

    /// The lane to take from, given which lanes have a message waiting; `None` when neither has.
    pub fn choose(&self, high_waiting: bool, normal_waiting: bool) -> Option<Lane> {
        self.order().into_iter().find(|lane| match lane {
            Lane::High => high_waiting,
            Lane::Normal => normal_waiting,
        })
    }

    /// A message from `lane` was taken in (pulled, or delivered by a waiting consumer).
    pub fn taken(&mut self, lane: Lane) {
        match lane {
            Lane::High => self.high_streak = self.high_streak.saturating_add(1),
            Lane::Normal => self.high_streak = 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes `n` messages from lanes holding `high` and `normal` messages; the lanes taken from.
    fn run(policy: &mut LanePolicy, mut high: usize, mut normal: usize, n: usize) -> Vec<Lane> {
        let mut taken = Vec::new();
        for _ in 0..n {
            let Some(lane) = policy.choose(high > 0, normal > 0) else {
                break;
            };
            match lane {
                Lane::High => high -= 1,
                Lane::Normal => normal -= 1,
            }
            policy.taken(lane);
            taken.push(lane);
        }
        taken
    }

    fn letters(lanes: &[Lane]) -> String {
        lanes
            .iter()
            .map(|l| match l {
                Lane::High => 'H',
                Lane::Normal => 'n',
            })
            .collect()
    }

    #[test]
    fn high_first_then_one_normal_per_ratio() {
        let mut p = LanePolicy::new(4);
        assert_eq!(letters(&run(&mut p, 100, 100, 15)), "HHHHnHHHHnHHHHn");
        let mut p = LanePolicy::new(1);
        assert_eq!(letters(&run(&mut p, 100, 100, 6)), "HnHnHn");
    }

    #[test]
    fn the_normal_lane_is_never_starved() {
        // In every window of ratio + 1 messages taken while both lanes have work, at least one
        // is normal.
        for ratio in 1..=6 {
            let mut p = LanePolicy::new(ratio);
            let taken = run(&mut p, 1000, 1000, 500);
            let window = ratio as usize + 1;
            for w in taken.windows(window) {
                assert!(w.contains(&Lane::Normal), "ratio {ratio}: {}", letters(w));
            }
            let normal = taken.iter().filter(|l| **l == Lane::Normal).count();
            assert_eq!(normal, 500 / window, "ratio {ratio}");
        }
    }

    #[test]
    fn one_empty_lane_leaves_all_to_the_other() {
        let mut p = LanePolicy::new(2);
        assert_eq!(letters(&run(&mut p, 0, 5, 10)), "nnnnn");
        let mut p = LanePolicy::new(2);
        // The normal lane's turn comes, but it is empty: the high lane keeps the worker.
        assert_eq!(letters(&run(&mut p, 5, 0, 10)), "HHHHH");
        assert_eq!(p.choose(false, false), None);
        // Its turn is still due when a normal message shows up.
        assert_eq!(p.choose(true, true), Some(Lane::Normal));
    }

    #[test]
    fn a_drained_high_lane_hands_back_to_the_normal_one() {
        let mut p = LanePolicy::new(3);
        assert_eq!(letters(&run(&mut p, 2, 4, 10)), "HHnnnn");
    }

    #[test]
    fn a_ratio_of_zero_means_one() {
        let mut p = LanePolicy::new(0);
        assert_eq!(letters(&run(&mut p, 3, 3, 6)), "HnHnHn");
    }
}
