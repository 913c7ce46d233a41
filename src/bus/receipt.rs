//! What a broadcast's caller gets back from the publisher: [`Receipt`], the reply to a queued
//! broadcast, and [`Published`], Redis's answer.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::error::Error;
use crate::position::Position;

/// Redis's answer to a broadcast: how many nodes subscribe to the room and, in a durable
/// room, the message's position. From [`Broadcast::publish`](crate::Broadcast::publish) and
/// [`Receipt::published`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    nodes: usize,
    position: Option<Position>,
}

impl Published {
    pub(crate) fn new(nodes: usize, position: Option<Position>) -> Self {
        Self { nodes, position }
    }

    /// The number of nodes subscribed to the room (PUBLISH's reply; on a cluster, the
    /// subscribers on the shard that owns the room's channel).
    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// The message's position in a durable room's history: what a client that sent it can
    /// keep to resume after it. `None` in a plain room.
    pub fn position(&self) -> Option<&Position> {
        self.position.as_ref()
    }
}

/// The reply to a queued broadcast: resolves to the number of nodes subscribed to the room
/// (PUBLISH's reply), or the error, by the publish timeout; [`published`](Receipt::published)
/// also gives a durable room's position. From [`Broadcast::queue`](crate::Broadcast::queue).
///
/// Dropping it does not cancel the broadcast, which is already queued. A failure whose receipt
/// was dropped is still counted in [`Stats::publish_errors`](crate::Stats::publish_errors),
/// logged, and, for a broadcast queued from a socket, reported to that socket as
/// [`Event::BroadcastFailed`](crate::Event::BroadcastFailed).
#[must_use = "await the receipt for Redis's reply, or drop it to be told of failures only"]
pub struct Receipt(pub(super) Pin<Box<dyn Future<Output = Result<Published, Error>> + Send>>);

impl Receipt {
    /// Waits for Redis's whole answer: the number of nodes and, in a durable room, the
    /// message's position.
    pub async fn published(self) -> Result<Published, Error> {
        self.0.await
    }
}

impl std::fmt::Debug for Receipt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Receipt")
    }
}

impl Future for Receipt {
    type Output = Result<usize, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0
            .as_mut()
            .poll(cx)
            .map(|result| result.map(|p| p.nodes))
    }
}

/// One Redis error reported to every caller of a failed pipeline.
#[derive(Debug)]
pub(super) struct SharedCause(pub(super) std::sync::Arc<redis::RedisError>);

impl std::fmt::Display for SharedCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SharedCause {}
