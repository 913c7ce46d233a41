//! The Redis side of a node: one publisher connection, one shared subscriber connection, and
//! everything that keeps them up. This folder is the only place that speaks Redis.
//!
//! - `backend`: the seam to Redis. Hides whether the deployment is one server or a Redis
//!   Cluster: connect, publish, subscribe, unsubscribe.
//! - `client`: builds the Redis clients from the builder's settings (URL, RESP3, TCP, TLS,
//!   cluster) and redacts passwords from URLs for logs.
//! - `slots`: Redis Cluster hash slots, and commands split by slot.
//! - `publisher`: broadcasts queue here and go out as pipelines on the publisher connection.
//! - `subscriber`: the subscriber link. Reconciles subscriptions with the registry, probes the
//!   link end to end, and hands every received message to the dispatcher's inbox.
//! - `backoff`: jittered pauses between reconnect attempts.
//! - `presence`: presence in Redis: keys, Lua scripts (`presence::scripts`), the member query
//!   (`presence::queries`), the per-node lease and its task (`presence::leases`), syncing the
//!   node's presence table (`presence::sync`) and reaping the members of dead nodes
//!   (`presence::reaper`).
//! - `store`: the atomic store-and-publish script of durable rooms, one call per group of a
//!   room's messages, and the NOSCRIPT retry rule.
//! - `history`: durable rooms' keys, history reads, the epoch fork, and the task that reads
//!   back the gaps of durable rooms.
//!
//! Both connections are RESP3 multiplexed connections that this module reconnects itself,
//! forever. The client library's own memory of subscriptions is not relied on: after every
//! reconnect the registry marks every local room pending and the subscriber sends them again,
//! in batches.

mod backend;
mod backoff;
mod client;
mod history;
mod presence;
mod publisher;
mod receipt;
mod script;
mod slots;
mod store;
mod subscriber;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

pub(crate) use backend::Backend;
pub(crate) use client::redacted_target;
pub(crate) use history::Read;
pub use receipt::{Published, Receipt};

use crate::config::Config;
use crate::dispatch::Inbox;
use crate::durable::Durable;
use crate::registry::Registry;
use crate::stats::Counters;
use backend::Conn;
use publisher::Outgoing;

/// A node's link to Redis: what the handles publish through, and the state of the subscriber.
#[derive(Debug)]
pub(crate) struct Bus {
    config: Arc<Config>,
    registry: Arc<Registry>,
    counters: Arc<Counters>,
    /// Durable rooms: the subscriber asks it to repair after a link loss; the history task
    /// hands it what it read.
    durable: Arc<Durable>,
    /// Turns for history reads (`history::READS` at once).
    reads: tokio::sync::Semaphore,
    /// `None` when the layer was built leniently from an invalid URL: the node never connects.
    backend: Option<Backend>,
    /// The subscriber link is up and every local room is subscribed on it.
    ready: AtomicBool,
    /// The publisher connection when there is one; broadcasts wait (bounded) for `Some`.
    publisher: watch::Sender<Option<Conn>>,
    /// Broadcasts on their way to the publisher task (bounded: see `publisher::QUEUE`).
    outgoing: mpsc::Sender<Outgoing>,
    /// The publisher task's end of `outgoing`, until [`Bus::start`] hands it over.
    outgoing_rx: Mutex<Option<mpsc::Receiver<Outgoing>>>,
    /// Told by the subscriber each time it reached Redis: the publisher, if it is pausing
    /// between reconnect attempts, tries again at once (the two pause on independent,
    /// jittered schedules, and a node reported ready must be able to publish).
    reachable: tokio::sync::Notify,
    /// This node's private channel for link probes, outside the room prefix so that
    /// `PUBSUB CHANNELS <prefix>*` lists rooms only.
    probe_channel: String,
}

impl Bus {
    pub(crate) fn new(
        config: Arc<Config>,
        registry: Arc<Registry>,
        counters: Arc<Counters>,
        durable: Arc<Durable>,
        backend: Option<Backend>,
    ) -> Self {
        let (outgoing, outgoing_rx) = mpsc::channel(publisher::QUEUE);
        Self {
            probe_channel: format!("__axum_fanout:probe:{}", config.node_id),
            config,
            registry,
            counters,
            durable,
            reads: tokio::sync::Semaphore::new(history::READS),
            backend,
            ready: AtomicBool::new(false),
            reachable: tokio::sync::Notify::new(),
            publisher: watch::Sender::new(None),
            outgoing,
            outgoing_rx: Mutex::new(Some(outgoing_rx)),
        }
    }

    /// Whether the node has a Redis to connect to (a lenient layer with a bad URL has none).
    pub(crate) fn is_configured(&self) -> bool {
        self.backend.is_some()
    }

    /// Whether the subscriber link is up and every local room is subscribed on it.
    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Spawns the publisher and subscriber tasks; they end when `stop` changes or is dropped.
    /// Call once: a second call finds nothing left to start.
    pub(crate) fn start(
        self: &Arc<Self>,
        runtime: &tokio::runtime::Handle,
        inbox: Inbox,
        stop: &watch::Sender<()>,
    ) {
        let Some(backend) = self.backend.clone() else {
            // Invalid URL: already logged by the builder; there is nothing to connect to.
            return;
        };
        let Some(outgoing) = self
            .outgoing_rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return;
        };
        runtime.spawn(subscriber::run(
            self.clone(),
            backend.clone(),
            inbox,
            stop.subscribe(),
        ));
        runtime.spawn(publisher::run(
            self.clone(),
            backend,
            outgoing,
            stop.subscribe(),
        ));
        if let Some(repairs) = self.durable.take_repairs() {
            runtime.spawn(history::repair_loop(
                self.clone(),
                repairs,
                stop.subscribe(),
            ));
        }
    }
}

/// Sleeps for `d`, or less when `early` is notified; returns `false` if the node is stopping.
async fn pause_or(
    d: Duration,
    stop: &mut watch::Receiver<()>,
    early: &tokio::sync::Notify,
) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = early.notified() => true,
        _ = stop.changed() => false,
    }
}

/// Sleeps for `d`; returns `false` if the node is stopping.
async fn pause(d: Duration, stop: &mut watch::Receiver<()>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = stop.changed() => false,
    }
}
