//! What a socket's reader learns besides the client's messages: loss notices and failed
//! broadcasts, kept in the socket's queue state until its handler reads them, and the wake-up
//! that tells a waiting reader.

use std::sync::atomic::Ordering;

use super::Outbox;
use crate::error::Error;
use crate::missed::Missed;
use crate::room::RoomName;

/// Most unread broadcast failures one socket keeps for its reader.
pub(super) const MAX_FAILED: usize = 256;

/// Something the socket's reader should learn, from [`Outbox::take_notice`].
#[derive(Debug)]
pub(crate) enum Notice {
    /// Messages of a room may not have reached the socket.
    Missed(Missed),
    /// A broadcast this socket queued failed: the room, and why.
    BroadcastFailed(RoomName, Error),
}

impl Outbox {
    /// Tells the reader that messages of a room may have been missed.
    pub(crate) fn record_missed(&self, missed: Missed) {
        let mut s = self.lock();
        if s.close.is_some() {
            return;
        }
        match s.missed.iter_mut().find(|m| m.room() == missed.room()) {
            Some(earlier) => earlier.merge(&missed),
            None => s.missed.push(missed),
        }
        drop(s);
        self.has_notice.store(true, Ordering::Release);
        self.reader_wake.notify_waiters();
    }

    /// Tells the reader that a broadcast queued from this socket failed, its receipt being
    /// gone. Beyond [`MAX_FAILED`] unread failures, further ones are only logged (the
    /// publisher counts every failure in `publish_errors`).
    pub(crate) fn record_failed_broadcast(&self, room: RoomName, error: Error) {
        let mut s = self.lock();
        if s.close.is_some() {
            return;
        }
        if s.failed.len() >= MAX_FAILED {
            tracing::debug!(room = %room, error = %error, "broadcast failure not reported: too many unread");
            return;
        }
        s.failed.push_back((room, error));
        drop(s);
        self.has_notice.store(true, Ordering::Release);
        self.reader_wake.notify_waiters();
    }

    /// The oldest pending notice for the reader, if any: loss notices first.
    pub(crate) fn take_notice(&self) -> Option<Notice> {
        if !self.has_notice.load(Ordering::Acquire) {
            return None;
        }
        let mut s = self.lock();
        let notice = if s.missed.is_empty() {
            s.failed
                .pop_front()
                .map(|(room, error)| Notice::BroadcastFailed(room, error))
        } else {
            Some(Notice::Missed(s.missed.remove(0)))
        };
        if s.missed.is_empty() && s.failed.is_empty() {
            self.has_notice.store(false, Ordering::Release);
        }
        notice
    }

    /// The oldest pending loss notice, if any (tests of the loss paths).
    #[cfg(test)]
    pub(crate) fn take_missed(&self) -> Option<Missed> {
        match self.take_notice() {
            Some(Notice::Missed(missed)) => Some(missed),
            _ => None,
        }
    }

    /// Resolves once a close is requested or a notice is pending.
    ///
    /// # Cancel safety
    /// Cancel safe: it only waits.
    pub(crate) async fn reader_event(&self) {
        loop {
            let notified = self.reader_wake.notified();
            tokio::pin!(notified);
            // Register before checking the flags, so an event between the check and the wait
            // still wakes us (`notify_waiters` stores no permit).
            notified.as_mut().enable();
            if self.is_closing() || self.has_notice.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}
