//! The frames a socket gets of a decoded envelope, one writer per shape: as it came (the
//! toolkit's default), with its position (`positions=1`), framed with its room (the fanout
//! protocol), and what a user's sockets get of a direct message.

use axum::extract::ws::{Message, Utf8Bytes};
use base64::Engine;
use serde_json::value::RawValue;

use super::{BASE64, Decoded, Payload, Repr};

/// The `fanout.disconnect` frame (`PROTOCOL.md`, section 4) a fanout-protocol socket is told
/// before the node closes it with `code`: why, and whether to come back. Every closer of a
/// protocol socket sends this one shape: the session, a fleet-wide disconnect, an expiry.
pub(crate) fn disconnect_frame(code: u16, reason: &str, reconnect: bool) -> Payload {
    Payload::from(serde_json::json!({
        "type": "fanout.disconnect",
        "code": code,
        "reason": reason,
        "reconnect": reconnect,
    }))
}

/// The frame every socket of a user gets of a message sent to that user:
/// `{"type":"fanout.direct","payload":V}` (`"text"` or `"binary"` in place of `"payload"` for
/// those payloads), the same for a toolkit socket and a fanout-protocol one.
pub(crate) fn direct_frame(payload: &Payload) -> Payload {
    let mut frame = String::from("{\"type\":\"fanout.direct\",");
    let body = match &payload.0 {
        Repr::Json(raw) => Body::Json(raw.get()),
        Repr::Text(text) => Body::Text(text),
        Repr::Binary(bytes) => Body::Binary(bytes),
    };
    push_body(&mut frame, "\"payload\":", body);
    frame.push('}');
    // Valid JSON by construction (a valid payload, a JSON string, base64); should it ever not
    // be, the frame still goes out, as text.
    Payload::raw_json(frame.clone()).unwrap_or_else(|_| Payload::text(frame))
}

/// A message's body in a frame that wraps it: JSON under the frame's own key, text or bytes
/// under `"text"` or `"binary"` (base64).
enum Body<'a> {
    Json(&'a str),
    Text(&'a str),
    Binary(&'a [u8]),
}

/// Writes `body`'s field: one writer for every frame that wraps a message (a direct message,
/// a positioned or room-framed delivery).
fn push_body(out: &mut String, json_key: &str, body: Body<'_>) {
    match body {
        Body::Json(json) => {
            out.push_str(json_key);
            out.push_str(json);
        }
        Body::Text(text) => {
            out.push_str("\"text\":");
            out.push_str(&serde_json::to_string(text).unwrap_or_default());
        }
        Body::Binary(bytes) => {
            out.push_str("\"binary\":\"");
            out.push_str(&BASE64.encode(bytes));
            out.push('"');
        }
    }
}

impl Decoded {
    /// The frame for a socket that asked for positions: `{"seq":S,"payload":V}` (`"text"` or
    /// `"binary"` in place of `"payload"` for those payloads), without `"seq"` when the message
    /// has no position (a seed node's).
    pub(crate) fn positioned(&self) -> Message {
        self.shaped(None)
    }

    /// The frame for a socket of the fanout protocol (`PROTOCOL.md`, "message"), which carries
    /// many rooms: `{"type":"message","room":R,"seq":S,"data":V}` (`"text"` or `"binary"` in
    /// place of `"data"`), without `"seq"` outside durable rooms. A control notice is already
    /// one frame per kind with its room, so it goes as it is.
    pub(crate) fn framed(&self, room: &str) -> Message {
        self.shaped(Some(room))
    }

    /// `positioned` (no room) or `framed` (a room): one writer for the two shapes.
    fn shaped(&self, room: Option<&str>) -> Message {
        if self.control {
            return self.frame.clone();
        }
        let mut out = String::with_capacity(frame_text_len(&self.frame) + 48);
        out.push('{');
        if let Some(room) = room {
            out.push_str("\"type\":\"message\",\"room\":");
            out.push_str(&serde_json::to_string(room).unwrap_or_default());
            out.push(',');
        }
        if let Some(pos) = &self.pos {
            out.push_str("\"seq\":");
            out.push_str(&pos.seq().to_string());
            out.push(',');
        }
        let json_key = if room.is_some() {
            "\"data\":"
        } else {
            "\"payload\":"
        };
        let body = match &self.frame {
            Message::Text(text) if self.json => Body::Json(text.as_str()),
            Message::Text(text) => Body::Text(text.as_str()),
            Message::Binary(bytes) => Body::Binary(bytes),
            _ => Body::Json("null"),
        };
        push_body(&mut out, json_key, body);
        out.push('}');
        Message::Text(Utf8Bytes::from(out))
    }

    /// The payload again, for a history read.
    pub(crate) fn into_payload(self) -> Payload {
        match self.frame {
            Message::Text(text) if self.json => {
                // Decoding checked it is one JSON value.
                RawValue::from_string(text.as_str().to_owned())
                    .map(|raw| Payload(Repr::Json(raw)))
                    .unwrap_or_else(|_| Payload::text(text.as_str()))
            }
            Message::Text(text) => Payload::text(text.as_str()),
            Message::Binary(bytes) => Payload::binary(bytes),
            _ => Payload::text(""),
        }
    }
}

fn frame_text_len(frame: &Message) -> usize {
    match frame {
        Message::Text(t) => t.len(),
        Message::Binary(b) => b.len() * 4 / 3,
        _ => 0,
    }
}
