//! Durable rooms' settings (see `durable`): history length, idle TTL, replay limit.

use std::num::NonZeroUsize;
use std::time::Duration;

use super::nz;

/// The settings of a durable room: how much history Redis keeps, for how long, and how far
/// back a resume may reach. See the README's "Durable rooms".
///
/// ```
/// use std::num::NonZeroUsize;
/// use std::time::Duration;
/// use axum_fanout::FanoutLayer;
/// use axum_fanout::durable::Durability;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let layer = FanoutLayer::builder("redis://127.0.0.1:6379")
///     .durable_room("support", Durability::default().history(NonZeroUsize::try_from(1000)?))
///     .durable_room("alerts", Durability::default().ttl(Duration::from_secs(3600)))
///     .build()?;
/// # let _ = layer; Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durability {
    pub(crate) history: NonZeroUsize,
    pub(crate) ttl: Duration,
    pub(crate) replay_limit: NonZeroUsize,
}

impl Default for Durability {
    fn default() -> Self {
        Self {
            history: nz(256),
            ttl: Duration::from_secs(600),
            replay_limit: nz(1000),
        }
    }
}

impl Durability {
    /// Messages kept per room: at least this many of the latest (Redis trims approximately,
    /// so a few more may stay). Each holds one envelope, at most `max_envelope_bytes`.
    ///
    /// Defaults to 256: a chat room's recent past.
    pub fn history(mut self, messages: NonZeroUsize) -> Self {
        self.history = messages;
        self
    }

    /// How long a room's history is kept after its last message; an idle room's history then
    /// expires, and its next message starts a new epoch.
    ///
    /// Defaults to 10 minutes: long enough for a reconnect after a deploy or a network blip.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(Duration::from_millis(1));
        self
    }

    /// Most messages one resume replays (and one history read returns). A socket further
    /// behind is told it cannot be recovered (`too_far_behind`) and nothing is replayed; this
    /// also bounds what a resuming socket holds while its replay is read.
    ///
    /// Defaults to 1,000.
    pub fn replay_limit(mut self, messages: NonZeroUsize) -> Self {
        self.replay_limit = messages;
        self
    }
}
