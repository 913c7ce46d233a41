//! One node's shared state and the lifetime of its background tasks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::ws::Message;

use tokio::sync::{mpsc, watch};

use crate::bus;
use crate::config::{Config, OverflowPolicy};
use crate::registry::Registry;
use crate::socket::GOING_AWAY_CODE;
use crate::stats::{Counters, Stats};

/// State shared by the layer, every handle and socket, and the background tasks.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) config: Config,
    pub(crate) registry: Registry,
    pub(crate) counters: Counters,
    /// The subscriber link is up and every local room is subscribed on it.
    pub(crate) ready: AtomicBool,
    /// The publisher connection when there is one; broadcasts wait (bounded) for `Some`.
    pub(crate) publisher: watch::Sender<Option<crate::backend::Conn>>,
    /// Broadcasts on their way to the publisher task (bounded: see `bus::PUBLISH_QUEUE`).
    pub(crate) outgoing: mpsc::Sender<bus::Outgoing>,
    /// This node's private channel for link probes, outside the room prefix so that
    /// `PUBSUB CHANNELS <prefix>*` lists rooms only.
    pub(crate) probe_channel: String,
    /// Messages dropped before dispatch, per room: (first, last, count). Written by the push
    /// callback, drained by the dispatcher, which tells the rooms' members.
    shed: Mutex<HashMap<String, (SystemTime, SystemTime, u64)>>,
}

impl Node {
    pub(crate) fn note_shed(&self, room: &str) {
        let now = SystemTime::now();
        let mut shed = self.shed.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = shed.entry(room.to_owned()).or_insert((now, now, 0));
        entry.1 = now;
        entry.2 += 1;
    }

    pub(crate) fn take_shed(&self) -> HashMap<String, (SystemTime, SystemTime, u64)> {
        let mut shed = self.shed.lock().unwrap_or_else(PoisonError::into_inner);
        if shed.is_empty() {
            return HashMap::new();
        }
        std::mem::take(&mut *shed)
    }

    pub(crate) fn stats(&self) -> Stats {
        let (rooms, memberships, subscriptions, connections) = self.registry.counts();
        self.counters
            .snapshot(rooms, connections, memberships, subscriptions)
    }
}

/// What the layer, handles and sockets hold. Dropping the last one stops the background tasks
/// (they hold only the [`Node`] and watch `stop`).
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) node: Arc<Node>,
    /// The publisher task's end of `Node::outgoing`, until `start` hands it over.
    outgoing: Mutex<Option<mpsc::Receiver<bus::Outgoing>>>,
    stop: watch::Sender<()>,
    started: AtomicBool,
}

impl Shared {
    pub(crate) fn new(config: Config) -> Arc<Self> {
        let (outgoing, outgoing_rx) = mpsc::channel(bus::PUBLISH_QUEUE);
        let shared = Arc::new(Self {
            outgoing: Mutex::new(Some(outgoing_rx)),
            node: Arc::new(Node {
                registry: Registry::default(),
                counters: Counters::default(),
                ready: AtomicBool::new(false),
                publisher: watch::Sender::new(None),
                outgoing,
                probe_channel: format!("__axum_fanout:probe:{}", config.node_id),
                shed: Mutex::new(HashMap::new()),
                config,
            }),
            stop: watch::Sender::new(()),
            started: AtomicBool::new(false),
        });
        shared.start();
        shared
    }

    /// Starts the Redis tasks, once, as soon as a Tokio runtime is at hand. Called on
    /// construction and on every request, so a layer built outside a runtime starts with the
    /// first request it sees.
    pub(crate) fn start(&self) {
        if self.started.load(Ordering::Acquire) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        if !self.node.config.ping_interval.is_zero() {
            runtime.spawn(heartbeat(self.node.clone(), self.stop.subscribe()));
        }
        let Some(client) = self.node.config.redis.clone() else {
            // Invalid URL: already logged by the builder; there is nothing to connect to.
            return;
        };
        runtime.spawn(bus::run_subscriber(
            self.node.clone(),
            client.clone(),
            self.stop.subscribe(),
        ));
        let Some(outgoing) = self
            .outgoing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return; // `started` is set once, so this runs once: the receiver is still here
        };
        runtime.spawn(bus::run_publisher(
            self.node.clone(),
            client,
            outgoing,
            self.stop.subscribe(),
        ));
    }
}

/// Pings every socket each `ping_interval`, and closes (1001) those that sent nothing, not even
/// a pong, for `ping_interval + pong_timeout`: half-open TCP connections do not stay in rooms
/// forever. One task per node rather than a timer per socket keeps idle sockets cheap.
async fn heartbeat(node: Arc<Node>, mut stop: watch::Receiver<()>) {
    let every = node.config.ping_interval.max(Duration::from_millis(10));
    let limit = every + node.config.pong_timeout;
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => return,
        }
        for outbox in node.registry.attached() {
            if outbox.silent_for() > limit {
                node.counters.heartbeat_timeouts.add(1);
                tracing::debug!("no pong from a client in {limit:?}; closing it");
                outbox.close_now(GOING_AWAY_CODE, "no pong received");
            } else {
                // A ping that finds the queue full is dropped: that socket is already busy.
                outbox.offer(Message::Ping(Bytes::new()), OverflowPolicy::DropNewest);
            }
        }
    }
}
