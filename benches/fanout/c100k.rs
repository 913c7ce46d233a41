//! `c100k`: 100,000 WebSocket connections held at once on this box, 100 rooms of 1,000, then
//! one message per room published at once.
//!
//! Every process here has a hard limit of 20,000 open files, so neither one node nor one load
//! generator can hold them all:
//!
//! - the fleet is `ceil(connections / 17,000)` nodes (6 for 100,000), clients spread
//!   round-robin over them (socket `i` joins room `r{i % rooms}` on node `i % nodes`);
//! - the parent process holds one publishing client per room (they read too: they are members
//!   of their room); the other clients live in `ceil((connections - rooms) / 17,000)` child
//!   processes, each this bench's own binary re-executed as `--c100k-child`. Clients do not
//!   bind a source address: `connect()` picks the local port per destination (about 28,000 per
//!   node address with the default port range, against at most 17,000 clients per node),
//!   while a `bind()` to `127.0.0.x:0` searches the whole port range for every socket, a
//!   synchronous syscall that grew to milliseconds and starved the child's runtime: its
//!   sockets stopped answering pings and the nodes' heartbeat closed 86 % of them;
//! - parent and children talk over the children's stdin/stdout, one line each way:
//!   the child prints `{"connected":N,"failed":F,"secs":S,"first_error":..}` once its sockets
//!   are connected, then answers `window NS` (start a measurement window at NS on the
//!   parent's clock), `count` (in-window deliveries so far) and `report` (its latency
//!   histogram since the window started); `exit` or the end of stdin ends it. Children align
//!   their clock to the parent's through the wall clock (`clock::align_to`), so the parent's
//!   send stamps read as latencies in the children.
//!
//! Phases, each with its own time limit, and the whole scenario under an overall limit:
//! connect (every handshake done), join (the nodes' `/stats` `memberships` add up to the
//! connections made), RSS (nodes' summed VmRSS growth from before the first connection,
//! divided by the connections), publish #1 (one message per room, all with one stamp; the
//! time until the last of the deliveries arrived is the largest latency recorded, in
//! histogram buckets 1.6 % wide), idle (the nodes' CPU over 30 s, heartbeats included, as a
//! percentage of one core summed over the nodes), publish #2 (the same after the idle
//! period). Each node's `/stats` (`connections`, `accepts_out_of_fds`, ...) is reported at
//! the end.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use futures_util::stream;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::mpsc;

use crate::clock;
use crate::hist::{ConnStats, Summary};
use crate::load::{Fleet, FleetSpec};
use crate::procs::{self, Cluster, ClusterConfig, Target};
use crate::report::{Better, Figure, fig};
use crate::ws::{self, Proto};
use crate::{Context, Result, bail};

/// First argument that turns the bench binary into a load-generator child.
pub(crate) const CHILD_FLAG: &str = "--c100k-child";

/// Handshakes in flight at once per child process.
const CHILD_CONCURRENCY: usize = 64;

/// Knobs of `c100k`.
#[derive(Debug, Clone)]
pub(crate) struct C100kParams {
    pub(crate) connections: usize,
    pub(crate) rooms: usize,
    /// Most client connections per node and per load-generator child (each is a descriptor of
    /// that process, whose hard limit is 20,000 here).
    pub(crate) per_process: usize,
    pub(crate) idle_window: Duration,
    pub(crate) connect_limit: Duration,
    pub(crate) join_limit: Duration,
    pub(crate) deliver_limit: Duration,
    /// Upper bound of the whole scenario: it stops itself after this.
    pub(crate) total_limit: Duration,
}

impl C100kParams {
    pub(crate) fn new(quick: bool) -> Self {
        Self {
            connections: if quick { 10_000 } else { 100_000 },
            rooms: 100,
            per_process: 17_000,
            idle_window: Duration::from_secs(if quick { 5 } else { 30 }),
            connect_limit: Duration::from_secs(300),
            join_limit: Duration::from_secs(60),
            deliver_limit: Duration::from_secs(10),
            total_limit: Duration::from_secs(900),
        }
    }

    pub(crate) fn describe(&self) -> Value {
        json!({
            "connections": self.connections, "rooms": self.rooms,
            "per_process": self.per_process, "idle_window_s": self.idle_window.as_secs_f64(),
        })
    }
}

/// One load-generator child and its pipes. Killed when dropped.
struct LgChild {
    _child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    sockets: usize,
    name: String,
}

impl LgChild {
    async fn read_line(&mut self, limit: Duration) -> Result<Value> {
        let line = tokio::time::timeout(limit, self.lines.next_line())
            .await
            .ctx(|| format!("{}: no answer within {limit:?}", self.name))?
            .ctx(|| format!("{}: reading its stdout", self.name))?
            .ctx(|| format!("{}: exited (see its log)", self.name))?;
        serde_json::from_str(&line).ctx(|| format!("{}: not JSON: {line:?}", self.name))
    }

    async fn ask(&mut self, cmd: &str) -> Result<Value> {
        self.stdin
            .write_all(format!("{cmd}\n").as_bytes())
            .await
            .ctx(|| format!("{}: writing to its stdin", self.name))?;
        self.stdin
            .flush()
            .await
            .ctx(|| format!("{}: flushing its stdin", self.name))?;
        self.read_line(Duration::from_secs(30)).await
    }
}

/// Result of one publish (one message per room).
#[derive(Debug)]
struct Delivery {
    expected: u64,
    summary: Summary,
    /// Wall time until the parent saw every delivery counted (polling every 10 ms).
    polled_ms: f64,
}

impl Delivery {
    fn complete(&self) -> bool {
        self.summary.delivered >= self.expected
    }

    /// Time until the last delivery arrived (ms): the largest latency recorded; NaN when not
    /// all arrived.
    fn all_ms(&self) -> f64 {
        if self.complete() {
            self.summary.max_ms()
        } else {
            f64::NAN
        }
    }

    fn line(&self) -> String {
        format!(
            "{} of {} delivered; all within {:.1} ms (p50 {:.1}, p99 {:.1} ms; seen by polling \
             after {:.0} ms){}",
            self.summary.delivered,
            self.expected,
            self.summary.max_ms(),
            self.summary.quantile_ms(0.5),
            self.summary.quantile_ms(0.99),
            self.polled_ms,
            if self.complete() { "" } else { " INCOMPLETE" }
        )
    }

    fn json(&self) -> Value {
        let f = |v: f64| v.is_finite().then_some(v);
        json!({
            "expected": self.expected, "delivered": self.summary.delivered,
            "stale": self.summary.stale, "bad": self.summary.bad,
            "closed_connections": self.summary.closed,
            "max_ms": f(self.summary.max_ms()), "p50_ms": f(self.summary.quantile_ms(0.5)),
            "p99_ms": f(self.summary.quantile_ms(0.99)), "polled_ms": self.polled_ms,
        })
    }
}

/// Runs `c100k` against `target` (see the module docs), within `p.total_limit`.
pub(crate) async fn run(
    target: &Target,
    cc: &ClusterConfig,
    p: &C100kParams,
    msg_size: usize,
    tag: &str,
) -> Result<(Vec<Figure>, Value)> {
    match tokio::time::timeout(p.total_limit, run_inner(target, cc, p, msg_size, tag)).await {
        Ok(r) => r,
        Err(_) => bail!("c100k did not finish within {:?}; stopped", p.total_limit),
    }
}

async fn run_inner(
    target: &Target,
    cc: &ClusterConfig,
    p: &C100kParams,
    msg_size: usize,
    tag: &str,
) -> Result<(Vec<Figure>, Value)> {
    if target.proto != Proto::Ws {
        bail!("c100k speaks the plain WebSocket contract only");
    }
    let conns = p.connections;
    let rooms = p.rooms.clamp(1, conns.max(1));
    if conns < rooms * 2 {
        bail!("--c100k-connections must be at least twice the rooms ({rooms})");
    }
    // Every client socket is a descriptor of a child; keep room for the rest.
    let limit = procs::open_files_limit().unwrap_or(20_000) as usize;
    let per_process = p.per_process.min(limit.saturating_sub(1_500)).max(1);
    let nodes = conns.div_ceil(per_process);
    let rest = conns - rooms;
    let kids = rest.div_ceil(per_process);
    let mut cc = cc.clone();
    cc.nodes = nodes;
    println!(
        "{tag} {conns} connections in {rooms} rooms over {nodes} nodes; {rooms} publishers \
         here and {rest} clients in {kids} load-generator processes (open-files limit \
         {limit}, at most {per_process} client sockets per process)"
    );
    let mut cluster = Cluster::start(target, &cc).await?;
    // Let the fresh nodes reach their resting footprint.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = cluster.nodes_rss_kib();

    let t0 = Instant::now();
    let spec = FleetSpec {
        rooms,
        clients_per_room: 1,
        publishers_per_room: 1,
        stalled_per_room: 0,
        stalled_rcvbuf: None,
        buf_size: 4096,
        proto: Proto::Ws,
    };
    let mut fleet = Fleet::connect(&spec, &cluster.addrs).await?;
    let addrs = cluster
        .addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let zero = clock::zero_unix_ns();
    let mut children = Vec::with_capacity(kids);
    for j in 0..kids {
        let from = rooms + j * rest / kids;
        let to = rooms + (j + 1) * rest / kids;
        let name = format!("load generator {} ({} sockets)", j + 1, to - from);
        let log = cc.log_dir.join(format!("c100k-lg{}.log", j + 1));
        let args = [
            CHILD_FLAG.to_string(),
            zero.to_string(),
            addrs.clone(),
            rooms.to_string(),
            from.to_string(),
            to.to_string(),
        ];
        let mut child = procs::spawn_load_generator(&args, &log, &name)?;
        let stdin = child.stdin.take().ctx(|| format!("{name}: no stdin"))?;
        let stdout = child.stdout.take().ctx(|| format!("{name}: no stdout"))?;
        children.push(LgChild {
            _child: child,
            stdin,
            lines: BufReader::new(stdout).lines(),
            sockets: to - from,
            name,
        });
    }
    let mut connected = fleet.receivers();
    let mut failed = 0;
    let mut first_error = None;
    let deadline = Instant::now() + p.connect_limit;
    for c in &mut children {
        let left = deadline.saturating_duration_since(Instant::now());
        let v = c.read_line(left).await?;
        let n = v["connected"].as_u64().unwrap_or(0) as usize;
        connected += n;
        failed += c.sockets - n;
        if first_error.is_none() {
            first_error = v["first_error"].as_str().map(str::to_owned);
        }
        println!(
            "{tag} {}: {n} connected, {} failed in {:.1} s",
            c.name,
            c.sockets - n,
            v["secs"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let handshakes_s = t0.elapsed().as_secs_f64();
    cluster.check_alive()?;
    if let Some(e) = &first_error {
        println!("{tag} first connection error: {e}");
    }

    // Joined: the nodes' memberships add up to the sockets that connected.
    let deadline = Instant::now() + p.join_limit;
    let mut members = 0;
    loop {
        let mut sum = 0;
        for addr in &cluster.addrs {
            // A node too busy to answer within the GET's limit counts as 0 this time.
            match procs::http_get_json(*addr, "/stats").await {
                Ok(s) => sum += s["memberships"].as_u64().unwrap_or(0) as usize,
                Err(e) => println!("{tag} note: {e}"),
            }
        }
        members = members.max(sum);
        if sum >= connected || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connect_s = t0.elapsed().as_secs_f64();
    println!(
        "{tag} {connected} of {conns} connected ({failed} failed): handshakes done in \
         {handshakes_s:.1} s, {members} joined after {connect_s:.1} s{}",
        if members < connected {
            " (join wait TIMED OUT)"
        } else {
            ""
        }
    );

    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = cluster.nodes_rss_kib();
    let per_conn_kib = rss_after.saturating_sub(rss_before) as f64 / connected.max(1) as f64;
    println!(
        "{tag} node RSS {:.1} -> {:.1} MiB = {per_conn_kib:.2} KiB ({:.0} B) per connection",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        per_conn_kib * 1024.0
    );

    // Every socket is in one room and every room gets one message.
    let expected = connected as u64;
    let first = deliver(
        &mut fleet,
        &mut children,
        expected,
        msg_size,
        p.deliver_limit,
    )
    .await?;
    println!("{tag} publish #1: {}", first.line());

    let cpu0 = cluster.cpu_sample();
    tokio::time::sleep(p.idle_window).await;
    let idle = cpu0.until(&cluster.cpu_sample());
    cluster.check_alive()?;
    let idle_pct = idle.nodes_cores * 100.0;
    println!(
        "{tag} idle {:.0} s: nodes {idle_pct:.2} % of one core in all, redis {:.2} %, host \
         {:.2} cores",
        idle.wall_secs,
        idle.redis_cores * 100.0,
        idle.host_cores
    );

    let second = deliver(
        &mut fleet,
        &mut children,
        expected,
        msg_size,
        p.deliver_limit,
    )
    .await?;
    println!("{tag} publish #2 (after idle): {}", second.line());

    let mut per_node = Vec::new();
    let mut out_of_fds = 0;
    for (i, addr) in cluster.addrs.iter().enumerate() {
        let s = match procs::http_get_json(*addr, "/stats").await {
            Ok(s) => s,
            Err(e) => {
                println!("{tag} node n{}: {e}", i + 1);
                per_node.push(json!({ "error": e.to_string() }));
                continue;
            }
        };
        let n = |k: &str| s[k].as_u64().unwrap_or(0);
        out_of_fds += n("accepts_out_of_fds");
        println!(
            "{tag} node n{}: connections {} memberships {} accepts_out_of_fds {} \
             heartbeat_timeouts {} slow_disconnects {} dropped {} delivered {}",
            i + 1,
            n("connections"),
            n("memberships"),
            n("accepts_out_of_fds"),
            n("heartbeat_timeouts"),
            n("slow_disconnects"),
            n("dropped"),
            n("delivered")
        );
        per_node.push(s);
    }
    cluster.check_alive()?;
    for c in &mut children {
        let _ = c.stdin.write_all(b"exit\n").await;
    }
    drop(children);
    drop(fleet);

    let f = |v: f64| v.is_finite().then_some(v);
    Ok((
        vec![
            fig(
                "connected",
                "connections held",
                Better::Higher,
                connected as f64,
            ),
            fig(
                "connect_s",
                "connect + join time (s)",
                Better::Lower,
                connect_s,
            ),
            fig(
                "rss_bytes_per_conn",
                "node RSS per connection (B)",
                Better::Lower,
                per_conn_kib * 1024.0,
            ),
            fig(
                "idle_cpu_pct",
                "idle CPU, nodes (% of 1 core)",
                Better::Lower,
                idle_pct,
            ),
            fig(
                "deliver_all_ms",
                "all deliveries (ms)",
                Better::Lower,
                first.all_ms(),
            ),
            fig(
                "deliver_all_ms_after_idle",
                "all deliveries after idle (ms)",
                Better::Lower,
                second.all_ms(),
            ),
            fig(
                "accepts_out_of_fds",
                "accepts out of fds",
                Better::Lower,
                out_of_fds as f64,
            ),
        ],
        json!({
            "nodes": nodes, "load_generators": kids, "connected": connected, "failed": failed,
            "first_error": first_error, "handshakes_s": handshakes_s, "connect_join_s": connect_s,
            "joined": members, "rss_before_kib": rss_before, "rss_after_kib": rss_after,
            "rss_kib_per_conn": f(per_conn_kib), "idle_window_s": idle.wall_secs,
            "idle_nodes_cores": idle.nodes_cores, "idle_redis_cores": idle.redis_cores,
            "idle_host_cores": idle.host_cores, "publish_1": first.json(),
            "publish_2": second.json(), "node_stats": per_node,
        }),
    ))
}

/// Publishes one message per room (all with one stamp) and waits until every expected
/// delivery arrived (or `limit`).
async fn deliver(
    fleet: &mut Fleet,
    children: &mut [LgChild],
    expected: u64,
    size: usize,
    limit: Duration,
) -> Result<Delivery> {
    let before = fleet.summary();
    clock::start_window();
    let window = clock::window_start_ns();
    for c in children.iter_mut() {
        c.ask(&format!("window {window}")).await?;
    }
    fleet.publish_once(size);
    let start = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let mut seen = fleet.delivered_total() - before.delivered;
        for c in children.iter_mut() {
            seen += c.ask("count").await?["delivered"].as_u64().unwrap_or(0);
        }
        if seen >= expected || start.elapsed() > limit {
            break;
        }
    }
    let polled_ms = start.elapsed().as_secs_f64() * 1000.0;
    let mut summary = fleet.summary().since(&before);
    for c in children.iter_mut() {
        summary.add(&Summary::from_json(&c.ask("report").await?));
    }
    Ok(Delivery {
        expected,
        summary,
        polled_ms,
    })
}

/// Entry point of a load-generator child (`CHILD_FLAG ZERO ADDRS ROOMS FROM TO`).
pub(crate) fn child_main(args: &[String]) -> ExitCode {
    // The connect loop runs on this thread (`block_on`) and the sockets' reads on a worker:
    // with ~17,000 sockets per destination, `connect()` itself spends up to milliseconds
    // finding a free source port, and a single thread doing both left sockets that had
    // connected early unable to answer the nodes' pings for tens of seconds.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("c100k child: building the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(child(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("c100k child: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn child(args: &[String]) -> Result<()> {
    let [zero, addrs, rooms, from, to] = args else {
        bail!("usage: {CHILD_FLAG} ZERO ADDRS ROOMS FROM TO");
    };
    let zero: i128 = zero.parse().ctx(|| format!("ZERO {zero:?}"))?;
    clock::align_to(zero);
    let addrs: Vec<SocketAddr> = addrs
        .split(',')
        .map(|a| a.parse().ctx(|| format!("node address {a:?}")))
        .collect::<Result<_>>()?;
    let rooms: usize = rooms.parse().ctx(|| format!("ROOMS {rooms:?}"))?;
    let from: usize = from.parse().ctx(|| format!("FROM {from:?}"))?;
    let to: usize = to.parse().ctx(|| format!("TO {to:?}"))?;
    if addrs.is_empty() || rooms == 0 {
        bail!("no node address or no room");
    }

    let t0 = Instant::now();
    let mut stats: Vec<Arc<ConnStats>> = Vec::with_capacity(to.saturating_sub(from));
    let mut tasks = Vec::with_capacity(2 * to.saturating_sub(from));
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let mut failed = 0;
    let mut connects = stream::iter(from..to)
        .map(|i| {
            let addr = addrs[i % addrs.len()];
            let room = format!("r{}", i % rooms);
            async move { ws::connect(addr, &room, Proto::Ws, None, 4096).await }
        })
        .buffer_unordered(CHILD_CONCURRENCY);
    // Each socket starts reading (and answering pings) as soon as it is connected: a long
    // connect phase must not leave early sockets deaf to the nodes' heartbeats.
    while let Some(r) = connects.next().await {
        let conn = match r {
            Ok(c) => c,
            Err(e) => {
                failed += 1;
                if let Ok(mut slot) = first_error.lock() {
                    slot.get_or_insert_with(|| e.to_string());
                }
                continue;
            }
        };
        let s = Arc::new(ConnStats::new());
        stats.push(Arc::clone(&s));
        let ws::Conn {
            stream,
            buf,
            filled,
        } = conn;
        let (rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let errors = Arc::clone(&first_error);
        tasks.push(tokio::spawn(async move {
            let r = ws::read_loop(rd, buf, filled, Proto::Ws, Arc::clone(&s), Some(tx)).await;
            s.mark_closed();
            if let (Err(e), Ok(mut slot)) = (r, errors.lock()) {
                slot.get_or_insert_with(|| format!("a connection ended: {e}"));
            }
        }));
        tasks.push(tokio::spawn(async move {
            while let Some(pong) = rx.recv().await {
                if wr.write_all(&pong).await.is_err() {
                    break;
                }
            }
        }));
    }
    drop(connects);
    let mut out = tokio::io::stdout();
    let say = |v: Value| format!("{v}\n");
    let first = first_error.lock().ok().and_then(|e| e.clone());
    out.write_all(
        say(json!({
            "connected": stats.len(), "failed": failed, "secs": t0.elapsed().as_secs_f64(),
            "first_error": first,
        }))
        .as_bytes(),
    )
    .await?;
    out.flush().await?;

    let collect = |stats: &[Arc<ConnStats>]| Summary::collect(stats.iter().map(|s| &**s));
    let mut base = collect(&stats);
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let mut words = line.split_whitespace();
        let reply = match words.next() {
            Some("window") => {
                let ns: u64 = words
                    .next()
                    .and_then(|w| w.parse().ok())
                    .ctx(|| format!("bad command {line:?}"))?;
                base = collect(&stats);
                clock::set_window_start(ns);
                json!({ "ok": true })
            }
            Some("count") => {
                let d: u64 = stats.iter().map(|s| s.delivered()).sum();
                json!({ "delivered": d - base.delivered })
            }
            Some("report") => collect(&stats).since(&base).to_json(),
            Some("exit") | None => break,
            Some(other) => bail!("unknown command {other:?}"),
        };
        out.write_all(say(reply).as_bytes()).await?;
        out.flush().await?;
    }
    for t in &tasks {
        t.abort();
    }
    Ok(())
}
