//! The [`RoomHandle`] extractor, what handlers use to reach the node, and its rejection.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};

use crate::broadcast::Broadcast;
use crate::config::Durability;
use crate::durable::History;
use crate::durable::Read;
use crate::envelope::Payload;
use crate::error::Error;
use crate::lifecycle::Refused;
use crate::listener::FanoutListener;
use crate::node::{RoomHandle, Shared};
use crate::position::Position;
use crate::presence::{Count, Snapshot};
use crate::queue::Outbox;
use crate::room::RoomName;
use crate::socket::FanoutSocket;
use crate::stats::Stats;
use crate::writer::going_away;

mod users;

impl fmt::Debug for RoomHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoomHandle")
            .field("node_id", &self.node_id())
            .field("ready", &self.is_ready())
            .finish()
    }
}

/// Closes `sockets` (1001, come back) spread evenly over `window`: the i-th of n at
/// `i / n * window`, so their clients reconnect elsewhere as a stream, not all at once.
async fn drain(sockets: &[Arc<Outbox>], window: std::time::Duration) {
    let start = tokio::time::Instant::now();
    let n = sockets.len() as u32;
    for (i, outbox) in (0u32..).zip(sockets) {
        let at = start + window.mul_f64(f64::from(i) / f64::from(n.max(1)));
        // Timers are ms-grained: closes due within a millisecond go out together.
        if at > tokio::time::Instant::now() + std::time::Duration::from_millis(1) {
            tokio::time::sleep_until(at).await;
        }
        outbox.close_after_flush(Some(going_away()));
    }
}

impl RoomHandle {
    pub(crate) fn from_shared(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            foreign_origin: false,
        }
    }

    /// The 403 for an upgrade from an origin that is not allowed, if this request is one.
    pub(crate) fn refuse_origin(&self) -> Option<Response> {
        if !self.foreign_origin {
            return None;
        }
        self.shared.node.counters.rejected_connections.add(1);
        tracing::debug!("refused a websocket upgrade from a foreign origin");
        Some(
            (
                StatusCode::FORBIDDEN,
                "this origin may not open a websocket here (FanoutBuilder::allowed_origins)\n",
            )
                .into_response(),
        )
    }

    pub(crate) fn start(&self) {
        self.shared.start();
    }

    /// Broadcasts `payload` to every socket of `room` on every node, this one included.
    ///
    /// Await the returned [`Broadcast`]: it publishes one envelope and resolves, after Redis
    /// replied, to the number of nodes subscribed to the room (PUBLISH's reply). Local sockets
    /// receive the message from the subscriber like everyone else, never inline.
    ///
    /// From a WebSocket handler, prefer [`FanoutSocket::broadcast`], which names the sending
    /// socket for you.
    pub fn broadcast(&self, room: impl AsRef<str>, payload: impl Into<Payload>) -> Broadcast {
        Broadcast::new(self.shared.clone(), room.as_ref(), payload.into())
    }

    /// Applies this node's WebSocket settings (buffer sizes, message size limit) to an upgrade.
    pub fn configure<F>(&self, ws: WebSocketUpgrade<F>) -> WebSocketUpgrade<F> {
        let cfg = &self.shared.node.config;
        ws.read_buffer_size(cfg.read_buffer_size)
            .write_buffer_size(cfg.write_buffer_size)
            .max_message_size(cfg.max_message_size.get())
            .max_frame_size(cfg.max_message_size.get())
    }

    /// Completes the upgrade with this node's WebSocket settings and hands `callback` an
    /// attached [`FanoutSocket`]. When the node already holds `max_connections` sockets it
    /// answers 503 instead, and 403 to a browser on an origin that is not allowed
    /// ([`FanoutBuilder::allowed_origins`](crate::FanoutBuilder::allowed_origins)).
    ///
    /// ```no_run
    /// use axum::{extract::ws::{Message, WebSocketUpgrade}, response::Response};
    /// use axum_fanout::{Payload, RoomHandle};
    ///
    /// async fn ws(upgrade: WebSocketUpgrade, rooms: RoomHandle) -> Response {
    ///     rooms.on_upgrade(upgrade, |mut socket| async move {
    ///         if socket.join("lobby").await.is_err() {
    ///             return socket.close(1011, "try again later");
    ///         }
    ///         while let Some(Ok(Message::Text(text))) = socket.recv().await {
    ///             let Ok(payload) = Payload::raw_json(text.as_str()) else { break };
    ///             let _ = socket.broadcast("lobby", payload).await;
    ///         }
    ///     })
    /// }
    /// ```
    pub fn on_upgrade<C, Fut>(&self, ws: WebSocketUpgrade, callback: C) -> Response
    where
        C: FnOnce(FanoutSocket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if let Some(refused) = self.refuse_origin() {
            return refused;
        }
        let node = &self.shared.node;
        // The place is taken now, before the upgrade: a full node answers 503 and upgrades
        // in flight count against the limit.
        let admitted = match node.lifecycle.reserve() {
            Err(Refused::Full) => {
                let max = node.config.max_connections.get();
                node.counters.rejected_connections.add(1);
                tracing::warn!(
                    max_connections = max,
                    "refused a websocket upgrade: node is full"
                );
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "this node is at its connection limit; try again later or another node\n",
                )
                    .into_response();
            }
            admitted => admitted,
        };
        let shared = self.shared.clone();
        self.configure(ws)
            .on_upgrade(move |socket| callback(FanoutSocket::attach(shared, socket, admitted)))
    }

    /// Attaches a WebSocket you upgraded yourself (use [`configure`](RoomHandle::configure) for
    /// this node's buffer and size settings). The connection limit holds here too: when the
    /// node already holds `max_connections` sockets, the socket is closed at once with 1013
    /// (`"node full"`) and its [`recv`](FanoutSocket::recv) returns `None`.
    pub fn attach(&self, socket: WebSocket) -> FanoutSocket {
        let admitted = self.shared.node.lifecycle.reserve();
        FanoutSocket::attach(self.shared.clone(), socket, admitted)
    }

    /// Whether the subscriber link to Redis is up and every local room is subscribed on it:
    /// what `/healthz` should report.
    pub fn is_ready(&self) -> bool {
        self.shared.node.bus.is_ready()
    }

    /// This node's id (the `origin` of its envelopes).
    pub fn node_id(&self) -> &str {
        &self.shared.node.config.node_id
    }

    /// Shuts this node down gracefully; call it from axum's `with_graceful_shutdown` signal.
    ///
    /// New sockets are closed at once and new joins fail. Every local socket gets what is
    /// already queued, then a close frame 1001 (`"server restarting; reconnect"`, see
    /// [`close`](crate::close)), and its [`recv`](FanoutSocket::recv) returns `None`. The
    /// closes are spread evenly over the drain window
    /// ([`drain_window`](crate::FanoutBuilder::drain_window), default 3 s), so that a rolling
    /// restart sends the other nodes a stream of reconnects rather than a herd. It then waits,
    /// up to the shutdown timeout (default 5 s), until every socket has left its rooms, every
    /// writer has flushed and the node's UNSUBSCRIBEs were confirmed (and, with presence,
    /// Redis counted every leave, so the other nodes' sockets got their leave events). Returns
    /// `true` when all of that happened in time.
    ///
    /// ```no_run
    /// # async fn run(app: axum::Router, rooms: axum_fanout::RoomHandle) -> std::io::Result<()> {
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    /// axum::serve(listener, app)
    ///     .with_graceful_shutdown(async move {
    ///         let _ = tokio::signal::ctrl_c().await;
    ///         rooms.shutdown().await;
    ///     })
    ///     .await
    /// # }
    /// ```
    pub async fn shutdown(&self) -> bool {
        let node = &self.shared.node;
        let sockets = node.lifecycle.begin_shutdown();
        drain(&sockets, node.config.drain_window).await;
        let deadline = tokio::time::Instant::now() + node.config.shutdown_timeout;
        let mut clean = node.lifecycle.wait_quiet(&node.registry, deadline).await;
        if node.config.uses_presence() {
            // Members leave with events now, rather than when the lease runs out.
            clean &= node.presence.wait_all_synced(deadline).await;
            crate::presence::release(&node.bus).await;
        }
        tracing::info!(
            node = %node.config.node_id,
            sockets = sockets.len(),
            clean,
            "fanout node shut down"
        );
        clean
    }

    /// The members of `room` on every live node, sorted by user id, and the room's presence
    /// version: one script call to Redis (on a Redis Cluster, after one read of the expired
    /// leases), which first removes the members of any node whose lease ran out (so it never
    /// lists them).
    ///
    /// Fails with [`Error::is_presence_off`] for a room without presence,
    /// [`Error::is_invalid_room`] for an invalid name, and [`Error::is_timeout`] or
    /// [`Error::is_redis`] when Redis does not answer.
    ///
    /// ```no_run
    /// use axum::{Json, extract::Path, http::StatusCode};
    /// use axum_fanout::RoomHandle;
    /// use axum_fanout::presence::Snapshot;
    ///
    /// async fn who(Path(room): Path<String>, rooms: RoomHandle) -> Result<Json<Snapshot>, StatusCode> {
    ///     rooms.presence(&room).await.map(Json).map_err(|e| {
    ///         if e.is_presence_off() { StatusCode::NOT_FOUND } else { StatusCode::SERVICE_UNAVAILABLE }
    ///     })
    /// }
    /// ```
    pub async fn presence(&self, room: impl AsRef<str>) -> Result<Snapshot, Error> {
        crate::presence::snapshot(&self.shared.node.bus, room.as_ref()).await
    }

    /// How many members `room` has on every live node, and its version: like
    /// [`presence`](RoomHandle::presence), without the list. Costs O(1) in Redis whatever the
    /// room's size (`HLEN`), besides removing the members of dead nodes first.
    pub async fn presence_count(&self, room: impl AsRef<str>) -> Result<Count, Error> {
        crate::presence::count(&self.shared.node.bus, room.as_ref()).await
    }

    /// Wraps the node's TCP listener for `axum::serve`: `TCP_NODELAY` on every connection, and
    /// running out of file descriptors logged and counted (see [`FanoutListener`]).
    pub fn listener(&self, listener: tokio::net::TcpListener) -> FanoutListener {
        FanoutListener::new(listener, self.shared.node.counters.clone())
    }

    /// The last `limit` messages of durable `room` (at most its replay limit), oldest first,
    /// with the room's current position.
    ///
    /// Fails with [`Error::is_not_durable`] for a plain room, [`Error::is_invalid_room`],
    /// and [`Error::is_redis`] or [`Error::is_timeout`] when Redis cannot answer.
    ///
    /// ```no_run
    /// use axum::{Json, extract::Path};
    /// use axum_fanout::RoomHandle;
    ///
    /// async fn recent(Path(room): Path<String>, rooms: RoomHandle) -> Json<Vec<String>> {
    ///     let Ok(history) = rooms.history(&room, 50).await else {
    ///         return Json(Vec::new());
    ///     };
    ///     Json(history
    ///         .messages()
    ///         .iter()
    ///         .filter_map(|(seq, payload)| Some(format!("{seq}: {}", payload.as_json()?)))
    ///         .collect())
    /// }
    /// ```
    pub async fn history(&self, room: impl AsRef<str>, limit: usize) -> Result<History, Error> {
        let (room, settings) = self.durable_room(room.as_ref())?;
        let limit = limit.min(settings.replay_limit.get());
        let node = &self.shared.node;
        let page = node
            .durable
            .read(&node.bus, &room, &settings, Read::Last(limit))
            .await?;
        Ok(node.durable.history(&room, page, None))
    }

    /// Every message of durable `room` after `since`, oldest first, with the room's current
    /// position; or none, and [`History::failure`] says why (the epoch changed, the messages
    /// were trimmed, or there are more than the replay limit).
    ///
    /// Fails like [`history`](RoomHandle::history).
    pub async fn history_since(
        &self,
        room: impl AsRef<str>,
        since: &Position,
    ) -> Result<History, Error> {
        let (room, settings) = self.durable_room(room.as_ref())?;
        let node = &self.shared.node;
        let read = Read::After(since.clone(), settings.replay_limit.get());
        let page = node.durable.read(&node.bus, &room, &settings, read).await?;
        Ok(node.durable.history(&room, page, Some(since)))
    }

    fn durable_room(&self, room: &str) -> Result<(RoomName, Durability), Error> {
        let room = RoomName::new(room)?;
        match self.shared.node.config.durable_for(room.as_str()) {
            Some(settings) => Ok((room, *settings)),
            None => Err(Error::not_durable(room.as_str())),
        }
    }

    /// A snapshot of this node's counters.
    pub fn stats(&self) -> Stats {
        self.shared.node.stats()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for RoomHandle {
    type Rejection = MissingFanoutLayer;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<RoomHandle>()
            .cloned()
            .ok_or(MissingFanoutLayer)
    }
}

/// Rejection for [`RoomHandle`] when no [`FanoutLayer`](crate::FanoutLayer) wraps the route:
/// a 500 whose body says how to fix it.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct MissingFanoutLayer;

impl MissingFanoutLayer {
    const MESSAGE: &'static str = "Missing request extension: axum_fanout::RoomHandle. \
         Add `.layer(axum_fanout::FanoutLayer::new(redis_url))` to the Router that serves this \
         route (a layer only wraps routes added before it).";
}

impl fmt::Display for MissingFanoutLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Self::MESSAGE)
    }
}

impl std::error::Error for MissingFanoutLayer {}

impl IntoResponse for MissingFanoutLayer {
    fn into_response(self) -> Response {
        tracing::error!("{}", Self::MESSAGE);
        (StatusCode::INTERNAL_SERVER_ERROR, Self::MESSAGE).into_response()
    }
}
