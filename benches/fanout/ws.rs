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
//!
//! The same client speaks the socket.io variant of the contract ([`Proto::SocketIo`]: Engine.IO
//! v4 / Socket.IO v5 over the websocket transport only, no polling, no upgrade). After the
//! HTTP upgrade of `/socket.io/?EIO=4&transport=websocket&room=NAME` the server sends the
//! Engine.IO open packet `0{"sid":..}`; the client sends `40` (connect to namespace `/`) and
//! the socket is ready once the server answers `40{"sid":..}`. A message is the event packet
//! `42["msg",V]` both ways, one packet per WebSocket frame; the receiver skips the fixed
//! `42["msg",` prefix and finds the `"t":` stamp in V as in the plain mode. Engine.IO pings
//! (`2`) are answered with `3`; other packets (noop, namespace packets) are not deliveries and
//! are ignored, and `1` (close) or `41` (namespace disconnect) end the connection.
//!
//! It also speaks the fanout protocol ([`Proto::Fanout`], PROTOCOL.md part 1): the upgrade of
//! `/fanout?user=NAME` offers `Sec-WebSocket-Protocol: fanout.v1` (the chat example's permissive
//! authorization takes the user from the query), then the client sends
//! `{"id":1,"cmd":"join","room":R}` (one join per room, ids 1..) and the socket is ready once
//! every join got its `reply` with a `result` (an `error` fails the connect). A publisher sends
//! `{"id":N,"cmd":"publish","room":R,"data":V}` around the same payload V and gets one `reply`
//! per publish, which is not a delivery; a delivery is a `{"type":"message",..,"data":V}` frame,
//! whose stamp is found in V by the same scan.

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

/// Which variant of the contract a target speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proto {
    /// `GET /ws?room=NAME`, one JSON text frame per message.
    Ws,
    /// socket.io: Engine.IO v4 / Socket.IO v5 over websocket, event `msg`.
    SocketIo,
    /// The fanout protocol (`fanout.v1`) at `/fanout`: `join` commands, `publish` commands,
    /// `message` pushes. `acked: false` publishes without an id (fire-and-forget: no reply),
    /// as `/ws` and socket.io clients do; `true` as the JavaScript client does by default.
    Fanout { acked: bool },
}

impl Proto {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Proto::Ws => "ws",
            Proto::SocketIo => "socket.io",
            Proto::Fanout { .. } => "fanout.v1",
        }
    }

    pub(crate) fn path(self, room: &str) -> String {
        match self {
            Proto::Ws => format!("/ws?room={room}"),
            Proto::SocketIo => format!("/socket.io/?EIO=4&transport=websocket&room={room}"),
            // The rooms are joined by commands after the upgrade; the user only names the
            // socket (the permissive authorization of the chat example lets anyone in).
            Proto::Fanout { .. } => format!("/fanout?user=bench-{room}"),
        }
    }
}

/// Ids of a fanout connection's `join` commands are 1..=rooms; publishes use ids above this
/// (unique per socket while in flight, as the protocol asks).
const FANOUT_PUBLISH_ID_BASE: u64 = 1 << 20;

/// Prefix of a socket.io `msg` event packet; V follows, then `]`.
const SIO_EVENT: &[u8] = br#"42["msg","#;
/// Prefix of a fanout protocol `message` push (the node writes `type` first).
const FANOUT_MESSAGE: &[u8] = br#"{"type":"message""#;

/// A connection that completed the upgrade, with whatever bytes followed the 101 response.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) stream: TcpStream,
    pub(crate) buf: Vec<u8>,
    pub(crate) filled: usize,
}

/// Connects to `addr`, upgrades `GET /ws?room=ROOM` (or the socket.io path) and checks for
/// `101 Switching Protocols`; with [`Proto::SocketIo`] it also completes the Engine.IO open
/// and the namespace connect, so the socket is in the room when this returns.
///
/// `rcvbuf` shrinks SO_RCVBUF before connecting (it must be set before the handshake for the
/// TCP window to follow); `buf_size` is the size of the read buffer the caller will use.
pub(crate) async fn connect(
    addr: SocketAddr,
    room: &str,
    proto: Proto,
    rcvbuf: Option<u32>,
    buf_size: usize,
) -> Result<Conn> {
    let conn = connect_path(addr, &proto.path(room), proto, rcvbuf, buf_size).await?;
    if matches!(proto, Proto::Fanout { .. }) {
        return fanout_join(conn, &[room], addr).await;
    }
    Ok(conn)
}

/// A [`Proto::Fanout`] connection to `/fanout?user=USER` that joined every room of `rooms`
/// (one `join` command each, all sent at once) before it returns.
pub(crate) async fn connect_fanout_rooms(
    addr: SocketAddr,
    user: &str,
    rooms: &[&str],
    buf_size: usize,
) -> Result<Conn> {
    let path = format!("/fanout?user={user}");
    let conn = connect_path(addr, &path, Proto::Fanout { acked: true }, None, buf_size).await?;
    fanout_join(conn, rooms, addr).await
}

/// Sends `{"id":I,"cmd":"join","room":R}` for every room (ids 1..) and waits for as many
/// successful replies. Frames other than replies (a `message` of a room joined a moment ago)
/// are skipped: they arrive before the socket counts as ready, so before any measurement.
async fn fanout_join(conn: Conn, rooms: &[&str], addr: SocketAddr) -> Result<Conn> {
    let mut out = Vec::with_capacity(64 * rooms.len());
    for (i, room) in rooms.iter().enumerate() {
        let cmd = serde_json::json!({ "id": i + 1, "cmd": "join", "room": room });
        text_frame(&mut out, cmd.to_string().as_bytes());
    }
    let join = async {
        let mut reader = TextReader::new(conn);
        reader
            .stream()
            .write_all(&out)
            .await
            .ctx(|| format!("sending the joins to {addr}"))?;
        let mut joined = 0;
        while joined < rooms.len() {
            let text = reader.next_text().await?;
            // Replies are built as JSON objects whose key order is not the wire's promise.
            if text.starts_with(FANOUT_MESSAGE) || find(text, br#""type":"reply""#).is_none() {
                continue;
            }
            if find(text, br#""error":"#).is_some() {
                bail!("{addr} refused a join: {}", String::from_utf8_lossy(text));
            }
            joined += 1;
        }
        Ok(reader.into_conn())
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, join)
        .await
        .ctx(|| format!("joining {} room(s) at {addr} timed out", rooms.len()))?
}

/// [`connect`] with an explicit request path (`/ws?room=R&positions=1&since=E:S` for the durable resume).
pub(crate) async fn connect_path(
    addr: SocketAddr,
    path: &str,
    proto: Proto,
    rcvbuf: Option<u32>,
    buf_size: usize,
) -> Result<Conn> {
    tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        connect_inner(addr, path, proto, rcvbuf, buf_size),
    )
    .await
    .ctx(|| format!("{} handshake with {addr} timed out", proto.name()))?
}

async fn connect_inner(
    addr: SocketAddr,
    path: &str,
    proto: Proto,
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
    let subprotocol = if matches!(proto, Proto::Fanout { .. }) {
        "Sec-WebSocket-Protocol: fanout.v1\r\n"
    } else {
        ""
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\
         {subprotocol}\r\n"
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
    if proto == Proto::SocketIo {
        sio_handshake(&mut stream, &mut buf, &mut filled, addr).await?;
    }
    Ok(Conn {
        stream,
        buf,
        filled,
    })
}

/// Header of one complete server frame at the front of `avail`: (FIN, opcode, header length,
/// payload length), or `None` when the frame is not entirely there yet.
fn complete_frame(avail: &[u8]) -> Option<(bool, u8, usize, usize)> {
    if avail.len() < 2 {
        return None;
    }
    let (b0, b1) = (avail[0], avail[1]);
    let (mut header, len): (usize, usize) = match b1 & 0x7f {
        126 if avail.len() >= 4 => (4, usize::from(u16::from_be_bytes([avail[2], avail[3]]))),
        127 if avail.len() >= 10 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&avail[2..10]);
            (10, usize::try_from(u64::from_be_bytes(b)).ok()?)
        }
        126 | 127 => return None,
        n => (2, usize::from(n)),
    };
    if b1 & 0x80 != 0 {
        header += 4;
    }
    (avail.len() >= header.checked_add(len)?).then_some((b0 & 0x80 != 0, b0 & 0x0f, header, len))
}

/// Reads the text messages of a plain WebSocket connection one by one (pings are answered, so
/// a socket held for longer than the server's ping interval stays open; other control frames
/// are skipped). For the durable resume and the presence measurements, where the frames'
/// content matters: it walks the buffer with a cursor and moves the unread rest to the front
/// only before a read, so a burst of frames costs no more than reading it.
#[derive(Debug)]
pub(crate) struct TextReader {
    conn: Conn,
    start: usize,
}

impl TextReader {
    pub(crate) fn new(conn: Conn) -> Self {
        Self { conn, start: 0 }
    }

    /// The socket, e.g. to write to it.
    pub(crate) fn stream(&mut self) -> &mut TcpStream {
        &mut self.conn.stream
    }

    /// The connection back, with the bytes not read yet at the front of its buffer.
    pub(crate) fn into_conn(self) -> Conn {
        let Self { mut conn, start } = self;
        conn.buf.copy_within(start..conn.filled, 0);
        conn.filled -= start;
        conn
    }

    /// The next complete text message (valid until the next call).
    pub(crate) async fn next_text(&mut self) -> Result<&[u8]> {
        loop {
            let c = &mut self.conn;
            if let Some((fin, opcode, header, len)) = complete_frame(&c.buf[self.start..c.filled]) {
                let at = self.start + header;
                self.start = at + len;
                match opcode {
                    0x1 if fin => return Ok(&self.conn.buf[at..at + len]),
                    0x8 => bail!("the server closed the websocket"),
                    0x9 => {
                        let pong = pong_frame(&c.buf[at..at + len]);
                        c.stream
                            .write_all(&pong)
                            .await
                            .ctx(|| "answering a ping".to_string())?;
                        continue;
                    }
                    0xa => continue,
                    _ => bail!("unexpected frame (opcode {opcode}, fin {fin})"),
                }
            }
            c.buf.copy_within(self.start..c.filled, 0);
            c.filled -= self.start;
            self.start = 0;
            if c.filled == c.buf.len() {
                let grow = c.buf.len() * 2;
                c.buf.resize(grow, 0);
            }
            let n = c
                .stream
                .read(&mut c.buf[c.filled..])
                .await
                .ctx(|| "reading from a websocket".to_string())?;
            if n == 0 {
                bail!("the server closed the connection");
            }
            c.filled += n;
        }
    }
}

/// Holds a plain WebSocket connection open until the server closes it: answers pings, skips
/// every other frame, and returns the close frame's status code (`None` when the close frame
/// carried none, or the connection ended without one). For the `users` scenario, where what
/// counts is when and how a socket was closed, not what it received.
pub(crate) async fn until_close(conn: Conn) -> Result<Option<u16>> {
    let Conn {
        mut stream,
        mut buf,
        mut filled,
    } = conn;
    let mut start = 0;
    loop {
        while let Some((_, opcode, header, len)) = complete_frame(&buf[start..filled]) {
            let payload = &buf[start + header..start + header + len];
            match opcode {
                0x8 => {
                    return Ok(
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))
                    );
                }
                0x9 => stream
                    .write_all(&pong_frame(payload))
                    .await
                    .ctx(|| "answering a ping".to_string())?,
                _ => {}
            }
            start += header + len;
        }
        buf.copy_within(start..filled, 0);
        filled -= start;
        start = 0;
        if filled == buf.len() {
            let grow = buf.len() * 2;
            buf.resize(grow, 0);
        }
        let n = stream
            .read(&mut buf[filled..])
            .await
            .ctx(|| "reading from a websocket".to_string())?;
        if n == 0 {
            return Ok(None);
        }
        filled += n;
    }
}

/// Engine.IO open (`0{..}` from the server), namespace connect (`40` from the client), and the
/// server's `40{"sid":..}`. Bytes after that answer stay in `buf[..filled]`.
async fn sio_handshake(
    stream: &mut TcpStream,
    buf: &mut [u8],
    filled: &mut usize,
    addr: SocketAddr,
) -> Result<()> {
    let mut opened = false;
    loop {
        let mut start = 0;
        while let Some((fin, opcode, header, len)) = complete_frame(&buf[start..*filled]) {
            let payload = &buf[start + header..start + header + len];
            start += header + len;
            match opcode {
                0x1 if fin => {}
                0x9 | 0xa => continue,
                0x8 => bail!("{addr} closed the websocket during the socket.io handshake"),
                _ => bail!("{addr} sent an unexpected frame (opcode {opcode}) in the handshake"),
            }
            if !opened {
                if !payload.starts_with(b"0{") {
                    bail!(
                        "{addr} did not open with an Engine.IO open packet: {:?}",
                        String::from_utf8_lossy(payload)
                    );
                }
                opened = true;
                let mut connect = Vec::with_capacity(8);
                text_frame(&mut connect, b"40");
                stream
                    .write_all(&connect)
                    .await
                    .ctx(|| format!("sending the socket.io connect to {addr}"))?;
            } else if payload.starts_with(b"40") {
                buf.copy_within(start..*filled, 0);
                *filled -= start;
                return Ok(());
            } else if payload == b"2" {
                let mut pong = Vec::with_capacity(8);
                text_frame(&mut pong, b"3");
                stream
                    .write_all(&pong)
                    .await
                    .ctx(|| format!("answering a ping of {addr}"))?;
            } else if payload.starts_with(b"44") || payload.starts_with(b"1") {
                bail!(
                    "{addr} refused the socket.io connect: {:?}",
                    String::from_utf8_lossy(payload)
                );
            }
        }
        buf.copy_within(start..*filled, 0);
        *filled -= start;
        if *filled == buf.len() {
            bail!("socket.io handshake with {addr}: oversized packet");
        }
        let n = stream
            .read(&mut buf[*filled..])
            .await
            .ctx(|| format!("reading the socket.io handshake from {addr}"))?;
        if n == 0 {
            bail!("{addr} closed the connection during the socket.io handshake");
        }
        *filled += n;
    }
}

/// Appends one masked text frame carrying `payload`.
pub(crate) fn text_frame(out: &mut Vec<u8>, payload: &[u8]) {
    let len = payload.len();
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
    out.extend(payload.iter().zip(MASK.iter().cycle()).map(|(b, m)| b ^ m));
}

/// Appends one masked text frame carrying the benchmark payload
/// `{"t":T,"s":S,"q":Q,"p":"xxxx"}`, padded so that the JSON is `size` bytes long; with
/// [`Proto::SocketIo`] the frame is the event packet `42["msg",JSON]` around the same JSON,
/// with [`Proto::Fanout`] the command `{"id":N,"cmd":"publish","room":"rROOM","data":JSON}`
/// (without `"id":N,` when not `acked`)
/// (`room` is the room's index; the other variants publish to the room their socket is in).
///
/// `scratch` is reused between calls to avoid an allocation per message.
#[allow(clippy::too_many_arguments)] // one per field of the frame; a struct would only rename them
pub(crate) fn push_message(
    out: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
    proto: Proto,
    room: usize,
    t: u64,
    sender: u32,
    seq: u64,
    size: usize,
) {
    use std::io::Write as _;
    scratch.clear();
    match proto {
        Proto::SocketIo => scratch.extend_from_slice(SIO_EVENT),
        Proto::Fanout { acked: true } => {
            let id = FANOUT_PUBLISH_ID_BASE + seq;
            // Writing into a Vec cannot fail.
            let _ = write!(
                scratch,
                r#"{{"id":{id},"cmd":"publish","room":"r{room}","data":"#
            );
        }
        Proto::Fanout { acked: false } => {
            // Writing into a Vec cannot fail.
            let _ = write!(scratch, r#"{{"cmd":"publish","room":"r{room}","data":"#);
        }
        Proto::Ws => {}
    }
    let json_start = scratch.len();
    // Writing into a Vec cannot fail.
    let _ = write!(scratch, r#"{{"t":{t},"s":{sender},"q":{seq},"p":""#);
    // The padding is only 'x', so it can never contain the `"t":` marker receivers look for.
    let pad = size.saturating_sub(scratch.len() - json_start + 2);
    scratch.resize(scratch.len() + pad, b'x');
    scratch.extend_from_slice(b"\"}");
    match proto {
        Proto::SocketIo => scratch.push(b']'),
        Proto::Fanout { .. } => scratch.push(b'}'),
        Proto::Ws => {}
    }
    text_frame(out, scratch);
}

/// What a complete text message is to the load generator.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Text {
    /// A delivery, with its stamp (`None`: no stamp found, counted as `bad`).
    Delivery(Option<u64>),
    /// Engine.IO ping: answer `3`.
    Ping,
    /// Engine.IO close or socket.io namespace disconnect.
    Close,
    /// Any other socket.io packet: not a delivery.
    Other,
}

#[inline]
fn classify(proto: Proto, payload: &[u8]) -> Text {
    match proto {
        Proto::Ws => Text::Delivery(find_stamp(payload)),
        // Replies (one per publish of a publishing socket) and notices are not deliveries.
        Proto::Fanout { .. } => {
            if payload.starts_with(FANOUT_MESSAGE) {
                Text::Delivery(find_stamp(payload))
            } else {
                Text::Other
            }
        }
        Proto::SocketIo => {
            if let Some(v) = payload.strip_prefix(SIO_EVENT) {
                Text::Delivery(find_stamp(v))
            } else if payload.starts_with(b"42") {
                // Another event name, or a spacing we did not expect: still a delivery frame.
                Text::Delivery(find_stamp(payload))
            } else if payload == b"2" {
                Text::Ping
            } else if payload == b"1" || payload.starts_with(b"41") {
                Text::Close
            } else {
                Text::Other
            }
        }
    }
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
/// message (per `42` event packet with [`Proto::SocketIo`]). Returns `Ok(())` on a close
/// frame, an Engine.IO close, or EOF.
///
/// `buf[..filled]` holds bytes already read (the tail of the handshake read). Pings (WebSocket
/// pings, and Engine.IO `2` packets) are answered through `pongs` (a real client answers them,
/// and a server may close a client that does not); `None` leaves them unanswered.
pub(crate) async fn read_loop<R: AsyncRead + Unpin>(
    mut rd: R,
    mut buf: Vec<u8>,
    mut filled: usize,
    proto: Proto,
    stats: Arc<ConnStats>,
    pongs: Option<tokio::sync::mpsc::UnboundedSender<Vec<u8>>>,
) -> Result<()> {
    let mut start = 0;
    // What a fragmented text message whose final fragment is still to come is (from its
    // first fragment).
    let mut fragment: Option<Text> = None;
    let sio_pong = || {
        let mut out = Vec::with_capacity(8);
        text_frame(&mut out, b"3");
        out
    };
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
        // Returns true when the server ended the session.
        let handle = |text: Text| match text {
            Text::Delivery(stamp) => {
                record(stamp);
                false
            }
            Text::Ping => {
                if let Some(pongs) = &pongs {
                    let _ = pongs.send(sio_pong());
                }
                false
            }
            Text::Close => true,
            Text::Other => false,
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
                0x1 if fin => {
                    if handle(classify(proto, payload)) {
                        return Ok(());
                    }
                }
                0x1 => fragment = Some(classify(proto, payload)),
                0x0 if fin => {
                    if let Some(text) = fragment.take()
                        && handle(text)
                    {
                        return Ok(());
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
