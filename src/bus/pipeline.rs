//! The publisher's pipelines: what is queued goes out in runs, plain broadcasts as one pipeline
//! of PUBLISH, messages with a durability or a guard as one pipeline of script calls (the
//! feature's store, or `guard`'s for a plain room), and each caller is told its own outcome.
//! The rules (order, grouping, what a NOSCRIPT sends again, what expires unsent) are
//! unit-tested below against an in-memory connection.

use std::sync::Arc;

use redis::{Cmd, ErrorKind, RedisError, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, timeout_at};

use super::backend::{Backend, Conn};
use super::guard::GuardedPublish;
use super::publisher::Outgoing;
use super::receipt::{Published, SharedCause};
use super::runs::{group_by_channel, to_retry};
use super::script::{Script, Scripting};
use super::{Bus, Group, Store};
use crate::error::Error;
use crate::random;

/// Most PUBLISH commands written to Redis at once, as one pipeline.
const BATCH: usize = 256;

/// Most SCRIPT LOADs for one run of durable messages. Redis forgets the script again only if
/// it is flushed or fails over again between the load and the run sent again: rare, and
/// repeated only by something wrong (the run then fails with NOSCRIPT rather than looping).
const LOADS: usize = 3;

/// What the publisher needs of its connection: [`Conn`], or the unit tests' stand-in, so that
/// its batching, grouping and retry rules are tested without a Redis process.
pub(super) trait Pipelines: Scripting {
    /// PUBLISHes every `(channel, payload)` in order; each one's subscriber count.
    async fn publish_many(&mut self, commands: &[(&str, &[u8])]) -> Result<Vec<usize>, RedisError>;
    /// Sends every `(channel, command)` in order; each one's own reply.
    async fn pipeline(
        &mut self,
        commands: Vec<(&str, Cmd)>,
    ) -> Result<Vec<Result<Value, RedisError>>, RedisError>;
}

impl Pipelines for Conn {
    async fn publish_many(&mut self, commands: &[(&str, &[u8])]) -> Result<Vec<usize>, RedisError> {
        Conn::publish_many(self, commands).await
    }
    async fn pipeline(
        &mut self,
        commands: Vec<(&str, Cmd)>,
    ) -> Result<Vec<Result<Value, RedisError>>, RedisError> {
        Conn::pipeline(self, commands).await
    }
}

/// Writes queued broadcasts to Redis: everything queued (up to [`BATCH`]) goes out as one
/// pipeline, so under load many PUBLISH commands share one write on our side and one read and
/// one wake-up on Redis's.
///
/// Why: redis-rs writes every command of a multiplexed connection with its own `writev`, and
/// each one also pays for Redis's receive path and wake-up: a visible share of a busy node's
/// CPU (BENCHMARKS.md has the profile).
///
/// A lone broadcast goes out at once; the only wait is one `yield_now`, so that broadcasts
/// made ready by the same wake-up join the batch. One pipeline is in flight at a time, so a
/// connection's commands keep their order.
pub(super) async fn send_loop(
    bus: Arc<Bus>,
    mut outgoing: mpsc::Receiver<Outgoing>,
    mut stop: watch::Receiver<()>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut conns = bus.publisher.subscribe();
    loop {
        let received = tokio::select! {
            n = outgoing.recv_many(&mut batch, BATCH) => n,
            _ = stop.changed() => return,
        };
        if received == 0 {
            return; // every sender (the bus) is gone
        }
        // Let the tasks that are ready to run (other sockets whose frames arrived in the same
        // wake-up) queue their broadcasts too: one yield, microseconds, and the batch then
        // holds what arrived together instead of only the first of it.
        tokio::task::yield_now().await;
        while batch.len() < BATCH {
            match outgoing.try_recv() {
                Ok(o) => batch.push(o),
                Err(_) => break,
            }
        }
        expire_due(&mut batch, &bus);
        let Some(deadline) = batch.iter().map(|o| o.deadline).max() else {
            continue;
        };
        // The connection as it is now (a reconnect replaces it), waiting for one while Redis
        // is down; the callers give up at their own deadlines.
        let conn = tokio::select! {
            conn = timeout_at(deadline, conns.wait_for(Option::is_some)) => match conn {
                Ok(Ok(conn)) => conn.clone(),
                Ok(Err(_)) => return, // the bus is gone
                Err(_) => None,
            },
            _ = stop.changed() => return,
        };
        let Some(mut conn) = conn else {
            for o in batch.drain(..) {
                o.expire(&bus);
            }
            continue;
        };
        expire_due(&mut batch, &bus);
        send(&bus, &mut conn, &mut batch, deadline).await;
    }
}

/// Sends `batch` in its order and replies to each request: each run of plain broadcasts as
/// one pipeline of PUBLISH, each run of durable rooms' or guarded messages as one pipeline of
/// script calls. Redis runs a pipeline's commands in order, so a durable room's seqs follow
/// the queue's order as its messages did when each call waited for the previous one's reply,
/// which cost a round trip per message (a third to a sixth of a plain room's rate).
async fn send(bus: &Bus, conn: &mut impl Pipelines, batch: &mut Vec<Outgoing>, deadline: Instant) {
    let mut rest = std::mem::take(batch).into_iter().peekable();
    while let Some(first) = rest.peek() {
        let scripted = is_scripted(first);
        let mut run = Vec::new();
        while let Some(o) = rest.next_if(|o| is_scripted(o) == scripted) {
            run.push(o);
        }
        if scripted {
            send_scripted(bus, conn, run, deadline).await;
        } else {
            send_plain(bus, conn, run, deadline).await;
        }
    }
}

/// Whether `o` goes out as a script call rather than a PUBLISH.
fn is_scripted(o: &Outgoing) -> bool {
    o.durable.is_some() || o.guard.is_some()
}

/// The script `o` goes out with: its room's store when it is durable, else the guarded
/// publish. A channel's messages all take the same one (a room is durable or not).
fn store_of<'a>(bus: &'a Bus, o: &Outgoing) -> &'a dyn Store {
    match o.durable {
        Some(_) => &*bus.store,
        None => &GuardedPublish,
    }
}

async fn send_plain(bus: &Bus, conn: &mut impl Pipelines, run: Vec<Outgoing>, deadline: Instant) {
    let commands: Vec<(&str, &[u8])> = run
        .iter()
        .map(|o| (o.channel.as_str(), o.envelope.as_slice()))
        .collect();
    match timeout_at(deadline, conn.publish_many(&commands)).await {
        Ok(Ok(counts)) => {
            for (o, n) in run.into_iter().zip(counts) {
                o.finish(Ok(Published::new(n, None)), bus);
            }
        }
        Ok(Err(e)) => fail_all(run, e, bus),
        // Each caller has given up by now (its deadline is at most this one).
        Err(_) => expire_all(run, bus),
    }
}

/// Sends durable rooms' and guarded messages as one pipeline of script calls, one call per
/// group of a room's messages (see `store` and `guard`). When Redis forgot a script (NOSCRIPT:
/// it restarted, failed over, or was told `SCRIPT FLUSH`), loads it and sends the refused
/// groups again in their order, at most [`LOADS`] times; [`to_retry`] says which may be sent
/// again.
async fn send_scripted(
    bus: &Bus,
    conn: &mut impl Pipelines,
    run: Vec<Outgoing>,
    deadline: Instant,
) {
    let publish_command = bus
        .backend
        .as_ref()
        .map_or("PUBLISH", Backend::publish_command);
    let mut loads = 0;
    // Not one per message: a random id is a hash and a string, on the per-message path.
    let epoch = random::hex_id();
    let max = bus.store.group_max().min(GuardedPublish.group_max());
    let mut groups = group_by_channel(run, |o| o.channel.as_str(), max);
    while !groups.is_empty() {
        let commands = groups
            .iter()
            .filter_map(|group| {
                let first = group.first()?;
                let guards = if group.iter().any(|o| o.guard.is_some()) {
                    group.iter().map(|o| o.guard.as_deref()).collect()
                } else {
                    Vec::new()
                };
                let call = Group {
                    channel: &first.channel,
                    epoch: &epoch,
                    settings: first.durable.as_ref(),
                    envelopes: group.iter().map(|o| o.envelope.as_slice()).collect(),
                    guards,
                };
                let store = store_of(bus, first);
                Some((first.channel.as_str(), store.call(publish_command, &call)))
            })
            .collect();
        let replies = match timeout_at(deadline, conn.pipeline(commands)).await {
            Ok(Ok(replies)) if replies.len() == groups.len() => replies,
            Ok(Ok(_)) => {
                let e = (
                    ErrorKind::Client,
                    "a pipeline's replies do not match its commands",
                );
                return fail_all(groups.into_iter().flatten(), e.into(), bus);
            }
            Ok(Err(e)) => return fail_all(groups.into_iter().flatten(), e, bus),
            Err(_) => return expire_all(groups.into_iter().flatten(), bus),
        };
        let retry = if loads < LOADS {
            let channels: Vec<&str> = groups
                .iter()
                .map(|g| g.first().map_or("", |o| o.channel.as_str()))
                .collect();
            to_retry(&channels, &replies)
        } else {
            vec![false; groups.len()]
        };
        let mut again = Vec::new();
        for ((group, reply), retry) in groups.into_iter().zip(replies).zip(retry) {
            match reply {
                _ if retry => again.extend(group),
                Ok(reply) => {
                    let Some(first) = group.first() else { continue };
                    let results = store_of(bus, first).replies(&reply, group.len());
                    for (o, result) in group.into_iter().zip(results) {
                        o.finish(result, bus);
                    }
                }
                Err(e) => fail_all(group, e, bus),
            }
        }
        if again.is_empty() {
            return;
        }
        tracing::info!(
            node = %bus.config.node_id,
            messages = again.len(),
            "redis did not know a publish script (durable rooms', or the guarded publish); loading it"
        );
        let mut scripts: Vec<&Script> = again.iter().map(|o| store_of(bus, o).script()).collect();
        scripts.sort_by_key(|s| s.hash());
        scripts.dedup_by_key(|s| s.hash());
        for script in scripts {
            match timeout_at(deadline, conn.load(script)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return fail_all(again, e, bus),
                Err(_) => return expire_all(again, bus),
            }
        }
        // Refused, so not sent: a caller that stopped waiting meanwhile cancels it as usual.
        expire_due(&mut again, bus);
        loads += 1;
        groups = group_by_channel(again, |o| o.channel.as_str(), max);
    }
}

/// Reports one Redis error to every caller of a run.
fn fail_all(run: impl IntoIterator<Item = Outgoing>, error: redis::RedisError, bus: &Bus) {
    let error = Arc::new(error);
    for o in run {
        o.finish(Err(Error::redis(SharedCause(error.clone()))), bus);
    }
}

fn expire_all(run: impl IntoIterator<Item = Outgoing>, bus: &Bus) {
    for o in run {
        o.expire(bus);
    }
}

/// Takes out of `batch` the requests whose deadline passed, telling their callers: a caller
/// told "timed out" must never see its message published later.
/// Requests whose awaiting caller went away (a cancelled `.await`) are dropped unsent.
fn expire_due(batch: &mut Vec<Outgoing>, bus: &Bus) {
    batch.retain(|o| !(o.abandonable && o.reply.is_closed()));
    let now = Instant::now();
    if batch.iter().all(|o| o.deadline > now) {
        return;
    }
    let (due, keep): (Vec<Outgoing>, Vec<Outgoing>) =
        batch.drain(..).partition(|o| o.deadline <= now);
    batch.extend(keep);
    for o in due {
        o.expire(bus);
    }
}

#[cfg(test)]
mod tests {
    use super::super::script::testing::{FakeRedis, noscript};
    use super::super::script::{Script, int, text};
    use super::super::{Guard, Repairs, Store};
    use super::*;
    use crate::config::{Durability, FanoutBuilder};
    use crate::position::Position;
    use crate::registry::Registry;
    use crate::room::RoomName;
    use crate::stats::Counters;
    use tokio::sync::oneshot;

    /// Most messages per call of the stand-in store.
    const GROUP: usize = 64;

    /// A store whose calls name the channel and carry the envelopes, and whose reply is the
    /// real script's shape: `[epoch, first seq, nodes per message...]`.
    #[derive(Debug)]
    struct TestStore(Script);

    impl Store for TestStore {
        fn script(&self) -> &Script {
            &self.0
        }
        fn added_bytes(&self) -> usize {
            0
        }
        fn group_max(&self) -> usize {
            GROUP
        }
        fn call(&self, _publish_command: &str, group: &Group<'_>) -> Cmd {
            let mut call = self.0.call();
            call.key(group.channel);
            for envelope in &group.envelopes {
                call.arg(*envelope);
            }
            call.cmd()
        }
        fn replies(&self, reply: &Value, n: usize) -> Vec<Result<Published, Error>> {
            let Value::Array(items) = reply else {
                return (0..n).map(|_| Err(Error::redis("bad reply"))).collect();
            };
            let epoch = text(&items[0]).unwrap_or_default();
            let first = int(&items[1]).unwrap_or(0);
            (0..n)
                .map(|i| {
                    let position = Position::new(epoch.as_str(), first + i as u64);
                    Ok(Published::new(1, Some(position)))
                })
                .collect()
        }
    }

    #[derive(Debug)]
    struct NoRepairs;

    impl Repairs for NoRepairs {
        fn repairs(&self, _room: &str) -> bool {
            false
        }
        fn resubscribed(&self, _rooms: &[RoomName]) {}
    }

    impl Pipelines for FakeRedis {
        async fn publish_many(
            &mut self,
            commands: &[(&str, &[u8])],
        ) -> Result<Vec<usize>, RedisError> {
            for (channel, payload) in commands {
                let payload = String::from_utf8_lossy(payload);
                self.sent.push(format!("PUBLISH {channel} {payload}"));
            }
            Ok(vec![2; commands.len()])
        }
        async fn pipeline(
            &mut self,
            commands: Vec<(&str, Cmd)>,
        ) -> Result<Vec<Result<Value, RedisError>>, RedisError> {
            let mut replies = Vec::new();
            for (_, cmd) in commands {
                replies.push(self.query(&cmd).await);
            }
            Ok(replies)
        }
    }

    fn bus() -> Arc<Bus> {
        let config = Arc::new(
            FanoutBuilder::new("redis://unused")
                .durable_room("d", Durability::default())
                .into_config_for_tests(),
        );
        let (registry, counters) = (Arc::new(Registry::default()), Arc::new(Counters::default()));
        let store = Arc::new(TestStore(Script::new("return 'store'")));
        Arc::new(Bus::new(
            config,
            registry,
            counters,
            Arc::new(NoRepairs),
            store,
            None,
        ))
    }

    type Reply = oneshot::Receiver<Result<Published, Error>>;

    fn request(room: &str, text: &str, durable: bool, deadline: Instant) -> (Outgoing, Reply) {
        let (reply, replied) = oneshot::channel();
        let o = Outgoing {
            room: RoomName::new(room).expect("valid"),
            channel: format!("ws:room:{room}"),
            envelope: text.as_bytes().to_vec(),
            deadline,
            reply,
            origin: None,
            durable: durable.then(Durability::default),
            guard: None,
            abandonable: false,
        };
        (o, replied)
    }

    /// The store script's reply for `n` messages from `first` in epoch `e`.
    fn stored_reply(first: i64, n: usize) -> Result<Value, RedisError> {
        let mut items = vec![Value::BulkString(b"e".to_vec()), Value::Int(first)];
        items.extend((0..n).map(|_| Value::Int(1)));
        Ok(Value::Array(items))
    }

    fn positions(replies: Vec<Reply>) -> Vec<String> {
        replies
            .into_iter()
            .map(|mut r| match r.try_recv() {
                Ok(Ok(p)) => p
                    .position()
                    .map_or("no position".into(), ToString::to_string),
                Ok(Err(e)) => format!("error: {e}"),
                Err(_) => "no reply".into(),
            })
            .collect()
    }

    #[tokio::test]
    async fn a_batch_goes_out_as_runs_in_queue_order_each_rooms_durable_messages_one_call() {
        let bus = bus();
        let later = Instant::now() + std::time::Duration::from_secs(5);
        let mut redis = FakeRedis::default();
        redis.known.insert(bus.store.script().hash().to_owned());
        redis.replies.push_back(stored_reply(1, 2));
        let (mut batch, mut replies) = (Vec::new(), Vec::new());
        for (room, text, durable) in [
            ("p", "p1", false),
            ("d", "d1", true),
            ("d", "d2", true),
            ("p", "p2", false),
        ] {
            let (o, r) = request(room, text, durable, later);
            batch.push(o);
            replies.push(r);
        }
        send(&bus, &mut redis, &mut batch, later).await;
        // The plain message, the room's two durable messages in one script call, the plain one.
        assert_eq!(redis.sent.len(), 3, "{:?}", redis.sent);
        assert_eq!(redis.sent[0], "PUBLISH ws:room:p p1");
        assert!(redis.sent[1].starts_with("EVALSHA") && redis.sent[1].ends_with(" d1 d2"));
        assert_eq!(redis.sent[2], "PUBLISH ws:room:p p2");
        assert_eq!(
            positions(replies),
            ["no position", "e:1", "e:2", "no position"]
        );
        assert_eq!(bus.counters.published.get(), 4);
    }

    #[tokio::test]
    async fn guarded_messages_go_out_as_script_calls_in_the_run_of_durable_ones() {
        let bus = bus();
        let later = Instant::now() + std::time::Duration::from_secs(5);
        let mut redis = FakeRedis::default();
        let (mut batch, mut replies) = (Vec::new(), Vec::new());
        for (room, text, durable, guarded) in [
            ("q", "g1", false, true),
            ("d", "d1", true, false),
            ("q", "g2", false, true),
            ("p", "p1", false, false),
        ] {
            let (mut o, r) = request(room, text, durable, later);
            if guarded {
                let key = format!("{{ws:room:{room}}}:k-{text}");
                let ttl = std::time::Duration::from_secs(1);
                o.guard = Some(Box::new(Guard { key, ttl }));
            }
            batch.push(o);
            replies.push(r);
        }
        // Redis knows neither script: both are loaded, then the two calls go again.
        redis
            .replies
            .push_back(Ok(Value::Array(vec![Value::Int(2), Value::Int(2)])));
        redis.replies.push_back(stored_reply(1, 1));
        send(&bus, &mut redis, &mut batch, later).await;
        assert_eq!(redis.loads, 2);
        assert_eq!(redis.sent.len(), 5, "{:?}", redis.sent);
        let guarded = &redis.sent[2];
        assert!(
            guarded.starts_with(&format!("EVALSHA {}", GuardedPublish.script().hash()))
                && guarded.contains(" {ws:room:q}:k-g1 {ws:room:q}:k-g2 PUBLISH ws:room:q ")
                && guarded.ends_with(" 1000 g1 1000 g2"),
            "{guarded}"
        );
        assert!(redis.sent[3].ends_with(" d1"), "{:?}", redis.sent);
        assert_eq!(redis.sent[4], "PUBLISH ws:room:p p1");
        assert_eq!(
            positions(replies),
            ["no position", "e:1", "no position", "no position"]
        );
    }

    #[tokio::test]
    async fn a_script_redis_forgot_mid_run_is_loaded_and_only_the_refused_calls_go_again() {
        let bus = bus();
        let later = Instant::now() + std::time::Duration::from_secs(5);
        let mut redis = FakeRedis::default();
        redis.known.insert(bus.store.script().hash().to_owned());
        // Room `d`'s call is stored; then Redis is flushed and room `e`'s is refused.
        redis.replies.push_back(stored_reply(7, 1));
        redis.replies.push_back(Err(noscript()));
        redis.replies.push_back(stored_reply(1, 1));
        let (d, d_reply) = request("d", "d1", true, later);
        let (mut e, e_reply) = request("e", "e1", true, later);
        e.channel = "ws:room:e".into();
        send(&bus, &mut redis, &mut vec![d, e], later).await;
        assert_eq!(redis.loads, 1);
        assert_eq!(redis.sent.len(), 3, "d once, e twice: {:?}", redis.sent);
        assert!(redis.sent[2].ends_with(" e1"));
        assert_eq!(positions(vec![d_reply, e_reply]), ["e:7", "e:1"]);
    }

    #[tokio::test]
    async fn a_refused_call_behind_a_stored_one_of_its_room_fails_rather_than_go_out_of_order() {
        let bus = bus();
        let later = Instant::now() + std::time::Duration::from_secs(5);
        let mut redis = FakeRedis::default();
        redis.known.insert(bus.store.script().hash().to_owned());
        // Two calls of room `d` (more than a group): the first refused (another node's load
        // had not happened yet), the second stored, so the first may not follow it.
        redis.replies.push_back(Err(noscript()));
        redis.replies.push_back(stored_reply(1, 1));
        let (mut batch, mut replies) = (Vec::new(), Vec::new());
        for i in 0..=GROUP {
            let (o, r) = request("d", &format!("m{i}"), true, later);
            batch.push(o);
            replies.push(r);
        }
        send(&bus, &mut redis, &mut batch, later).await;
        assert_eq!(redis.loads, 0, "nothing to send again");
        let got = positions(replies);
        assert!(
            got[..GROUP].iter().all(|p| p.starts_with("error")),
            "{got:?}"
        );
        assert_eq!(got[GROUP], "e:1");
    }

    #[tokio::test]
    async fn requests_past_their_deadline_or_abandoned_are_never_sent() {
        let bus = bus();
        let now = Instant::now();
        let (due, due_reply) = request(
            "p",
            "late",
            false,
            now - std::time::Duration::from_millis(1),
        );
        let (keep, _keep_reply) = request(
            "p",
            "on time",
            false,
            now + std::time::Duration::from_secs(5),
        );
        let (mut gone, gone_reply) = request(
            "p",
            "abandoned",
            false,
            now + std::time::Duration::from_secs(5),
        );
        gone.abandonable = true;
        drop(gone_reply);
        let mut batch = vec![due, keep, gone];
        expire_due(&mut batch, &bus);
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].envelope, b"on time");
        let told = positions(vec![due_reply]);
        assert!(told[0].starts_with("error"), "{told:?}");
        assert_eq!(
            bus.counters.publish_errors.get(),
            1,
            "the abandoned one is not an error"
        );
    }
}
