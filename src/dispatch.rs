//! The dispatcher: from messages received on the subscriber connection to frames in the local
//! sockets' queues.
//!
//! Received messages cross a *bounded* hop, the [`Inbox`], from the connection's push callback
//! to one dispatcher task per node. The callback never waits: when the dispatcher falls behind,
//! messages are dropped and counted (`inbound_dropped`) and the rooms' members are told, instead
//! of queueing without limit. The dispatcher decodes each envelope once, offers the one frame to
//! every local socket of the room (never waiting for a socket) and wakes each writer once per
//! batch. It knows nothing of Redis: a received message is a channel name and its bytes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::bus::{Delivered, Inbox, Outlet, Received, Shed, hop};
use crate::channel;
use crate::config::Config;
use crate::durable::Durable;
use crate::envelope;
use crate::registry::{Dispatched, Members, Offers, Registry};
use crate::room::RoomName;
use crate::stats::Counters;
use crate::time::unix_ms;

/// Most envelopes dispatched before the writers they fed are woken. Under load the hop holds
/// many envelopes and each writer then finds many frames to send with one flush; when traffic
/// is light a batch is a single envelope and nothing waits.
const DISPATCH_BATCH: usize = 256;

/// A batch of at most this many envelopes, at a light rate ([`LIGHT_PER_WINDOW`]), is light
/// load: the dispatcher writes its frames straight to idle sockets (at most [`WRITE_BUDGET`]
/// of them) rather than waking their writers. A longer batch means the dispatcher is behind,
/// and frames are only queued: the writers, spread over the runtime's workers, then write
/// many frames per flush.
const WRITE_FROM_BATCH: usize = 2;

/// Most frames one light batch writes itself: a big room's other members are queued, so that
/// the dispatcher does not spend longer writing than the writers would take to wake.
const WRITE_BUDGET: usize = 64;

/// The window over which the dispatcher's rate is measured.
const LOAD_WINDOW: Duration = Duration::from_millis(10);

/// Most deliveries per [`LOAD_WINDOW`] that count as a light rate: 50,000 a second, about a
/// sixth of one core in `send`s on the dispatcher's thread. Faster, even in short batches,
/// frames are queued: writing them all on that one thread, one `send` each, loses to writers
/// that batch on every worker at the sweep's ceiling (BENCHMARKS.md).
const LIGHT_PER_WINDOW: u64 = 500;

/// Where fleet commands go (`crate::users`): an envelope with a `command` object is never a
/// socket's message; the dispatcher hands it over with the room's local sockets, and the
/// feature acts on them without making the dispatcher wait.
pub(crate) trait Commands: Send + Sync + std::fmt::Debug {
    /// Applies `command` (its JSON text) to `members`, the local sockets of `room`.
    fn apply(&self, room: &RoomName, command: &str, members: Members);
}

/// The receiving side: one task per node.
#[derive(Debug)]
pub(crate) struct Dispatcher {
    rx: tokio::sync::mpsc::Receiver<Received>,
    shed: Arc<Shed>,
    delivered: Arc<Delivered>,
    config: Arc<Config>,
    registry: Arc<Registry>,
    counters: Arc<Counters>,
    /// Durable rooms' envelopes go through it, to be delivered in seq order.
    durable: Arc<Durable>,
    /// Fleet commands go to it.
    commands: Arc<dyn Commands>,
    malformed_log: LogLimiter,
    dropped_log: LogLimiter,
    shed_log: LogLimiter,
    load: Load,
    /// Reused batch after batch (its list of writers to wake keeps its capacity).
    offers: Offers,
    /// The lag of the last message dispatched, in ms (`Stats::dispatch_lag_ms`).
    lag_ms: Arc<AtomicU64>,
    /// `axum_fanout_dispatch_lag_seconds`, taken once (see `stats::Counter` for why).
    lag: metrics::Histogram,
}

/// The hop between the subscriber connection and the dispatcher, `capacity` messages deep.
/// The dispatcher ends once every [`Inbox`] is dropped.
pub(crate) fn channel(
    capacity: usize,
    config: Arc<Config>,
    registry: Arc<Registry>,
    counters: Arc<Counters>,
    durable: Arc<Durable>,
    commands: Arc<dyn Commands>,
    lag_ms: Arc<AtomicU64>,
) -> (Inbox, Dispatcher) {
    let (
        inbox,
        Outlet {
            rx,
            shed,
            delivered,
        },
    ) = hop(capacity, config.clone(), counters.clone());
    let every = Duration::from_secs(10);
    let dispatcher = Dispatcher {
        rx,
        shed,
        delivered,
        config,
        registry,
        counters,
        durable,
        commands,
        malformed_log: LogLimiter::new(every),
        dropped_log: LogLimiter::new(every),
        shed_log: LogLimiter::new(every),
        load: Load::default(),
        offers: Offers::queueing(),
        lag_ms,
        lag: metrics::histogram!("axum_fanout_dispatch_lag_seconds"),
    };
    (inbox, dispatcher)
}

impl Dispatcher {
    /// Dispatches until every [`Inbox`] is gone.
    pub(crate) async fn run(mut self) {
        let mut batch = Vec::with_capacity(DISPATCH_BATCH);
        while self.rx.recv_many(&mut batch, DISPATCH_BATCH).await > 0 {
            self.dispatch(&mut batch);
        }
    }

    /// Tells the members of rooms that lost messages in the hop, then decodes and offers every
    /// message of `batch` (emptying it), counts, and wakes each writer that needs it once.
    fn dispatch(&mut self, batch: &mut Vec<Received>) {
        self.tell_shed();
        let (config, registry) = (&*self.config, &*self.registry);
        let mut total = Dispatched::default();
        let (mut received, mut malformed) = (0, 0);
        let mut newest_stamp = 0;
        // One clock read per batch, one record per message.
        let now_ms = unix_ms(SystemTime::now());
        let mut last_lag = None;
        let any_durable = config.durable.is_some() || !config.durable_rooms.is_empty();
        let light = self.load.is_light(Instant::now()) && batch.len() <= WRITE_FROM_BATCH;
        self.offers.start(if light { WRITE_BUDGET } else { 0 });
        for Received {
            channel,
            envelope: raw,
        } in batch.drain(..)
        {
            let Some(room) = channel::room_of(config, &channel) else {
                continue;
            };
            let room = &*room;
            let decoded = match envelope::decode(
                &raw,
                room,
                &config.node_id,
                config.max_envelope_bytes.get(),
            ) {
                Ok(decoded) => decoded,
                Err(why) => {
                    malformed += 1;
                    if let Some(suppressed) = self.malformed_log.allow() {
                        tracing::warn!(
                            room,
                            reason = %why,
                            bytes = raw.len(),
                            suppressed,
                            "dropped a malformed envelope"
                        );
                    }
                    continue;
                }
            };
            received += 1;
            if let Some(ts) = decoded.ts {
                newest_stamp = newest_stamp.max(ts);
                let ms = now_ms.saturating_sub(ts);
                self.lag.record(ms as f64 / 1000.0);
                last_lag = Some(ms);
            }
            if decoded.command {
                self.command(room, &decoded.frame);
                continue;
            }
            if any_durable && self.durable.is_durable(room) {
                total += self.durable.on_live(room, decoded, &mut self.offers);
                continue;
            }
            let out = registry.dispatch_decoded(
                room,
                &decoded,
                config.overflow_for(room),
                &mut self.offers,
            );
            if out.overflowed > 0 {
                tracing::warn!(
                    room,
                    sockets = out.overflowed,
                    "closed slow consumers: send queue full"
                );
            }
            total += out;
        }
        if total.dropped > total.overflowed
            && let Some(suppressed) = self.dropped_log.allow()
        {
            tracing::warn!(
                dropped = total.dropped - total.overflowed,
                batches_suppressed = suppressed,
                "dropped frames for sockets whose send queue is full (overflow policy)"
            );
        }
        // Count before waking, so that whoever sees a queued frame also sees it counted (a
        // frame written straight to a socket is counted a moment after its write).
        let c = &self.counters;
        c.received.add(received);
        c.malformed.add(malformed);
        total.count(c);
        if newest_stamp > 0 {
            self.delivered.note(newest_stamp, now_ms);
        }
        if let Some(ms) = last_lag {
            self.lag_ms.store(ms, Ordering::Relaxed);
        }
        self.load.count(total.delivered);
        self.offers.wake();
    }

    /// Hands a fleet command to its feature with the room's local sockets (none: nothing to do).
    fn command(&self, room: &str, frame: &axum::extract::ws::Message) {
        let Some((room, members)) = self.registry.members(room) else {
            return;
        };
        if let axum::extract::ws::Message::Text(command) = frame {
            self.commands.apply(&room, command.as_str(), members);
        }
    }

    fn tell_shed(&mut self) {
        let shed = self.shed.take();
        if shed.is_empty() {
            return;
        }
        if self.shed_log.allow().is_some() {
            tracing::warn!(
                rooms = shed.len(),
                messages = shed.values().map(|w| w.count).sum::<u64>(),
                total = self.counters.inbound_dropped.get(),
                "dispatcher fell behind: dropped messages between redis and the dispatcher"
            );
        }
        for (room, w) in shed {
            if self.durable.is_durable(&room) {
                // Read back from the room's history rather than reported.
                self.durable.repair_shed(&room);
            } else {
                self.registry.shed(&room, w.first, w.last, w.count);
            }
        }
    }
}

/// The dispatcher's recent rate: deliveries in the current [`LOAD_WINDOW`].
#[derive(Debug)]
struct Load {
    since: Instant,
    deliveries: u64,
    light: bool,
}

impl Default for Load {
    fn default() -> Self {
        Self {
            since: Instant::now(),
            deliveries: 0,
            light: true,
        }
    }
}

impl Load {
    /// Whether the rate is light at `now`: the last window held at most [`LIGHT_PER_WINDOW`]
    /// deliveries (per window, after an idle stretch), and the current one does not hold more
    /// already.
    fn is_light(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.since);
        if elapsed >= LOAD_WINDOW {
            let windows = (elapsed.as_micros() / LOAD_WINDOW.as_micros()) as u64;
            self.light = self.deliveries <= LIGHT_PER_WINDOW.saturating_mul(windows);
            self.since = now;
            self.deliveries = 0;
        }
        self.light
    }

    /// Counts a batch's deliveries.
    fn count(&mut self, deliveries: u64) {
        self.deliveries += deliveries;
        if self.deliveries > LIGHT_PER_WINDOW {
            self.light = false;
        }
    }
}

/// Logs at most once per interval, counting what it held back.
#[derive(Debug)]
struct LogLimiter {
    every: Duration,
    next: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    fn new(every: Duration) -> Self {
        Self {
            every,
            next: None,
            suppressed: 0,
        }
    }

    /// Returns how many events were suppressed since the last log, or `None` to stay quiet.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.next.is_some_and(|next| now < next) {
            self.suppressed += 1;
            return None;
        }
        self.next = Some(now + self.every);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::SystemTime;

    use super::*;
    use crate::config::{FanoutBuilder, OverflowPolicy};
    use crate::queue::testing::Recorder;
    use crate::queue::{Limits, Outbox};
    use crate::registry::SocketId;
    use crate::room::RoomName;
    use crate::time::unix_ms;

    #[derive(Debug)]
    struct NoCommands;

    impl Commands for NoCommands {
        fn apply(&self, _: &RoomName, _: &str, _: Members) {}
    }

    /// A dispatcher with no connection behind it: the tests play the subscriber connection
    /// through the [`Inbox`], as `bus::subscriber` does with what Redis pushes.
    fn dispatcher(capacity: usize) -> (Inbox, Dispatcher, Arc<Registry>, Arc<Counters>) {
        let config = Arc::new(FanoutBuilder::new("redis://unused").into_config_for_tests());
        let (registry, counters) = (Arc::new(Registry::default()), Arc::new(Counters::default()));
        let durable = Arc::new(Durable::new(
            config.clone(),
            registry.clone(),
            counters.clone(),
        ));
        let (inbox, d) = channel(
            capacity,
            config,
            registry.clone(),
            counters.clone(),
            durable,
            Arc::new(NoCommands),
            Arc::default(),
        );
        (inbox, d, registry, counters)
    }

    fn member(registry: &Registry, room: &str) -> Arc<Outbox> {
        let outbox = Arc::new(Outbox::new(Limits {
            frames: 16,
            bytes: 1 << 20,
        }));
        // Ids unique across the test binary, as a node's lifecycle hands them out.
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let id = SocketId::from_wire(NEXT.fetch_add(1, Ordering::Relaxed));
        registry.insert(&RoomName::new(room).expect("valid"), id, outbox.clone());
        outbox
    }

    fn received(channel: &str, envelope: &str) -> Received {
        Received {
            channel: channel.as_bytes().to_vec(),
            envelope: envelope.as_bytes().to_vec(),
        }
    }

    #[tokio::test]
    async fn a_loss_starts_the_publish_timeout_before_the_newest_stamp_dispatched() {
        let (inbox, mut d, registry, _) = dispatcher(64);
        let _member = member(&registry, "a");
        let timeout = d.config.publish_timeout;
        let ms = |t: SystemTime| unix_ms(t);
        let now = SystemTime::now();
        // The link came up an hour ago and nothing was read since: the window starts there.
        inbox.delivered_at(now - Duration::from_secs(3600));
        assert_eq!(
            ms(inbox.loss_since()),
            ms(now - Duration::from_secs(3600) - timeout)
        );
        // An envelope stamped a minute ago, read now (late, say after a pause): its stamp
        // counts, not the instant it was read. Garbage and envelopes without a stamp do not.
        let stamp = ms(now) - 60_000;
        let mut batch = vec![
            received("ws:room:a", &format!(r#"{{"payload":1,"ts":{stamp}}}"#)),
            received("ws:room:a", r#"{"payload":2}"#),
            received("ws:room:a", r#"{"ts":99999999999999}"#),
        ];
        d.dispatch(&mut batch);
        assert_eq!(ms(inbox.loss_since()), stamp - timeout.as_millis() as u64);
        // A stamp from the future (a skewed clock) counts as now: a window never starts
        // after the loss it reports.
        let mut batch = vec![received(
            "ws:room:a",
            &format!(r#"{{"payload":3,"ts":{}}}"#, ms(now) + 3_600_000),
        )];
        d.dispatch(&mut batch);
        let since = inbox.loss_since();
        assert!(since <= SystemTime::now() - timeout + Duration::from_millis(5));
        assert!(since >= now - timeout - Duration::from_millis(5));
    }

    #[tokio::test]
    async fn each_envelope_reaches_its_rooms_members_once_and_garbage_is_counted() {
        let (inbox, mut d, registry, counters) = dispatcher(64);
        let (a1, a2, b) = (
            member(&registry, "a"),
            member(&registry, "a"),
            member(&registry, "b"),
        );
        for m in [
            received("ws:room:a", r#"{"payload":{"n":1}}"#),
            received("ws:room:a", "not json"),
            received("ws:room:b", r#"{"payload":2,"room":"a"}"#), // names another room
            received("ws:room:a", r#"{"v":1,"text":"two"}"#),
            received("elsewhere", r#"{"payload":3}"#), // not a room channel
        ] {
            inbox.offer(m);
        }
        let mut batch = Vec::new();
        d.rx.recv_many(&mut batch, 10).await;
        d.dispatch(&mut batch);
        assert!(batch.is_empty());
        assert_eq!(a1.take_texts().await, [r#"{"n":1}"#, "two"]);
        assert_eq!(a2.take_texts().await, [r#"{"n":1}"#, "two"]);
        assert!(b.held().0 == 0, "room b got nothing");
        let stats = counters.snapshot(registry.gauges());
        assert_eq!(
            (stats.received, stats.malformed, stats.delivered),
            (2, 2, 4)
        );
    }

    #[tokio::test]
    async fn a_full_hop_sheds_counts_and_tells_the_rooms_members() {
        let (inbox, mut d, registry, counters) = dispatcher(1);
        let a = member(&registry, "a");
        for n in 0..4 {
            inbox.offer(received("ws:room:a", &format!(r#"{{"payload":{n}}}"#)));
        }
        assert_eq!(counters.inbound_dropped.get(), 3);
        let mut batch = Vec::new();
        d.rx.recv_many(&mut batch, 10).await;
        d.dispatch(&mut batch);
        assert_eq!(a.take_texts().await, ["0"]);
        let missed = a.take_missed().expect("told of the shed messages");
        assert_eq!(missed.dropped(), Some(3));
        assert_eq!(missed.room().as_str(), "a");
    }

    #[tokio::test]
    async fn light_batches_write_to_idle_sockets_and_long_ones_only_queue() {
        let (inbox, mut d, registry, counters) = dispatcher(64);
        let a = member(&registry, "a");
        let sink = Recorder::default();
        a.park(Box::pin(sink.clone()));
        let mut dispatch = |n: usize| {
            for i in 0..n {
                inbox.offer(received("ws:room:a", &format!(r#"{{"payload":{i}}}"#)));
            }
            let mut batch = Vec::new();
            while let Ok(m) = d.rx.try_recv() {
                batch.push(m);
            }
            d.dispatch(&mut batch);
        };
        dispatch(1);
        assert_eq!(sink.texts(), ["0"], "written by the dispatcher");
        assert_eq!(a.held(), (0, 0));
        dispatch(WRITE_FROM_BATCH + 1);
        assert_eq!(sink.texts(), ["0"], "a long batch only queues");
        assert_eq!(a.take_texts().await, ["0", "1", "2"]);
        let stats = counters.snapshot(registry.gauges());
        assert_eq!(
            (stats.delivered, stats.socket_writes, stats.frames_written),
            (4, 1, 1)
        );
        // A room with more local members than a batch may write: its writers write.
        let big: Vec<_> = (0..=WRITE_BUDGET)
            .map(|_| member(&registry, "big"))
            .collect();
        for outbox in &big {
            outbox.park(Box::pin(Recorder::default()));
        }
        inbox.offer(received("ws:room:big", r#"{"payload":"x"}"#));
        let mut batch = vec![d.rx.try_recv().expect("offered")];
        d.dispatch(&mut batch);
        for outbox in &big {
            assert_eq!(outbox.take_texts().await, [r#""x""#]);
        }
    }

    #[tokio::test]
    async fn the_dispatcher_ends_when_the_inbox_is_gone() {
        let (inbox, d, _, _) = dispatcher(4);
        drop(inbox);
        d.run().await;
    }

    #[test]
    fn overflow_policy_applies_per_room() {
        let config = FanoutBuilder::new("redis://unused")
            .room_overflow("ticker", OverflowPolicy::DropOldest)
            .into_config_for_tests();
        assert_eq!(config.overflow_for("ticker"), OverflowPolicy::DropOldest);
        assert_eq!(config.overflow_for("chat"), OverflowPolicy::Disconnect);
    }

    #[test]
    fn the_rate_is_light_until_a_window_holds_more_than_its_share() {
        let mut load = Load::default();
        let t0 = load.since;
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert!(load.is_light(at(0)), "a fresh dispatcher is light");
        load.count(LIGHT_PER_WINDOW);
        assert!(load.is_light(at(5)));
        load.count(1);
        assert!(
            !load.is_light(at(6)),
            "more than its share within the window"
        );
        // The window closes heavy; the next one, with few deliveries, closes light.
        assert!(!load.is_light(at(10)));
        load.count(1);
        assert!(!load.is_light(at(15)), "still the heavy window's verdict");
        assert!(load.is_light(at(20)));
        // After an idle second, a burst of twice the share is light: per window.
        load.count(2 * LIGHT_PER_WINDOW);
        assert!(load.is_light(at(1_020)));
    }

    #[tokio::test]
    async fn log_limiter_counts_what_it_suppresses() {
        let mut l = LogLimiter::new(Duration::from_secs(60));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        l.next = Some(Instant::now());
        assert_eq!(l.allow(), Some(2));
    }
}
