//! The subscriber link: one connection that carries every room this node holds.
//!
//! It reconciles subscriptions with the registry (which rooms have a local socket), probes the
//! link end to end, and hands each received message to the dispatcher's [`Inbox`] from the
//! connection's push callback, which never waits.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use redis::{PushInfo, PushKind, RedisError, Value};
use tokio::sync::watch;
use tokio::time::{Instant, timeout};

use super::Bus;
use super::backend::{Backend, Conn};
use super::backoff::Backoff;
use super::inbox::{Inbox, Received};
use super::link::{
    LinkLoss, LinkSignals, PAUSE, PAUSE_CHECK, Probe, confirmed, is_probe, send_probe,
};
use crate::channel;
use crate::config::Config;
use crate::registry::{Changes, Registry};
use crate::room::RoomName;

/// Rooms per SUBSCRIBE / UNSUBSCRIBE command: large enough that resubscribing 10,000 rooms
/// takes ten round trips, small enough to keep each command and its reply modest.
const ROOMS_PER_COMMAND: usize = 1000;

/// Keeps the subscriber link up, reconciles subscriptions with the registry, probes the link,
/// and feeds the dispatcher.
pub(super) async fn run(
    bus: Arc<Bus>,
    backend: Backend,
    inbox: Inbox,
    mut stop: watch::Receiver<()>,
) {
    let inbox = Arc::new(inbox);
    let cfg = &bus.config;
    let mut retry = Retry {
        backoff: Backoff::new(cfg.backoff_min, cfg.backoff_max),
        ever_up: false,
    };
    loop {
        let signals = Arc::new(LinkSignals::default());
        let on_push = {
            let (inbox, signals, bus) = (inbox.clone(), signals.clone(), bus.clone());
            move |info: PushInfo| {
                match info.kind {
                    PushKind::Message | PushKind::SMessage => {
                        on_message(&bus.probe_channel, &signals, &inbox, info)
                    }
                    PushKind::Disconnection => signals.lost.notify_one(),
                    PushKind::SUnsubscribe => on_sunsubscribe(&bus, &inbox, &info),
                    _ => {}
                }
                Ok(())
            }
        };
        let (mut conn, probes) = match connect(&bus, &backend, on_push).await {
            Ok(link) => link,
            Err(loss) => {
                tracing::warn!(node = %cfg.node_id, reason = %loss, "subscriber cannot connect to redis; retrying");
                if !pause_for_master(retry.backoff.next(), &mut stop, &backend).await {
                    return;
                }
                continue;
            }
        };
        bus.registry.link_up();
        // Redis is reachable again: the publisher need not wait out its own pause.
        bus.reachable.notify_one();
        let outcome = serve_link(
            &bus, &mut conn, &probes, &signals, &inbox, &mut stop, &mut retry,
        )
        .await;
        bus.ready.store(false, Ordering::Release);
        match outcome {
            LinkEnd::Stopped => {
                let mut channels: Vec<String> = bus
                    .registry
                    .subscribed_rooms()
                    .iter()
                    .flat_map(|r| channel::all(cfg, r))
                    .collect();
                channels.extend(probes);
                let _ = timeout(Duration::from_secs(1), conn.unsubscribe(&channels)).await;
                bus.registry.link_down(inbox.loss_since());
                return;
            }
            LinkEnd::Lost(reason) => {
                bus.registry.link_down(inbox.loss_since());
                bus.counters.reconnects.add(1);
                tracing::warn!(node = %cfg.node_id, %reason, "subscriber link lost; reconnecting and resubscribing");
            }
        }
        drop(conn);
        if !pause_for_master(retry.backoff.next(), &mut stop, &backend).await {
            return;
        }
    }
}

/// Sleeps for `d`, or less when the deployment announces a new master (under Sentinel: the
/// link goes there at once, and the publisher follows it); `false` if the node is stopping.
async fn pause_for_master(d: Duration, stop: &mut watch::Receiver<()>, backend: &Backend) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = backend.master_switched() => true,
        _ = stop.changed() => false,
    }
}

/// Connects and subscribes the probe channels first: from then on, the link can be checked
/// end to end.
async fn connect(
    bus: &Bus,
    backend: &Backend,
    on_push: impl Fn(PushInfo) -> Result<(), ()> + Send + Sync + 'static,
) -> Result<(Conn, Vec<String>), LinkLoss> {
    let wait = bus.config.subscribe_timeout;
    let mut conn = backend
        .connect(wait, on_push)
        .await
        .map_err(LinkLoss::Connect)?;
    let probes = match timeout(wait, conn.probe_channels(&bus.probe_channel)).await {
        Ok(Ok(probes)) => probes,
        Ok(Err(error)) => {
            return Err(LinkLoss::Command {
                command: "CLUSTER SLOTS",
                error,
            });
        }
        Err(_) => return Err(LinkLoss::NotConfirmed("CLUSTER SLOTS")),
    };
    confirmed(timeout(wait, conn.subscribe(&probes)).await, "SUBSCRIBE")?;
    Ok((conn, probes))
}

/// The push callback's work for one published message. Runs on the connection's driver, so it
/// never waits: a full inbox drops the message and counts it.
fn on_message(probe_channel: &str, signals: &LinkSignals, inbox: &Inbox, info: PushInfo) {
    let mut data = info.data.into_iter();
    let (Some(Value::BulkString(channel)), Some(Value::BulkString(envelope)), None) =
        (data.next(), data.next(), data.next())
    else {
        return;
    };
    if is_probe(probe_channel, &channel) {
        let token: u64 = std::str::from_utf8(&envelope)
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        if token == signals.probe_token.load(Ordering::Acquire) {
            signals.probe_echoes.fetch_add(1, Ordering::AcqRel);
            signals.probe_echo.notify_one();
        }
        return;
    }
    inbox.offer(Received { channel, envelope });
}

/// A sharded subscription ended. Redis sends this unasked when the channel's hash slot moved
/// to another master (resharding, or a failover seen by this connection): if the room is
/// still wanted, it must be subscribed again, where the slot now lives. A plain room's members
/// are told of the gap; a durable room's gap is read back from its history once the new
/// subscription is confirmed (see `serve_link`).
///
/// Our own SUNSUBSCRIBEs are confirmed the same way; they are told apart by the registry, which
/// no longer counts a room as subscribed once its SUNSUBSCRIBE is sent. The check runs here, in
/// the connection's order, so a confirmation is never mistaken for a later subscription's loss.
fn on_sunsubscribe(bus: &Bus, inbox: &Inbox, info: &PushInfo) {
    let Some(Value::BulkString(channel)) = info.data.first() else {
        return;
    };
    let Some(room) = channel::room_of(&bus.config, channel) else {
        return;
    };
    let repairs = |room: &str| bus.repairs.repairs(room);
    if bus
        .registry
        .subscription_lost(&room, inbox.loss_since(), repairs)
    {
        tracing::warn!(
            room = &*room,
            "redis ended a sharded subscription (its slot moved); subscribing again"
        );
    }
}

/// The reconnect schedule, across links: the pause before the next attempt, and whether a
/// link was ever up (a new one is then "restored").
#[derive(Debug)]
struct Retry {
    backoff: Backoff,
    ever_up: bool,
}

enum LinkEnd {
    Stopped,
    Lost(LinkLoss),
}

async fn serve_link(
    bus: &Bus,
    conn: &mut Conn,
    probes: &[String],
    signals: &LinkSignals,
    inbox: &Inbox,
    stop: &mut watch::Receiver<()>,
    retry: &mut Retry,
) -> LinkEnd {
    let cfg = &bus.config;
    // The link was set up just now: it delivers from here on.
    inbox.delivered_at(SystemTime::now());
    let mut probe_every = tokio::time::interval(cfg.probe_interval);
    probe_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    probe_every.reset(); // the first probe one interval after connecting, not at once
    let mut clock = tokio::time::interval(PAUSE_CHECK);
    clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut token = 0u64;
    let mut awaiting: Option<Probe> = None;
    let mut up = false;
    // After a pause of the node's own: the link is not trusted until a probe comes back.
    let mut suspect = false;
    loop {
        if let Err(loss) = reconcile(cfg, &bus.registry, conn).await {
            return LinkEnd::Lost(loss);
        }
        // Rooms lost with the link or a moved slot and now subscribed again: tell the gap
        // before reporting ready, so nothing that sees the node ready can deliver a message
        // ahead of the notice; read back the durable rooms' gaps.
        let (told, durable) = bus.registry.resubscribed(|room| bus.repairs.repairs(room));
        bus.repairs.resubscribed(&durable);
        if !up {
            up = true;
            retry.backoff.reset();
            let gauges = bus.registry.gauges();
            tracing::info!(
                node = %cfg.node_id,
                rooms = gauges.rooms,
                subscribed = gauges.subscriptions,
                memberships_told_of_gap = told,
                "subscriber link {}", if retry.ever_up { "restored" } else { "up" }
            );
            retry.ever_up = true;
        }
        bus.ready.store(!suspect, Ordering::Release);
        let probe_deadline = awaiting.as_ref().map(|p| p.deadline);
        let mut probe_now = false;
        tokio::select! {
            _ = bus.registry.changed() => {}
            _ = signals.lost.notified() => return LinkEnd::Lost(LinkLoss::Closed),
            _ = stop.changed() => return LinkEnd::Stopped,
            _ = probe_every.tick(), if awaiting.is_none() => probe_now = true,
            _ = signals.probe_echo.notified() => {
                if signals.probe_echoes.load(Ordering::Acquire) >= probes.len()
                    && let Some(probe) = awaiting.take()
                {
                    inbox.delivered_at(probe.sent);
                    if std::mem::take(&mut suspect) {
                        tracing::info!(node = %cfg.node_id, "subscriber link confirmed by a probe after the pause");
                    }
                }
            }
            _ = sleep_until_opt(probe_deadline), if probe_deadline.is_some() => {
                let late = probe_deadline.map_or(Duration::ZERO, |d| d.elapsed());
                if late < PAUSE {
                    return LinkEnd::Lost(LinkLoss::ProbeLate);
                }
                // The deadline passed while the node itself was paused: the echo may be
                // waiting unread in the socket. Not trusted either way: probe again.
                paused(bus, late, &mut suspect);
                probe_now = true;
            }
            scheduled = clock.tick() => {
                let late = scheduled.elapsed();
                if late >= PAUSE {
                    paused(bus, late, &mut suspect);
                    probe_now = true;
                }
            }
        }
        if probe_now {
            token += 1;
            match send_probe(cfg.probe_timeout, conn, probes, signals, token).await {
                Ok(probe) => awaiting = Some(probe),
                Err(loss) => return LinkEnd::Lost(loss),
            }
        }
    }
}

/// Marks the link suspect after the node was paused for about `late`.
fn paused(bus: &Bus, late: Duration, suspect: &mut bool) {
    tracing::warn!(
        node = %bus.config.node_id,
        paused_ms = late.as_millis() as u64,
        "the node was paused (its timers fired late): probing the subscriber link before trusting it"
    );
    *suspect = true;
    bus.ready.store(false, Ordering::Release);
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// What reconciliation needs of a connection. [`Conn`] is the real one; the unit tests below
/// use an in-memory stand-in that records the commands.
trait Subscriptions {
    async fn subscribe(&mut self, channels: &[String]) -> Result<(), RedisError>;
    async fn unsubscribe(&mut self, channels: &[String]) -> Result<(), RedisError>;
}

impl Subscriptions for Conn {
    async fn subscribe(&mut self, channels: &[String]) -> Result<(), RedisError> {
        Conn::subscribe(self, channels).await
    }
    async fn unsubscribe(&mut self, channels: &[String]) -> Result<(), RedisError> {
        Conn::unsubscribe(self, channels).await
    }
}

/// Sends the SUBSCRIBE / UNSUBSCRIBE commands the registry asks for until nothing is pending.
async fn reconcile(
    config: &Config,
    registry: &Registry,
    conn: &mut impl Subscriptions,
) -> Result<(), LinkLoss> {
    let wait = config.subscribe_timeout;
    let channels_of = |rooms: &[RoomName]| -> Vec<String> {
        rooms.iter().flat_map(|r| channel::all(config, r)).collect()
    };
    loop {
        let changes = registry.take_pending(ROOMS_PER_COMMAND);
        if changes.is_empty() {
            return Ok(());
        }
        let Changes {
            subscribe,
            unsubscribe,
        } = changes;
        if !subscribe.is_empty() {
            let channels = channels_of(&subscribe);
            confirmed(timeout(wait, conn.subscribe(&channels)).await, "SUBSCRIBE")?;
            for room in &subscribe {
                tracing::debug!(room = %room, "subscribed");
            }
            registry.confirm_subscribed(subscribe);
        }
        if !unsubscribe.is_empty() {
            let channels = channels_of(&unsubscribe);
            confirmed(
                timeout(wait, conn.unsubscribe(&channels)).await,
                "UNSUBSCRIBE",
            )?;
            for room in &unsubscribe {
                tracing::debug!(room = %room, "unsubscribed");
            }
            registry.confirm_unsubscribed(unsubscribe);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::num::NonZeroU16;

    use super::*;
    use crate::config::FanoutBuilder;
    use crate::queue::{Limits, Outbox};
    use crate::registry::SocketId;

    /// An in-memory stand-in for the subscriber connection: the channels it is subscribed to,
    /// every command in order, and an optional failure to inject.
    #[derive(Default)]
    struct FakeLink {
        subscribed: BTreeSet<String>,
        commands: Vec<String>,
        fail_next: bool,
    }

    impl FakeLink {
        fn check(&mut self, command: &str, channels: &[String]) -> Result<(), RedisError> {
            self.commands
                .push(format!("{command} {}", channels.join(" ")));
            if std::mem::take(&mut self.fail_next) {
                return Err(RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "link cut",
                )));
            }
            Ok(())
        }
    }

    impl Subscriptions for FakeLink {
        async fn subscribe(&mut self, channels: &[String]) -> Result<(), RedisError> {
            self.check("SUBSCRIBE", channels)?;
            self.subscribed.extend(channels.iter().cloned());
            Ok(())
        }
        async fn unsubscribe(&mut self, channels: &[String]) -> Result<(), RedisError> {
            self.check("UNSUBSCRIBE", channels)?;
            for c in channels {
                self.subscribed.remove(c);
            }
            Ok(())
        }
    }

    fn outbox() -> Arc<Outbox> {
        Arc::new(Outbox::new(Limits {
            frames: 8,
            bytes: 1 << 16,
        }))
    }

    fn room(s: &str) -> RoomName {
        RoomName::new(s).expect("valid")
    }

    fn set(channels: &[&str]) -> BTreeSet<String> {
        channels.iter().map(|c| c.to_string()).collect()
    }

    #[tokio::test]
    async fn subscriptions_follow_local_membership_through_joins_leaves_and_a_reconnect() {
        let config = FanoutBuilder::new("redis://unused")
            .room_shards("hot", NonZeroU16::new(2).expect("non-zero"))
            .into_config_for_tests();
        let registry = Registry::default();
        let mut link = FakeLink::default();
        registry.link_up();
        registry.insert(&room("a"), SocketId::from_wire(1), outbox());
        registry.insert(&room("a"), SocketId::from_wire(2), outbox());
        registry.insert(&room("hot"), SocketId::from_wire(3), outbox());
        reconcile(&config, &registry, &mut link).await.expect("ok");
        assert_eq!(
            link.subscribed,
            set(&["ws:room:a", "ws:room:hot:shard0", "ws:room:hot:shard1"])
        );
        assert_eq!(
            link.commands.len(),
            1,
            "one SUBSCRIBE for every pending room"
        );

        // One of two members leaves: nothing to send. The last one leaves: UNSUBSCRIBE.
        registry.remove(&room("a"), SocketId::from_wire(1));
        reconcile(&config, &registry, &mut link).await.expect("ok");
        assert_eq!(link.commands.len(), 1);
        registry.remove(&room("a"), SocketId::from_wire(2));
        reconcile(&config, &registry, &mut link).await.expect("ok");
        assert_eq!(
            link.subscribed,
            set(&["ws:room:hot:shard0", "ws:room:hot:shard1"])
        );

        // The link fails mid-command, a room is joined while it is down, and a new link
        // subscribes everything from the registry, not from what the old link had.
        registry.insert(&room("b"), SocketId::from_wire(4), outbox());
        link.fail_next = true;
        let loss = reconcile(&config, &registry, &mut link)
            .await
            .expect_err("cut");
        assert!(
            matches!(
                loss,
                LinkLoss::Command {
                    command: "SUBSCRIBE",
                    ..
                }
            ),
            "{loss}"
        );
        registry.link_down(std::time::SystemTime::now());
        registry.insert(&room("c"), SocketId::from_wire(5), outbox());
        let mut fresh = FakeLink::default();
        reconcile(&config, &registry, &mut fresh)
            .await
            .expect("down: no commands");
        assert!(
            fresh.commands.is_empty(),
            "nothing is sent while the link is down"
        );
        registry.link_up();
        reconcile(&config, &registry, &mut fresh).await.expect("ok");
        assert_eq!(
            fresh.subscribed,
            set(&[
                "ws:room:b",
                "ws:room:c",
                "ws:room:hot:shard0",
                "ws:room:hot:shard1"
            ])
        );
    }
}
