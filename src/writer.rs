//! The writing half of every socket: one task per socket that drains its queue in batches.
//!
//! The writer waits for one frame, takes everything queued (up to a batch cap), `feed`s each
//! and flushes once, as socketioxide's engine does: many frames per write under load, no added
//! latency when idle. While it waits, its sink is parked in the socket's queue, where the
//! dispatcher may write a frame at once without waking it.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use futures_util::SinkExt;
use tokio::time::{Instant, timeout};

use crate::close;
use crate::config::Config;
use crate::queue::{Next, Outbox};
use crate::registry::SocketId;
use crate::stats::Counters;

/// Frames one write must carry before the writer waits out the flush interval (or a full
/// batch, when `batch_frames` is smaller). Two to seven frames are a short burst (three
/// senders in a room at a moderate rate): waiting after them doubles the p99 of a moderate
/// load and saves no CPU; under overload writes carry tens of frames and still gather
/// (BENCHMARKS.md).
const GATHER_FROM_FRAMES: usize = 8;

/// How long the writer tries to deliver a close frame before it gives up on the client.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// The close frame of a node that is shutting down (1001).
pub(crate) fn going_away() -> CloseFrame {
    CloseFrame {
        code: close::GOING_AWAY,
        reason: Utf8Bytes::from_static(close::SHUTTING_DOWN_REASON),
    }
}

/// Drains the socket's queue: take everything queued (up to the batch cap), `feed` each frame,
/// flush once, through the sink parked in `outbox` ([`Outbox::park`]) before the loop starts.
/// Taking the sink from there, rather than as an argument, keeps it out of this task's own
/// state: one boxed sink per socket, not a second slot for it in every idle writer.
///
/// `_running` is dropped when the loop ends, however it ends: the connection is over then (a
/// [`WriterGuard`](crate::lifecycle::WriterGuard) among it tells a waiting shutdown).
pub(crate) async fn write_loop(
    outbox: Arc<Outbox>,
    config: Arc<Config>,
    counters: Arc<Counters>,
    id: SocketId,
    _running: impl Send,
) {
    let max = config.batch_frames.get();
    let write_timeout = config.write_timeout;
    let interval = config.flush_interval;
    let mut batch = Vec::new();
    // When the last flush carried many frames, traffic is outrunning the writer: wait out
    // the flush interval so the next write gathers more. A few frames mean the socket is
    // keeping up (a short burst), and the next frame goes out at once.
    let gather_from = GATHER_FROM_FRAMES.min(max).max(2);
    let mut gather_after: Option<Instant> = None;
    loop {
        // While waiting for frames, the writer also reads the client when its handler does
        // not (see `queue::reading`): pongs keep a push-only socket alive, and a close or a
        // dead connection ends it at once.
        let next = tokio::select! {
            next = outbox.next_batch(&mut batch, max, gather_after) => next,
            () = std::future::poll_fn(|cx| outbox.poll_idle_read(cx)) => continue,
        };
        // Only this task takes the sink out; it is back in the slot whenever the task waits
        // in `next_batch`, so it is there unless a bug lost it.
        let Some(mut sink) = outbox.unpark() else {
            tracing::error!(socket = %id, "the socket's writing half is missing; closing");
            outbox.close_now(close::INTERNAL_ERROR, close::INTERNAL_ERROR_REASON);
            break;
        };
        match next {
            Next::Frames => {
                let written = timeout(write_timeout, async {
                    for frame in batch.drain(..) {
                        sink.feed(frame).await?;
                    }
                    sink.flush().await
                })
                .await;
                batch.clear();
                // Includes a frame the dispatcher wrote but could not flush.
                let frames = outbox.flushed();
                gather_after = (frames >= gather_from && !interval.is_zero())
                    .then(|| Instant::now() + interval);
                match written {
                    Ok(Ok(())) => {
                        counters.socket_writes.add(1);
                        counters.frames_written.add(frames as u64);
                        outbox.park(sink);
                    }
                    Ok(Err(e)) => {
                        // The client is gone; nothing more can be written.
                        tracing::debug!(socket = %id, error = %e, "write failed; closing");
                        outbox.close_after_flush(None);
                        let _ = timeout(CLOSE_TIMEOUT, sink.close()).await;
                        break;
                    }
                    Err(_) => {
                        counters.slow_disconnects.add(1);
                        tracing::warn!(
                            socket = %id,
                            timeout_ms = write_timeout.as_millis() as u64,
                            "write timed out; closing slow consumer"
                        );
                        outbox.close_slow_consumer();
                        // Parked for the close frame, which `next_batch` returns next.
                        outbox.park(sink);
                    }
                }
            }
            Next::Close(frame) => {
                if let Some(frame) = frame {
                    let _ = timeout(CLOSE_TIMEOUT, sink.send(Message::Close(Some(frame)))).await;
                }
                let _ = timeout(CLOSE_TIMEOUT, sink.close()).await;
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::config::{FanoutBuilder, OverflowPolicy};
    use crate::lifecycle::Lifecycle;
    use crate::queue::Limits;
    use crate::queue::testing::Recorder;

    /// What a writer needs of its node: settings, counters, and the lifecycle that counts it.
    struct Node {
        config: Arc<Config>,
        counters: Arc<Counters>,
        lifecycle: Arc<Lifecycle>,
    }

    fn node(builder: FanoutBuilder) -> Node {
        Node {
            config: Arc::new(builder.into_config_for_tests()),
            counters: Arc::new(Counters::default()),
            lifecycle: Arc::new(Lifecycle::new(100)),
        }
    }

    fn writer(
        node: &Node,
        sink: Recorder,
        ob: &Arc<Outbox>,
        id: u64,
    ) -> impl Future<Output = ()> + use<> {
        ob.park(Box::pin(sink));
        write_loop(
            ob.clone(),
            node.config.clone(),
            node.counters.clone(),
            SocketId::from_wire(id),
            node.lifecycle.writer_started(),
        )
    }

    fn outbox() -> Arc<Outbox> {
        Arc::new(Outbox::new(Limits {
            frames: 100,
            bytes: 1 << 20,
        }))
    }

    fn text(s: &str) -> Message {
        Message::Text(s.into())
    }

    #[tokio::test]
    async fn everything_queued_goes_out_with_one_flush_then_the_close_frame() {
        let node = node(FanoutBuilder::new("redis://unused"));
        let (sink, ob) = (Recorder::default(), outbox());
        for i in 0..10 {
            ob.offer(text(&i.to_string()), OverflowPolicy::Disconnect);
        }
        ob.close_after_flush(Some(going_away()));
        writer(&node, sink.clone(), &ob, 1).await;
        let frames = sink.frames.lock().unwrap();
        assert_eq!(frames.len(), 11);
        assert!(matches!(&frames[10], Message::Close(Some(c)) if c.code == close::GOING_AWAY));
        // One flush for the ten frames, one for the close frame.
        assert_eq!(sink.flushes.load(Ordering::SeqCst), 2);
        assert_eq!(node.counters.socket_writes.get(), 1);
        assert_eq!(node.counters.frames_written.get(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_socket_gathers_frames_for_the_flush_interval() {
        let node =
            node(FanoutBuilder::new("redis://unused").flush_interval(Duration::from_millis(4)));
        let (sink, ob) = (Recorder::default(), outbox());
        let writer = tokio::spawn(writer(&node, sink.clone(), &ob, 1));
        let flushes = || sink.flushes.load(Ordering::SeqCst);
        // A lone frame goes out at once.
        ob.offer(text("a"), OverflowPolicy::Disconnect);
        tokio::time::sleep(Duration::from_micros(10)).await;
        assert_eq!(flushes(), 1);
        // A short burst (two frames) is one write, and the socket still counts as keeping up:
        // the next frame goes out at once.
        ob.offer(text("b"), OverflowPolicy::Disconnect);
        ob.offer(text("c"), OverflowPolicy::Disconnect);
        tokio::time::sleep(Duration::from_micros(10)).await;
        assert_eq!(flushes(), 2);
        ob.offer(text("d"), OverflowPolicy::Disconnect);
        tokio::time::sleep(Duration::from_micros(10)).await;
        assert_eq!(
            flushes(),
            3,
            "a short burst does not hold the next frame back"
        );
        // A write of GATHER_FROM_FRAMES frames: traffic outruns the socket, so what follows
        // within 4 ms is gathered into one write.
        for i in 0..GATHER_FROM_FRAMES {
            ob.offer(text(&format!("burst {i}")), OverflowPolicy::Disconnect);
        }
        tokio::time::sleep(Duration::from_micros(10)).await;
        assert_eq!(flushes(), 4);
        for s in ["e", "f", "g"] {
            ob.offer(text(s), OverflowPolicy::Disconnect);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(flushes(), 4, "still gathering");
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(flushes(), 5, "e, f, g in one flush");
        assert_eq!(sink.frames.lock().unwrap().len(), 7 + GATHER_FROM_FRAMES);
        ob.close_now(close::NORMAL, "bye");
        writer.await.expect("writer ends");
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_times_out_closes_the_slow_consumer_and_counts_it() {
        let node = node(FanoutBuilder::new("redis://unused").write_timeout(Duration::from_secs(5)));
        let sink = Recorder {
            stall: true,
            ..Recorder::default()
        };
        let ob = outbox();
        ob.offer(text("never flushed"), OverflowPolicy::Disconnect);
        writer(&node, sink, &ob, 7).await;
        assert!(ob.is_closing());
        assert_eq!(node.counters.slow_disconnects.get(), 1);
        assert_eq!(ob.held(), (0, 0), "nothing held after the close");
    }
}
