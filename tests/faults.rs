//! Faults production brings, beyond Redis going away: Redis frozen under traffic, where some
//! nodes notice and some do not. The guarantee under test: every message a socket lacks lies
//! inside a `Missed` window that socket was told. Every test runs its own `redis-server`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::response::Response;
use axum::routing::get;
use axum_fanout::{Event, FanoutLayer, RoomHandle};
use serde_json::json;
use support::*;

const ROOM: &str = "feed";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `GET /ws` joins [`ROOM`], answers `joined`, and tells its client every loss notice as
/// `missed:<since_ms>:<until_ms>`; room messages reach the client as they are.
fn window_app(layer: FanoutLayer) -> Router {
    async fn ws(upgrade: WebSocketUpgrade, rooms: RoomHandle) -> Response {
        rooms.on_upgrade(upgrade, |mut socket| async move {
            if socket.join(ROOM).await.is_err() {
                return;
            }
            let _ = socket.send("joined");
            while let Some(Ok(event)) = socket.recv_event().await {
                if let Event::Missed(m) = event {
                    let _ = socket.send(format!("missed:{}:{}", m.since_ms(), m.until_ms()));
                }
            }
        })
    }
    Router::new().route("/ws", get(ws)).layer(layer)
}

fn layer(redis: &RedisServer, id: &str, probe_every: Duration) -> FanoutLayer {
    FanoutLayer::builder(redis.url())
        .node_id(id)
        .probe_interval(probe_every)
        .probe_timeout(Duration::from_millis(300))
        .publish_timeout(Duration::from_millis(500))
        .subscribe_timeout(Duration::from_secs(2))
        .build()
        .expect("layer")
}

/// What one client saw: the sequence numbers it received and the windows it was told.
#[derive(Debug, Default)]
struct Seen {
    seqs: BTreeSet<u64>,
    windows: Vec<(u64, u64)>,
}

/// Reads `ws` until the `{"end":true}` marker.
async fn read_to_end(ws: &mut Ws) -> Seen {
    let mut seen = Seen::default();
    loop {
        let text = recv_text(ws, "the end marker").await;
        if let Some(window) = text.strip_prefix("missed:") {
            let (since, until) = window.split_once(':').expect("since:until");
            seen.windows.push((
                since.parse().expect("since_ms"),
                until.parse().expect("until_ms"),
            ));
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&text).expect("a JSON payload");
        if v["end"] == true {
            return seen;
        }
        seen.seqs.insert(v["seq"].as_u64().expect("seq"));
    }
}

/// One broadcast of the steady stream: when it was made and how it ended.
#[derive(Debug, Clone, Copy)]
struct Sent {
    /// Wall clock (ms) just before the broadcast was made: its envelope's stamp is no earlier.
    before_ms: u64,
    acked: Option<bool>,
}

/// Redis frozen (SIGSTOP) under steady traffic from three nodes. One node probes its link
/// often and declares it dead during the freeze; the other never probes in the test's time
/// and keeps its connection. When Redis wakes it runs the PUBLISH commands it had taken while
/// frozen: the steady node's socket receives them, the watchful node's does not. Each message
/// the watchful node's socket lacks must lie in a window it was told, which must therefore
/// start no later than the last moment its link was known to deliver, not when the probe
/// noticed the freeze.
#[tokio::test]
async fn a_frozen_redis_leaves_no_loss_outside_the_windows_told() {
    let redis = RedisServer::start();
    let nodes = start_nodes(
        [
            layer(&redis, "steady", Duration::from_secs(600)),
            layer(&redis, "watchful", Duration::from_millis(100)),
            layer(&redis, "publisher", Duration::from_secs(600)),
        ],
        window_app,
    )
    .await;
    let mut steady = connect(&nodes[0].0.ws_url("/ws")).await;
    let mut watchful = connect(&nodes[1].0.ws_url("/ws")).await;
    for ws in [&mut steady, &mut watchful] {
        assert_eq!(recv_text(ws, "join ack").await, "joined");
    }
    wait_until("both subscribed", || async {
        redis.numsub(&format!("ws:room:{ROOM}")) == 2
    })
    .await;

    // Every node publishes a message every 3 ms, round robin, each from its own publisher
    // connection: each has a command in Redis's input buffer when it freezes.
    let sent: Arc<Mutex<BTreeMap<u64, Sent>>> = Arc::default();
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let handles: Vec<RoomHandle> = nodes.iter().map(|(_, h)| h.clone()).collect();
    let stream = tokio::spawn({
        let sent = sent.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(3));
            let mut receipts = Vec::new();
            for seq in 0u64.. {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => break,
                }
                let handle = &handles[(seq % 3) as usize];
                let before_ms = now_ms();
                sent.lock().unwrap_or_else(PoisonError::into_inner).insert(
                    seq,
                    Sent {
                        before_ms,
                        acked: None,
                    },
                );
                let Ok(receipt) = handle.broadcast(ROOM, json!({ "seq": seq })).queue().await
                else {
                    continue;
                };
                let sent = sent.clone();
                receipts.push(tokio::spawn(async move {
                    let ok = receipt.await.is_ok();
                    if let Some(s) = sent
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get_mut(&seq)
                    {
                        s.acked = Some(ok);
                    }
                }));
            }
            for r in receipts {
                let _ = r.await;
            }
        }
    });

    tokio::time::sleep(Duration::from_millis(500)).await; // ok: timed traffic before the freeze, not a wait
    redis.signal("STOP");
    wait_until("the watchful node notices the freeze", || async {
        !nodes[1].1.is_ready()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // ok: a timed freeze, not a wait
    redis.signal("CONT");
    wait_until("the watchful node is back", || async {
        nodes[1].1.is_ready() && redis.numsub(&format!("ws:room:{ROOM}")) == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await; // ok: timed traffic after the thaw, not a wait
    stop.send(true).expect("stream running");
    stream.await.expect("stream");
    nodes[0]
        .1
        .broadcast(ROOM, json!({ "end": true }))
        .await
        .expect("end marker");

    let steady = read_to_end(&mut steady).await;
    let watchful = read_to_end(&mut watchful).await;
    let sent = sent.lock().unwrap_or_else(PoisonError::into_inner).clone();

    // What must reach every socket, or be inside a window it was told: every acknowledged
    // broadcast, and every one that reached any socket (a timed-out broadcast may still be
    // delivered: Redis had the command).
    let must: BTreeSet<u64> = sent
        .iter()
        .filter(|(_, s)| s.acked == Some(true))
        .map(|(seq, _)| *seq)
        .chain(steady.seqs.iter().copied())
        .chain(watchful.seqs.iter().copied())
        .collect();
    // The scenario must produce the partial delivery it is about, or it proves nothing.
    let only_steady: Vec<u64> = steady.seqs.difference(&watchful.seqs).copied().collect();
    assert!(
        !only_steady.is_empty(),
        "no message reached the steady node's socket and not the watchful one's: the freeze \
         did not split the fleet"
    );
    eprintln!(
        "{} messages reached only the steady node's socket (stamped {:?} to {:?} ms); windows told: \
         steady {:?}, watchful {:?}",
        only_steady.len(),
        only_steady.first().map(|s| sent[s].before_ms),
        only_steady.last().map(|s| sent[s].before_ms),
        steady.windows,
        watchful.windows,
    );
    for (name, seen) in [("steady", &steady), ("watchful", &watchful)] {
        let uncovered: Vec<(u64, u64)> = must
            .iter()
            .filter(|seq| !seen.seqs.contains(seq))
            .map(|seq| (*seq, sent[seq].before_ms))
            // The envelope's stamp is at or after `before_ms`: a window that starts after
            // it might not cover the message.
            .filter(|(_, at)| {
                !seen
                    .windows
                    .iter()
                    .any(|(since, until)| since <= at && at <= until)
            })
            .collect();
        assert!(
            uncovered.is_empty(),
            "{name}: messages (seq, stamped at ms) missing and outside every window told \
             {:?}: {uncovered:?}",
            seen.windows
        );
    }
}
