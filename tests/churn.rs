//! No leaks under churn: 15,000 connect / join / leave / disconnect cycles over 3 nodes and 100
//! rooms (6,000 to warm up, 9,000 measured), a quarter of them dropping TCP without a close frame, end with no subscribed channel,
//! no registry entry, no live writer task, and memory back where it was once warmed up.

// The counting allocator below is the only unsafe code in the repository; the library forbids it.
#![allow(unsafe_code)]

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};

use axum_fanout::FanoutLayer;
use futures_util::SinkExt;
use support::*;
use tokio_tungstenite::tungstenite;

/// Counts the bytes this process holds on the heap. RSS alone is a blurred view: the allocator
/// keeps freed pages, so a transient peak (32 handshakes at once) can stay in RSS for a while.
/// Live heap bytes after the nodes went quiet are exact, and a leak shows there first.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the counter
// is bookkeeping only.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live_kib() -> i64 {
    LIVE.load(Ordering::Relaxed) as i64 / 1024
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .expect("VmRSS in /proc/self/status")
}

/// The test's clients share the process with the nodes, so they use small buffers:
/// tungstenite's default 128 KiB read buffer per client would dwarf what the nodes hold.
async fn connect_small(url: &str) -> Ws {
    let config = tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0);
    let (ws, _) = tokio::time::timeout(
        SOON,
        tokio_tungstenite::connect_async_with_config(url, Some(config), true),
    )
    .await
    .unwrap_or_else(|_| panic!("connect to {url} timed out"))
    .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    ws
}

async fn cycle(url: String, n: usize) {
    let mut ws = connect_small(&url).await;
    assert_eq!(recv_text(&mut ws, "join ack").await, "joined");
    ws.send(tungstenite::Message::text("leave"))
        .await
        .expect("send");
    assert_eq!(recv_text(&mut ws, "leave ack").await, "left");
    if n.is_multiple_of(4) {
        drop(ws); // TCP gone without a close frame
    } else {
        let _ = ws.close(None).await;
    }
}

async fn run_cycles(nodes: &[TestServer], from: usize, to: usize) {
    const PARALLEL: usize = 32;
    let next = Arc::new(AtomicUsize::new(from));
    let urls: Vec<String> = (0..100)
        .flat_map(|room| {
            nodes
                .iter()
                .map(move |n| n.ws_url(&format!("/ws?room=churn{room}")))
        })
        .collect();
    let urls = Arc::new(urls);
    let workers: Vec<_> = (0..PARALLEL)
        .map(|_| {
            let (next, urls) = (next.clone(), urls.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= to {
                        return;
                    }
                    cycle(urls[n % urls.len()].clone(), n).await;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("worker");
    }
}

// One thread, so one malloc arena: RSS then reflects what is live, not which threads allocated.
#[tokio::test]
async fn fifteen_thousand_cycles_leave_nothing_behind() {
    let redis = RedisServer::start();
    let mut servers = Vec::new();
    let mut handles = Vec::new();
    for i in 1..=3 {
        let layer = FanoutLayer::builder(redis.url())
            .node_id(format!("c{i}"))
            .build()
            .expect("layer");
        handles.push(layer.handle());
        servers.push(TestServer::start(room_app(layer)).await);
    }
    for h in &handles {
        wait_until("ready", || async { h.is_ready() }).await;
    }
    let quiet = || async {
        redis.channels("ws:room:*").is_empty()
            && handles.iter().all(|h| {
                let s = h.stats();
                s.rooms == 0 && s.memberships == 0 && s.connections == 0
            })
    };

    // Warm up (allocator arenas, hash map capacities, Redis client buffers): the warmed-up level
    // is the highest seen over the first 6,000 cycles, sampled every 1,000 once the nodes are
    // quiet. The next 9,000 cycles must not grow past it by 10%, in RSS nor in live heap bytes:
    // a leak of even 200 bytes per cycle would.
    let (mut warm_rss, mut warm_live) = (0, 0);
    for k in 0..6 {
        run_cycles(&servers, k * 1_000, (k + 1) * 1_000).await;
        wait_until("quiet during warm-up", quiet).await;
        warm_rss = warm_rss.max(rss_kib());
        warm_live = warm_live.max(live_kib());
    }
    let mut samples = Vec::new();
    for k in 6..15 {
        run_cycles(&servers, k * 1_000, (k + 1) * 1_000).await;
        wait_until("quiet", quiet).await;
        samples.push((rss_kib(), live_kib()));
    }
    let (rss, live) = (rss_kib(), live_kib());
    eprintln!(
        "warmed up: RSS {warm_rss} KiB, heap {warm_live} KiB; (RSS, heap) every 1,000 cycles \
         after: {samples:?}"
    );
    assert!(
        rss <= warm_rss + warm_rss / 10,
        "RSS grew more than 10%: {warm_rss} KiB -> {rss} KiB"
    );
    assert!(
        live <= warm_live + warm_live / 10,
        "live heap grew more than 10%: {warm_live} KiB -> {live} KiB"
    );
    for h in &handles {
        // Shutdown waits for every writer task to finish: none may be left.
        assert!(
            h.shutdown().await,
            "no socket, writer or subscription left on {}",
            h.node_id()
        );
    }
}
