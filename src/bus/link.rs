//! What tells the subscriber link alive or lost: the probe that checks it end to end, the
//! clock check that tells the node itself was paused, and why a link is given up.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use redis::RedisError;
use tokio::sync::Notify;
use tokio::time::{Instant, timeout_at};

use super::backend::Conn;

/// Why the link was dropped (or could not be set up); logged, then the link is replaced.
#[derive(Debug)]
pub(super) enum LinkLoss {
    Connect(RedisError),
    Closed,
    Command {
        command: &'static str,
        error: RedisError,
    },
    NotConfirmed(&'static str),
    /// PUBLISH on a probe channel found no subscriber: the connection lost its subscriptions.
    ProbeUnheard(String),
    ProbeFailed(RedisError),
    ProbeUnanswered,
    /// The probe was published but never came back: the link is stale.
    ProbeLate,
}

impl fmt::Display for LinkLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkLoss::Connect(e) => write!(f, "cannot connect: {e}"),
            LinkLoss::Closed => f.write_str("connection closed"),
            LinkLoss::Command { command, error } => write!(f, "{command} failed: {error}"),
            LinkLoss::NotConfirmed(command) => write!(f, "{command} not confirmed in time"),
            LinkLoss::ProbeUnheard(channel) => write!(
                f,
                "probe channel {channel} has no subscriber: the connection lost its subscriptions"
            ),
            LinkLoss::ProbeFailed(e) => write!(f, "probe PUBLISH failed: {e}"),
            LinkLoss::ProbeUnanswered => f.write_str("redis did not answer the probe in time"),
            LinkLoss::ProbeLate => f.write_str("probe was not received back in time: stale link"),
        }
    }
}

/// Turns a command's outcome under a deadline into the link's verdict.
pub(super) fn confirmed(
    outcome: Result<Result<(), RedisError>, tokio::time::error::Elapsed>,
    command: &'static str,
) -> Result<(), LinkLoss> {
    match outcome {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(LinkLoss::Command { command, error }),
        Err(_) => Err(LinkLoss::NotConfirmed(command)),
    }
}

/// Per-link signals from the connection's push callback to the link task.
#[derive(Debug, Default)]
pub(super) struct LinkSignals {
    /// The connection closed.
    pub(super) lost: Notify,
    /// A probe came back: `probe_echoes` counts the echoes of the token in `probe_token`
    /// (one per probe channel; a cluster has one per master).
    pub(super) probe_echo: Notify,
    pub(super) probe_token: AtomicU64,
    pub(super) probe_echoes: AtomicUsize,
}

/// Whether `channel` is one of this node's probe channels: `base` itself (one server), or
/// `base:<n>` (one per master of a cluster).
pub(super) fn is_probe(base: &str, channel: &[u8]) -> bool {
    channel
        .strip_prefix(base.as_bytes())
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(b":"))
}

/// How often the link task looks at the clock, and how late a timer must fire for the node to
/// count as paused (stopped, frozen, starved of CPU): then every timer that fired meanwhile
/// is late, and what the link did meanwhile is unknown until a probe comes back.
pub(super) const PAUSE_CHECK: Duration = Duration::from_millis(250);
pub(super) const PAUSE: Duration = Duration::from_secs(1);

/// A probe on its way: when it was published, and when its echo is due.
#[derive(Debug)]
pub(super) struct Probe {
    pub(super) sent: SystemTime,
    pub(super) deadline: Instant,
}

/// PUBLISHes `token` on this very connection, on every probe channel (a cluster has one per
/// master): each echo proves that the connection still receives what is published there, not
/// merely that TCP is up.
pub(super) async fn send_probe(
    wait: Duration,
    conn: &mut Conn,
    probes: &[String],
    signals: &LinkSignals,
    token: u64,
) -> Result<Probe, LinkLoss> {
    // Armed before publishing, so no echo can arrive uncounted.
    signals.probe_echoes.store(0, Ordering::Release);
    signals.probe_token.store(token, Ordering::Release);
    let sent = SystemTime::now();
    let deadline = Instant::now() + wait;
    for probe in probes {
        match timeout_at(deadline, conn.publish(probe, token)).await {
            Ok(Ok(n)) if n >= 1 => {}
            Ok(Ok(_)) => return Err(LinkLoss::ProbeUnheard(probe.clone())),
            Ok(Err(e)) => return Err(LinkLoss::ProbeFailed(e)),
            Err(_) => return Err(LinkLoss::ProbeUnanswered),
        }
    }
    Ok(Probe { sent, deadline })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_channels_are_told_apart_from_rooms() {
        assert!(is_probe(
            "__axum_fanout:probe:n1",
            b"__axum_fanout:probe:n1"
        ));
        assert!(is_probe(
            "__axum_fanout:probe:n1",
            b"__axum_fanout:probe:n1:2"
        ));
        assert!(!is_probe(
            "__axum_fanout:probe:n1",
            b"__axum_fanout:probe:n12"
        ));
        assert!(!is_probe("__axum_fanout:probe:n1", b"ws:room:n1"));
    }
}
