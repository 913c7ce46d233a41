//! A fleet of axum WebSocket servers that behaves like one.
//!
//! Each node keeps a registry of the sockets it terminated, by room. A broadcast publishes one
//! envelope to the room's Redis channel; every node that holds the room, the sender's included,
//! receives it on one shared subscriber connection and writes it to its own sockets. The bus is
//! global; socket writes are always local.
//!
//! # Quickstart
//!
//! Add the layer, extract a [`RoomHandle`], join sockets to rooms and broadcast. This is
//! `examples/minimal.rs` (`cargo run --example minimal`):
//!
//! ```rust,no_run
#![doc = include_str!("../examples/minimal.rs")]
//! ```
//!
//! # Concepts
//!
//! - **One node per layer.** A [`FanoutLayer`] holds one node: a publisher and a subscriber
//!   connection to Redis and the registry of its local sockets. Requests behind it extract a
//!   [`RoomHandle`]; [`FanoutLayer::handle`] gives one to code outside requests.
//! - **Sockets and rooms.** [`RoomHandle::on_upgrade`] turns an upgrade into a [`FanoutSocket`]
//!   that joins and leaves rooms; dropping it leaves them all. The node subscribes to a room's
//!   channel on its first local socket and unsubscribes on its last.
//! - **One delivery path.** A [`Broadcast`] only publishes; every node delivers from its
//!   subscriber. Each socket gets each message once, and all sockets of a room see one order.
//! - **Loss is told, never silent.** Redis pub/sub is at-most-once: a socket that may have missed
//!   messages gets [`Event::Missed`] from [`FanoutSocket::recv_event`], with a window that covers
//!   every message it lacks ([`Missed`]).
//! - **Features on request.** [`durable`] rooms keep and number their recent messages so a client
//!   resumes where it stopped; [`presence`] tracks who is in a room across the fleet.
//! - **Users.** A socket may [`identify`](FanoutSocket::identify) as a user; then
//!   [`RoomHandle::send_to_user`], [`disconnect_user`](RoomHandle::disconnect_user) and
//!   [`join_user`](RoomHandle::join_user) reach it wherever it is connected, and
//!   [`expire_in`](FanoutSocket::expire_in) closes it when its credentials expire ([`users`]).
//! - **The protocol, ready-made.** [`protocol`] is a whole endpoint (one socket, many rooms,
//!   commands answered by id, resume, presence, idempotent publish) specified in `PROTOCOL.md`
//!   and spoken by the JavaScript client in `clients/js`; the application only decides who
//!   may do what ([`protocol::Authorize`]).
//! - **Close codes** the node sends are in [`close`].
//!
//! # Guarantees and the rest
//!
//! The README is the guide: its *Guarantees* (delivery, order, loss windows, timeouts as unknown
//! outcomes), *Configuration*, *Secure Redis*, *Redis Cluster*, *Redis Sentinel*, *Presence*,
//! *Durable rooms*, *Operations* and *Close codes* sections, and `BENCHMARKS.md` for measured
//! figures.
#![forbid(unsafe_code)]

// The README's code blocks compile as doc-tests, though the crate docs are the shorter text
// above.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

// # Layout (for contributors; users read the docs above)
//
// Modules follow the data flow, from a client's frame to every socket of the room:
//
// client frame -> handler -> `FanoutSocket::broadcast` / `RoomHandle::broadcast` ->
// publisher -> Redis -> subscriber -> dispatcher -> registry -> per-socket bounded queue ->
// batched writer -> socket.
//
// They are listed here, and declared below, from the top of that flow down: each module
// imports only modules listed after it, never one before it.
//
// - `protocol`: the fanout protocol's endpoint (`PROTOCOL.md`), above the toolkit and built
//   only on it: `protocol::session` (one socket's commands and replies; `session::publish`, keyed publishes), `protocol::wire`
//   (frames and error codes), `protocol::reads` (history and presence commands),
//   `protocol::auth` (`Authorize`, `Grant`, `Permissive`), `protocol::redis` (idempotent
//   publish keys). Its sockets' queues are marked framed: the registry and the durable
//   sequencer give them each room's frame with its room, made once per message.
// - `layer`: `FanoutLayer` and `FanoutService`, which only put a `RoomHandle` in request
//   extensions; the builder's `build`.
// - `handle`: `RoomHandle` (the extractor) and `MissingFanoutLayer`, its rejection.
// - `listener`: `FanoutListener`, an accept loop for `axum::serve` that sets `TCP_NODELAY`
//   and tells when the node runs out of file descriptors.
// - `socket`: `FanoutSocket`, a WebSocket attached to the node: its queue, its own
//   broadcasts and its closing; `socket::rooms` (joining, as a member or durable, and
//   leaving), `socket::read` (the reading half, the rate limit; `Event`).
// - `broadcast`: `Broadcast`, one message on its way to a room.
// - `node`: the composition root. Builds the lifecycle, registry, counters, bus and
//   dispatcher, and starts and stops the background tasks.
// - `membership`: joining and leaving rooms (plain, as a member, durable), one home for a
//   socket's handler and for fleet commands that move a user's sockets.
// - `users`: users across the fleet. A socket that identifies joins its user's internal room
//   (its channel `__axum_fanout:user:<prefix><user>`); direct messages and fleet commands
//   (disconnect, join, leave) travel there; `users::expiry` closes sockets whose credentials
//   expire; `users::send` holds the public calls (`Disconnect`, `UserCommand`).
// - `dispatch`: the dispatcher, which decodes each envelope once and offers the frame to the
//   room's local sockets (a durable room's through `durable`); a fleet command goes to
//   `users` through the `Commands` trait, with the room's local sockets.
// - Features, each whole in its folder: its state, its Redis half (`redis`) and its tasks.
//   `presence`: `presence::member` (`Member`, `Snapshot`, `Count`: what the presence
//   API takes and gives), `presence::table` (which user each local socket is in each
//   presence room, and what Redis has not been told yet), `presence::redis` (keys, scripts,
//   the lease task, queries, the reaper). `durable`: durable rooms on this node, never
//   waiting: `durable::sequencer` (live delivery in seq order, gaps held and repaired once per
//   room), `durable::resume` (a resuming socket's replay merged with the live frames held
//   meanwhile; `Resumed`), `durable::history` (what a history read found; `History`),
//   `durable::rooms` (their shared state under one lock), `durable::redis` (keys, history
//   reads, the epoch fork, the repair task; `durable::redis::store`, the script that stores
//   and publishes a group of a room's messages).
// - `bus`: the transport, which knows no feature. `bus::publisher` (the publish queue and its
//   pipelines: PUBLISH, and a feature's store calls through the `Store` trait),
//   `bus::receipt` (`Receipt`, `Published`), `bus::subscriber` (the shared subscriber
//   link: reconcile, probe, reconnect), `bus::inbox` (the bounded hop to the dispatcher, and
//   where a loss window starts), `bus::script` (the one script runner, reply parsers, room
//   key names), `bus::runs` (a pipeline of script calls: groups, what may go again),
//   `bus::guard` (a message published at most once: its key checked and its outcome written
//   in the same script call),
//   `bus::backend` (one server, a master found through Sentinel, or a Redis Cluster),
//   `bus::client` (the backend from the settings, URL redaction), `bus::server` (one server's
//   connection settings, RESP3, TLS, and its `ServerConn`), `bus::sentinel` (the sentinels asked
//   for the master, a demoted master left), `bus::slots` (cluster hash slots), `bus::backoff`
//   (jittered pauses). Redis's types appear only in `bus/` and in each feature's `redis`
//   module.
// - `writer`: each socket's batched writer task, which also reads the client's control frames
//   while its handler is not reading.
// - `lifecycle`: the node's sockets from attach to close: who is attached, the connection
//   limit (one check-and-insert on every attach path), the heartbeat, shutdown and drain.
// - `registry`: room -> local sockets and `SocketId`; `registry::subscriptions` (which
//   rooms need a SUBSCRIBE or UNSUBSCRIBE, what Redis confirmed, a lost link or sharded
//   subscription and what becomes of it once the room is subscribed again),
//   `registry::fanout` (a frame offered to a room's local sockets, gap notices).
// - `queue`: one socket's bounded send queue and its overflow policy, and the socket's rooms;
//   `queue::parked` (the writer's sink parked there while it waits, and a frame written at
//   once to an idle socket), `queue::reading` (the reading half between the handler's reads).
//
// Leaves, used from anywhere above: `envelope` (`envelope::frames`: what each kind of socket gets of one; the JSON wire format shared with the seed's
// nodes; `Payload`), `channel` (Redis channel names for rooms and shards, injective),
// `config` (the settings the node reads, `OverflowPolicy`; `config::builder`: `FanoutBuilder`
// and its Redis-facing knobs, every default and why; `config::sockets`: its per-socket knobs;
// `config::durability`: `Durability`), `room`
// (`RoomName`, validated once at the edge), `missed` (`Missed`, how a socket learns that
// messages may have been lost), `stats` (`Stats` and the counters), `error` (`Error`),
// `close` (the close codes and reasons the node sends, public), `origin` (the `Origin`
// check before an upgrade),
// `time` (milliseconds since the epoch), `position` (`Position`, `Unrecoverable`),
// `random` (random ids: node ids, epochs, backoff seeds).
//
// # Invariants
//
// Each is enforced in one place:
// - **One delivery path** (`broadcast`, `bus`): a broadcast only publishes; every node, the publisher
//   included, delivers from its subscriber. So each socket gets each message once, and all
//   sockets of a room see the room's messages in the order Redis delivered them.
// - **Join after SUBSCRIBE** (`registry`): a socket is registered locally *before* the
//   SUBSCRIBE is sent, and `join` resolves only once Redis confirmed it.
// - **Subscribed iff a local socket** (`registry`): one task reconciles subscriptions with the
//   current membership, so concurrent joins and leaves cannot leave a stale subscription or an
//   unsubscribed member.
// - **The subscriber never awaits a socket** (`dispatch`, `queue`): the connection's push
//   callback only offers to a bounded hop, and the dispatcher offers each frame to a bounded
//   per-socket queue and applies the overflow policy to that socket alone. At light load it
//   writes a frame straight to an idle socket instead, with a no-op waker: a socket that is
//   not ready gets the frame queued, and its writer finishes what could not be flushed.
// - **Durable rooms in seq order** (`durable`): live, replayed and repaired messages of a
//   durable room reach each socket under one lock, in seq order, each once; the Redis reads
//   behind them run elsewhere (`durable::redis`), so the dispatcher never waits on Redis.
// - **No lock across `.await`, one lock order** (outer first): a node's durable rooms
//   (`durable::rooms`) -> the registry (`registry`) -> a socket's parked sink
//   (`queue::parked`) -> that socket's queue state (`queue`). Every lock is a
//   `std::sync::Mutex` that nothing awaits under. Most are held for a few field updates, but
//   the registry's is held across a room's whole fan-out, including the dispatcher's direct
//   writes to idle sockets (each a `send` that never waits), and the durable rooms' across a
//   durable room's delivery. The others (the lifecycle's sockets, the presence table, a
//   socket's reading half, the shed windows, the bus's) are leaves: nothing else is taken
//   while one is held.
// - **Lifetimes end by `Drop`**: dropping a `FanoutSocket` leaves its rooms; dropping the
//   last layer or handle stops the background tasks.
// - **Presence changes and their notices are one step** (`presence::redis`): the Lua script
//   that changes a room's counts publishes the join or leave on the room's channel, so
//   notices take the one delivery path, in order with the messages; the node only ever sends
//   its current counts (`presence`), so a retry or a re-assertion cannot count twice.

mod broadcast;
mod bus;
mod dispatch;
pub mod durable;
mod handle;
mod layer;
mod lifecycle;
mod listener;
mod membership;
mod node;
pub mod presence;
pub mod protocol;
mod queue;
mod registry;
mod socket;
pub mod users;
mod writer;

mod channel;
pub mod close;
mod config;
mod envelope;
mod error;
mod missed;
mod origin;
mod position;
mod random;
mod room;
mod stats;
mod time;

pub use broadcast::Broadcast;
pub use bus::{Published, Receipt};
pub use config::{FanoutBuilder, OverflowPolicy, RedisTarget};
pub use envelope::Payload;
pub use error::Error;
pub use handle::MissingFanoutLayer;
pub use layer::{FanoutLayer, FanoutService};
pub use listener::FanoutListener;
pub use missed::Missed;
pub use node::RoomHandle;
pub use registry::SocketId;
pub use room::{InvalidRoomName, MAX_ROOM_LEN, RoomName};
pub use socket::{Event, FanoutSocket};
pub use stats::Stats;
