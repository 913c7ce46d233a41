//! The HTTP side of the `users` scenario: a keep-alive HTTP/1.1 client and the workers that
//! send a batch of POSTs through it (paced or as fast as the nodes answer).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::procs::Cluster;
use crate::{Context, Result, bail};

/// A minimal HTTP/1.1 client on one keep-alive connection.
#[derive(Debug)]
pub(crate) struct Http {
    stream: TcpStream,
    addr: SocketAddr,
    buf: Vec<u8>,
}

impl Http {
    pub(crate) async fn connect(addr: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .ctx(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true).ctx(|| "TCP_NODELAY".to_string())?;
        Ok(Self {
            stream,
            addr,
            buf: Vec::with_capacity(4096),
        })
    }

    /// `POST path` with a JSON body: the status and the body of the answer.
    pub(crate) async fn post(&mut self, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>)> {
        let addr = self.addr;
        tokio::time::timeout(Duration::from_secs(30), self.post_inner(path, body))
            .await
            .ctx(|| format!("POST {path} to {addr}: no answer within 30 s"))?
            .ctx(|| format!("POST {path} to {addr}"))
    }

    async fn post_inner(&mut self, path: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            self.addr,
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        self.stream.write_all(&req).await?;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
                let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok());
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                let (Some(status), Some(len)) = (status, len) else {
                    return Err(std::io::Error::other(format!(
                        "unexpected answer: {head:?}"
                    )));
                };
                if self.buf.len() >= end + 4 + len {
                    let body = self.buf[end + 4..end + 4 + len].to_vec();
                    self.buf.drain(..end + 4 + len);
                    return Ok((status, body));
                }
            }
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// `N` of an answer `{"nodes":N}`.
fn nodes_of(body: &[u8]) -> Option<u64> {
    let at = body.windows(8).position(|w| w == b"\"nodes\":")? + 8;
    let digits: String = body[at..]
        .iter()
        .map(|b| *b as char)
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The POST of request `k`: its path and body (made when it is sent, so a stamp in it is the
/// send time).
pub(crate) type MakeRequest = Arc<dyn Fn(usize) -> (String, Vec<u8>) + Send + Sync>;

/// How a batch of POSTs went.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Posted {
    /// Answers `{"nodes":0}` (after the retries, when retrying).
    pub(crate) unreached: u64,
    /// Until the last answer arrived.
    pub(crate) secs: f64,
}

/// Sends requests `0..count` from `workers` keep-alive connections (worker `w` on node
/// `w % nodes`). With `pace` (start, per second), request `k` waits for its turn. With
/// `retry`, a `{"nodes":0}` is sent again (after 10 ms) until it says 1 or `retry` passes.
pub(crate) async fn post_all(
    addrs: &[SocketAddr],
    workers: usize,
    count: usize,
    make: MakeRequest,
    pace: Option<(Instant, f64)>,
    retry: Option<Duration>,
) -> Result<Posted> {
    let t0 = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..workers.min(count).max(1) {
        let (addr, next, make) = (addrs[w % addrs.len()], next.clone(), make.clone());
        tasks.push(tokio::spawn(async move {
            let mut http = Http::connect(addr).await?;
            let mut unreached = 0;
            loop {
                let k = next.fetch_add(1, Relaxed);
                if k >= count {
                    return Ok::<_, crate::Error>(unreached);
                }
                if let Some((start, rate)) = pace {
                    let due = start + Duration::from_secs_f64(k as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                let deadline = retry.map(|r| Instant::now() + r);
                loop {
                    let (path, body) = make(k);
                    let (status, answer) = http.post(&path, &body).await?;
                    if status != 200 {
                        bail!("POST {path}: {status} {}", String::from_utf8_lossy(&answer));
                    }
                    match (nodes_of(&answer), deadline) {
                        (Some(0), Some(d)) if Instant::now() < d => {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        (Some(0), Some(_)) => {
                            bail!("{path}: still {{\"nodes\":0}} after {retry:?}")
                        }
                        (Some(0), None) => break unreached += 1,
                        (Some(_), _) => break,
                        (None, _) => bail!("POST {path}: {}", String::from_utf8_lossy(&answer)),
                    }
                }
            }
        }));
    }
    let mut unreached = 0;
    for t in tasks {
        unreached += t.await.ctx(|| "a POST worker panicked".to_string())??;
    }
    Ok(Posted {
        unreached,
        secs: t0.elapsed().as_secs_f64(),
    })
}

/// The port of the cluster's one redis-server.
pub(crate) fn redis_port(cluster: &Cluster) -> Result<u16> {
    if cluster.redis_ports.len() != 1 {
        bail!("users needs a single redis server (drop --redis-cluster)");
    }
    Ok(cluster.redis_ports[0])
}
