//! The Redis side of a node: one publisher connection, one shared subscriber connection, and
//! everything that keeps them up. This folder is the only place that speaks Redis.
//!
//! - `backend`: the seam to Redis. Hides whether the deployment is one server or a Redis
//!   Cluster (or a master found through Sentinel): connect, publish, subscribe, unsubscribe.
//! - `client`: builds the Redis clients from the builder's settings (URL, RESP3, TCP, TLS,
//!   cluster) and redacts passwords from URLs for logs.
//! - `sentinel`: the `redis+sentinel://` URL; finding the master through the sentinels, and
//!   leaving a server once it is no longer the master.
//! - `slots`: Redis Cluster hash slots, and commands split by slot.
//! - `publisher`: broadcasts queue here; `pipeline`: they go out as pipelines on the
//!   publisher connection.
//! - `subscriber`: the subscriber link. Reconciles subscriptions with the registry, probes the
//!   link end to end, and hands every received message to the inbox.
//! - `inbox`: the bounded hop from the subscriber connection to the dispatcher.
//! - `link`: what tells the subscriber link alive or lost: the probe, the pause check.
//! - `backoff`: jittered pauses between reconnect attempts.
//! - `script`: the one way to run a Lua script (by SHA1, loaded again on NOSCRIPT), reply
//!   parsers and room key names, for every feature that keeps state in Redis.
//! - `runs`: the rules of a pipeline of script calls: groups per channel, which refused calls
//!   may go again.
//! - `guard`: publishing at most once ([`Guard`]): a plain room's guarded messages, each
//!   published only if its key does not say it was already, and recorded there in the same
//!   script call.
//!
//! The bus knows no feature. What it asks of one is two small traits the feature implements:
//! [`Repairs`] (rooms that read their gaps back after a loss rather than tell them) and
//! [`Store`] (a script that stores and publishes a group of a room's messages, honouring their
//! guards).
//!
//! Both connections are RESP3 multiplexed connections that this module reconnects itself,
//! forever. The client library's own memory of subscriptions is not relied on: after every
//! reconnect the registry marks every local room pending and the subscriber sends them again,
//! in batches.

mod backend;
mod backoff;
mod client;
mod guard;
mod inbox;
mod link;
mod pipeline;
mod publisher;
mod receipt;
mod runs;
pub(crate) mod script;
mod sentinel;
mod server;
mod slots;
mod subscriber;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

pub(crate) use backend::{Backend, Conn};
pub(crate) use backoff::Backoff;
pub(crate) use client::redacted_target;
pub(crate) use guard::Guard;
pub(crate) use inbox::{Delivered, Inbox, Outlet, Received, Shed, hop};
pub use receipt::{Published, Receipt};

use redis::{Cmd, Value};

use crate::config::{Config, Durability};
use crate::error::Error;
use crate::registry::Registry;
use crate::room::RoomName;
use crate::stats::Counters;
use publisher::Outgoing;
use script::Script;

/// What the bus asks of rooms that read their gaps back from a history after a loss, rather
/// than tell their sockets (durable rooms).
pub(crate) trait Repairs: Send + Sync + std::fmt::Debug {
    /// Whether `room`'s gaps are read back rather than told.
    fn repairs(&self, room: &str) -> bool;
    /// `rooms` are subscribed again after a loss: their gaps may be read back now, and
    /// whatever the read misses arrives live.
    fn resubscribed(&self, rooms: &[RoomName]);
}

/// Messages of one room for one [`Store`] call: stored and published on `channel`, in order.
#[derive(Debug)]
pub(crate) struct Group<'a> {
    pub(crate) channel: &'a str,
    /// The epoch the room starts if it has none (new, or its history was lost). One per
    /// pipeline is enough: within one, a room's history is created at most once.
    pub(crate) epoch: &'a str,
    /// The room's durability; `None` for a plain room's guarded messages.
    pub(crate) settings: Option<&'a Durability>,
    pub(crate) envelopes: Vec<&'a [u8]>,
    /// Each message's [`Guard`], in the messages' order; empty when none has one (most
    /// groups: nothing is allocated for them).
    pub(crate) guards: Vec<Option<&'a Guard>>,
}

/// How a message is to be published, besides its room: stored with a [`Durability`], made at
/// most once with a [`Guard`], both, or neither (a plain PUBLISH).
#[derive(Debug, Default)]
pub(crate) struct Terms {
    pub(crate) durable: Option<Durability>,
    /// Boxed: most messages have none, and every queued message carries the field.
    pub(crate) guard: Option<Box<Guard>>,
}

/// How the publisher stores a run of messages that have a [`Durability`]: one call of a
/// script per [`Group`], which stores and publishes them in one atomic step.
///
/// A message with a [`Guard`] is stored and published only if its key holds no outcome yet
/// (nor does an earlier message of the same call have the same key); its outcome (`+E:S`) is
/// written to the key in the same step. One that is not is answered with an error, and takes
/// no position.
pub(crate) trait Store: Send + Sync + std::fmt::Debug {
    /// The script the calls run, loaded again when Redis forgot it.
    fn script(&self) -> &Script;
    /// Bytes a call adds to an envelope (its position), counted against the size limit.
    fn added_bytes(&self) -> usize;
    /// Most messages in one call.
    fn group_max(&self) -> usize;
    /// The call (`EVALSHA`) for `group`, publishing with `publish_command`.
    fn call(&self, publish_command: &str, group: &Group<'_>) -> Cmd;
    /// The reply to a call of `n` messages, per message: the number of nodes subscribed and
    /// its position, or why it was not stored.
    fn replies(&self, reply: &Value, n: usize) -> Vec<Result<Published, Error>>;
}

/// A node's link to Redis: what the handles publish through, and the state of the subscriber.
#[derive(Debug)]
pub(crate) struct Bus {
    config: Arc<Config>,
    registry: Arc<Registry>,
    counters: Arc<Counters>,
    /// Rooms that read their gaps back after a link loss (durable rooms).
    repairs: Arc<dyn Repairs>,
    /// How messages with a durability are stored and published.
    store: Arc<dyn Store>,
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
        repairs: Arc<dyn Repairs>,
        store: Arc<dyn Store>,
        backend: Option<Backend>,
    ) -> Self {
        let (outgoing, outgoing_rx) = mpsc::channel(publisher::QUEUE);
        Self {
            probe_channel: format!("__axum_fanout:probe:{}", config.node_id),
            config,
            registry,
            counters,
            repairs,
            store,
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

    /// The node's settings.
    pub(crate) fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// Whether the node runs on a Redis Cluster (`None`: no Redis at all).
    pub(crate) fn is_cluster(&self) -> Option<bool> {
        self.backend
            .as_ref()
            .map(|b| b.publish_command() != "PUBLISH")
    }

    /// The publisher connection whenever there is one (`None` while it reconnects): features
    /// run their scripts on it.
    pub(crate) fn connections(&self) -> watch::Receiver<Option<Conn>> {
        self.publisher.subscribe()
    }

    /// The publisher connection, waiting for one until `deadline`.
    pub(crate) async fn connection(&self, deadline: tokio::time::Instant) -> Result<Conn, Error> {
        let mut conns = self.publisher.subscribe();
        match tokio::time::timeout_at(deadline, conns.wait_for(Option::is_some)).await {
            Ok(Ok(conn)) => conn.clone().ok_or_else(Error::closed),
            Ok(Err(_)) => Err(Error::closed()),
            Err(_) => Err(Error::publish_timeout(false, "EVALSHA")),
        }
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
        runtime.spawn(publisher::run(self.clone(), backend, stop.subscribe()));
        runtime.spawn(pipeline::send_loop(
            self.clone(),
            outgoing,
            stop.subscribe(),
        ));
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
pub(crate) async fn pause(d: Duration, stop: &mut watch::Receiver<()>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = stop.changed() => false,
    }
}
