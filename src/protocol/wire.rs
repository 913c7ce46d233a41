//! The protocol's frames (`PROTOCOL.md`): commands parsed from the client's text, replies and
//! pushes written for it, and the error codes.

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use crate::position::Position;

/// Section 5 of `PROTOCOL.md`: what a failed command's reply says, as a code a client matches
/// on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Code {
    BadRequest,
    UnknownCommand,
    NotConnected,
    AlreadyConnected,
    NotAllowed,
    InvalidRoom,
    TooManyRooms,
    NotDurable,
    PresenceOff,
    PayloadTooLarge,
    Unrecoverable,
    Unavailable,
    Closed,
}

impl Code {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Code::BadRequest => "bad_request",
            Code::UnknownCommand => "unknown_command",
            Code::NotConnected => "not_connected",
            Code::AlreadyConnected => "already_connected",
            Code::NotAllowed => "not_allowed",
            Code::InvalidRoom => "invalid_room",
            Code::TooManyRooms => "too_many_rooms",
            Code::NotDurable => "not_durable",
            Code::PresenceOff => "presence_off",
            Code::PayloadTooLarge => "payload_too_large",
            Code::Unrecoverable => "unrecoverable",
            Code::Unavailable => "unavailable",
            Code::Closed => "closed",
        }
    }

    /// The code for a library error.
    pub(super) fn of(e: &crate::Error) -> Self {
        if e.is_invalid_room() {
            Code::InvalidRoom
        } else if e.is_limit() {
            Code::TooManyRooms
        } else if e.is_not_durable() {
            Code::NotDurable
        } else if e.is_presence_off() {
            Code::PresenceOff
        } else if e.is_invalid_payload() || e.is_message_too_big() {
            Code::PayloadTooLarge
        } else if e.is_closed() {
            Code::Closed
        } else if e.is_invalid_member() {
            Code::NotAllowed
        } else {
            Code::Unavailable
        }
    }
}

/// A failed command: its code and what the client is told.
#[derive(Debug)]
pub(super) struct Failure {
    pub(super) code: Code,
    pub(super) reason: String,
}

impl Failure {
    pub(super) fn new(code: Code, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }
}

impl From<crate::Error> for Failure {
    fn from(e: crate::Error) -> Self {
        let reason = match std::error::Error::source(&e) {
            Some(cause) if e.is_invalid_room() || e.is_limit() => format!("{e}: {cause}"),
            _ => e.to_string(),
        };
        Self::new(Code::of(&e), reason)
    }
}

/// What a command's reply carries.
pub(super) type Outcome = Result<Value, Failure>;

/// A client command: its id, its name and its fields.
#[derive(Debug)]
pub(super) struct Command {
    pub(super) id: u64,
    pub(super) cmd: String,
    pub(super) fields: Map<String, Value>,
    /// A publish's `data`, as the client wrote it: checked as JSON, never parsed into a tree
    /// and written again (what `/ws` does with a message's text too).
    pub(super) data: Option<Box<RawValue>>,
}

/// A JSON object's top-level fields as raw JSON, borrowed from the text, in order.
struct RawFields<'a>(Vec<(&'a str, &'a RawValue)>);

impl<'de> Deserialize<'de> for RawFields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = RawFields<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(4));
                while let Some(entry) = map.next_entry::<&'de str, &'de RawValue>()? {
                    fields.push(entry);
                }
                Ok(RawFields(fields))
            }
        }
        d.deserialize_map(Fields)
    }
}

/// Why a text frame is not a command.
#[derive(Debug)]
pub(super) enum Unparsed {
    /// Not JSON at all: the connection is closed (1007).
    NotJson,
    /// JSON, but not a valid command: answered with an error reply to `id` (0: none known).
    Invalid(u64, Failure),
}

/// The largest id a client may use: JavaScript's largest exact integer.
const MAX_ID: u64 = (1 << 53) - 1;

/// The id of a publish sent without one: it gets no reply (no client may use 0).
pub(super) const UNACKED: u64 = 0;

impl Command {
    /// Parses a JSON value as a command; the error carries the id to answer (0 when it has
    /// none).
    pub(super) fn parse(value: Value) -> Result<Self, (u64, Failure)> {
        let Value::Object(mut fields) = value else {
            return Err((0, bad("a command is a JSON object")));
        };
        let id = fields.remove("id");
        let cmd = fields.remove("cmd");
        let id = match (id.as_ref().map(Value::as_u64), &cmd) {
            (Some(Some(id)), _) if (1..=MAX_ID).contains(&id) => id,
            // A publish without an id wants no reply (section 3, `publish`).
            (None, Some(Value::String(cmd))) if cmd == "publish" => UNACKED,
            _ => return Err((0, bad("\"id\" must be an integer from 1 to 2^53-1"))),
        };
        let cmd = match cmd {
            Some(Value::String(cmd)) => cmd,
            _ => return Err((id, bad("\"cmd\" must be a string"))),
        };
        let data = fields
            .remove("data")
            .and_then(|data| RawValue::from_string(data.to_string()).ok());
        Ok(Self {
            id,
            cmd,
            fields,
            data,
        })
    }

    /// Parses a text frame as a command. One pass over the text: each top-level field is
    /// sliced out as raw JSON, the small ones read into values, `data` kept as written. A frame
    /// this pass cannot take (not an object, keys with escapes) is read the general way, so the
    /// answers are the same.
    pub(super) fn parse_text(text: &str) -> Result<Self, Unparsed> {
        let Ok(RawFields(raw)) = serde_json::from_str::<RawFields<'_>>(text) else {
            let value: Value = serde_json::from_str(text).map_err(|_| Unparsed::NotJson)?;
            return Self::parse(value).map_err(|(id, f)| Unparsed::Invalid(id, f));
        };
        let mut fields = Map::new();
        let mut data = None;
        for (key, value) in raw {
            if key == "data" {
                data = Some(value.to_owned());
                continue;
            }
            let value: Value = serde_json::from_str(value.get()).map_err(|_| Unparsed::NotJson)?;
            fields.insert(key.to_owned(), value);
        }
        let mut command =
            Self::parse(Value::Object(fields)).map_err(|(id, f)| Unparsed::Invalid(id, f))?;
        command.data = data;
        Ok(command)
    }

    /// The string field `name`.
    pub(super) fn string(&self, name: &str) -> Result<&str, Failure> {
        self.fields
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("\"{name}\" must be a string")))
    }

    /// The optional whole-number field `name`.
    pub(super) fn number(&self, name: &str) -> Result<Option<u64>, Failure> {
        match self.fields.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| bad(format!("\"{name}\" must be a whole number"))),
        }
    }

    /// The optional boolean field `name`.
    pub(super) fn flag(&self, name: &str) -> Result<bool, Failure> {
        match self.fields.get(name) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(bad(format!("\"{name}\" must be true or false"))),
        }
    }

    /// The optional position field `name`: `{"epoch":E,"seq":S}` or `"E:S"`.
    pub(super) fn position(&self, name: &str) -> Result<Option<Position>, Failure> {
        let wrong = || bad(format!("\"{name}\" must be {{\"epoch\":E,\"seq\":S}}"));
        match self.fields.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => s.parse().map(Some).map_err(|_| wrong()),
            Some(Value::Object(o)) => {
                let epoch = o.get("epoch").and_then(Value::as_str).ok_or_else(wrong)?;
                let seq = o.get("seq").and_then(Value::as_u64).ok_or_else(wrong)?;
                Ok(Some(Position::new(epoch, seq)))
            }
            Some(_) => Err(wrong()),
        }
    }
}

pub(super) fn bad(reason: impl Into<String>) -> Failure {
    Failure::new(Code::BadRequest, reason)
}

/// The reply to command `id`.
pub(super) fn reply(id: u64, outcome: Outcome) -> Value {
    match outcome {
        Ok(result) => json!({ "type": "reply", "id": id, "result": result }),
        Err(f) => json!({
            "type": "reply",
            "id": id,
            "error": { "code": f.code.as_str(), "reason": f.reason },
        }),
    }
}

/// `fanout.unsent`: a publish sent without an id failed (section 4); `room` as the client
/// named it, when it did.
pub(super) fn unsent(room: Option<&str>, failure: &Failure) -> Value {
    json!({
        "type": "fanout.unsent",
        "room": room,
        "code": failure.code.as_str(),
        "reason": failure.reason,
    })
}

/// A position's fields for a reply.
pub(super) fn position_fields(out: &mut Map<String, Value>, pos: &Position) {
    out.insert("epoch".into(), pos.epoch().into());
    out.insert("seq".into(), pos.seq().into());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_frame_keeps_its_data_as_written_and_answers_as_before() {
        let text = r#"{"id":3,"cmd":"publish","room":"r","data":{ "b" : [1, 2.50] }}"#;
        let c = Command::parse_text(text).expect("a command");
        assert_eq!((c.id, c.cmd.as_str()), (3, "publish"));
        assert_eq!(c.fields.get("room"), Some(&json!("r")));
        assert_eq!(
            c.data.as_deref().map(RawValue::get),
            Some(r#"{ "b" : [1, 2.50] }"#)
        );
        // A key with an escape is read the general way: same command.
        let c =
            Command::parse_text(r#"{"\u0069d":4,"cmd":"publish","data":"x"}"#).expect("a command");
        assert_eq!(c.id, 4);
        assert_eq!(c.data.as_deref().map(RawValue::get), Some(r#""x""#));
        // JSON but no command: an error reply; not JSON: the connection closes.
        assert!(matches!(
            Command::parse_text("[1]"),
            Err(Unparsed::Invalid(0, _))
        ));
        assert!(matches!(
            Command::parse_text(r#"{"id":5}"#),
            Err(Unparsed::Invalid(5, _))
        ));
        assert!(matches!(
            Command::parse_text("{nope"),
            Err(Unparsed::NotJson)
        ));
    }

    #[test]
    fn a_command_needs_an_id_in_range_and_a_name() {
        let c = Command::parse(json!({"id": 7, "cmd": "join", "room": "a"})).expect("valid");
        assert_eq!(
            (c.id, c.cmd.as_str(), c.string("room").ok()),
            (7, "join", Some("a"))
        );
        for (value, id) in [
            (json!([1]), 0),
            (json!({"cmd": "join"}), 0),
            (json!({"id": 0, "cmd": "join"}), 0),
            (json!({"id": 1u64 << 53, "cmd": "join"}), 0),
            (json!({"id": "1", "cmd": "join"}), 0),
            (json!({"id": 3, "cmd": 5}), 3),
        ] {
            let (got, f) = Command::parse(value.clone()).expect_err("invalid");
            assert_eq!((got, f.code), (id, Code::BadRequest), "{value}");
        }
    }

    #[test]
    fn positions_parse_in_both_spellings() {
        let c = Command::parse(
            json!({"id": 1, "cmd": "join", "a": {"epoch": "e", "seq": 4}, "b": "e:5", "c": 3}),
        )
        .expect("valid");
        assert_eq!(c.position("a").ok().flatten(), Some(Position::new("e", 4)));
        assert_eq!(c.position("b").ok().flatten(), Some(Position::new("e", 5)));
        assert_eq!(
            c.position("c").err().map(|f| f.code),
            Some(Code::BadRequest)
        );
        assert!(matches!(c.position("none"), Ok(None)));
    }

    #[test]
    fn replies_carry_the_id_and_either_a_result_or_a_coded_error() {
        assert_eq!(
            reply(4, Ok(json!({"left": true}))),
            json!({"type": "reply", "id": 4, "result": {"left": true}})
        );
        assert_eq!(
            reply(5, Err(Failure::new(Code::NotAllowed, "no"))),
            json!({"type": "reply", "id": 5, "error": {"code": "not_allowed", "reason": "no"}})
        );
    }
}
