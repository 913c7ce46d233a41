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
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use support::*;
use tokio_tungstenite::tungstenite::Message;

type WsSink = SplitSink<Ws, Message>;

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

/// A client of the chat example: what it read until `{"end":true}`, as payload `seq`s (in a
/// durable room, with `positions=1`, each frame's own `seq` too) and loss windows.
async fn read_chat_to_end(ws: &mut Ws) -> (Vec<u64>, Vec<(u64, u64)>) {
    let (mut seqs, mut windows) = (Vec::new(), Vec::new());
    loop {
        let text = recv_text(ws, "the end marker").await;
        let v: serde_json::Value = serde_json::from_str(&text).expect("JSON frames");
        if v["type"] == "fanout.missed" {
            windows.push((
                v["since"].as_u64().expect("since"),
                v["until"].as_u64().expect("until"),
            ));
            continue;
        }
        if v["type"].as_str().is_some_and(|t| t.starts_with("fanout.")) {
            continue;
        }
        // `{"seq":S,"payload":V}` with positions, V without.
        let payload = if v.get("payload").is_some() {
            &v["payload"]
        } else {
            &v
        };
        if payload["end"] == true {
            return (seqs, windows);
        }
        seqs.push(payload["n"].as_u64().expect("n"));
    }
}

/// A chat node stopped with SIGSTOP for a few seconds while its room keeps publishing, on a
/// Redis whose pub/sub output buffer limit is low: Redis drops the node's subscriber. When it
/// wakes, the node reads what its socket buffered, finds the link closed, reconnects and tells
/// its socket a window that covers every message it lacks (in a durable room: it loses none).
async fn pause_a_node_under_traffic(durable: bool) {
    let redis = RedisServer::start_with(&["--client-output-buffer-limit", "pubsub 64kb 32kb 1"]);
    let bin = chat_binary();
    // Queues big enough for the backlog the node delivers when it wakes: this test is about
    // what Redis dropped, not about the socket's own bound.
    let mut env = vec![("QUEUE_FRAMES", "1000000"), ("QUEUE_BYTES", "1000000000")];
    if durable {
        env.push(("HISTORY", "100000"));
    }
    let env = env.as_slice();
    let sender = ChatProcess::start(&bin, &redis, "sender", env).await;
    let sleeper = ChatProcess::start(&bin, &redis, "sleeper", env).await;
    let query = if durable { "&positions=1" } else { "" };
    let publisher = connect(&format!("{}{query}", sender.ws_url("busy"))).await;
    let mut reader = connect(&format!("{}{query}", sleeper.ws_url("busy"))).await;
    wait_until("both nodes subscribed", || async {
        redis.numsub("ws:room:busy") == 2
    })
    .await;
    // Both clients read all along (the publisher gets its own messages back): only the
    // paused node falls behind.
    let (mut publisher, mut echoes) = publisher.split();
    tokio::spawn(async move { while let Some(Ok(_)) = echoes.next().await {} });
    let reader = tokio::spawn(async move { read_chat_to_end(&mut reader).await });

    // ~6 MB/s of 16 kB messages (40 kB in a durable room, so that what the pause loses stays
    // within the replay limit of 1,000 messages the node reads back), stamped (`before_ms`) as
    // they are sent: well over what the sockets' buffers and the 64 kB limit hold while the
    // node sleeps.
    let pad = "x".repeat(if durable { 40 * 1024 } else { 16 * 1024 });
    let pause = if durable {
        Duration::from_millis(2500)
    } else {
        Duration::from_secs(4)
    };
    let mut sent_at = Vec::new();
    let mut n = 0u64;
    let mut send_for = async |ws: &mut WsSink, how_long: Duration, sent_at: &mut Vec<u64>| {
        let until = tokio::time::Instant::now() + how_long;
        while tokio::time::Instant::now() < until {
            sent_at.push(now_ms());
            let text = json!({ "n": n, "pad": pad }).to_string();
            ws.send(Message::text(text)).await.expect("send");
            n += 1;
            tokio::time::sleep(Duration::from_millis(2)).await; // ok: a paced publisher, not a wait
        }
    };
    send_for(&mut publisher, Duration::from_millis(300), &mut sent_at).await;
    sleeper.signal("STOP");
    send_for(&mut publisher, pause, &mut sent_at).await;
    sleeper.signal("CONT");
    // The node recovers by itself: Redis dropped it, it reconnects and resubscribes.
    wait_until("the sleeper resubscribed", || async {
        redis.numsub("ws:room:busy") == 2
            && http(sleeper.addr, "GET", "/healthz", "").await.0 == 200
    })
    .await;
    send_for(&mut publisher, Duration::from_millis(200), &mut sent_at).await;
    publisher
        .send(Message::text(r#"{"end":true}"#))
        .await
        .expect("send");

    let (seqs, windows) = reader.await.expect("reader");
    let (_, stats) = http(sleeper.addr, "GET", "/stats", "").await;
    let stats: serde_json::Value = serde_json::from_str(&stats).expect("stats JSON");
    assert!(
        stats["reconnects"].as_u64() >= Some(1),
        "Redis never dropped the paused node's subscriber: the pause proved nothing ({stats})"
    );
    let got: BTreeSet<u64> = seqs.iter().copied().collect();
    eprintln!(
        "paused node: {} of {} messages reached its socket; windows {windows:?}",
        got.len(),
        sent_at.len()
    );
    if durable {
        let want: Vec<u64> = (0..sent_at.len() as u64).collect();
        assert_eq!(
            seqs, want,
            "a durable room loses nothing and repeats nothing"
        );
        return;
    }
    assert_eq!(got.len(), seqs.len(), "no message twice");
    let uncovered: Vec<(u64, u64)> = (0..sent_at.len() as u64)
        .filter(|n| !got.contains(n))
        .map(|n| (n, sent_at[n as usize]))
        .filter(|(_, at)| !windows.iter().any(|(s, u)| s <= at && at <= u))
        .collect();
    assert!(
        uncovered.is_empty(),
        "messages (n, sent at ms) missing and outside every window told {windows:?}: \
         {uncovered:?}"
    );
}

#[tokio::test]
async fn a_paused_node_tells_every_loss_and_recovers_by_itself() {
    pause_a_node_under_traffic(false).await;
}

#[tokio::test]
async fn a_paused_node_loses_nothing_of_a_durable_room() {
    pause_a_node_under_traffic(true).await;
}

/// A TCP proxy in front of Redis whose established connections can be stalled: bytes stop
/// flowing both ways and nothing is closed, as with a dead NAT entry or a black-holed route.
/// Connections made after the stall flow normally.
struct StallingProxy {
    addr: std::net::SocketAddr,
    /// Connections born before this generation are stalled.
    stall_before: Arc<std::sync::atomic::AtomicU64>,
    born: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl StallingProxy {
    async fn start(redis_port: u16) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stall_before = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let born = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let task = tokio::spawn({
            let (stall_before, born) = (stall_before.clone(), born.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let generation = born.fetch_add(1, Ordering::SeqCst);
                    let Ok(server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await
                    else {
                        continue;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    for (mut from, mut to) in [(cr, sw), (sr, cw)] {
                        let stall_before = stall_before.clone();
                        tokio::spawn(async move {
                            use tokio::io::{AsyncReadExt, AsyncWriteExt};
                            let mut buf = vec![0u8; 64 * 1024];
                            loop {
                                let n = match from.read(&mut buf).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => n,
                                };
                                if generation < stall_before.load(Ordering::SeqCst) {
                                    // Black hole: hold the connection open, forward nothing.
                                    std::future::pending::<()>().await;
                                }
                                if to.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        });
                    }
                }
            }
        });
        Self {
            addr,
            stall_before,
            born,
            task,
        }
    }

    fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Stalls every connection made so far.
    fn stall(&self) {
        use std::sync::atomic::Ordering;
        self.stall_before
            .store(self.born.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The link to Redis stalls without a reset under traffic: the probe declares it dead within
/// its timeout, the node comes back through a fresh connection, and the window it tells covers
/// every message its socket lacks.
#[tokio::test]
async fn a_stalled_link_is_declared_dead_by_the_probe_and_the_window_covers_the_stall() {
    let redis = RedisServer::start();
    let proxy = StallingProxy::start(redis.port()).await;
    let through_proxy = FanoutLayer::builder(proxy.url())
        .node_id("behind-proxy")
        .probe_interval(Duration::from_millis(200))
        .probe_timeout(Duration::from_millis(500))
        .publish_timeout(Duration::from_millis(500))
        .subscribe_timeout(Duration::from_secs(2))
        .build()
        .expect("layer");
    let nodes = start_nodes(
        [
            through_proxy,
            layer(&redis, "direct", Duration::from_millis(200)),
        ],
        window_app,
    )
    .await;
    let mut ws = connect(&nodes[0].0.ws_url("/ws")).await;
    assert_eq!(recv_text(&mut ws, "join ack").await, "joined");
    let reader = tokio::spawn(async move { read_to_end(&mut ws).await });
    wait_until("subscribed", || async {
        redis.numsub(&format!("ws:room:{ROOM}")) == 1
    })
    .await;

    let publisher = nodes[1].1.clone();
    let mut sent_at = Vec::new();
    let publish_for = async |how_long: Duration, sent_at: &mut Vec<u64>| {
        let until = tokio::time::Instant::now() + how_long;
        while tokio::time::Instant::now() < until {
            let seq = sent_at.len() as u64;
            sent_at.push(now_ms());
            publisher
                .broadcast(ROOM, json!({ "seq": seq }))
                .await
                .expect("the publisher's own link is healthy");
            tokio::time::sleep(Duration::from_millis(3)).await; // ok: a paced publisher, not a wait
        }
    };
    publish_for(Duration::from_millis(300), &mut sent_at).await;
    proxy.stall();
    let stalled = std::time::Instant::now();
    let behind = nodes[0].1.clone();
    let detected = tokio::spawn(async move {
        // The link is replaced: counted when it is declared dead (the not-ready spell that
        // follows can be shorter than a poll).
        wait_until("the stall is detected", || async {
            behind.stats().reconnects >= 1
        })
        .await;
        stalled.elapsed()
    });
    // Traffic all through: the node detects the stall and comes back on a fresh connection
    // while messages keep coming.
    publish_for(Duration::from_secs(2), &mut sent_at).await;
    let detected = detected.await.expect("detection");
    wait_until("the node is back", || async { nodes[0].1.is_ready() }).await;
    publish_for(Duration::from_millis(300), &mut sent_at).await;
    publisher
        .broadcast(ROOM, json!({ "end": true }))
        .await
        .expect("end marker");
    let seen = reader.await.expect("reader");

    eprintln!(
        "stall detected after {detected:?} (probe every 200 ms, timeout 500 ms); {} of {} \
         messages reached the socket; windows {:?}",
        seen.seqs.len(),
        sent_at.len(),
        seen.windows
    );
    assert!(
        detected < Duration::from_secs(3),
        "the probe declares a stalled link dead within its interval and timeout (plus slack)"
    );
    assert!(
        seen.seqs.len() < sent_at.len(),
        "the stall lost nothing: it proved nothing"
    );
    let uncovered: Vec<(u64, u64)> = (0..sent_at.len() as u64)
        .filter(|seq| !seen.seqs.contains(seq))
        .map(|seq| (seq, sent_at[seq as usize]))
        .filter(|(_, at)| !seen.windows.iter().any(|(s, u)| s <= at && at <= u))
        .collect();
    assert!(
        uncovered.is_empty(),
        "messages (seq, sent at ms) missing and outside every window told: {uncovered:?}"
    );
}

/// A client of a durable room that follows a fleet through restarts: it reads positioned
/// frames, and when its node closes it, reconnects to another live one with the position it
/// holds. Returns the payloads' `n` in the order received, and each close it was sent.
async fn follow(
    nodes: Arc<Mutex<Vec<std::net::SocketAddr>>>,
    first: usize,
    last_n: u64,
    joined: Arc<std::sync::atomic::AtomicUsize>,
) -> (Vec<u64>, Vec<(u16, String)>) {
    let (mut got, mut closes) = (Vec::new(), Vec::new());
    let mut at: Option<String> = None;
    let mut pick = first;
    loop {
        let addr = {
            let live = nodes.lock().unwrap_or_else(PoisonError::into_inner);
            live[pick % live.len()]
        };
        pick += 1;
        let since = at
            .as_ref()
            .map(|p| format!("&since={p}"))
            .unwrap_or_default();
        let url = format!("ws://{addr}/ws?room=stream&positions=1{since}");
        let Ok(Ok((mut ws, _))) =
            tokio::time::timeout(SOON, tokio_tungstenite::connect_async(&url)).await
        else {
            continue; // that node is going away: the next one
        };
        let mut epoch = String::new();
        loop {
            match tokio::time::timeout(SOON, ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: serde_json::Value = serde_json::from_str(&t).expect("JSON");
                    match v["type"].as_str() {
                        Some("fanout.position") | Some("fanout.resumed") => {
                            assert_ne!(v["recovered"], false, "a resume was refused: {v}");
                            epoch = v["epoch"].as_str().expect("epoch").to_owned();
                            if at.is_none() {
                                at = Some(format!("{epoch}:{}", v["seq"]));
                                joined.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                        }
                        Some(other) => panic!("unexpected notice {other}: {v}"),
                        None => {
                            let seq = v["seq"].as_u64().expect("seq");
                            at = Some(format!("{epoch}:{seq}"));
                            let n = v["payload"]["n"].as_u64().expect("n");
                            got.push(n);
                            if n == last_n {
                                return (got, closes);
                            }
                        }
                    }
                }
                Ok(Some(Ok(Message::Close(frame)))) => {
                    if let Some(f) = frame {
                        closes.push((u16::from(f.code), f.reason.to_string()));
                    }
                    break;
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_)) | None) => break,
                Err(_) => panic!("no frame in {SOON:?}"),
            }
        }
    }
}

/// A rolling restart of three chat nodes under a durable stream: each node in turn is shut
/// down gracefully (its closes spread over `DRAIN_S`) and started again; every client,
/// reconnecting elsewhere with its position, ends with every message exactly once, in order.
#[tokio::test]
async fn a_rolling_restart_under_a_durable_stream_loses_and_repeats_nothing() {
    let redis = RedisServer::start();
    let bin = chat_binary();
    let env: &[(&str, &str)] = &[("HISTORY", "10000"), ("DRAIN_S", "1")];
    let mut chats = Vec::new();
    for i in 0..3 {
        chats.push(ChatProcess::start(&bin, &redis, &format!("roll{i}"), env).await);
    }
    let live: Arc<Mutex<Vec<std::net::SocketAddr>>> =
        Arc::new(Mutex::new(chats.iter().map(|c| c.addr).collect()));
    // The publisher: an in-process node with the same durability, outside the restarts.
    let publisher = FanoutLayer::builder(redis.url())
        .node_id("roll-publisher")
        .durable(
            axum_fanout::durable::Durability::default()
                .history(std::num::NonZeroUsize::new(10000).expect("non-zero")),
        )
        .build()
        .expect("layer");
    let handle = publisher.handle();
    wait_until("publisher ready", || async { handle.is_ready() }).await;
    const TOTAL: u64 = 300;
    let joined = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let clients: Vec<_> = (0..6)
        .map(|i| tokio::spawn(follow(live.clone(), i, TOTAL - 1, joined.clone())))
        .collect();
    wait_until("every client joined", || async {
        joined.load(std::sync::atomic::Ordering::SeqCst) == 6
    })
    .await;
    let stream = tokio::spawn({
        let handle = handle.clone();
        async move {
            for n in 0..TOTAL {
                handle
                    .broadcast("stream", json!({ "n": n }))
                    .await
                    .expect("durable broadcast");
                tokio::time::sleep(Duration::from_millis(20)).await; // ok: a paced publisher, not a wait
            }
        }
    });
    for (i, chat) in chats.iter_mut().enumerate() {
        let old = chat.addr;
        chat.terminate(Duration::from_secs(1)).await;
        let fresh = ChatProcess::start(&bin, &redis, &format!("roll{i}b"), env).await;
        {
            let mut nodes = live.lock().unwrap_or_else(PoisonError::into_inner);
            nodes.retain(|a| *a != old);
            nodes.push(fresh.addr);
        }
        *chat = fresh;
    }
    stream.await.expect("stream");
    let want: Vec<u64> = (0..TOTAL).collect();
    let mut closes = 0;
    for client in clients {
        let (got, told) = client.await.expect("client");
        assert_eq!(
            got, want,
            "every message once, in order, across the restarts"
        );
        for (code, reason) in &told {
            assert_eq!(*code, 1001);
            assert_eq!(reason, axum_fanout::close::SHUTTING_DOWN_REASON);
        }
        closes += told.len();
    }
    assert!(
        closes >= 6,
        "each client was closed by at least one restart: {closes}"
    );
}
