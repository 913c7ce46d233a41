//! The publish path: broadcasts queue up, one task writes them to Redis as pipelines on the
//! publisher connection, and each caller gets its own reply.

use std::sync::Arc;

use redis::{PushInfo, PushKind};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::{Instant, timeout_at};

use super::backend::Backend;
use super::backoff::Backoff;
use super::{Bus, pause};
use crate::channel;
use crate::error::Error;
use crate::room::RoomName;

/// Broadcasts waiting for the publisher, at most. A caller that finds the queue full waits
/// (within its publish timeout) rather than growing it: memory stays bounded while Redis is
/// slow or down.
pub(super) const QUEUE: usize = 1024;

/// Most PUBLISH commands written to Redis at once, as one pipeline.
const BATCH: usize = 256;

/// One broadcast on its way to Redis.
#[derive(Debug)]
pub(super) struct Outgoing {
    channel: String,
    envelope: Vec<u8>,
    /// The caller stops waiting then; a request still queued at its deadline is not sent, so
    /// a caller told "timed out" never sees its message published later.
    deadline: Instant,
    reply: oneshot::Sender<Result<usize, Error>>,
}

impl Bus {
    /// Publishes one envelope to `room`'s channel for `sender`; returns the number of nodes
    /// subscribed to it (PUBLISH's reply).
    pub(crate) async fn publish(
        &self,
        room: &RoomName,
        sender: u64,
        envelope: Vec<u8>,
    ) -> Result<usize, Error> {
        let cfg = &self.config;
        let Some(backend) = &self.backend else {
            return Err(Error::no_redis());
        };
        let max = cfg.max_envelope_bytes.get();
        if envelope.len() > max {
            self.counters.publish_errors.add(1);
            return Err(Error::envelope_too_large(envelope.len(), max));
        }
        let deadline = Instant::now() + cfg.publish_timeout;
        let (reply, replied) = oneshot::channel();
        let request = Outgoing {
            channel: channel::for_sender(cfg, room, sender),
            envelope,
            deadline,
            reply,
        };
        let timed_out = || {
            let connected = self.publisher.borrow().is_some();
            Error::publish_timeout(connected, backend.publish_command())
        };
        let result = match timeout_at(deadline, self.outgoing.send(request)).await {
            Ok(Ok(())) => match timeout_at(deadline, replied).await {
                Ok(Ok(result)) => result,
                // Dropped unsent: its deadline passed while it was queued.
                Ok(Err(_)) | Err(_) => Err(timed_out()),
            },
            // The publisher task is gone: the node is stopping.
            Ok(Err(_)) => Err(Error::closed()),
            Err(_) => Err(timed_out()),
        };
        match &result {
            Ok(_) => self.counters.published.add(1),
            Err(e) => {
                self.counters.publish_errors.add(1);
                tracing::warn!(
                    room = %room,
                    error = %e,
                    cause = ?std::error::Error::source(e).map(ToString::to_string),
                    "broadcast failed"
                );
            }
        }
        result
    }
}

/// Keeps the publisher connection up, and sends the queued broadcasts over it.
pub(super) async fn run(
    bus: Arc<Bus>,
    backend: Backend,
    outgoing: mpsc::Receiver<Outgoing>,
    mut stop: watch::Receiver<()>,
) {
    tokio::spawn(send_loop(bus.clone(), outgoing, stop.clone()));
    let cfg = &bus.config;
    let mut backoff = Backoff::new(cfg.backoff_min, cfg.backoff_max);
    loop {
        let lost = Arc::new(Notify::new());
        let on_push = {
            let lost = lost.clone();
            move |info: PushInfo| {
                if info.kind == PushKind::Disconnection {
                    lost.notify_one();
                }
                Ok(())
            }
        };
        match backend.connect(cfg.publish_timeout, on_push).await {
            Ok(conn) => {
                tracing::debug!(node = %cfg.node_id, "publisher connected");
                bus.publisher.send_replace(Some(conn));
                backoff.reset();
                tokio::select! {
                    _ = lost.notified() => {
                        bus.publisher.send_replace(None);
                        tracing::warn!(node = %cfg.node_id, "publisher connection lost; reconnecting");
                    }
                    _ = stop.changed() => {
                        bus.publisher.send_replace(None);
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(node = %cfg.node_id, error = %e, "publisher cannot connect to redis; retrying");
            }
        }
        if !pause(backoff.next(), &mut stop).await {
            return;
        }
    }
}

/// Writes queued broadcasts to Redis: everything queued (up to [`BATCH`]) goes out as one
/// pipeline, so under load many PUBLISH commands share one write on our side and one read and
/// one wake-up on Redis's.
///
/// Why: redis-rs writes every command of a multiplexed connection with its own `writev`, and
/// on loopback each one also pays for Redis's receive path and wake-up: 12 % of a node's CPU
/// in a profile at a million deliveries per second (BENCHMARKS.md).
///
/// A lone broadcast goes out at once; the only wait is one `yield_now`, so that broadcasts
/// made ready by the same wake-up join the batch. One pipeline is in flight at a time, so a
/// connection's commands keep their order.
async fn send_loop(
    bus: Arc<Bus>,
    mut outgoing: mpsc::Receiver<Outgoing>,
    mut stop: watch::Receiver<()>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut conns = bus.publisher.subscribe();
    loop {
        let received = tokio::select! {
            n = outgoing.recv_many(&mut batch, BATCH) => n,
            _ = stop.changed() => return,
        };
        if received == 0 {
            return; // every sender (the bus) is gone
        }
        // Let the tasks that are ready to run (other sockets whose frames arrived in the same
        // wake-up) queue their broadcasts too: one yield, microseconds, and the batch then
        // holds what arrived together instead of only the first of it.
        tokio::task::yield_now().await;
        while batch.len() < BATCH {
            match outgoing.try_recv() {
                Ok(o) => batch.push(o),
                Err(_) => break,
            }
        }
        let now = Instant::now();
        batch.retain(|o: &Outgoing| o.deadline > now && !o.reply.is_closed());
        let Some(deadline) = batch.iter().map(|o| o.deadline).max() else {
            continue;
        };
        // The connection as it is now (a reconnect replaces it), waiting for one while Redis
        // is down; the callers give up at their own deadlines.
        let conn = tokio::select! {
            conn = timeout_at(deadline, conns.wait_for(Option::is_some)) => match conn {
                Ok(Ok(conn)) => conn.clone(),
                Ok(Err(_)) => return, // the bus is gone
                Err(_) => None,
            },
            _ = stop.changed() => return,
        };
        let Some(mut conn) = conn else {
            batch.clear();
            continue;
        };
        let now = Instant::now();
        batch.retain(|o: &Outgoing| o.deadline > now);
        let commands: Vec<(&str, &[u8])> = batch
            .iter()
            .map(|o| (o.channel.as_str(), o.envelope.as_slice()))
            .collect();
        match timeout_at(deadline, conn.publish_many(&commands)).await {
            Ok(Ok(counts)) => {
                for (o, n) in batch.drain(..).zip(counts) {
                    let _ = o.reply.send(Ok(n));
                }
            }
            Ok(Err(e)) => {
                let e = Arc::new(e);
                for o in batch.drain(..) {
                    let _ = o.reply.send(Err(Error::redis(SharedCause(e.clone()))));
                }
            }
            // Each caller has given up by now (its deadline is at most this one).
            Err(_) => {}
        }
        // Dropping a reply unsent tells its caller the broadcast timed out.
        batch.clear();
    }
}

/// One Redis error reported to every caller of a failed pipeline.
#[derive(Debug)]
struct SharedCause(Arc<redis::RedisError>);

impl std::fmt::Display for SharedCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SharedCause {}
