//! The publish path: broadcasts queue up, one task writes them to Redis as pipelines on the
//! publisher connection (`pipeline`), and each caller gets its own reply.

use std::sync::Arc;

use redis::{PushInfo, PushKind};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio::time::{Instant, timeout_at};

use super::backend::Backend;
use super::backoff::Backoff;
use super::receipt::{Published, Receipt};
use super::{Bus, Guard, Terms, pause_or};
use crate::channel;
use crate::config::Durability;
use crate::error::Error;
use crate::queue::Outbox;
use crate::room::RoomName;

/// Broadcasts waiting for the publisher, at most. A caller that finds the queue full waits
/// (within its publish timeout) rather than growing it: memory stays bounded while Redis is
/// slow or down.
pub(super) const QUEUE: usize = 1024;

/// One broadcast on its way to Redis.
#[derive(Debug)]
pub(super) struct Outgoing {
    pub(super) room: RoomName,
    pub(super) channel: String,
    pub(super) envelope: Vec<u8>,
    /// The caller stops waiting then; a request still queued at its deadline is not sent, so
    /// a caller told "timed out" never sees its message published later.
    pub(super) deadline: Instant,
    pub(super) reply: oneshot::Sender<Result<Published, Error>>,
    pub(super) origin: Option<Origin>,
    /// A durable room's message: stored and published by the history script.
    pub(super) durable: Option<Durability>,
    /// Published at most once: see `guard`.
    pub(super) guard: Option<Box<Guard>>,
    /// The caller awaits the reply (`Broadcast`'s `.await`): if it stops waiting before the
    /// broadcast was sent, it is not sent. A queued broadcast (`Broadcast::queue`) is sent
    /// whether or not its receipt is still held.
    pub(super) abandonable: bool,
}

/// The socket a broadcast was queued from (`FanoutSocket::broadcast`).
#[derive(Debug)]
pub(super) struct Origin {
    /// Told of a failure when nobody awaits the receipt any more.
    outbox: Arc<Outbox>,
    /// One of the socket's in-flight slots, held until Redis replied (or the request expired)
    /// and freed by its drop.
    _slot: OwnedSemaphorePermit,
}

impl Bus {
    /// Queues one envelope for `room`'s channel (the one of `sender` in a sharded room), on
    /// `terms` (stored, at most once), and returns once it is queued: from then on its place in the order is fixed, and the
    /// returned [`Receipt`] resolves to PUBLISH's reply.
    ///
    /// # Cancel safety
    /// Not cancel safe in the sense that matters: dropped after it returned nothing is undone
    /// (the broadcast goes out); dropped before, the broadcast may or may not be queued.
    pub(crate) async fn enqueue(
        self: &Arc<Self>,
        room: RoomName,
        sender: u64,
        envelope: Vec<u8>,
        origin: Option<(Arc<Outbox>, Arc<Semaphore>)>,
        terms: Terms,
        abandonable: bool,
    ) -> Result<Receipt, Error> {
        let Terms { durable, guard } = terms;
        let cfg = &self.config;
        if self.backend.is_none() {
            return Err(Error::no_redis());
        }
        let max = cfg.max_envelope_bytes.get();
        // A durable envelope gets its position added by the script.
        let len = envelope.len()
            + if durable.is_some() {
                self.store.added_bytes()
            } else {
                0
            };
        if len > max {
            self.counters.publish_errors.add(1);
            return Err(Error::envelope_too_large(len, max));
        }
        let deadline = Instant::now() + cfg.publish_timeout;
        let origin = match origin {
            None => None,
            Some((outbox, slots)) => match timeout_at(deadline, slots.acquire_owned()).await {
                Ok(Ok(slot)) => Some(Origin {
                    outbox,
                    _slot: slot,
                }),
                // The socket's semaphore is never closed; its broadcasts all took too long.
                Ok(Err(_)) | Err(_) => return Err(self.failed_early(&room, self.timed_out())),
            },
        };
        let (reply, replied) = oneshot::channel();
        let request = Outgoing {
            channel: channel::for_sender(cfg, &room, sender),
            room: room.clone(),
            envelope,
            deadline,
            reply,
            origin,
            durable,
            guard,
            abandonable,
        };
        match timeout_at(deadline, self.outgoing.send(request)).await {
            Ok(Ok(())) => {}
            // The publisher task is gone: the node is stopping.
            Ok(Err(_)) => return Err(self.failed_early(&room, Error::closed())),
            Err(_) => return Err(self.failed_early(&room, self.timed_out())),
        }
        let bus = self.clone();
        Ok(Receipt(Box::pin(async move {
            match timeout_at(deadline, replied).await {
                Ok(Ok(result)) => result,
                // Dropped unsent: its deadline passed while it was queued (counted there).
                Ok(Err(_)) | Err(_) => Err(bus.timed_out()),
            }
        })))
    }

    /// The error of a broadcast that ran out of time: no connection, or no reply.
    fn timed_out(&self) -> Error {
        let connected = self.publisher.borrow().is_some();
        let command = self
            .backend
            .as_ref()
            .map_or("PUBLISH", Backend::publish_command);
        Error::publish_timeout(connected, command)
    }

    /// Counts and logs a broadcast that failed before it was queued.
    fn failed_early(&self, room: &RoomName, error: Error) -> Error {
        self.counters.publish_errors.add(1);
        log_failure(room, &error);
        error
    }
}

fn log_failure(room: &RoomName, error: &Error) {
    tracing::warn!(
        room = %room,
        error = %error,
        cause = ?std::error::Error::source(error).map(ToString::to_string),
        "broadcast failed"
    );
}

impl Outgoing {
    /// Replies to the caller and counts the outcome. A failure whose receipt is gone goes to
    /// the socket it was queued from, if any, so that it is never lost silently.
    pub(super) fn finish(self, result: Result<Published, Error>, bus: &Bus) {
        match &result {
            Ok(_) => bus.counters.published.add(1),
            Err(e) => {
                bus.counters.publish_errors.add(1);
                log_failure(&self.room, e);
            }
        }
        if let Err(Err(error)) = self.reply.send(result)
            && let Some(origin) = self.origin
        {
            origin.outbox.record_failed_broadcast(self.room, error);
        }
    }

    /// The request's deadline passed before it could be sent: it never will be.
    pub(super) fn expire(self, bus: &Bus) {
        let error = bus.timed_out();
        self.finish(Err(error), bus);
    }
}

/// Keeps the publisher connection up (`pipeline::send_loop` sends the queued broadcasts over
/// it).
pub(super) async fn run(bus: Arc<Bus>, backend: Backend, mut stop: watch::Receiver<()>) {
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
        if !pause_or(backoff.next(), &mut stop, &bus.reachable).await {
            return;
        }
    }
}
