//! Presence across the fleet (README "Presence", `PROTOCOL.md` part 2, "Presence"), against real,
//! throwaway `redis-server` processes and, for the crash, real `chat` processes killed with
//! SIGKILL: members with connection counts over several nodes, join and leave notices in order
//! with the room's messages, no ghosts after a crash, re-assertion after Redis lost its data,
//! snapshot plus events under churn, and the cost of a 10,000-member room.

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/chat_app/mod.rs"]
mod chat_app;
#[allow(dead_code, unreachable_pub)]
mod presence_common;
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum_fanout::{FanoutLayer, RoomHandle};
use futures_util::StreamExt;
use presence_common::*;
use serde_json::json;
use support::*;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn two_users_on_three_nodes_join_once_and_leave_after_their_last_socket() {
    let redis = RedisServer::start();
    two_users_on_three_nodes(&Redis::Server(&redis)).await;
}

#[tokio::test]
async fn a_node_shutting_down_takes_its_members_out_at_once() {
    let redis = RedisServer::start();
    a_node_shutting_down(&Redis::Server(&redis)).await;
}

#[tokio::test]
async fn presence_is_opt_in_per_room_and_members_are_validated() {
    let redis = RedisServer::start();
    let layer = FanoutLayer::builder(redis.url())
        .room_presence("with")
        .build()
        .expect("valid url");
    let handle = layer.handle();
    let server = TestServer::start(chat_app::app(layer)).await;
    wait_until("node ready", || async { handle.is_ready() }).await;
    let err = handle.presence("without").await.expect_err("no presence");
    assert!(err.is_presence_off(), "{err:?}");
    let (status, _) = http(server.addr, "GET", "/rooms/without/presence", "").await;
    assert_eq!(status, 404);
    // A room without presence: the chat app falls back to a plain join, and no notices.
    let mut plain = member(server.addr, "without", "zed").await;
    let mut with = member(server.addr, "with", "amy").await;
    wait_members(&handle, "with", &[("amy", 1)]).await;
    assert_eq!(
        handle.presence_count("with").await.expect("count").members,
        1
    );
    handle
        .broadcast("without", json!({ "marker": 1 }))
        .await
        .expect("marker");
    assert_eq!(
        json_of(&recv_text(&mut plain, "marker").await),
        json!({ "marker": 1 })
    );
    assert_eq!(first_notices(&mut with).await.0["type"], "fanout.join");
    // A user id over 256 bytes is refused: 400 at the upgrade (PROTOCOL.md part 2, "Users"; it
    // closed the upgraded socket with 1008 before that section named the user's rules).
    let long = "x".repeat(300);
    let url = format!("ws://{}/ws?room=with&user={long}", server.addr);
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 400);
        }
        other => panic!("expected 400 at the upgrade, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn redis_restarted_the_list_is_restored_without_spurious_notices() {
    let mut redis = RedisServer::start();
    let ttl = Duration::from_secs(3);
    let fleet = nodes(&Redis::Server(&redis), 2, ttl).await;
    let room = "phoenix";
    let mut watcher = member(fleet[0].server.addr, room, "watcher").await;
    let _alice = member(fleet[0].server.addr, room, "alice").await;
    let _bob1 = member(fleet[1].server.addr, room, "bob").await;
    let _bob2 = member(fleet[0].server.addr, room, "bob").await;
    let gone = member(fleet[1].server.addr, room, "gone").await;
    let stay = [("alice", 1), ("bob", 2), ("watcher", 1)];
    let mut all = stay.to_vec();
    all.push(("gone", 1));
    wait_members(&fleet[1].handle, room, &all).await;
    let publish = |n: u64| {
        let h = fleet[1].handle.clone();
        move || async move {
            h.broadcast(room, json!({ "marker": n }))
                .await
                .expect("marker");
        }
    };
    notices_until_marker(&mut watcher, 1, publish(1)).await;
    let before = fleet[0].handle.presence(room).await.expect("snapshot");

    let epoch_key = "__axum_fanout:presence:ws:room:epoch";
    let epoch = redis.cli(&["GET", epoch_key]);
    // Redis goes away (--save "": every key is lost), and "gone" leaves meanwhile.
    redis.stop();
    drop(gone);
    wait_until("the node saw gone's socket close", || async {
        fleet[1].handle.stats().connections == 1
    })
    .await;
    redis.restart();
    let restarted = Instant::now();
    wait_until("both nodes subscribed again", || async {
        redis.numsub("ws:room:phoenix") == 2
    })
    .await;
    wait_members(&fleet[0].handle, room, &stay).await;
    let took = restarted.elapsed();
    println!("presence restored {took:?} after a redis restart (ttl {ttl:?})");
    assert_ne!(redis.cli(&["GET", epoch_key]), epoch, "redis lost its data");
    assert!(took <= ttl + Duration::from_secs(2), "restored in {took:?}");
    let after = fleet[1].handle.presence(room).await.expect("snapshot");
    assert!(
        after.version >= before.version,
        "versions keep growing across the data loss: {} then {}",
        before.version,
        after.version
    );
    // The watcher is told that "gone" left (once every node had time to re-assert), and
    // nothing about the members that did not change.
    let mut seen = Vec::new();
    loop {
        let frame = json_of(&recv_text(&mut watcher, "gone's leave").await);
        let kind = frame["type"].as_str().unwrap_or_default().to_owned();
        if kind == "fanout.join" || kind == "fanout.leave" {
            seen.push(frame);
            if kind == "fanout.leave" {
                break;
            }
        }
    }
    println!(
        "leave of a user gone during the outage: {:?} after the restart",
        restarted.elapsed()
    );
    seen.extend(notices_until_marker(&mut watcher, 2, publish(2)).await);
    assert_eq!(kinds(&seen), [pair("fanout.leave", "gone")], "{seen:?}");
}

#[tokio::test]
async fn snapshot_plus_newer_events_equal_redis_after_churn() {
    let redis = RedisServer::start();
    snapshot_plus_newer_events_after_churn(&Redis::Server(&redis)).await;
}

#[tokio::test]
async fn ten_thousand_members_cost_of_listing_counting_and_reaping() {
    let redis = RedisServer::start();
    let fleet = nodes(&Redis::Server(&redis), 1, Duration::from_secs(30)).await;
    for members in [1_000, 10_000] {
        big_room_costs(&redis, &fleet[0].handle, members).await;
    }
}

/// Lists and counts a room of `members` members many times, then lets their node die, and
/// prints what each cost the caller and Redis.
async fn big_room_costs(redis: &RedisServer, handle: &RoomHandle, members: usize) {
    let room = format!("big{members}");
    let room = room.as_str();
    let bulk = format!("bulk{members}");
    let deployment = Redis::Server(redis);
    let mut conn = populate_share(&deployment, room, &bulk, members).await;

    // Redis's own time (every command, `INFO commandstats`) since the last reset, in us.
    let redis_usec = |redis: &RedisServer| -> f64 {
        redis
            .cli(&["INFO", "commandstats"])
            .lines()
            .filter(|l| l.starts_with("cmdstat_") && !l.starts_with("cmdstat_config"))
            .filter_map(|l| l.split(',').find_map(|f| f.strip_prefix("usec=")))
            .filter_map(|n| n.parse::<f64>().ok())
            .sum()
    };
    // Warm up (loads the scripts), then measure.
    assert_eq!(
        handle.presence(room).await.expect("list").members.len(),
        members
    );
    let _ = redis.cli(&["CONFIG", "RESETSTAT"]);
    let rounds = 20u32;
    let t = Instant::now();
    for _ in 0..rounds {
        let s = handle.presence(room).await.expect("list");
        assert_eq!(s.members.len(), members);
    }
    let list = t.elapsed() / rounds;
    let list_redis = redis_usec(redis) / f64::from(rounds);
    let _ = redis.cli(&["CONFIG", "RESETSTAT"]);
    let rounds = 200u32;
    let t = Instant::now();
    for _ in 0..rounds {
        let c = handle.presence_count(room).await.expect("count");
        assert_eq!(c.members, members as u64);
    }
    let count = t.elapsed() / rounds;
    let count_redis = redis_usec(redis) / f64::from(rounds);
    // The bulk node dies: the next query takes its 10,000 members out (10,000 leave events),
    // a chunk per script call; the slow log keeps the calls over 1 ms.
    let _ = redis.cli(&["CONFIG", "SET", "slowlog-log-slower-than", "1000"]);
    let _ = redis.cli(&["CONFIG", "SET", "slowlog-max-len", "1000"]);
    let _ = redis.cli(&["SLOWLOG", "RESET"]);
    expire_lease(&deployment, &mut conn, &bulk).await;
    let _ = redis.cli(&["CONFIG", "RESETSTAT"]);
    let t = Instant::now();
    let after = handle.presence_count(room).await.expect("count");
    let reap = t.elapsed();
    let reap_redis = redis_usec(redis);
    assert_eq!(after.members, 0, "no ghost of the dead node");
    // Slow log entries: [id, time, duration (us), [command, args..], ..].
    let log: Vec<Vec<redis::Value>> = conn.run(redis::cmd("SLOWLOG").arg("GET").arg(1000)).await;
    let _ = redis.cli(&["CONFIG", "SET", "slowlog-log-slower-than", "10000"]);
    let calls = redis
        .cli(&["INFO", "commandstats"])
        .lines()
        .find_map(|l| l.trim().strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    let scripts: Vec<i64> = log
        .iter()
        .filter(|e| {
            matches!(e.get(3), Some(redis::Value::Array(args))
                if matches!(args.first(), Some(redis::Value::BulkString(c)) if c.eq_ignore_ascii_case(b"evalsha")))
        })
        .filter_map(|e| match e.get(2) {
            Some(redis::Value::Int(us)) => Some(*us),
            _ => None,
        })
        .collect();
    let slowest = scripts.iter().copied().max().unwrap_or(0);
    println!(
        "presence, {members} members in one room: list {:.2} ms per call (redis {:.0} us), \
         count {:.3} ms per call (redis {:.1} us), reaping a dead node's {members} members \
         {:.1} ms (redis {:.0} us in {} script calls, the longest {slowest} us; {members} leave \
         events)",
        list.as_secs_f64() * 1e3,
        list_redis,
        count.as_secs_f64() * 1e3,
        count_redis,
        reap.as_secs_f64() * 1e3,
        reap_redis,
        calls,
    );
}

#[tokio::test]
async fn a_dead_nodes_share_larger_than_a_chunk_leaves_once_per_user_in_version_order() {
    let redis = RedisServer::start();
    a_dead_nodes_large_share_leaves_once_per_user(&Redis::Server(&redis)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_dies_has_its_members_reaped_once_by_the_survivors() {
    let redis = RedisServer::start();
    a_node_that_dies_is_reaped_once(&Redis::Server(&redis)).await;
}

// ---------------------------------------------------------------------------------------------
// The `chat` example as separate processes: a node killed with SIGKILL
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_chat_process_killed_with_sigkill_leaves_no_ghosts() {
    let bin = chat_binary();
    let redis = RedisServer::start();
    let ttl_s = 2;
    let ttl = ttl_s.to_string();
    let mut procs = Vec::new();
    for i in 1..=3 {
        let env = [("PRESENCE", "1"), ("PRESENCE_TTL_S", ttl.as_str())];
        procs.push(ChatProcess::start(&bin, &redis, &format!("p{i}"), &env).await);
    }
    let room = "crash";
    let addrs: Vec<SocketAddr> = procs.iter().map(|p| p.addr).collect();
    let addr = |i: usize| addrs[i];
    let mut watcher = member(addr(0), room, "watcher").await;
    let _carol2 = member(addr(1), room, "carol").await;
    let _carol3 = member(addr(2), room, "carol").await;
    let _dave3 = member(addr(2), room, "dave").await;
    let _dave3b = member(addr(2), room, "dave").await;
    let want: BTreeMap<String, u64> = [("carol", 2), ("dave", 2), ("watcher", 1)]
        .iter()
        .map(|(u, n)| ((*u).to_owned(), *n))
        .collect();
    wait_until("every member listed", || async {
        members_of(&presence_http(addr(0), room).await) == want
    })
    .await;
    let post_marker = |n: u64| {
        let a = addr(0);
        move || async move {
            let (status, body) = http(
                a,
                "POST",
                &format!("/rooms/{room}/messages"),
                &json!({ "marker": n }).to_string(),
            )
            .await;
            assert_eq!(status, 200, "{body}");
        }
    };
    notices_until_marker(&mut watcher, 1, post_marker(1)).await;

    // SIGKILL: no shutdown, no leave sent by the node itself.
    procs[2].kill();
    let killed = Instant::now();
    let bound = Duration::from_secs(ttl_s) + Duration::from_secs(3);
    let leave = loop {
        let frame = tokio::time::timeout_at(killed + bound, watcher.next())
            .await
            .unwrap_or_else(|_| panic!("no leave for dave within {bound:?}"));
        let Some(Ok(Message::Text(text))) = frame else {
            continue;
        };
        let frame = json_of(&text);
        if frame["type"] == "fanout.leave" {
            break frame;
        }
    };
    let took = killed.elapsed();
    println!("kill -9 to the leave notice: {took:?} (PRESENCE_TTL_S={ttl_s})");
    assert_eq!(leave["user"], "dave", "carol still has a socket: {leave}");
    assert_eq!(leave["room"], room);
    let rest = presence_http(addr(1), room).await;
    assert_eq!(
        members_of(&rest),
        [("carol".to_owned(), 1), ("watcher".to_owned(), 1)]
            .into_iter()
            .collect()
    );
    // Exactly once, though two survivors were looking: nothing else before the next marker.
    let seen = notices_until_marker(&mut watcher, 2, post_marker(2)).await;
    assert!(seen.is_empty(), "{seen:?}");
}

#[tokio::test]
async fn in_a_durable_room_a_positions_socket_gets_presence_notices_as_they_are() {
    // Presence notices travel as envelopes on the room's channel; in a durable room a socket
    // that asked for positions must still get them as `fanout.*` notices, not as deliveries.
    let redis = RedisServer::start();
    let layer = FanoutLayer::builder(redis.url())
        .presence(true)
        .durable(axum_fanout::durable::Durability::default())
        .build()
        .expect("valid url");
    let handle = layer.handle();
    let server = TestServer::start(chat_app::app(layer)).await;
    wait_until("node ready", || async { handle.is_ready() }).await;
    let url = |user: &str| server.ws_url(&format!("/ws?room=both&user={user}&positions=1"));
    let mut a = connect(&url("a")).await;
    wait_members(&handle, "both", &[("a", 1)]).await;
    let _b = connect(&url("b")).await;
    loop {
        let frame = json_of(&recv_text(&mut a, "b's join").await);
        assert!(
            frame.get("payload").is_none_or(|p| p.get("type").is_none()),
            "a notice wrapped as a delivery: {frame}"
        );
        if frame["type"] == "fanout.join" && frame["user"] == "b" {
            break;
        }
    }
}
