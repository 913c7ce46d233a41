//! The scenarios (`c100k` lives in `c100k.rs`). Each starts a fresh cluster (Redis + nodes) for its run, so that no
//! run inherits another's memory, backlog or subscriptions.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::c100k::{self, C100kParams};
use crate::durable;
use crate::load::{self, Fleet, FleetSpec, Footprint, StepResult, StepSpec};
use crate::presence::{self, PresenceParams};
use crate::procs::{self, Cluster, ClusterConfig, Target};
use crate::protocol;
use crate::report::{Better, Figure, fig};
use crate::storm;
use crate::users::{self, UsersParams};
use crate::ws::Proto;
use crate::{Result, bail};

/// Which scenario to run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Scenario {
    Sweep,
    Latency,
    Idle,
    Slow,
    Hot,
    /// Opt-in (not in `ALL`): 100,000 connections held at once (`c100k.rs`).
    C100k,
    /// Opt-in, added by `--durable`: a resume of 1,000 messages (`durable.rs`).
    Resume,
    /// Opt-in: presence churn, lists, leases and a crash (`presence.rs`).
    Presence,
    /// Opt-in: direct messages against room broadcasts, and the cost of online users
    /// (`users.rs`, `users_online.rs`).
    Users,
    /// Opt-in: fanout protocol sockets in 50 rooms each, memory per connection
    /// (`protocol.rs`).
    IdleRooms,
    /// Opt-in: a node of fanout protocol clients killed; they resume on the others
    /// (`storm.rs`).
    Storm,
}

impl Scenario {
    pub(crate) const ALL: [Scenario; 5] = [
        Scenario::Sweep,
        Scenario::Latency,
        Scenario::Idle,
        Scenario::Slow,
        Scenario::Hot,
    ];

    /// Scenarios that run only when named in `--scenario` (not part of `all`).
    pub(crate) const OPT_IN: [Scenario; 6] = [
        Scenario::C100k,
        Scenario::Resume,
        Scenario::Presence,
        Scenario::Users,
        Scenario::IdleRooms,
        Scenario::Storm,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Scenario::Sweep => "sweep",
            Scenario::Latency => "latency",
            Scenario::Idle => "idle",
            Scenario::Slow => "slow",
            Scenario::Hot => "hot",
            Scenario::C100k => "c100k",
            Scenario::Resume => "resume",
            Scenario::Presence => "presence",
            Scenario::Users => "users",
            Scenario::IdleRooms => "idle-rooms",
            Scenario::Storm => "storm",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .chain(Self::OPT_IN)
            .find(|sc| sc.name() == s)
    }

    /// Whether `--publishers-per-room` applies (the scenario runs once per value).
    pub(crate) fn per_publishers(self) -> bool {
        matches!(self, Scenario::Sweep | Scenario::Latency)
    }

    /// Table heading, with the shape of the load. `pubs`: publishers per room of `sweep` and
    /// `latency` (None: the scenario's default).
    pub(crate) fn title(self, p: &Params, pubs: Option<usize>) -> String {
        match self {
            Scenario::Sweep => format!(
                "sweep: {} rooms x {} clients, {} publisher(s)/room, {} B, rate x{} per step \
                 until loss > {}% or p99 > {} ms",
                p.sweep.rooms,
                p.sweep.clients,
                pubs.unwrap_or(p.sweep.publishers_per_room),
                p.msg_size,
                p.sweep.factor,
                p.max_loss * 100.0,
                p.sweep.max_p99_ms
            ),
            Scenario::Latency => format!(
                "latency: {} rooms x {} clients, {} publisher(s)/room, {:.0} msg/s = {:.0} \
                 deliveries/s, {} B, {:.1} s",
                p.latency_rooms,
                p.latency_clients,
                pubs.unwrap_or(p.latency_publishers_per_room),
                p.latency_deliveries_per_sec / p.latency_clients as f64,
                p.latency_deliveries_per_sec,
                p.msg_size,
                p.latency_duration.as_secs_f64()
            ),
            Scenario::Idle => format!(
                "idle: {} idle connections in {} rooms",
                p.idle_conns, p.idle_rooms
            ),
            Scenario::Slow => format!(
                "slow: {} rooms x {} clients, 1 stalled client per room, {} B messages at {} \
                 msg/s per room, {} MiB toward each stalled client",
                p.slow_rooms, p.slow_clients, p.slow_msg_size, p.slow_room_msgs_per_sec, p.slow_mib
            ),
            Scenario::Hot => format!(
                "hot: 1 room x {} clients, {} publisher(s), {} B, rate x{} per step until loss \
                 > {}% or p99 > {} ms",
                p.hot.clients,
                p.hot.publishers_per_room,
                p.msg_size,
                p.hot.factor,
                p.max_loss * 100.0,
                p.hot.max_p99_ms
            ),
            Scenario::C100k => format!(
                "c100k: {} connections in {} rooms, one message per room at once, {} B",
                p.c100k.connections, p.c100k.rooms, p.msg_size
            ),
            Scenario::Resume => format!(
                "resume: {} messages of a durable room replayed to a new socket from seq 0, \
                 {} tries (durable targets only)",
                p.resume_msgs, p.resume_tries
            ),
            Scenario::Presence => format!(
                "presence (PRESENCE_TTL_S={}): churn of {} loops over {} rooms for {:.0} s, \
                 lists of {:?} members, leases with {} rooms, kill -9 of a node with {} members",
                p.presence.ttl_s,
                p.presence.churn_workers,
                p.presence.churn_rooms,
                p.presence.churn_duration.as_secs_f64(),
                p.presence.list_sizes,
                p.presence.lease_rooms,
                p.presence.kill_members
            ),
            Scenario::Users => format!(
                "users: {} users on 3 nodes, one direct message each against one room message \
                 each ({} bursts per path, alternated, {} HTTP workers), p50/p99 at {:.0} msg/s \
                 for {:.0} s; {} users online on {}+ nodes, {} disconnected fleet-wide",
                p.users.direct_users,
                p.users.passes,
                p.users.workers,
                p.users.latency_rate,
                p.users.latency_duration.as_secs_f64(),
                p.users.online,
                p.users.online_nodes,
                p.users.disconnects
            ),
            Scenario::IdleRooms => format!(
                "idle-rooms: {} idle fanout protocol connections in {} rooms each, {} rooms in \
                 all (protocol targets only)",
                p.idle_rooms_conns,
                protocol::ROOMS_PER_CONN,
                protocol::DISTINCT_ROOMS
            ),
            Scenario::Storm => format!(
                "storm: {} fanout protocol clients in {} durable rooms on 3 nodes, node 1 killed, \
                 its clients resume on the others (protocol targets only)",
                p.storm_clients,
                storm::ROOMS
            ),
        }
    }
}

/// A rate ramp: start, growth, step length.
#[derive(Debug, Clone)]
pub(crate) struct Ramp {
    pub(crate) rooms: usize,
    pub(crate) clients: usize,
    pub(crate) publishers_per_room: usize,
    /// First step, in deliveries per second.
    pub(crate) start: f64,
    pub(crate) factor: f64,
    /// Bisection steps between the last rate that held and the first that failed.
    pub(crate) refine: usize,
    pub(crate) step: Duration,
    pub(crate) max_steps: usize,
    /// Pass criterion on latency (loss is `Params::max_loss`).
    pub(crate) max_p99_ms: f64,
    /// Failing steps that may be re-run once (the machine is shared and noisy).
    pub(crate) retries: usize,
    pub(crate) buf_size: usize,
}

/// Every knob of every scenario, derived from `--quick` and `--duration-scale`.
#[derive(Debug, Clone)]
pub(crate) struct Params {
    pub(crate) msg_size: usize,
    pub(crate) max_loss: f64,
    /// Longest wait for outstanding deliveries at the end of a step.
    pub(crate) drain: Duration,
    pub(crate) sweep: Ramp,
    pub(crate) latency_rooms: usize,
    pub(crate) latency_clients: usize,
    /// Default publishers per room of `latency` (when `--publishers-per-room` is not given).
    pub(crate) latency_publishers_per_room: usize,
    /// Deliveries per second (messages per second x clients per room).
    pub(crate) latency_deliveries_per_sec: f64,
    pub(crate) latency_duration: Duration,
    pub(crate) idle_conns: usize,
    pub(crate) idle_rooms: usize,
    pub(crate) idle_settle: Duration,
    /// Connections of `idle-rooms`, each in `protocol::ROOMS_PER_CONN` rooms.
    pub(crate) idle_rooms_conns: usize,
    /// Clients of `storm`.
    pub(crate) storm_clients: usize,
    pub(crate) slow_rooms: usize,
    pub(crate) slow_clients: usize,
    pub(crate) slow_msg_size: usize,
    /// Volume sent toward each stalled client (so, into each room).
    pub(crate) slow_mib: f64,
    /// Publishing rate of each room; with `slow_mib` it sets the duration.
    pub(crate) slow_room_msgs_per_sec: f64,
    pub(crate) slow_rcvbuf: u32,
    pub(crate) hot: Ramp,
    pub(crate) c100k: C100kParams,
    pub(crate) resume_msgs: usize,
    pub(crate) resume_tries: usize,
    pub(crate) presence: PresenceParams,
    pub(crate) users: UsersParams,
}

impl Params {
    pub(crate) fn new(quick: bool, scale: f64) -> Self {
        let d = |secs: f64| Duration::from_secs_f64(secs * scale);
        let q = |full: usize, quick_value: usize| if quick { quick_value } else { full };
        Params {
            msg_size: 256,
            max_loss: 0.001,
            drain: Duration::from_secs(1),
            sweep: Ramp {
                rooms: q(10, 4),
                clients: q(30, 15),
                publishers_per_room: 3,
                start: 10_000.0,
                factor: if quick { 2.0 } else { 1.5 },
                refine: if quick { 0 } else { 2 },
                step: d(if quick { 0.5 } else { 1.0 }),
                max_steps: 24,
                max_p99_ms: 50.0,
                retries: 1,
                buf_size: 64 * 1024,
            },
            latency_rooms: q(10, 4),
            latency_clients: q(30, 15),
            latency_publishers_per_room: 3,
            latency_deliveries_per_sec: if quick { 20_000.0 } else { 75_000.0 },
            latency_duration: d(if quick { 1.5 } else { 5.0 }),
            idle_conns: q(10_000, 1_000),
            idle_rooms: q(100, 10),
            idle_settle: d(if quick { 0.5 } else { 1.0 }),
            idle_rooms_conns: q(2_000, 200),
            storm_clients: q(10_000, 1_000),
            // Volume, not rooms, is what makes the stall visible: 20 MiB is several times what
            // the kernel buffers for one socket (tcp_wmem max is 4 MiB). 3 rooms x 30 clients
            // x 20 MiB is already 1.8 GB of deliveries, 8 s at a rate the seed peer holds;
            // 10 rooms would take 25 s per run. `--slow-rooms 10` restores them.
            slow_rooms: 3,
            slow_clients: q(30, 15),
            slow_msg_size: 16 * 1024,
            slow_mib: if quick { 4.0 } else { 20.0 } * scale,
            slow_room_msgs_per_sec: 160.0,
            slow_rcvbuf: 4096,
            hot: Ramp {
                rooms: 1,
                clients: q(3000, 600),
                publishers_per_room: 1,
                start: q(30_000, 20_000) as f64,
                factor: if quick { 2.0 } else { 1.5 },
                refine: if quick { 0 } else { 2 },
                step: d(if quick { 0.5 } else { 1.0 }),
                max_steps: 24,
                // One message is 1,000 socket writes per node and 3,000 reads for the load
                // generator: spreading one message takes 10-25 ms on 2 cores even when idle,
                // so 50 ms would leave no headroom. A growing backlog still exceeds 100 ms
                // within one step.
                max_p99_ms: 100.0,
                retries: 1,
                buf_size: 16 * 1024,
            },
            c100k: C100kParams::new(quick),
            resume_msgs: 1000,
            resume_tries: 5,
            presence: PresenceParams::new(quick, scale),
            users: UsersParams::new(quick, scale),
        }
    }

    /// Parameters of a scenario, for the JSON log.
    pub(crate) fn describe(&self, s: Scenario, pubs: Option<usize>) -> Value {
        match s {
            Scenario::Sweep => ramp_json(&self.sweep_with(pubs), self),
            Scenario::Hot => ramp_json(&self.hot, self),
            Scenario::Latency => json!({
                "rooms": self.latency_rooms, "clients_per_room": self.latency_clients,
                "publishers_per_room": pubs.unwrap_or(self.latency_publishers_per_room),
                "deliveries_per_sec": self.latency_deliveries_per_sec, "msg_size": self.msg_size,
                "duration_s": self.latency_duration.as_secs_f64(),
            }),
            Scenario::Idle => json!({
                "connections": self.idle_conns, "rooms": self.idle_rooms,
                "settle_s": self.idle_settle.as_secs_f64(),
            }),
            Scenario::Slow => json!({
                "rooms": self.slow_rooms, "clients_per_room": self.slow_clients,
                "msg_size": self.slow_msg_size, "mib_per_stalled": self.slow_mib,
                "room_msgs_per_sec": self.slow_room_msgs_per_sec,
                "stalled_rcvbuf": self.slow_rcvbuf,
            }),
            Scenario::C100k => self.c100k.describe(),
            Scenario::Resume => {
                json!({ "messages": self.resume_msgs, "tries": self.resume_tries })
            }
            Scenario::Presence => self.presence.describe(),
            Scenario::Users => self.users.describe(),
            Scenario::IdleRooms => json!({
                "connections": self.idle_rooms_conns,
                "rooms_per_conn": protocol::ROOMS_PER_CONN,
                "rooms": protocol::DISTINCT_ROOMS,
                "settle_s": self.idle_settle.as_secs_f64(),
            }),
            Scenario::Storm => json!({ "clients": self.storm_clients, "rooms": storm::ROOMS }),
        }
    }
}

impl Params {
    /// The sweep ramp with `pubs` publishers per room (None: its default).
    fn sweep_with(&self, pubs: Option<usize>) -> Ramp {
        let mut r = self.sweep.clone();
        if let Some(n) = pubs {
            r.publishers_per_room = n;
        }
        r
    }
}

fn ramp_json(r: &Ramp, p: &Params) -> Value {
    json!({
        "rooms": r.rooms, "clients_per_room": r.clients,
        "publishers_per_room": r.publishers_per_room, "msg_size": p.msg_size,
        "start_deliveries_per_s": r.start, "factor": r.factor, "step_s": r.step.as_secs_f64(),
        "max_loss": p.max_loss, "max_p99_ms": r.max_p99_ms,
    })
}

/// Figures and JSON detail of one run.
pub(crate) type Outcome = (Vec<Figure>, Value);

/// Runs one scenario against a fresh cluster of `target`. `pubs` is the publishers per room
/// of `sweep` and `latency` (None: their default). `tag` prefixes progress lines.
pub(crate) async fn run(
    s: Scenario,
    pubs: Option<usize>,
    target: &Target,
    cc: &ClusterConfig,
    p: &Params,
    tag: &str,
) -> Result<Outcome> {
    if s == Scenario::C100k {
        // Its own fleet of nodes and load-generator processes.
        return c100k::run(target, cc, &p.c100k, p.msg_size, tag).await;
    }
    if s == Scenario::Resume {
        return durable::resume(target, cc, p.resume_msgs, p.resume_tries, tag).await;
    }
    if s == Scenario::Presence {
        // A fresh cluster per phase.
        return presence::run(target, cc, &p.presence, tag).await;
    }
    if s == Scenario::Storm {
        return storm::run(target, cc, p.storm_clients, tag).await;
    }
    if s == Scenario::IdleRooms {
        return protocol::idle_rooms(target, cc, p, tag).await;
    }
    if s == Scenario::Users {
        // Its own clusters: 3 nodes, then the online part's.
        let mut up = p.users.clone();
        up.msg_size = p.msg_size;
        return users::run(target, cc, &up, tag).await;
    }
    let mut cluster = Cluster::start(target, cc).await?;
    let proto = target.proto;
    match s {
        Scenario::Sweep => ramp(&mut cluster, &p.sweep_with(pubs), p, proto, tag).await,
        Scenario::Hot => ramp(&mut cluster, &p.hot, p, proto, tag).await,
        Scenario::Latency => {
            let pubs = pubs.unwrap_or(p.latency_publishers_per_room);
            latency(&mut cluster, p, pubs, proto, tag).await
        }
        Scenario::Idle => idle(&mut cluster, p, proto, tag).await,
        Scenario::Slow => slow(&mut cluster, p, proto, tag).await,
        Scenario::C100k
        | Scenario::Resume
        | Scenario::Presence
        | Scenario::Users
        | Scenario::IdleRooms
        | Scenario::Storm => {
            unreachable!("handled above")
        }
    }
}

/// The load generator's CPU per delivery, as a figure (context: not compared across targets,
/// but the table flags a target where it exceeds the servers').
fn loadgen_fig(step: Option<&StepResult>) -> Figure {
    fig(
        "loadgen_us_per_delivery",
        "loadgen CPU/delivery (us)",
        Better::Neither,
        step.map_or(f64::NAN, StepResult::loadgen_us_per_delivery),
    )
}

fn step_json(r: &StepResult) -> Value {
    let f = |v: f64| v.is_finite().then_some(v);
    json!({
        "msgs_per_sec": r.msgs_per_sec,
        "offered_deliveries_per_s": f(r.offered_per_sec()),
        "delivered_per_s": f(r.delivered_per_sec()),
        "window_s": r.cpu.wall_secs, "msgs_sent": r.msgs_sent, "expected": r.expected, "delivered": r.lat.delivered,
        "stale": r.lat.stale, "bad": r.lat.bad, "excess": r.excess(),
        "closed_connections": r.lat.closed,
        "loss": r.loss(),
        "p50_ms": f(r.p_ms(0.5)), "p99_ms": f(r.p_ms(0.99)), "p999_ms": f(r.p_ms(0.999)),
        "max_ms": f(r.lat.max_ms()),
        "cpu_us_per_delivery": f(r.cpu_us_per_delivery()),
        "loadgen_us_per_delivery": f(r.loadgen_us_per_delivery()),
        "redis_us_per_msg": f(r.redis_us_per_msg()),
        "nodes_cores": r.cpu.nodes_cores, "redis_cores": r.cpu.redis_cores,
        "loadgen_cores": r.cpu.loadgen_cores, "host_cores": r.cpu.host_cores,
        "failure": r.failure,
    })
}

/// One step of a ramp at `rate` deliveries/s.
async fn step_at(
    cluster: &mut Cluster,
    fleet: &mut Fleet,
    r: &Ramp,
    p: &Params,
    rate: f64,
) -> StepResult {
    load::run_step(
        cluster,
        fleet,
        StepSpec {
            // Every message reaches every client of its room.
            msgs_per_sec: rate / r.clients as f64,
            duration: r.step,
            msg_size: p.msg_size,
            drain: p.drain,
        },
    )
    .await
}

/// `sweep` and `hot`: raise the rate step by step until a step fails (after its retries);
/// the result is the last step that held.
async fn ramp(
    cluster: &mut Cluster,
    r: &Ramp,
    p: &Params,
    proto: Proto,
    tag: &str,
) -> Result<Outcome> {
    let spec = FleetSpec {
        rooms: r.rooms,
        clients_per_room: r.clients,
        publishers_per_room: r.publishers_per_room.min(r.clients),
        stalled_per_room: 0,
        stalled_rcvbuf: None,
        buf_size: r.buf_size,
        proto,
    };
    let t0 = Instant::now();
    let mut fleet = Fleet::connect(&spec, &cluster.addrs).await?;
    fleet.warm_up(p.msg_size).await?;
    println!(
        "{tag} {} clients connected and warmed up in {:.1} s",
        fleet.receivers(),
        t0.elapsed().as_secs_f64()
    );
    let mut rate = r.start;
    let mut retries_left = r.retries;
    let mut best: Option<StepResult> = None;
    let mut steps = Vec::new();
    for i in 1..=r.max_steps {
        let step = step_at(cluster, &mut fleet, r, p, rate).await;
        let holds = step.holds(p.max_loss, r.max_p99_ms);
        println!(
            "{tag} step {i:>2} {} {}",
            step.line(),
            if holds { "ok" } else { "FAIL" }
        );
        steps.push(step_json(&step));
        if step.failure.is_some() {
            break; // a dead node does not come back
        }
        if holds {
            best = Some(step);
            rate *= r.factor;
        } else {
            // Let a backlog drain before retrying or stopping.
            fleet.quiesce(Duration::from_secs(3)).await;
            if retries_left == 0 {
                break;
            }
            retries_left -= 1;
        }
    }
    // The geometric ramp brackets the ceiling between the last step that held and the one
    // that failed (a factor of 1.5 apart); a few bisection steps narrow it down, so the figure
    // is not an artefact of where the ramp's steps happen to fall.
    let mut failed_at = rate;
    for i in 1..=r.refine {
        let Some(held) = best.as_ref().map(StepResult::offered_per_sec) else {
            break;
        };
        if steps.len() >= r.max_steps || failed_at <= held * 1.05 {
            break;
        }
        let mid = (held * failed_at).sqrt();
        let step = step_at(cluster, &mut fleet, r, p, mid).await;
        let holds = step.holds(p.max_loss, r.max_p99_ms);
        println!(
            "{tag} refine {i} {} {}",
            step.line(),
            if holds { "ok" } else { "FAIL" }
        );
        steps.push(step_json(&step));
        if step.failure.is_some() {
            break;
        }
        if holds {
            best = Some(step);
        } else {
            failed_at = mid;
            fleet.quiesce(Duration::from_secs(3)).await;
        }
    }
    if let Some(e) = fleet.first_error() {
        println!("{tag} note: a client connection ended: {e}");
    }
    let b = best.as_ref();
    let get = |f: fn(&StepResult) -> f64| b.map_or(f64::NAN, f);
    Ok((
        vec![
            fig(
                "max_deliveries_per_s",
                "max sustained deliveries/s",
                Better::Higher,
                b.map_or(0.0, StepResult::delivered_per_sec),
            ),
            fig(
                "cpu_us_per_delivery",
                "server CPU/delivery @max (us)",
                Better::Lower,
                get(StepResult::cpu_us_per_delivery),
            ),
            fig(
                "p99_ms",
                "p99 @max (ms)",
                Better::Lower,
                get(|s| s.p_ms(0.99)),
            ),
            fig(
                "redis_us_per_msg",
                "Redis CPU/message @max (us)",
                Better::Lower,
                get(StepResult::redis_us_per_msg),
            ),
            loadgen_fig(b),
            fig(
                "loadgen_cores",
                "loadgen cores @max",
                Better::Neither,
                get(|s| s.cpu.loadgen_cores),
            ),
        ],
        json!({ "steps": steps }),
    ))
}

/// `latency`: a fixed, moderate rate; the latency distribution is the result.
async fn latency(
    cluster: &mut Cluster,
    p: &Params,
    pubs: usize,
    proto: Proto,
    tag: &str,
) -> Result<Outcome> {
    let spec = FleetSpec {
        rooms: p.latency_rooms,
        clients_per_room: p.latency_clients,
        publishers_per_room: pubs.clamp(1, p.latency_clients),
        stalled_per_room: 0,
        stalled_rcvbuf: None,
        buf_size: 64 * 1024,
        proto,
    };
    let mut fleet = Fleet::connect(&spec, &cluster.addrs).await?;
    fleet.warm_up(p.msg_size).await?;
    let step = load::run_step(
        cluster,
        &mut fleet,
        StepSpec {
            msgs_per_sec: p.latency_deliveries_per_sec / p.latency_clients as f64,
            duration: p.latency_duration,
            msg_size: p.msg_size,
            drain: p.drain,
        },
    )
    .await;
    println!("{tag} {}", step.line());
    if let Some(f) = &step.failure {
        bail!("{f}");
    }
    Ok((
        vec![
            fig("p50_ms", "p50 (ms)", Better::Lower, step.p_ms(0.5)),
            fig("p99_ms", "p99 (ms)", Better::Lower, step.p_ms(0.99)),
            fig("p999_ms", "p99.9 (ms)", Better::Lower, step.p_ms(0.999)),
            fig("max_ms", "max (ms)", Better::Lower, step.lat.max_ms()),
            fig("loss_pct", "loss (%)", Better::Lower, step.loss() * 100.0),
            fig(
                "cpu_us_per_delivery",
                "server CPU/delivery (us)",
                Better::Lower,
                step.cpu_us_per_delivery(),
            ),
            fig(
                "redis_us_per_msg",
                "Redis CPU/message (us)",
                Better::Lower,
                step.redis_us_per_msg(),
            ),
            loadgen_fig(Some(&step)),
            fig(
                "nodes_cores",
                "server cores used",
                Better::Lower,
                step.cpu.nodes_cores,
            ),
            fig(
                "loadgen_cores",
                "loadgen cores",
                Better::Neither,
                step.cpu.loadgen_cores,
            ),
        ],
        json!({ "step": step_json(&step) }),
    ))
}

/// `idle`: memory cost of an idle connection.
async fn idle(cluster: &mut Cluster, p: &Params, proto: Proto, tag: &str) -> Result<Outcome> {
    let mut n = p.idle_conns;
    // Each client socket is one descriptor of this process (the server ends are the nodes').
    if let Some(limit) = procs::open_files_limit() {
        let headroom = procs::open_files() + 256;
        if (n as u64) + headroom > limit {
            let fit = limit.saturating_sub(headroom) as usize;
            println!(
                "{tag} note: the open-files limit is {limit}; connecting {fit} instead of {n}. \
                 Raise it (ulimit -n {}) before cargo bench for the full count.",
                n as u64 + headroom
            );
            n = fit;
        }
    }
    if n == 0 {
        bail!("no file descriptors left for idle connections");
    }
    let addrs = cluster.addrs.clone();
    let connect = load::connect_idle(&addrs, p.idle_rooms, n, proto);
    let measured = Footprint::measure(cluster, p.idle_settle, connect).await?;
    let (before, after) = (measured.before_kib, measured.after_kib);
    let (connected, failed) = (measured.open.len(), measured.errors.len());
    let (connect_secs, per_conn_kib) = (measured.connect_secs, measured.per_conn_kib());
    println!(
        "{tag} {connected} connected ({failed} failed) in {connect_secs:.1} s; node RSS {:.1} -> \
         {:.1} MiB = {per_conn_kib:.2} KiB/connection",
        before as f64 / 1024.0,
        after as f64 / 1024.0
    );
    measured.print_first_error(tag);
    drop(measured);
    Ok((
        vec![
            fig(
                "rss_kib_per_conn",
                "node RSS per connection (KiB)",
                Better::Lower,
                per_conn_kib,
            ),
            fig(
                "rss_before_mib",
                "node RSS before (MiB)",
                Better::Lower,
                before as f64 / 1024.0,
            ),
            fig(
                "connected",
                "connections made",
                Better::Neither,
                connected as f64,
            ),
            fig(
                "connects_per_s",
                "handshakes/s",
                Better::Higher,
                connected as f64 / connect_secs.max(1e-9),
            ),
        ],
        json!({ "connected": connected, "failed": failed, "rss_before_kib": before,
                "rss_after_kib": after, "connect_s": connect_secs }),
    ))
}

/// `slow`: one client per room stops reading; what happens to the others and to memory.
async fn slow(cluster: &mut Cluster, p: &Params, proto: Proto, tag: &str) -> Result<Outcome> {
    let spec = FleetSpec {
        rooms: p.slow_rooms,
        clients_per_room: p.slow_clients,
        publishers_per_room: 1,
        stalled_per_room: 1,
        // A small receive window makes the stall show up at the server sooner.
        stalled_rcvbuf: Some(p.slow_rcvbuf),
        buf_size: 64 * 1024,
        proto,
    };
    let mut fleet = Fleet::connect(&spec, &cluster.addrs).await?;
    fleet.warm_up(p.msg_size).await?;
    let frame = p.slow_msg_size as f64 + 8.0;
    // Every message of a room goes to its stalled client: time = volume / size / rate.
    let per_room = p.slow_room_msgs_per_sec;
    let secs = (p.slow_mib * 1024.0 * 1024.0 / frame / per_room).max(0.1);
    let rss_before = cluster.nodes_rss_kib();
    let drain = p.drain.max(Duration::from_secs(2));
    let msgs_per_sec = per_room * p.slow_rooms as f64;
    let size = p.slow_msg_size;
    let duration = Duration::from_secs_f64(secs);
    // The step needs the cluster mutably, so the sampler reads /proc through a pid snapshot.
    let probe = cluster.rss_probe();
    let (step, peak) = load::with_rss_peak(
        || probe.rss_kib(),
        load::run_step(
            cluster,
            &mut fleet,
            StepSpec {
                msgs_per_sec,
                duration,
                msg_size: size,
                drain,
            },
        ),
    )
    .await;
    let growth_mib = peak.saturating_sub(rss_before) as f64 / 1024.0;
    let sent_mib = step.msgs_sent as f64 / p.slow_rooms as f64 * frame / (1024.0 * 1024.0);
    println!("{tag} {}", step.line());
    println!(
        "{tag} {sent_mib:.1} MiB sent toward each stalled client; node RSS peak growth \
         {growth_mib:.1} MiB"
    );
    if let Some(f) = &step.failure {
        bail!("{f}");
    }
    // Frames still queued toward the stalled clients, read once they resume.
    let (closed, backlog) = fleet.drain_stalled(Duration::from_secs(2)).await;
    let backlog_mib = backlog as f64 * frame / (1024.0 * 1024.0) / p.slow_rooms as f64;
    println!(
        "{tag} when the stalled clients resumed reading: {closed} of {} were closed by the \
         server; {backlog_mib:.1} MiB per client was still queued",
        p.slow_rooms
    );
    Ok((
        vec![
            fig("p99_ms", "others' p99 (ms)", Better::Lower, step.p_ms(0.99)),
            fig("p50_ms", "others' p50 (ms)", Better::Lower, step.p_ms(0.5)),
            fig(
                "loss_pct",
                "others' loss (%)",
                Better::Lower,
                step.loss() * 100.0,
            ),
            fig(
                "rss_growth_mib",
                "node RSS peak growth (MiB)",
                Better::Lower,
                growth_mib,
            ),
            fig(
                "mib_per_stalled",
                "MiB sent per stalled client",
                Better::Neither,
                sent_mib,
            ),
            fig(
                "stalled_disconnected",
                "stalled clients disconnected",
                Better::Neither,
                closed as f64,
            ),
            fig(
                "cpu_us_per_delivery",
                "server CPU/delivery (us)",
                Better::Lower,
                step.cpu_us_per_delivery(),
            ),
            loadgen_fig(Some(&step)),
        ],
        json!({ "step": step_json(&step), "rss_before_kib": rss_before, "rss_peak_kib": peak,
                "stalled_disconnected": closed, "stalled_backlog_mib_each": backlog_mib }),
    ))
}
