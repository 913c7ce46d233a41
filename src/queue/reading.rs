//! The socket's reading half, kept here whenever the handler is not reading it, so that the
//! node (the socket's writer task) reads the client's control frames itself: a handler that
//! only pushes (a dashboard, a notification socket) and never calls `recv` still has its
//! pongs read, its client's close answered and a dead client noticed.
//!
//! Whoever reads holds the half: the handler takes it for the length of one `recv` and puts it
//! back when that call ends (returns or is cancelled); in between, the writer polls it. A data
//! frame the writer reads is held here for the handler's next `recv`, and the writer reads no
//! more until it is taken: the client's messages keep their order, and a client that sends to
//! a handler that never reads meets TCP backpressure rather than growing a buffer.
//!
//! Giving the half back does not wake the writer: a handler that reads in a loop takes it back
//! at once, and a wake-up per client message would cost a busy node a task switch each. The
//! writer polls the half whenever it wakes for anything else, and the heartbeat's ping wakes it
//! once per interval: a handler that stopped reading has its client's pongs read within an
//! interval, and once the writer has polled the half, the client's next frame (a pong, a
//! close) wakes it directly. A socket attached by a handler that never reads is polled from
//! the start.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::StreamExt;
use futures_util::stream::SplitStream;

use super::Outbox;
use crate::close;

/// A socket's reading half.
pub(crate) type ReadHalf = SplitStream<WebSocket>;

/// One thing read from the client: a frame, a read error, or `None` when the stream ended.
pub(crate) type ReadItem = Option<Result<Message, axum::Error>>;

/// What a read means for the connection, whoever read it (the handler in `recv`, or the
/// writer while the handler does not read): see [`Outbox::after_read`].
#[derive(Debug, Clone, Copy)]
enum IdleRead {
    /// A ping, a pong or a data frame: the client is alive.
    Heard,
    /// The client sent a close frame, or the stream ended.
    Closed,
    /// A read error; `too_big` when the frame was over the size limit.
    Failed { too_big: bool },
}

#[derive(Default)]
struct Slot {
    /// The half, unless the handler is reading it.
    stream: Option<ReadHalf>,
    /// Read by the writer, not yet taken by the handler (boxed: rare, and every idle socket
    /// would otherwise keep room for a frame here).
    pending: Option<Box<ReadItem>>,
    /// The stream ended or failed: nothing more to read.
    ended: bool,
}

/// The reading half between the handler's reads.
#[derive(Default)]
pub(super) struct Reading {
    slot: Mutex<Slot>,
    /// The handler holds the half: the writer need not look (no lock).
    lent: AtomicBool,
}

impl std::fmt::Debug for Reading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reading")
    }
}

impl Reading {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        // Held for a field update or one non-blocking poll; a panic there leaves it consistent.
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Outbox {
    /// Hands the socket's reading half to the node, at attach.
    pub(crate) fn park_stream(&self, stream: ReadHalf) {
        self.reading.lock().stream = Some(stream);
        self.writer_wake.notify_one();
    }

    /// For the handler's `recv`: what the writer read meanwhile (`Err`), or else the reading
    /// half itself (`Ok`), to be given back with [`return_stream`](Outbox::return_stream).
    pub(crate) fn take_stream(&self) -> Result<ReadHalf, ReadItem> {
        let mut slot = self.reading.lock();
        if let Some(item) = slot.pending.take() {
            drop(slot);
            // The writer may read again.
            self.writer_wake.notify_one();
            return Err(*item);
        }
        // Only the handler takes the half, and it gives it back whenever its `recv` ends; a
        // missing half therefore means it is gone with the connection: read as the end.
        let stream = slot.stream.take().ok_or(None)?;
        self.reading.lent.store(true, Ordering::Release);
        Ok(stream)
    }

    /// Gives the reading half back when the handler's `recv` ends (without waking the writer:
    /// see the module docs).
    pub(crate) fn return_stream(&self, stream: ReadHalf) {
        let mut slot = self.reading.lock();
        slot.stream = Some(stream);
        self.reading.lent.store(false, Ordering::Release);
    }

    /// For the writer: reads the next item while the handler is not reading. Pending while the
    /// handler holds the half, an item waits for the handler, or the stream ended.
    ///
    /// The read and the hold happen under one lock, so a handler that takes the half right
    /// after finds the item instead.
    pub(crate) fn poll_idle_read(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.reading.lent.load(Ordering::Acquire) {
            // Whatever wakes the writer next (a frame, a ping, the half given back and
            // another wake-up) makes it look again.
            return Poll::Pending;
        }
        let mut slot = self.reading.lock();
        if slot.ended || slot.pending.is_some() {
            return Poll::Pending;
        }
        let Some(stream) = slot.stream.as_mut() else {
            return Poll::Pending;
        };
        let item = match stream.poll_next_unpin(cx) {
            Poll::Ready(item) => item,
            Poll::Pending => return Poll::Pending,
        };
        let read = IdleRead::of(&item);
        if !matches!(item, Some(Ok(Message::Ping(_) | Message::Pong(_)))) {
            // Anything but a ping or a pong waits for the handler.
            slot.ended = !matches!(read, IdleRead::Heard);
            slot.pending = Some(Box::new(item));
        }
        // Acted on outside the slot's lock: it is a leaf, and a close takes the queue's.
        drop(slot);
        self.act_on(read);
        Poll::Ready(())
    }

    /// What a read means for the connection, whoever made it: the client was heard; a close
    /// frame, the end of the stream or an error closes the socket (1009 for a frame over the
    /// size limit). The one home of that rule: the handler's `recv` and the writer both call
    /// it, and acting twice on one item is harmless (a second close request is ignored).
    pub(crate) fn after_read(&self, item: &ReadItem) {
        self.act_on(IdleRead::of(item));
    }

    fn act_on(&self, read: IdleRead) {
        self.touch();
        match read {
            IdleRead::Heard => {}
            IdleRead::Closed => self.close_after_flush(None),
            IdleRead::Failed { too_big: true } => {
                tracing::debug!("client message over the size limit; closing with 1009");
                self.close_after_flush(Some(CloseFrame {
                    code: close::MESSAGE_TOO_BIG,
                    reason: Utf8Bytes::from_static(close::MESSAGE_TOO_BIG_REASON),
                }));
            }
            IdleRead::Failed { too_big: false } => self.close_after_flush(None),
        }
    }
}

impl IdleRead {
    fn of(item: &ReadItem) -> Self {
        match item {
            Some(Ok(Message::Close(_))) | None => IdleRead::Closed,
            Some(Ok(_)) => IdleRead::Heard,
            Some(Err(e)) => IdleRead::Failed {
                too_big: is_too_big(e),
            },
        }
    }
}

/// Whether a read error is a frame over the size limit (closed with 1009, not as a failure).
pub(crate) fn is_too_big(e: &axum::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<tungstenite::Error>())
        .is_some_and(|e| matches!(e, tungstenite::Error::Capacity(_)))
}
