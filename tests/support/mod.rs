//! Test support: throwaway `redis-server` processes, in-process nodes and WebSocket clients.
//!
//! Every test starts its own Redis on a free port (never the machine's 6379), so it may stop,
//! restart or starve it. Waiting is always for a condition with a deadline, never a bare sleep.

#![allow(dead_code, unreachable_pub)] // each test binary uses a different part of this module

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Generous deadline for anything that should happen "soon" (CI machines are slow and shared).
pub const SOON: Duration = Duration::from_secs(10);

/// Waits until `cond` returns true, polling every 20 ms, or panics with `what` after `SOON`.
pub async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + SOON;
    loop {
        if cond().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await; // deadline: polling interval
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A `redis-server` child process on a free port, killed on drop.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    /// Extra `redis-server` arguments, after the defaults (so they override them).
    args: Vec<String>,
    /// Extra `redis-cli` arguments for every [`cli`](RedisServer::cli) call (auth, TLS).
    cli_args: Vec<String>,
}

impl RedisServer {
    /// Starts a server and waits until it answers PING.
    pub fn start() -> Self {
        Self::start_with_cli(&[], &[])
    }

    /// Starts a server with extra `redis-server` arguments (e.g. `--requirepass pw`), given
    /// after the defaults so they override them; `{port}` in an argument stands for the
    /// server's port (`--port 0 --tls-port {port}` serves TLS only on it).
    pub fn start_with(args: &[&str]) -> Self {
        Self::start_with_cli(args, &[])
    }

    /// Like [`start_with`](RedisServer::start_with); `cli_args` are given to every `redis-cli`
    /// call, the readiness PING included: `--user alice --pass pw`, `-a pw`,
    /// `--tls --cacert ca.pem`. `--no-auth-warning` is added.
    pub fn start_with_cli(args: &[&str], cli_args: &[&str]) -> Self {
        let own = |v: &[&str]| v.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
        let mut cli_args = own(cli_args);
        if !cli_args.is_empty() {
            cli_args.push("--no-auth-warning".to_owned());
        }
        for _ in 0..5 {
            let mut server = Self {
                port: free_port(),
                child: None,
                args: own(args),
                cli_args: cli_args.clone(),
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("could not start redis-server (is it installed? `apt-get install redis-server`)");
    }

    fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(
                self.args
                    .iter()
                    .map(|a| a.replace("{port}", &self.port.to_string())),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (`apt-get install redis-server`)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + SOON;
        while std::time::Instant::now() < deadline {
            if self.cli(&["PING"]).trim() == "PONG" {
                return true;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                // Exited: most likely the port was taken in the meantime.
                self.child = None;
                return false;
            }
            std::thread::sleep(Duration::from_millis(20)); // deadline: polling interval
        }
        false
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs `redis-cli` against this server and returns its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(&self.cli_args)
            .args(args)
            .output()
            .expect("redis-cli on PATH");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `PUBSUB NUMSUB channel`.
    pub fn numsub(&self, channel: &str) -> usize {
        let out = self.cli(&["PUBSUB", "NUMSUB", channel]);
        out.lines()
            .nth(1)
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// `PUBSUB CHANNELS pattern`, sorted.
    pub fn channels(&self, pattern: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .cli(&["PUBSUB", "CHANNELS", pattern])
            .lines()
            .map(str::to_owned)
            .filter(|l| !l.is_empty())
            .collect();
        v.sort();
        v
    }

    /// Whether the process is running (not stopped by [`stop`](RedisServer::stop)).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("running")
    }

    /// Sends a signal (`STOP`, `CONT`, ...) to the server with `kill -<sig>`.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig}");
    }

    /// How many of the server's clients are logged in as `user` (the `CLIENT LIST` call itself
    /// is not counted).
    pub fn clients_of(&self, user: &str) -> usize {
        let needle = format!(" user={user} ");
        self.cli(&["CLIENT", "LIST"])
            .lines()
            .filter(|l| l.contains(&needle) && !l.contains(" cmd=client|list "))
            .count()
    }

    /// Kills the server (like a crash).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        assert!(self.spawn(), "redis-server restarted on port {}", self.port);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl RedisServer {
    /// Clients an application made: every client but Sentinel's own (named `sentinel-...`),
    /// replication links and this `CLIENT LIST` call.
    pub fn app_clients(&self) -> usize {
        self.cli(&["CLIENT", "LIST"])
            .lines()
            .filter(|l| l.starts_with("id="))
            .filter(|l| !l.contains(" name=sentinel-") && !l.contains(" cmd=client|list "))
            .filter(|l| {
                let flags = l
                    .split(' ')
                    .find_map(|f| f.strip_prefix("flags="))
                    .unwrap_or("");
                !flags.contains('S') && !flags.contains('M')
            })
            .count()
    }

    /// Starts `redis-cli MONITOR` on this server: every command it runs from now on, until
    /// [`Monitor::finish`].
    pub fn monitor(&self) -> Monitor {
        let child = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(&self.cli_args)
            .arg("MONITOR")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-cli on PATH");
        Monitor(child)
    }

    /// `role` of `INFO replication`: `master` or `slave`.
    pub fn role(&self) -> String {
        self.cli(&["INFO", "replication"])
            .lines()
            .find_map(|l| l.strip_prefix("role:"))
            .unwrap_or("")
            .trim()
            .to_owned()
    }
}

/// A running `redis-cli MONITOR` ([`RedisServer::monitor`]).
pub struct Monitor(Child);

impl Monitor {
    /// Stops it and returns the commands it saw, one a line (`<time> [<db> <addr>] "CMD" ...`).
    pub fn finish(mut self) -> String {
        let _ = self.0.kill();
        let out = self
            .0
            .wait_with_output()
            .expect("redis-cli MONITOR's output");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The master name every [`SentinelGroup`] monitors.
pub const SENTINEL_MASTER: &str = "m";

/// A `redis-server --sentinel` process on a free port monitoring [`SENTINEL_MASTER`], killed
/// on drop. Its configuration file (which Sentinel rewrites) is removed with it.
pub struct SentinelProcess {
    port: u16,
    child: Option<Child>,
    conf: PathBuf,
    /// Extra `redis-cli` arguments (the sentinel's password).
    cli_args: Vec<String>,
}

impl SentinelProcess {
    /// Starts a sentinel monitoring the master on `master_port` with quorum 2, which it
    /// judges down after `down_after_ms` without an answer, with the credentials and TLS of
    /// `options`.
    pub fn start(master_port: u16, down_after_ms: u64, options: &SentinelOptions) -> Self {
        let auth = options.auth.as_ref();
        for _ in 0..5 {
            let port = free_port();
            let conf = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("sentinel-{port}.conf"));
            let listen = match &options.tls {
                None => format!("port {port}\n"),
                // TLS only, to clients, to the other sentinels and to the monitored servers.
                Some(tls) => format!(
                    "port 0\ntls-port {port}\ntls-cert-file {}\ntls-key-file {}\n\
                     tls-ca-cert-file {}\ntls-auth-clients no\ntls-replication yes\n",
                    tls.cert, tls.key, tls.ca
                ),
            };
            let text = format!(
                "{listen}bind 127.0.0.1\n\
                 sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {SENTINEL_MASTER} {down_after_ms}\n\
                 sentinel failover-timeout {SENTINEL_MASTER} 2000\n"
            );
            let text = match auth {
                None => text,
                Some(a) => format!(
                    "{text}sentinel auth-user {SENTINEL_MASTER} {}\n\
                     sentinel auth-pass {SENTINEL_MASTER} {}\nrequirepass {}\n",
                    a.user, a.password, a.sentinel_password
                ),
            };
            std::fs::write(&conf, text).expect("write the sentinel's configuration");
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server on PATH (`apt-get install redis-server`)");
            let mut sentinel = Self {
                port,
                child: Some(child),
                conf,
                cli_args: options.sentinel_cli_args(),
            };
            let deadline = std::time::Instant::now() + SOON;
            while std::time::Instant::now() < deadline {
                if sentinel.cli(&["PING"]).trim() == "PONG" {
                    return sentinel;
                }
                if let Some(child) = sentinel.child.as_mut()
                    && let Ok(Some(_)) = child.try_wait()
                {
                    break; // most likely the port was taken in the meantime
                }
                std::thread::sleep(Duration::from_millis(20)); // deadline: polling interval
            }
            sentinel.stop();
        }
        panic!("could not start redis-server --sentinel");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs `redis-cli` against this sentinel and returns its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(&self.cli_args)
            .args(args)
            .output()
            .expect("redis-cli on PATH");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The port of the master this sentinel names now.
    pub fn named_master(&self) -> Option<u16> {
        let out = self.cli(&["SENTINEL", "get-master-addr-by-name", SENTINEL_MASTER]);
        out.lines().nth(1).and_then(|p| p.trim().parse().ok())
    }

    /// One field of `SENTINEL MASTER`, e.g. `num-slaves`.
    pub fn master_field(&self, field: &str) -> String {
        let out = self.cli(&["SENTINEL", "MASTER", SENTINEL_MASTER]);
        let lines: Vec<&str> = out.lines().collect();
        lines
            .chunks(2)
            .find(|kv| kv[0] == field)
            .and_then(|kv| kv.get(1))
            .map_or(String::new(), |v| v.to_string())
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for SentinelProcess {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.conf);
    }
}

/// Credentials of a [`SentinelGroup`]: an ACL user (the only one) on the master and the
/// replica, and a password on the sentinels.
pub struct SentinelAuth {
    pub user: &'static str,
    pub password: &'static str,
    pub sentinel_password: &'static str,
}

/// A certificate, its key and the CA that signed it (paths): every process of a
/// [`SentinelGroup`] then serves TLS only, and talks TLS to the others.
pub struct SentinelTls {
    pub cert: String,
    pub key: String,
    pub ca: String,
}

/// How a [`SentinelGroup`] is secured; the default is not at all.
#[derive(Default)]
pub struct SentinelOptions {
    pub auth: Option<SentinelAuth>,
    pub tls: Option<SentinelTls>,
}

impl SentinelOptions {
    /// `redis-cli` arguments for the master and the replica.
    fn server_cli_args(&self) -> Vec<String> {
        let mut cli = Vec::new();
        if let Some(tls) = &self.tls {
            cli.extend(["--tls".to_owned(), "--cacert".to_owned(), tls.ca.clone()]);
        }
        if let Some(a) = &self.auth {
            cli.extend(["--user", a.user, "--pass", a.password].map(str::to_owned));
        }
        cli
    }

    /// `redis-cli` arguments for a sentinel.
    fn sentinel_cli_args(&self) -> Vec<String> {
        let mut cli = Vec::new();
        if let Some(tls) = &self.tls {
            cli.extend(["--tls".to_owned(), "--cacert".to_owned(), tls.ca.clone()]);
        }
        if let Some(a) = &self.auth {
            cli.extend(["-a", a.sentinel_password, "--no-auth-warning"].map(str::to_owned));
        }
        cli
    }
}

/// A master, one replica of it and three sentinels monitoring them as [`SENTINEL_MASTER`]
/// (quorum 2), all on free ports and killed on drop: what a Sentinel deployment runs.
pub struct SentinelGroup {
    pub master: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<SentinelProcess>,
}

impl SentinelGroup {
    /// Starts the five processes and waits until the replica is in sync and every sentinel
    /// knows the replica and the two other sentinels (a failover needs their votes).
    pub fn start(down_after_ms: u64) -> Self {
        Self::start_with(down_after_ms, &SentinelOptions::default())
    }

    /// [`start`](SentinelGroup::start), with the credentials and TLS of `options`.
    pub fn start_with(down_after_ms: u64, options: &SentinelOptions) -> Self {
        // A replica writes what it syncs to `dir/dbfilename` unless it loads it straight from
        // the socket: neither in the working tree, nor shared by concurrent tests.
        let mut args: Vec<String> = [
            "--dir",
            env!("CARGO_TARGET_TMPDIR"),
            "--dbfilename",
            "sentinel-group-{port}.rdb",
            "--repl-diskless-load",
            "on-empty-db",
        ]
        .map(str::to_owned)
        .to_vec();
        if let Some(tls) = &options.tls {
            let files = ["--tls-cert-file", &tls.cert, "--tls-key-file", &tls.key];
            args.extend(["--port", "0", "--tls-port", "{port}"].map(str::to_owned));
            args.extend(files.map(str::to_owned));
            args.extend(["--tls-ca-cert-file", &tls.ca].map(str::to_owned));
            args.extend(
                ["--tls-auth-clients", "no", "--tls-replication", "yes"].map(str::to_owned),
            );
        }
        let cli = options.server_cli_args();
        if let Some(a) = &options.auth {
            let pass = format!(">{}", a.password);
            let acl = ["--user", a.user, "on", &pass, "~*", "&*", "+@all"];
            let replication = ["--masteruser", a.user, "--masterauth", a.password];
            args.extend(acl.into_iter().map(str::to_owned));
            // So that nothing works without logging in as the user.
            args.extend(["--user", "default", "off"].map(str::to_owned));
            args.extend(replication.into_iter().map(str::to_owned));
        }
        fn borrow(v: &[String]) -> Vec<&str> {
            v.iter().map(String::as_str).collect()
        }
        let master = RedisServer::start_with_cli(&borrow(&args), &borrow(&cli));
        let mut replica_args = args.clone();
        replica_args.extend(["--replicaof".to_owned(), "127.0.0.1".to_owned()]);
        replica_args.push(master.port().to_string());
        let replica = RedisServer::start_with_cli(&borrow(&replica_args), &borrow(&cli));
        let sentinels = (0..3)
            .map(|_| SentinelProcess::start(master.port(), down_after_ms, options))
            .collect();
        let group = Self {
            master,
            replica,
            sentinels,
        };
        let deadline = std::time::Instant::now() + SOON * 2;
        loop {
            let synced = group
                .replica
                .cli(&["INFO", "replication"])
                .contains("master_link_status:up");
            let known = group.sentinels.iter().all(|s| {
                s.master_field("num-slaves") == "1" && s.master_field("num-other-sentinels") == "2"
            });
            if synced && known {
                return group;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the sentinels did not find the replica and each other in time"
            );
            std::thread::sleep(Duration::from_millis(50)); // deadline: polling interval
        }
    }

    /// `redis+sentinel://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/m`.
    pub fn url(&self) -> String {
        format!("redis+sentinel://{}/{SENTINEL_MASTER}", self.hosts())
    }

    /// The sentinels' addresses, `127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`.
    pub fn hosts(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port()))
            .collect();
        hosts.join(",")
    }

    /// Whether the replica has everything the master has (their replication offsets agree).
    pub fn replicated(&self) -> bool {
        let offset = |server: &RedisServer, field: &str| -> Option<u64> {
            server
                .cli(&["INFO", "replication"])
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|n| n.trim().parse().ok())
        };
        let master = offset(&self.master, "master_repl_offset:");
        master.is_some() && master == offset(&self.replica, "slave_repl_offset:")
    }

    /// Blocks until some sentinel names a master other than `old`, and returns its port.
    pub fn wait_switch(&self, old: u16) -> u16 {
        let deadline = std::time::Instant::now() + SOON * 2;
        loop {
            if let Some(new) = self
                .sentinels
                .iter()
                .find_map(|s| s.named_master().filter(|p| *p != old))
            {
                return new;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no sentinel named a new master in time"
            );
            std::thread::sleep(Duration::from_millis(10)); // deadline: polling interval
        }
    }
}

/// An axum server on 127.0.0.1:0 in this process; stops on drop.
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(app: Router) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Self {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn ws_url(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.addr, path_and_query)
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Starts one in-process node per layer, each serving `app(layer)`, and waits until every one
/// is ready (subscriber link up): the fleet of a multi-node test.
pub async fn start_nodes(
    layers: impl IntoIterator<Item = axum_fanout::FanoutLayer>,
    app: impl Fn(axum_fanout::FanoutLayer) -> Router,
) -> Vec<(TestServer, axum_fanout::RoomHandle)> {
    let mut nodes = Vec::new();
    for layer in layers {
        let handle = layer.handle();
        nodes.push((TestServer::start(app(layer)).await, handle));
    }
    for (_, handle) in &nodes {
        wait_until("node ready", || async { handle.is_ready() }).await;
    }
    nodes
}

/// Connects a WebSocket client.
pub async fn connect(url: &str) -> Ws {
    let (ws, _) = tokio::time::timeout(SOON, tokio_tungstenite::connect_async(url))
        .await
        .unwrap_or_else(|_| panic!("connect to {url} timed out"))
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    ws
}

pub async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
}

/// The next text frame, or a panic naming `what` after `SOON`.
pub async fn recv_text(ws: &mut Ws, what: &str) -> String {
    let deadline = Instant::now() + SOON;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => panic!("timed out waiting for a text frame: {what}"),
            Ok(None) => panic!("connection ended while waiting for: {what}"),
            Ok(Some(Err(e))) => panic!("error while waiting for {what}: {e}"),
            Ok(Some(Ok(Message::Text(t)))) => return t.to_string(),
            Ok(Some(Ok(Message::Close(c)))) => panic!("closed ({c:?}) while waiting for: {what}"),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// The next text frame, parsed as JSON (panics on anything else).
pub async fn recv_json(ws: &mut Ws, what: &str) -> serde_json::Value {
    let text = recv_text(ws, what).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Broadcasts `{"n":n}` to durable room `room` through `handle`, reads it on `ws` (a socket
/// of the room with `positions=1`), checks the frame carries the position Redis gave it, and
/// returns that seq.
pub async fn publish_durable_and_read(
    handle: &axum_fanout::RoomHandle,
    room: &str,
    n: u64,
    ws: &mut Ws,
) -> u64 {
    let published = handle
        .broadcast(room, serde_json::json!({ "n": n }))
        .publish()
        .await
        .expect("durable broadcast");
    let seq = published.position().expect("durable").seq();
    let frame = recv_json(ws, &format!("message {n}")).await;
    assert_eq!(
        (&frame["seq"], &frame["payload"]["n"]),
        (&serde_json::json!(seq), &serde_json::json!(n))
    );
    seq
}

/// Reads until the close frame and returns it; panics on a data frame.
pub async fn recv_close(ws: &mut Ws) -> Option<CloseFrame> {
    let deadline = Instant::now() + SOON;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => panic!("timed out waiting for a close frame"),
            Ok(None) => return None,
            Ok(Some(Err(e))) => panic!("error while waiting for close: {e}"),
            Ok(Some(Ok(Message::Close(c)))) => return c,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(Some(Ok(other))) => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// Minimal HTTP/1.1 request over a fresh TCP connection: (status, body).
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(SOON, tcp.read_to_end(&mut out))
        .await
        .expect("http response in time")
        .expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_owned())
}

/// The built `chat` example next to this test executable (`target/<profile>/examples/chat`),
/// built first when it is missing or older than its sources.
pub fn chat_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable is in target/<profile>/deps");
    let bin = profile_dir
        .join("examples")
        .join(format!("chat{}", std::env::consts::EXE_SUFFIX));
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sources = ["src", "examples/chat.rs", "examples/chat_app", "Cargo.toml"]
        .iter()
        .filter_map(|p| newest_mtime(&manifest.join(p)))
        .max();
    let fresh = match (std::fs::metadata(&bin).and_then(|m| m.modified()), sources) {
        (Ok(built), Some(sources)) => built >= sources,
        (Ok(_), None) => true,
        (Err(_), _) => false,
    };
    if !fresh {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--example", "chat"])
            .current_dir(manifest);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let out = cmd.output().expect("run cargo build --example chat");
        assert!(
            out.status.success(),
            "cargo build --example chat failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(bin.exists(), "{} exists after the build", bin.display());
    bin
}

fn newest_mtime(path: &Path) -> Option<std::time::SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| newest_mtime(&e.path()))
        .max()
}

/// A `chat` example process on `redis`, killed on drop. Its output goes to a log file in
/// `CARGO_TARGET_TMPDIR`, kept when the test fails.
pub struct ChatProcess {
    child: Child,
    pub addr: SocketAddr,
    pub node_id: String,
    log: PathBuf,
}

impl ChatProcess {
    /// Starts `bin` as node `node_id` with the contract's environment (no `SHARD_COUNT` or
    /// `CHANNEL_PREFIX` inherited) plus `env`, and waits until its `/healthz` answers 200.
    pub async fn start(
        bin: &Path,
        redis: &RedisServer,
        node_id: &str,
        env: &[(&str, &str)],
    ) -> Self {
        for _ in 0..3 {
            let port = free_port();
            let log =
                Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("chat-{node_id}-{port}.log"));
            let out = std::fs::File::create(&log).expect("create the log file");
            let err = out.try_clone().expect("clone the log file");
            let child = Command::new(bin)
                .env("PORT", port.to_string())
                .env("REDIS_URL", redis.url())
                .env("NODE_ID", node_id)
                .env("RUST_LOG", "info")
                .env_remove("SHARD_COUNT")
                .env_remove("CHANNEL_PREFIX")
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .expect("spawn the chat example");
            let mut p = Self {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                node_id: node_id.to_owned(),
                log,
            };
            if p.wait_healthy().await {
                return p;
            }
            // Exited: most likely the port was taken in the meantime; try another.
        }
        panic!("the chat example did not start on any of 3 ports");
    }

    /// `true` once `/healthz` is 200; `false` if the process exited first.
    async fn wait_healthy(&mut self) -> bool {
        let deadline = Instant::now() + SOON;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                assert!(
                    log.contains("cannot listen"),
                    "chat {} exited ({status}):\n{log}",
                    self.node_id
                );
                return false;
            }
            if TcpStream::connect(self.addr).await.is_ok()
                && http(self.addr, "GET", "/healthz", "").await.0 == 200
            {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "chat {} not healthy in time; log {}:\n{}",
                self.node_id,
                self.log.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await; // deadline: polling interval
        }
    }

    /// `ws://ADDR/ws?room=ROOM`.
    pub fn ws_url(&self, room: &str) -> String {
        format!("ws://{}/ws?room={room}", self.addr)
    }

    /// Sends a signal (`STOP`, `CONT`, `TERM`, ...) to the process with `kill -<sig>`.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig}");
    }

    /// SIGTERM: a graceful shutdown (the node drains its sockets). Returns once the process
    /// exited, or panics after `SOON` plus `extra`.
    pub async fn terminate(&mut self, extra: Duration) {
        self.signal("TERM");
        let deadline = Instant::now() + SOON + extra;
        while self.child.try_wait().expect("try_wait").is_none() {
            assert!(
                Instant::now() < deadline,
                "chat {} did not exit",
                self.node_id
            );
            tokio::time::sleep(Duration::from_millis(20)).await; // deadline: polling interval
        }
    }

    /// SIGKILL: no shutdown, nothing said to Redis. Returns once the process is reaped.
    pub fn kill(&mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reaped");
    }
}

impl Drop for ChatProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Keep the log only when the test failed.
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// Captured logs: everything logged on this thread while [`capture`](Logs::capture)'s guard
/// lives (`#[tokio::test]`'s runtime is single-threaded, so the node's tasks log here too).
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    pub fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let logs = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || logs.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The router most tests drive. `GET /ws?room=R` joins R (closing with 1011 and the error when
/// the join fails) and answers `joined`; then each client text is broadcast to R, except
/// `leave`, which leaves R and answers `left`; loss notices reach the client as
/// `missed:<room>`. `GET /healthz` is 200 when the node is ready, else 503.
pub fn room_app(layer: axum_fanout::FanoutLayer) -> Router {
    use axum::extract::Query;
    use axum::extract::ws::{Message as WsMessage, WebSocketUpgrade, close_code};
    use axum::http::StatusCode;
    use axum::response::Response;
    use axum::routing::get;
    use axum_fanout::{Event, RoomHandle};

    async fn ws(
        upgrade: WebSocketUpgrade,
        Query(q): Query<std::collections::HashMap<String, String>>,
        rooms: RoomHandle,
    ) -> Response {
        let room = q.get("room").cloned().unwrap_or_default();
        rooms.on_upgrade(upgrade, move |mut socket| async move {
            let rooms = socket.handle();
            if let Err(e) = socket.join(&room).await {
                return socket.close(close_code::ERROR, &e.to_string());
            }
            let _ = socket.send("joined");
            while let Some(Ok(event)) = socket.recv_event().await {
                match event {
                    Event::Missed(m) => {
                        let _ = socket.send(format!("missed:{}", m.room()));
                    }
                    Event::Message(WsMessage::Text(t)) if t.as_str() == "leave" => {
                        socket.leave(&room);
                        let _ = socket.send("left");
                    }
                    Event::Message(WsMessage::Text(t)) => {
                        let _ = rooms.broadcast(&room, t.as_str()).await;
                    }
                    _ => {}
                }
            }
        })
    }
    async fn healthz(rooms: RoomHandle) -> StatusCode {
        if rooms.is_ready() {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
    Router::new()
        .route("/ws", get(ws))
        .route("/healthz", get(healthz))
        .layer(layer)
}

/// Serves `layer` with [`room_app`], waits until the node is ready, joins a socket to `room`,
/// and checks that a broadcast from the handle (publisher connection) and one from the client
/// (its handler broadcasts) both come back: the node's two connections work.
pub async fn assert_round_trip(
    redis: &RedisServer,
    layer: axum_fanout::FanoutLayer,
    room: &str,
) -> TestServer {
    let handle = layer.handle();
    let server = TestServer::start(room_app(layer)).await;
    wait_until("node ready", || async { handle.is_ready() }).await;
    let mut ws = connect(&server.ws_url(&format!("/ws?room={room}"))).await;
    assert_eq!(recv_text(&mut ws, "join ack").await, "joined");
    assert_eq!(redis.numsub(&format!("ws:room:{room}")), 1);
    let nodes = handle.broadcast(room, r#"{"n":1}"#).await.expect("publish");
    assert_eq!(nodes, 1);
    assert_eq!(recv_text(&mut ws, "broadcast").await, r#"{"n":1}"#);
    send_text(&mut ws, r#"{"n":2}"#).await;
    assert_eq!(recv_text(&mut ws, "echo").await, r#"{"n":2}"#);
    server
}

/// A local Redis Cluster of real `redis-server` processes (cluster mode, each on a free port,
/// its `nodes.conf` in a temporary directory removed on drop), created with
/// `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    dir: std::path::PathBuf,
}

impl RedisCluster {
    /// Starts `masters` masters with `replicas` replicas each and waits until every node
    /// reports `cluster_state:ok` and agrees on the slot map.
    pub fn start(masters: usize, replicas: usize) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "axum-fanout-cluster-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("cluster temp dir");
        let dir_arg = dir.to_string_lossy().into_owned();
        let nodes: Vec<RedisServer> = (0..masters * (1 + replicas))
            .map(|_| {
                // The cluster bus port is chosen free too: Redis's default, the port plus
                // 10,000, may be held by a socket in TIME_WAIT after a busy test run.
                let bus = free_port().to_string();
                RedisServer::start_with(&[
                    "--cluster-port",
                    &bus,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes-{port}.conf",
                    "--dir",
                    &dir_arg,
                    // Fail over one second after a master stops answering.
                    "--cluster-node-timeout",
                    "1000",
                    // Replicas sync at once (Redis waits 5 s by default to batch them), and a
                    // replica may take over however long ago it last heard its master.
                    "--repl-diskless-sync-delay",
                    "0",
                    "--cluster-replica-validity-factor",
                    "0",
                ])
            })
            .collect();
        let cluster = Self { nodes, dir };
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli on PATH");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        cluster.wait_ok();
        cluster
    }

    /// Waits until every running node says `cluster_state:ok` and lists the same masters, and
    /// every replica whose master runs has synced with it.
    pub fn wait_ok(&self) {
        let deadline = std::time::Instant::now() + SOON;
        loop {
            let live: Vec<&RedisServer> = self.nodes.iter().filter(|n| n.is_running()).collect();
            let ok = live
                .iter()
                .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"));
            let views: Vec<Vec<u16>> = live.iter().map(|n| self.masters_seen_by(n)).collect();
            // A replica counts once it has synced, or when its master is not among the live
            // masters (it died; INFO lines end in "\r\n").
            let synced = live.iter().all(|n| {
                let info = n.cli(&["INFO", "replication"]);
                !info.contains("role:slave")
                    || info.contains("master_link_status:up")
                    || !views[0]
                        .iter()
                        .any(|p| info.contains(&format!("master_port:{p}\r")))
            });
            if ok && synced && views.windows(2).all(|w| w[0] == w[1]) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "cluster not ok in time"
            );
            std::thread::sleep(Duration::from_millis(50)); // deadline: polling interval
        }
    }

    /// The ports of the masters `node` knows of that serve slots and are not failed, sorted.
    fn masters_seen_by(&self, node: &RedisServer) -> Vec<u16> {
        let mut ports: Vec<u16> = node
            .cli(&["CLUSTER", "NODES"])
            .lines()
            .filter(|l| l.contains("master") && !l.contains("fail") && l.split(' ').count() > 8)
            .filter_map(|l| {
                let addr = l.split(' ').nth(1)?;
                addr.split(['@', ':']).nth(1)?.parse().ok()
            })
            .collect();
        ports.sort_unstable();
        ports
    }

    /// Node URLs for a client: every node, replicas included.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Waits until a master other than the one on `dead_port` serves `slot` (its replica was
    /// promoted) and the cluster is ok again.
    pub fn wait_failover(&self, slot: u16, dead_port: u16) {
        let deadline = std::time::Instant::now() + SOON;
        while self
            .try_master_of_slot(slot)
            .is_none_or(|port| port == dead_port)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "no replica took over slot {slot} in time"
            );
            std::thread::sleep(Duration::from_millis(50)); // deadline: polling interval
        }
        self.wait_ok();
    }

    /// The running node that is a master serving `slot`.
    pub fn master_of_slot(&self, slot: u16) -> &RedisServer {
        let port = self
            .try_master_of_slot(slot)
            .unwrap_or_else(|| panic!("no master serves slot {slot}"));
        self.nodes
            .iter()
            .find(|n| n.port() == port)
            .expect("the master is one of ours")
    }

    /// The port of the master serving `slot` that a running node knows of and does not
    /// consider failing.
    fn try_master_of_slot(&self, slot: u16) -> Option<u16> {
        let live = self.nodes.iter().find(|n| n.is_running())?;
        live
            .cli(&["CLUSTER", "NODES"])
            .lines()
            .filter(|l| l.contains("master") && !l.contains("fail"))
            .find_map(|l| {
                let fields: Vec<&str> = l.split(' ').collect();
                let serves = fields.iter().skip(8).any(|range| {
                    let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                    matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if lo <= slot && slot <= hi)
                });
                serves.then(|| fields[1].split(['@', ':']).nth(1)?.parse().ok())?
            })
    }

    /// Moves `slot` and its keys to the master on `to_port`, as `redis-cli --cluster reshard`
    /// does: [`begin_slot_move`](RedisCluster::begin_slot_move), then
    /// [`finish_slot_move`](RedisCluster::finish_slot_move).
    pub fn migrate_slot(&self, slot: u16, to_port: u16) {
        let moving = self.begin_slot_move(slot, to_port);
        self.finish_slot_move(&moving);
    }

    /// Starts moving `slot` to the master on `to_port`: IMPORTING on the target, MIGRATING on
    /// the source, then every key of the slot MIGRATEd (a few at a time, each batch
    /// atomically). The source still owns the slot: a command for a key that moved is
    /// redirected to the target with ASK, and the source's sharded subscriptions stay.
    pub fn begin_slot_move(&self, slot: u16, to_port: u16) -> SlotMove {
        let from = self.master_of_slot(slot);
        let to = self.node(to_port);
        let id = |n: &RedisServer| n.cli(&["CLUSTER", "MYID"]).trim().to_owned();
        let moving = SlotMove {
            slot,
            from: from.port(),
            to: to_port,
            to_id: id(to),
        };
        let slot = slot.to_string();
        let ok = |out: String, what: &str| assert_eq!(out.trim(), "OK", "{what}");
        ok(
            to.cli(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &id(from)]),
            "SETSLOT IMPORTING",
        );
        ok(
            from.cli(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &moving.to_id]),
            "SETSLOT MIGRATING",
        );
        let port = to_port.to_string();
        loop {
            let keys = from.cli(&["CLUSTER", "GETKEYSINSLOT", &slot, "100"]);
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                return moving;
            }
            let mut migrate = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            migrate.extend(&keys);
            ok(from.cli(&migrate), "MIGRATE");
        }
    }

    /// Ends a move: the slot belongs to the target, told to the target, the source (which
    /// then ends the slot's sharded subscriptions) and every other node, as `redis-cli
    /// --cluster reshard` does; then waits until the cluster agrees.
    pub fn finish_slot_move(&self, moving: &SlotMove) {
        let slot = moving.slot.to_string();
        let ok = |out: String| assert_eq!(out.trim(), "OK", "CLUSTER SETSLOT NODE");
        let setslot = ["CLUSTER", "SETSLOT", &slot, "NODE", &moving.to_id];
        ok(self.node(moving.to).cli(&setslot));
        ok(self.node(moving.from).cli(&setslot));
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            if node.port() != moving.from && node.port() != moving.to {
                let _ = node.cli(&setslot);
            }
        }
        self.wait_ok();
    }

    /// The port of a replica of the master on `master_port`.
    pub fn replica_of(&self, master_port: u16) -> u16 {
        let info = self.node(master_port).cli(&["INFO", "replication"]);
        info.lines()
            .filter(|l| l.starts_with("slave"))
            .find_map(|l| {
                let port = l.split(',').find_map(|kv| kv.strip_prefix("port="))?;
                port.trim().parse().ok()
            })
            .unwrap_or_else(|| panic!("no replica of {master_port}: {info}"))
    }

    /// Whether the replica on `replica_port` has everything the master on `master_port` wrote.
    pub fn replicated(&self, master_port: u16, replica_port: u16) -> bool {
        let offset = |port: u16, field: &str| -> Option<u64> {
            let info = self.node(port).cli(&["INFO", "replication"]);
            info.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|n| n.trim().parse().ok())
        };
        let master = offset(master_port, "master_repl_offset:");
        master.is_some() && master == offset(replica_port, "slave_repl_offset:")
    }

    /// The node on `port`, to stop, restart or signal.
    pub fn node_mut(&mut self, port: u16) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|n| n.port() == port)
            .expect("one of our nodes")
    }

    /// The node on `port`.
    fn node(&self, port: u16) -> &RedisServer {
        self.nodes
            .iter()
            .find(|n| n.port() == port)
            .expect("one of our nodes")
    }

    /// The ports of the running masters.
    pub fn master_ports(&self) -> Vec<u16> {
        self.masters_seen_by(self.live())
    }

    /// A running master other than the one on `port`.
    pub fn other_master(&self, port: u16) -> u16 {
        self.master_ports()
            .into_iter()
            .find(|&p| p != port)
            .expect("another master")
    }

    /// Some running node, to ask about the cluster.
    fn live(&self) -> &RedisServer {
        self.nodes
            .iter()
            .find(|n| n.is_running())
            .expect("a running node")
    }

    /// `CLUSTER KEYSLOT key`, computed by the cluster itself.
    pub fn slot_of(&self, key: &str) -> u16 {
        self.live()
            .cli(&["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .expect("a slot number")
    }

    /// `PUBSUB SHARDCHANNELS pattern` of every running node: (node port, channel), sorted.
    pub fn shard_channels(&self, pattern: &str) -> Vec<(u16, String)> {
        let mut all: Vec<(u16, String)> = self
            .nodes
            .iter()
            .filter(|n| n.is_running())
            .flat_map(|n| {
                n.cli(&["PUBSUB", "SHARDCHANNELS", pattern])
                    .lines()
                    .filter(|l| !l.is_empty())
                    .map(|l| (n.port(), l.to_owned()))
                    .collect::<Vec<_>>()
            })
            .collect();
        all.sort();
        all
    }

    /// `PUBSUB SHARDNUMSUB channel`, asked of the master that owns the channel's slot.
    pub fn shard_numsub(&self, channel: &str) -> usize {
        let owner = self.master_of_slot(self.slot_of(channel));
        owner
            .cli(&["PUBSUB", "SHARDNUMSUB", channel])
            .lines()
            .nth(1)
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// `PUBSUB CHANNELS pattern` (classic pub/sub) summed over every running node.
    pub fn classic_channels(&self, pattern: &str) -> usize {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .map(|n| n.channels(pattern).len())
            .sum()
    }
}

/// A slot on its way from one master to another: see [`RedisCluster::begin_slot_move`].
pub struct SlotMove {
    slot: u16,
    from: u16,
    to: u16,
    to_id: String,
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
