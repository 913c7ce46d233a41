//! Client fleets, paced publishing and measurement windows, shared by the scenarios.
//!
//! A measurement window ("step") is: snapshot the counters and the CPU clocks, move the
//! window start to *now*, publish at a paced rate for the step's duration, wait until every
//! expected delivery has arrived (or a drain timeout), snapshot again. A delivery belongs to
//! the window if its send stamp is after the window start, so late frames of an earlier step
//! are counted as `stale` and never pollute the current one.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use futures_util::stream;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::clock;
use crate::hist::{ConnStats, Summary};
use crate::procs::{Cluster, CpuUsage};
use crate::ws;
use crate::{Result, bail};

/// Handshakes in flight at once: enough to connect thousands of clients in a second or two,
/// few enough not to overflow a listen backlog (Node's default is 511).
const CONNECT_CONCURRENCY: usize = 128;

/// Shape of a fleet of clients.
#[derive(Debug, Clone)]
pub(crate) struct FleetSpec {
    pub(crate) rooms: usize,
    /// Clients per room, publishers and stalled clients included.
    pub(crate) clients_per_room: usize,
    /// The first clients of each room also publish (they keep reading too).
    pub(crate) publishers_per_room: usize,
    /// The last clients of each room complete the handshake and then never read.
    pub(crate) stalled_per_room: usize,
    /// SO_RCVBUF of stalled clients (None: kernel default).
    pub(crate) stalled_rcvbuf: Option<u32>,
    /// Read buffer per receiving connection.
    pub(crate) buf_size: usize,
    /// Wire variant of the target.
    pub(crate) proto: ws::Proto,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    Reader,
    Publisher,
    Stalled,
}

#[derive(Debug)]
struct Publisher {
    room: usize,
    id: u32,
    seq: u64,
    tx: mpsc::UnboundedSender<Vec<u8>>,
}

/// Connected clients with their reader and writer tasks. Dropping it aborts the tasks and
/// closes every socket.
#[derive(Debug)]
pub(crate) struct Fleet {
    proto: ws::Proto,
    readers_per_room: Vec<u64>,
    stats: Vec<Arc<ConnStats>>,
    publishers: Vec<Publisher>,
    tasks: Vec<JoinHandle<()>>,
    /// Stalled connections: held open, never read.
    parked: Vec<TcpStream>,
    /// First error a reader ended with, to explain `closed` connections in a report.
    first_error: Arc<Mutex<Option<String>>>,
    scratch: Vec<u8>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Node a client connects to: round-robin, offset by room so that the publishers and the
/// stalled clients of different rooms land on different nodes.
fn node_of(room: usize, index: usize, nodes: usize) -> usize {
    (room + index) % nodes
}

impl Fleet {
    /// Connects every client of `spec`, spread over `addrs`, and starts their tasks.
    pub(crate) async fn connect(spec: &FleetSpec, addrs: &[SocketAddr]) -> Result<Self> {
        let mut jobs = Vec::with_capacity(spec.rooms * spec.clients_per_room);
        for room in 0..spec.rooms {
            for i in 0..spec.clients_per_room {
                let role = if i < spec.publishers_per_room {
                    Role::Publisher
                } else if i >= spec.clients_per_room - spec.stalled_per_room {
                    Role::Stalled
                } else {
                    Role::Reader
                };
                jobs.push((room, role, addrs[node_of(room, i, addrs.len())]));
            }
        }
        let results: Vec<_> = stream::iter(jobs)
            .map(|(room, role, addr)| async move {
                let rcvbuf = if role == Role::Stalled {
                    spec.stalled_rcvbuf
                } else {
                    None
                };
                let name = format!("r{room}");
                ws::connect(addr, &name, spec.proto, rcvbuf, spec.buf_size)
                    .await
                    .map(|c| (room, role, c))
            })
            .buffer_unordered(CONNECT_CONCURRENCY)
            .collect()
            .await;

        let mut fleet = Fleet {
            proto: spec.proto,
            readers_per_room: vec![0; spec.rooms],
            stats: Vec::new(),
            publishers: Vec::new(),
            tasks: Vec::new(),
            parked: Vec::new(),
            first_error: Arc::new(Mutex::new(None)),
            scratch: Vec::new(),
        };
        let mut failures = 0;
        let mut first_failure = None;
        for r in results {
            match r {
                Ok((room, role, conn)) => fleet.adopt(room, role, conn),
                Err(e) => {
                    failures += 1;
                    first_failure.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_failure {
            bail!("{failures} of the fleet's connections failed; first error: {e}");
        }
        Ok(fleet)
    }

    fn adopt(&mut self, room: usize, role: Role, conn: ws::Conn) {
        if role == Role::Stalled {
            self.parked.push(conn.stream);
            return;
        }
        self.readers_per_room[room] += 1;
        let stats = Arc::new(ConnStats::new());
        self.stats.push(Arc::clone(&stats));
        let on_end = {
            let stats = Arc::clone(&stats);
            let first_error = Arc::clone(&self.first_error);
            move |r: Result<()>| {
                stats.mark_closed();
                if let (Err(e), Ok(mut slot)) = (r, first_error.lock()) {
                    slot.get_or_insert_with(|| e.to_string());
                }
            }
        };
        let ws::Conn {
            stream,
            buf,
            filled,
        } = conn;
        // Every connection reads in one task and writes in another: a reader only writes the
        // pongs that answer server pings; a publisher also writes what the pacer hands it.
        // Both halves must stay alive: dropping the write half would half-close the socket.
        let (rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let pongs = tx.clone();
        let proto = self.proto;
        self.tasks.push(tokio::spawn(async move {
            on_end(ws::read_loop(rd, buf, filled, proto, stats, Some(pongs)).await);
        }));
        if role == Role::Reader {
            self.tasks.push(tokio::spawn(async move {
                while let Some(pong) = rx.recv().await {
                    if wr.write_all(&pong).await.is_err() {
                        break;
                    }
                }
            }));
            return;
        }
        self.tasks.push(tokio::spawn(async move {
            while let Some(batch) = rx.recv().await {
                // A failed write shows up as loss: the pacer counted those messages as sent.
                if wr.write_all(&batch).await.is_err() {
                    break;
                }
            }
        }));
        let id = self.publishers.len() as u32;
        self.publishers.push(Publisher {
            room,
            id,
            seq: 0,
            tx,
        });
    }

    /// Receiving connections (stalled ones excluded).
    pub(crate) fn receivers(&self) -> usize {
        self.stats.len()
    }

    pub(crate) fn summary(&self) -> Summary {
        Summary::collect(self.stats.iter().map(|s| &**s))
    }

    pub(crate) fn delivered_total(&self) -> u64 {
        self.stats.iter().map(|s| s.delivered()).sum()
    }

    fn received_total(&self) -> u64 {
        self.stats.iter().map(|s| s.received()).sum()
    }

    pub(crate) fn first_error(&self) -> Option<String> {
        self.first_error.lock().ok().and_then(|e| e.clone())
    }

    /// Sends `msgs_per_sec` messages per second (spread round-robin over the publishers, and
    /// so evenly over the rooms) for `duration`.
    ///
    /// Token pacing: a 1 ms tick computes how many messages should have left by now and sends
    /// the difference as one burst, so a late tick is caught up and the overall rate stays
    /// exact even at rates far above 1000/s.
    async fn publish(&mut self, msgs_per_sec: f64, duration: Duration, size: usize) -> Sent {
        let mut sent = Sent {
            per_room: vec![0; self.readers_per_room.len()],
            total: 0,
            secs: 0.0,
        };
        if self.publishers.is_empty() || msgs_per_sec <= 0.0 {
            return sent;
        }
        let mut batches: Vec<Vec<u8>> = vec![Vec::new(); self.publishers.len()];
        let mut cursor = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let start = Instant::now();
        loop {
            tick.tick().await;
            let elapsed = start.elapsed().min(duration);
            let due = (msgs_per_sec * elapsed.as_secs_f64()) as u64;
            if due > sent.total {
                let t = clock::now_ns();
                for _ in sent.total..due {
                    let p = &mut self.publishers[cursor];
                    ws::push_message(
                        &mut batches[cursor],
                        &mut self.scratch,
                        self.proto,
                        p.room,
                        t,
                        p.id,
                        p.seq,
                        size,
                    );
                    p.seq += 1;
                    sent.per_room[p.room] += 1;
                    cursor = (cursor + 1) % self.publishers.len();
                }
                sent.total = due;
                for (p, batch) in self.publishers.iter().zip(batches.iter_mut()) {
                    if !batch.is_empty() {
                        // A closed channel means the writer died; the loss will show it.
                        let _ = p.tx.send(std::mem::take(batch));
                    }
                }
            }
            if elapsed >= duration {
                break;
            }
        }
        sent.secs = start.elapsed().as_secs_f64();
        sent
    }

    /// Sends one message from every publisher at once (one stamp for all), e.g. one message
    /// per room in `c100k`. Returns the stamp.
    pub(crate) fn publish_once(&mut self, size: usize) -> u64 {
        let t = clock::now_ns();
        for p in &mut self.publishers {
            let mut frame = Vec::with_capacity(size + 16);
            ws::push_message(
                &mut frame,
                &mut self.scratch,
                self.proto,
                p.room,
                t,
                p.id,
                p.seq,
                size,
            );
            p.seq += 1;
            // A closed channel means the writer died; the missing deliveries will show it.
            let _ = p.tx.send(frame);
        }
        t
    }

    /// Sends one message from every publisher until a round reaches every receiver of its
    /// room. Servers subscribe to Redis lazily and asynchronously, so the first messages
    /// after connecting may legitimately be lost; measuring starts only after this.
    pub(crate) async fn warm_up(&mut self, size: usize) -> Result<()> {
        let expected: u64 = self
            .publishers
            .iter()
            .map(|p| self.readers_per_room[p.room])
            .sum();
        for _ in 0..40 {
            clock::start_window();
            let base = self.delivered_total();
            let rate = self.publishers.len() as f64 * 1000.0;
            // One message per publisher, sent within ~1 ms.
            self.publish(rate, Duration::from_millis(1), size).await;
            let deadline = Instant::now() + Duration::from_millis(500);
            while Instant::now() < deadline {
                if self.delivered_total() - base >= expected {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        bail!(
            "warm-up: messages never reached every client of their room within 20 s \
             (subscriptions not established?)"
        )
    }

    /// Starts reading the stalled connections and gives the server `limit` to finish with
    /// them. Returns how many the server closed (close frame or EOF) and how many frames were
    /// still queued for them: this tells a server that cuts slow consumers from one that
    /// buffers for them without bound.
    pub(crate) async fn drain_stalled(&mut self, limit: Duration) -> (usize, u64) {
        let parked = std::mem::take(&mut self.parked);
        let proto = self.proto;
        let reads = parked.into_iter().map(|s| async move {
            let stats = Arc::new(ConnStats::new());
            let buf = vec![0u8; 256 * 1024];
            let ended = tokio::time::timeout(
                limit,
                ws::read_loop(s, buf, 0, proto, Arc::clone(&stats), None),
            )
            .await
            .is_ok();
            (ended, stats.received())
        });
        let results = futures_util::future::join_all(reads).await;
        let closed = results.iter().filter(|(c, _)| *c).count();
        (closed, results.iter().map(|(_, n)| n).sum())
    }

    /// Waits until no frame has arrived for 100 ms (at most `limit`), so that a backlog left
    /// by an overloaded step does not spill into the next one.
    pub(crate) async fn quiesce(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut last = self.received_total();
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.received_total();
            if now == last {
                return;
            }
            last = now;
        }
    }
}

/// What the pacer sent.
#[derive(Debug)]
struct Sent {
    per_room: Vec<u64>,
    total: u64,
    secs: f64,
}

/// Parameters of one measurement window.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepSpec {
    pub(crate) msgs_per_sec: f64,
    pub(crate) duration: Duration,
    pub(crate) msg_size: usize,
    /// Longest wait for outstanding deliveries after the last send.
    pub(crate) drain: Duration,
}

/// Figures of one measurement window.
#[derive(Debug, Clone)]
pub(crate) struct StepResult {
    pub(crate) msgs_per_sec: f64,
    pub(crate) msgs_sent: u64,
    pub(crate) expected: u64,
    pub(crate) lat: Summary,
    pub(crate) send_secs: f64,
    pub(crate) cpu: CpuUsage,
    /// A node or Redis died during the window.
    pub(crate) failure: Option<String>,
}

impl StepResult {
    /// Fraction of expected deliveries that did not arrive (0 when more arrived).
    pub(crate) fn loss(&self) -> f64 {
        if self.expected == 0 {
            return 0.0;
        }
        (1.0 - self.lat.delivered as f64 / self.expected as f64).max(0.0)
    }

    /// Deliveries that arrived beyond the expected count (duplicates).
    pub(crate) fn excess(&self) -> u64 {
        self.lat.delivered.saturating_sub(self.expected)
    }

    /// Deliveries per second the pacer offered.
    pub(crate) fn offered_per_sec(&self) -> f64 {
        self.expected as f64 / self.send_secs.max(1e-9)
    }

    /// Deliveries per second that arrived (over the sending time).
    pub(crate) fn delivered_per_sec(&self) -> f64 {
        self.lat.delivered as f64 / self.send_secs.max(1e-9)
    }

    /// CPU time of the node processes per delivery, in microseconds.
    pub(crate) fn cpu_us_per_delivery(&self) -> f64 {
        if self.lat.delivered == 0 {
            return f64::NAN;
        }
        self.cpu.nodes_secs * 1e6 / self.lat.delivered as f64
    }

    /// CPU time of the load generator (this process) per delivery, in microseconds, over the
    /// same window. When it is above [`Self::cpu_us_per_delivery`], the load generator costs
    /// more than the servers it loads, and a throughput figure measures the load generator.
    pub(crate) fn loadgen_us_per_delivery(&self) -> f64 {
        if self.lat.delivered == 0 {
            return f64::NAN;
        }
        self.cpu.loadgen_secs * 1e6 / self.lat.delivered as f64
    }

    /// CPU time of Redis per message published, in microseconds (a message is one PUBLISH,
    /// or one script run storing and publishing it in a durable room).
    pub(crate) fn redis_us_per_msg(&self) -> f64 {
        if self.msgs_sent == 0 {
            return f64::NAN;
        }
        self.cpu.redis_secs * 1e6 / self.msgs_sent as f64
    }

    pub(crate) fn p_ms(&self, q: f64) -> f64 {
        self.lat.quantile_ms(q)
    }

    /// Pass criterion of the ramps: loss and p99 within bounds, no process died.
    pub(crate) fn holds(&self, max_loss: f64, max_p99_ms: f64) -> bool {
        self.failure.is_none()
            && self.lat.delivered > 0
            && self.loss() <= max_loss
            && self.p_ms(0.99) <= max_p99_ms
    }

    /// One human-readable line.
    pub(crate) fn line(&self) -> String {
        format!(
            "offered {:>9.0}/s delivered {:>9.0}/s loss {:>6.3}% p50 {:>7.2} p99 {:>7.2} \
             max {:>7.1} ms | cpu/deliv {:>5.2} us, loadgen {:>5.2} us{} | cores: nodes {:.2} \
             redis {:.2} loadgen {:.2} host {:.2}{}",
            self.offered_per_sec(),
            self.delivered_per_sec(),
            self.loss() * 100.0,
            self.p_ms(0.5),
            self.p_ms(0.99),
            self.lat.max_ms(),
            self.cpu_us_per_delivery(),
            self.loadgen_us_per_delivery(),
            if self.loadgen_us_per_delivery() > self.cpu_us_per_delivery() {
                " (LG>srv)"
            } else {
                ""
            },
            self.cpu.nodes_cores,
            self.cpu.redis_cores,
            self.cpu.loadgen_cores,
            self.cpu.host_cores,
            self.failure
                .as_deref()
                .map(|f| format!(" | FAILED: {f}"))
                .unwrap_or_default()
        )
    }
}

/// Runs one measurement window (see the module docs).
pub(crate) async fn run_step(
    cluster: &mut Cluster,
    fleet: &mut Fleet,
    spec: StepSpec,
) -> StepResult {
    let before = fleet.summary();
    let cpu_before = cluster.cpu_sample();
    clock::start_window();
    let sent = fleet
        .publish(spec.msgs_per_sec, spec.duration, spec.msg_size)
        .await;
    let expected: u64 = sent
        .per_room
        .iter()
        .zip(&fleet.readers_per_room)
        .map(|(m, r)| m * r)
        .sum();
    let deadline = Instant::now() + spec.drain;
    while fleet.delivered_total() - before.delivered < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cpu = cpu_before.until(&cluster.cpu_sample());
    let lat = fleet.summary().since(&before);
    StepResult {
        msgs_per_sec: spec.msgs_per_sec,
        msgs_sent: sent.total,
        expected,
        lat,
        send_secs: sent.secs,
        cpu,
        failure: cluster.check_alive().err().map(|e| e.to_string()),
    }
}

/// Samples the nodes' summed VmRSS every 100 ms while `work` runs; returns its output and
/// the peak (KiB).
pub(crate) async fn with_rss_peak<T>(
    cluster_rss: impl Fn() -> u64,
    work: impl std::future::Future<Output = T>,
) -> (T, u64) {
    let done = AtomicBool::new(false);
    let work = async {
        let out = work.await;
        done.store(true, Relaxed);
        out
    };
    let sampler = async {
        let mut peak = cluster_rss();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while !done.load(Relaxed) {
            tick.tick().await;
            peak = peak.max(cluster_rss());
        }
        peak
    };
    tokio::join!(work, sampler)
}

/// Connects `n` clients that only complete the handshake (spread over the nodes and over
/// `rooms` rooms). Returns the open sockets and the errors of the failed ones.
pub(crate) async fn connect_idle(
    addrs: &[SocketAddr],
    rooms: usize,
    n: usize,
    proto: ws::Proto,
) -> (Vec<TcpStream>, Vec<String>) {
    let results: Vec<_> = stream::iter(0..n)
        .map(|i| {
            let addr = addrs[i % addrs.len()];
            let room = format!("r{}", i % rooms.max(1));
            // A small read buffer: these clients never read past the handshake.
            async move { ws::connect(addr, &room, proto, None, 4096).await }
        })
        .buffer_unordered(CONNECT_CONCURRENCY)
        .collect()
        .await;
    split_conns(results)
}

/// The open sockets of `results`, and the errors of the connections that failed.
pub(crate) fn split_conns(results: Vec<Result<ws::Conn>>) -> (Vec<TcpStream>, Vec<String>) {
    let mut open = Vec::with_capacity(results.len());
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(c) => open.push(c.stream),
            Err(e) => errors.push(e.to_string()),
        }
    }
    (open, errors)
}

/// What idle connections cost the nodes: their summed RSS before and after `connect` (each
/// read once the nodes settled for `settle`), what it opened, and how long it took.
pub(crate) struct Footprint {
    pub(crate) before_kib: u64,
    pub(crate) after_kib: u64,
    pub(crate) open: Vec<TcpStream>,
    pub(crate) errors: Vec<String>,
    pub(crate) connect_secs: f64,
}

impl Footprint {
    /// Runs `connect` between two settled RSS readings; fails when a node died or nothing
    /// connected.
    pub(crate) async fn measure(
        cluster: &mut Cluster,
        settle: Duration,
        connect: impl std::future::Future<Output = (Vec<TcpStream>, Vec<String>)>,
    ) -> Result<Self> {
        // Let the freshly started nodes reach their resting footprint first.
        tokio::time::sleep(settle).await;
        let before_kib = cluster.nodes_rss_kib();
        let t0 = Instant::now();
        let (open, errors) = connect.await;
        let connect_secs = t0.elapsed().as_secs_f64();
        tokio::time::sleep(settle).await;
        let after_kib = cluster.nodes_rss_kib();
        cluster.check_alive()?;
        if open.is_empty() {
            bail!(
                "no idle connection succeeded; first error: {}",
                errors.first().map_or("none", |e| e.as_str())
            );
        }
        Ok(Self {
            before_kib,
            after_kib,
            open,
            errors,
            connect_secs,
        })
    }

    /// Says why the first failed connection failed, if one did.
    pub(crate) fn print_first_error(&self, tag: &str) {
        if let Some(e) = self.errors.first() {
            println!("{tag} first connection error: {e}");
        }
    }

    /// RSS growth per open connection, in KiB.
    pub(crate) fn per_conn_kib(&self) -> f64 {
        self.after_kib.saturating_sub(self.before_kib) as f64 / self.open.len() as f64
    }
}
