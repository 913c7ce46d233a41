//! Pauses between reconnect attempts: capped exponential backoff with full jitter.
//!
//! Why jitter: after a Redis restart every node of a fleet sees its connections drop at the
//! same instant. With a fixed schedule (50 ms, 100 ms, ... 2 s) they would all reconnect and
//! resubscribe every room in the same millisecond, attempt after attempt. "Full jitter" (each
//! pause uniform between zero and the exponential ceiling) spreads them over the whole window
//! while keeping the expected time to notice a returned Redis at half the ceiling.

use std::time::Duration;

use crate::random;

#[derive(Debug)]
pub(crate) struct Backoff {
    base: Duration,
    cap: Duration,
    /// The upper bound of the next pause: `base`, doubling up to `cap`.
    ceiling: Duration,
    /// xorshift64* state; never zero.
    rng: u64,
}

impl Backoff {
    pub(crate) fn new(base: Duration, cap: Duration) -> Self {
        // Seeded per instance, so two nodes (or two connections of one node) never share a
        // schedule.
        Self {
            base,
            cap: cap.max(base),
            ceiling: base,
            rng: random::u64() | 1,
        }
    }

    /// The link is up again: the next outage starts from `base`.
    pub(crate) fn reset(&mut self) {
        self.ceiling = self.base;
    }

    /// The next pause: uniform in `[0, ceiling]`, then the ceiling doubles up to the cap.
    pub(crate) fn next(&mut self) -> Duration {
        let ceiling = self.ceiling;
        self.ceiling = (self.ceiling * 2).min(self.cap);
        let micros = u64::try_from(ceiling.as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(self.random() % micros.saturating_add(1))
    }

    fn random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_millis(50);
    const CAP: Duration = Duration::from_millis(2000);

    #[test]
    fn pauses_stay_under_a_doubling_ceiling_capped_at_two_seconds_and_reset() {
        let mut b = Backoff::new(BASE, CAP);
        let ceilings = [50, 100, 200, 400, 800, 1600, 2000, 2000, 2000];
        for ms in ceilings {
            let pause = b.next();
            assert!(pause <= Duration::from_millis(ms), "{pause:?} > {ms} ms");
        }
        b.reset();
        assert!(b.next() <= BASE);
    }

    /// A fleet of 200 nodes that lost Redis at the same instant: their reconnect attempts must
    /// spread over the window instead of landing together.
    #[test]
    fn a_fleet_reconnects_spread_out_not_in_lockstep() {
        let nodes = 200;
        let mut fleet: Vec<Backoff> = (0..nodes).map(|_| Backoff::new(BASE, CAP)).collect();
        // Skip to the capped part of the schedule (a long outage).
        for b in &mut fleet {
            for _ in 0..6 {
                b.next();
            }
        }
        let pauses: Vec<u128> = fleet.iter_mut().map(|b| b.next().as_millis()).collect();
        assert!(pauses.iter().all(|&p| p <= 2000));
        // Spread: the pauses fill 20 buckets of 100 ms each fairly evenly (uniform would put 10
        // in each) and no single millisecond holds more than a few nodes.
        let mut buckets = [0u32; 21];
        for &p in &pauses {
            buckets[(p / 100) as usize] += 1;
        }
        let filled = buckets[..20].iter().filter(|&&n| n > 0).count();
        assert!(filled >= 18, "{buckets:?}");
        assert!(buckets.iter().all(|&n| n <= 30), "{buckets:?}");
        let mut sorted = pauses.clone();
        sorted.sort_unstable();
        let same_ms = sorted.windows(5).filter(|w| w[0] == w[4]).count();
        assert_eq!(same_ms, 0, "five nodes retried in the same millisecond");
        let mean = pauses.iter().sum::<u128>() / nodes;
        assert!((700..=1300).contains(&mean), "mean {mean} ms");
    }
}
