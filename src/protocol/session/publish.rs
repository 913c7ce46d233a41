//! A session's `publish`: checked and queued in order, its reply waiting for Redis beside the
//! session's loop; with a client's key, accepted at most once across the fleet within the
//! window (`super::super::redis`).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use serde_json::{Map, Value};

use super::Session;
use crate::broadcast::Broadcast;
use crate::bus::Receipt;
use crate::envelope::Payload;
use crate::node::RoomHandle;
use crate::position::Position;
use crate::protocol::auth::Authorize;
use crate::protocol::redis::{self as keys, Claim, PublishKey};
use crate::protocol::wire::{
    Code, Command, Failure, Outcome, UNACKED, bad, position_fields, reply, unsent,
};
use crate::room::RoomName;

/// Longest idempotency key a client may choose.
const MAX_KEY: usize = 64;

impl<A: Authorize> Session<A> {
    pub(super) async fn publish(&mut self, user: &str, mut command: Command) -> Option<Outcome> {
        let id = command.id;
        if id == UNACKED {
            if let Err(failure) = self.publish_unacked(user, &mut command).await {
                let room = command.fields.get("room").and_then(Value::as_str);
                let _ = self.socket.send(unsent(room, &failure));
            }
            return None;
        }
        match self.start_publish(user, &mut command).await {
            Ok(pending) => {
                let reply = Box::pin(async move { reply(id, pending.await) });
                self.pending
                    .get_or_insert_with(FuturesUnordered::new)
                    .push(reply);
                None
            }
            Err(failure) => Some(Err(failure)),
        }
    }

    /// A publish sent without an id: checked and queued like any (so in order with the
    /// socket's others), then no reply. The receipt is dropped: a failure once Redis answered
    /// comes back as `Event::BroadcastFailed`, which the loop tells as `fanout.unsent`, as it
    /// does a failure here. Without a reply there is nothing to say "duplicate" with, so a key
    /// is refused.
    async fn publish_unacked(&mut self, user: &str, command: &mut Command) -> Result<(), Failure> {
        if command.fields.contains_key("key") {
            return Err(bad(
                "a publish with a \"key\" needs an \"id\": its reply says whether it was a duplicate",
            ));
        }
        let (room, payload) = self.checked(user, command).await?;
        let _receipt = self.socket.broadcast(&room, payload).queue().await?;
        Ok(())
    }

    /// A publish's room and payload, once the application allowed (and maybe rewrote) it.
    async fn checked(
        &mut self,
        user: &str,
        command: &mut Command,
    ) -> Result<(RoomName, Payload), Failure> {
        let room = RoomName::new(command.string("room")?).map_err(crate::Error::from)?;
        let data = command
            .data
            .take()
            .ok_or_else(|| bad("publish needs \"data\""))?;
        // Checked as JSON when the frame was read: carried as the client wrote it.
        let payload = Payload::from_raw(data);
        let settings = self.settings.clone();
        let payload = settings
            .auth
            .may_publish(user, &room, payload)
            .await
            .map_err(|denied| Failure::new(Code::NotAllowed, denied.reason()))?;
        Ok((room, payload))
    }

    /// Checks and queues a publish (in order), and returns its reply to come.
    async fn start_publish(
        &mut self,
        user: &str,
        command: &mut Command,
    ) -> Result<Pin<Box<dyn Future<Output = Outcome> + Send>>, Failure> {
        let key = match command.fields.get("key") {
            None | Some(Value::Null) => None,
            Some(Value::String(k)) if !k.is_empty() && k.len() <= MAX_KEY => Some(k.clone()),
            Some(_) => {
                return Err(bad(format!(
                    "\"key\" must be a string of 1 to {MAX_KEY} bytes"
                )));
            }
        };
        let (room, payload) = self.checked(user, command).await?;
        let settings = self.settings.clone();
        let bus = &self.rooms.shared.node.bus;
        let key = key.map(|k| keys::key_of(bus, &room, user, &k));
        if let Some(key) = &key {
            match keys::claim(bus, &key.key).await? {
                Claim::First => {}
                Claim::InFlight => {
                    return Err(Failure::new(
                        Code::Unavailable,
                        "a publish with this key is in flight: retry with the same key",
                    ));
                }
                Claim::Duplicate(first) => {
                    let outcome = duplicate(&first);
                    return Ok(Box::pin(async move { outcome }));
                }
            }
        }
        let window = settings.dedupe_window;
        let queued = once(self.socket.broadcast(&room, payload), key.as_ref(), window)
            .queue()
            .await;
        let rooms = self.rooms.clone();
        if key.is_none() {
            return Ok(Box::pin(async move {
                finish_publish(&rooms, queued, None, window).await
            }));
        }
        // A key's outcome is recorded by a task of its own: a session that ends (its client
        // dropped) before Redis answered must still record it, or the client's resend would
        // find the key in flight until the claim expires, and then send the message again.
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let outcome = finish_publish(&rooms, queued, key.as_ref(), window).await;
            let _ = tx.send(outcome);
        });
        Ok(Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(Failure::new(Code::Unavailable, "the publish was lost")))
        }))
    }
}

/// Waits for Redis's answer to a queued publish and records it under the publish's key (unless
/// the publish did): the position for a duplicate's reply, or the key released when it failed.
async fn finish_publish(
    rooms: &RoomHandle,
    queued: Result<Receipt, crate::Error>,
    key: Option<&PublishKey>,
    window: Duration,
) -> Outcome {
    let bus = &rooms.shared.node.bus;
    let published = match queued {
        Ok(receipt) => receipt.published().await,
        Err(e) => Err(e),
    };
    match published {
        Ok(published) => {
            let mut result = Map::new();
            result.insert("nodes".into(), published.nodes().into());
            if let Some(pos) = published.position() {
                position_fields(&mut result, pos);
            }
            // Recorded already when the publish itself did (`PublishKey::atomic`).
            if let Some(key) = key.filter(|k| !k.atomic) {
                let first = published.position().map(ToString::to_string);
                let first = first.unwrap_or_default();
                if let Err(e) = keys::done(bus, &key.key, first, window).await {
                    tracing::debug!(error = %e, "could not store a publish key's position");
                }
            }
            Ok(Value::Object(result))
        }
        Err(e) => {
            if let Some(key) = key {
                match keys::settle(bus, &key.key).await {
                    // It went out after all (a reply lost, or another node's retry): once.
                    Ok(Some(first)) => return duplicate(&first),
                    Ok(None) => {}
                    Err(release) => {
                        tracing::warn!(error = %release, "could not release a failed publish's key");
                    }
                }
            }
            Err(e.into())
        }
    }
}

/// `broadcast`, made at most once under `key` when its room allows it (see `PublishKey`).
fn once(broadcast: Broadcast, key: Option<&PublishKey>, window: Duration) -> Broadcast {
    match key {
        Some(key) if key.atomic => broadcast.once(key.key.clone(), window),
        _ => broadcast,
    }
}

/// The reply to a publish whose key was accepted before, at `first` (`"E:S"`, or empty).
fn duplicate(first: &str) -> Outcome {
    let mut result = Map::new();
    result.insert("duplicate".into(), true.into());
    if let Ok(pos) = first.parse::<Position>() {
        position_fields(&mut result, &pos);
    }
    Ok(Value::Object(result))
}
