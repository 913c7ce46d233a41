//! The connect-cost part of `users` (see `users.rs`): `online` users (100,000) on
//! `online_nodes` nodes (6), one socket each, `GET /ws?room=online&user=u{i}` on node
//! `i % nodes`. They all share one room, so that what Redis keeps per user is the user's own.
//!
//! Every process here has a hard limit of 20,000 open files, so, as in `c100k`, no node and no
//! load generator holds more than `per_process` (17,000) sockets: the nodes are at least
//! `ceil(online / 17,000)`, this process holds users `0..17,000` and the others live in child
//! processes (this binary re-executed as `--users-child ADDRS ROOM FROM TO`; a child prints
//! `{"connected":N,"failed":F,"secs":S,"first_error":..}` once its sockets are connected,
//! answers the nodes' pings and ends with its stdin).
//!
//! * **connect**: from the first connect until every user was *reachable*: a
//!   `POST /users/u{i}/messages` answered `{"nodes":1}` (a `{"nodes":0}`, the node not yet
//!   subscribed, is retried after 10 ms). The probes start once every handshake is done, so
//!   the figure is an upper bound of connect plus subscribe; both instants are reported.
//! * **memory**: Redis `INFO memory` `used_memory` before the first connect and after every
//!   user was reachable, divided by the users.
//! * **disconnect**: `POST /users/u{i}/disconnect` for users `0..disconnects` (1,000, held by
//!   this process), from the HTTP workers; the time from the first POST until the last of
//!   their sockets saw its close frame, the codes seen (4000 expected), other users' sockets
//!   closed meanwhile (0 expected), and the CPU of Redis and the nodes per disconnect.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use futures_util::stream;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::procs::{self, Cluster, ClusterConfig, Target};
use crate::report::{Better, Figure, fig};
use crate::users::UsersParams;
use crate::users_http::{MakeRequest, post_all, redis_port};
use crate::ws::{self, Proto};
use crate::{Context, Result, bail};

/// First argument that turns the bench binary into a `users` load-generator child.
pub(crate) const CHILD_FLAG: &str = "--users-child";

/// The room every online user joins.
const ROOM: &str = "online";

/// How each socket of this process ended: its close code (None: none given) and when.
type Closes = Arc<Mutex<Vec<Option<(Option<u16>, Instant)>>>>;

/// Connects users `from..to` (64 handshakes at a time) and keeps each open until the server
/// closes it, noting the close in `closes[i - from]`. Returns (connected, first error).
async fn hold(
    addrs: &[SocketAddr],
    from: usize,
    to: usize,
    closes: &Closes,
) -> (usize, Option<String>) {
    let mut connects = stream::iter(from..to)
        .map(|i| {
            let addr = addrs[i % addrs.len()];
            async move {
                let path = format!("/ws?room={ROOM}&user=u{i}");
                (
                    i,
                    ws::connect_path(addr, &path, Proto::Ws, None, 4096).await,
                )
            }
        })
        .buffer_unordered(64);
    let (mut connected, mut first_error) = (0, None);
    while let Some((i, r)) = connects.next().await {
        match r {
            Ok(conn) => {
                connected += 1;
                let closes = closes.clone();
                tokio::spawn(async move {
                    let code = ws::until_close(conn).await.unwrap_or(None);
                    let mut c = closes.lock().unwrap_or_else(PoisonError::into_inner);
                    c[i - from] = Some((code, Instant::now()));
                });
            }
            Err(e) => {
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    (connected, first_error)
}

/// `used_memory` of `INFO memory`, in bytes.
async fn used_memory(port: u16) -> Result<f64> {
    let info = procs::redis_call(port, &[b"INFO", b"memory"]).await?;
    String::from_utf8_lossy(&info)
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .ctx(|| format!("no used_memory in INFO memory of port {port}"))
}

/// Runs the part on a fresh cluster, within 15 minutes.
pub(crate) async fn run(
    target: &Target,
    cc: &ClusterConfig,
    p: &UsersParams,
    tag: &str,
) -> Result<(Vec<Figure>, Value)> {
    let limit = Duration::from_secs(900);
    tokio::time::timeout(limit, online(target, cc, p, tag))
        .await
        .ctx(|| format!("users online did not finish within {limit:?}"))?
}

async fn online(
    target: &Target,
    cc: &ClusterConfig,
    p: &UsersParams,
    tag: &str,
) -> Result<(Vec<Figure>, Value)> {
    let files = procs::open_files_limit().unwrap_or(20_000) as usize;
    let per_process = p.per_process.min(files.saturating_sub(1_500)).max(1);
    let users = p.online;
    let nodes = p.online_nodes.max(users.div_ceil(per_process));
    let here = users.min(per_process);
    let kids = (users - here).div_ceil(per_process);
    if p.disconnects > here {
        bail!(
            "users: {} disconnects, but this process holds {here} users",
            p.disconnects
        );
    }
    let mut cc = cc.clone();
    cc.nodes = nodes;
    println!(
        "{tag} online: {users} users on {nodes} nodes; {here} sockets here and {} in {kids} \
         load-generator processes (open-files limit {files})",
        users - here
    );
    let cluster = Cluster::start(target, &cc).await?;
    let port = redis_port(&cluster)?;
    // Let the fresh nodes settle (first subscriptions, node records).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mem_before = used_memory(port).await?;
    let redis0 = procs::redis_cpu_secs(port).await?;
    let cpu0 = cluster.cpu_sample();
    let t0 = Instant::now();
    let addrs = cluster.addrs.clone();
    let list = addrs.iter().map(ToString::to_string).collect::<Vec<_>>();
    let mut children = Vec::new();
    for j in 0..kids {
        let (from, to) = (
            here + j * per_process,
            (here + (j + 1) * per_process).min(users),
        );
        let log = cc.log_dir.join(format!("users-lg{}.log", j + 1));
        let args = [
            CHILD_FLAG.into(),
            list.join(","),
            ROOM.into(),
            from.to_string(),
            to.to_string(),
        ];
        let name = format!("users load generator {}", j + 1);
        let mut child = procs::spawn_load_generator(&args, &log, &name)?;
        let stdout = child
            .stdout
            .take()
            .ctx(|| "a child without stdout".to_string())?;
        children.push((child, BufReader::new(stdout).lines(), to - from));
    }
    let closes: Closes = Arc::new(Mutex::new(vec![None; here]));
    let (mut connected, mut first_error) = hold(&addrs, 0, here, &closes).await;
    for (j, (_, lines, sockets)) in children.iter_mut().enumerate() {
        let line = tokio::time::timeout(Duration::from_secs(600), lines.next_line())
            .await
            .ctx(|| format!("users load generator {} did not connect in time", j + 1))?
            .ctx(|| format!("reading users load generator {}", j + 1))?
            .ctx(|| format!("users load generator {} exited (see its log)", j + 1))?;
        let v: Value = serde_json::from_str(&line).ctx(|| format!("child said {line:?}"))?;
        let n = v["connected"].as_u64().unwrap_or(0) as usize;
        connected += n;
        if n < *sockets && first_error.is_none() {
            first_error = v["first_error"].as_str().map(str::to_owned);
        }
    }
    let handshakes_s = t0.elapsed().as_secs_f64();
    if connected < users {
        bail!(
            "{connected} of {users} users connected; first error: {}",
            first_error.unwrap_or_default()
        );
    }
    let probe: MakeRequest = Arc::new(|k| (format!("/users/u{k}/messages"), b"1".to_vec()));
    let reach = Some(Duration::from_secs(120));
    post_all(&addrs, p.workers, users, probe, None, reach).await?;
    let reach_s = t0.elapsed().as_secs_f64();
    let cpu = cpu0.until(&cluster.cpu_sample());
    let redis_connect = procs::redis_cpu_secs(port).await? - redis0;
    let (connect_nodes_s, connect_host) = (cpu.nodes_secs, cpu.host_cores);
    let mem_after = used_memory(port).await?;
    let per_user = (mem_after - mem_before) / users as f64;
    let us_each = |secs: f64, n: usize| secs * 1e6 / n as f64;
    println!(
        "{tag} online: {users} users: handshakes done after {handshakes_s:.1} s, every user \
         reachable (POST /users/U/messages -> nodes 1) after {reach_s:.1} s = {:.0} users/s; \
         per user: redis {:.0} B of used_memory ({:.1} -> {:.1} MiB), CPU redis {:.0} us, nodes \
         {:.0} us, loadgen {:.0} us (this process only); host {:.2} cores busy",
        users as f64 / reach_s,
        per_user,
        mem_before / 1048576.0,
        mem_after / 1048576.0,
        us_each(redis_connect, users),
        us_each(cpu.nodes_secs, users),
        us_each(cpu.loadgen_secs, users),
        cpu.host_cores,
    );

    // Fleet-wide disconnect of users 0..k, all held here.
    let k = p.disconnects;
    let ended = |range: std::ops::Range<usize>| {
        let c = closes.lock().unwrap_or_else(PoisonError::into_inner);
        c[range].iter().flatten().copied().collect::<Vec<_>>()
    };
    let early = ended(0..here).len();
    let redis0 = procs::redis_cpu_secs(port).await?;
    let cpu0 = cluster.cpu_sample();
    let first_post = Instant::now();
    let close: MakeRequest = Arc::new(|k| (format!("/users/u{k}/disconnect"), Vec::new()));
    let posted = post_all(&addrs, p.workers, k, close, None, None).await?;
    let deadline = first_post + Duration::from_secs(30);
    while ended(0..k).len() < k && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let cpu = cpu0.until(&cluster.cpu_sample());
    let redis_disconnect = procs::redis_cpu_secs(port).await? - redis0;
    let seen = ended(0..k);
    let last_ms = seen
        .iter()
        .map(|(_, at)| at.duration_since(first_post).as_secs_f64() * 1e3)
        .fold(0.0, f64::max);
    let wrong = seen.iter().filter(|(code, _)| *code != Some(4000)).count();
    tokio::time::sleep(Duration::from_millis(200)).await; // ok: a stray close has time to show
    let others = ended(k..here).len();
    let all_ms = if seen.len() == k { last_ms } else { f64::NAN };
    println!(
        "{tag} disconnect of {k} users: {} closed, the last {last_ms:.1} ms after the first \
         POST (POSTs answered in {:.1} ms, {} unreached), {wrong} without code 4000, {others} \
         other sockets closed ({early} before); per disconnect: redis {:.0} us, nodes {:.0} \
         us; host {:.2} cores busy",
        seen.len(),
        posted.secs * 1e3,
        posted.unreached,
        us_each(redis_disconnect, k),
        us_each(cpu.nodes_secs, k),
        cpu.host_cores,
    );
    drop(children);
    drop(cluster);
    Ok((
        vec![
            fig(
                "online_users",
                "online users",
                Better::Neither,
                users as f64,
            ),
            fig(
                "online_reach_s",
                "connect+subscribe all (s)",
                Better::Lower,
                reach_s,
            ),
            fig(
                "online_redis_b_per_user",
                "redis memory/user (B)",
                Better::Lower,
                per_user,
            ),
            fig(
                "disconnect_ms",
                "disconnect: last close (ms)",
                Better::Lower,
                all_ms,
            ),
            fig(
                "disconnect_redis_us",
                "disconnect: redis CPU/user (us)",
                Better::Lower,
                us_each(redis_disconnect, k),
            ),
            fig(
                "disconnect_nodes_us",
                "disconnect: nodes CPU/user (us)",
                Better::Lower,
                us_each(cpu.nodes_secs, k),
            ),
        ],
        json!({
            "users": users, "nodes": nodes, "load_generators": kids, "handshakes_s": handshakes_s,
            "reach_s": reach_s, "connect_host_cores": connect_host,
            "disconnect_host_cores": cpu.host_cores, "redis_used_memory_before": mem_before,
            "redis_used_memory_after": mem_after, "redis_bytes_per_user": per_user,
            "disconnects": k, "closed": seen.len(), "disconnect_last_ms": last_ms,
            "disconnect_posts_s": posted.secs, "unreached": posted.unreached,
            "wrong_codes": wrong, "others_closed": others, "closed_before": early,
            "connect_redis_cpu_s": redis_connect, "connect_nodes_cpu_s": connect_nodes_s,
            "disconnect_redis_cpu_s": redis_disconnect, "disconnect_nodes_cpu_s": cpu.nodes_secs,
        }),
    ))
}

/// Entry point of a load-generator child (`CHILD_FLAG ADDRS ROOM FROM TO`).
pub(crate) fn child_main(args: &[String]) -> ExitCode {
    // Connects on this thread, reads on the worker (see `c100k::child_main`).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build();
    match rt
        .map_err(Into::into)
        .and_then(|rt| rt.block_on(child(args)))
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("users child: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn child(args: &[String]) -> Result<()> {
    let [addrs, room, from, to] = args else {
        bail!("usage: {CHILD_FLAG} ADDRS ROOM FROM TO");
    };
    if room != ROOM {
        bail!("unexpected room {room:?}");
    }
    let addrs: Vec<SocketAddr> = addrs
        .split(',')
        .map(|a| a.parse().ctx(|| format!("node address {a:?}")))
        .collect::<Result<_>>()?;
    let from: usize = from.parse().ctx(|| format!("FROM {from:?}"))?;
    let to: usize = to.parse().ctx(|| format!("TO {to:?}"))?;
    if addrs.is_empty() || to < from {
        bail!("no node address, or FROM after TO");
    }
    let t0 = Instant::now();
    let closes: Closes = Arc::new(Mutex::new(vec![None; to - from]));
    let (connected, first_error) = hold(&addrs, from, to, &closes).await;
    let line = json!({
        "connected": connected, "failed": to - from - connected,
        "secs": t0.elapsed().as_secs_f64(), "first_error": first_error,
    });
    let mut out = tokio::io::stdout();
    out.write_all(format!("{line}\n").as_bytes()).await?;
    out.flush().await?;
    // Hold the sockets until the parent goes (or says so).
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(l) = lines.next_line().await? {
        if l.trim() == "exit" {
            break;
        }
    }
    Ok(())
}
