#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
//!
//! # Layout
//!
//! Modules follow the data flow, from a client's frame to every socket of the room:
//!
//! client frame -> handler -> [`RoomHandle::broadcast`] -> publisher -> Redis -> subscriber
//! task -> registry dispatch -> per-socket bounded queue -> batched writer -> socket.
//!
//! - `layer`: [`FanoutLayer`], which only puts a [`RoomHandle`] in request extensions.
//! - `extract`: [`RoomHandle`] (the extractor) and [`Broadcast`].
//! - `config`: [`FanoutBuilder`] and [`OverflowPolicy`]; every default and why.
//! - `room`: [`RoomName`], validated once at the edge.
//! - `envelope`: the JSON wire format shared with the seed's nodes; [`Payload`].
//! - `channel`: Redis channel names for rooms and their shards (injective).
//! - `bus`: the Redis connections (publisher, subscriber), reconnects, and the dispatcher.
//! - `backend`: the seam to Redis: one server (PUBLISH / SUBSCRIBE) or, with the `cluster`
//!   feature, a Redis Cluster (SPUBLISH / SSUBSCRIBE grouped by hash slot).
//! - `registry`: room -> local sockets, and the reconciliation of subscriptions.
//! - `queue`: one socket's bounded send queue and its overflow policy.
//! - `missed`: [`Missed`], how a socket learns that messages may have been lost.
//! - `socket`: [`FanoutSocket`], its reader and its batched writer task.
//! - `stats`: counters and the [`Stats`] snapshot.
//!
//! # Invariants
//!
//! Each is enforced in one place:
//! - **One delivery path** (`bus`): a broadcast only publishes; every node, the publisher
//!   included, delivers from its subscriber. So each socket gets each message once, and all
//!   sockets of a room see the room's messages in the order Redis delivered them.
//! - **Join after SUBSCRIBE** (`registry`): a socket is registered locally *before* the
//!   SUBSCRIBE is sent, and `join` resolves only once Redis confirmed it.
//! - **Subscribed iff a local socket** (`registry`): one task reconciles subscriptions with the
//!   current membership, so concurrent joins and leaves cannot leave a stale subscription or an
//!   unsubscribed member.
//! - **The subscriber never awaits a socket** (`queue`): it offers each frame to a bounded
//!   per-socket queue and applies the overflow policy to that socket alone.
//! - **No lock across `.await`**: registry and queue locks are `std::sync::Mutex`es held for a
//!   few field updates.
//! - **Lifetimes end by `Drop`**: dropping a [`FanoutSocket`] leaves its rooms; dropping the
//!   last layer or handle stops the background tasks.

mod backend;
mod bus;
mod channel;
mod config;
mod envelope;
mod error;
mod extract;
mod layer;
mod missed;
mod node;
mod queue;
mod registry;
mod room;
mod socket;
mod stats;

pub use config::{FanoutBuilder, OverflowPolicy};
pub use envelope::Payload;
pub use error::Error;
pub use extract::{Broadcast, MissingFanoutLayer, RoomHandle};
pub use layer::{FanoutLayer, FanoutService};
pub use missed::Missed;
pub use queue::{SLOW_CONSUMER_CODE, SLOW_CONSUMER_REASON};
pub use room::{InvalidRoomName, MAX_ROOM_LEN, RoomName};
pub use socket::{Event, FanoutSocket, GOING_AWAY_CODE, MESSAGE_TOO_BIG_CODE};
pub use stats::Stats;
