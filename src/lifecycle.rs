//! The node's sockets from attach to close: who is attached, the connection limit (one
//! check-and-insert, on every attach path), the heartbeat that closes clients gone silent, and
//! shutdown with its drain.
//!
//! The registry knows rooms; this module knows connections. A socket is admitted here before
//! it exists (a [`Ticket`] taken at the upgrade request, so a full node answers 503 before any
//! upgrade), becomes attached when its connection is up, and is detached when its
//! `FanoutSocket` is dropped. Shutdown closes every attached socket and waits for the node to
//! go quiet.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::Message;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::close;
use crate::config::{Config, OverflowPolicy};
use crate::queue::Outbox;
use crate::registry::{Registry, SocketId};
use crate::stats::Counters;

/// Why a socket was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The node holds `max_connections` sockets (attached or being upgraded).
    Full,
    /// The node is shutting down.
    ShuttingDown,
}

#[derive(Debug, Default)]
struct Sockets {
    /// Every attached socket, joined to rooms or not: what the heartbeat pings and a shutdown
    /// closes.
    attached: HashMap<SocketId, Arc<Outbox>>,
    /// Tickets handed out and not yet attached or dropped: upgrades in flight count against
    /// the limit, so that the check and the insert are one step.
    reserved: usize,
    /// Set by a shutdown: no new sockets, no new joins.
    shutting_down: bool,
}

/// The node's sockets. Its lock guards [`Sockets`] alone and is never held with another.
#[derive(Debug)]
pub(crate) struct Lifecycle {
    sockets: Mutex<Sockets>,
    max: usize,
    next_socket: AtomicU64,
    /// Writer tasks still running: a shutdown waits for them to flush and send their close.
    writers: AtomicU64,
    /// Bumped when a writer ends, so a shutdown waiting for quiet looks again.
    writer_ended: watch::Sender<u64>,
}

/// A place for one socket, taken before its upgrade; dropping it unused gives the place back.
#[derive(Debug)]
pub(crate) struct Ticket(Option<Arc<Lifecycle>>);

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(lifecycle) = self.0.take() {
            lifecycle.lock().reserved -= 1;
        }
    }
}

/// Held by a running writer task; dropping it (however the task ends) tells a waiting shutdown.
#[derive(Debug)]
pub(crate) struct WriterGuard(Arc<Lifecycle>);

impl Drop for WriterGuard {
    fn drop(&mut self) {
        self.0.writers.fetch_sub(1, Ordering::AcqRel);
        self.0.writer_ended.send_modify(|n| *n += 1);
    }
}

impl Lifecycle {
    /// A node that holds at most `max` sockets.
    pub(crate) fn new(max: usize) -> Self {
        Self {
            sockets: Mutex::default(),
            max,
            next_socket: AtomicU64::new(1),
            writers: AtomicU64::new(0),
            writer_ended: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Sockets> {
        // Each critical section is a few field updates that leave `Sockets` consistent.
        self.sockets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a place for one socket: the connection limit's check and its insert in one step.
    pub(crate) fn reserve(self: &Arc<Self>) -> Result<Ticket, Refused> {
        let mut sockets = self.lock();
        if sockets.shutting_down {
            return Err(Refused::ShuttingDown);
        }
        if sockets.attached.len() + sockets.reserved >= self.max {
            return Err(Refused::Full);
        }
        sockets.reserved += 1;
        Ok(Ticket(Some(self.clone())))
    }

    /// A new socket id, unique for the node's lifetime.
    pub(crate) fn new_id(&self) -> SocketId {
        SocketId::from_wire(self.next_socket.fetch_add(1, Ordering::Relaxed))
    }

    /// Attaches socket `id` in the place `ticket` holds; `false` when the node began shutting
    /// down meanwhile (the socket is then not attached, and should be closed).
    pub(crate) fn attach(&self, mut ticket: Ticket, id: SocketId, outbox: Arc<Outbox>) -> bool {
        let mut sockets = self.lock();
        // The place moves from `reserved` to `attached` under one lock.
        ticket.0 = None;
        sockets.reserved -= 1;
        if sockets.shutting_down {
            return false;
        }
        sockets.attached.insert(id, outbox);
        true
    }

    /// Forgets a socket (after it left its rooms).
    pub(crate) fn detach(&self, socket: SocketId) {
        self.lock().attached.remove(&socket);
    }

    /// Sockets attached right now.
    pub(crate) fn connections(&self) -> usize {
        self.lock().attached.len()
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.lock().shutting_down
    }

    /// A writer task starts; a shutdown waits for it until the returned guard is dropped.
    pub(crate) fn writer_started(self: &Arc<Self>) -> WriterGuard {
        self.writers.fetch_add(1, Ordering::AcqRel);
        WriterGuard(self.clone())
    }

    /// The attached sockets of slice `slice` of `slices` (by id), for one heartbeat tick.
    fn attached_slice(&self, slice: u32, slices: u32) -> Vec<Arc<Outbox>> {
        let slices = u64::from(slices.max(1));
        self.lock()
            .attached
            .iter()
            .filter(|(id, _)| id.get() % slices == u64::from(slice))
            .map(|(_, outbox)| outbox.clone())
            .collect()
    }

    /// Stops new sockets and joins, and returns every attached socket, to be closed.
    pub(crate) fn begin_shutdown(&self) -> Vec<Arc<Outbox>> {
        let mut sockets = self.lock();
        sockets.shutting_down = true;
        sockets.attached.values().cloned().collect()
    }

    /// Waits until no socket is in any room, every UNSUBSCRIBE was confirmed and every writer
    /// has finished, or `deadline`. Returns whether that state was reached.
    pub(crate) async fn wait_quiet(&self, registry: &Registry, deadline: Instant) -> bool {
        let mut rooms = registry.watch_confirmed();
        let mut writers = self.writer_ended.subscribe();
        loop {
            if registry.is_quiet() && self.writers.load(Ordering::Acquire) == 0 {
                return true;
            }
            let changed = async {
                tokio::select! {
                    r = rooms.changed() => r.is_ok(),
                    w = writers.changed() => w.is_ok(),
                }
            };
            match tokio::time::timeout_at(deadline, changed).await {
                Ok(true) => {}
                Ok(false) | Err(_) => return false,
            }
        }
    }
}

/// Slices of a node's sockets the heartbeat pings one after the other, one per tick.
const HEARTBEAT_SLICES: u32 = 25;

/// Pings every socket each `ping_interval`, and closes (1001) those that sent nothing, not even
/// a pong, for `ping_interval + pong_timeout`: half-open TCP connections do not stay in rooms
/// forever. One task per node rather than a timer per socket keeps idle sockets cheap.
///
/// The sockets are pinged a slice at a time (by id, [`HEARTBEAT_SLICES`] ticks per interval,
/// a tick no shorter than 10 ms): each still once per interval, but as a steady trickle rather
/// than a burst of every socket's ping at once, which would hold up the deliveries queued
/// behind it.
pub(crate) async fn heartbeat(
    lifecycle: Arc<Lifecycle>,
    counters: Arc<Counters>,
    config: Arc<Config>,
    mut stop: watch::Receiver<()>,
) {
    let every = config.ping_interval.max(Duration::from_millis(10));
    let limit = every + config.pong_timeout;
    let slices = u32::try_from(every.as_millis() / 10)
        .unwrap_or(u32::MAX)
        .clamp(1, HEARTBEAT_SLICES);
    let tick = every / slices;
    let mut ticks = tokio::time::interval_at(Instant::now() + tick, tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut slice = 0;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => return,
        }
        for outbox in lifecycle.attached_slice(slice, slices) {
            let silent = outbox.silent_for();
            if silent > limit {
                counters.heartbeat_timeouts.add(1);
                tracing::debug!(
                    silent_ms = silent.as_millis() as u64,
                    age_ms = outbox.age().as_millis() as u64,
                    "no pong from a client in {limit:?}; closing it"
                );
                outbox.close_now(close::GOING_AWAY, close::NO_PONG_REASON);
            } else {
                // A ping that finds the queue full is dropped: that socket is already busy.
                outbox.offer(Message::Ping(Bytes::new()), OverflowPolicy::DropNewest);
            }
        }
        slice = (slice + 1) % slices;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::queue::testing::outbox;

    #[test]
    fn heartbeat_slices_cover_every_attached_socket_once() {
        let l = Arc::new(Lifecycle::new(100));
        let all: Vec<Arc<Outbox>> = (0..10).map(|_| outbox()).collect();
        for o in &all {
            let ticket = l.reserve().expect("room for it");
            assert!(l.attach(ticket, l.new_id(), o.clone()));
        }
        let mut seen: Vec<*const Outbox> = (0..3)
            .flat_map(|k| l.attached_slice(k, 3))
            .map(|o| Arc::as_ptr(&o))
            .collect();
        seen.sort();
        let mut want: Vec<*const Outbox> = all.iter().map(Arc::as_ptr).collect();
        want.sort();
        assert_eq!(seen, want);
        assert_eq!(l.attached_slice(0, 1).len(), 10);
    }

    #[test]
    fn the_limit_counts_upgrades_in_flight_and_a_dropped_ticket_gives_its_place_back() {
        let l = Arc::new(Lifecycle::new(2));
        let first = l.reserve().expect("1 of 2");
        let second = l.reserve().expect("2 of 2");
        assert_eq!(
            l.reserve().err(),
            Some(Refused::Full),
            "two upgrades in flight"
        );
        let id = l.new_id();
        assert!(l.attach(first, id, outbox()));
        assert_eq!(l.connections(), 1);
        assert_eq!(
            l.reserve().err(),
            Some(Refused::Full),
            "one attached, one in flight"
        );
        drop(second); // the upgrade failed
        let third = l.reserve().expect("the dropped ticket's place");
        assert_eq!(l.reserve().err(), Some(Refused::Full));
        l.detach(id);
        let _fourth = l.reserve().expect("the detached socket's place");
        drop(third);
    }

    #[test]
    fn a_shutdown_refuses_new_sockets_and_those_being_upgraded() {
        let l = Arc::new(Lifecycle::new(10));
        let ticket = l.reserve().expect("room");
        assert!(l.attach(l.reserve().expect("room"), l.new_id(), outbox()));
        assert_eq!(l.begin_shutdown().len(), 1);
        assert_eq!(l.reserve().err(), Some(Refused::ShuttingDown));
        assert!(
            !l.attach(ticket, l.new_id(), outbox()),
            "upgraded during the shutdown"
        );
        assert_eq!(l.connections(), 1);
    }
}
