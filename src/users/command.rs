//! Fleet commands on the wire, and what a node does with one it receives: close sockets, or
//! move them into or out of a room.
//!
//! A command travels as an envelope with a `command` object and no payload
//! (`envelope::encode_command`), on the channel of the user it addresses (or of the room, for
//! `disconnect_room`). Redis pub/sub delivers it at most once to each node that was subscribed
//! when it ran; a node that was not is not counted in the reply, and its sockets learn of the gap
//! as of any lost message ([`Missed`](crate::Missed), `user()`). Every command is idempotent:
//! closing a closing socket, joining a room a socket is in, leaving one it is not in, change
//! nothing, so an application that retries after a timeout cannot apply one twice.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::registry::SocketId;

/// One command, as it travels in the envelope's `command` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Command {
    /// Close the addressed sockets with `code` and `reason`.
    Disconnect {
        code: u16,
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        socket: Option<Target>,
    },
    /// Make the addressed sockets of the user join `room` as if they had joined it themselves.
    Join {
        room: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        socket: Option<Target>,
    },
    /// Make the addressed sockets of the user leave `room`.
    Leave {
        room: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        socket: Option<Target>,
    },
}

impl Command {
    /// The one socket the command addresses, if it addresses one rather than all of them.
    pub(crate) fn target(&self) -> Option<&Target> {
        match self {
            Command::Disconnect { socket, .. }
            | Command::Join { socket, .. }
            | Command::Leave { socket, .. } => socket.as_ref(),
        }
    }
}

/// One socket of the fleet, on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Target {
    pub(crate) node: String,
    pub(crate) id: u64,
}

impl Target {
    /// Whether `socket` of node `node_id` is the one addressed.
    pub(crate) fn is(&self, node_id: &str, socket: SocketId) -> bool {
        self.node == node_id && self.id == socket.get()
    }
}

/// A socket's address across the fleet: its node's id and its id on that node, from
/// [`FanoutSocket::fleet_id`](crate::FanoutSocket::fleet_id). Written `node/id`; parses back
/// from the same text, so an application can keep it wherever it keeps text.
///
/// ```
/// use axum_fanout::users::{FleetSocketId, InvalidFleetSocketId};
///
/// # fn main() -> Result<(), InvalidFleetSocketId> {
/// let id: FleetSocketId = "3f9a0c/17".parse()?;
/// assert_eq!(id.node(), "3f9a0c");
/// assert_eq!(id.to_string(), "3f9a0c/17");
/// assert!("no-slash".parse::<FleetSocketId>().is_err());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FleetSocketId {
    node: Arc<str>,
    id: u64,
}

impl FleetSocketId {
    pub(crate) fn new(node: &str, id: SocketId) -> Self {
        Self {
            node: Arc::from(node),
            id: id.get(),
        }
    }

    /// The id of the node that holds the socket.
    pub fn node(&self) -> &str {
        &self.node
    }

    pub(crate) fn target(&self) -> Target {
        Target {
            node: self.node.to_string(),
            id: self.id,
        }
    }
}

impl fmt::Display for FleetSocketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.node, self.id)
    }
}

/// A text that is not `node/id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidFleetSocketId(String);

impl fmt::Display for InvalidFleetSocketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} is not a fleet socket id (node/id)", self.0)
    }
}

impl std::error::Error for InvalidFleetSocketId {}

impl FromStr for FleetSocketId {
    type Err = InvalidFleetSocketId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidFleetSocketId(s.chars().take(64).collect());
        let (node, id) = s.rsplit_once('/').ok_or_else(invalid)?;
        if node.is_empty() || node.chars().any(char::is_control) {
            return Err(invalid());
        }
        let id = id.parse().map_err(|_| invalid())?;
        Ok(Self {
            node: Arc::from(node),
            id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_keep_their_shape_on_the_wire() {
        let c = Command::Disconnect {
            code: 4000,
            reason: "bye".into(),
            socket: None,
        };
        let text = serde_json::to_string(&c).expect("serializes");
        assert_eq!(text, r#"{"op":"disconnect","code":4000,"reason":"bye"}"#);
        assert_eq!(serde_json::from_str::<Command>(&text).expect("parses"), c);
        let j: Command =
            serde_json::from_str(r#"{"op":"join","room":"r","socket":{"node":"n","id":3}}"#)
                .expect("parses");
        assert!(
            j.target()
                .is_some_and(|t| t.is("n", SocketId::from_wire(3)))
        );
        assert!(
            !j.target()
                .is_some_and(|t| t.is("m", SocketId::from_wire(3)))
        );
        assert!(serde_json::from_str::<Command>(r#"{"op":"explode"}"#).is_err());
    }

    #[test]
    fn fleet_socket_ids_round_trip_and_refuse_garbage() {
        let id = FleetSocketId::new("n1", SocketId::from_wire(9));
        assert_eq!(id.to_string().parse::<FleetSocketId>(), Ok(id));
        for bad in ["", "/1", "n/", "n/x", "n/-1", "a\nb/1"] {
            assert!(bad.parse::<FleetSocketId>().is_err(), "{bad:?}");
        }
    }
}
