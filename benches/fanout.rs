//! End-to-end fan-out benchmark: real server processes, real WebSockets, real Redis.
//!
//! # What it measures
//!
//! For every *target* (a server implementation speaking the wire contract of
//! `PROTOCOL.md` part 2, or its socket.io variant) and every *scenario*, the bench starts a
//! private `redis-server` on a free port and three server nodes (env `PORT`, `REDIS_URL`,
//! `NODE_ID` n1..n3, `CHANNEL_PREFIX`, `SHARD_COUNT`) pointing at it, waits for each node's
//! `GET /healthz` to answer 200, connects clients spread round-robin over the nodes and
//! measures. Every (scenario, target, round) gets fresh processes, so no run inherits
//! another's heap, backlog or subscriptions.
//!
//! Nodes run with their *default* runtime, as a user would run them (tokio: one worker
//! thread per core). `--worker-threads N` sets `TOKIO_WORKER_THREADS=N` for every node (Node.js
//! ignores it); a `TOKIO_WORKER_THREADS` in the bench's own environment is inherited too.
//! (Earlier versions of this bench forced one worker per node; figures taken that way are not
//! comparable with the default.)
//!
//! Targets: `chat` (this crate's `examples/chat.rs`, built in release mode; "ours" in every
//! ratio), `--socketioxide` (the socketioxide 0.18 + socketioxide-redis peer of
//! `../shared/peers/socketioxide`, spoken to as socket.io), `--seed` (the Node.js seed peer)
//! and any `--target-cmd`. They run in one process, alternated (see below).
//!
//! * `sweep`: 10 rooms x 30 clients, 256-byte messages, once with 1 publishing client per
//!   room and once with 3 (`--publishers-per-room`, default `1,3`; publishers of different
//!   rooms sit on different nodes, and a room's 3 publishers on 3 nodes). The delivery rate
//!   starts at 10k/s and grows x1.5 per 1 s step until a step loses more than 0.1 % or has
//!   p99 > 50 ms; a failing step is re-run once, because the machine is shared. Result: the
//!   highest delivery rate that held, and the server CPU per delivery at that rate. One
//!   publisher per room is the seed's pattern (one client typing into a room): the same room
//!   rate then comes from one socket, so a server that serializes a sender's messages on
//!   round trips falls behind there first.
//! * `latency`: the same rooms at a fixed 75,000 deliveries/s (2,500 msg/s in all, 250 per
//!   room) for 5 s, again once per publishers-per-room value: p50/p99/p99.9/max and CPU per
//!   delivery.
//! * `idle`: 10,000 connections in 100 rooms that only complete the handshake: growth of the
//!   nodes' summed VmRSS divided by the connection count.
//! * `slow`: 3 rooms x 30 clients where one client per room (each on another node) completes
//!   the handshake with a 4 KiB SO_RCVBUF and never reads, while 20 MiB of 16 KiB messages
//!   flow toward it at a rate every target holds: the other clients' p99 and loss, and the
//!   nodes' peak RSS growth (VmRSS sampled every 100 ms). Afterwards the stalled clients
//!   resume reading, which shows whether the server had disconnected them and how much it had
//!   queued for them. The volume is what matters (it must dwarf the ~4 MiB the kernel buffers
//!   per socket); 10 rooms at 20 MiB each would be 6 GB of deliveries, 25 s per run at a rate
//!   the Node.js seed peer holds, which does not fit the time budget (`--slow-rooms 10`).
//! * `hot`: one room of 3,000 clients and one publisher, ramped like `sweep` from 30k
//!   deliveries/s, with a p99 bound of 100 ms: one message is 1,000 socket writes per node
//!   and 3,000 reads for the load generator, so spreading a single message takes 10-25 ms
//!   on 2 cores even at low rates. Compare targets here rather than absolute latencies.
//! * `c100k` (opt-in: `--scenario c100k`, not part of `all`): 100,000 WebSocket connections
//!   held at once (`--c100k-connections N`, e.g. 20,000 for a quick check), 100 rooms of
//!   1,000, then one message per room published at once. Every process here has a hard limit
//!   of 20,000 open files, so the fleet is `ceil(N / 17,000)` nodes (6 for 100,000) and the
//!   clients live in as many load-generator processes (this binary re-executed, coordinated
//!   over their stdin/stdout; `connect()` picks each client's port per node address, so that
//!   ephemeral ports do not run out); `c100k.rs` has the details. Reports: the time until every
//!   connection was established and joined (the nodes' `/stats` `memberships` add up), node
//!   RSS per connection (growth of the nodes' summed VmRSS / connections), the nodes' idle
//!   CPU over 30 s (heartbeats included; % of one core, summed), the time from publishing
//!   until the last of the N deliveries arrived (once right after joining, once after the
//!   idle period), and each node's `/stats` (`connections`, `accepts_out_of_fds`, ...).
//!   Every phase has a time limit and the scenario stops itself after 15 minutes. Only the
//!   plain WebSocket contract.
//! * `resume` (added by `--durable`, or `--scenario resume`): durable targets only. A client
//!   of room `resume` (`positions=1`) reads the epoch from its `fanout.position` notice and
//!   publishes 1,000 messages; then, 5 times, a new client connects to another node with
//!   `positions=1&since=E:S0` and the time from its TCP connect until the 1,000th replayed
//!   frame arrived is one sample (median and max reported; the replay must say
//!   `recovered:true` and be in order). Its nodes keep `HISTORY` of at least 1,000 (with 256,
//!   a resume of 1,000 is refused as trimmed).
//!
//! * `presence` (opt-in: `--scenario presence`): the chat example with `PRESENCE=1`
//!   (PROTOCOL.md part 2, "Presence"), in four phases, each on fresh processes (`presence.rs` has the
//!   details): join/leave *churn* through WebSocket `user=` joins (joins + leaves per second
//!   held by 32 closed loops without an error, notices missing at watcher sockets, and Redis
//!   CPU per join read from its own `INFO cpu`, nodes' and load generator's CPU per join);
//!   *list* latency of `GET /rooms/NAME/presence` at 1,000 and 10,000 members (median, p99,
//!   Redis CPU per list); *lease* refresh cost (Redis and nodes' CPU per refresh period, with
//!   no member and with one node holding 10,000 rooms); *kill*: a node holding 10,000 members
//!   killed with SIGKILL, and the time until the other nodes' watchers saw the last leave.
//!   Nodes run with `PRESENCE_TTL_S=10` (`--presence-ttl`). Scale it down with `--quick`
//!   (TTL 3 s, hundreds of members) or `--presence-lists`, `--presence-rooms`,
//!   `--presence-kill-members`, `--presence-churn-workers`, `--duration-scale`.
//! * `users` (opt-in: `--scenario users`): users across the fleet (PROTOCOL.md part 2, "Users"), in
//!   two parts on fresh clusters (`users.rs` and `users_online.rs` have the details).
//!   *Direct*: 10,000 users on 3 nodes, one socket each, each alone in its own room too;
//!   bursts of one `POST /users/U/messages` per user from 32 HTTP keep-alive workers against
//!   the same volume of `POST /rooms/R/messages`, alternated 3 times: deliveries per second
//!   (first POST to last delivery) with nodes', Redis's (`INFO cpu`) and the load
//!   generator's CPU per delivery, then p50/p99 of each path at 2,000 msg/s for 5 s (the
//!   stamp is taken before the POST, so the HTTP request is in the latency). *Online*:
//!   100,000 users on 6 nodes (`--users-online N`; the sockets beyond 17,000 live in
//!   load-generator children as in `c100k`): the time until every user is reachable
//!   (`POST /users/U/messages` answers `{"nodes":1}`), Redis `used_memory` per online user,
//!   and a fleet-wide `POST /users/U/disconnect` of 1,000 users (`--users-disconnects`):
//!   first POST to the last 4000 close, Redis and nodes' CPU per disconnect. `--quick`: 500
//!   direct users, 500 msg/s for 2 s, 1,000 online on 3 nodes, 100 disconnects.
//!
//! * `idle-rooms` (opt-in: `--scenario idle-rooms`, protocol targets only): 2,000 fanout
//!   protocol connections (`--idle-rooms-conns N`) in 50 rooms each, 500 rooms in all, that
//!   join and then stay idle: growth of the nodes' summed VmRSS per connection and per room
//!   joined (`protocol.rs`).
//!
//! * `storm` (opt-in: `--scenario storm`, protocol targets only): 10,000 fanout protocol
//!   clients (`--storm-clients N`) in 100 durable rooms (`HISTORY=1000`) on 3 nodes, a
//!   publisher on node 2 at 2 messages/s per room; node 1 is killed with SIGKILL and its
//!   clients reconnect at once to nodes 2 and 3 and re-join with `since`: the time from the
//!   kill until the last of them got `fanout.resumed` with `recovered: true` (and the median),
//!   and messages lost (a gap in a client's `seq`s, a client behind its room's last `seq`, a
//!   room short of what was published) or repeated (`storm.rs`).
//!
//! `--protocol` adds the target `chat-protocol`: the same chat processes as `chat`, spoken to
//! with the fanout protocol (PROTOCOL.md part 1) at `GET /fanout?user=..` with subprotocol
//! `fanout.v1` instead of the chat's own `/ws` handler. Each client joins its one room with a
//! `join` command and counts as connected once the reply came; publishers send `publish`
//! commands (`{"id":N,"cmd":"publish","room":R,"data":V}`, same V) on the same socket and get
//! one `reply` each, which is not counted; deliveries are the `message` pushes
//! (`{"type":"message","room":R,"data":V}`). It alternates with `chat`, so the tables'
//! ratios (`chat / chat-protocol`) compare the two handlers in the same run.
//!
//! `--durable` adds the target `chat-durable`: the same chat binary with `HISTORY=256`, so
//! every room is durable (each message stored in a Redis stream and published by one Lua
//! script; PROTOCOL.md part 2, "Durable rooms"); its clients join without `positions=1`, so they
//! receive the same frames as in plain rooms. It alternates with `chat` like any target, and
//! the tables' ratios (`chat / chat-durable`) compare plain with durable rooms in the same
//! run; `sweep`, `latency` and `hot` also report Redis CPU per message published
//! (`redis_us_per_msg`).
//!
//! # Method
//!
//! A *delivery* is one message arriving at one client; a message sent to a room of N clients
//! makes N deliveries (the publishing clients are in the room and read too). Rates are always
//! given in deliveries/s = messages/s x clients per room, split evenly over the rooms and, in
//! a room, over its publishers: 1 and 3 publishers per room at the same deliveries/s put the
//! same load on the fan-out and differ only in how many sockets it comes from. Each payload is
//! `{"t":SEND_NS,"s":SENDER,"q":SEQ,"p":"xxx.."}`, `t` being nanoseconds since an `Instant`
//! shared by the whole process; a receiver finds the `"t":` number without parsing the JSON
//! and records `now - t` in a log-linear histogram (1.6 % buckets; percentiles report the
//! bucket's upper bound).
//!
//! Publishing is token-paced: a 1 ms tick sends, as one burst, however many messages are due
//! by now, so rates far above 1 kHz stay exact. A step ends with a drain (up to 1 s) that
//! waits for every expected delivery; loss = 1 - delivered / expected. Deliveries of a message
//! sent before the current step started are counted apart (as stale), never in the step.
//!
//! Server CPU is utime + stime from `/proc/PID/stat` of the node processes (and their
//! descendants) over the step, drain included; divided by the deliveries it gives
//! microseconds of server CPU per delivery. Every step also reports the CPU used by Redis, by
//! the load generator itself and by the whole machine (`/proc/stat`): on a 2-core machine
//! that servers, Redis and the load generator share, a host near two cores means the figure
//! is bounded by the machine, not by the server (and other work on a shared machine shows up
//! there too). Before starting anything, the bench also measures the machine's busy cores for
//! 1 s and prints a note when other processes already use more than a quarter of a core
//! (`host_busy_cores_before` in the JSON lines).
//!
//! The load generator's own CPU per delivery (utime + stime of this process over the same
//! window, divided by the same deliveries) is printed on every step line next to the servers'
//! (`cpu/deliv X us, loadgen Y us`, marked `(LG>srv)` when Y > X), is a figure of every
//! `sweep`, `latency`, `hot` and `slow` result (`loadgen_us_per_delivery`, also in the JSON
//! lines and per step in their details), and each table ends with a `NOTE` for a target whose
//! median load-generator CPU per delivery is above its servers': then the figure measures the
//! load generator as much as the server.
//!
//! # The load generator
//!
//! It has to stay cheap: at a million deliveries per second it shares two cores with three
//! servers and Redis. Clients are a hand-written RFC 6455 client (`ws.rs`): a receiver reads
//! into one large buffer and walks frame headers in place, looking only for the `"t":` stamp;
//! its counters are written by its own task alone, without locked instructions. Each
//! receiving socket has its own tokio task (a task is a small state machine; a task serving
//! many sockets would still need one readiness event and one `recv` per socket, and those
//! kernel costs are what a profile shows to dominate, not the frame parsing). The tasks run
//! on one worker thread (`--lg-threads`); the pacer and the orchestration run on the main
//! thread. Under load every `recv` returns many frames, so the cost per delivery falls as the
//! rate rises (about 1 us per delivery at 400k/s); at low rates and in `hot` it is several us.
//!
//! For socket.io targets the same client speaks Engine.IO v4 / Socket.IO v5 over the
//! websocket transport only (`ws.rs`): it upgrades `/socket.io/?EIO=4&transport=websocket&room=NAME`,
//! waits for the open packet `0{"sid":..}`, sends `40` and counts the socket as connected
//! only when `40{"sid":..}` comes back (so it is in its room); it publishes `42["msg",V]` and
//! counts every `42["msg",V]` frame as a delivery, finding the stamp right after the fixed
//! prefix; it answers Engine.IO pings `2` with `3`. Same payload V, so the same bytes of JSON
//! per message for every target (plus 11 bytes of socket.io framing).
//!
//! # Running
//!
//! ```text
//! cargo bench --bench fanout                        # our chat example, every scenario, 3 rounds
//! cargo bench --bench fanout -- --socketioxide --seed   # ... compared with socketioxide and the seed
//! cargo bench --bench fanout -- --socketioxide --scenario sweep,latency --rounds 3
//! cargo bench --bench fanout -- --socketioxide-bin /path/to/socketioxide-peer --publishers-per-room 1
//! cargo bench --bench fanout -- --socketioxide --worker-threads 1   # every node on 1 tokio worker
//! cargo bench --bench fanout -- --seed              # ... compared with the Node.js seed peer
//! cargo bench --bench fanout -- --seed --no-default-target --quick   # smoke run of the seed
//! cargo bench --bench fanout -- --scenario latency --rounds 1
//! cargo bench --bench fanout -- --target-cmd other="node path/to/server.js"
//! cargo bench --bench fanout -- --scenario hot --redis-cluster 3 --shard-counts 1,4,16 \
//!     --hot-publishers 12
//! cargo bench --bench fanout -- --scenario c100k --rounds 1                 # 100,000 sockets
//! cargo bench --bench fanout -- --scenario c100k --rounds 1 --c100k-connections 20000
//! cargo bench --bench fanout -- --durable --scenario sweep,latency,hot --rounds 1
//! cargo bench --bench fanout -- --protocol --scenario sweep,latency,idle,idle-rooms --rounds 1
//! cargo bench --bench fanout -- --protocol --scenario storm --rounds 1 --quick   # 1,000 clients
//! cargo bench --bench fanout -- --scenario presence --rounds 1
//! cargo bench --bench fanout -- --scenario presence --rounds 1 --quick   # smoke run
//! cargo bench --bench fanout -- --scenario users --rounds 1                 # 100,000 online
//! cargo bench --bench fanout -- --scenario users --rounds 1 --quick   # smoke run
//! ```
//!
//! Options: `--scenario
//! sweep|latency|idle|slow|hot|all|c100k|resume|presence|users|idle-rooms|storm`
//! (comma-separated list allowed; `all` is the first five),
//! `--rounds N` (default 3), `--target-cmd [NAME=]CMD` (repeatable; run as `sh -c "exec CMD"`
//! with the contract's environment variables; CMD's leading `KEY=VALUE` words are added to
//! them), `--seed` (adds `../shared/peers/seed-node`, copied to `target/seed-node`, as target
//! `seed`), `--seed-dir DIR`, `--socketioxide` (adds
//! `../shared/peers/socketioxide`, copied to `target/socketioxide-peer` and built there with
//! `cargo build --release`, about 4 minutes on 2 cores the first time and reused afterwards,
//! as target `socketioxide`), `--socketioxide-dir DIR`, `--socketioxide-bin PATH` (use that
//! binary, no build; implies `--socketioxide`), `--publishers-per-room N[,M..]` (sweep and
//! latency once per value, default `1,3`), `--worker-threads N` (`TOKIO_WORKER_THREADS` of
//! the nodes; default unset), `--no-default-target`,
//! `--quick` (fewer connections, shorter steps), `--duration-scale F` (multiplies every step
//! duration and the `slow` volume), `--lg-threads N` (load-generator worker threads, default
//! 1; 0 runs everything on one thread), `--shard-count N` (SHARD_COUNT of the servers),
//! `--shard-counts A,B,..` (the chat example once per shard count, as targets `chat-sA`, ..,
//! in alternation like any targets), `--redis-cluster N` (a local Redis Cluster of N masters,
//! no replicas, instead of one redis-server; the nodes get `REDIS_CLUSTER`),
//! `--hot-publishers N` (publishing clients of `hot`, default 1: a room's shard is chosen per
//! sender, so one publisher uses one shard whatever the shard count),
//! `--msg-size N`, `--latency-rate DELIVERIES_PER_S`, `--slow-rooms N`, `--slow-mib F`,
//! `--c100k-connections N` (default 100,000), `--durable` (target `chat-durable` and the
//! `resume` scenario), `--protocol` (target `chat-protocol`), `--idle-rooms-conns N` (the
//! `idle-rooms` scenario), `--storm-clients N` (the `storm` scenario), `--presence-ttl S`,
//! `--presence-lists A,B`, `--presence-rooms N`,
//! `--presence-kill-members N`, `--presence-churn-workers N` (the `presence` scenario),
//! `--users-direct N`, `--users-online N`, `--users-disconnects N` (the `users` scenario).
//! Unknown arguments (cargo passes `--bench`) are ignored. A round of sweep and latency with
//! `--socketioxide` (2 targets, 2 publisher counts each) takes about 1.5 minutes on 2 cores,
//! 2 minutes with `--seed` too (once the peers are built).
//!
//! With several targets, each scenario runs them in alternation (A, B, A, B, ...) so that
//! drifting background load hits every target alike; tables (one per scenario, and per
//! publishers-per-room value for sweep and latency) show every round, the median per target
//! and the ratio of our median to every other's; the run ends with one line of ratios per
//! table and other target (`chat/socketioxide: max_deliveries_per_s 0.61x, ...`). Each run is
//! also appended as one JSON line to `target/bench-results/fanout.jsonl` (with
//! `publishers_per_room`, the target's `proto` and `node_worker_threads`); server and Redis
//! logs of the latest run are in `target/bench-results/logs/`.

// The crate root is benches/fanout.rs, so its modules would be looked up in benches/;
// they live in benches/fanout/ to keep the benches directory for bench targets.
#[path = "fanout/c100k.rs"]
mod c100k;
#[path = "fanout/durable.rs"]
mod durable;
#[path = "fanout/hist.rs"]
mod hist;
#[path = "fanout/load.rs"]
mod load;
#[path = "fanout/presence.rs"]
mod presence;
#[path = "fanout/procs.rs"]
mod procs;
#[path = "fanout/protocol.rs"]
mod protocol;
#[path = "fanout/report.rs"]
mod report;
#[path = "fanout/scenarios.rs"]
mod scenarios;
#[path = "fanout/storm.rs"]
mod storm;
#[path = "fanout/users.rs"]
mod users;
#[path = "fanout/users_http.rs"]
mod users_http;
#[path = "fanout/users_online.rs"]
mod users_online;
#[path = "fanout/ws.rs"]
mod ws;

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::procs::{ClusterConfig, Launch, Target};
use crate::report::RunRecord;
use crate::scenarios::{Params, Scenario};
use crate::ws::Proto;

/// Errors carry their context as text: this is a tool, the message is the product.
type Error = Box<dyn std::error::Error + Send + Sync>;
type Result<T> = std::result::Result<T, Error>;

/// Adds a description of what was being done to an error (or to a missing value).
trait Context<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Display> Context<T> for std::result::Result<T, E> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| format!("{}: {e}", what()).into())
    }
}

impl<T> Context<T> for Option<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.ok_or_else(|| what().into())
    }
}

macro_rules! bail {
    ($($arg:tt)*) => {
        return Err(format!($($arg)*).into())
    };
}
pub(crate) use bail;

/// Send stamps and the measurement window, on one process-wide monotonic clock.
///
/// The `c100k` load-generator child processes align their clock to the parent's
/// ([`clock::align_to`]), so that stamps the parent writes read as latencies in a child.
mod clock {
    use std::sync::LazyLock;
    use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
    use std::time::{Instant, SystemTime, UNIX_EPOCH};

    static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);
    static WINDOW_START: AtomicU64 = AtomicU64::new(0);
    /// Added to every reading: 0 except in a child aligned to its parent.
    static OFFSET: AtomicI64 = AtomicI64::new(0);

    /// Nanoseconds since the process-wide epoch.
    #[inline]
    pub(crate) fn now_ns() -> u64 {
        (EPOCH.elapsed().as_nanos() as i64).saturating_add(OFFSET.load(Relaxed)) as u64
    }

    /// Unix time (ns) at which `now_ns()` was 0, from a paired reading of both clocks (the
    /// wall clock is shared by every process of the machine, `Instant` is not comparable
    /// across processes in std).
    pub(crate) fn zero_unix_ns() -> i128 {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        wall - i128::from(now_ns())
    }

    /// Makes `now_ns()` read the clock of the process whose `zero_unix_ns()` was `parent`.
    pub(crate) fn align_to(parent: i128) {
        OFFSET.store(0, Relaxed);
        let mine = zero_unix_ns();
        OFFSET.store((mine - parent) as i64, Relaxed);
    }

    /// Starts a measurement window: from now on, only messages stamped from now count.
    pub(crate) fn start_window() {
        WINDOW_START.store(now_ns(), Relaxed);
    }

    /// Starts a window at a given instant (a child, told by its parent).
    pub(crate) fn set_window_start(ns: u64) {
        WINDOW_START.store(ns, Relaxed);
    }

    #[inline]
    pub(crate) fn window_start_ns() -> u64 {
        WINDOW_START.load(Relaxed)
    }
}

/// `HISTORY` of the `chat-durable` target (`--durable`).
const DURABLE_HISTORY: usize = 256;

/// Command line.
#[derive(Debug)]
struct Args {
    scenarios: Vec<Scenario>,
    rounds: usize,
    target_cmds: Vec<(String, String)>,
    seed: bool,
    seed_dir: Option<PathBuf>,
    socketioxide: bool,
    socketioxide_dir: Option<PathBuf>,
    socketioxide_bin: Option<PathBuf>,
    publishers_per_room: Vec<usize>,
    worker_threads: Option<usize>,
    default_target: bool,
    quick: bool,
    scale: f64,
    lg_threads: usize,
    shard_count: u32,
    shard_counts: Vec<u32>,
    redis_cluster: Option<usize>,
    hot_publishers: Option<usize>,
    msg_size: Option<usize>,
    latency_rate: Option<f64>,
    slow_rooms: Option<usize>,
    slow_mib: Option<f64>,
    c100k_connections: Option<usize>,
    c100k_idle_s: Option<u64>,
    durable: bool,
    protocol: bool,
    idle_rooms_conns: Option<usize>,
    storm_clients: Option<usize>,
    presence_ttl: Option<u64>,
    presence_lists: Option<Vec<usize>>,
    presence_rooms: Option<usize>,
    presence_kill_members: Option<usize>,
    presence_churn_workers: Option<usize>,
    users_direct: Option<usize>,
    users_online: Option<usize>,
    users_disconnects: Option<usize>,
}

const USAGE: &str = "\
usage: cargo bench --bench fanout [-- OPTIONS]
  --scenario S          sweep|latency|idle|slow|hot|all, or a comma-separated list (default all);
                        also c100k, presence, users, idle-rooms and storm (opt-in)
  --rounds N            rounds per target (default 3)
  --target-cmd [NAME=]CMD
                        another target, started as `sh -c \"exec CMD\"` (repeatable); leading
                        KEY=VALUE words are its environment (e.g. HISTORY=1000: durable)
  --seed                add the Node.js seed peer as target `seed`
  --durable             add target chat-durable (the chat example with HISTORY=256: durable
                        rooms), alternated with chat, and the `resume` scenario
  --protocol            add target chat-protocol (the chat example's fanout protocol at
                        /fanout, fanout.v1), alternated with chat
  --idle-rooms-conns N  connections of `idle-rooms` (default 2000; quick 200), each in 50 rooms
  --storm-clients N     protocol clients of `storm` (default 10000; quick 1000)
  --seed-dir DIR        seed peer sources (default ../shared/peers/seed-node)
  --socketioxide        add the socketioxide peer (socket.io) as target `socketioxide`; the
                        bench builds it in target/socketioxide-peer (first time ~4 min)
  --socketioxide-dir DIR
                        its sources (default ../shared/peers/socketioxide)
  --socketioxide-bin PATH
                        use this socketioxide peer binary instead of building (implies
                        --socketioxide)
  --publishers-per-room N[,M..]
                        publishing clients per room of sweep and latency; each value is its
                        own table (default 1,3)
  --worker-threads N    TOKIO_WORKER_THREADS of every node (default: unset, each node's
                        default runtime)
  --no-default-target   do not build and run examples/chat.rs
  --quick               smoke run: fewer connections, shorter steps
  --duration-scale F    multiply step durations by F (default 1)
  --lg-threads N        load-generator worker threads (default 1; 0 = single thread)
  --shard-count N       SHARD_COUNT given to the servers (default 1)
  --shard-counts A,B,.. run the chat example once per shard count, as targets chat-sA, chat-sB..
  --redis-cluster N     a local Redis Cluster of N masters instead of one redis-server
  --hot-publishers N    publishing clients in `hot` (default 1; sharding spreads senders)
  --msg-size N          message size in bytes of sweep, latency and hot (default 256)
  --latency-rate D      deliveries/s of `latency` (default 75000)
  --slow-rooms N        rooms of `slow` (default 3)
  --slow-mib F          MiB sent toward each stalled client in `slow` (default 20)
  --c100k-connections N connections of `c100k` (default 100000; e.g. 20000 for a quick check)
  --c100k-idle S        idle window of `c100k` in seconds (default 30; a multiple of the nodes'
                        25 s ping interval, e.g. 50, holds whole heartbeat rounds)
  --presence-ttl S      PRESENCE_TTL_S of the nodes in `presence` (default 10; quick 3)
  --presence-lists A,B  members of the listed room in `presence` (default 1000,10000)
  --presence-rooms N    rooms held by one node in the lease phase of `presence` (default 10000)
  --presence-kill-members N
                        members on the node killed with SIGKILL in `presence` (default 10000)
  --presence-churn-workers N
                        concurrent join/leave loops of `presence` (default 32)
  --users-direct N      users of the direct-message part of `users` (default 10000; quick 500)
  --users-online N      online users of `users` (default 100000 on 6 nodes; quick 1000 on 3)
  --users-disconnects N users disconnected fleet-wide in `users` (default 1000; quick 100)";

impl Args {
    fn parse(raw: impl IntoIterator<Item = String>) -> Result<Self> {
        let mut a = Args {
            scenarios: Scenario::ALL.to_vec(),
            rounds: 3,
            target_cmds: Vec::new(),
            seed: false,
            seed_dir: None,
            socketioxide: false,
            socketioxide_dir: None,
            socketioxide_bin: None,
            publishers_per_room: vec![1, 3],
            worker_threads: None,
            default_target: true,
            quick: false,
            scale: 1.0,
            lg_threads: 1,
            shard_count: 1,
            shard_counts: Vec::new(),
            redis_cluster: None,
            hot_publishers: None,
            msg_size: None,
            latency_rate: None,
            slow_rooms: None,
            slow_mib: None,
            c100k_connections: None,
            c100k_idle_s: None,
            durable: false,
            protocol: false,
            idle_rooms_conns: None,
            storm_clients: None,
            presence_ttl: None,
            presence_lists: None,
            presence_rooms: None,
            presence_kill_members: None,
            presence_churn_workers: None,
            users_direct: None,
            users_online: None,
            users_disconnects: None,
        };
        let mut it = raw.into_iter();
        while let Some(arg) = it.next() {
            // Accept both `--opt value` and `--opt=value`.
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
                _ => (arg.clone(), None),
            };
            let mut value = |name: &str| -> Result<String> {
                inline
                    .clone()
                    .or_else(|| it.next())
                    .ctx(|| format!("{name} needs a value\n{USAGE}"))
            };
            match flag.as_str() {
                "--scenario" => {
                    let v = value("--scenario")?;
                    a.scenarios = if v == "all" {
                        Scenario::ALL.to_vec()
                    } else {
                        v.split(',')
                            .map(|s| {
                                Scenario::parse(s.trim())
                                    .ctx(|| format!("unknown scenario {s:?}\n{USAGE}"))
                            })
                            .collect::<Result<_>>()?
                    };
                }
                "--rounds" => a.rounds = parse_num(&value("--rounds")?, "--rounds")?,
                "--target-cmd" => {
                    let v = value("--target-cmd")?;
                    a.target_cmds
                        .push(split_target_cmd(&v, a.target_cmds.len() + 1));
                }
                "--seed" => a.seed = true,
                "--durable" => a.durable = true,
                "--protocol" => a.protocol = true,
                "--storm-clients" => {
                    a.storm_clients =
                        Some(parse_num(&value("--storm-clients")?, "--storm-clients")?);
                }
                "--idle-rooms-conns" => {
                    a.idle_rooms_conns = Some(parse_num(
                        &value("--idle-rooms-conns")?,
                        "--idle-rooms-conns",
                    )?);
                }
                "--seed-dir" => a.seed_dir = Some(PathBuf::from(value("--seed-dir")?)),
                "--socketioxide" => a.socketioxide = true,
                "--socketioxide-dir" => {
                    a.socketioxide_dir = Some(PathBuf::from(value("--socketioxide-dir")?));
                }
                "--socketioxide-bin" => {
                    a.socketioxide = true;
                    a.socketioxide_bin = Some(PathBuf::from(value("--socketioxide-bin")?));
                }
                "--publishers-per-room" => {
                    a.publishers_per_room = value("--publishers-per-room")?
                        .split(',')
                        .map(|n| parse_num(n.trim(), "--publishers-per-room"))
                        .collect::<Result<_>>()?;
                }
                "--worker-threads" => {
                    a.worker_threads =
                        Some(parse_num(&value("--worker-threads")?, "--worker-threads")?);
                }
                "--no-default-target" => a.default_target = false,
                "--quick" => a.quick = true,
                "--duration-scale" => {
                    a.scale = parse_num(&value("--duration-scale")?, "--duration-scale")?;
                }
                "--lg-threads" => {
                    a.lg_threads = parse_num(&value("--lg-threads")?, "--lg-threads")?
                }
                "--shard-count" => {
                    a.shard_count = parse_num(&value("--shard-count")?, "--shard-count")?;
                }
                "--shard-counts" => {
                    a.shard_counts = value("--shard-counts")?
                        .split(',')
                        .map(|n| parse_num(n.trim(), "--shard-counts"))
                        .collect::<Result<_>>()?;
                }
                "--redis-cluster" => {
                    a.redis_cluster =
                        Some(parse_num(&value("--redis-cluster")?, "--redis-cluster")?)
                }
                "--hot-publishers" => {
                    a.hot_publishers =
                        Some(parse_num(&value("--hot-publishers")?, "--hot-publishers")?)
                }
                "--msg-size" => a.msg_size = Some(parse_num(&value("--msg-size")?, "--msg-size")?),
                "--latency-rate" => {
                    a.latency_rate = Some(parse_num(&value("--latency-rate")?, "--latency-rate")?);
                }
                "--slow-rooms" => {
                    a.slow_rooms = Some(parse_num(&value("--slow-rooms")?, "--slow-rooms")?)
                }
                "--slow-mib" => a.slow_mib = Some(parse_num(&value("--slow-mib")?, "--slow-mib")?),
                "--c100k-connections" => {
                    a.c100k_connections = Some(parse_num(
                        &value("--c100k-connections")?,
                        "--c100k-connections",
                    )?);
                }
                "--c100k-idle" => {
                    a.c100k_idle_s = Some(parse_num(&value("--c100k-idle")?, "--c100k-idle")?);
                }
                "--presence-ttl" => {
                    a.presence_ttl = Some(parse_num(&value("--presence-ttl")?, "--presence-ttl")?)
                }
                "--presence-lists" => {
                    let mut sizes: Vec<usize> = value("--presence-lists")?
                        .split(',')
                        .map(|n| parse_num(n.trim(), "--presence-lists"))
                        .collect::<Result<_>>()?;
                    sizes.sort_unstable();
                    a.presence_lists = Some(sizes);
                }
                "--presence-rooms" => {
                    a.presence_rooms =
                        Some(parse_num(&value("--presence-rooms")?, "--presence-rooms")?)
                }
                "--presence-kill-members" => {
                    a.presence_kill_members = Some(parse_num(
                        &value("--presence-kill-members")?,
                        "--presence-kill-members",
                    )?)
                }
                "--presence-churn-workers" => {
                    a.presence_churn_workers = Some(parse_num(
                        &value("--presence-churn-workers")?,
                        "--presence-churn-workers",
                    )?)
                }
                "--users-direct" => {
                    a.users_direct = Some(parse_num(&value("--users-direct")?, "--users-direct")?)
                }
                "--users-online" => {
                    a.users_online = Some(parse_num(&value("--users-online")?, "--users-online")?)
                }
                "--users-disconnects" => {
                    a.users_disconnects = Some(parse_num(
                        &value("--users-disconnects")?,
                        "--users-disconnects",
                    )?)
                }
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                // cargo passes --bench to harness = false benches.
                "--bench" => {}
                other => eprintln!("fanout: ignoring unknown argument {other:?}"),
            }
        }
        if a.durable && !a.scenarios.contains(&Scenario::Resume) {
            a.scenarios.push(Scenario::Resume);
        }
        if a.rounds == 0 || a.shard_count == 0 || a.shard_counts.contains(&0) {
            bail!("--rounds, --shard-count and --shard-counts must be at least 1");
        }
        if a.publishers_per_room.is_empty() || a.publishers_per_room.contains(&0) {
            bail!("--publishers-per-room values must be at least 1");
        }
        if a.worker_threads == Some(0) {
            bail!("--worker-threads must be at least 1");
        }
        if a.redis_cluster == Some(0) {
            bail!("--redis-cluster needs at least 1 master (3 for a real cluster)");
        }
        if !(a.scale.is_finite() && a.scale > 0.0) {
            bail!("--duration-scale must be a positive number");
        }
        Ok(a)
    }
}

fn parse_num<T: std::str::FromStr>(v: &str, name: &str) -> Result<T> {
    v.parse()
        .ok()
        .ctx(|| format!("{name}: not a valid number: {v:?}"))
}

/// `NAME=CMD` when the text before the first `=` is a plain word, else an unnamed `CMD`.
/// (So `FOO=1 node s.js` is unnamed, with `FOO=1` in its environment; name it explicitly:
/// `x=FOO=1 node s.js`.)
fn split_target_cmd(v: &str, n: usize) -> (String, String) {
    if let Some((name, cmd)) = v.split_once('=') {
        let plain = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && !name.chars().all(|c| c.is_ascii_uppercase() || c == '_');
        if plain && !cmd.trim().is_empty() {
            return (name.to_string(), cmd.to_string());
        }
    }
    (format!("cmd{n}"), v.to_string())
}

/// The `KEY=VALUE` words at the start of a `--target-cmd` (as in a shell command line), as the
/// target's environment, and the command after them: the bench then sees them as it sees
/// `chat-durable`'s `HISTORY` (a durable target, whose `resume` raises `HISTORY`).
fn leading_env(cmd: &str) -> (Vec<(String, String)>, String) {
    let mut env = Vec::new();
    let mut rest = cmd.trim_start();
    while let Some((word, after)) = rest.split_once(char::is_whitespace)
        && let Some((key, value)) = word.split_once('=')
        && !key.is_empty()
        && !key.starts_with(|c: char| c.is_ascii_digit())
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        env.push((key.to_string(), value.to_string()));
        rest = after.trim_start();
    }
    (env, rest.to_string())
}

/// `target/` of this build: the bench binary lives in `target/<profile>/deps/`.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().ok();
    let deps = exe
        .as_deref()
        .and_then(Path::parent)
        .filter(|d| d.ends_with("deps"));
    if let Some(t) = deps.and_then(Path::parent).and_then(Path::parent) {
        return t.to_path_buf();
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn main() -> ExitCode {
    // `c100k` re-executes this binary as its load-generator processes.
    let raw: Vec<String> = std::env::args().skip(1).collect();
    if raw.first().map(String::as_str) == Some(c100k::CHILD_FLAG) {
        return c100k::child_main(&raw[1..]);
    }
    if raw.first().map(String::as_str) == Some(users_online::CHILD_FLAG) {
        return users_online::child_main(&raw[1..]);
    }
    let args = match Args::parse(raw) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fanout: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The orchestrating future (and with it the pacer) runs on the main thread; the client
    // tasks run on the worker(s). Few threads: the servers need the cores.
    let rt = if args.lg_threads == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.lg_threads)
            // Distinct from the servers' tokio threads in `top` and `perf`.
            .thread_name("fanout-loadgen")
            .enable_all()
            .build()
    }
    .expect("building the tokio runtime");
    let outcome = rt.block_on(async {
        tokio::select! {
            r = run(args) => r,
            // Dropping `run` drops every process guard it holds: the children are killed.
            sig = shutdown_signal() => Err(format!("interrupted by {sig}").into()),
        }
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("fanout: some runs failed (see the errors above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("fanout: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        // Without the handlers, only Ctrl-C is caught.
        let _ = tokio::signal::ctrl_c().await;
        return "SIGINT";
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
        _ = hup.recv() => "SIGHUP",
    }
}

/// Runs every scenario for every target; `Ok(false)` if some run failed.
async fn run(args: Args) -> Result<bool> {
    let started = Instant::now();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target_dir = target_dir();
    let results_dir = target_dir.join("bench-results");
    let jsonl = results_dir.join("fanout.jsonl");

    let mut targets = Vec::new();
    if args.default_target {
        let bin = procs::build_chat(manifest, &target_dir)?;
        if args.shard_counts.is_empty() {
            targets.push(Target {
                name: "chat".to_string(),
                launch: Launch::Exec(bin.clone()),
                env: Vec::new(),
                proto: Proto::Ws,
            });
            if args.durable {
                targets.push(Target {
                    name: "chat-durable".to_string(),
                    launch: Launch::Exec(bin.clone()),
                    env: vec![("HISTORY".to_string(), DURABLE_HISTORY.to_string())],
                    proto: Proto::Ws,
                });
            }
            if args.protocol {
                // The same processes as `chat`; only the clients' route and wire differ.
                targets.push(Target {
                    name: "chat-protocol".to_string(),
                    launch: Launch::Exec(bin.clone()),
                    env: Vec::new(),
                    proto: Proto::Fanout { acked: true },
                });
                // Publishing without ids (no reply per publish), as `/ws` clients do: what
                // the protocol's framing alone costs.
                targets.push(Target {
                    name: "chat-protocol-noack".to_string(),
                    launch: Launch::Exec(bin.clone()),
                    env: Vec::new(),
                    proto: Proto::Fanout { acked: false },
                });
            }
        }
        for n in &args.shard_counts {
            targets.push(Target {
                name: format!("chat-s{n}"),
                launch: Launch::Exec(bin.clone()),
                env: vec![("SHARD_COUNT".to_string(), n.to_string())],
                proto: Proto::Ws,
            });
        }
    }
    for (name, cmd) in &args.target_cmds {
        let (env, cmd) = leading_env(cmd);
        targets.push(Target {
            name: name.clone(),
            launch: Launch::Shell(cmd),
            env,
            proto: Proto::Ws,
        });
    }
    if args.socketioxide {
        targets.push(match &args.socketioxide_bin {
            Some(bin) => procs::socketioxide_target(bin)?,
            None => {
                let dir = args
                    .socketioxide_dir
                    .clone()
                    .unwrap_or_else(|| manifest.join("../shared/peers/socketioxide"));
                procs::prepare_socketioxide(&dir, &target_dir)?
            }
        });
    }
    if args.seed {
        let dir = args
            .seed_dir
            .clone()
            .unwrap_or_else(|| manifest.join("../shared/peers/seed-node"));
        targets.push(procs::prepare_seed(&dir, &target_dir)?);
    }
    if targets.is_empty() {
        bail!("no target: drop --no-default-target, or add --seed or --target-cmd\n{USAGE}");
    }
    let names: Vec<String> = targets.iter().map(|t| t.name.clone()).collect();
    // "Ours" in the ratios: the chat example when it runs, else the first target.
    let ours = names[0].clone();

    let mut params = Params::new(args.quick, args.scale);
    if let Some(size) = args.msg_size {
        params.msg_size = size;
    }
    if let Some(n) = args.hot_publishers {
        params.hot.publishers_per_room = n.max(1);
    }
    if let Some(rate) = args.latency_rate {
        params.latency_deliveries_per_sec = rate;
    }
    if let Some(rooms) = args.slow_rooms {
        params.slow_rooms = rooms;
    }
    if let Some(mib) = args.slow_mib {
        params.slow_mib = mib;
    }
    if let Some(n) = args.storm_clients {
        params.storm_clients = n.max(3);
    }
    if let Some(n) = args.idle_rooms_conns {
        params.idle_rooms_conns = n;
    }
    if let Some(n) = args.c100k_connections {
        params.c100k.connections = n;
    }
    if let Some(s) = args.c100k_idle_s {
        params.c100k.idle_window = Duration::from_secs(s);
    }
    let pp = &mut params.presence;
    if let Some(ttl) = args.presence_ttl {
        pp.ttl_s = ttl;
    }
    if let Some(sizes) = &args.presence_lists {
        pp.list_sizes.clone_from(sizes);
    }
    if let Some(n) = args.presence_rooms {
        pp.lease_rooms = n;
    }
    if let Some(n) = args.presence_kill_members {
        pp.kill_members = n;
    }
    if let Some(n) = args.presence_churn_workers {
        pp.churn_workers = n;
    }
    let up = &mut params.users;
    if let Some(n) = args.users_direct {
        up.direct_users = n;
    }
    if let Some(n) = args.users_online {
        up.online = n;
    }
    if let Some(n) = args.users_disconnects {
        up.disconnects = n;
    }
    if up.direct_users == 0 || up.online == 0 {
        bail!("--users-direct and --users-online must be positive");
    }
    let pp = &params.presence;
    if pp.ttl_s == 0 || pp.churn_workers == 0 || pp.list_sizes.contains(&0) {
        bail!("--presence-ttl, --presence-churn-workers and --presence-lists must be positive");
    }
    let positive = |v: f64| v.is_finite() && v > 0.0;
    if params.slow_rooms == 0
        || !positive(params.slow_mib)
        || !positive(params.latency_deliveries_per_sec)
        || params.msg_size == 0
    {
        bail!("--slow-rooms, --slow-mib, --latency-rate and --msg-size must be positive");
    }
    let cc = ClusterConfig {
        nodes: 3,
        shard_count: args.shard_count,
        channel_prefix: "bench:room:".to_string(),
        log_dir: results_dir.join("logs"),
        redis_cluster: args.redis_cluster,
        worker_threads: args.worker_threads,
    };
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "fanout bench: targets {names:?}, scenarios {:?}, publishers/room {:?} (sweep, \
         latency), {} round(s){}, node worker threads {}, {nproc} cpus",
        args.scenarios.iter().map(|s| s.name()).collect::<Vec<_>>(),
        args.publishers_per_room,
        args.rounds,
        if args.quick { ", quick" } else { "" },
        args.worker_threads
            .map_or_else(|| "default".to_string(), |n| n.to_string()),
    );

    // Other work on a shared machine skews every figure; say so up front (the step lines
    // show `host` cores throughout).
    let busy = procs::host_busy_cores(Duration::from_secs(1)).await;
    println!("machine busy before the run: {busy:.2} of {nproc} cores");
    if busy > 0.25 {
        println!(
            "note: other processes already keep {busy:.2} cores busy; absolute figures will be \
             low and noisy, compare the targets' ratios within this run"
        );
    }

    // Each scenario, and sweep and latency once per publishers-per-room value.
    let cases: Vec<(Scenario, Option<usize>)> = args
        .scenarios
        .iter()
        .flat_map(|&s| {
            if s.per_publishers() {
                args.publishers_per_room
                    .iter()
                    .map(|&n| (s, Some(n)))
                    .collect()
            } else {
                vec![(s, None)]
            }
        })
        .collect();
    let mut all_ok = true;
    let mut tables = Vec::new();
    let mut ratios = String::new();
    for &(scenario, pubs) in &cases {
        let mut records = Vec::new();
        let case = match pubs {
            Some(n) => format!("{} {n}pub", scenario.name()),
            None => scenario.name().to_string(),
        };
        for round in 1..=args.rounds {
            for target in &targets {
                let tag = format!("[{case} {} r{round}]", target.name);
                let t0 = Instant::now();
                let outcome = scenarios::run(scenario, pubs, target, &cc, &params, &tag).await;
                let (figures, details, error) = match outcome {
                    Ok((f, d)) => (f, d, None),
                    Err(e) => {
                        println!("{tag} ERROR: {e}");
                        all_ok = false;
                        (Vec::new(), serde_json::Value::Null, Some(e.to_string()))
                    }
                };
                println!("{tag} done in {:.1} s", t0.elapsed().as_secs_f64());
                let rec = RunRecord {
                    scenario: scenario.name(),
                    target: target.name.clone(),
                    publishers_per_room: pubs,
                    round,
                    figures,
                    details,
                    error,
                };
                let context = json!({
                    "quick": args.quick,
                    "duration_scale": args.scale,
                    "lg_threads": args.lg_threads,
                    "node_worker_threads": args.worker_threads,
                    "host_busy_cores_before": busy,
                    "proto": target.proto.name(),
                    "shard_count": args.shard_count,
                    "shard_counts": args.shard_counts,
                    "redis_cluster_masters": args.redis_cluster,
                    "targets": names,
                    "params": params.describe(scenario, pubs),
                });
                if let Err(e) = report::append_jsonl(&jsonl, &rec, &context) {
                    println!("warning: {e}");
                }
                records.push(rec);
            }
        }
        let table = report::table(
            &scenario.title(&params, pubs),
            &records,
            &names,
            &ours,
            args.rounds,
        );
        println!("{table}");
        tables.push(table);
        ratios.push_str(&report::ratio_lines(&case, &records, &names, &ours));
    }
    if tables.len() > 1 {
        println!("\n######## summary ########");
        for t in &tables {
            print!("{t}");
        }
    }
    if !ratios.is_empty() {
        println!("\n######## ratios of medians ({ours} / other; see [+]/[-] above) ########");
        print!("{ratios}");
    }
    println!(
        "\nresults appended to {} (total {:.0} s)",
        jsonl.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(all_ok)
}
