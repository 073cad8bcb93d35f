//! The retry schedule: the waits between delivery attempts, each with jitter so that jobs
//! failed together (a receiver outage) do not all come back in the same second.

use std::time::Duration;

/// Jitter: a wait is stretched or shrunk by up to this fraction.
const JITTER: f64 = 0.2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    delays: Vec<Duration>,
}

impl Schedule {
    pub fn new(delays: Vec<Duration>) -> Schedule {
        Schedule { delays }
    }

    /// How many attempts a job gets before it is dead.
    pub fn attempts(&self) -> usize {
        self.delays.len() + 1
    }

    /// The wait after a job's `attempts`-th failed attempt, before the next; `None` when that
    /// was the last attempt. `unit` is a number in [0, 1) that picks the jitter.
    pub fn wait_after(&self, attempts: u32, unit: f64) -> Option<Duration> {
        let index = usize::try_from(attempts).ok()?.checked_sub(1)?;
        let base = *self.delays.get(index)?;
        let factor = 1.0 - JITTER + 2.0 * JITTER * unit.clamp(0.0, 1.0);
        Some(base.mul_f64(factor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_follow_the_schedule_then_stop() {
        let s = Schedule::new(vec![Duration::from_secs(60), Duration::from_secs(300)]);
        assert_eq!(s.attempts(), 3);
        assert_eq!(s.wait_after(1, 0.5), Some(Duration::from_secs(60)));
        assert_eq!(s.wait_after(2, 0.5), Some(Duration::from_secs(300)));
        assert_eq!(s.wait_after(3, 0.5), None, "the third attempt was the last");
        assert_eq!(s.wait_after(0, 0.5), None);
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let s = Schedule::new(vec![Duration::from_secs(100)]);
        assert_eq!(s.wait_after(1, 0.0), Some(Duration::from_secs(80)));
        assert_eq!(s.wait_after(1, 1.0), Some(Duration::from_secs(120)));
        assert_eq!(s.wait_after(1, 7.0), Some(Duration::from_secs(120)), "out-of-range units are clamped");
    }

    #[test]
    fn an_empty_schedule_means_one_attempt() {
        let s = Schedule::new(Vec::new());
        assert_eq!(s.attempts(), 1);
        assert_eq!(s.wait_after(1, 0.5), None);
    }
}
