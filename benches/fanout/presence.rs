//! `presence` (opt-in: `--scenario presence`): what presence costs and how fast it reacts, on
//! chat nodes run with `PRESENCE=1` (PROTOCOL.md part 2, "Presence"). Four phases, each on a fresh
//! cluster (one private redis-server, three nodes):
//!
//! * **churn**: every room has a watcher socket on every node; `churn_workers` loops each
//!   open a socket `/ws?room=R&user=U` (a new user every time, rooms and nodes in turn), wait
//!   for its `fanout.member` frame (the node sends it once Redis counted the user: the join is
//!   done) and close it (the leave), for `churn_duration`. Reported: joins + leaves per second
//!   held, errors (a socket that failed or was not counted within 15 s), join/leave notices
//!   the watchers did not get once the fleet settled, and the CPU per join (with its leave) of
//!   Redis (`INFO cpu`: `used_cpu_sys + used_cpu_user` before and after), of the nodes and of
//!   the load generator. The loops are closed (each waits for its join), so the rate is what
//!   the fleet sustains at that concurrency without an error.
//! * **list**: a room holding `list_sizes` members (1,000 then 10,000 by default), then
//!   `list_samples` sequential `GET /rooms/NAME/presence` spread over the nodes, each timed
//!   from connect until the whole body arrived: median and p99, and Redis CPU per list. The
//!   members are written into Redis as a live node's share (a node with a lease far in the
//!   future, the key layout of `src/bus/presence`), not joined through sockets: filling a room
//!   of 10,000 through sockets would send each member the join of every later one (50
//!   million notices), which measures the fan-out, not the list.
//! * **lease**: Redis CPU and the nodes' CPU per lease refresh period (`PRESENCE_TTL_S / 3`)
//!   over `lease_periods` periods, first with no member, then with one socket in each of
//!   `lease_rooms` rooms (10,000 by default), all on node 1. Keeping presence alive should
//!   cost O(1) per node, whatever its rooms: the two windows should cost about the same. The
//!   second window starts after the nodes' first heartbeat round (25 s after their start),
//!   so that 10,000 pings and pongs do not count as lease upkeep.
//! * **kill**: `kill_members` users (10,000) on node 3 spread over `kill_rooms` rooms, a
//!   watcher per room on nodes 1 and 2; node 3 is killed with SIGKILL, and the time until the
//!   watchers saw the last of the leave notices is reported (and the first), as is how far
//!   past `PRESENCE_TTL_S` it came. A node renews its lease every third of the TTL, so the
//!   leaves are due between 2/3 and 1 TTL after the kill, plus the survivors' reaping period
//!   (1 s) and the reaping itself.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::procs::{self, Cluster, ClusterConfig, Target};
use crate::report::{Better, Figure, fig};
use crate::ws::{self, Proto};
use crate::{Context, Result, bail};

/// Knobs of the scenario (`--quick` shrinks every one; see `new`).
#[derive(Debug, Clone)]
pub(crate) struct PresenceParams {
    /// `PRESENCE_TTL_S` of the nodes.
    pub(crate) ttl_s: u64,
    pub(crate) churn_workers: usize,
    pub(crate) churn_rooms: usize,
    pub(crate) churn_duration: Duration,
    /// Members of the listed room, in increasing order.
    pub(crate) list_sizes: Vec<usize>,
    pub(crate) list_samples: usize,
    pub(crate) lease_rooms: usize,
    pub(crate) lease_periods: u32,
    pub(crate) kill_members: usize,
    pub(crate) kill_rooms: usize,
}

impl PresenceParams {
    pub(crate) fn new(quick: bool, scale: f64) -> Self {
        let q = |full: usize, quick_value: usize| if quick { quick_value } else { full };
        Self {
            ttl_s: if quick { 3 } else { 10 },
            churn_workers: q(32, 8),
            churn_rooms: q(10, 4),
            churn_duration: Duration::from_secs_f64(if quick { 3.0 } else { 10.0 } * scale),
            list_sizes: vec![q(1_000, 100), q(10_000, 1_000)],
            list_samples: q(200, 40),
            lease_rooms: q(10_000, 500),
            lease_periods: 3,
            kill_members: q(10_000, 500),
            kill_rooms: q(100, 5),
        }
    }

    pub(crate) fn describe(&self) -> Value {
        json!({
            "ttl_s": self.ttl_s, "churn_workers": self.churn_workers,
            "churn_rooms": self.churn_rooms, "churn_s": self.churn_duration.as_secs_f64(),
            "list_sizes": self.list_sizes, "list_samples": self.list_samples,
            "lease_rooms": self.lease_rooms, "lease_periods": self.lease_periods,
            "kill_members": self.kill_members, "kill_rooms": self.kill_rooms,
        })
    }
}

/// Runs the four phases against a plain WebSocket target (presence is this crate's contract;
/// other targets get no figures and a note).
pub(crate) async fn run(
    target: &Target,
    cc: &ClusterConfig,
    p: &PresenceParams,
    tag: &str,
) -> Result<(Vec<Figure>, Value)> {
    if target.proto != Proto::Ws {
        println!("{tag} skipped: presence is part of the plain WebSocket contract only");
        return Ok((Vec::new(), json!({ "skipped": "not a ws target" })));
    }
    if cc.redis_cluster.is_some() {
        bail!("presence needs a single redis server (drop --redis-cluster)");
    }
    let mut target = target.clone();
    target
        .env
        .retain(|(k, _)| k != "PRESENCE" && k != "PRESENCE_TTL_S");
    target.env.push(("PRESENCE".into(), "1".into()));
    target
        .env
        .push(("PRESENCE_TTL_S".into(), p.ttl_s.to_string()));
    let mut figures = Vec::new();
    let mut details = serde_json::Map::new();
    let phases: [(&str, Duration); 4] = [
        ("churn", p.churn_duration + Duration::from_secs(60)),
        ("list", Duration::from_secs(120)),
        ("lease", Duration::from_secs(120 + 2 * p.ttl_s)),
        ("kill", Duration::from_secs(120 + 2 * p.ttl_s)),
    ];
    for (phase, limit) in phases {
        let cluster = Cluster::start(&target, cc).await?;
        let work = async {
            match phase {
                "churn" => churn(cluster, p, tag).await,
                "list" => list(cluster, p, tag).await,
                "lease" => lease(cluster, p, tag).await,
                _ => kill(cluster, p, tag).await,
            }
        };
        let (f, d) = tokio::time::timeout(limit, work)
            .await
            .ctx(|| format!("presence {phase} did not finish within {limit:?}"))??;
        figures.extend(f);
        details.insert(phase.to_string(), d);
    }
    Ok((figures, Value::Object(details)))
}

/// Join and leave notices one socket received, and when the last leave came.
#[derive(Debug, Default)]
struct Notices {
    joins: AtomicU64,
    leaves: AtomicU64,
    first_leave: Mutex<Option<Instant>>,
    last_leave: Mutex<Option<Instant>>,
}

/// A member socket kept open by a task that reads it (answering pings, counting notices).
/// Dropping it closes the socket: the user's leave.
#[derive(Debug)]
struct Held {
    task: JoinHandle<()>,
    notices: Arc<Notices>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Opens `/ws?room=ROOM&user=USER` on `addr` and returns once the node said the user is
/// counted (`fanout.member`).
async fn join(addr: SocketAddr, room: &str, user: &str) -> Result<Held> {
    let path = format!("/ws?room={room}&user={user}");
    let conn = ws::connect_path(addr, &path, Proto::Ws, None, 4096).await?;
    let mut reader = ws::TextReader::new(conn);
    let notices = Arc::new(Notices::default());
    let counted = async {
        loop {
            let text = reader.next_text().await?;
            count(&notices, text);
            if contains(text, b"\"type\":\"fanout.member\"") {
                return Ok::<_, crate::Error>(());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(15), counted)
        .await
        .ctx(|| format!("{user} in {room}: not counted within 15 s"))??;
    let n = notices.clone();
    let task = tokio::spawn(async move {
        while let Ok(text) = reader.next_text().await {
            count(&n, text);
        }
    });
    Ok(Held { task, notices })
}

fn count(n: &Notices, text: &[u8]) {
    if contains(text, b"\"type\":\"fanout.join\"") {
        n.joins.fetch_add(1, Relaxed);
    } else if contains(text, b"\"type\":\"fanout.leave\"") {
        n.leaves.fetch_add(1, Relaxed);
        let now = Instant::now();
        // A poisoned lock still holds a valid instant.
        n.first_leave
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(now);
        *n.last_leave.lock().unwrap_or_else(PoisonError::into_inner) = Some(now);
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Opens many member sockets, at most `concurrency` handshakes at a time; returns them in the
/// order of `specs`.
async fn join_all(
    specs: Vec<(SocketAddr, String, String)>,
    concurrency: usize,
) -> Result<Vec<Held>> {
    use futures_util::stream::{self, StreamExt as _, TryStreamExt as _};
    stream::iter(specs)
        .map(|(addr, room, user)| async move { join(addr, &room, &user).await })
        .buffered(concurrency)
        .try_collect()
        .await
}

/// `GET /rooms/ROOM/presence`: the time until the whole body arrived, and the body.
async fn get_presence(addr: SocketAddr, room: &str) -> Result<(Duration, Vec<u8>)> {
    let t0 = Instant::now();
    let fetch = async {
        let mut s = TcpStream::connect(addr).await?;
        let req = format!(
            "GET /rooms/{room}/presence HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await?;
        let mut out = Vec::with_capacity(64 * 1024);
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .ctx(|| format!("GET presence of {room} from {addr} timed out"))?
        .ctx(|| format!("GET presence of {room} from {addr}"))?;
    let took = t0.elapsed();
    if !raw.starts_with(b"HTTP/1.1 200") {
        bail!(
            "GET presence of {room} from {addr}: {}",
            String::from_utf8_lossy(&raw[..raw.len().min(80)])
        );
    }
    Ok((took, raw))
}

/// The number of members in a presence body (its `"user":` fields).
fn member_count(body: &[u8]) -> usize {
    body.windows(7).filter(|w| w == b"\"user\":").count()
}

/// Waits until `room` lists `want` members, as node `addr` sees it.
async fn wait_members(addr: SocketAddr, room: &str, want: usize, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let (_, body) = get_presence(addr, room).await?;
        let have = member_count(&body);
        if have == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{room} lists {have} members, not {want}, after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn percentile(sorted_ms: &[f64], p: f64) -> f64 {
    if sorted_ms.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted_ms.len() as f64 * p).ceil() as usize).clamp(1, sorted_ms.len()) - 1;
    sorted_ms[i]
}

/// A label or key made at run time (figures name their list sizes); a bench leaks a few.
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn redis_port(c: &Cluster) -> Result<u16> {
    c.redis_ports
        .first()
        .copied()
        .ctx(|| "no redis-server port".to_string())
}

async fn churn(cluster: Cluster, p: &PresenceParams, tag: &str) -> Result<(Vec<Figure>, Value)> {
    let addrs = cluster.addrs.clone();
    let port = redis_port(&cluster)?;
    let rooms: Vec<String> = (0..p.churn_rooms).map(|r| format!("churn{r}")).collect();
    let mut specs = Vec::new();
    for room in &rooms {
        for (n, addr) in addrs.iter().enumerate() {
            specs.push((*addr, room.clone(), format!("watch-n{}", n + 1)));
        }
    }
    let watchers = join_all(specs, 16).await?;
    // The watchers' own joins are done; count only the churn from here.
    let base: Vec<(u64, u64)> = watchers
        .iter()
        .map(|w| {
            (
                w.notices.joins.load(Relaxed),
                w.notices.leaves.load(Relaxed),
            )
        })
        .collect();
    let cycles = Arc::new(AtomicU64::new(0));
    let per_room: Arc<Vec<AtomicU64>> = Arc::new(rooms.iter().map(|_| AtomicU64::new(0)).collect());
    let errors = Arc::new(AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let redis_before = procs::redis_cpu_secs(port).await?;
    let cpu0 = cluster.cpu_sample();
    let t0 = Instant::now();
    let end = t0 + p.churn_duration;
    let mut loops = Vec::new();
    for w in 0..p.churn_workers {
        let (addrs, rooms) = (addrs.clone(), rooms.clone());
        let (cycles, per_room, errors, first_error) = (
            cycles.clone(),
            per_room.clone(),
            errors.clone(),
            first_error.clone(),
        );
        loops.push(tokio::spawn(async move {
            let mut i = 0usize;
            while Instant::now() < end {
                let r = (w + i) % rooms.len();
                let addr = addrs[(w + i / rooms.len()) % addrs.len()];
                match join(addr, &rooms[r], &format!("c{w}-{i}")).await {
                    Ok(held) => {
                        drop(held); // the leave
                        cycles.fetch_add(1, Relaxed);
                        per_room[r].fetch_add(1, Relaxed);
                    }
                    Err(e) => {
                        errors.fetch_add(1, Relaxed);
                        first_error
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .get_or_insert(e.to_string());
                    }
                }
                i += 1;
            }
        }));
    }
    for l in loops {
        let _ = l.await;
    }
    let wall = t0.elapsed().as_secs_f64();
    // Settle: every churned user gone from every room (only the watchers left).
    let settle0 = Instant::now();
    for room in &rooms {
        wait_members(addrs[0], room, addrs.len(), Duration::from_secs(30)).await?;
    }
    let settle = settle0.elapsed().as_secs_f64();
    let cpu = cpu0.until(&cluster.cpu_sample());
    let redis_secs = procs::redis_cpu_secs(port).await? - redis_before;
    // Every watcher of room r is owed a join and a leave per cycle in r; a notice that has not
    // arrived 5 s after the lists settled counts as missing.
    let missing = || {
        let mut missing = 0u64;
        for (i, w) in watchers.iter().enumerate() {
            let want = per_room[i / addrs.len()].load(Relaxed);
            let joins = w.notices.joins.load(Relaxed) - base[i].0;
            let leaves = w.notices.leaves.load(Relaxed) - base[i].1;
            missing += want.saturating_sub(joins) + want.saturating_sub(leaves);
        }
        missing
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while missing() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let missing = missing();
    let n = cycles.load(Relaxed);
    let errs = errors.load(Relaxed);
    let ops = 2.0 * n as f64 / wall;
    let per_join = |secs: f64| secs * 1e6 / n.max(1) as f64;
    println!(
        "{tag} churn: {n} joins + {n} leaves in {wall:.1} s = {ops:.0} ops/s with {} loops, \
         {errs} errors, {missing} notices missing at the watchers; settled in {settle:.2} s; \
         per join (with its leave): redis {:.0} us (INFO cpu), nodes {:.0} us, loadgen {:.0} us{}",
        p.churn_workers,
        per_join(redis_secs),
        per_join(cpu.nodes_secs),
        per_join(cpu.loadgen_secs),
        first_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|e| format!("; first error: {e}"))
            .unwrap_or_default()
    );
    Ok((
        vec![
            fig(
                "churn_ops_per_s",
                "joins+leaves/s held",
                Better::Higher,
                ops,
            ),
            fig("churn_errors", "churn errors", Better::Lower, errs as f64),
            fig(
                "churn_notices_missing",
                "join/leave notices missing",
                Better::Lower,
                missing as f64,
            ),
            fig(
                "redis_us_per_join",
                "redis CPU/join+leave (us)",
                Better::Lower,
                per_join(redis_secs),
            ),
            fig(
                "nodes_us_per_join",
                "nodes CPU/join+leave (us)",
                Better::Lower,
                per_join(cpu.nodes_secs),
            ),
            fig(
                "loadgen_us_per_join",
                "loadgen CPU/join+leave (us)",
                Better::Neither,
                per_join(cpu.loadgen_secs),
            ),
        ],
        json!({
            "cycles": n, "errors": errs, "wall_s": wall, "settle_s": settle,
            "notices_missing": missing, "redis_cpu_s": redis_secs,
            "nodes_cpu_s": cpu.nodes_secs, "loadgen_cpu_s": cpu.loadgen_secs,
            "host_cores": cpu.host_cores,
            "first_error": *first_error.lock().unwrap_or_else(PoisonError::into_inner),
        }),
    ))
}

/// Writes `users` into `room` as the share of a node `holder` with a lease far in the future
/// (the keys and fields of `src/bus/presence`, channel prefix of the bench's nodes).
async fn populate(
    port: u16,
    prefix: &str,
    room: &str,
    holder: &str,
    users: std::ops::Range<usize>,
) -> Result<()> {
    let tag = format!("{{{prefix}{room}}}");
    let fleet = format!("__axum_fanout:presence:{prefix}");
    let names: Vec<String> = users.map(|i| format!("user-{i:06}")).collect();
    for key in [format!("{tag}:members"), format!("{tag}:node:{holder}")] {
        for chunk in names.chunks(1000) {
            let mut args: Vec<&[u8]> = vec![b"HSET", key.as_bytes()];
            for u in chunk {
                args.push(u.as_bytes());
                args.push(b"1");
            }
            procs::redis_call(port, &args).await?;
        }
    }
    let nodes = format!("{tag}:nodes");
    let rooms = format!("{fleet}rooms:{holder}");
    let leases = format!("{fleet}leases");
    procs::redis_call(port, &[b"SADD", nodes.as_bytes(), holder.as_bytes()]).await?;
    procs::redis_call(port, &[b"SADD", rooms.as_bytes(), room.as_bytes()]).await?;
    let far = (i64::MAX / 4).to_string();
    procs::redis_call(
        port,
        &[
            b"ZADD",
            leases.as_bytes(),
            far.as_bytes(),
            holder.as_bytes(),
        ],
    )
    .await?;
    Ok(())
}

async fn list(cluster: Cluster, p: &PresenceParams, tag: &str) -> Result<(Vec<Figure>, Value)> {
    let addrs = cluster.addrs.clone();
    let port = redis_port(&cluster)?;
    let prefix = "bench:room:";
    let room = "big";
    let mut figures = Vec::new();
    let mut details = Vec::new();
    let mut have = 0;
    for (k, &size) in p.list_sizes.iter().enumerate() {
        if size > have {
            populate(port, prefix, room, "bulk", have..size).await?;
            have = size;
        }
        wait_members(addrs[0], room, size, Duration::from_secs(10)).await?;
        let redis_before = procs::redis_cpu_secs(port).await?;
        let mut ms = Vec::with_capacity(p.list_samples);
        for i in 0..p.list_samples {
            let (took, body) = get_presence(addrs[i % addrs.len()], room).await?;
            if i == 0 && member_count(&body) != size {
                bail!("the list has {} members, not {size}", member_count(&body));
            }
            ms.push(took.as_secs_f64() * 1e3);
        }
        let redis_us =
            (procs::redis_cpu_secs(port).await? - redis_before) * 1e6 / p.list_samples as f64;
        ms.sort_by(f64::total_cmp);
        let (p50, p99) = (percentile(&ms, 0.5), percentile(&ms, 0.99));
        println!(
            "{tag} list of {size} members: median {p50:.2} ms, p99 {p99:.2} ms over {} GETs; \
             redis {redis_us:.0} us per list (INFO cpu)",
            p.list_samples
        );
        let n = k + 1;
        figures.push(fig(
            leak(format!("list{n}_p50_ms")),
            leak(format!("list of {size}: median (ms)")),
            Better::Lower,
            p50,
        ));
        figures.push(fig(
            leak(format!("list{n}_p99_ms")),
            leak(format!("list of {size}: p99 (ms)")),
            Better::Lower,
            p99,
        ));
        figures.push(fig(
            leak(format!("list{n}_redis_us")),
            leak(format!("list of {size}: redis CPU (us)")),
            Better::Lower,
            redis_us,
        ));
        details.push(json!({ "members": size, "p50_ms": p50, "p99_ms": p99,
            "max_ms": ms.last(), "redis_us_per_list": redis_us }));
    }
    Ok((figures, json!(details)))
}

/// CPU of Redis (`INFO cpu`) and of the nodes over `periods` lease refresh periods.
async fn idle_window(
    cluster: &Cluster,
    port: u16,
    period: Duration,
    periods: u32,
) -> Result<(f64, f64)> {
    let redis_before = procs::redis_cpu_secs(port).await?;
    let cpu0 = cluster.cpu_sample();
    tokio::time::sleep(period * periods).await;
    let cpu = cpu0.until(&cluster.cpu_sample());
    let redis = procs::redis_cpu_secs(port).await? - redis_before;
    let per = |secs: f64| secs * 1e6 / f64::from(periods);
    Ok((per(redis), per(cpu.nodes_secs)))
}

/// The nodes' heartbeat period (the chat example keeps the library's default ping interval):
/// every socket is pinged, and pongs back, once per period.
const PING_INTERVAL: Duration = Duration::from_secs(25);

async fn lease(cluster: Cluster, p: &PresenceParams, tag: &str) -> Result<(Vec<Figure>, Value)> {
    // The nodes were healthy a moment ago: their heartbeats are due about a ping interval on.
    let started = Instant::now();
    let port = redis_port(&cluster)?;
    let period = Duration::from_secs(p.ttl_s) / 3;
    // Let the nodes' start-up settle (first leases, subscriptions).
    tokio::time::sleep(period).await;
    let (redis_idle, nodes_idle) = idle_window(&cluster, port, period, p.lease_periods).await?;
    let addr = cluster.addrs[0];
    let specs = (0..p.lease_rooms)
        .map(|i| (addr, format!("lease{i}"), format!("u{i}")))
        .collect();
    let t0 = Instant::now();
    let held = join_all(specs, 64).await?;
    let joined = t0.elapsed().as_secs_f64();
    // Measure after the first heartbeat round (10,000 pings and pongs) rather than across it:
    // the window is about leases. With a TTL above 30 s the window does span the next round.
    let after_ping = started + PING_INTERVAL + Duration::from_secs(1);
    tokio::time::sleep_until((Instant::now() + period).max(after_ping).into()).await;
    let (redis_full, nodes_full) = idle_window(&cluster, port, period, p.lease_periods).await?;
    println!(
        "{tag} lease: per refresh period ({:.2} s): redis {redis_idle:.0} us and nodes \
         {nodes_idle:.0} us with no member; redis {redis_full:.0} us and nodes {nodes_full:.0} \
         us with {} rooms on node 1 (joined in {joined:.1} s)",
        period.as_secs_f64(),
        held.len(),
    );
    drop(held);
    Ok((
        vec![
            fig(
                "lease_redis_us_idle",
                "redis CPU/lease period, 0 rooms (us)",
                Better::Lower,
                redis_idle,
            ),
            fig(
                "lease_redis_us",
                "redis CPU/lease period, N rooms (us)",
                Better::Lower,
                redis_full,
            ),
            fig(
                "lease_nodes_us_idle",
                "nodes CPU/lease period, 0 rooms (us)",
                Better::Lower,
                nodes_idle,
            ),
            fig(
                "lease_nodes_us",
                "nodes CPU/lease period, N rooms (us)",
                Better::Lower,
                nodes_full,
            ),
        ],
        json!({
            "period_s": period.as_secs_f64(), "rooms": p.lease_rooms, "joined_s": joined,
            "redis_us_per_period_idle": redis_idle, "redis_us_per_period": redis_full,
            "nodes_us_per_period_idle": nodes_idle, "nodes_us_per_period": nodes_full,
        }),
    ))
}

async fn kill(mut cluster: Cluster, p: &PresenceParams, tag: &str) -> Result<(Vec<Figure>, Value)> {
    let addrs = cluster.addrs.clone();
    if addrs.len() < 2 {
        bail!("the kill phase needs at least 2 nodes");
    }
    let victim = addrs.len() - 1;
    let rooms: Vec<String> = (0..p.kill_rooms.max(1))
        .map(|r| format!("kill{r}"))
        .collect();
    let mut specs = Vec::new();
    for room in &rooms {
        for (n, addr) in addrs[..victim].iter().enumerate() {
            specs.push((*addr, room.clone(), format!("watch-n{}", n + 1)));
        }
    }
    let watchers = join_all(specs, 16).await?;
    let specs = (0..p.kill_members)
        .map(|i| {
            (
                addrs[victim],
                rooms[i % rooms.len()].clone(),
                format!("m{i}"),
            )
        })
        .collect();
    let members = join_all(specs, 64).await?;
    // Members of the victim in room r (they were dealt round-robin).
    let share =
        |r: usize| p.kill_members / rooms.len() + usize::from(r < p.kill_members % rooms.len());
    for (r, room) in rooms.iter().enumerate() {
        wait_members(addrs[0], room, share(r) + victim, Duration::from_secs(30)).await?;
    }
    // Each watcher is owed one leave per member of its room.
    let owed: Vec<u64> = (0..watchers.len())
        .map(|i| share(i / victim) as u64)
        .collect();
    let base: Vec<u64> = watchers
        .iter()
        .map(|w| w.notices.leaves.load(Relaxed))
        .collect();
    let killed = Instant::now();
    cluster.kill_node(victim)?;
    let ttl = Duration::from_secs(p.ttl_s);
    let deadline = killed + ttl * 2 + Duration::from_secs(30);
    loop {
        let done = watchers
            .iter()
            .zip(&base)
            .zip(&owed)
            .all(|((w, b), o)| w.notices.leaves.load(Relaxed) - b >= *o);
        if done {
            break;
        }
        if Instant::now() > deadline {
            let seen: u64 = watchers
                .iter()
                .zip(&base)
                .map(|(w, b)| w.notices.leaves.load(Relaxed) - b)
                .sum();
            bail!(
                "after kill -9, the watchers saw {seen} of {} leaves within {:?}",
                owed.iter().sum::<u64>(),
                deadline - killed
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(members);
    let at = |m: &Mutex<Option<Instant>>| *m.lock().unwrap_or_else(PoisonError::into_inner);
    let last = watchers
        .iter()
        .filter_map(|w| at(&w.notices.last_leave))
        .max()
        .map_or(f64::NAN, |t| t.duration_since(killed).as_secs_f64());
    let first = watchers
        .iter()
        .filter_map(|w| at(&w.notices.first_leave))
        .min()
        .map_or(f64::NAN, |t| t.duration_since(killed).as_secs_f64());
    let beyond = last - ttl.as_secs_f64();
    println!(
        "{tag} kill -9 of a node with {} members in {} rooms: first leave after {first:.2} s, \
         last leave at the other nodes' watchers after {last:.2} s (PRESENCE_TTL_S={}, \
         {beyond:+.2} s past it)",
        p.kill_members,
        rooms.len(),
        p.ttl_s
    );
    Ok((
        vec![
            fig(
                "kill_last_leave_s",
                "kill -9 to last leave (s)",
                Better::Lower,
                last,
            ),
            fig(
                "kill_first_leave_s",
                "kill -9 to first leave (s)",
                Better::Lower,
                first,
            ),
            fig(
                "kill_past_ttl_s",
                "last leave past the TTL (s)",
                Better::Lower,
                beyond,
            ),
        ],
        json!({ "members": p.kill_members, "rooms": rooms.len(), "ttl_s": p.ttl_s,
            "first_leave_s": first, "last_leave_s": last }),
    ))
}
