//! Counters: every message published, delivered, dropped or rejected is counted here.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// One monotonic counter, mirrored to the [`metrics`] facade under `name` so that any installed
/// recorder (a Prometheus exporter, say) sees the same numbers as [`Stats`].
///
/// The facade's handle is taken once, when the node is built: looking it up on every count
/// cost a recorder's registry look-up per broadcast and per socket write (BENCHMARKS.md). So
/// install the recorder before building the layer, as the `metrics` crate advises; a node
/// built before it counts in [`Stats`] only.
#[derive(Debug)]
pub(crate) struct Counter {
    value: AtomicU64,
    // Read by the tests that pin the metric names (the handle does not give it back).
    #[cfg_attr(not(test), allow(dead_code))]
    name: &'static str,
    handle: metrics::Counter,
}

impl Counter {
    fn new(name: &'static str) -> Self {
        Self {
            value: AtomicU64::new(0),
            name,
            handle: metrics::counter!(name),
        }
    }

    pub(crate) fn add(&self, n: u64) {
        if n > 0 {
            // Relaxed: each counter is independent and only read for reporting.
            self.value.fetch_add(n, Relaxed);
            self.handle.increment(n);
        }
    }

    pub(crate) fn get(&self) -> u64 {
        self.value.load(Relaxed)
    }
}

/// Declares every statistic once. Gauges are current sizes read from the registry and the
/// lifecycle; counters are totals. From one list it makes the public [`Stats`] (field order is
/// its serde order: gauges, then counters), [`Counters`] with each counter's metric name
/// (`axum_fanout_<field>_total`, as [`Stats`] promises), [`Gauges`], and the snapshot, so a
/// counter added here is counted, reported and exported alike.
macro_rules! statistics {
    (
        gauges { $( $(#[$gauge_doc:meta])* $gauge:ident, )* }
        counters { $( $(#[$counter_doc:meta])* $counter:ident, )* }
    ) => {
        /// A snapshot of one node's activity, from [`RoomHandle::stats`](crate::RoomHandle::stats).
        ///
        /// Counters are totals since the node started; `rooms`, `connections`, `memberships`,
        /// `subscriptions` and `dispatch_lag_ms` are current values, also reported through the
        /// [`metrics`] facade as gauges `axum_fanout_<field>` (label `node`) whenever a snapshot
        /// is taken (a scrape that reads the stats first is current). Each counter is also reported through the
        /// [`metrics`] facade as `axum_fanout_<field>_total` (e.g.
        /// `axum_fanout_delivered_total`), so an installed recorder such as a Prometheus
        /// exporter collects them with no further code.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
        #[non_exhaustive]
        pub struct Stats {
            $( $(#[$gauge_doc])* pub $gauge: usize, )*
            $( $(#[$counter_doc])* pub $counter: u64, )*
        }

        /// The counters of one node, shared by its tasks.
        #[derive(Debug)]
        pub(crate) struct Counters {
            $( pub(crate) $counter: Counter, )*
        }

        impl Default for Counters {
            fn default() -> Self {
                Self {
                    $( $counter: Counter::new(
                        concat!("axum_fanout_", stringify!($counter), "_total"),
                    ), )*
                }
            }
        }

        /// The current sizes of a node's registry and lifecycle: the part of [`Stats`] that is
        /// not a counter.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub(crate) struct Gauges {
            $( pub(crate) $gauge: usize, )*
        }

        impl Gauges {
            /// Reports every gauge through the [`metrics`] facade as `axum_fanout_<field>`,
            /// labelled with the node's id (several nodes may share a process).
            pub(crate) fn report(&self, node: &str) {
                $(
                    metrics::gauge!(
                        concat!("axum_fanout_", stringify!($gauge)),
                        "node" => node.to_owned()
                    )
                    .set(self.$gauge as f64);
                )*
            }
        }

        impl Counters {
            pub(crate) fn snapshot(&self, gauges: Gauges) -> Stats {
                Stats {
                    $( $gauge: gauges.$gauge, )*
                    $( $counter: self.$counter.get(), )*
                }
            }

            /// Every counter's metric name, in declaration order.
            #[cfg(test)]
            fn metric_names(&self) -> Vec<&'static str> {
                vec![$( self.$counter.name ),*]
            }
        }
    };
}

statistics! {
    gauges {
        /// Rooms with at least one local socket (users' own channels not counted: see
        /// `subscriptions`).
        rooms,
        /// WebSocket connections attached to this node, in rooms or not.
        connections,
        /// (socket, room) memberships: a socket in two rooms counts twice.
        memberships,
        /// Channels Redis confirmed for this node: rooms', and one per user with a local
        /// socket ([`crate::users`]).
        subscriptions,
        /// Milliseconds from the publisher's stamp of the last message this node dispatched to
        /// its dispatch (the histogram `axum_fanout_dispatch_lag_seconds` has every one): a
        /// node falling behind shows here before Redis drops it. Includes the clock skew
        /// between the publishing node and this one.
        dispatch_lag_ms,
    }
    counters {
        /// Envelopes this node published (PUBLISH replied).
        published,
        /// Broadcasts that failed (Redis error or timeout).
        publish_errors,
        /// Envelopes received from Redis and decoded.
        received,
        /// Frames handed to local sockets' queues.
        delivered,
        /// Frames dropped because a socket's queue was full.
        dropped,
        /// Sockets closed because they could not keep up (queue full or write timeout).
        slow_disconnects,
        /// Envelopes dropped because they could not be decoded.
        malformed,
        /// Messages dropped between Redis and the dispatcher because it fell behind.
        inbound_dropped,
        /// Times the subscriber link was lost and re-established.
        reconnects,
        /// Upgrades refused with 503 because the node was at `max_connections`.
        rejected_connections,
        /// Sockets closed for sending faster than the message rate limit.
        rate_limited,
        /// Sockets closed because the client stopped answering pings.
        heartbeat_timeouts,
        /// Batched writes (one flush each) by the sockets' writers.
        socket_writes,
        /// Frames those writes carried: `frames_written / socket_writes` is the batching achieved.
        frames_written,
        /// Accepts that failed because the process or the system ran out of file descriptors
        /// (with [`FanoutListener`](crate::FanoutListener)): each left a connection waiting.
        accepts_out_of_fds,
        /// Durable rooms' history reads sent to Redis (resumes, gap repairs, history requests):
        /// resumes of the same room and place at once share one.
        history_reads,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The JSON keys and the metric names are public contracts (dashboards, the chat example's
    // /stats, alerts): written out here so that a change to the list above shows in a test.

    #[test]
    fn stats_serialize_with_the_same_keys_in_the_same_order() {
        let json = serde_json::to_string(&Stats::default()).expect("serializes");
        assert_eq!(
            json,
            concat!(
                r#"{"rooms":0,"connections":0,"memberships":0,"subscriptions":0,"dispatch_lag_ms":0,"#,
                r#""published":0,"publish_errors":0,"received":0,"delivered":0,"dropped":0,"#,
                r#""slow_disconnects":0,"malformed":0,"inbound_dropped":0,"reconnects":0,"#,
                r#""rejected_connections":0,"rate_limited":0,"heartbeat_timeouts":0,"#,
                r#""socket_writes":0,"frames_written":0,"accepts_out_of_fds":0,"#,
                r#""history_reads":0}"#
            )
        );
    }

    #[test]
    fn every_counter_keeps_its_metric_name() {
        assert_eq!(
            Counters::default().metric_names(),
            [
                "axum_fanout_published_total",
                "axum_fanout_publish_errors_total",
                "axum_fanout_received_total",
                "axum_fanout_delivered_total",
                "axum_fanout_dropped_total",
                "axum_fanout_slow_disconnects_total",
                "axum_fanout_malformed_total",
                "axum_fanout_inbound_dropped_total",
                "axum_fanout_reconnects_total",
                "axum_fanout_rejected_connections_total",
                "axum_fanout_rate_limited_total",
                "axum_fanout_heartbeat_timeouts_total",
                "axum_fanout_socket_writes_total",
                "axum_fanout_frames_written_total",
                "axum_fanout_accepts_out_of_fds_total",
                "axum_fanout_history_reads_total",
            ]
        );
    }

    #[test]
    fn a_snapshot_carries_the_gauges_and_every_counter() {
        let counters = Counters::default();
        counters.delivered.add(3);
        counters.accepts_out_of_fds.add(1);
        let gauges = Gauges {
            rooms: 1,
            connections: 2,
            memberships: 3,
            subscriptions: 4,
            dispatch_lag_ms: 5,
        };
        let s = counters.snapshot(gauges);
        assert_eq!(
            (s.rooms, s.connections, s.memberships, s.subscriptions),
            (1, 2, 3, 4)
        );
        assert_eq!((s.delivered, s.accepts_out_of_fds, s.published), (3, 1, 0));
    }
}
