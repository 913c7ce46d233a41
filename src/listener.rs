//! [`FanoutListener`]: the accept loop of a node's server, for `axum::serve`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::Listener;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::stats::Counters;

/// How often a node out of file descriptors logs it (with the count since the last line).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// How long to wait before accepting again when out of file descriptors: one frees as soon as
/// any connection closes, so retry soon, but do not spin on the error.
const RETRY_AFTER_EMFILE: Duration = Duration::from_millis(50);

/// A TCP listener for `axum::serve` that sets `TCP_NODELAY` on every accepted connection and
/// says when the node runs out of file descriptors. From [`RoomHandle::listener`].
///
/// `TCP_NODELAY` matters for small frames, which otherwise wait for Nagle's algorithm. Running
/// out of file descriptors (`EMFILE` for the process, `ENFILE` for the system) leaves new
/// connections waiting in the listen backlog while every open one keeps being served; this
/// listener logs it (a warning at most every 10 s, with the count) and counts each failed
/// accept in [`Stats::accepts_out_of_fds`](crate::Stats::accepts_out_of_fds), so `/stats`
/// shows it. Raise the limit (`ulimit -n`) or spread the sockets over more nodes.
///
/// ```no_run
/// # async fn run(app: axum::Router, rooms: axum_fanout::RoomHandle) -> std::io::Result<()> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
/// axum::serve(rooms.listener(listener), app).await
/// # }
/// ```
///
/// [`RoomHandle::listener`]: crate::RoomHandle::listener
#[derive(Debug)]
pub struct FanoutListener {
    inner: TcpListener,
    counters: Arc<Counters>,
    warned_at: Option<Instant>,
    since_warned: u64,
}

impl FanoutListener {
    pub(crate) fn new(inner: TcpListener, counters: Arc<Counters>) -> Self {
        Self {
            inner,
            counters,
            warned_at: None,
            since_warned: 0,
        }
    }

    fn out_of_fds(&mut self, e: &io::Error) {
        self.counters.accepts_out_of_fds.add(1);
        self.since_warned += 1;
        let now = Instant::now();
        if self.warned_at.is_some_and(|at| now < at + WARN_EVERY) {
            return;
        }
        // Taken outside the macro: tracing skips evaluating fields when the level is off.
        let failed_accepts = std::mem::take(&mut self.since_warned);
        tracing::warn!(
            error = %e,
            failed_accepts,
            "cannot accept new connections: out of file descriptors; they wait in the backlog \
             while open ones are served (raise `ulimit -n`, or spread sockets over more nodes)"
        );
        self.warned_at = Some(now);
    }
}

/// `EMFILE` (the process's limit) or `ENFILE` (the system's): 24 and 23 on Linux, macOS and
/// the BSDs.
fn is_out_of_fds(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(23 | 24))
}

/// Errors of one connection that went away before it was accepted: nothing to wait for.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

impl Listener for FanoutListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((tcp, addr)) => {
                    if let Err(e) = tcp.set_nodelay(true) {
                        tracing::debug!(error = %e, "could not set TCP_NODELAY");
                    }
                    return (tcp, addr);
                }
                Err(e) if is_out_of_fds(&e) => {
                    self.out_of_fds(&e);
                    tokio::time::sleep(RETRY_AFTER_EMFILE).await;
                }
                Err(e) if is_connection_error(&e) => {}
                Err(e) => {
                    // As axum's own TcpListener does: log, and do not spin on a lasting error.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emfile_and_enfile_are_told_apart_from_other_errors() {
        assert!(is_out_of_fds(&io::Error::from_raw_os_error(24)));
        assert!(is_out_of_fds(&io::Error::from_raw_os_error(23)));
        assert!(!is_out_of_fds(&io::Error::from_raw_os_error(104)));
        assert!(!is_out_of_fds(&io::ErrorKind::ConnectionReset.into()));
    }

    #[tokio::test(start_paused = true)]
    async fn running_out_of_fds_is_counted_every_time_and_logged_at_most_every_10_s() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let counters = Arc::new(Counters::default());
        let mut l = FanoutListener::new(tcp, counters.clone());
        let e = io::Error::from_raw_os_error(24);
        l.out_of_fds(&e);
        let first = l.warned_at.expect("logged at once");
        l.out_of_fds(&e);
        l.out_of_fds(&e);
        assert_eq!(l.warned_at, Some(first), "quiet within 10 s");
        assert_eq!(l.since_warned, 2, "held back, counted for the next line");
        tokio::time::advance(WARN_EVERY).await;
        l.out_of_fds(&e);
        assert_eq!(l.since_warned, 0);
        assert_eq!(counters.accepts_out_of_fds.get(), 4);
    }
}
