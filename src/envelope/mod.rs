//! The wire format between nodes: one JSON envelope per broadcast.
//!
//! ```json
//! {"origin":"node-a","room":"42","payload":{"type":"chat","text":"hi"},"ts":1764412345678}
//! ```
//!
//! This is the seed's envelope, so nodes running the seed's Node.js code and nodes running this
//! crate share channels. Fields:
//!
//! | field     | meaning                                                                 |
//! |-----------|-------------------------------------------------------------------------|
//! | `payload` | any JSON value; sockets receive it as a text frame of its JSON text      |
//! | `text`    | a JSON string; sockets receive its content as a text frame (non-JSON text) |
//! | `binary`  | standard base64 (RFC 4648, padded); sockets receive a binary frame       |
//! | `origin`  | node id of the publisher (optional on input)                             |
//! | `room`    | room name (optional on input; when present it must match the channel)    |
//! | `ts`      | publish time, milliseconds since the Unix epoch (optional on input)      |
//! | `except`  | socket id on the `origin` node that must not receive it (optional)       |
//! | `pos`     | `{"epoch":E,"seq":S}`: the message's place in a durable room's history, written by the store-and-publish script (`bus::store`); absent on plain rooms and from seed nodes |
//! | `control` | `true` on a node's own `fanout.*` notice (presence join and leave): sockets that asked for positions get it as it is, not wrapped as a delivery |
//!
//! Exactly one of `payload`, `text`, `binary` must be present. Unknown fields are ignored, so a
//! newer node can add fields without breaking older ones. The minimal envelope
//! `{"payload":{"type":"ping"}}` (what `redis-cli PUBLISH` users type) is valid.
//!
//! Decoding happens once per envelope per node: `payload` is kept as raw JSON text (never
//! re-parsed or re-serialized per socket) and becomes one shared [`Message`].

mod frames;

pub(crate) use frames::{direct_frame, disconnect_frame};

use std::borrow::Cow;
use std::fmt;
use std::time::SystemTime;

use axum::body::Bytes;
use axum::extract::ws::{Message, Utf8Bytes};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use crate::error::Error;
use crate::position::Position;
use crate::time::unix_ms;

/// What a broadcast carries to every socket of a room.
///
/// - [`Payload::json`] / [`Payload::raw_json`]: a JSON value; sockets get a text frame holding
///   its JSON text. This is what the seed's nodes send and understand.
/// - [`Payload::text`]: arbitrary text; sockets get exactly that text.
/// - [`Payload::binary`]: bytes; sockets get a binary frame (base64 inside the envelope).
///
/// ```
/// use axum_fanout::Payload;
///
/// # fn main() -> Result<(), axum_fanout::Error> {
/// let a = Payload::raw_json(r#"{"type":"chat","text":"hi"}"#)?;
/// let b = Payload::json(&serde_json::json!({"type": "chat"}))?;
/// let c = Payload::text("plain words");
/// let d = Payload::binary(vec![0u8, 159, 146, 150]);
/// assert!(Payload::raw_json("not json").is_err());
/// # let _ = (a, b, c, d);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Payload(Repr);

#[derive(Clone)]
enum Repr {
    /// Validated JSON text.
    Json(Box<RawValue>),
    Text(String),
    Binary(Bytes),
}

impl Payload {
    /// Serializes `value` as the JSON payload.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self, Error> {
        let raw = serde_json::value::to_raw_value(value).map_err(Error::invalid_payload)?;
        Ok(Self(Repr::Json(raw)))
    }

    /// Uses `text` as the JSON payload as it is, after checking that it is one valid JSON value.
    ///
    /// Receivers get the same text back, byte for byte.
    pub fn raw_json(text: impl Into<String>) -> Result<Self, Error> {
        let raw = RawValue::from_string(text.into()).map_err(Error::invalid_payload)?;
        Ok(Self(Repr::Json(raw)))
    }

    /// JSON already checked (a `RawValue` only holds valid JSON): not checked again.
    pub(crate) fn from_raw(raw: Box<RawValue>) -> Self {
        Self(Repr::Json(raw))
    }

    /// Arbitrary text, delivered as a text frame with exactly this content.
    ///
    /// Seed (Node.js) nodes only understand `payload`; use [`Payload::raw_json`] for traffic
    /// they must deliver too.
    pub fn text(text: impl Into<String>) -> Self {
        Self(Repr::Text(text.into()))
    }

    /// Bytes, delivered as a binary frame.
    pub fn binary(bytes: impl Into<Bytes>) -> Self {
        Self(Repr::Binary(bytes.into()))
    }
}

impl Payload {
    /// The JSON text of a JSON payload ([`Payload::json`], [`Payload::raw_json`]).
    pub fn as_json(&self) -> Option<&str> {
        match &self.0 {
            Repr::Json(raw) => Some(raw.get()),
            _ => None,
        }
    }

    /// The text of a [`Payload::text`].
    pub fn as_text(&self) -> Option<&str> {
        match &self.0 {
            Repr::Text(text) => Some(text),
            _ => None,
        }
    }

    /// The bytes of a [`Payload::binary`].
    pub fn as_binary(&self) -> Option<&[u8]> {
        match &self.0 {
            Repr::Binary(bytes) => Some(bytes),
            _ => None,
        }
    }

    /// The frame a local socket receives for this payload, built without a round trip through
    /// Redis (for [`FanoutSocket::send`](crate::FanoutSocket::send)).
    pub(crate) fn into_frame(self) -> Message {
        match self.0 {
            Repr::Json(raw) => Message::Text(Utf8Bytes::from(String::from(Box::<str>::from(raw)))),
            Repr::Text(text) => Message::Text(Utf8Bytes::from(text)),
            Repr::Binary(bytes) => Message::Binary(bytes),
        }
    }
}

impl From<&str> for Payload {
    /// Text, delivered as-is (see [`Payload::text`]).
    fn from(text: &str) -> Self {
        Payload::text(text)
    }
}

impl From<String> for Payload {
    /// Text, delivered as-is (see [`Payload::text`]).
    fn from(text: String) -> Self {
        Payload::text(text)
    }
}

impl From<Vec<u8>> for Payload {
    /// Bytes, delivered as a binary frame.
    fn from(bytes: Vec<u8>) -> Self {
        Payload::binary(bytes)
    }
}

impl From<Bytes> for Payload {
    /// Bytes, delivered as a binary frame.
    fn from(bytes: Bytes) -> Self {
        Payload::binary(bytes)
    }
}

impl From<serde_json::Value> for Payload {
    /// A JSON payload, understood by seed nodes too.
    fn from(value: serde_json::Value) -> Self {
        // `Value` always serializes; the fallback keeps this conversion panic-free regardless.
        Payload::json(&value).unwrap_or_else(|_| Payload::text(value.to_string()))
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Json(raw) => f.debug_tuple("Json").field(&raw.get()).finish(),
            Repr::Text(text) => f.debug_tuple("Text").field(text).finish(),
            Repr::Binary(bytes) => f.debug_tuple("Binary").field(&bytes.len()).finish(),
        }
    }
}

/// The envelope version this crate writes and reads. Envelopes without `v` (the seed's) are
/// read as version 1; any other version is dropped as malformed, so a future format change
/// cannot be misread by an older node.
pub(crate) const VERSION: u64 = 1;

#[derive(Serialize)]
struct Outgoing<'a> {
    v: u64,
    origin: &'a str,
    room: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    binary: Option<String>,
    ts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    except: Option<u64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    control: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    command: Option<&'a RawValue>,
}

/// Encodes one envelope, ready for PUBLISH.
pub(crate) fn encode(origin: &str, room: &str, payload: &Payload, except: Option<u64>) -> Vec<u8> {
    encode_as(origin, room, payload, except, false)
}

/// Encodes a node's own notice (`"control": true`): every socket gets its frame as it is, even
/// one that asked for positions (a direct message to a user is one).
pub(crate) fn encode_control(origin: &str, room: &str, frame: &Payload) -> Vec<u8> {
    encode_as(origin, room, frame, None, true)
}

/// Encodes a fleet command (`crate::users`): a `command` object and no payload, so that no node
/// delivers it to a socket as a message.
pub(crate) fn encode_command(origin: &str, room: &str, command: &RawValue) -> Vec<u8> {
    let out = Outgoing {
        command: Some(command),
        ..Outgoing::new(origin, room)
    };
    // As in `encode_as`: strings, integers and a valid RawValue always serialize.
    serde_json::to_vec(&out).unwrap_or_default()
}

impl<'a> Outgoing<'a> {
    /// An envelope stamped now, with nothing in it yet.
    fn new(origin: &'a str, room: &'a str) -> Self {
        Self {
            v: VERSION,
            origin,
            room,
            payload: None,
            text: None,
            binary: None,
            ts: unix_ms(SystemTime::now()),
            except: None,
            control: false,
            command: None,
        }
    }
}

fn encode_as(
    origin: &str,
    room: &str,
    payload: &Payload,
    except: Option<u64>,
    control: bool,
) -> Vec<u8> {
    let mut out = Outgoing {
        except,
        control,
        ..Outgoing::new(origin, room)
    };
    match &payload.0 {
        Repr::Json(raw) => out.payload = Some(raw),
        Repr::Text(text) => out.text = Some(text),
        Repr::Binary(bytes) => out.binary = Some(BASE64.encode(bytes)),
    }
    // Serializing a struct of strings, integers and an already-valid RawValue into a Vec cannot
    // fail; fall back to an empty Vec rather than panic if serde_json ever disagrees.
    serde_json::to_vec(&out).unwrap_or_default()
}

#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(default)]
    v: Option<u64>,
    #[serde(default, borrow)]
    origin: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    room: Option<Cow<'a, str>>,
    // `Option<&RawValue>` would read `"payload": null` as "absent"; null is a valid payload.
    #[serde(default, borrow, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    binary: Option<Cow<'a, str>>,
    #[serde(default)]
    except: Option<u64>,
    #[serde(default)]
    ts: Option<u64>,
    #[serde(default, borrow)]
    pos: Option<IncomingPos<'a>>,
    #[serde(default)]
    control: bool,
    #[serde(default, borrow)]
    command: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct IncomingPos<'a> {
    #[serde(borrow)]
    epoch: Cow<'a, str>,
    seq: u64,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// One decoded envelope: the frame to deliver and the socket (of this node) to skip.
#[derive(Debug)]
pub(crate) struct Decoded {
    pub(crate) frame: Message,
    pub(crate) except: Option<u64>,
    /// The message's position, in a durable room (`None` from seed nodes and plain rooms).
    pub(crate) pos: Option<Position>,
    /// Whether `frame` holds JSON (`payload`) rather than plain text or bytes.
    pub(crate) json: bool,
    /// A `fanout.*` notice from a node itself (`"control": true`, e.g. a presence join): every
    /// socket gets it as it is, even one that asked for positions.
    pub(crate) control: bool,
    /// The publisher's stamp (`ts`, ms since the Unix epoch), when the envelope has one.
    pub(crate) ts: Option<u64>,
    /// A fleet command (`crate::users`) rather than a message: `frame` holds the command's
    /// JSON, for the node to act on, never for a socket.
    pub(crate) command: bool,
}

/// Why an envelope was dropped.
#[derive(Debug)]
pub(crate) enum Malformed {
    NotJson(serde_json::Error),
    NoPayload,
    SeveralPayloads,
    BadBase64(base64::DecodeError),
    WrongRoom,
    UnknownVersion(u64),
    TooLarge(usize),
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Malformed::NotJson(e) => write!(f, "not a JSON envelope object: {e}"),
            Malformed::NoPayload => f.write_str("no `payload`, `text` or `binary` field"),
            Malformed::SeveralPayloads => {
                f.write_str("more than one of `payload`, `text`, `binary`, `command`")
            }
            Malformed::BadBase64(e) => write!(f, "`binary` is not valid base64: {e}"),
            Malformed::WrongRoom => f.write_str("`room` does not match the channel's room"),
            Malformed::UnknownVersion(v) => {
                write!(
                    f,
                    "envelope version {v} is unknown (this node reads {VERSION})"
                )
            }
            Malformed::TooLarge(n) => write!(f, "envelope of {n} bytes is over the size limit"),
        }
    }
}

/// Decodes an envelope received on the channel of `room`.
///
/// `node_id` is this node's id: `except` only applies to envelopes this node published.
pub(crate) fn decode(
    raw: &[u8],
    room: &str,
    node_id: &str,
    max_bytes: usize,
) -> Result<Decoded, Malformed> {
    if raw.len() > max_bytes {
        return Err(Malformed::TooLarge(raw.len()));
    }
    // `from_slice` also rejects invalid UTF-8, so garbage bytes land in `NotJson`.
    let env: Incoming<'_> = serde_json::from_slice(raw).map_err(Malformed::NotJson)?;
    if let Some(v) = env.v.filter(|&v| v != VERSION) {
        return Err(Malformed::UnknownVersion(v));
    }
    if env.room.as_deref().is_some_and(|r| r != room) {
        return Err(Malformed::WrongRoom);
    }
    if let Some(command) = env.command {
        if env.payload.is_some() || env.text.is_some() || env.binary.is_some() {
            return Err(Malformed::SeveralPayloads);
        }
        return Ok(Decoded {
            frame: Message::Text(Utf8Bytes::from(command.get())),
            except: None,
            pos: None,
            json: true,
            control: false,
            ts: env.ts,
            command: true,
        });
    }
    let json = env.payload.is_some();
    let frame = match (env.payload, env.text, env.binary) {
        (Some(json), None, None) => Message::Text(Utf8Bytes::from(json.get())),
        (None, Some(text), None) => Message::Text(Utf8Bytes::from(text.into_owned())),
        (None, None, Some(b64)) => Message::Binary(Bytes::from(
            BASE64.decode(&*b64).map_err(Malformed::BadBase64)?,
        )),
        (None, None, None) => return Err(Malformed::NoPayload),
        _ => return Err(Malformed::SeveralPayloads),
    };
    let except = env
        .except
        .filter(|_| env.origin.as_deref() == Some(node_id));
    let pos = env.pos.map(|p| Position::new(p.epoch.into_owned(), p.seq));
    Ok(Decoded {
        frame,
        except,
        pos,
        json,
        control: env.control,
        ts: env.ts,
        command: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    fn text_of(m: &Message) -> &str {
        match m {
            Message::Text(t) => t.as_str(),
            other => panic!("expected text, got {other:?}"),
        }
    }

    #[test]
    fn json_round_trips_byte_for_byte_and_matches_the_seed_shape() {
        let p = Payload::raw_json(r#"{"b": [1, 2.50, "x"], "a":null}"#).unwrap();
        let wire = encode("n1", "42", &p, None);
        let v: serde_json::Value = serde_json::from_slice(&wire).unwrap();
        assert_eq!(v["origin"], "n1");
        assert_eq!(v["room"], "42");
        assert!(v["ts"].as_u64().unwrap() > 1_700_000_000_000);
        let d = decode(&wire, "42", "n2", MAX).unwrap();
        assert_eq!(text_of(&d.frame), r#"{"b": [1, 2.50, "x"], "a":null}"#);
    }

    #[test]
    fn minimal_seed_envelope_is_accepted() {
        let d = decode(br#"{"payload":{"type":"ping"}}"#, "42", "n1", MAX).unwrap();
        assert_eq!(text_of(&d.frame), r#"{"type":"ping"}"#);
        assert_eq!(d.except, None);
    }

    #[test]
    fn versions_and_size_are_checked() {
        assert!(decode(br#"{"v":1,"payload":1}"#, "r", "n", MAX).is_ok());
        assert!(matches!(
            decode(br#"{"v":7,"payload":1}"#, "r", "n", MAX),
            Err(Malformed::UnknownVersion(7))
        ));
        let big = format!(r#"{{"text":"{}"}}"#, "x".repeat(100));
        assert!(matches!(
            decode(big.as_bytes(), "r", "n", 50),
            Err(Malformed::TooLarge(_))
        ));
        let wire = encode("n", "r", &Payload::text("x"), None);
        assert!(String::from_utf8_lossy(&wire).starts_with(r#"{"v":1,"#));
    }

    #[test]
    fn positions_are_read_and_framed() {
        let raw = br#"{"pos":{"epoch":"e1","seq":7},"v":1,"payload":{"a":1}}"#;
        let d = decode(raw, "r", "n", MAX).unwrap();
        assert_eq!(d.pos, Some(Position::new("e1", 7)));
        assert_eq!(text_of(&d.positioned()), r#"{"seq":7,"payload":{"a":1}}"#);
        let seed = decode(br#"{"text":"hi"}"#, "r", "n", MAX).unwrap();
        assert_eq!(seed.pos, None);
        assert_eq!(text_of(&seed.positioned()), r#"{"text":"hi"}"#);
        // A node's own notice (presence) is never wrapped.
        let notice = br#"{"control":true,"payload":{"type":"fanout.join","user":"a"}}"#;
        let d = decode(notice, "r", "n", MAX).unwrap();
        assert_eq!(
            text_of(&d.positioned()),
            r#"{"type":"fanout.join","user":"a"}"#
        );
    }

    #[test]
    fn a_direct_message_is_one_frame_shape_for_json_text_and_bytes() {
        let json = Payload::raw_json(r#"{"a":[1, 2]}"#).expect("json");
        let cases = [
            (json, r#"{"type":"fanout.direct","payload":{"a":[1, 2]}}"#),
            (
                Payload::text("say \"hi\""),
                r#"{"type":"fanout.direct","text":"say \"hi\""}"#,
            ),
            (
                Payload::binary(vec![0u8, 255]),
                r#"{"type":"fanout.direct","binary":"AP8="}"#,
            ),
        ];
        for (payload, expected) in cases {
            assert_eq!(text_of(&direct_frame(&payload).into_frame()), expected);
        }
    }

    #[test]
    fn protocol_sockets_get_each_room_message_framed_with_its_room() {
        let raw = br#"{"pos":{"epoch":"e1","seq":7},"v":1,"payload":{"a":1}}"#;
        let d = decode(raw, "r", "n", MAX).unwrap();
        assert_eq!(
            text_of(&d.framed("r\"1")),
            r#"{"type":"message","room":"r\"1","seq":7,"data":{"a":1}}"#
        );
        let plain = decode(br#"{"text":"hi"}"#, "r", "n", MAX).unwrap();
        assert_eq!(
            text_of(&plain.framed("r")),
            r#"{"type":"message","room":"r","text":"hi"}"#
        );
        let bytes = decode(br#"{"binary":"AAE="}"#, "r", "n", MAX).unwrap();
        assert_eq!(
            text_of(&bytes.framed("r")),
            r#"{"type":"message","room":"r","binary":"AAE="}"#
        );
        // A notice is one frame per kind already, with its room: it goes as it is.
        let notice = br#"{"control":true,"payload":{"type":"fanout.join","room":"r","user":"a"}}"#;
        let d = decode(notice, "r", "n", MAX).unwrap();
        assert_eq!(
            text_of(&d.framed("r")),
            r#"{"type":"fanout.join","room":"r","user":"a"}"#
        );
    }

    #[test]
    fn null_is_a_payload() {
        let d = decode(br#"{"payload":null}"#, "r", "n", MAX).unwrap();
        assert_eq!(text_of(&d.frame), "null");
    }

    #[test]
    fn text_and_binary_round_trip() {
        let wire = encode("n", "r", &Payload::text("not \"json\"\n"), None);
        assert_eq!(
            text_of(&decode(&wire, "r", "x", MAX).unwrap().frame),
            "not \"json\"\n"
        );
        let bytes = vec![0u8, 255, 10, 13, 128];
        let wire = encode("n", "r", &Payload::binary(bytes.clone()), None);
        match decode(&wire, "r", "x", MAX).unwrap().frame {
            Message::Binary(b) => assert_eq!(&b[..], &bytes[..]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn except_applies_only_on_the_origin_node() {
        let wire = encode("n1", "r", &Payload::text("x"), Some(7));
        assert_eq!(decode(&wire, "r", "n1", MAX).unwrap().except, Some(7));
        assert_eq!(decode(&wire, "r", "n2", MAX).unwrap().except, None);
    }

    #[test]
    fn garbage_is_reported_not_panicked_on() {
        let cases: &[&[u8]] = &[
            b"",
            b"hello",
            b"\xff\xfe\x00",
            b"[1,2]",
            b"{}",
            br#"{"payload":1,"text":"x"}"#,
            br#"{"binary":"***"}"#,
            br#"{"room":"other","payload":1}"#,
            br#"{"payload":{"#,
            br#"{"text":5}"#,
            br#"{"v":2,"payload":1}"#,
            br#"{"v":"1","payload":1}"#,
        ];
        for raw in cases {
            assert!(
                decode(raw, "r", "n", MAX).is_err(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            /// Untrusted bytes on a room channel never panic the decoder.
            #[test]
            fn decoding_arbitrary_bytes_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = decode(&raw, "r", "n", MAX);
            }

            /// Nor do arbitrary JSON-looking objects with our field names.
            #[test]
            fn decoding_envelope_shaped_json_never_panics(
                v in prop::option::of(any::<i64>()),
                room in ".{0,8}",
                body in r#"[\[\]{}":,0-9a-z .\\]{0,64}"#,
                field in prop::sample::select(vec!["payload", "text", "binary", "except", "origin"]),
            ) {
                let v = v.map(|v| format!(r#""v":{v},"#)).unwrap_or_default();
                let raw = format!(r#"{{{v}"room":{room:?},"{field}":{body}}}"#);
                let _ = decode(raw.as_bytes(), "r", "n", MAX);
            }

            /// What we encode, we decode to the same frame.
            #[test]
            fn text_and_binary_round_trip(text in ".{0,200}", bytes in proptest::collection::vec(any::<u8>(), 0..200), except in prop::option::of(any::<u64>())) {
                let wire = encode("n1", "room", &Payload::text(text.clone()), except);
                let d = decode(&wire, "room", "n1", MAX).expect("own text envelope");
                prop_assert_eq!(text_of(&d.frame), text.as_str());
                prop_assert_eq!(d.except, except);
                let wire = encode("n1", "room", &Payload::binary(bytes.clone()), None);
                match decode(&wire, "room", "n2", MAX).expect("own binary envelope").frame {
                    Message::Binary(b) => prop_assert_eq!(&b[..], &bytes[..]),
                    other => prop_assert!(false, "{:?}", other),
                }
            }
        }
    }
}
