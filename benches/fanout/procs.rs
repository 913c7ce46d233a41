//! Child processes (redis-server, the server nodes) and the `/proc` readings taken from them.
//!
//! Every child is wrapped in a [`ChildGuard`] whose `Drop` kills it, so the processes go away
//! on every exit path: normal return, error, panic (unwinding drops the guards) and Ctrl-C or
//! SIGTERM (`main` drops the whole benchmark future when a signal arrives). Each child gets its
//! own process group and the guard kills the whole group, so a server started through
//! `sh -c` cannot leave a grandchild behind.

use std::fs;
use std::io::Read as _;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::ws::Proto;
use crate::{Context, Result, bail};

/// How a target server is launched.
#[derive(Debug, Clone)]
pub(crate) enum Launch {
    /// A binary run directly (our `chat` example).
    Exec(PathBuf),
    /// A shell command, run as `sh -c "exec CMD"` so that the PID we watch is the server's.
    Shell(String),
}

/// A server implementation under test.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) name: String,
    pub(crate) launch: Launch,
    /// Extra environment for its nodes, over the contract's (e.g. `SHARD_COUNT` per target).
    pub(crate) env: Vec<(String, String)>,
    /// Wire variant it speaks (plain WebSocket or socket.io).
    pub(crate) proto: Proto,
}

/// Kills its child (and the child's process group) when dropped.
#[derive(Debug)]
pub(crate) struct ChildGuard {
    name: String,
    child: Child,
    log: PathBuf,
}

impl ChildGuard {
    fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let out = fs::File::create(log).ctx(|| format!("creating {}", log.display()))?;
        let err = out
            .try_clone()
            .ctx(|| format!("duplicating the handle of {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Own group: the guard can kill every process the child may have started.
            .process_group(0);
        let child = cmd.spawn().ctx(|| format!("starting {name} ({cmd:?})"))?;
        Ok(Self {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Err` with the exit status and the end of the log if the process has exited.
    pub(crate) fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!(
                "{} exited ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log)
            ),
            Err(e) => bail!("cannot poll {}: {e}", self.name),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // The group id is the child's pid (process_group(0)). `kill -- -PGID` reaches every
        // member; std offers no group kill without libc, and libc is not a dependency.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// `n` distinct ports that were free a moment ago. Every listener is held until all are
/// picked, so the kernel cannot hand out the same port twice; another process could still
/// grab one before the child binds it, which is rare and shows up as a failed start.
pub(crate) fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .ctx(|| "binding an ephemeral port".to_string())?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<_>>()
        .ctx(|| "reading an ephemeral port".to_string())
}

/// Redis plus the server nodes of one run. Dropping it kills the nodes, then Redis.
#[derive(Debug)]
pub(crate) struct Cluster {
    // Field order is drop order: nodes first, so they do not log Redis errors while dying.
    nodes: Vec<ChildGuard>,
    /// One redis-server, or the masters of a Redis Cluster.
    redis: Vec<ChildGuard>,
    /// Port of each redis-server (one, or every master of a cluster), e.g. for `INFO`.
    pub(crate) redis_ports: Vec<u16>,
    /// Listening address of each node.
    pub(crate) addrs: Vec<SocketAddr>,
    /// PIDs whose CPU and RSS count as "server": each node and its descendants.
    node_pids: Vec<u32>,
}

/// Environment and paths shared by every cluster start.
#[derive(Debug, Clone)]
pub(crate) struct ClusterConfig {
    pub(crate) nodes: usize,
    pub(crate) shard_count: u32,
    pub(crate) channel_prefix: String,
    pub(crate) log_dir: PathBuf,
    /// Run a local Redis Cluster of this many masters (no replicas) instead of one server;
    /// nodes get `REDIS_CLUSTER` with every master's URL.
    pub(crate) redis_cluster: Option<usize>,
    /// `TOKIO_WORKER_THREADS` of every node; `None` leaves the nodes their default runtime
    /// (or whatever the bench's own environment says).
    pub(crate) worker_threads: Option<usize>,
}

impl Cluster {
    /// Starts a private redis-server and `cfg.nodes` nodes of `target`, and waits until every
    /// node answers `GET /healthz` with 200.
    pub(crate) async fn start(target: &Target, cfg: &ClusterConfig) -> Result<Self> {
        fs::create_dir_all(&cfg.log_dir).ctx(|| format!("creating {}", cfg.log_dir.display()))?;
        let (redis, redis_env) = match cfg.redis_cluster {
            None => {
                let port = free_ports(1)?[0];
                let mut redis = ChildGuard::spawn(
                    "redis-server",
                    redis_command(port),
                    &cfg.log_dir.join("redis.log"),
                )?;
                wait_redis(port, &mut redis).await?;
                let url = format!("redis://127.0.0.1:{port}");
                (vec![(redis, port)], vec![("REDIS_URL", url)])
            }
            Some(masters) => start_redis_cluster(masters, &cfg.log_dir).await?,
        };
        let (redis, redis_ports): (Vec<ChildGuard>, Vec<u16>) = redis.into_iter().unzip();

        let ports = free_ports(cfg.nodes)?;
        let mut nodes = Vec::with_capacity(cfg.nodes);
        let mut addrs = Vec::with_capacity(cfg.nodes);
        for (i, &port) in (1..=cfg.nodes).zip(&ports) {
            let node_id = format!("n{i}");
            let mut cmd = match &target.launch {
                Launch::Exec(path) => Command::new(path),
                Launch::Shell(line) => {
                    let mut c = Command::new("sh");
                    c.arg("-c").arg(format!("exec {line}"));
                    c
                }
            };
            cmd.env("PORT", port.to_string())
                .env("NODE_ID", &node_id)
                .env("CHANNEL_PREFIX", &cfg.channel_prefix)
                .env("SHARD_COUNT", cfg.shard_count.to_string())
                .envs(redis_env.iter().map(|(k, v)| (k, v)))
                .envs(target.env.iter().map(|(k, v)| (k, v)));
            if std::env::var_os("RUST_LOG").is_none() {
                // A log line per message would benchmark the logger; warnings still show.
                cmd.env("RUST_LOG", "warn");
            }
            if let Some(n) = cfg.worker_threads {
                // Opt-in (`--worker-threads N`): a user runs a node with its default runtime
                // (tokio: one worker per core), so that is what the bench measures unless told
                // otherwise. Node.js ignores it.
                cmd.env("TOKIO_WORKER_THREADS", n.to_string());
            }
            let log = cfg.log_dir.join(format!("{}-{node_id}.log", target.name));
            nodes.push(ChildGuard::spawn(
                &format!("{} node {node_id}", target.name),
                cmd,
                &log,
            )?);
            addrs.push(SocketAddr::from(([127, 0, 0, 1], port)));
        }
        for (node, addr) in nodes.iter_mut().zip(&addrs) {
            wait_healthy(*addr, node).await?;
        }
        // The process tree is stable once the nodes are up (a shell target has exec'ed).
        let mut node_pids = Vec::new();
        for node in &nodes {
            node_pids.push(node.pid());
            node_pids.extend(descendants(node.pid()));
        }
        Ok(Self {
            nodes,
            redis,
            redis_ports,
            addrs,
            node_pids,
        })
    }

    /// `Err` naming the first node (or Redis) that has exited.
    pub(crate) fn check_alive(&mut self) -> Result<()> {
        for n in self.nodes.iter_mut().chain(&mut self.redis) {
            n.check_alive()?;
        }
        Ok(())
    }

    /// Kills node `i` with SIGKILL (a crash: no shutdown, no goodbye to Redis) and reaps it.
    pub(crate) fn kill_node(&mut self, i: usize) -> Result<()> {
        let node = self.nodes.get_mut(i).ctx(|| format!("no node {i}"))?;
        node.child.kill().ctx(|| format!("kill -9 {}", node.name))?;
        let _ = node.child.wait();
        Ok(())
    }

    /// Sum of VmRSS of the node processes, in KiB.
    pub(crate) fn nodes_rss_kib(&self) -> u64 {
        self.rss_probe().rss_kib()
    }

    /// A detached reader of the nodes' RSS (for sampling while the cluster is borrowed).
    pub(crate) fn rss_probe(&self) -> RssProbe {
        RssProbe {
            pids: self.node_pids.clone(),
        }
    }

    pub(crate) fn cpu_sample(&self) -> CpuSample {
        CpuSample {
            at: Instant::now(),
            nodes: self
                .node_pids
                .iter()
                .map(|p| cpu_ticks(*p).unwrap_or(0))
                .sum(),
            redis: self
                .redis
                .iter()
                .map(|r| cpu_ticks(r.pid()).unwrap_or(0))
                .sum(),
            own: cpu_ticks_self().unwrap_or(0),
            host: host_ticks().unwrap_or_default(),
        }
    }
}

/// Reads the summed VmRSS of a fixed set of processes.
#[derive(Debug, Clone)]
pub(crate) struct RssProbe {
    pids: Vec<u32>,
}

impl RssProbe {
    /// Sum of VmRSS in KiB (a process that has gone counts as 0).
    pub(crate) fn rss_kib(&self) -> u64 {
        self.pids.iter().map(|p| rss_kib(*p).unwrap_or(0)).sum()
    }
}

/// A redis-server on `port` without persistence (a benchmark must not spend time on fsync or
/// RDB snapshots).
fn redis_command(port: u16) -> Command {
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"]);
    cmd
}

/// Starts `masters` cluster-enabled redis-servers, joins them with `redis-cli --cluster
/// create` and waits for `cluster_state:ok` on each. Returns the processes with their ports
/// and the nodes' environment (`REDIS_CLUSTER`: every master's URL, comma-separated).
async fn start_redis_cluster(
    masters: usize,
    log_dir: &Path,
) -> Result<(Vec<(ChildGuard, u16)>, Vec<(&'static str, String)>)> {
    // A cluster node also listens on port + 10000 (the cluster bus).
    let ports: Vec<u16> = free_ports(masters * 4)?
        .into_iter()
        .filter(|p| *p < 55_000)
        .take(masters)
        .collect();
    if ports.len() < masters {
        bail!("no {masters} free ports below 55000 for a Redis Cluster");
    }
    let mut redis = Vec::with_capacity(masters);
    for &port in &ports {
        let dir = log_dir.join(format!("cluster-{port}"));
        // A nodes.conf left by an earlier run on the same port would make this node remember
        // that cluster, and `--cluster create` refuse it.
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let mut cmd = redis_command(port);
        cmd.args([
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
        ])
        .arg("--dir")
        .arg(&dir);
        let log = log_dir.join(format!("redis-{port}.log"));
        let mut guard = ChildGuard::spawn(&format!("redis-server :{port}"), cmd, &log)?;
        wait_redis(port, &mut guard).await?;
        redis.push((guard, port));
    }
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let out = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .ctx(|| "running redis-cli --cluster create".to_string())?;
    if !out.status.success() {
        bail!(
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for &port in &ports {
        loop {
            let info = Command::new("redis-cli")
                .args(["-p", &port.to_string(), "CLUSTER", "INFO"])
                .output()
                .ctx(|| "running redis-cli CLUSTER INFO".to_string())?;
            if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                break;
            }
            if Instant::now() > deadline {
                bail!("the Redis Cluster on {addrs:?} was not ok within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let urls: Vec<String> = addrs.iter().map(|a| format!("redis://{a}")).collect();
    Ok((redis, vec![("REDIS_CLUSTER", urls.join(","))]))
}

async fn wait_redis(port: u16, redis: &mut ChildGuard) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        redis.check_alive()?;
        if let Ok(Ok(true)) =
            tokio::time::timeout(Duration::from_millis(500), redis_ping(port)).await
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("redis-server on port {port} did not answer PING within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn redis_ping(port: u16) -> std::io::Result<bool> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"*1\r\n$4\r\nPING\r\n").await?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).await?;
    Ok(buf[..n].starts_with(b"+PONG"))
}

/// One command to the redis-server on `port` over a fresh connection; the reply's bytes (a
/// status, an error, an integer or a bulk string: no arrays).
pub(crate) async fn redis_call(port: u16, args: &[&[u8]]) -> Result<Vec<u8>> {
    let mut req = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        req.extend_from_slice(a);
        req.extend_from_slice(b"\r\n");
    }
    let call = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(&req).await?;
        let mut out = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(out);
            }
            out.extend_from_slice(&buf[..n]);
            let Some(eol) = out.windows(2).position(|w| w == b"\r\n") else {
                continue;
            };
            if out[0] != b'$' {
                return Ok(out);
            }
            let len: i64 = std::str::from_utf8(&out[1..eol])
                .ok()
                .and_then(|l| l.parse().ok())
                .unwrap_or(-1);
            if len < 0 || out.len() >= eol + 2 + len as usize + 2 {
                return Ok(out);
            }
        }
    };
    let reply = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .ctx(|| format!("redis on port {port} did not answer in time"))?
        .ctx(|| format!("talking to redis on port {port}"))?;
    if reply.first() == Some(&b'-') {
        bail!("redis: {}", String::from_utf8_lossy(&reply));
    }
    Ok(reply)
}

/// CPU seconds Redis has used (`INFO cpu`: `used_cpu_sys` + `used_cpu_user`, every thread of
/// the server), as Redis itself counts them.
pub(crate) async fn redis_cpu_secs(port: u16) -> Result<f64> {
    let info = redis_call(port, &[b"INFO", b"cpu"]).await?;
    let text = String::from_utf8_lossy(&info);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    match (field("used_cpu_sys"), field("used_cpu_user")) {
        (Some(sys), Some(user)) => Ok(sys + user),
        _ => bail!("no used_cpu_sys/used_cpu_user in INFO cpu of port {port}"),
    }
}

async fn wait_healthy(addr: SocketAddr, node: &mut ChildGuard) -> Result<()> {
    let limit = Duration::from_secs(30);
    let deadline = Instant::now() + limit;
    loop {
        node.check_alive()?;
        if let Ok(Ok(200)) = tokio::time::timeout(Duration::from_secs(1), http_get(addr)).await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} at {addr} did not answer GET /healthz with 200 within {limit:?}; last lines \
                 of {}:\n{}",
                node.name,
                node.log.display(),
                log_tail(&node.log)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET path` of a node, as JSON (e.g. the chat example's `/stats`).
pub(crate) async fn http_get_json(addr: SocketAddr, path: &str) -> Result<serde_json::Value> {
    let fetch = async {
        let mut s = TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .ctx(|| format!("GET {path} of {addr} timed out"))?
        .ctx(|| format!("GET {path} of {addr}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ctx(|| format!("GET {path} of {addr}: no header end"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "GET {path} of {addr}: {}",
            head.lines().next().unwrap_or("")
        );
    }
    // A chunked body (axum's Json sets a length, but be lenient): the JSON object is between
    // the first `{` and the last `}`.
    let json = match (body.find('{'), body.rfind('}')) {
        (Some(a), Some(b)) if a < b => &body[a..=b],
        _ => body,
    };
    serde_json::from_str(json).ctx(|| format!("GET {path} of {addr}: body is not JSON"))
}

/// Status code of `GET /healthz`.
async fn http_get(addr: SocketAddr) -> std::io::Result<u16> {
    let mut s = TcpStream::connect(addr).await?;
    let req = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = [0u8; 256];
    let mut n = 0;
    // The status line is in the first few bytes; stop once we have it.
    while n < 12 {
        let m = s.read(&mut buf[n..]).await?;
        if m == 0 {
            break;
        }
        n += m;
    }
    let code = std::str::from_utf8(&buf[..n])
        .ok()
        .and_then(|t| t.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok(code)
}

/// CPU counters at one instant, in clock ticks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuSample {
    at: Instant,
    nodes: u64,
    redis: u64,
    own: u64,
    host: HostTicks,
}

/// CPU use between two samples.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CpuUsage {
    pub(crate) wall_secs: f64,
    /// CPU seconds of the node processes.
    pub(crate) nodes_secs: f64,
    /// CPU seconds of the load generator (this process: pacer, clients, orchestration).
    pub(crate) loadgen_secs: f64,
    /// CPU seconds of Redis (every master of a cluster).
    pub(crate) redis_secs: f64,
    /// Average number of cores busy in each group (1.0 = one core fully used).
    pub(crate) nodes_cores: f64,
    pub(crate) redis_cores: f64,
    pub(crate) loadgen_cores: f64,
    /// Whole machine, all processes (so other work on a shared machine shows up too).
    pub(crate) host_cores: f64,
}

impl CpuSample {
    pub(crate) fn until(&self, later: &CpuSample) -> CpuUsage {
        let tck = clk_tck();
        let wall = later.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let secs = |a: u64, b: u64| b.saturating_sub(a) as f64 / tck;
        let nodes_secs = secs(self.nodes, later.nodes);
        let loadgen_secs = secs(self.own, later.own);
        let redis_secs = secs(self.redis, later.redis);
        let host_total = secs(self.host.total, later.host.total);
        let host_idle = secs(self.host.idle, later.host.idle);
        CpuUsage {
            wall_secs: wall,
            nodes_secs,
            nodes_cores: nodes_secs / wall,
            redis_secs,
            redis_cores: redis_secs / wall,
            loadgen_secs,
            loadgen_cores: loadgen_secs / wall,
            // /proc/stat counts ticks of every core; scale to "cores busy".
            host_cores: (host_total - host_idle) / wall,
        }
    }
}

/// Cores the whole machine keeps busy over `window` (all processes): other work on a shared
/// machine, measured before the bench starts anything.
pub(crate) async fn host_busy_cores(window: Duration) -> f64 {
    let (t0, before) = (Instant::now(), host_ticks().unwrap_or_default());
    tokio::time::sleep(window).await;
    let after = host_ticks().unwrap_or_default();
    let wall = t0.elapsed().as_secs_f64().max(1e-9);
    let busy = after.total.saturating_sub(before.total) as f64
        - after.idle.saturating_sub(before.idle) as f64;
    busy / clk_tck() / wall
}

/// `getconf CLK_TCK` (the unit of /proc/PID/stat times), asked once; 100 if getconf fails.
fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|v| *v > 0.0)
            .unwrap_or(100.0)
    })
}

/// Fields of /proc/PID/stat after the `(comm)` field, which may itself contain spaces.
fn stat_fields(path: &str) -> std::io::Result<Vec<u64>> {
    let text = fs::read_to_string(path)?;
    let rest = text.rsplit_once(')').map_or("", |(_, r)| r);
    // Field 3 (state) is a letter; parse it as 0 so that indices stay aligned.
    Ok(rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect())
}

/// utime + stime (fields 14 and 15) of a process, all threads included.
fn cpu_ticks_of(path: &str) -> std::io::Result<u64> {
    let f = stat_fields(path)?;
    // After ')' the first field is field 3, so field N is at index N - 3.
    Ok(f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0))
}

fn cpu_ticks(pid: u32) -> std::io::Result<u64> {
    cpu_ticks_of(&format!("/proc/{pid}/stat"))
}

fn cpu_ticks_self() -> std::io::Result<u64> {
    cpu_ticks_of("/proc/self/stat")
}

fn rss_kib(pid: u32) -> std::io::Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

#[derive(Debug, Clone, Copy, Default)]
struct HostTicks {
    total: u64,
    idle: u64,
}

/// Aggregate line of /proc/stat: every core's user, nice, system, idle, iowait, ...
fn host_ticks() -> std::io::Result<HostTicks> {
    let mut text = String::new();
    fs::File::open("/proc/stat")?.read_to_string(&mut text)?;
    let line = text.lines().next().unwrap_or("");
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // guest and guest_nice (fields 9, 10) are already included in user and nice.
    let total = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok(HostTicks { total, idle })
}

/// Every process below `root` in the process tree.
fn descendants(root: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Ok(f) = stat_fields(&format!("/proc/{pid}/stat")) {
                // Field 4 is the parent pid.
                if let Some(ppid) = f.get(1) {
                    parent_of.push((pid, *ppid as u32));
                }
            }
        }
    }
    let mut found = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (child, _) in parent_of.iter().filter(|(_, pp)| *pp == p) {
            found.push(*child);
            frontier.push(*child);
        }
    }
    found
}

/// Starts this bench's own binary as a load-generator child (`args`: its flag first), with
/// piped stdin and stdout for the parent's commands and the child's answers, and stderr to
/// `log`. Killed when dropped.
pub(crate) fn spawn_load_generator(
    args: &[String],
    log: &Path,
    name: &str,
) -> Result<tokio::process::Child> {
    let exe = std::env::current_exe().ctx(|| "finding the bench's own binary".to_string())?;
    let err = fs::File::create(log).ctx(|| format!("creating {}", log.display()))?;
    tokio::process::Command::new(&exe)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .ctx(|| format!("starting {name}"))
}

/// Soft limit of open files of this process (from /proc/self/limits).
pub(crate) fn open_files_limit() -> Option<u64> {
    let text = fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Number of file descriptors this process has open right now.
pub(crate) fn open_files() -> u64 {
    fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
}

/// Builds the `chat` example in release mode and returns the binary's path.
pub(crate) fn build_chat(manifest_dir: &Path, target_dir: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!(
        "building the default target: cargo build --release --example chat --features cluster"
    );
    let status = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "--example",
            "chat",
            "--features",
            "cluster",
        ])
        .current_dir(manifest_dir)
        .status()
        .ctx(|| "running cargo build --release --example chat --features cluster".to_string())?;
    let bin = target_dir.join("release").join("examples").join("chat");
    if !status.success() {
        bail!(
            "cargo build --release --example chat --features cluster failed ({status}); run with \
             --no-default-target (and e.g. --seed) to benchmark other targets only"
        );
    }
    if !bin.is_file() {
        bail!(
            "built the chat example but {} does not exist",
            bin.display()
        );
    }
    Ok(bin)
}

/// Copies the seed peer to `target/seed-node`, runs `npm ci` if needed, returns its target.
pub(crate) fn prepare_seed(seed_dir: &Path, target_dir: &Path) -> Result<Target> {
    let dest = target_dir.join("seed-node");
    let lock_before = fs::read(dest.join("package-lock.json")).ok();
    copy_tree(seed_dir, &dest)
        .ctx(|| format!("copying {} to {}", seed_dir.display(), dest.display()))?;
    let lock_after = fs::read(dest.join("package-lock.json")).ok();
    if !dest.join("node_modules").is_dir() || lock_before != lock_after {
        eprintln!("running npm ci in {}", dest.display());
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dest)
            .status()
            .ctx(|| "running npm ci (is npm installed?)".to_string())?;
        if !status.success() {
            bail!("npm ci in {} failed ({status})", dest.display());
        }
    }
    let server = dest.join("server.js");
    Ok(Target {
        name: "seed".to_string(),
        launch: Launch::Shell(format!("node {}", shell_quote(&server.to_string_lossy()))),
        env: Vec::new(),
        proto: Proto::Ws,
    })
}

/// Copies the socketioxide peer to `target/socketioxide-peer`, builds it there with
/// `cargo build --release` (its own `target/` inside that folder, so later runs reuse the
/// build) and returns its target.
pub(crate) fn prepare_socketioxide(src_dir: &Path, target_dir: &Path) -> Result<Target> {
    let dest = target_dir.join("socketioxide-peer");
    copy_tree(src_dir, &dest)
        .ctx(|| format!("copying {} to {}", src_dir.display(), dest.display()))?;
    let peer_target = dest.join("target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!(
        "building the socketioxide peer: cargo build --release in {} (about 4 minutes on 2 \
         cores the first time)",
        dest.display()
    );
    let status = Command::new(&cargo)
        .args(["build", "--release"])
        .current_dir(&dest)
        // Its own target dir, whatever the bench's environment says.
        .env("CARGO_TARGET_DIR", &peer_target)
        .status()
        .ctx(|| format!("running cargo build --release in {}", dest.display()))?;
    if !status.success() {
        bail!(
            "cargo build --release of the socketioxide peer in {} failed ({status}); pass \
             --socketioxide-bin PATH to use a binary built elsewhere",
            dest.display()
        );
    }
    socketioxide_target(&peer_target.join("release").join("socketioxide-peer"))
}

/// The socketioxide peer's target from its binary.
pub(crate) fn socketioxide_target(bin: &Path) -> Result<Target> {
    if !bin.is_file() {
        bail!(
            "the socketioxide peer binary {} does not exist",
            bin.display()
        );
    }
    Ok(Target {
        name: "socketioxide".to_string(),
        launch: Launch::Exec(bin.to_path_buf()),
        env: Vec::new(),
        proto: Proto::SocketIo,
    })
}

/// Recursive copy that leaves `node_modules` and `target` alone (they are built, not copied)
/// and does not rewrite a file whose content is unchanged (a fresh mtime would make cargo
/// rebuild the copy on every run).
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == "node_modules" || name == "target" {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        if entry.file_type()?.is_dir() {
            copy_tree(&src, &dst)?;
        } else {
            if fs::read(&dst).is_ok_and(|old| fs::read(&src).is_ok_and(|new| new == old)) {
                continue;
            }
            fs::copy(&src, &dst)?;
            // The source is read-only; the copy must stay writable for the next copy.
            let mut perm = fs::metadata(&dst)?.permissions();
            perm.set_mode(perm.mode() | 0o200);
            fs::set_permissions(&dst, perm)?;
        }
    }
    Ok(())
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
