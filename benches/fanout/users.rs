//! `users` (opt-in: `--scenario users`): what "users across the fleet" (issue 21,
//! PROTOCOL.md part 2, "Users") costs on the chat example, in two parts, each on a fresh
//! cluster (one private redis-server):
//!
//! * **direct**: `direct_users` sockets (10,000) over 3 nodes, one per user, socket `i` being
//!   `GET /ws?room=r{i}&user=u{i}` on node `i % 3`, so each user is also alone in a room and
//!   the same sockets serve both paths. A *burst* sends one message per user from
//!   `workers` HTTP keep-alive connections (spread over the nodes): `POST /users/u{i}/messages`
//!   (each socket gets `{"type":"fanout.direct","payload":V}`), or, for the comparison, the
//!   same volume as room broadcasts `POST /rooms/r{i}/messages`. The time from the first POST
//!   until the last socket got its frame gives deliveries per second, with the CPU of the
//!   nodes (`/proc`), Redis (its own `INFO cpu`) and the load generator per delivery over that
//!   window. One message per user means one HTTP request per delivery: the burst measures the
//!   publish path (request, PUBLISH, one frame) rather than a room's fan-out. Then each
//!   path at a fixed `latency_rate` for `latency_duration`, paced: V carries the send stamp
//!   taken just before its POST is written, so the latency (p50, p99, max) is the whole
//!   path, HTTP request included. Both paths alternate, `passes` times each, in one run; the
//!   figures are their medians. Before measuring, every user is reached once on each path (a
//!   POST answered `{"nodes":1}`; `{"nodes":0}` is retried: the node has not subscribed yet).
//! * **online** (`users_online.rs`): connect cost, Redis memory per online user and a
//!   fleet-wide disconnect, with up to 100,000 users on 6 nodes.
//!
//! Everything here speaks the plain WebSocket contract; other targets get a note and no
//! figures.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt as _, TryStreamExt as _};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::hist::{ConnStats, Summary};
use crate::procs::{self, Cluster, ClusterConfig, CpuUsage, Target};
use crate::report::{Better, Figure, fig, median};
use crate::users_http::{MakeRequest, Posted, post_all, redis_port};
use crate::users_online;
use crate::ws::{self, Proto};
use crate::{Context, Result, bail, clock};

/// Knobs of the scenario (`--quick` shrinks every one; see `new`).
#[derive(Debug, Clone)]
pub(crate) struct UsersParams {
    /// Online users of the direct part, one socket each, over 3 nodes.
    pub(crate) direct_users: usize,
    /// Bursts per path, alternated (direct, room, direct, room, ...).
    pub(crate) passes: usize,
    /// Concurrent HTTP keep-alive connections sending the POSTs.
    pub(crate) workers: usize,
    /// Messages per second of the fixed-rate latency runs.
    pub(crate) latency_rate: f64,
    pub(crate) latency_duration: Duration,
    /// Online users of the connect-cost part.
    pub(crate) online: usize,
    /// Nodes of the connect-cost part (raised to what the open-files limit needs).
    pub(crate) online_nodes: usize,
    /// Users disconnected fleet-wide at the end of the connect-cost part.
    pub(crate) disconnects: usize,
    /// Most sockets per node and per load-generator process (each is a descriptor there).
    pub(crate) per_process: usize,
    pub(crate) msg_size: usize,
}

impl UsersParams {
    pub(crate) fn new(quick: bool, scale: f64) -> Self {
        let q = |full: usize, quick_value: usize| if quick { quick_value } else { full };
        Self {
            direct_users: q(10_000, 500),
            passes: q(3, 1),
            workers: q(32, 8),
            latency_rate: if quick { 500.0 } else { 2_000.0 },
            latency_duration: Duration::from_secs_f64(if quick { 2.0 } else { 5.0 } * scale),
            online: q(100_000, 1_000),
            online_nodes: q(6, 3),
            disconnects: q(1_000, 100),
            per_process: 17_000,
            msg_size: 256,
        }
    }

    pub(crate) fn describe(&self) -> Value {
        json!({
            "direct_users": self.direct_users, "passes": self.passes, "workers": self.workers,
            "latency_rate": self.latency_rate,
            "latency_s": self.latency_duration.as_secs_f64(), "online": self.online,
            "online_nodes": self.online_nodes, "disconnects": self.disconnects,
            "msg_size": self.msg_size,
        })
    }
}

/// Runs both parts against a plain WebSocket target.
pub(crate) async fn run(
    target: &Target,
    cc: &ClusterConfig,
    p: &UsersParams,
    tag: &str,
) -> Result<(Vec<Figure>, Value)> {
    if target.proto != Proto::Ws {
        println!("{tag} skipped: users are part of the plain WebSocket contract only");
        return Ok((Vec::new(), json!({ "skipped": "not a ws target" })));
    }
    if p.direct_users == 0 || p.online == 0 || p.workers == 0 || p.passes == 0 {
        bail!("users: --users-direct, --users-online and the workers must be positive");
    }
    if cc.redis_cluster.is_some() {
        bail!("users needs a single redis server (drop --redis-cluster)");
    }
    let mut cc = cc.clone();
    cc.nodes = 3;
    let cluster = Cluster::start(target, &cc).await?;
    let limit = Duration::from_secs(300) + p.latency_duration * 2 * p.passes as u32;
    let (mut figures, direct) = tokio::time::timeout(limit, direct(cluster, p, tag))
        .await
        .ctx(|| format!("users direct did not finish within {limit:?}"))??;
    let (more, online) = users_online::run(target, &cc, p, tag).await?;
    figures.extend(more);
    Ok((figures, json!({ "direct": direct, "online": online })))
}

/// `{"t":STAMP,"p":"xx.."}`, `size` bytes long.
fn stamped(size: usize) -> Vec<u8> {
    let mut v = format!(r#"{{"t":{},"p":""#, clock::now_ns()).into_bytes();
    let pad = size.saturating_sub(v.len() + 2);
    v.resize(v.len() + pad, b'x');
    v.extend_from_slice(b"\"}");
    v
}

/// The two ways to reach user `i`'s socket.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Path {
    Direct,
    Room,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Room => "room",
        }
    }

    /// Requests to user `k % users` with a stamped body of `size` bytes.
    fn requests(self, users: usize, size: usize) -> MakeRequest {
        Arc::new(move |k| {
            let path = match self {
                Path::Direct => format!("/users/u{}/messages", k % users),
                Path::Room => format!("/rooms/r{}/messages", k % users),
            };
            (path, stamped(size))
        })
    }
}

/// One burst or paced run of one path.
#[derive(Debug)]
struct Run {
    path: Path,
    /// Paced at a fixed rate (a latency run), not a burst.
    paced: bool,
    sent: usize,
    /// From the first POST until the last delivery (NaN: not all arrived).
    secs: f64,
    posted: Posted,
    lat: Summary,
    cpu: CpuUsage,
    /// Redis's own count (`INFO cpu`), finer than `/proc`'s clock ticks.
    redis_secs: f64,
}

impl Run {
    fn per_s(&self) -> f64 {
        self.lat.delivered as f64 / self.secs
    }

    fn us(&self, secs: f64) -> f64 {
        secs * 1e6 / self.lat.delivered.max(1) as f64
    }

    fn json(&self) -> Value {
        let f = |v: f64| v.is_finite().then_some(v);
        json!({
            "path": self.path.name(), "paced": self.paced, "sent": self.sent,
            "delivered": self.lat.delivered, "stale": self.lat.stale,
            "unreached": self.posted.unreached, "secs": f(self.secs), "post_secs": self.posted.secs,
            "deliveries_per_s": f(self.per_s()),
            "p50_ms": f(self.lat.quantile_ms(0.5)), "p99_ms": f(self.lat.quantile_ms(0.99)),
            "max_ms": f(self.lat.max_ms()),
            "nodes_us_per_delivery": self.us(self.cpu.nodes_secs),
            "redis_us_per_delivery": self.us(self.redis_secs),
            "loadgen_us_per_delivery": self.us(self.cpu.loadgen_secs),
            "host_cores": self.cpu.host_cores,
        })
    }
}

/// Sends `count` messages on `path` (paced at `rate` if given) and waits until each arrived.
async fn measure(
    cluster: &Cluster,
    stats: &[Arc<ConnStats>],
    p: &UsersParams,
    path: Path,
    count: usize,
    rate: Option<f64>,
) -> Result<Run> {
    clock::start_window();
    let before = Summary::collect(stats.iter().map(|s| &**s));
    let delivered = || stats.iter().map(|s| s.delivered()).sum::<u64>() - before.delivered;
    let port = redis_port(cluster)?;
    let redis0 = procs::redis_cpu_secs(port).await?;
    let cpu0 = cluster.cpu_sample();
    let t0 = Instant::now();
    let make = path.requests(stats.len(), p.msg_size);
    let (addrs, workers) = (cluster.addrs.clone(), p.workers);
    let pace = rate.map(|r| (t0, r));
    let sender =
        tokio::spawn(async move { post_all(&addrs, workers, count, make, pace, None).await });
    let limit = Duration::from_secs(30)
        + rate.map_or(Duration::ZERO, |r| {
            Duration::from_secs_f64(count as f64 / r)
        });
    let mut done_at = None;
    while t0.elapsed() < limit {
        if delivered() >= count as u64 {
            done_at = Some(t0.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let cpu = cpu0.until(&cluster.cpu_sample());
    let redis_secs = procs::redis_cpu_secs(port).await? - redis0;
    let posted = sender
        .await
        .ctx(|| "the POST workers panicked".to_string())??;
    let lat = Summary::collect(stats.iter().map(|s| &**s)).since(&before);
    Ok(Run {
        path,
        paced: rate.is_some(),
        sent: count,
        secs: done_at.map_or(f64::NAN, |d| d.as_secs_f64()),
        posted,
        lat,
        cpu,
        redis_secs,
    })
}

/// Connects socket `i` as `/ws?room=r{i}&user=u{i}` on node `i % nodes`, reading (and
/// answering pings) from then on.
async fn connect_all(
    addrs: &[SocketAddr],
    users: usize,
) -> Result<(Vec<Arc<ConnStats>>, Vec<tokio::task::JoinHandle<()>>)> {
    let conns: Vec<ws::Conn> = stream::iter(0..users)
        .map(|i| {
            let addr = addrs[i % addrs.len()];
            async move {
                let path = format!("/ws?room=r{i}&user=u{i}");
                ws::connect_path(addr, &path, Proto::Ws, None, 4096).await
            }
        })
        .buffered(64)
        .try_collect()
        .await?;
    let mut stats = Vec::with_capacity(users);
    let mut tasks = Vec::with_capacity(2 * users);
    for conn in conns {
        let s = Arc::new(ConnStats::new());
        stats.push(s.clone());
        let (rd, mut wr) = conn.stream.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let (buf, filled) = (conn.buf, conn.filled);
        tasks.push(tokio::spawn(async move {
            let _ = ws::read_loop(rd, buf, filled, Proto::Ws, s.clone(), Some(tx)).await;
            s.mark_closed();
        }));
        tasks.push(tokio::spawn(async move {
            while let Some(pong) = rx.recv().await {
                if wr.write_all(&pong).await.is_err() {
                    break;
                }
            }
        }));
    }
    Ok((stats, tasks))
}

async fn direct(cluster: Cluster, p: &UsersParams, tag: &str) -> Result<(Vec<Figure>, Value)> {
    let n = p.direct_users;
    let t0 = Instant::now();
    let (stats, tasks) = connect_all(&cluster.addrs, n).await?;
    let connected = t0.elapsed().as_secs_f64();
    // Every user reachable on both paths before anything is measured.
    let reach = Some(Duration::from_secs(30));
    for path in [Path::Direct, Path::Room] {
        let make = path.requests(n, 32);
        post_all(&cluster.addrs, p.workers, n, make, None, reach).await?;
    }
    println!(
        "{tag} direct: {n} users on {} nodes connected in {connected:.1} s, all reachable on \
         both paths after {:.1} s",
        cluster.addrs.len(),
        t0.elapsed().as_secs_f64()
    );
    let mut runs: Vec<Run> = Vec::new();
    let paced = (p.latency_rate * p.latency_duration.as_secs_f64()).round() as usize;
    for pass in 1..=p.passes {
        for path in [Path::Direct, Path::Room] {
            let burst = measure(&cluster, &stats, p, path, n, None).await?;
            let lat = measure(&cluster, &stats, p, path, paced, Some(p.latency_rate)).await?;
            println!(
                "{tag} pass {pass} {:>6}: burst of {n} in {:.3} s = {:.0} deliveries/s \
                 (POSTs answered in {:.3} s, {} unreached); per delivery nodes {:.1} us, redis \
                 {:.1} us, loadgen {:.1} us; at {:.0}/s: p50 {:.2} ms, p99 {:.2} ms, max {:.2} \
                 ms, {} of {paced} delivered; host {:.2} and {:.2} cores busy",
                path.name(),
                burst.secs,
                burst.per_s(),
                burst.posted.secs,
                burst.posted.unreached,
                burst.us(burst.cpu.nodes_secs),
                burst.us(burst.redis_secs),
                burst.us(burst.cpu.loadgen_secs),
                p.latency_rate,
                lat.lat.quantile_ms(0.5),
                lat.lat.quantile_ms(0.99),
                lat.lat.max_ms(),
                lat.lat.delivered,
                burst.cpu.host_cores,
                lat.cpu.host_cores,
            );
            runs.push(burst);
            runs.push(lat);
        }
    }
    for t in &tasks {
        t.abort();
    }
    let closed = stats.iter().filter(|s| s.is_closed()).count();
    drop(cluster);
    // Medians over the passes, per path and kind (bursts first, then paced runs).
    let med = |path: Path, paced_run: bool, f: &dyn Fn(&Run) -> f64| {
        let v: Vec<f64> = runs
            .iter()
            .filter(|r| r.path == path && r.paced == paced_run)
            .map(f)
            .collect();
        median(&v)
    };
    let mut figures = Vec::new();
    for (path, keys) in [(Path::Direct, DIRECT_KEYS), (Path::Room, ROOM_KEYS)] {
        let values = [
            med(path, false, &Run::per_s),
            med(path, false, &|r| r.us(r.cpu.nodes_secs)),
            med(path, false, &|r| r.us(r.redis_secs)),
            med(path, false, &|r| r.us(r.cpu.loadgen_secs)),
            med(path, true, &|r| r.lat.quantile_ms(0.5)),
            med(path, true, &|r| r.lat.quantile_ms(0.99)),
        ];
        for ((key, label, better), value) in keys.iter().zip(values) {
            figures.push(fig(key, label, *better, value));
        }
    }
    let v = |key: &str| {
        figures
            .iter()
            .find(|f| f.key == key)
            .map_or(f64::NAN, |f| f.value)
    };
    println!(
        "{tag} direct against room, medians of {} passes: {:.0} against {:.0} deliveries/s; \
         nodes {:.1} against {:.1} us and redis {:.1} against {:.1} us per delivery; p99 at \
         {:.0}/s {:.2} against {:.2} ms",
        p.passes,
        v("direct_deliveries_per_s"),
        v("room_deliveries_per_s"),
        v("direct_nodes_us"),
        v("room_nodes_us"),
        v("direct_redis_us"),
        v("room_redis_us"),
        p.latency_rate,
        v("direct_p99_ms"),
        v("room_p99_ms"),
    );
    let runs: Vec<Value> = runs.iter().map(Run::json).collect();
    Ok((
        figures,
        json!({ "users": n, "connect_s": connected, "closed_sockets": closed, "runs": runs }),
    ))
}

type Keys = [(&'static str, &'static str, Better); 6];

const DIRECT_KEYS: Keys = [
    (
        "direct_deliveries_per_s",
        "direct: deliveries/s",
        Better::Higher,
    ),
    (
        "direct_nodes_us",
        "direct: nodes CPU/deliv (us)",
        Better::Lower,
    ),
    (
        "direct_redis_us",
        "direct: redis CPU/deliv (us)",
        Better::Lower,
    ),
    (
        "direct_loadgen_us",
        "direct: loadgen CPU/deliv (us)",
        Better::Neither,
    ),
    (
        "direct_p50_ms",
        "direct: p50 at fixed rate (ms)",
        Better::Lower,
    ),
    (
        "direct_p99_ms",
        "direct: p99 at fixed rate (ms)",
        Better::Lower,
    ),
];

const ROOM_KEYS: Keys = [
    (
        "room_deliveries_per_s",
        "room: deliveries/s",
        Better::Higher,
    ),
    ("room_nodes_us", "room: nodes CPU/deliv (us)", Better::Lower),
    ("room_redis_us", "room: redis CPU/deliv (us)", Better::Lower),
    (
        "room_loadgen_us",
        "room: loadgen CPU/deliv (us)",
        Better::Neither,
    ),
    ("room_p50_ms", "room: p50 at fixed rate (ms)", Better::Lower),
    ("room_p99_ms", "room: p99 at fixed rate (ms)", Better::Lower),
];
