//! The bounded send queue between the dispatcher and one socket's writer.
//!
//! The dispatcher (one task per node) must never wait for a socket, so it only ever *offers* a
//! frame: the offer returns at once with what happened ([`Offer`]), and a full queue is handled
//! by the overflow policy for that socket alone. The socket's writer task takes everything
//! queued (up to a batch cap), writes it and flushes once.
//!
//! The bound counts what is queued *plus* what the writer took and has not flushed yet, in both
//! frames and payload bytes: a client that stopped reading holds at most the configured bound,
//! however the bytes are split between queue and writer.
//!
//! While the writer waits for work its sink is *parked* here, and the dispatcher may write a
//! frame straight to it ([`Outbox::offer_or_write`]) when nothing is queued or being written:
//! one `send` on the dispatcher's thread instead of waking the writer's task, which on a
//! multi-threaded runtime means unparking a sibling worker to steal it, a large share of a
//! delivery's CPU at light load (BENCHMARKS.md). Nothing waits: a sink that is not ready, or
//! a flush that cannot finish at once, is handed back to the writer.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use tokio::sync::Notify;
use tokio::time::Instant;

mod notices;
mod parked;
mod reading;

use parked::Parked;
use reading::Reading;

pub(crate) use notices::Notice;
pub(crate) use reading::{ReadHalf, ReadItem, is_too_big};

use crate::close;
use crate::config::OverflowPolicy;
use crate::error::Error;
use crate::missed::Missed;
use crate::room::RoomName;

/// The limits one queue enforces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) frames: usize,
    pub(crate) bytes: usize,
}

/// What became of an offered frame. Plain values, not errors: every outcome is normal traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Offer {
    /// Written to the socket and flushed at once: its writer was idle.
    Written,
    /// Queued for the writer.
    Queued,
    /// Queued after dropping this many older frames (`DropOldest`).
    QueuedDroppingOldest(usize),
    /// Not queued: the queue is full (`DropNewest`, or `DropOldest` when the writer holds it all).
    Dropped,
    /// Not queued: the queue was full and the socket is now closing (`Disconnect`).
    Overflowed,
    /// Not queued: the socket is already closing.
    Closed,
}

/// What the writer should do next.
#[derive(Debug)]
pub(crate) enum Next {
    /// Write the frames now in the batch, then flush and call [`Outbox::flushed`].
    Frames,
    /// Send this close frame (if any) and stop.
    Close(Option<CloseFrame>),
}

#[derive(Debug)]
struct CloseRequest {
    frame: Option<CloseFrame>,
    /// Write what is queued before the close frame (a normal close), or discard it (overflow).
    flush_first: bool,
}

#[derive(Debug, Default)]
struct State {
    queued: VecDeque<Message>,
    queued_bytes: usize,
    // Taken by the writer and not flushed yet: still counted against the bound.
    writing_frames: usize,
    writing_bytes: usize,
    close: Option<CloseRequest>,
    /// A frame written to the parked sink could not be flushed at once: the writer must flush
    /// it (it is counted in `writing_*` until then).
    unflushed: bool,
    /// Loss notices for the reader, at most one per room (windows are merged).
    missed: Vec<Missed>,
    /// Broadcasts queued from this socket that failed after nobody awaited their receipt,
    /// for the reader; at most `notices::MAX_FAILED`.
    failed: VecDeque<(RoomName, Error)>,
    /// The rooms the socket is in: kept here, not in the handler's `FanoutSocket`, so that
    /// the node takes a closed socket out of them at once, whatever its handler is doing.
    rooms: Vec<RoomName>,
}

impl State {
    fn held_frames(&self) -> usize {
        self.queued.len() + self.writing_frames
    }
    fn held_bytes(&self) -> usize {
        self.queued_bytes + self.writing_bytes
    }
    fn fits(&self, len: usize, limits: &Limits) -> bool {
        // An empty queue takes any single frame, so a frame larger than the byte bound is still
        // delivered rather than silently unsendable.
        self.held_frames() == 0
            || (self.held_frames() < limits.frames && self.held_bytes() + len <= limits.bytes)
    }
}

/// One socket's bounded send queue.
#[derive(Debug)]
pub(crate) struct Outbox {
    state: Mutex<State>,
    /// Lock order: `sink` before `state`, and nobody waits for `sink` while holding `state`.
    sink: Parked,
    /// The reading half between the handler's reads (its own lock, never held with another).
    reading: Reading,
    limits: Limits,
    /// Wakes the writer: frames arrived or a close was requested. `notify_one` keeps a permit,
    /// so a wake-up between the writer's check and its wait is not lost.
    writer_wake: Notify,
    /// Set once a close is requested; readers wait on `reader_wake` for it.
    closing: AtomicBool,
    /// Set while `State::missed` or `State::failed` is not empty, so the reader's check needs
    /// no lock.
    has_notice: AtomicBool,
    /// Set once, by the fanout protocol's handler: this socket carries many rooms, so each
    /// room's messages reach it framed with their room (`Decoded::framed`), not bare.
    framed: AtomicBool,
    reader_wake: Notify,
    /// When the client was last heard from, in ms since `created`: the heartbeat's clock.
    created: Instant,
    last_seen_ms: AtomicU64,
}

/// Payload size of a frame, the unit of the byte bound.
pub(crate) fn frame_len(frame: &Message) -> usize {
    match frame {
        Message::Text(t) => t.len(),
        Message::Binary(b) => b.len(),
        Message::Ping(b) | Message::Pong(b) => b.len(),
        Message::Close(c) => c.as_ref().map_or(0, |c| c.reason.len() + 2),
    }
}

impl Outbox {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            state: Mutex::new(State::default()),
            sink: Parked::default(),
            reading: Reading::default(),
            limits,
            writer_wake: Notify::new(),
            closing: AtomicBool::new(false),
            has_notice: AtomicBool::new(false),
            framed: AtomicBool::new(false),
            reader_wake: Notify::new(),
            created: Instant::now(),
            last_seen_ms: AtomicU64::new(0),
        }
    }

    /// From now on, this socket takes room messages framed with their room.
    pub(crate) fn set_framed(&self) {
        self.framed.store(true, Ordering::Relaxed);
    }

    /// Whether this socket takes room messages framed with their room (the fanout protocol).
    pub(crate) fn is_framed(&self) -> bool {
        self.framed.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock can only come from a bug in this module; the state is
        // still consistent (every mutation is a few field updates), so keep going.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Offers a frame without waiting and wakes the writer if needed; a full queue applies
    /// `policy` (the policy of the room the frame comes from). See [`Offer`].
    pub(crate) fn offer(&self, frame: Message, policy: OverflowPolicy) -> Offer {
        let (offer, wake) = self.offer_deferred(frame, policy);
        if wake {
            self.wake();
        }
        offer
    }

    /// Like [`offer`](Outbox::offer), but leaves the wake-up to the caller: when the second
    /// value is `true`, call [`wake`](Outbox::wake) once done offering. The dispatcher offers a
    /// whole batch of envelopes first and wakes each writer once, so a writer that runs behind
    /// finds many frames to write with one flush instead of being woken per frame.
    pub(crate) fn offer_deferred(&self, frame: Message, policy: OverflowPolicy) -> (Offer, bool) {
        let len = frame_len(&frame);
        let mut s = self.lock();
        if s.close.is_some() {
            return (Offer::Closed, false);
        }
        let outcome = if s.fits(len, &self.limits) {
            Offer::Queued
        } else {
            match policy {
                OverflowPolicy::DropNewest => return (Offer::Dropped, false),
                OverflowPolicy::DropOldest => {
                    let mut dropped = 0;
                    while !s.fits(len, &self.limits) {
                        let Some(old) = s.queued.pop_front() else {
                            // Everything held is in the writer's hands: nothing left to drop but
                            // the new frame.
                            return (Offer::Dropped, false);
                        };
                        s.queued_bytes -= frame_len(&old);
                        dropped += 1;
                    }
                    Offer::QueuedDroppingOldest(dropped)
                }
                OverflowPolicy::Disconnect => {
                    drop(s);
                    self.close_slow_consumer();
                    return (Offer::Overflowed, false);
                }
            }
        };
        // Only the empty -> non-empty edge needs a wake-up: otherwise the writer either is busy
        // (and re-checks before waiting) or already holds a permit.
        let wake = s.queued.is_empty();
        s.queued_bytes += len;
        s.queued.push_back(frame);
        (outcome, wake)
    }

    /// Wakes the writer (after [`offer_deferred`](Outbox::offer_deferred) asked for it).
    pub(crate) fn wake(&self) {
        self.writer_wake.notify_one();
    }

    /// Closes after writing what is already queued (a normal close).
    pub(crate) fn close_after_flush(&self, frame: Option<CloseFrame>) {
        self.request_close(CloseRequest {
            frame,
            flush_first: true,
        });
    }

    /// Closes with 1013 `"slow consumer"` at once, discarding what is queued: the queue
    /// overflowed or a write timed out.
    pub(crate) fn close_slow_consumer(&self) {
        self.close_now(close::TRY_AGAIN_LATER, close::SLOW_CONSUMER_REASON);
    }

    /// Closes at once, discarding what is queued (overflow, write timeout).
    pub(crate) fn close_now(&self, code: u16, reason: &'static str) {
        self.request_close(CloseRequest {
            frame: Some(CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
            }),
            flush_first: false,
        });
    }

    fn request_close(&self, req: CloseRequest) {
        let mut s = self.lock();
        if s.close.is_some() {
            return;
        }
        if !req.flush_first {
            s.queued.clear();
            s.queued_bytes = 0;
        }
        s.close = Some(req);
        drop(s);
        self.closing.store(true, Ordering::Release);
        self.writer_wake.notify_one();
        self.reader_wake.notify_waiters();
    }

    /// `true` once a close was requested by either side.
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// The client was heard from (any frame, pongs included).
    pub(crate) fn touch(&self) {
        let ms = self.created.elapsed().as_millis() as u64;
        self.last_seen_ms.store(ms, Ordering::Relaxed);
    }

    /// How long ago the socket was attached.
    pub(crate) fn age(&self) -> std::time::Duration {
        self.created.elapsed()
    }

    /// How long the client has been silent.
    pub(crate) fn silent_for(&self) -> std::time::Duration {
        let last = std::time::Duration::from_millis(self.last_seen_ms.load(Ordering::Relaxed));
        self.created.elapsed().saturating_sub(last)
    }

    /// Waits for work and moves up to `max` queued frames into `batch`.
    ///
    /// Frames are not taken before `not_before`: a writer that flushed a moment ago waits out
    /// its flush interval, letting frames gather for one write, unless a full batch is already
    /// queued. A writer that has been idle passes `None` and takes the first frame at once.
    pub(crate) async fn next_batch(
        &self,
        batch: &mut Vec<Message>,
        max: usize,
        mut not_before: Option<Instant>,
    ) -> Next {
        loop {
            let wait_until = {
                let mut s = self.lock();
                let flush_pending = s.close.as_ref().is_some_and(|c| c.flush_first);
                if s.close.is_some() && (s.queued.is_empty() || !flush_pending) {
                    let frame = s.close.as_mut().and_then(|c| c.frame.take());
                    return Next::Close(frame);
                }
                // A full batch already waiting gains nothing from the flush interval (a write
                // carries at most `max` frames): a burst, such as a resume's replay, goes out
                // back to back instead of one batch per interval.
                if s.queued.is_empty() {
                    if s.unflushed {
                        return Next::Frames; // nothing to add: flush what the sink holds
                    }
                    // Going idle: give back the buffers the last burst grew. Most sockets
                    // are idle most of their life, and a queue and a batch kept at the size
                    // of their last burst cost every socket that ever received a frame about
                    // 0.3 KiB; growing them again is one allocation per burst, next to a
                    // socket write.
                    if s.queued.capacity() > 0 {
                        s.queued = VecDeque::new();
                    }
                    if batch.capacity() > 0 {
                        *batch = Vec::new();
                    }
                    None
                } else if let Some(at) = not_before
                    .filter(|at| !s.unflushed && s.queued.len() < max && Instant::now() < *at)
                {
                    Some(at)
                } else {
                    let n = s.queued.len().min(max);
                    let mut bytes = 0;
                    batch.extend(s.queued.drain(..n).inspect(|f| bytes += frame_len(f)));
                    s.queued_bytes -= bytes;
                    s.writing_frames += n;
                    s.writing_bytes += bytes;
                    return Next::Frames;
                }
            };
            match wait_until {
                Some(at) => {
                    tokio::time::sleep_until(at).await;
                    not_before = None;
                }
                None => self.writer_wake.notified().await,
            }
        }
    }

    /// Whether the socket is in `room`.
    pub(crate) fn has_room(&self, room: &RoomName) -> bool {
        self.lock().rooms.contains(room)
    }

    /// Counts `room` among the socket's rooms; `false` when it already was.
    pub(crate) fn add_room(&self, room: &RoomName) -> bool {
        let mut s = self.lock();
        if s.rooms.contains(room) {
            return false;
        }
        s.rooms.push(room.clone());
        true
    }

    /// Takes `room` out of the socket's rooms; `None` when it was not in it.
    pub(crate) fn remove_room(&self, room: &str) -> Option<RoomName> {
        let mut s = self.lock();
        let at = s.rooms.iter().position(|r| r.as_str() == room)?;
        Some(s.rooms.swap_remove(at))
    }

    /// The socket's rooms, without its user's own room (`crate::users`), which is the node's.
    pub(crate) fn rooms(&self) -> Vec<RoomName> {
        let s = self.lock();
        s.rooms.iter().filter(|r| !r.is_user()).cloned().collect()
    }

    /// How many of the application's rooms the socket is in (its user's own room not counted).
    pub(crate) fn room_count(&self) -> usize {
        let s = self.lock();
        s.rooms.iter().filter(|r| !r.is_user()).count()
    }

    /// Takes every room out, for leaving them all.
    pub(crate) fn take_rooms(&self) -> Vec<RoomName> {
        std::mem::take(&mut self.lock().rooms)
    }

    /// The writer flushed everything it took (and what was written straight to the sink
    /// before it): release it from the bound. Returns how many frames that flush carried.
    pub(crate) fn flushed(&self) -> usize {
        let mut s = self.lock();
        s.writing_bytes = 0;
        s.unflushed = false;
        std::mem::take(&mut s.writing_frames)
    }

    /// The text of every frame queued now, as a writer would take them (tests of the paths
    /// that feed queues: dispatcher, durable rooms).
    #[cfg(test)]
    pub(crate) async fn take_texts(&self) -> Vec<String> {
        let mut batch = Vec::new();
        match self.next_batch(&mut batch, usize::MAX, None).await {
            Next::Frames => batch.into_iter().map(testing::text_of).collect(),
            Next::Close(_) => Vec::new(),
        }
    }

    /// Frames and bytes held (queued plus unflushed), for tests and stats.
    #[cfg(test)]
    pub(crate) fn held(&self) -> (usize, usize) {
        let s = self.lock();
        (s.held_frames(), s.held_bytes())
    }
}

/// An in-memory sink for the tests of the queue and the writer.
#[cfg(test)]
pub(crate) mod testing {
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    use axum::extract::ws::Message;
    use futures_util::Sink;

    /// Records every frame and every flush; `stall` makes flushes hang, like a client that
    /// stopped reading once the TCP buffers are full; `broken` fails every send, like a client
    /// that is gone.
    #[derive(Clone, Default)]
    pub(crate) struct Recorder {
        pub(crate) frames: Arc<Mutex<Vec<Message>>>,
        pub(crate) flushes: Arc<AtomicUsize>,
        pub(crate) stall: bool,
        pub(crate) broken: bool,
    }

    impl Recorder {
        pub(crate) fn texts(&self) -> Vec<String> {
            let frames = self.frames.lock().expect("not poisoned");
            frames.iter().cloned().map(text_of).collect()
        }
    }

    /// The text of a frame; empty for one that is not text.
    /// A socket queue of 8 frames and 1 MiB, for tests of the structures that hold queues.
    pub(crate) fn outbox() -> std::sync::Arc<super::Outbox> {
        std::sync::Arc::new(super::Outbox::new(super::Limits {
            frames: 8,
            bytes: 1 << 20,
        }))
    }

    pub(crate) fn text_of(frame: Message) -> String {
        frame.into_text().map(|t| t.to_string()).unwrap_or_default()
    }

    impl Sink<Message> for Recorder {
        type Error = axum::Error;
        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
            if self.broken {
                return Err(axum::Error::new(std::io::Error::from(
                    std::io::ErrorKind::BrokenPipe,
                )));
            }
            self.frames.lock().expect("not poisoned").push(item);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An outbox whose `offer` always uses `policy`.
    struct Policed(Outbox, OverflowPolicy);

    impl std::ops::Deref for Policed {
        type Target = Outbox;
        fn deref(&self) -> &Outbox {
            &self.0
        }
    }

    impl Policed {
        fn offer(&self, frame: Message) -> Offer {
            self.0.offer(frame, self.1)
        }
    }

    fn outbox(frames: usize, bytes: usize, policy: OverflowPolicy) -> Policed {
        Policed(Outbox::new(Limits { frames, bytes }), policy)
    }

    fn text(s: &str) -> Message {
        Message::Text(s.into())
    }

    async fn take(o: &Outbox, max: usize) -> Vec<String> {
        let mut batch = Vec::new();
        match o.next_batch(&mut batch, max, None).await {
            Next::Frames => batch
                .into_iter()
                .map(|m| m.into_text().expect("text").to_string())
                .collect(),
            Next::Close(_) => panic!("unexpected close"),
        }
    }

    #[tokio::test]
    async fn batches_everything_queued_up_to_the_cap() {
        let o = outbox(100, 1 << 20, OverflowPolicy::Disconnect);
        for i in 0..10 {
            assert_eq!(o.offer(text(&i.to_string())), Offer::Queued);
        }
        assert_eq!(take(&o, 4).await, ["0", "1", "2", "3"]);
        assert_eq!(take(&o, 100).await, ["4", "5", "6", "7", "8", "9"]);
    }

    #[tokio::test]
    async fn unflushed_frames_count_against_the_bound() {
        let o = outbox(3, 1 << 20, OverflowPolicy::DropNewest);
        for _ in 0..3 {
            o.offer(text("a"));
        }
        let _ = take(&o, 10).await; // writer holds 3, not flushed
        assert_eq!(o.offer(text("b")), Offer::Dropped);
        assert_eq!(o.held(), (3, 3));
        o.flushed();
        assert_eq!(o.offer(text("b")), Offer::Queued);
        assert_eq!(o.held(), (1, 1));
    }

    #[test]
    fn byte_bound_is_enforced_but_one_big_frame_fits_an_empty_queue() {
        let o = outbox(100, 10, OverflowPolicy::DropNewest);
        assert_eq!(o.offer(text(&"x".repeat(50))), Offer::Queued);
        assert_eq!(o.offer(text("y")), Offer::Dropped);
        let o = outbox(100, 10, OverflowPolicy::DropNewest);
        assert_eq!(o.offer(text("12345")), Offer::Queued);
        assert_eq!(o.offer(text("12345")), Offer::Queued);
        assert_eq!(o.offer(text("1")), Offer::Dropped);
        assert_eq!(o.held(), (2, 10));
    }

    #[tokio::test]
    async fn drop_oldest_keeps_the_newest() {
        let o = outbox(3, 1 << 20, OverflowPolicy::DropOldest);
        for s in ["1", "2", "3"] {
            o.offer(text(s));
        }
        assert_eq!(o.offer(text("4")), Offer::QueuedDroppingOldest(1));
        assert_eq!(take(&o, 10).await, ["2", "3", "4"]);
        // The writer holds all three: nothing queued is left to drop.
        assert_eq!(o.offer(text("5")), Offer::Dropped);
    }

    #[tokio::test]
    async fn disconnect_discards_the_queue_and_closes_with_1013() {
        let o = outbox(2, 1 << 20, OverflowPolicy::Disconnect);
        o.offer(text("1"));
        o.offer(text("2"));
        assert_eq!(o.offer(text("3")), Offer::Overflowed);
        assert!(o.is_closing());
        assert_eq!(o.offer(text("4")), Offer::Closed);
        let mut batch = Vec::new();
        match o.next_batch(&mut batch, 10, None).await {
            Next::Close(Some(frame)) => {
                assert_eq!(frame.code, close::TRY_AGAIN_LATER);
                assert_eq!(frame.reason.as_str(), close::SLOW_CONSUMER_REASON);
            }
            other => panic!("{other:?}"),
        }
        assert!(batch.is_empty());
        o.reader_event().await; // resolves at once
    }

    #[tokio::test]
    async fn normal_close_writes_what_is_queued_first() {
        let o = outbox(10, 1 << 20, OverflowPolicy::Disconnect);
        o.offer(text("last words"));
        o.close_after_flush(None);
        assert_eq!(take(&o, 10).await, ["last words"]);
        o.flushed();
        let mut batch = Vec::new();
        assert!(matches!(
            o.next_batch(&mut batch, 10, None).await,
            Next::Close(None)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_recent_flush_makes_the_writer_wait_and_gather() {
        let o = outbox(10, 1 << 20, OverflowPolicy::Disconnect);
        o.offer(text("1"));
        let start = Instant::now();
        let not_before = start + std::time::Duration::from_millis(2);
        let mut batch = Vec::new();
        let next = {
            let fut = o.next_batch(&mut batch, 10, Some(not_before));
            tokio::pin!(fut);
            // Frames offered while the writer waits out its interval join the same batch.
            let pending = std::future::poll_fn(|cx| {
                std::task::Poll::Ready(std::future::Future::poll(fut.as_mut(), cx).is_pending())
            })
            .await;
            assert!(pending);
            o.offer(text("2"));
            fut.await
        };
        assert!(matches!(next, Next::Frames));
        assert_eq!(batch.len(), 2);
        assert!(Instant::now() >= not_before);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_is_taken_without_waiting_out_the_interval() {
        let o = outbox(100, 1 << 20, OverflowPolicy::Disconnect);
        for i in 0..10 {
            o.offer(text(&i.to_string()));
        }
        let start = Instant::now();
        let not_before = start + std::time::Duration::from_millis(4);
        let mut batch = Vec::new();
        // Four frames make a full batch of four: a burst (a resume's replay) must not pay the
        // flush interval once per batch.
        assert!(matches!(
            o.next_batch(&mut batch, 4, Some(not_before)).await,
            Next::Frames
        ));
        assert_eq!(batch.len(), 4);
        assert_eq!(
            Instant::now(),
            start,
            "a full batch waited for the interval"
        );
        // Fewer than a batch left: the interval holds again.
        batch.clear();
        o.flushed();
        let mut rest = Vec::new();
        let _ = o.next_batch(&mut rest, 4, None).await;
        assert_eq!(rest.len(), 4);
        o.flushed();
        let not_before = Instant::now() + std::time::Duration::from_millis(4);
        assert!(matches!(
            o.next_batch(&mut batch, 4, Some(not_before)).await,
            Next::Frames
        ));
        assert_eq!(batch.len(), 2);
        assert!(Instant::now() >= not_before);
    }

    #[tokio::test]
    async fn deferred_offers_ask_for_one_wake_per_empty_queue() {
        let o = outbox(10, 1 << 20, OverflowPolicy::Disconnect);
        let p = OverflowPolicy::Disconnect;
        assert_eq!(o.offer_deferred(text("1"), p), (Offer::Queued, true));
        assert_eq!(o.offer_deferred(text("2"), p), (Offer::Queued, false));
        o.wake();
        assert_eq!(take(&o, 10).await, ["1", "2"]);
        assert_eq!(o.offer_deferred(text("3"), p), (Offer::Queued, true));
    }

    #[tokio::test]
    async fn writer_wakes_for_a_frame_offered_while_it_waits() {
        let o = std::sync::Arc::new(outbox(10, 1 << 20, OverflowPolicy::Disconnect).0);
        let o2 = o.clone();
        let waiter = tokio::spawn(async move { take(&o2, 10).await });
        tokio::task::yield_now().await;
        o.offer(text("hello"), OverflowPolicy::Disconnect);
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("writer woke")
            .expect("task");
        assert_eq!(got, ["hello"]);
    }

    #[tokio::test]
    async fn an_idle_writers_sink_takes_a_frame_at_once() {
        let o = outbox(10, 1 << 20, OverflowPolicy::Disconnect);
        let p = OverflowPolicy::Disconnect;
        // No sink parked: the writer is writing, so the frame is queued.
        assert_eq!(o.offer_or_write(text("1"), p), (Offer::Queued, true));
        assert_eq!(take(&o, 10).await, ["1"]);
        let sink = testing::Recorder::default();
        o.park(Box::pin(sink.clone()));
        // Taken by the writer and not flushed yet: the next frame must wait behind it.
        assert_eq!(o.offer_or_write(text("2"), p), (Offer::Queued, true));
        assert!(sink.texts().is_empty());
        o.flushed();
        assert_eq!(take(&o, 10).await, ["2"]);
        o.flushed();
        // Idle: written and flushed at once, nothing held against the bound.
        assert_eq!(o.offer_or_write(text("3"), p), (Offer::Written, false));
        assert_eq!(sink.texts(), ["3"]);
        assert_eq!(sink.flushes.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(o.held(), (0, 0));
        // Something queued: the new frame goes behind it.
        o.offer(text("4"));
        assert_eq!(o.offer_or_write(text("5"), p), (Offer::Queued, false));
        assert_eq!(take(&o, 10).await, ["4", "5"]);
        assert_eq!(sink.texts(), ["3"]);
    }

    #[tokio::test]
    async fn a_flush_that_cannot_finish_at_once_is_left_to_the_writer() {
        let o = outbox(2, 1 << 20, OverflowPolicy::DropNewest);
        let p = OverflowPolicy::DropNewest;
        let sink = testing::Recorder {
            stall: true,
            ..Default::default()
        };
        o.park(Box::pin(sink.clone()));
        assert_eq!(o.offer_or_write(text("a"), p), (Offer::Queued, true));
        assert_eq!(sink.texts(), ["a"], "in the sink, not flushed");
        assert_eq!(o.held(), (1, 1), "held against the bound until flushed");
        // The next frame queues behind it, and the bound (2 frames) counts both.
        assert_eq!(o.offer_or_write(text("b"), p), (Offer::Queued, true));
        assert_eq!(o.offer_or_write(text("c"), p), (Offer::Dropped, false));
        assert_eq!(take(&o, 10).await, ["b"]);
        assert_eq!(o.flushed(), 2, "the writer's flush carried both");
        // With nothing queued, the writer is still told to flush.
        assert_eq!(o.offer_or_write(text("d"), p), (Offer::Queued, true));
        let mut batch = Vec::new();
        assert!(matches!(
            o.next_batch(&mut batch, 10, None).await,
            Next::Frames
        ));
        assert!(batch.is_empty());
        assert_eq!(o.flushed(), 1);
    }

    #[test]
    fn a_failed_write_closes_the_socket_and_a_closing_one_takes_nothing() {
        let o = outbox(10, 1 << 20, OverflowPolicy::Disconnect);
        let p = OverflowPolicy::Disconnect;
        o.park(Box::pin(testing::Recorder {
            broken: true,
            ..Default::default()
        }));
        assert_eq!(o.offer_or_write(text("a"), p), (Offer::Closed, false));
        assert!(o.is_closing());
        assert_eq!(o.held(), (0, 0));
        assert_eq!(o.offer_or_write(text("b"), p), (Offer::Closed, false));
    }
}
