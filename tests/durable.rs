//! Durable rooms against a real `redis-server`, through the chat example's wire contract
//! (PROTOCOL.md part 2, "Durable rooms"): positions, resume across nodes, the hand-off to live
//! delivery under a steady publish stream, lost and trimmed history, the node's own gap
//! repair after its link drops, and seed interop.

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/chat_app/mod.rs"]
mod chat_app;
mod support;

use std::num::NonZeroUsize;

use axum_fanout::durable::{Durability, Position};
use axum_fanout::{FanoutLayer, RoomHandle};
use serde_json::{Value, json};
use support::*;

fn nz(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).expect("non-zero")
}

/// One chat node on `redis` with every room durable (`settings`), plus overrides.
async fn node(
    redis: &RedisServer,
    id: &str,
    settings: Durability,
    rooms: &[(&str, Durability)],
) -> (TestServer, RoomHandle) {
    let mut builder = FanoutLayer::builder(redis.url())
        .node_id(id)
        .durable(settings)
        .probe_interval(std::time::Duration::from_millis(200));
    for (room, s) in rooms {
        builder = builder.durable_room(*room, *s);
    }
    let layer = builder.build().expect("valid url");
    let handle = layer.handle();
    let server = TestServer::start(chat_app::app(layer)).await;
    let h = handle.clone();
    wait_until("node ready", || {
        let h = h.clone();
        async move { h.is_ready() }
    })
    .await;
    (server, handle)
}

/// Connects without positions (plain deliveries) and waits until the node counts the join.
async fn join_plain(server: &TestServer, handle: &RoomHandle, room: &str) -> Ws {
    let before = handle.stats().memberships;
    let ws = connect(&server.ws_url(&format!("/ws?room={room}"))).await;
    wait_until("plain socket joined", || async {
        handle.stats().memberships > before && handle.stats().subscriptions > 0
    })
    .await;
    ws
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Connects with `positions=1` (and `since`) and returns the socket and its first frame, the
/// notice; the join is complete once the notice arrived.
async fn join(server: &TestServer, room: &str, since: Option<&str>) -> (Ws, Value) {
    let since = since.map(|s| format!("&since={s}")).unwrap_or_default();
    let mut ws = connect(&server.ws_url(&format!("/ws?room={room}&positions=1{since}"))).await;
    let notice = recv_json(&mut ws, "the join notice").await;
    (ws, notice)
}

fn position_of(notice: &Value) -> Position {
    Position::new(
        notice["epoch"].as_str().expect("epoch"),
        notice["seq"].as_u64().expect("seq"),
    )
}

async fn publish(handle: &RoomHandle, room: &str, n: u64) {
    handle
        .broadcast(room, json!({ "n": n }))
        .await
        .expect("durable broadcast");
}

/// Reads deliveries until one with seq `last`; returns every seq seen, in order.
async fn seqs_until(ws: &mut Ws, last: u64) -> Vec<u64> {
    let mut seen = Vec::new();
    loop {
        let frame = recv_json(ws, &format!("seq {last}")).await;
        let Some(seq) = frame["seq"].as_u64() else {
            panic!("a delivery without seq or a notice where none belongs: {frame}");
        };
        assert_eq!(frame["payload"]["n"], json!(seq), "payload of seq {seq}");
        seen.push(seq);
        if seq >= last {
            return seen;
        }
    }
}

#[tokio::test]
async fn a_client_resumes_on_another_node_with_every_message_once() {
    let redis = RedisServer::start();
    let (a, ha) = node(&redis, "a", Durability::default(), &[]).await;
    let (b, hb) = node(&redis, "b", Durability::default(), &[]).await;

    let (mut first, notice) = join(&a, "chat", None).await;
    assert_eq!(notice["type"], "fanout.position");
    assert_eq!(notice["room"], "chat");
    assert_eq!(notice["seq"], 0, "an empty room is at seq 0");
    let epoch = notice["epoch"].as_str().expect("epoch").to_owned();
    let (_other, other_notice) = join(&b, "chat", None).await;
    assert_eq!(
        other_notice["epoch"],
        epoch.as_str(),
        "all nodes agree on the epoch"
    );

    for n in 1..=3 {
        publish(&ha, "chat", n).await;
    }
    assert_eq!(seqs_until(&mut first, 3).await, [1, 2, 3]);
    drop(first);

    for n in 4..=6 {
        publish(&hb, "chat", n).await;
    }
    let (mut back, notice) = join(&b, "chat", Some(&format!("{epoch}:3"))).await;
    assert_eq!(
        notice,
        json!({"type":"fanout.resumed","room":"chat","recovered":true,"epoch":epoch,"seq":3})
    );
    publish(&ha, "chat", 7).await;
    assert_eq!(seqs_until(&mut back, 7).await, [4, 5, 6, 7]);

    // The same history over HTTP: the last K, and the messages after a position.
    let (status, body) = http(b.addr, "GET", "/rooms/chat/history?limit=2", "").await;
    assert_eq!(status, 200, "{body}");
    let body = json_of(&body);
    assert_eq!(body["seq"], 7);
    assert_eq!(
        body["messages"],
        json!([{"seq":6,"payload":{"n":6}},{"seq":7,"payload":{"n":7}}])
    );
    let path = format!("/rooms/chat/history?since={epoch}:5");
    let body = json_of(&http(a.addr, "GET", &path, "").await.1);
    assert_eq!(body["messages"].as_array().map(Vec::len), Some(2));
    assert_eq!(body["epoch"], epoch.as_str());
}

#[tokio::test]
async fn the_hand_off_to_live_delivery_has_no_gap_and_no_duplicate_under_load() {
    let redis = RedisServer::start();
    let (a, ha) = node(&redis, "a", Durability::default(), &[]).await;
    let (b, _hb) = node(&redis, "b", Durability::default(), &[]).await;
    let (mut watcher, notice) = join(&a, "busy", None).await;
    let epoch = notice["epoch"].as_str().expect("epoch").to_owned();

    const TOTAL: u64 = 400;
    let publisher = {
        let ha = ha.clone();
        tokio::spawn(async move {
            for n in 1..=TOTAL {
                publish(&ha, "busy", n).await;
            }
        })
    };
    // Clients join and resume on both nodes while the stream runs.
    let mut clients = Vec::new();
    for i in 0..8u64 {
        let seen = seqs_until(&mut watcher, 20 * (i + 1)).await;
        let at = *seen.last().expect("a seq");
        let server = if i % 2 == 0 { &a } else { &b };
        let since = format!("{epoch}:{}", at.saturating_sub(7 * i));
        let resume = i % 3 != 2;
        let (ws, notice) = join(server, "busy", resume.then_some(since.as_str())).await;
        clients.push((ws, notice));
    }
    publisher.await.expect("publisher");
    for (mut ws, notice) in clients {
        if notice["type"] == "fanout.resumed" {
            assert_eq!(notice["recovered"], true, "{notice}");
        }
        let start = notice["seq"].as_u64().expect("seq");
        let seen = seqs_until(&mut ws, TOTAL).await;
        let want: Vec<u64> = (start + 1..=TOTAL).collect();
        assert_eq!(seen, want, "after {notice}");
    }
}

#[tokio::test]
async fn a_redis_restart_without_persistence_starts_a_new_epoch() {
    let mut redis = RedisServer::start();
    let (a, ha) = node(&redis, "a", Durability::default(), &[]).await;
    let (mut ws, notice) = join(&a, "r", None).await;
    let old = position_of(&notice);
    publish(&ha, "r", 1).await;
    publish(&ha, "r", 2).await;
    assert_eq!(seqs_until(&mut ws, 2).await, [1, 2]);
    drop(ws);

    redis.restart();
    let h = ha.clone();
    wait_until("node ready again", || {
        let h = h.clone();
        async move { h.is_ready() }
    })
    .await;
    let since = format!("{}:2", old.epoch());
    let (mut back, notice) = join(&a, "r", Some(&since)).await;
    assert_eq!(notice["type"], "fanout.resumed");
    assert_eq!(notice["recovered"], false);
    assert_eq!(notice["reason"], "epoch_changed");
    assert_ne!(
        notice["epoch"],
        old.epoch(),
        "a lost history gets a new epoch"
    );
    assert_eq!(notice["seq"], 0);
    publish(&ha, "r", 1).await;
    assert_eq!(
        seqs_until(&mut back, 1).await,
        [1],
        "the new epoch starts at 1"
    );

    let (status, body) = http(
        a.addr,
        "GET",
        &format!("/rooms/r/history?since={since}"),
        "",
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(json_of(&body)["reason"], "epoch_changed");
}

#[tokio::test]
async fn trimmed_history_and_too_far_behind_are_refused_with_their_reasons() {
    let redis = RedisServer::start();
    let short = Durability::default().history(nz(4));
    let near = Durability::default().replay_limit(nz(10));
    let (a, ha) = node(
        &redis,
        "a",
        Durability::default(),
        &[("short", short), ("near", near)],
    )
    .await;
    let (_w1, n1) = join(&a, "short", None).await;
    let (_w2, n2) = join(&a, "near", None).await;
    // Approximate trimming drops whole stream nodes (100 entries each): publish past them.
    for n in 1..=300 {
        publish(&ha, "short", n).await;
    }
    for n in 1..=20 {
        publish(&ha, "near", n).await;
    }
    let len: u64 = redis
        .cli(&["XLEN", "{ws:room:short}:history"])
        .trim()
        .parse()
        .expect("XLEN");
    assert!((4..300).contains(&len), "trimmed to at least 4: {len}");

    let since = format!("{}:1", position_of(&n1).epoch());
    let (mut ws, notice) = join(&a, "short", Some(&since)).await;
    assert_eq!(notice["recovered"], false, "{notice}");
    assert_eq!(notice["reason"], "trimmed");
    assert_eq!(
        notice["seq"], 300,
        "live continues from the current position"
    );
    publish(&ha, "short", 301).await;
    assert_eq!(seqs_until(&mut ws, 301).await, [301], "nothing replayed");

    let since = format!("{}:5", position_of(&n2).epoch());
    let (_ws, notice) = join(&a, "near", Some(&since)).await;
    assert_eq!(notice["reason"], "too_far_behind", "{notice}");
    assert_eq!(notice["seq"], 20);
    let (status, body) = http(
        a.addr,
        "GET",
        &format!("/rooms/near/history?since={since}"),
        "",
    )
    .await;
    assert_eq!(
        (status, json_of(&body)["reason"].clone()),
        (409, json!("too_far_behind"))
    );
    let since = format!("{}:10", position_of(&n2).epoch());
    let (_ws, notice) = join(&a, "near", Some(&since)).await;
    assert_eq!(
        notice["recovered"], true,
        "exactly the replay limit behind: {notice}"
    );
}

/// Writes message `seq` of `room` the way the script does, but without publishing it: a
/// message this node's subscriber never saw.
fn store_unpublished(redis: &RedisServer, room: &str, epoch: &str, seq: u64) {
    let meta = format!("{{ws:room:{room}}}:meta");
    let stream = format!("{{ws:room:{room}}}:history");
    assert_eq!(
        redis.cli(&["HINCRBY", &meta, "seq", "1"]).trim(),
        seq.to_string()
    );
    let env =
        format!(r#"{{"pos":{{"epoch":"{epoch}","seq":{seq}}},"v":1,"payload":{{"n":{seq}}}}}"#);
    redis.cli(&["XADD", &stream, &format!("{seq}-0"), "e", &env]);
}

#[tokio::test]
async fn a_node_repairs_its_members_gap_from_history_instead_of_reporting_it() {
    let redis = RedisServer::start();
    let (a, ha) = node(&redis, "a", Durability::default(), &[]).await;
    let mut plain = join_plain(&a, &ha, "g").await;
    let (mut ws, notice) = join(&a, "g", None).await;
    let epoch = position_of(&notice).epoch().to_owned();
    publish(&ha, "g", 1).await;
    assert_eq!(seqs_until(&mut ws, 1).await, [1]);
    assert_eq!(recv_json(&mut plain, "plain 1").await, json!({"n":1}));

    // A live seq that skips: 2 and 3 never reached the subscriber.
    store_unpublished(&redis, "g", &epoch, 2);
    store_unpublished(&redis, "g", &epoch, 3);
    publish(&ha, "g", 4).await;
    assert_eq!(seqs_until(&mut ws, 4).await, [2, 3, 4]);
    for n in 2..=4 {
        assert_eq!(
            recv_json(&mut plain, "plain, in order").await,
            json!({"n":n})
        );
    }

    // The subscriber link drops while 5 and 6 are stored: read back once the link is up.
    store_unpublished(&redis, "g", &epoch, 5);
    store_unpublished(&redis, "g", &epoch, 6);
    let before = ha.stats().reconnects;
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    let h = ha.clone();
    wait_until("the subscriber reconnected", || {
        let h = h.clone();
        async move { h.stats().reconnects > before && h.is_ready() }
    })
    .await;
    assert_eq!(
        seqs_until(&mut ws, 6).await,
        [5, 6],
        "no fanout.missed: repaired"
    );
    publish(&ha, "g", 7).await;
    assert_eq!(seqs_until(&mut ws, 7).await, [7]);
    for n in 5..=7 {
        assert_eq!(
            recv_json(&mut plain, "plain, repaired").await,
            json!({"n":n})
        );
    }
}

#[tokio::test]
async fn a_seed_envelope_from_redis_cli_still_reaches_a_durable_room() {
    let redis = RedisServer::start();
    let (a, ha) = node(&redis, "a", Durability::default(), &[]).await;
    let mut plain = join_plain(&a, &ha, "i").await;
    let (mut ws, _) = join(&a, "i", None).await;
    wait_until("subscribed", || async { redis.numsub("ws:room:i") == 1 }).await;
    let received = ha.stats().received;
    redis.cli(&["PUBLISH", "ws:room:i", r#"{"payload":{"seed":true}}"#]);
    assert_eq!(
        recv_json(&mut plain, "seed, plain").await,
        json!({"seed":true})
    );
    assert_eq!(
        recv_json(&mut ws, "seed, positioned").await,
        json!({"payload":{"seed":true}}),
        "no position: not resumable"
    );
    assert_eq!(ha.stats().received, received + 1, "counted");
    publish(&ha, "i", 1).await;
    assert_eq!(seqs_until(&mut ws, 1).await, [1]);
}

/// Redis forgets its scripts (`SCRIPT FLUSH` here; a restart or a failover does the same):
/// the publisher loads the script again and sends the refused calls of its pipeline once more,
/// in order. Every broadcast succeeds, and its position, as `send` and the receipts report
/// it, is the next seq in the order the broadcasts were queued. One flush comes between runs
/// (the whole run is refused), others while a run is on its way (its tail is refused).
#[tokio::test]
async fn durable_broadcasts_survive_redis_forgetting_the_script() {
    let redis = RedisServer::start();
    let (a, ha) = node(&redis, "a", Durability::default(), &[]).await;
    let (mut ws, notice) = join(&a, "f", None).await;
    let epoch = position_of(&notice).epoch().to_owned();

    let first = ha
        .broadcast("f", json!({ "n": 1 }))
        .publish()
        .await
        .expect("durable broadcast");
    assert_eq!(first.position(), Some(&Position::new(epoch.as_str(), 1)));
    assert_eq!(first.nodes(), 1);

    const ROUND: u64 = 60;
    let mut positions = vec![Position::new(epoch.as_str(), 1)];
    for round in 0..3u64 {
        redis.cli(&["SCRIPT", "FLUSH"]);
        let mut receipts = Vec::new();
        let mut flush = None;
        for n in 2 + round * ROUND..2 + (round + 1) * ROUND {
            if n == 2 + round * ROUND + ROUND / 2 {
                // Flushes again while the runs queued so far are on their way, or just after.
                let port = redis.port().to_string();
                flush = Some(tokio::task::spawn_blocking(move || {
                    std::process::Command::new("redis-cli")
                        .args(["-p", &port, "SCRIPT", "FLUSH"])
                        .output()
                }));
            }
            let receipt = ha
                .broadcast("f", json!({ "n": n }))
                .queue()
                .await
                .expect("queued");
            receipts.push(receipt);
        }
        for receipt in receipts {
            let published = receipt.published().await.expect("published after NOSCRIPT");
            positions.push(published.position().expect("a durable room's").clone());
        }
        if let Some(flush) = flush {
            let _ = flush.await; // this round's flush is over before the next round's
        }
    }
    let last = 1 + 3 * ROUND;
    let want: Vec<Position> = (1..=last)
        .map(|s| Position::new(epoch.as_str(), s))
        .collect();
    assert_eq!(positions, want, "seq order is queue order");
    assert_eq!(
        seqs_until(&mut ws, last).await,
        (1..=last).collect::<Vec<_>>()
    );
    // Each round's first run was refused, and the script loaded again.
    let stat = |section: &str, name: &str, field: &str| -> u64 {
        let info = redis.cli(&["INFO", section]);
        info.lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(field))
            })
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    assert!(stat("errorstats", "errorstat_NOSCRIPT:", "count=") >= 3);
    assert!(stat("commandstats", "cmdstat_script|load:", "calls=") >= 3);
    assert_eq!(ha.stats().publish_errors, 0);

    // A plain room's broadcast has no position.
    let plain = FanoutLayer::builder(redis.url())
        .node_id("p")
        .build()
        .expect("valid url")
        .handle();
    wait_until("plain node ready", || async { plain.is_ready() }).await;
    let published = plain
        .broadcast("plain", json!(1))
        .publish()
        .await
        .expect("plain broadcast");
    assert_eq!(published.position(), None);
}

/// A message the stream refuses (here: an entry someone wrote with a later id) fails with
/// Redis's error, as does every message queued behind it in the same script call; the seqs
/// they took are given back, so the room goes on with no hole once the stream accepts writes
/// again.
#[tokio::test]
async fn a_message_redis_refuses_to_store_fails_and_leaves_no_hole() {
    let redis = RedisServer::start();
    let (a, ha) = node(&redis, "a", Durability::default(), &[]).await;
    let (mut ws, _) = join(&a, "g", None).await;
    publish(&ha, "g", 1).await;
    let stream = "{ws:room:g}:history";
    redis.cli(&["XADD", stream, "1000-0", "e", "not ours"]);

    let mut receipts = Vec::new();
    for n in 2..=6 {
        let receipt = ha.broadcast("g", json!({ "n": n })).queue().await;
        receipts.push(receipt.expect("queued"));
    }
    for receipt in receipts {
        let error = receipt
            .published()
            .await
            .expect_err("refused by the stream");
        assert!(error.is_redis(), "{error}");
    }
    assert_eq!(redis.cli(&["HGET", "{ws:room:g}:meta", "seq"]).trim(), "1");
    assert_eq!(ha.stats().publish_errors, 5);

    redis.cli(&["XDEL", stream, "1000-0"]);
    redis.cli(&["XSETID", stream, "1-0"]);
    publish(&ha, "g", 2).await;
    assert_eq!(seqs_until(&mut ws, 2).await, [1, 2]);
}

/// On a Redis Cluster the script runs on the master of the room's slot (its keys carry the
/// channel's hash tag) and SPUBLISHes there; resume and history work as on one server, for a
/// room name with a hash tag of its own too.
#[cfg(feature = "cluster")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_rooms_work_on_a_redis_cluster() {
    let cluster = RedisCluster::start(3, 0);
    let layers = ["k1", "k2"].map(|id| {
        FanoutLayer::builder(cluster.urls())
            .node_id(id)
            .durable(Durability::default())
            .build()
            .expect("layer")
    });
    let fleet = start_nodes(layers, chat_app::app).await;
    for room in ["lobby", "team{7}"] {
        let (mut ws, notice) = join(&fleet[0].0, room, None).await;
        let epoch = position_of(&notice).epoch().to_owned();
        for n in 1..=3 {
            publish(&fleet[1].1, room, n).await;
        }
        assert_eq!(seqs_until(&mut ws, 3).await, [1, 2, 3], "{room}");
        drop(ws);
        publish(&fleet[0].1, room, 4).await;
        let (mut back, notice) = join(&fleet[1].0, room, Some(&format!("{epoch}:2"))).await;
        assert_eq!(notice["recovered"], true, "{room}: {notice}");
        assert_eq!(seqs_until(&mut back, 4).await, [3, 4], "{room}");
    }
    assert_eq!(cluster.classic_channels("ws:room:*"), 0, "SPUBLISH only");
}

/// Chaos: two publishers on two nodes, clients that keep dropping and resuming on either
/// node, and the subscriber links killed mid-stream. Every client checks each delivery: the
/// next seq, or a gap it was told of (`recovered:false`, `fanout.missed`). With a history that
/// holds every message, nobody is told anything and every client sees every seq once, in
/// order, across its connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_publishers_resumes_and_link_kills_leave_no_silent_gap() {
    let redis = RedisServer::start();
    let whole = Durability::default().history(nz(2000));
    let (a, ha) = node(&redis, "a", whole, &[]).await;
    let (b, hb) = node(&redis, "b", whole, &[]).await;
    let servers = [a, b];
    const EACH: u64 = 300;
    const TOTAL: u64 = 2 * EACH;

    let mut clients = Vec::new();
    for c in 0..6usize {
        let urls: Vec<String> = servers
            .iter()
            .map(|s| s.ws_url("/ws?room=chaos&positions=1"))
            .collect();
        let (mut ws, notice) = join(&servers[c % 2], "chaos", None).await;
        clients.push(tokio::spawn(async move {
            let mut at = position_of(&notice);
            let (mut told, mut seen, mut hop) = (Vec::new(), 0u64, c);
            loop {
                // Read a few deliveries, then drop the connection and resume elsewhere.
                for _ in 0..(7 + c * 5) {
                    if at.seq() == TOTAL {
                        return (seen, told);
                    }
                    let frame = recv_json(&mut ws, "chaos delivery").await;
                    if frame["type"] == "fanout.missed" {
                        told.push(frame);
                        continue;
                    }
                    let seq = frame["seq"].as_u64().expect("a numbered delivery");
                    assert!(
                        seq == at.seq() + 1 || !told.is_empty(),
                        "client {c}: seq {seq} after {at} without being told of a gap"
                    );
                    assert!(seq > at.seq(), "client {c}: duplicate seq {seq} after {at}");
                    at = Position::new(at.epoch(), seq);
                    seen += 1;
                }
                drop(ws);
                hop += 1;
                let url = format!("{}&since={at}", urls[hop % 2]);
                ws = connect(&url).await;
                let notice = recv_json(&mut ws, "resume notice").await;
                assert_eq!(notice["type"], "fanout.resumed", "{notice}");
                if notice["recovered"] != true {
                    told.push(notice.clone());
                }
                at = position_of(&notice);
            }
        }));
    }
    let publishers: Vec<_> = [ha.clone(), hb.clone()]
        .into_iter()
        .map(|h| {
            tokio::spawn(async move {
                for n in 1..=EACH {
                    publish(&h, "chaos", n).await;
                }
            })
        })
        .collect();
    for _ in 0..2 {
        let before = ha.stats().reconnects + hb.stats().reconnects;
        redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        wait_until("both subscribers back", || async {
            ha.stats().reconnects + hb.stats().reconnects >= before + 2
                && ha.is_ready()
                && hb.is_ready()
        })
        .await;
    }
    for p in publishers {
        p.await.expect("publisher");
    }
    for (c, client) in clients.into_iter().enumerate() {
        let (seen, told) = client.await.expect("client");
        // Nothing was trimmed (the history holds every message) and every gap the link
        // kills made was read back by the nodes: nobody had to be told anything.
        assert!(told.is_empty(), "client {c} was told {told:?}");
        assert_eq!(seen, TOTAL, "client {c}");
    }
}

/// A resume storm: 1,000 clients of a restarted node resume the same room from the same place
/// on another node at once. Each gets every message after its position once, and the node
/// shares Redis reads between resumes that wait for their turn together.
#[tokio::test]
async fn a_resume_storm_shares_history_reads_and_every_client_gets_every_message_once() {
    let redis = RedisServer::start();
    let (a, handle) = node(&redis, "a", Durability::default(), &[]).await;
    let (_first, notice) = join(&a, "storm", None).await;
    let epoch = position_of(&notice).epoch().to_owned();
    for n in 1..=50 {
        publish(&handle, "storm", n).await;
    }
    let before = handle.stats().history_reads;
    let since = format!("{epoch}:10");
    let clients: Vec<_> = (0..1000)
        .map(|_| {
            let url = a.ws_url(&format!("/ws?room=storm&positions=1&since={since}"));
            tokio::spawn(async move {
                let mut ws = connect(&url).await;
                let notice = recv_json(&mut ws, "the resume notice").await;
                assert_eq!(notice["type"], "fanout.resumed", "{notice}");
                assert_eq!(notice["recovered"], true, "{notice}");
                seqs_until(&mut ws, 50).await
            })
        })
        .collect();
    for client in clients {
        let seqs = client.await.expect("client");
        assert_eq!(seqs, (11..=50).collect::<Vec<u64>>());
    }
    let reads = handle.stats().history_reads - before;
    eprintln!("1000 resumes of one room and place: {reads} history reads on the node");
    assert!(
        reads < 500,
        "resumes that wait for a turn together share a read: {reads} reads for 1000 resumes"
    );
}

/// `FanoutSocket::join_durable_from`: the last N messages in one call, and a refused resume
/// that falls back to them, each with the gap-free hand-off to live messages.
#[tokio::test]
async fn a_join_starts_from_the_last_n_or_falls_back_to_them_when_a_resume_is_refused() {
    use axum::extract::Query;
    use axum::extract::ws::WebSocketUpgrade;
    use axum::response::Response;
    use axum_fanout::durable::Start;
    use std::collections::HashMap;

    async fn board(
        upgrade: WebSocketUpgrade,
        Query(q): Query<HashMap<String, String>>,
        rooms: RoomHandle,
    ) -> Response {
        let last: usize = q.get("last").and_then(|n| n.parse().ok()).unwrap_or(0);
        let start = match q.get("since").and_then(|s| s.parse::<Position>().ok()) {
            Some(since) => Start::AfterOrLast(since, last),
            None => Start::Last(last),
        };
        rooms.on_upgrade(upgrade, move |mut socket| async move {
            if let Err(e) = socket.join_durable_from("board", start).await {
                return socket.close(1011, &e.to_string());
            }
            while let Some(Ok(_)) = socket.recv().await {}
        })
    }

    let redis = RedisServer::start();
    let layer = FanoutLayer::builder(redis.url())
        .durable(Durability::default())
        .build()
        .expect("valid url");
    let handle = layer.handle();
    let app = axum::Router::new()
        .route("/board", axum::routing::get(board))
        .layer(layer);
    let server = TestServer::start(app).await;
    let h = handle.clone();
    wait_until("node ready", || {
        let h = h.clone();
        async move { h.is_ready() }
    })
    .await;
    for n in 1..=5 {
        handle
            .broadcast("board", json!(n))
            .await
            .expect("published");
    }
    let mut last = connect(&server.ws_url("/board?last=2")).await;
    let notice = recv_json(&mut last, "notice").await;
    assert_eq!(
        (&notice["recovered"], &notice["seq"]),
        (&json!(true), &json!(3)),
        "{notice}"
    );
    let mut fallback = connect(&server.ws_url("/board?last=2&since=gone:9")).await;
    let notice = recv_json(&mut fallback, "notice").await;
    assert_eq!(
        (&notice["recovered"], &notice["reason"], &notice["seq"]),
        (&json!(false), &json!("epoch_changed"), &json!(3)),
        "{notice}"
    );
    handle
        .broadcast("board", json!(6))
        .await
        .expect("published");
    for ws in [&mut last, &mut fallback] {
        let mut seqs = Vec::new();
        for _ in 0..3 {
            seqs.push(recv_json(ws, "a message").await["seq"].clone());
        }
        assert_eq!(seqs, [json!(4), json!(5), json!(6)]);
    }
}
