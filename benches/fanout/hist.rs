//! Latency histogram and per-connection counters.
//!
//! Every receiving connection owns one [`ConnStats`]. Only that connection's reader task writes
//! to it, so the counters are bumped with a plain `load` + `store` pair (no locked
//! read-modify-write instruction, no cache-line ping-pong between threads); the orchestrator
//! only reads them. The orchestrator never resets anything: it takes a [`Summary`] before and
//! after a measurement window and subtracts.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};

/// Values below `2^EXACT_BITS` microseconds get one bucket each.
const EXACT_BITS: u32 = 7;
const EXACT: usize = 1 << EXACT_BITS;
/// Above that, every power of two is split into `2^SUB_BITS` buckets (about 1.6 % wide).
const SUB_BITS: u32 = 6;
const SUBS: usize = 1 << SUB_BITS;
/// Highest tracked power of two: 2^27 us is about 134 s; anything above lands in the last bucket.
const MAX_MSB: u32 = 27;
/// Number of buckets of a histogram.
pub(crate) const BUCKETS: usize = EXACT + (MAX_MSB - EXACT_BITS + 1) as usize * SUBS;

/// Log-linear bucket index of a latency in microseconds.
#[inline]
pub(crate) fn bucket_of(us: u64) -> usize {
    if us < EXACT as u64 {
        return us as usize;
    }
    let msb = 63 - us.leading_zeros();
    if msb > MAX_MSB {
        return BUCKETS - 1;
    }
    let sub = (us >> (msb - SUB_BITS)) as usize & (SUBS - 1);
    EXACT + (msb - EXACT_BITS) as usize * SUBS + sub
}

/// Largest latency (microseconds) that falls into bucket `i`; percentiles report this bound,
/// so they err on the pessimistic side by at most one bucket width.
pub(crate) fn bucket_upper_us(i: usize) -> u64 {
    if i < EXACT {
        return i as u64;
    }
    let k = i - EXACT;
    let msb = (k / SUBS) as u32 + EXACT_BITS;
    let sub = (k % SUBS) as u64;
    ((SUBS as u64 + sub + 1) << (msb - SUB_BITS)) - 1
}

/// Counters of one receiving connection (single writer: its reader task).
#[derive(Debug)]
pub(crate) struct ConnStats {
    hist: Box<[AtomicU32]>,
    /// Frames of the current measurement window (their send time is after the window start).
    delivered: AtomicU64,
    /// Frames sent before the current window started (late arrivals of an earlier step).
    stale: AtomicU64,
    /// Frames that are not text or carry no `"t":` stamp.
    bad: AtomicU64,
    /// Set when the reader ended (server closed the socket, reset, protocol error).
    closed: AtomicBool,
}

/// Single-writer increment: the only writer is the owning reader task, so a relaxed load
/// followed by a relaxed store cannot lose updates, and it compiles to plain moves.
#[inline]
fn bump64(a: &AtomicU64, n: u64) {
    a.store(a.load(Relaxed).wrapping_add(n), Relaxed);
}

impl ConnStats {
    pub(crate) fn new() -> Self {
        Self {
            hist: (0..BUCKETS).map(|_| AtomicU32::new(0)).collect(),
            delivered: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            bad: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        }
    }

    /// Records one in-window delivery with the given latency.
    #[inline]
    pub(crate) fn record(&self, latency_us: u64) {
        let b = &self.hist[bucket_of(latency_us)];
        b.store(b.load(Relaxed).wrapping_add(1), Relaxed);
        bump64(&self.delivered, 1);
    }

    #[inline]
    pub(crate) fn record_stale(&self) {
        bump64(&self.stale, 1);
    }

    #[inline]
    pub(crate) fn record_bad(&self) {
        bump64(&self.bad, 1);
    }

    pub(crate) fn mark_closed(&self) {
        self.closed.store(true, Relaxed);
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Relaxed)
    }

    /// In-window deliveries so far (cumulative; cheap enough to poll while draining).
    pub(crate) fn delivered(&self) -> u64 {
        self.delivered.load(Relaxed)
    }

    /// Every text frame received so far, in-window or not.
    pub(crate) fn received(&self) -> u64 {
        self.delivered.load(Relaxed) + self.stale.load(Relaxed) + self.bad.load(Relaxed)
    }
}

/// Sum of the counters of a set of connections at one instant (or a difference of two).
#[derive(Debug, Clone)]
pub(crate) struct Summary {
    hist: Vec<u64>,
    pub(crate) delivered: u64,
    pub(crate) stale: u64,
    pub(crate) bad: u64,
    /// Connections whose reader has ended (a level, not a counter: not subtracted by `since`).
    pub(crate) closed: u64,
}

impl Summary {
    pub(crate) fn collect<'a>(conns: impl IntoIterator<Item = &'a ConnStats>) -> Self {
        let mut s = Summary {
            hist: vec![0; BUCKETS],
            delivered: 0,
            stale: 0,
            bad: 0,
            closed: 0,
        };
        for c in conns {
            for (acc, b) in s.hist.iter_mut().zip(c.hist.iter()) {
                *acc += u64::from(b.load(Relaxed));
            }
            s.delivered += c.delivered.load(Relaxed);
            s.stale += c.stale.load(Relaxed);
            s.bad += c.bad.load(Relaxed);
            s.closed += u64::from(c.is_closed());
        }
        s
    }

    /// What happened between `before` and `self`.
    pub(crate) fn since(&self, before: &Summary) -> Summary {
        Summary {
            hist: self
                .hist
                .iter()
                .zip(&before.hist)
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
            delivered: self.delivered.saturating_sub(before.delivered),
            stale: self.stale.saturating_sub(before.stale),
            bad: self.bad.saturating_sub(before.bad),
            closed: self.closed,
        }
    }

    /// Compact JSON form, for a `c100k` child to hand its counters to the parent: the
    /// histogram as `[bucket, count]` pairs of its non-empty buckets.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        let hist: Vec<[u64; 2]> = self
            .hist
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| [i as u64, *n])
            .collect();
        serde_json::json!({
            "hist": hist, "delivered": self.delivered, "stale": self.stale, "bad": self.bad,
            "closed": self.closed,
        })
    }

    /// Inverse of [`Self::to_json`] (missing or malformed parts read as 0).
    pub(crate) fn from_json(v: &serde_json::Value) -> Self {
        let mut hist = vec![0; BUCKETS];
        for pair in v["hist"].as_array().into_iter().flatten() {
            if let (Some(i), Some(n)) = (pair[0].as_u64(), pair[1].as_u64())
                && let Some(slot) = hist.get_mut(i as usize)
            {
                *slot += n;
            }
        }
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        Summary {
            hist,
            delivered: n("delivered"),
            stale: n("stale"),
            bad: n("bad"),
            closed: n("closed"),
        }
    }

    /// Adds another set of connections (e.g. another process's).
    pub(crate) fn add(&mut self, other: &Summary) {
        for (a, b) in self.hist.iter_mut().zip(&other.hist) {
            *a += b;
        }
        self.delivered += other.delivered;
        self.stale += other.stale;
        self.bad += other.bad;
        self.closed += other.closed;
    }

    /// Latency quantile (`q` in 0..=1) in milliseconds; NaN when nothing was recorded.
    pub(crate) fn quantile_ms(&self, q: f64) -> f64 {
        let total: u64 = self.hist.iter().sum();
        if total == 0 {
            return f64::NAN;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, n) in self.hist.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return bucket_upper_us(i) as f64 / 1000.0;
            }
        }
        f64::NAN
    }

    /// Largest recorded latency (upper bound of its bucket) in milliseconds.
    pub(crate) fn max_ms(&self) -> f64 {
        self.hist
            .iter()
            .rposition(|n| *n > 0)
            .map_or(f64::NAN, |i| bucket_upper_us(i) as f64 / 1000.0)
    }
}
