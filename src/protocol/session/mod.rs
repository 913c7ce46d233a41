//! One protocol socket's session: its identity, its commands, their replies.
//!
//! Membership commands (`connect`, `join`, `leave`, `refresh`) run one at a time, in order, in
//! the session's loop: they change the socket. `publish` is checked and queued in order (so a
//! socket's messages keep their order), then its reply waits for Redis beside the loop, like
//! `history` and `presence` reads: the loop keeps reading meanwhile.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Message;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde_json::{Map, Value, json};

mod publish;

use super::Settings;
use super::auth::{Authorize, Grant};
use super::reads::{Read, missed_notice};
use super::wire::{self, Code, Command, Failure, Outcome, Unparsed, position_fields, reply};
use crate::close;
use crate::durable::Start;
use crate::node::RoomHandle;
use crate::presence::Member;
use crate::room::RoomName;
use crate::socket::{Event, FanoutSocket};

/// A reply that waits for Redis beside the loop.
type Pending = Pin<Box<dyn Future<Output = Value> + Send>>;

struct Session<A> {
    socket: FanoutSocket,
    rooms: RoomHandle,
    settings: Arc<Settings<A>>,
    /// Who the socket acts as, once connected. When its credentials expire is the node's
    /// (`FanoutSocket::expire_in`, one timer for every socket), not the session's. Shared, so
    /// that a command (a publish: the hot one) borrows it without copying the name.
    user: Option<Arc<str>>,
    /// Replies waiting for Redis; made on the first (most sockets only join and listen).
    pending: Option<FuturesUnordered<Pending>>,
}

/// Serves one protocol socket until it closes.
pub(super) async fn run<A: Authorize>(
    socket: FanoutSocket,
    settings: Arc<Settings<A>>,
    grant: Option<Grant>,
) {
    socket.set_framed();
    let rooms = socket.handle();
    let mut session = Session {
        socket,
        rooms,
        settings,
        user: None,
        pending: None,
    };
    match grant {
        // The node's expiry task closes it unless a `connect` succeeds first.
        None => {
            let within = session.settings.connect_timeout;
            session.socket.expect_credentials_within(within);
        }
        Some(grant) => {
            if let Err(failure) = Box::pin(session.connected(grant)).await {
                tracing::warn!(reason = ?failure, "a protocol socket could not take its identity");
                let reason = "cannot reach redis; try again later";
                return session.close(close::TRY_AGAIN_LATER, reason, true);
            }
        }
    }
    // Not boxed: the loop is where an idle socket spends its life, so the task is sized for
    // it anyway; a box would be a second allocation per socket (about 0.8 KiB).
    session.serve().await;
}

/// The next reply that was waiting for Redis; never while there is none.
async fn next_reply(pending: &mut Option<FuturesUnordered<Pending>>) -> Value {
    match pending {
        Some(replies) if !replies.is_empty() => match replies.next().await {
            Some(reply) => reply,
            None => std::future::pending().await,
        },
        _ => std::future::pending().await,
    }
}

impl<A: Authorize> Session<A> {
    /// Takes the identity `grant` gives: the socket becomes reachable as its user wherever it
    /// is connected (`RoomHandle::send_to_user`, `disconnect_user`, `join_user`).
    async fn connected(&mut self, grant: Grant) -> Outcome {
        let user = grant.user().to_owned();
        if let Err(e) = self.socket.identify(&user).await {
            let code = if e.is_invalid_member() {
                Code::NotAllowed
            } else {
                Code::Unavailable
            };
            return Err(Failure::new(code, e.to_string()));
        }
        self.expire(grant.expiry());
        let expires_in = grant.expiry().map(|d| d.as_secs_f64());
        self.user = Some(Arc::from(user.as_str()));
        Ok(json!({ "user": user, "expires_in": expires_in }))
    }

    async fn serve(&mut self) {
        loop {
            let event = tokio::select! {
                biased;
                frame = next_reply(&mut self.pending) => {
                    if self.socket.send(frame).is_err() {
                        return;
                    }
                    continue;
                }
                event = self.socket.recv_event() => event,
            };
            let frame = match event {
                None => return,
                Some(Ok(Event::Message(Message::Text(text)))) => {
                    match Command::parse_text(text.as_str()) {
                        Err(Unparsed::NotJson) => {
                            let reason = "frame is not valid JSON";
                            return self.close(close::INVALID_DATA, reason, false);
                        }
                        Ok(command) => {
                            let id = command.id;
                            // Boxed: a socket's task keeps the size of its largest await
                            // for its whole life, and a command's (a durable join, a keyed
                            // publish) is far larger than the idle read it spends it in.
                            match Box::pin(self.command(command)).await {
                                Some(outcome) => reply(id, outcome),
                                None => continue,
                            }
                        }
                        Err(Unparsed::Invalid(id, failure)) => reply(id, Err(failure)),
                    }
                }
                Some(Ok(Event::Message(_))) => {
                    let reason = "only JSON text frames are accepted";
                    return self.close(close::UNSUPPORTED_DATA, reason, false);
                }
                Some(Ok(Event::Missed(missed))) => missed_notice(&missed),
                // A publish sent without an id failed once Redis answered (or did not).
                Some(Ok(Event::BroadcastFailed { room, error, .. })) => {
                    wire::unsent(Some(room.as_str()), &Failure::from(error))
                }
                // Over the size limit or the rate limit (the node closed the socket already,
                // with 1009 or 1008), or a transport failure: the connection is done.
                Some(Err(_)) => return,
            };
            if self.socket.send(frame).is_err() {
                return;
            }
        }
    }

    /// Tells the client why, then closes with `code`.
    fn close(&mut self, code: u16, reason: &str, reconnect: bool) {
        let _ = self
            .socket
            .send(crate::envelope::disconnect_frame(code, reason, reconnect));
        self.socket.close(code, reason);
    }

    /// Runs `command`: its outcome now, or `None` when its reply comes later (`pending`).
    async fn command(&mut self, command: Command) -> Option<Outcome> {
        if command.cmd == "connect" {
            return Some(self.connect(&command).await);
        }
        let Some(user) = self.user.clone() else {
            let known = matches!(
                command.cmd.as_str(),
                "join" | "leave" | "publish" | "history" | "presence" | "refresh"
            );
            return Some(Err(if known {
                Failure::new(
                    Code::NotConnected,
                    "send connect with your credentials first",
                )
            } else {
                unknown(&command.cmd)
            }));
        };
        let outcome = match command.cmd.as_str() {
            "join" => self.join(&user, &command).await,
            "leave" => self.leave(&command),
            "refresh" => self.refresh(&user, &command).await,
            "publish" => return self.publish(&user, command).await,
            "history" | "presence" => return self.read(&user, command).await,
            other => Err(unknown(other)),
        };
        Some(outcome)
    }

    async fn connect(&mut self, command: &Command) -> Outcome {
        if self.user.is_some() {
            return Err(Failure::new(Code::AlreadyConnected, "already connected"));
        }
        let token = command.fields.get("token").cloned().unwrap_or(Value::Null);
        let settings = self.settings.clone();
        match settings.auth.connect_token(&token).await {
            Ok(grant) => self.connected(grant).await,
            Err(denied) => Err(Failure::new(Code::NotAllowed, denied.reason())),
        }
    }

    async fn refresh(&mut self, user: &str, command: &Command) -> Outcome {
        let token = command.fields.get("token").cloned().unwrap_or(Value::Null);
        let settings = self.settings.clone();
        match settings.auth.refresh(user, &token).await {
            Ok(expiry) => {
                self.expire(expiry);
                Ok(json!({ "expires_in": expiry.map(|d| d.as_secs_f64()) }))
            }
            Err(denied) => Err(Failure::new(Code::NotAllowed, denied.reason())),
        }
    }

    /// The socket's credentials expire `expiry` from now (`None`: never), on the node's
    /// expiry task, which closes it with 4001 after a `fanout.disconnect` frame.
    fn expire(&self, expiry: Option<Duration>) {
        match expiry {
            // Zero is "expired already": closed at once. Refused only on a closing socket.
            Some(after) => {
                let _ = self.socket.expire_in(after.max(Duration::from_millis(1)));
            }
            None => self.socket.expire_never(),
        }
    }

    fn may_join(
        &self,
        user: &str,
        room: &RoomName,
    ) -> impl Future<Output = Result<(), Failure>> + Send {
        let settings = self.settings.clone();
        let (user, room) = (user.to_owned(), room.clone());
        async move { may_join(&settings, &user, &room).await }
    }
}

async fn may_join<A: Authorize>(
    settings: &Settings<A>,
    user: &str,
    room: &RoomName,
) -> Result<(), Failure> {
    settings
        .auth
        .may_join(user, room)
        .await
        .map_err(|denied| Failure::new(Code::NotAllowed, denied.reason()))
}

impl<A: Authorize> Session<A> {
    async fn join(&mut self, user: &str, command: &Command) -> Outcome {
        let room = RoomName::new(command.string("room")?).map_err(crate::Error::from)?;
        let since = command.position("since")?;
        let last = command.number("last")?;
        let presence = command.flag("presence")?;
        self.may_join(user, &room).await?;
        let durable = self
            .rooms
            .shared
            .node
            .config
            .durable_for(room.as_str())
            .is_some();
        let mut result = Map::new();
        result.insert("room".into(), room.as_str().into());
        result.insert("durable".into(), durable.into());
        if durable {
            let last = last.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
            let start = match (since, last) {
                (Some(since), Some(n)) => Start::AfterOrLast(since, n),
                (Some(since), None) => Start::After(since),
                (None, Some(n)) => Start::Last(n),
                (None, None) => Start::Now,
            };
            let resumed = self.socket.join_durable_from(&room, start).await?;
            position_fields(&mut result, resumed.position());
            if let Some(recovered) = resumed.recovered() {
                result.insert("recovered".into(), recovered.into());
            }
            if let Some(why) = resumed.failure() {
                result.insert("reason".into(), why.as_str().into());
            }
        } else if since.is_some() || last.is_some() {
            return Err(Failure::new(
                Code::NotDurable,
                format!(
                    "room {:?} keeps no history: join without since or last",
                    room.as_str()
                ),
            ));
        } else {
            self.socket.join(&room).await?;
        }
        if presence {
            let joined = match Member::new(user) {
                Ok(member) => self.socket.join_as(&room, &member).await,
                Err(e) => Err(e),
            };
            if let Err(e) = joined {
                self.socket.leave(room.as_str());
                return Err(e.into());
            }
        }
        Ok(Value::Object(result))
    }

    fn leave(&mut self, command: &Command) -> Outcome {
        let room = RoomName::new(command.string("room")?).map_err(crate::Error::from)?;
        let left = self.socket.leave(room.as_str());
        Ok(json!({ "room": room.as_str(), "left": left }))
    }

    /// `history` and `presence`: checked now, answered when Redis replies.
    async fn read(&mut self, user: &str, command: Command) -> Option<Outcome> {
        let room = match command.string("room") {
            Ok(room) => match RoomName::new(room) {
                Ok(room) => room,
                Err(e) => return Some(Err(crate::Error::from(e).into())),
            },
            Err(f) => return Some(Err(f)),
        };
        let what = match Read::of(&command) {
            Ok(what) => what,
            Err(f) => return Some(Err(f)),
        };
        if let Err(f) = self.may_join(user, &room).await {
            return Some(Err(f));
        }
        let rooms = self.rooms.clone();
        let id = command.id;
        self.pending
            .get_or_insert_with(FuturesUnordered::new)
            .push(Box::pin(
                async move { reply(id, what.run(&rooms, &room).await) },
            ));
        None
    }
}

fn unknown(cmd: &str) -> Failure {
    Failure::new(Code::UnknownCommand, format!("unknown command {cmd:?}"))
}
