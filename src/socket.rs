//! A WebSocket attached to the node: its room memberships, its reader and its batched writer.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::SplitStream;
use futures_util::{Sink, SinkExt, StreamExt};
use tokio::time::{Instant, timeout};

use crate::envelope::Payload;
use crate::error::{Error, Kind};
use crate::extract::RoomHandle;
use crate::missed::Missed;
use crate::node::{Node, Shared};
use crate::queue::{Limits, Next, Offer, Outbox, SLOW_CONSUMER_CODE, SLOW_CONSUMER_REASON};
use crate::registry::SocketId;
use crate::room::RoomName;

/// Close code sent when a client message exceeds the size limit (RFC 6455 1009).
pub const MESSAGE_TOO_BIG_CODE: u16 = 1009;

/// What [`FanoutSocket::recv_event`] yields.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A text or binary message from the client.
    Message(Message),
    /// Messages of a room may not have reached this socket (see *Lagging* on
    /// [`FanoutSocket::recv_event`]).
    Missed(Missed),
}

/// Close code sent to every socket when the node shuts down (RFC 6455 1001).
pub const GOING_AWAY_CODE: u16 = 1001;

/// How long the writer tries to deliver a close frame before it gives up on the client.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// A WebSocket attached to a fan-out node, from [`RoomHandle::on_upgrade`] or
/// [`RoomHandle::attach`].
///
/// The socket's writing half belongs to a writer task that drains a bounded queue: frames from
/// the rooms the socket joined, and frames you [`send`](FanoutSocket::send) it directly. Read the
/// client's messages with [`recv`](FanoutSocket::recv).
///
/// ## Closing
/// Dropping the socket leaves every room (the last local socket of a room unsubscribes the
/// node from it), writes what is still queued and closes with 1000. [`close`](FanoutSocket::close)
/// chooses the code. A socket that cannot keep up is closed by the node with 1013
/// `"slow consumer"`; then [`recv`](FanoutSocket::recv) returns `None`.
#[derive(Debug)]
pub struct FanoutSocket {
    id: SocketId,
    shared: Arc<Shared>,
    outbox: Arc<Outbox>,
    rooms: Vec<RoomName>,
    stream: SplitStream<WebSocket>,
    bucket: TokenBucket,
}

/// The per-socket message rate limit: refills at `rate` tokens per second up to `burst`.
#[derive(Debug)]
struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32, burst: u32) -> Self {
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

/// Close code and reason for a client over the message rate limit (RFC 6455 1008).
const RATE_LIMIT_CODE: u16 = 1008;
const RATE_LIMIT_REASON: &str = "rate limit exceeded";

impl FanoutSocket {
    pub(crate) fn attach(shared: Arc<Shared>, socket: WebSocket) -> Self {
        let node = &shared.node;
        let cfg = &node.config;
        let outbox = Arc::new(Outbox::new(Limits {
            frames: cfg.queue_frames.get(),
            bytes: cfg.queue_bytes.get(),
        }));
        let (id, accepted) = node.registry.attach(outbox.clone());
        if !accepted {
            outbox.close_after_flush(Some(going_away()));
        }
        let (sink, stream) = socket.split();
        node.registry.writer_started();
        tokio::spawn(write_loop(sink, outbox.clone(), node.clone(), id));
        let bucket = TokenBucket::new(cfg.messages_per_second.get(), cfg.message_burst.get());
        outbox.touch();
        Self {
            id,
            shared,
            outbox,
            rooms: Vec::new(),
            stream,
            bucket,
        }
    }

    /// This socket's id, unique within the node. Pass it to
    /// [`Broadcast::except`](crate::Broadcast::except) to leave the sender out.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Joins `room`. Returns once this node receives the room's messages: when the socket is
    /// the node's first in the room, after Redis confirmed the SUBSCRIBE. A message broadcast
    /// after `join` returns reaches this socket.
    ///
    /// Joining a room twice is a no-op. Fails with [`Error::is_invalid_room`] for an invalid
    /// name (nothing is joined) and [`Error::is_timeout`] when Redis does not confirm within the
    /// subscribe timeout (the socket is not left in the room).
    ///
    /// # Cancel safety
    /// If the future is dropped before it completes the socket may or may not be in the room;
    /// [`rooms`](FanoutSocket::rooms) tells, and dropping the socket leaves it either way.
    pub async fn join(&mut self, room: impl AsRef<str>) -> Result<(), Error> {
        let room = RoomName::new(room)?;
        if self.rooms.contains(&room) {
            return Ok(());
        }
        let node = &self.shared.node;
        if node.config.redis.is_none() {
            return Err(Error::with(
                Kind::InvalidUrl,
                "the layer was built with an invalid redis url",
            ));
        }
        if self.outbox.is_closing() || node.registry.is_shutting_down() {
            return Err(Error::new(Kind::Closed));
        }
        let max = node.config.max_rooms_per_socket.get();
        if self.rooms.len() >= max {
            return Err(Error::with(
                Kind::Limit,
                format!("a socket may be in at most {max} rooms"),
            ));
        }
        let deadline = Instant::now() + node.config.subscribe_timeout;
        let subscribed = node.registry.insert(&room, self.id, self.outbox.clone());
        self.rooms.push(room.clone());
        if !subscribed && let Err(e) = node.registry.wait_subscribed(&room, deadline).await {
            self.leave(room.as_str());
            tracing::warn!(room = %room, socket = self.id, error = %e, "join failed");
            return Err(e);
        }
        tracing::debug!(room = %room, socket = self.id, "joined");
        Ok(())
    }

    /// Leaves `room`. Returns whether the socket was in it.
    pub fn leave(&mut self, room: &str) -> bool {
        let Some(at) = self.rooms.iter().position(|r| r.as_str() == room) else {
            return false;
        };
        let room = self.rooms.swap_remove(at);
        self.shared.node.registry.remove(&room, self.id);
        tracing::debug!(room = %room, socket = self.id, "left");
        true
    }

    /// The rooms this socket is in.
    pub fn rooms(&self) -> impl Iterator<Item = &RoomName> {
        self.rooms.iter()
    }

    /// Receives the client's next text or binary message.
    ///
    /// Returns `None` once the connection is closed, by the client or by this node (a slow
    /// consumer, [`close`](FanoutSocket::close), [`RoomHandle::shutdown`]). Pings are answered
    /// and pongs consumed for you. Loss notices are discarded: use
    /// [`recv_event`](FanoutSocket::recv_event) to see them.
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
                    tracing::debug!(socket = self.id, %missed, "loss notice discarded by recv()");
                }
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
            if let Some(missed) = self.outbox.take_missed() {
                return Some(Ok(Event::Missed(missed)));
            }
            let next = tokio::select! {
                biased;
                _ = self.outbox.reader_event() => {
                    if self.outbox.is_closing() {
                        return None;
                    }
                    continue;
                }
                next = self.stream.next() => next,
            };
            if let Some(Ok(_)) = &next {
                self.outbox.touch();
            }
            match next? {
                Ok(msg @ (Message::Text(_) | Message::Binary(_))) => {
                    if !self.bucket.take() {
                        self.shared.node.counters.rate_limited.add(1);
                        tracing::debug!(
                            socket = self.id,
                            "client over the message rate limit; closing with 1008"
                        );
                        self.close(RATE_LIMIT_CODE, RATE_LIMIT_REASON);
                        return Some(Err(Error::with(Kind::Limit, RATE_LIMIT_REASON)));
                    }
                    return Some(Ok(Event::Message(msg)));
                }
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                Ok(Message::Close(_)) => {
                    // The transport answers the close handshake; stop the writer too.
                    self.outbox.close_after_flush(None);
                    return None;
                }
                Err(e) => return Some(Err(self.read_error(e))),
            }
        }
    }

    fn read_error(&mut self, e: axum::Error) -> Error {
        let inner = e.into_inner();
        let too_big = inner
            .downcast_ref::<tungstenite::Error>()
            .is_some_and(|e| matches!(e, tungstenite::Error::Capacity(_)));
        if too_big {
            tracing::debug!(
                socket = self.id,
                "client message over the size limit; closing with 1009"
            );
            self.close(MESSAGE_TOO_BIG_CODE, "message too big");
            Error::with(Kind::MessageTooBig, inner)
        } else {
            self.outbox.close_after_flush(None);
            Error::with(Kind::WebSocket, inner)
        }
    }

    /// Queues a message for this socket only, behind what is already queued.
    ///
    /// The socket's overflow policy applies; fails with [`Error::is_closed`] when the socket is
    /// closing.
    pub fn send(&self, msg: impl Into<Payload>) -> Result<(), Error> {
        let frame = msg.into().into_frame();
        match self.outbox.offer(frame, self.shared.node.config.overflow) {
            Offer::Queued | Offer::QueuedDroppingOldest(_) => Ok(()),
            Offer::Dropped => {
                self.shared.node.counters.dropped.add(1);
                Ok(())
            }
            Offer::Overflowed => {
                self.shared.node.counters.slow_disconnects.add(1);
                Err(Error::new(Kind::Closed))
            }
            Offer::Closed => Err(Error::new(Kind::Closed)),
        }
    }

    /// Closes the connection with `code` and `reason`, after what is already queued.
    ///
    /// `reason` is cut to the 123 bytes a close frame can carry. After this,
    /// [`recv`](FanoutSocket::recv) returns `None`.
    pub fn close(&mut self, code: u16, reason: &str) {
        let reason = truncate_reason(reason);
        self.outbox.close_after_flush(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from(reason),
        }));
    }

    /// A handle to broadcast with (the same node).
    pub fn handle(&self) -> RoomHandle {
        RoomHandle::from_shared(self.shared.clone())
    }
}

fn truncate_reason(reason: &str) -> &str {
    const MAX: usize = 123;
    if reason.len() <= MAX {
        return reason;
    }
    let mut end = MAX;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

impl Drop for FanoutSocket {
    fn drop(&mut self) {
        let registry = &self.shared.node.registry;
        for room in self.rooms.drain(..) {
            registry.remove(&room, self.id);
            tracing::debug!(room = %room, socket = self.id, "left (socket dropped)");
        }
        registry.detach(self.id);
        self.outbox.close_after_flush(Some(CloseFrame {
            code: 1000,
            reason: Utf8Bytes::from_static(""),
        }));
    }
}

/// The close frame of a node that is shutting down (RFC 6455 1001).
pub(crate) fn going_away() -> CloseFrame {
    CloseFrame {
        code: GOING_AWAY_CODE,
        reason: Utf8Bytes::from_static("server shutting down"),
    }
}

/// Drains the socket's queue: take everything queued (up to the batch cap), `feed` each frame,
/// flush once. Generic over the sink so that tests can drive it with an in-memory one.
async fn write_loop<S>(mut sink: S, outbox: Arc<Outbox>, node: Arc<Node>, id: SocketId)
where
    S: Sink<Message, Error = axum::Error> + Unpin,
{
    let max = node.config.batch_frames.get();
    let write_timeout = node.config.write_timeout;
    let interval = node.config.flush_interval;
    let mut batch = Vec::new();
    // When the last flush carried several frames, traffic is outrunning the writer: wait
    // out the flush interval so the next write gathers more. A lone frame means the socket
    // is keeping up, and the next frame goes out at once.
    let mut gather_after: Option<Instant> = None;
    loop {
        let next = outbox.next_batch(&mut batch, max, gather_after).await;
        match next {
            Next::Frames => {
                let frames = batch.len();
                let written = timeout(write_timeout, async {
                    for frame in batch.drain(..) {
                        sink.feed(frame).await?;
                    }
                    sink.flush().await
                })
                .await;
                batch.clear();
                outbox.flushed();
                gather_after =
                    (frames > 1 && !interval.is_zero()).then(|| Instant::now() + interval);
                match written {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        // The client is gone; nothing more can be written.
                        tracing::debug!(socket = id, error = %e, "write failed; closing");
                        outbox.close_after_flush(None);
                        break;
                    }
                    Err(_) => {
                        node.counters.slow_disconnects.add(1);
                        tracing::warn!(
                            socket = id,
                            timeout_ms = write_timeout.as_millis() as u64,
                            "write timed out; closing slow consumer"
                        );
                        outbox.close_now(SLOW_CONSUMER_CODE, SLOW_CONSUMER_REASON);
                    }
                }
            }
            Next::Close(frame) => {
                if let Some(frame) = frame {
                    let _ = timeout(CLOSE_TIMEOUT, sink.send(Message::Close(Some(frame)))).await;
                }
                break;
            }
        }
    }
    let _ = timeout(CLOSE_TIMEOUT, sink.close()).await;
    node.registry.writer_finished();
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};

    use super::*;
    use crate::config::{FanoutBuilder, OverflowPolicy};

    /// An in-memory sink: records every frame and every flush; `stall` makes flushes hang, like
    /// a client that stopped reading once the TCP buffers are full.
    #[derive(Clone, Default)]
    struct Recorder {
        frames: Arc<Mutex<Vec<Message>>>,
        flushes: Arc<AtomicUsize>,
        stall: bool,
    }

    impl Sink<Message> for Recorder {
        type Error = axum::Error;
        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
            self.frames.lock().unwrap().push(item);
            Ok(())
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            if self.stall {
                return Poll::Pending;
            }
            self.flushes.fetch_add(1, Ordering::SeqCst);
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
    }

    fn node(builder: FanoutBuilder) -> Arc<Node> {
        // No redis client: a bare node whose background tasks never start.
        Shared::new(builder.into_config_for_tests()).node.clone()
    }

    fn outbox() -> Arc<Outbox> {
        Arc::new(Outbox::new(Limits {
            frames: 100,
            bytes: 1 << 20,
        }))
    }

    fn text(s: &str) -> Message {
        Message::Text(s.into())
    }

    #[tokio::test]
    async fn everything_queued_goes_out_with_one_flush_then_the_close_frame() {
        let node = node(FanoutBuilder::new("redis://unused"));
        let (sink, ob) = (Recorder::default(), outbox());
        for i in 0..10 {
            ob.offer(text(&i.to_string()), OverflowPolicy::Disconnect);
        }
        ob.close_after_flush(Some(going_away()));
        node.registry.writer_started();
        write_loop(sink.clone(), ob.clone(), node.clone(), 1).await;
        let frames = sink.frames.lock().unwrap();
        assert_eq!(frames.len(), 11);
        assert!(matches!(&frames[10], Message::Close(Some(c)) if c.code == GOING_AWAY_CODE));
        // One flush for the ten frames, one for the close frame.
        assert_eq!(sink.flushes.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_socket_gathers_frames_for_the_flush_interval() {
        let node =
            node(FanoutBuilder::new("redis://unused").flush_interval(Duration::from_millis(4)));
        let (sink, ob) = (Recorder::default(), outbox());
        node.registry.writer_started();
        let writer = tokio::spawn(write_loop(sink.clone(), ob.clone(), node.clone(), 1));
        // A lone frame goes out at once.
        ob.offer(text("a"), OverflowPolicy::Disconnect);
        tokio::time::sleep(Duration::from_micros(10)).await;
        assert_eq!(sink.flushes.load(Ordering::SeqCst), 1);
        // Two at once: the socket is busy, so what follows within 4 ms is gathered.
        ob.offer(text("b"), OverflowPolicy::Disconnect);
        ob.offer(text("c"), OverflowPolicy::Disconnect);
        tokio::time::sleep(Duration::from_micros(10)).await;
        assert_eq!(sink.flushes.load(Ordering::SeqCst), 2);
        for s in ["d", "e", "f"] {
            ob.offer(text(s), OverflowPolicy::Disconnect);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(sink.flushes.load(Ordering::SeqCst), 2, "still gathering");
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(
            sink.flushes.load(Ordering::SeqCst),
            3,
            "d, e, f in one flush"
        );
        assert_eq!(sink.frames.lock().unwrap().len(), 6);
        ob.close_now(1000, "bye");
        writer.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_times_out_closes_the_slow_consumer_and_counts_it() {
        let node = node(FanoutBuilder::new("redis://unused").write_timeout(Duration::from_secs(5)));
        let sink = Recorder {
            stall: true,
            ..Recorder::default()
        };
        let ob = outbox();
        ob.offer(text("never flushed"), OverflowPolicy::Disconnect);
        node.registry.writer_started();
        write_loop(sink, ob.clone(), node.clone(), 7).await;
        assert!(ob.is_closing());
        assert_eq!(node.stats().slow_disconnects, 1);
        assert_eq!(ob.held(), (0, 0), "nothing held after the close");
    }
}
