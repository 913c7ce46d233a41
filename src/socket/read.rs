//! The socket's reading half: the client's messages, loss notices and failed broadcasts, the
//! per-socket rate limit, and what a read error means for the connection.

use axum::extract::ws::Message;
use futures_util::StreamExt;
use tokio::time::Instant;

use super::FanoutSocket;
use crate::close;
use crate::error::Error;
use crate::missed::Missed;
use crate::queue::{Notice, Outbox, ReadHalf, ReadItem, is_too_big};
use crate::room::RoomName;

/// What [`FanoutSocket::recv_event`] yields.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A text or binary message from the client.
    Message(Message),
    /// Messages of a room may not have reached this socket (see *Lagging* on
    /// [`FanoutSocket::recv_event`]).
    Missed(Missed),
    /// A broadcast this socket [queued](crate::Broadcast::queue) failed after its receipt was
    /// dropped: it did not reach `room`.
    #[non_exhaustive]
    BroadcastFailed {
        /// The room it was for.
        room: RoomName,
        /// Why it failed ([`Error::is_timeout`], [`Error::is_redis`], ...).
        error: Error,
    },
}
/// The per-socket message rate limit: refills at `rate` tokens per second up to `burst`.
#[derive(Debug)]
pub(super) struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    pub(super) fn new(rate: u32, burst: u32) -> Self {
        Self {
            tokens: f64::from(burst),
            rate: f64::from(rate),
            burst: f64::from(burst),
            last: Instant::now(),
        }
    }

    /// Takes a token; `false` when the bucket is empty.
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl FanoutSocket {
    /// Receives the client's next text or binary message.
    ///
    /// Returns `None` once the connection is closed, by the client or by this node (a slow
    /// consumer, [`close`](FanoutSocket::close), [`RoomHandle::shutdown`](crate::RoomHandle::shutdown)). Pings are answered
    /// and pongs consumed for you. Loss notices and failures of queued broadcasts are
    /// discarded: use [`recv_event`](FanoutSocket::recv_event) to see them.
    ///
    /// A message over the size limit closes the socket with 1009 and yields an error for which
    /// [`Error::is_message_too_big`] is true; a transport failure yields
    /// [`Error::is_websocket`]. The next call returns `None`.
    ///
    /// # Cancel safety
    /// Cancel safe: a message is only taken from the socket when it is returned.
    pub async fn recv(&mut self) -> Option<Result<Message, Error>> {
        loop {
            match self.recv_event().await? {
                Ok(Event::Message(msg)) => return Some(Ok(msg)),
                Ok(Event::Missed(missed)) => {
                    tracing::debug!(socket = %self.id, %missed, "loss notice discarded by recv()");
                }
                // Already logged and counted by the publisher.
                Ok(Event::BroadcastFailed { .. }) => {}
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// Like [`recv`](FanoutSocket::recv), and also tells when messages may have been missed.
    ///
    /// ## Lagging
    /// Redis pub/sub is at-most-once. When messages of one of the socket's rooms may not have
    /// reached it (the node's Redis link was down, the node shed load, or this socket's queue
    /// overflowed under a dropping policy), this yields [`Event::Missed`] with the room and the
    /// time window, once per gap and room (gaps that overlap are merged). The socket keeps
    /// working; resync the room if the application needs every message.
    ///
    /// # Cancel safety
    /// Cancel safe: an event is only taken when it is returned.
    pub async fn recv_event(&mut self) -> Option<Result<Event, Error>> {
        loop {
            match self.outbox.take_notice() {
                Some(Notice::Missed(missed)) => return Some(Ok(Event::Missed(missed))),
                Some(Notice::BroadcastFailed(room, error)) => {
                    return Some(Ok(Event::BroadcastFailed { room, error }));
                }
                None => {}
            }
            // The reading half is lent to this call and given back when it ends (returned or
            // cancelled): in between, the node reads the client's control frames itself.
            let next = match self.outbox.take_stream() {
                Err(read_meanwhile) => read_meanwhile,
                Ok(stream) => {
                    let mut lent = Lent {
                        outbox: &self.outbox,
                        stream: Some(stream),
                    };
                    tokio::select! {
                        biased;
                        _ = self.outbox.reader_event() => {
                            if self.outbox.is_closing() {
                                return None;
                            }
                            continue;
                        }
                        next = lent.next() => next,
                    }
                }
            };
            self.outbox.after_read(&next);
            match next? {
                Ok(msg @ (Message::Text(_) | Message::Binary(_))) => {
                    if !self.bucket.take() {
                        self.shared.node.counters.rate_limited.add(1);
                        tracing::debug!(
                            socket = %self.id,
                            "client over the message rate limit; closing with 1008"
                        );
                        self.close(close::POLICY_VIOLATION, close::RATE_LIMIT_REASON);
                        return Some(Err(Error::rate_limited(close::RATE_LIMIT_REASON)));
                    }
                    return Some(Ok(Event::Message(msg)));
                }
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                // The transport answers the close handshake; `after_read` stopped the writer.
                Ok(Message::Close(_)) => return None,
                Err(e) => return Some(Err(self.read_error(e))),
            }
        }
    }

    /// The handler's error for a failed read (`after_read` closed the socket already).
    fn read_error(&mut self, e: axum::Error) -> Error {
        if is_too_big(&e) {
            Error::message_too_big(e.into_inner())
        } else {
            Error::websocket(e.into_inner())
        }
    }
}

/// The socket's reading half, lent to one `recv` and given back to the node when dropped.
struct Lent<'a> {
    outbox: &'a Outbox,
    stream: Option<ReadHalf>,
}

impl Lent<'_> {
    /// The next thing the client sent.
    ///
    /// # Cancel safety
    /// Cancel safe, as the stream's `next`.
    async fn next(&mut self) -> ReadItem {
        match self.stream.as_mut() {
            Some(stream) => stream.next().await,
            None => None,
        }
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some(stream) = self.stream.take() {
            self.outbox.return_stream(stream);
        }
    }
}
