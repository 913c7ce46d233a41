//! The composition root: one node's parts, wired together, and the lifetime of its tasks.
//!
//! A node is a [`Config`], its [`Lifecycle`] (sockets from attach to close), a [`Registry`],
//! [`Counters`], a [`Bus`] and its [`Durable`] rooms. This module builds them,
//! hands each background task the parts it needs (the subscriber and publisher of the bus, the
//! dispatcher, the heartbeat) and stops them all when the last handle is gone. Nothing below it
//! imports it back: the tasks hold the parts, never the node.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

use crate::bus::Inbox;
use crate::bus::{Backend, Bus};
use crate::config::Config;
use crate::dispatch::{self, Dispatcher};
use crate::durable::{self, Durable};
use crate::lifecycle::{Lifecycle, heartbeat};
use crate::membership::Rooms;
use crate::presence;
use crate::registry::Registry;
use crate::stats::{Counters, Stats};
use crate::users::{self, Users};

/// One node's parts, shared by the layer, every handle and socket, and the background tasks.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) config: Arc<Config>,
    /// The attached sockets, the connection limit, shutdown.
    pub(crate) lifecycle: Arc<Lifecycle>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) bus: Arc<Bus>,
    /// This node's presence members, synced to Redis by a task of the bus.
    pub(crate) presence: Arc<presence::Table>,
    pub(crate) durable: Arc<Durable>,
    /// The users feature's node half: expiring sockets, fleet commands.
    pub(crate) users: Arc<Users>,
    /// Joining and leaving rooms, for sockets' handlers and fleet commands alike.
    pub(crate) rooms: Rooms,
    /// The dispatcher's lag behind the publishers, in ms (`Stats::dispatch_lag_ms`).
    pub(crate) dispatch_lag_ms: Arc<AtomicU64>,
}

impl Node {
    pub(crate) fn stats(&self) -> Stats {
        let mut gauges = self.registry.gauges();
        gauges.connections = self.lifecycle.connections();
        gauges.dispatch_lag_ms =
            usize::try_from(self.dispatch_lag_ms.load(Ordering::Relaxed)).unwrap_or(usize::MAX);
        gauges.report(&self.config.node_id);
        self.counters.snapshot(gauges)
    }
}

/// What the layer, handles and sockets hold. Dropping the last one stops the background tasks:
/// they hold only the node's parts and watch `stop`, whose sender dies with this.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) node: Node,
    /// The dispatcher and the inbox that feeds it, until `start` hands them to their tasks.
    unstarted: Mutex<Option<(Inbox, Dispatcher)>>,
    stop: watch::Sender<()>,
    started: AtomicBool,
}

impl Shared {
    /// A node for `config`; `backend` is `None` when the layer was built leniently from an
    /// invalid URL (the node then never connects, and every join and broadcast says why).
    pub(crate) fn new(config: Config, backend: Option<Backend>) -> Arc<Self> {
        let config = Arc::new(config);
        let registry = Arc::new(Registry::default());
        let counters = Arc::new(Counters::default());
        let durable = Arc::new(Durable::new(
            config.clone(),
            registry.clone(),
            counters.clone(),
        ));
        let dispatch_lag_ms = Arc::new(AtomicU64::new(0));
        let users = Arc::new(Users::new(&config.node_id));
        let (inbox, dispatcher) = dispatch::channel(
            config.inbound_capacity.get(),
            config.clone(),
            registry.clone(),
            counters.clone(),
            durable.clone(),
            users.clone(),
            dispatch_lag_ms.clone(),
        );
        let bus = Arc::new(Bus::new(
            config.clone(),
            registry.clone(),
            counters.clone(),
            durable.clone(),
            Arc::new(durable::StoreScript),
            backend,
        ));
        let lifecycle = Arc::new(Lifecycle::new(config.max_connections.get()));
        let presence: Arc<presence::Table> = Arc::default();
        let rooms = Rooms {
            config: config.clone(),
            lifecycle: lifecycle.clone(),
            registry: registry.clone(),
            bus: bus.clone(),
            presence: presence.clone(),
            durable: durable.clone(),
        };
        let shared = Arc::new(Self {
            node: Node {
                config,
                lifecycle,
                registry,
                counters,
                bus,
                presence,
                durable,
                users,
                rooms,
                dispatch_lag_ms,
            },
            unstarted: Mutex::new(Some((inbox, dispatcher))),
            stop: watch::Sender::new(()),
            started: AtomicBool::new(false),
        });
        shared.start();
        shared
    }

    /// Starts the background tasks, once, as soon as a Tokio runtime is at hand. Called on
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
        let node = &self.node;
        if !node.config.ping_interval.is_zero() {
            runtime.spawn(heartbeat(
                node.lifecycle.clone(),
                node.counters.clone(),
                node.config.clone(),
                self.stop.subscribe(),
            ));
        }
        let unstarted = self
            .unstarted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        // `started` flips once, so this runs once and finds them here.
        if let Some((inbox, dispatcher)) = unstarted {
            runtime.spawn(dispatcher.run());
            node.bus.start(&runtime, inbox, &self.stop);
            durable::start(&node.durable, &node.bus, &runtime, &self.stop);
            presence::start(&node.bus, &runtime, node.presence.clone(), &self.stop);
            users::start(&node.users, node.rooms.clone(), &runtime, &self.stop);
        }
    }
}

/// A cheap, cloneable handle to this node's fan-out: broadcast to rooms, attach WebSockets,
/// ask for readiness and stats.
///
/// Extract it in any handler behind a [`FanoutLayer`](crate::FanoutLayer), or get one from
/// [`FanoutLayer::handle`](crate::FanoutLayer::handle) for code outside requests.
///
/// ```no_run
/// use axum::{Router, extract::Path, routing::post};
/// use axum_fanout::{FanoutLayer, Payload, RoomHandle};
///
/// async fn push(Path(room): Path<String>, rooms: RoomHandle, body: String) -> String {
///     let Ok(payload) = Payload::raw_json(body) else {
///         return "the body must be one JSON value\n".to_owned();
///     };
///     match rooms.broadcast(&room, payload).await {
///         Ok(nodes) => format!("delivered to {nodes} node(s)\n"),
///         Err(e) => format!("failed: {e}\n"),
///     }
/// }
///
/// let app: Router = Router::new()
///     .route("/rooms/{room}/messages", post(push))
///     .layer(FanoutLayer::new("redis://127.0.0.1:6379"));
/// ```
///
/// The type is declared beside the node it holds, so that a [`FanoutSocket`](crate::FanoutSocket)
/// can hand one out ([`FanoutSocket::handle`](crate::FanoutSocket::handle)); its methods and
/// its extractor are in `handle`.
#[derive(Clone)]
pub struct RoomHandle {
    pub(crate) shared: Arc<Shared>,
    /// Set by the layer on a request whose `Origin` is not allowed: an upgrade from it is
    /// answered 403 (see `origin`).
    pub(crate) foreign_origin: bool,
}
