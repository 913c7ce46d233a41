//! `storm` (opt-in: `--scenario storm`, with `--protocol`): a reconnect storm over the fanout
//! protocol. The target runs with `HISTORY=1000` (every room durable), so a client can resume.
//!
//! `--storm-clients N` clients (default 10,000; quick 1,000) in [`ROOMS`] rooms, spread
//! round-robin over 3 nodes, each joins its room and keeps the room's `epoch` and the last `seq`
//! it got (from `fanout.position`, then every `message`). A publisher on node 2 (never killed)
//! publishes [`ROOM_RATE`] messages per second into every room through `publish` commands
//! (without joining), from while the fleet connects until the end. Once every client joined,
//! and 2 s of publishing later, node 1 is killed with SIGKILL: its clients see the connection
//! end and reconnect at once to node 2 or 3 (alternating), re-joining with `since` = their last
//! position; a failed connect is retried every 100 ms. A client counts as resumed when its `fanout.resumed` says `recovered: true`.
//!
//! Reported: the time from the kill until the last client resumed (and the median), the
//! clients that resumed, those refused (`recovered: false`), and what was lost: every client
//! checks that its `seq`s follow each other without a gap (a repeat is counted apart), and
//! after publishing stopped, that it reached the last `seq` any client of its room saw; and
//! that last `seq` must be the number of messages published into the room (the rooms are new,
//! so their first message is `seq` 1), or the whole room fell short.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;

use crate::procs::{Cluster, ClusterConfig, Target};
use crate::report::{Better, fig};
use crate::scenarios::Outcome;
use crate::ws::{self, Proto, TextReader};
use crate::{Result, bail};

/// Rooms of the storm: 100 clients each at 10,000 clients.
pub(crate) const ROOMS: usize = 100;
/// Messages per second published into each room during the whole run.
const ROOM_RATE: u64 = 2;
/// Longest wait for every killed client to resume.
const RESUME_LIMIT: Duration = Duration::from_secs(60);

/// What one client saw.
#[derive(Debug, Default)]
struct Seen {
    room: usize,
    epoch: Option<String>,
    last: u64,
    gaps: u64,
    repeats: u64,
    /// Time from the kill until `fanout.resumed` with `recovered: true`.
    resumed_after: Option<Duration>,
    refused: bool,
    reconnects: u32,
    error: Option<String>,
}

/// Shared by every client: when the node died, and whether to stop.
#[derive(Debug)]
struct Shared {
    killed_at: std::sync::Mutex<Option<Instant>>,
    stop: AtomicBool,
    /// Clients that joined their room (got its `fanout.position`).
    ready: AtomicUsize,
    /// Clients that resumed (`recovered: true`).
    resumed: AtomicUsize,
    /// First connects in flight at once (a listen backlog holds 511 by default); the
    /// reconnects of the storm are not limited.
    connecting: tokio::sync::Semaphore,
}

/// Publishes one message into every room per tick over one protocol socket, reading the
/// replies in between.
#[derive(Debug)]
struct Publisher {
    reader: TextReader,
    id: u64,
    published: u64,
    errors: u64,
}

impl Publisher {
    /// Publishes until `done()` or `limit`; returns whether `done()` became true.
    async fn pump(&mut self, limit: Instant, done: impl Fn() -> bool) -> Result<bool> {
        let period = Duration::from_millis(1000 / ROOM_RATE);
        loop {
            if done() {
                return Ok(true);
            }
            if Instant::now() >= limit {
                return Ok(false);
            }
            let mut out = Vec::new();
            for r in 0..ROOMS {
                self.id += 1;
                let cmd = json!({ "id": self.id, "cmd": "publish", "room": format!("s{r}"),
                                  "data": { "n": self.id } });
                ws::text_frame(&mut out, cmd.to_string().as_bytes());
            }
            self.reader.stream().write_all(&out).await?;
            self.published += ROOMS as u64;
            let next = tokio::time::Instant::now() + period;
            // Reading is cancel safe: a read that did not complete consumed nothing.
            while let Ok(text) = tokio::time::timeout_at(next, self.reader.next_text()).await {
                if text?.windows(8).any(|w| w == br#""error":"#) {
                    self.errors += 1;
                }
                if done() {
                    return Ok(true);
                }
            }
        }
    }
}

fn frame(cmd: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ws::text_frame(&mut out, cmd.to_string().as_bytes());
    out
}

/// One client: connects to `first`, and after a lost connection to `next` (retrying), each
/// time joining `room` (with `since` once it has a position), until `stop`.
async fn client(
    i: usize,
    first: std::net::SocketAddr,
    next: std::net::SocketAddr,
    room: usize,
    shared: Arc<Shared>,
) -> Seen {
    let mut seen = Seen {
        room,
        ..Seen::default()
    };
    let mut addr = first;
    let mut permit = shared.connecting.acquire().await.ok();
    while !shared.stop.load(Relaxed) {
        let path = format!("/fanout?user=storm-{i}");
        let conn =
            match ws::connect_path(addr, &path, Proto::Fanout { acked: true }, None, 8192).await {
                Ok(c) => c,
                Err(e) => {
                    if seen.epoch.is_none() {
                        seen.error = Some(e.to_string());
                        return seen;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await; // ok: a reconnect's backoff
                    continue;
                }
            };
        let mut join = json!({ "id": 1, "cmd": "join", "room": format!("s{room}") });
        if let Some(epoch) = &seen.epoch {
            join["since"] = json!({ "epoch": epoch, "seq": seen.last });
        }
        let mut reader = TextReader::new(conn);
        if reader.stream().write_all(&frame(&join)).await.is_err() {
            continue;
        }
        loop {
            let text = tokio::select! {
                t = reader.next_text() => t,
                () = wait_stop(&shared) => return seen,
            };
            let Ok(text) = text else { break };
            let Ok(v) = serde_json::from_slice::<Value>(text) else {
                continue;
            };
            match v["type"].as_str() {
                Some("message") => {
                    let seq = v["seq"].as_u64().unwrap_or(0);
                    if seq <= seen.last {
                        seen.repeats += 1;
                    } else {
                        seen.gaps += seq - seen.last - 1;
                        seen.last = seq;
                    }
                }
                Some("fanout.position") => {
                    seen.epoch = v["epoch"].as_str().map(str::to_string);
                    seen.last = v["seq"].as_u64().unwrap_or(0);
                    if permit.take().is_some() {
                        shared.ready.fetch_add(1, Relaxed);
                    }
                }
                Some("fanout.resumed") => {
                    if v["recovered"] == json!(true) {
                        let killed = shared.killed_at.lock().ok().and_then(|k| *k);
                        seen.resumed_after = killed.map(|k| k.elapsed());
                        shared.resumed.fetch_add(1, Relaxed);
                    } else {
                        seen.refused = true;
                        shared.resumed.fetch_add(1, Relaxed);
                        seen.epoch = v["epoch"].as_str().map(str::to_string);
                        seen.last = v["seq"].as_u64().unwrap_or(0);
                    }
                }
                Some("reply") if v.get("error").is_some() => {
                    seen.error = Some(format!("join refused: {v}"));
                    return seen;
                }
                _ => {}
            }
        }
        // The connection ended: the node died (or closed it). Resume on another node.
        seen.reconnects += 1;
        addr = next;
    }
    seen
}

async fn wait_stop(shared: &Shared) {
    while !shared.stop.load(Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await; // ok: polls the stop flag
    }
}

pub(crate) async fn run(
    target: &Target,
    cc: &ClusterConfig,
    clients: usize,
    tag: &str,
) -> Result<Outcome> {
    if target.proto != (Proto::Fanout { acked: true }) {
        println!("{tag} skipped: the reconnect storm speaks the fanout protocol (--protocol)");
        return Ok((
            Vec::new(),
            json!({ "skipped": "not a fanout protocol target" }),
        ));
    }
    let mut target = target.clone();
    target.env.push(("HISTORY".to_string(), "1000".to_string()));
    let mut cluster = Cluster::start(&target, cc).await?;
    let addrs = cluster.addrs.clone();
    if addrs.len() < 3 {
        bail!("storm needs 3 nodes");
    }
    let shared = Arc::new(Shared {
        killed_at: std::sync::Mutex::new(None),
        stop: AtomicBool::new(false),
        ready: AtomicUsize::new(0),
        resumed: AtomicUsize::new(0),
        connecting: tokio::sync::Semaphore::new(128),
    });
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for i in 0..clients {
        let home = i % 3;
        // Node 1's clients resume on nodes 2 and 3, alternately.
        let next = if home == 0 { 1 + (i / 3) % 2 } else { home };
        let (first, next, room) = (addrs[home], addrs[next], i % ROOMS);
        tasks.push(tokio::spawn(client(
            i,
            first,
            next,
            room,
            Arc::clone(&shared),
        )));
    }
    // The publisher: node 2, publish commands only (no join).
    let conn = ws::connect_path(
        addrs[1],
        "/fanout?user=storm-pub",
        Proto::Fanout { acked: true },
        None,
        1 << 16,
    )
    .await?;
    let mut publisher = Publisher {
        reader: TextReader::new(conn),
        id: 0,
        published: 0,
        errors: 0,
    };
    let connected = publisher
        .pump(Instant::now() + RESUME_LIMIT, || {
            shared.ready.load(Relaxed) >= clients
        })
        .await?;
    if !connected {
        bail!(
            "only {} of {clients} clients joined within {} s",
            shared.ready.load(Relaxed),
            RESUME_LIMIT.as_secs()
        );
    }
    println!(
        "{tag} {clients} clients joined in {:.1} s; publishing {ROOM_RATE} msg/s per room",
        t0.elapsed().as_secs_f64()
    );
    publisher
        .pump(Instant::now() + Duration::from_secs(2), || false)
        .await?;
    *shared.killed_at.lock().map_err(|_| "poisoned lock")? = Some(Instant::now());
    cluster.kill_node(0)?;
    let on_killed = clients.div_ceil(3);
    println!("{tag} node 1 killed (SIGKILL) with {on_killed} clients");
    publisher
        .pump(Instant::now() + RESUME_LIMIT, || {
            shared.resumed.load(Relaxed) >= on_killed
        })
        .await?;
    // A little more traffic after the storm, so that the resumed sockets get live messages.
    publisher
        .pump(Instant::now() + Duration::from_secs(1), || false)
        .await?;
    let (published, pub_errors) = (publisher.published, publisher.errors);
    // Let the last deliveries arrive, then stop the clients.
    tokio::time::sleep(Duration::from_secs(2)).await; // deadline: deliveries in flight
    shared.stop.store(true, Relaxed);
    let mut seen = Vec::with_capacity(clients);
    for t in tasks {
        seen.push(t.await.unwrap_or_default());
    }
    drop(cluster);
    let mut top = vec![0u64; ROOMS];
    for s in &seen {
        top[s.room] = top[s.room].max(s.last);
    }
    let killed_clients: Vec<&Seen> = seen.iter().filter(|s| s.reconnects > 0).collect();
    let mut resume_ms: Vec<f64> = killed_clients
        .iter()
        .filter_map(|s| s.resumed_after.map(|d| d.as_secs_f64() * 1e3))
        .collect();
    resume_ms.sort_by(f64::total_cmp);
    let resumed = resume_ms.len();
    let refused = seen.iter().filter(|s| s.refused).count();
    let errors = seen.iter().filter(|s| s.error.is_some()).count();
    let gaps: u64 = seen.iter().map(|s| s.gaps).sum();
    let repeats: u64 = seen.iter().map(|s| s.repeats).sum();
    let behind: u64 = seen.iter().map(|s| top[s.room] - s.last).sum();
    // Every publish was accepted (or `pub_errors` says otherwise): each room's top is its count.
    let per_room = published / ROOMS as u64;
    let rooms_short: u64 = top.iter().map(|&t| per_room.saturating_sub(t)).sum();
    let max_ms = resume_ms.last().copied().unwrap_or(f64::NAN);
    let median_ms = resume_ms.get(resumed / 2).copied().unwrap_or(f64::NAN);
    println!(
        "{tag} {} of {} killed clients resumed (recovered: true): median {median_ms:.0} ms, \
         all within {max_ms:.0} ms; refused {refused}, errors {errors}; lost: gaps {gaps}, \
         behind the room's last seq {behind}, rooms short of their {per_room} messages \
         {rooms_short}; repeats {repeats}; published {published} \
         ({pub_errors} refused)",
        resumed,
        killed_clients.len()
    );
    if let Some(e) = seen.iter().find_map(|s| s.error.as_ref()) {
        println!("{tag} first client error: {e}");
    }
    Ok((
        vec![
            fig(
                "resume_all_ms",
                "kill -> last client resumed (ms)",
                Better::Lower,
                max_ms,
            ),
            fig(
                "resume_median_ms",
                "kill -> median resume (ms)",
                Better::Lower,
                median_ms,
            ),
            fig(
                "resumed",
                "killed clients resumed",
                Better::Neither,
                resumed as f64,
            ),
            fig(
                "killed_clients",
                "clients on the killed node",
                Better::Neither,
                killed_clients.len() as f64,
            ),
            fig(
                "lost",
                "messages lost (gaps + behind + short)",
                Better::Lower,
                (gaps + behind + rooms_short) as f64,
            ),
            fig(
                "repeats",
                "repeated messages",
                Better::Lower,
                repeats as f64,
            ),
        ],
        json!({ "clients": clients, "rooms": ROOMS, "room_rate": ROOM_RATE,
                "killed_clients": killed_clients.len(), "resumed": resumed,
                "refused": refused, "errors": errors, "gaps": gaps, "behind": behind,
                "rooms_short": rooms_short,
                "repeats": repeats, "published": published, "publish_errors": pub_errors,
                "resume_median_ms": median_ms, "resume_max_ms": max_ms }),
    ))
}
