//! Wall-clock times as the seed's wire format writes them.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch: the envelope's `ts` and the loss notices' window. A
/// clock set before 1970 reads as 0 rather than failing.
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
