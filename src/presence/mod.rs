//! Presence: who is in a room across the fleet, with join and leave events and no ghosts after
//! a node dies (see the README's "Presence"). Turn it on with
//! [`FanoutBuilder::presence`](crate::FanoutBuilder::presence); join as a [`Member`] with
//! [`FanoutSocket::join_as`](crate::FanoutSocket::join_as); ask with
//! [`RoomHandle::presence`](crate::RoomHandle::presence) ([`Snapshot`]) or
//! [`RoomHandle::presence_count`](crate::RoomHandle::presence_count) ([`Count`]).
//!
//! # Inside
//!
//! Presence, the node's side: who this node's sockets are in each presence room, and what
//! Redis has not been told yet.
//!
//! The table (`table`) is to presence what the registry is to subscriptions: the single source of
//! truth for this node's contribution. Joins and leaves only edit it and mark the user
//! *changed*; one task (`redis`) takes the changed rooms, hands Redis this node's
//! current connection count for each changed user in one atomic script per room, and confirms.
//! Because the task always sends *current* counts (never deltas), a failed or repeated sync
//! cannot double count, and re-asserting everything after Redis lost its data is the same code
//! with every user marked.
//!
//! Redis holds the fleet-wide view (see `redis` for the keys and scripts): per room, the
//! connection count of every member summed over nodes, and each node's share, so that a dead
//! node's share can be taken back out. Join and leave events are published by those scripts on
//! the room's own channel, so they reach sockets through the ordinary delivery path, in order
//! with the room's messages.
//!
//! # Layout
//!
//! - `member`: what the API takes and gives: [`Member`] (who a socket is), [`Snapshot`] and
//!   [`MemberEntry`] (a room's members), [`Count`].
//! - `table`: this node's table, and what each sync hands Redis.
//! - `redis`: presence in Redis: keys, scripts, the lease task, queries, the reaper.

mod member;
mod redis;
mod table;

pub(crate) use redis::{check, count, release, snapshot, start};

pub use member::{Count, MAX_INFO_LEN, MAX_USER_LEN, Member, MemberEntry, Snapshot};
pub(crate) use table::{ENTRIES_PER_SYNC, Table};
