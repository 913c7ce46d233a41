//! The writer's sink, parked in its socket's queue while the writer waits for work, and the
//! write straight to it: one `send` on the dispatcher's thread instead of waking the writer's
//! task (see the parent module). Nothing here waits: a sink that is not ready, or a flush that
//! cannot finish at once, is handed back to the writer.

use std::pin::Pin;
use std::sync::{Mutex, PoisonError, TryLockError};
use std::task::{Context, Poll, Waker};

use axum::extract::ws::Message;
use futures_util::Sink;

use super::{Offer, Outbox, frame_len};
use crate::config::OverflowPolicy;

/// A socket's writing half, as the writer parks it.
pub(crate) type BoxSink = Pin<Box<dyn Sink<Message, Error = axum::Error> + Send>>;

/// The writer's sink while the writer waits for work (`None` while it writes).
#[derive(Default)]
pub(super) struct Parked(Mutex<Option<BoxSink>>);

impl std::fmt::Debug for Parked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Parked")
    }
}

impl Outbox {
    /// Like [`offer_deferred`](Outbox::offer_deferred), but first tries to write the frame
    /// straight to the socket: when the writer is idle (nothing queued, nothing being written,
    /// its sink parked) and the sink takes the frame and flushes without waiting, the result is
    /// [`Offer::Written`]. Otherwise the frame is queued as usual; a frame the sink took but
    /// could not flush at once is left to the writer (`Offer::Queued`, wake it).
    ///
    /// The write runs on the caller's thread: callers use it at light load only, where it saves
    /// a task wake-up per frame, and queue under load, where writers batch.
    pub(crate) fn offer_or_write(&self, frame: Message, policy: OverflowPolicy) -> (Offer, bool) {
        match self.try_write(frame) {
            Ok(done) => done,
            Err(frame) => self.offer_deferred(frame, policy),
        }
    }

    /// The write of [`offer_or_write`](Outbox::offer_or_write); gives the frame back when the
    /// writer is not idle or the sink is not ready.
    fn try_write(&self, frame: Message) -> Result<(Offer, bool), Message> {
        // `try_lock`: the writer may be taking its sink right now; then it will find the frame
        // queued.
        let mut parked = match self.sink.0.try_lock() {
            Ok(parked) => parked,
            Err(TryLockError::WouldBlock | TryLockError::Poisoned(_)) => return Err(frame),
        };
        let Some(sink) = parked.as_mut() else {
            return Err(frame); // the writer holds it: it is writing
        };
        let len = frame_len(&frame);
        {
            let mut s = self.lock();
            // (A frame left unflushed is still counted in `writing_frames`.)
            if s.close.is_some() || !s.queued.is_empty() || s.writing_frames > 0 {
                return Err(frame); // older frames first
            }
            // Counted against the bound until flushed, like a writer's batch.
            s.writing_frames = 1;
            s.writing_bytes = len;
        }
        // Nothing may wait here: a `Pending` hands the work to the writer, whose own waker then
        // registers when it polls.
        let mut cx = Context::from_waker(Waker::noop());
        let written = match sink.as_mut().poll_ready(&mut cx) {
            Poll::Pending => {
                self.release_one(len);
                return Err(frame);
            }
            Poll::Ready(Ok(())) => match sink.as_mut().start_send(frame) {
                Ok(()) => sink.as_mut().poll_flush(&mut cx),
                Err(e) => Poll::Ready(Err(e)),
            },
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        };
        // Still holding the sink: the writer cannot have flushed (and reset the counts) since
        // the reservation above.
        Ok(match written {
            Poll::Ready(Ok(())) => {
                self.release_one(len);
                (Offer::Written, false)
            }
            Poll::Pending => {
                self.lock().unflushed = true;
                (Offer::Queued, true)
            }
            Poll::Ready(Err(e)) => {
                // The client is gone, as when the writer's write fails.
                tracing::debug!(error = %e, "write failed; closing");
                self.release_one(len);
                drop(parked);
                self.close_after_flush(None);
                (Offer::Closed, false)
            }
        })
    }

    /// Releases one frame of `len` bytes written straight to the sink from the bound.
    fn release_one(&self, len: usize) {
        let mut s = self.lock();
        s.writing_frames = s.writing_frames.saturating_sub(1);
        s.writing_bytes = s.writing_bytes.saturating_sub(len);
    }

    /// Parks the writer's sink while it waits for work (see [`offer_or_write`](Outbox::offer_or_write)).
    pub(crate) fn park(&self, sink: BoxSink) {
        *self.sink.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(sink);
    }

    /// Takes the parked sink back for the writer. Waits at most for one frame's write in
    /// progress on another thread (a few microseconds: it never waits for the socket).
    pub(crate) fn unpark(&self) -> Option<BoxSink> {
        self.sink
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}
