//! The read commands, `history` and `presence`, answered when Redis replies; and the loss
//! notice.

use serde_json::{Map, Value, json};

use super::wire::{Code, Command, Failure, Outcome};
use crate::missed::Missed;
use crate::node::RoomHandle;
use crate::position::Position;
use crate::room::RoomName;

/// A read command's question.
pub(super) enum Read {
    Presence,
    Last(usize),
    Since(Position),
}

impl Read {
    pub(super) fn of(command: &Command) -> Result<Self, Failure> {
        if command.cmd == "presence" {
            return Ok(Read::Presence);
        }
        if let Some(since) = command.position("since")? {
            return Ok(Read::Since(since));
        }
        let limit = command.number("limit")?.unwrap_or(50);
        let limit = usize::try_from(limit).unwrap_or(usize::MAX).max(1);
        Ok(Read::Last(limit))
    }

    pub(super) async fn run(self, rooms: &RoomHandle, room: &RoomName) -> Outcome {
        let history = match self {
            Read::Presence => {
                let snapshot = rooms.presence(room).await?;
                return serde_json::to_value(snapshot)
                    .map_err(|e| Failure::new(Code::Unavailable, e.to_string()));
            }
            Read::Last(limit) => rooms.history(room, limit).await?,
            Read::Since(since) => rooms.history_since(room, &since).await?,
        };
        let position = history.position();
        if let Some(why) = history.failure() {
            return Err(Failure::new(Code::Unrecoverable, why.as_str()));
        }
        let messages: Vec<Value> = history
            .messages()
            .iter()
            .map(|(seq, payload)| {
                let mut m = Map::new();
                m.insert("seq".into(), (*seq).into());
                if let Some(json) = payload.as_json() {
                    let v = serde_json::from_str(json).unwrap_or(Value::Null);
                    m.insert("data".into(), v);
                } else if let Some(text) = payload.as_text() {
                    m.insert("text".into(), text.into());
                }
                Value::Object(m)
            })
            .collect();
        Ok(json!({
            "room": room.as_str(),
            "epoch": position.epoch(),
            "seq": position.seq(),
            "messages": messages,
        }))
    }
}

/// `{"type":"fanout.missed","room":..,"since":ms,"until":ms,"dropped":n|null}`
pub(super) fn missed_notice(missed: &Missed) -> Value {
    if let Some(user) = missed.user() {
        // What was sent to the socket's user (direct messages, fleet commands).
        return json!({
            "type": "fanout.missed",
            "user": user,
            "since": missed.since_ms(),
            "until": missed.until_ms(),
            "dropped": missed.dropped(),
        });
    }
    json!({
        "type": "fanout.missed",
        "room": missed.room().as_str(),
        "since": missed.since_ms(),
        "until": missed.until_ms(),
        "dropped": missed.dropped(),
    })
}
