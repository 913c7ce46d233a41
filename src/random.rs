//! Random numbers without a dependency, for ids that must differ between processes and calls
//! (node ids, epochs, backoff seeds), not for secrets.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// A random `u64`: std's `RandomState` is seeded from the OS once per process and varied per
/// instance; a call counter, the pid and the time keep two calls, or two processes started at
/// the same instant, apart.
pub(crate) fn u64() -> u64 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(CALLS.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// 16 random hex digits: a node id, an epoch.
pub(crate) fn hex_id() -> String {
    format!("{:016x}", u64())
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_differ_and_have_16_digits() {
        assert_ne!(super::hex_id(), super::hex_id());
        assert_eq!(super::hex_id().len(), 16);
    }
}
