//! A deliberately minimal WebSocket client (RFC 6455), just enough to load a server cheaply.
//!
//! tokio-tungstenite allocates a message per frame and validates UTF-8; at a million
//! deliveries per second on a machine that the servers share, that would make the load
//! generator the bottleneck. Here a receiver reads into one large buffer, walks the frame
//! headers in place, looks for the `"t":` stamp in text payloads and bumps counters. It never
//! copies or parses the JSON.
//!
//! Client-to-server frames are masked as the RFC requires (with a fixed key: the mask protects
//! proxies from cache poisoning, which is irrelevant on loopback).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::clock;
use crate::hist::ConnStats;
use crate::{Context, Result, bail};

/// Any valid key works: the server only hashes it into Sec-WebSocket-Accept, which we do not
/// verify (the 101 status is proof enough that the server speaks WebSocket).
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
/// Upper bound of a frame we accept; larger means a confused stream.
const MAX_FRAME: usize = 64 << 20;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// A connection that completed the upgrade, with whatever bytes followed the 101 response.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) stream: TcpStream,
    pub(crate) buf: Vec<u8>,
    pub(crate) filled: usize,
}

/// Connects to `addr`, upgrades `GET /ws?room=ROOM` and checks for `101 Switching Protocols`.
///
/// `rcvbuf` shrinks SO_RCVBUF before connecting (it must be set before the handshake for the
/// TCP window to follow); `buf_size` is the size of the read buffer the caller will use.
pub(crate) async fn connect(
    addr: SocketAddr,
    room: &str,
    rcvbuf: Option<u32>,
    buf_size: usize,
) -> Result<Conn> {
    tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        connect_inner(addr, room, rcvbuf, buf_size),
    )
    .await
    .ctx(|| format!("websocket handshake with {addr} timed out"))?
}

async fn connect_inner(
    addr: SocketAddr,
    room: &str,
    rcvbuf: Option<u32>,
    buf_size: usize,
) -> Result<Conn> {
    let socket = TcpSocket::new_v4().ctx(|| "creating a TCP socket".to_string())?;
    if let Some(size) = rcvbuf {
        socket
            .set_recv_buffer_size(size)
            .ctx(|| "setting SO_RCVBUF".to_string())?;
    }
    let mut stream = socket
        .connect(addr)
        .await
        .ctx(|| format!("connecting to {addr}"))?;
    // Frames are small and latency is what we measure: never let Nagle hold one back.
    stream
        .set_nodelay(true)
        .ctx(|| "setting TCP_NODELAY".to_string())?;
    let request = format!(
        "GET /ws?room={room} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .ctx(|| format!("sending the upgrade request to {addr}"))?;

    let mut buf = vec![0u8; buf_size.max(4096)];
    let mut filled = 0;
    let header_end = loop {
        if let Some(pos) = find(&buf[..filled], b"\r\n\r\n") {
            break pos + 4;
        }
        if filled == buf.len() {
            bail!("upgrade response from {addr} has an oversized header");
        }
        let n = stream
            .read(&mut buf[filled..])
            .await
            .ctx(|| format!("reading the upgrade response from {addr}"))?;
        if n == 0 {
            bail!("{addr} closed the connection during the upgrade");
        }
        filled += n;
    };
    let status_line = buf[..header_end]
        .split(|b| *b == b'\r')
        .next()
        .unwrap_or(&[]);
    if !status_line.starts_with(b"HTTP/1.1 101") {
        bail!(
            "{addr} refused the upgrade: {}",
            String::from_utf8_lossy(status_line)
        );
    }
    // Frames may already follow the response in the same segment: keep them.
    buf.copy_within(header_end..filled, 0);
    filled -= header_end;
    Ok(Conn {
        stream,
        buf,
        filled,
    })
}

/// Appends one masked text frame carrying the benchmark payload
/// `{"t":T,"s":S,"q":Q,"p":"xxxx"}`, padded so that the JSON is `size` bytes long.
///
/// `scratch` is reused between calls to avoid an allocation per message.
pub(crate) fn push_message(
    out: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
    t: u64,
    sender: u32,
    seq: u64,
    size: usize,
) {
    use std::io::Write as _;
    scratch.clear();
    // Writing into a Vec cannot fail.
    let _ = write!(scratch, r#"{{"t":{t},"s":{sender},"q":{seq},"p":""#);
    // The padding is only 'x', so it can never contain the `"t":` marker receivers look for.
    let pad = size.saturating_sub(scratch.len() + 2);
    scratch.resize(scratch.len() + pad, b'x');
    scratch.extend_from_slice(b"\"}");

    let len = scratch.len();
    out.push(0x81); // FIN + text
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&MASK);
    out.extend(scratch.iter().zip(MASK.iter().cycle()).map(|(b, m)| b ^ m));
}

/// A masked pong answering a ping with `payload` (control payloads are at most 125 bytes).
fn pong_frame(payload: &[u8]) -> Vec<u8> {
    let payload = &payload[..payload.len().min(125)];
    let mut out = Vec::with_capacity(6 + payload.len());
    out.push(0x8a); // FIN + pong
    out.push(0x80 | payload.len() as u8);
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().zip(MASK.iter().cycle()).map(|(b, m)| b ^ m));
    out
}

/// Extracts the integer after `"t":` in a payload. The payload normally starts with it (both
/// reference servers keep key order), but a server may legitimately reorder keys, e.g. when it
/// goes through a sorted map, so fall back to a scan.
#[inline]
fn find_stamp(payload: &[u8]) -> Option<u64> {
    const MARK: &[u8] = b"\"t\":";
    let digits_at = if payload.len() > 5 && payload[0] == b'{' && &payload[1..5] == MARK {
        5
    } else {
        find(payload, MARK)? + MARK.len()
    };
    let mut v: u64 = 0;
    let mut any = false;
    for &b in payload[digits_at..]
        .iter()
        .skip_while(|b| b.is_ascii_whitespace())
    {
        if !b.is_ascii_digit() {
            break;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        any = true;
    }
    any.then_some(v)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads server frames until the connection ends, recording one latency sample per text
/// message. Returns `Ok(())` on a close frame or EOF.
///
/// `buf[..filled]` holds bytes already read (the tail of the handshake read). Pings are
/// answered through `pongs` (a real client answers them, and a server may close a client
/// that does not); `None` leaves them unanswered.
pub(crate) async fn read_loop<R: AsyncRead + Unpin>(
    mut rd: R,
    mut buf: Vec<u8>,
    mut filled: usize,
    stats: Arc<ConnStats>,
    pongs: Option<tokio::sync::mpsc::UnboundedSender<Vec<u8>>>,
) -> Result<()> {
    let mut start = 0;
    // Stamp of a fragmented text message whose final fragment is still to come.
    let mut fragment: Option<Option<u64>> = None;
    let mut now = clock::now_ns();
    loop {
        // One clock read per read() call: every frame of the batch had arrived by then, and
        // this keeps clock reads off the per-frame path.
        let window_start = clock::window_start_ns();
        let record = |stamp: Option<u64>| match stamp {
            Some(t) if t >= window_start => stats.record(now.saturating_sub(t) / 1000),
            Some(_) => stats.record_stale(),
            None => stats.record_bad(),
        };
        loop {
            let avail = &buf[start..filled];
            if avail.len() < 2 {
                break;
            }
            let (b0, b1) = (avail[0], avail[1]);
            let fin = b0 & 0x80 != 0;
            let opcode = b0 & 0x0f;
            let (mut header, len) = match b1 & 0x7f {
                126 if avail.len() >= 4 => {
                    (4, usize::from(u16::from_be_bytes([avail[2], avail[3]])))
                }
                127 if avail.len() >= 10 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&avail[2..10]);
                    (
                        10,
                        usize::try_from(u64::from_be_bytes(b)).unwrap_or(usize::MAX),
                    )
                }
                126 | 127 => break, // length bytes not read yet
                n => (2, usize::from(n)),
            };
            if b1 & 0x80 != 0 {
                // Servers must not mask (RFC 6455 5.1); tolerate it, but we do not unmask, so
                // such a server will show up as `bad` frames.
                header += 4;
            }
            if len > MAX_FRAME {
                bail!("server sent a {len}-byte frame; the stream is out of sync");
            }
            let total = header + len;
            if avail.len() < total {
                if total > buf.len() {
                    // Only reachable with messages larger than the read buffer.
                    buf.resize(total.next_power_of_two(), 0);
                }
                break;
            }
            let payload = &avail[header..total];
            match opcode {
                0x1 if fin => record(find_stamp(payload)),
                0x1 => fragment = Some(find_stamp(payload)),
                0x0 if fin => {
                    if let Some(stamp) = fragment.take() {
                        record(stamp);
                    }
                }
                0x0 => {}             // middle fragment: the stamp was in the first one
                0x8 => return Ok(()), // close: the server is done with us
                0x9 => {
                    if let Some(pongs) = &pongs {
                        let _ = pongs.send(pong_frame(payload));
                    }
                }
                0xa => {}          // pong: we send no pings
                _ => record(None), // binary or reserved opcode: not what the contract says
            }
            start += total;
        }
        // Keep the partial frame (if any) at the front so the next read appends to it.
        if start > 0 {
            buf.copy_within(start..filled, 0);
            filled -= start;
            start = 0;
        }
        let n = rd
            .read(&mut buf[filled..])
            .await
            .ctx(|| "reading from a websocket".to_string())?;
        if n == 0 {
            return Ok(());
        }
        filled += n;
        now = clock::now_ns();
    }
}
