//! The bounded hop from the subscriber connection to the node's dispatcher: the [`Inbox`] the
//! connection's push callback offers each received message to, without ever waiting, and the
//! [`Outlet`] the dispatcher takes them from. It is the transport's edge: a received message
//! is a channel name and its bytes, and the dispatcher, above, makes sense of them.
//!
//! When the dispatcher falls behind, messages are dropped and counted (`inbound_dropped`), and
//! the windows of what each room lost are kept for the dispatcher to tell ([`Shed`]). The hop
//! also keeps the last instant the link was known to deliver ([`Delivered`]): where the
//! window of any loss starts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

use crate::channel;
use crate::config::Config;
use crate::stats::Counters;
use crate::time::unix_ms;

/// One message as the subscriber connection received it.
#[derive(Debug)]
pub(crate) struct Received {
    pub(crate) channel: Vec<u8>,
    pub(crate) envelope: Vec<u8>,
}

/// Messages of one room dropped before dispatch: the window and how many.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ShedWindow {
    pub(crate) first: SystemTime,
    pub(crate) last: SystemTime,
    pub(crate) count: u64,
}

/// What was shed, per room, between two dispatcher batches. Written by the push callback,
/// drained by the dispatcher, which tells the rooms' members.
#[derive(Debug, Default)]
pub(crate) struct Shed(Mutex<HashMap<String, ShedWindow>>);

impl Shed {
    /// Notes one message of `room` dropped now; a new window starts at `since()` (see
    /// [`Inbox::loss_since`]), asked only then: a burst of drops extends one window.
    fn note(&self, room: &str, since: impl FnOnce() -> SystemTime) {
        let now = SystemTime::now();
        let mut shed = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match shed.get_mut(room) {
            Some(window) => {
                window.last = now;
                window.count += 1;
            }
            None => {
                let window = ShedWindow {
                    first: since(),
                    last: now,
                    count: 1,
                };
                shed.insert(room.to_owned(), window);
            }
        }
    }

    pub(crate) fn take(&self) -> HashMap<String, ShedWindow> {
        let mut shed = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if shed.is_empty() {
            return HashMap::new();
        }
        std::mem::take(&mut *shed)
    }
}

/// The latest instant the subscriber link is known to have delivered, in ms since the Unix
/// epoch: the publisher's stamp of the newest envelope dispatched, or the send instant of the
/// newest probe that came back, whichever is later. Both are at or before the moment Redis
/// sent the message down the link, so they hold even when the node read them late (after a
/// pause, from its socket's buffer).
#[derive(Debug, Default)]
pub(crate) struct Delivered(AtomicU64);

impl Delivered {
    /// Notes a stamp read at `now_ms`; a stamp from the future (a skewed clock, a forged
    /// envelope) counts as now, so that a window never starts after the loss it reports.
    pub(crate) fn note(&self, stamp_ms: u64, now_ms: u64) {
        self.0.fetch_max(stamp_ms.min(now_ms), Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The sending side of the hop, held by the subscriber connection's push callback.
#[derive(Debug)]
pub(crate) struct Inbox {
    tx: mpsc::Sender<Received>,
    shed: Arc<Shed>,
    delivered: Arc<Delivered>,
    config: Arc<Config>,
    counters: Arc<Counters>,
}

impl Inbox {
    /// Hands `message` to the dispatcher without waiting: when the hop is full the message is
    /// dropped, counted, and its room's members will be told.
    pub(crate) fn offer(&self, message: Received) {
        if let Err(mpsc::error::TrySendError::Full(message)) = self.tx.try_send(message) {
            self.counters.inbound_dropped.add(1);
            if let Some(room) = channel::room_of(&self.config, &message.channel) {
                self.shed.note(&room, || self.loss_since());
            }
        }
    }

    /// The link was known to deliver at `at` (a probe sent then came back, or the link was
    /// just set up).
    pub(crate) fn delivered_at(&self, at: SystemTime) {
        self.delivered.note(unix_ms(at), unix_ms(SystemTime::now()));
    }

    /// Where a window of messages lost from now on starts: the last instant the link was known
    /// to deliver (see [`Delivered`]), less the publish timeout.
    ///
    /// Why less the timeout: a message that was not delivered reached Redis after the last one
    /// that was, but its publisher stamped it before queueing it, and a broadcast waits in its
    /// publisher's queue for at most the publish timeout before it is written or given up.
    /// So a lost message's stamp is no earlier than this, as long as the fleet's clocks agree
    /// and share the timeout. Never later than now.
    pub(crate) fn loss_since(&self) -> SystemTime {
        let now = SystemTime::now();
        let delivered = UNIX_EPOCH + Duration::from_millis(self.delivered.get());
        delivered
            .checked_sub(self.config.publish_timeout)
            .unwrap_or(UNIX_EPOCH)
            .min(now)
    }
}

/// The dispatcher's end of the hop.
#[derive(Debug)]
pub(crate) struct Outlet {
    pub(crate) rx: mpsc::Receiver<Received>,
    /// What the push callback shed, per room, for the dispatcher to tell.
    pub(crate) shed: Arc<Shed>,
    /// Where the dispatcher notes the newest publisher stamp it dispatched.
    pub(crate) delivered: Arc<Delivered>,
}

/// The hop, `capacity` messages deep. The [`Outlet`] ends once every [`Inbox`] is dropped.
pub(crate) fn hop(
    capacity: usize,
    config: Arc<Config>,
    counters: Arc<Counters>,
) -> (Inbox, Outlet) {
    let (tx, rx) = mpsc::channel(capacity);
    let shed = Arc::new(Shed::default());
    let delivered = Arc::new(Delivered::default());
    let inbox = Inbox {
        tx,
        shed: shed.clone(),
        delivered: delivered.clone(),
        config,
        counters,
    };
    (
        inbox,
        Outlet {
            rx,
            shed,
            delivered,
        },
    )
}
