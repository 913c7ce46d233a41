//! No leaks under churn: 15,000 connect / join / leave / disconnect cycles over 3 nodes and 100
//! rooms (6,000 to warm up, 9,000 measured), a quarter of them dropping TCP without a close frame, end with no subscribed channel,
//! no registry entry, no live writer task, and memory back where it was once warmed up.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum_fanout::FanoutLayer;
use futures_util::SinkExt;
use support::*;
use tokio_tungstenite::tungstenite;

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

async fn cycle(url: String, n: usize) {
    let mut ws = connect(&url).await;
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

    // Warm up (allocator arenas, hash map capacities): the warmed-up level is the highest RSS
    // seen over the first 6,000 cycles, sampled every 1,000 (glibc may open another arena late,
    // a one-off step of a megabyte or two). Then the next 9,000 cycles must not grow past it by
    // 10%: a leak of even 200 bytes per cycle would.
    let mut warm = 0;
    for k in 0..5 {
        run_cycles(&servers, k * 1_000, (k + 1) * 1_000).await;
        wait_until("quiet during warm-up", quiet).await;
        warm = warm.max(rss_kib());
    }
    run_cycles(&servers, 5_000, 6_000).await;
    wait_until("quiet after warm-up", quiet).await;
    warm = warm.max(rss_kib());
    let mut samples = Vec::new();
    for k in 6..15 {
        run_cycles(&servers, k * 1_000, (k + 1) * 1_000).await;
        samples.push(rss_kib());
    }
    wait_until("quiet after 15,000 cycles", quiet).await;
    let after = rss_kib();
    eprintln!(
        "RSS warmed up {warm} KiB; every 1,000 cycles after: {samples:?}; at the end {after} KiB"
    );
    assert!(
        after <= warm + warm / 10,
        "RSS grew more than 10%: {warm} KiB -> {after} KiB"
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
