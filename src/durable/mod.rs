//! Durable rooms: a room whose recent messages Redis keeps and numbers, so that a client
//! resumes exactly where it stopped, on any node, and is told when it cannot (see the README's
//! "Durable rooms"). Turn them on with [`FanoutBuilder::durable`](crate::FanoutBuilder::durable)
//! or [`durable_room`](crate::FanoutBuilder::durable_room) and a [`Durability`]; join with
//! [`FanoutSocket::join_durable`](crate::FanoutSocket::join_durable), which answers a
//! [`Resumed`]; read a room's history with
//! [`RoomHandle::history`](crate::RoomHandle::history) ([`History`]). A message's place is a
//! [`Position`].
//!
//! # Inside
//!
//! Durable rooms on this node: messages delivered in `seq` order with no gap, resumes merged
//! with live traffic, and gaps repaired from the room's history.
//!
//! Everything here runs under one `std::sync::Mutex` and never waits: the dispatcher calls
//! `Durable::on_live` for each positioned envelope, and the Redis reads (a resume's replay,
//! a gap's repair) happen elsewhere (`redis`, `socket`) and hand their results back
//! through `Durable::finish_resume` and `Durable::repaired`. Delivering under the lock is
//! what keeps one order: live, replayed and repaired messages reach each socket in `seq` order,
//! whichever task delivers them.
//!
//! # Layout
//!
//! - `redis`: durable rooms in Redis: keys, history reads, the epoch fork, the repair task,
//!   and (`redis::store`) the script that stores and publishes a group of a room's messages.
//! - `sequencer`: the room's sequencer, live delivery in seq order and the node's own gap
//!   repair.
//! - `resume`: a resuming socket, its replay merged with the live frames held meanwhile;
//!   [`Resumed`].
//! - `history`: what a history read found, and whether it covers a position; [`History`].
//! - `rooms`: the state both share, under the one lock: each room's last position and the
//!   gates of its positioned members.
//!
//! Listed from the top down (rustfmt declares them alphabetically): each imports only modules
//! listed after it.

mod history;
mod redis;
mod resume;
mod rooms;
mod sequencer;

pub use crate::config::Durability;
pub use crate::position::{InvalidPosition, Position, Unrecoverable};
pub use history::History;
pub(crate) use history::Page;
pub(crate) use redis::{Read, StoreScript, start};
pub use resume::{Resumed, Start};
pub(crate) use rooms::{Durable, Repair};
