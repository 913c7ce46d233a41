//! The protocol's Redis half: idempotent publish keys.
//!
//! One key per (room, user, client key), hash-tagged with the room's channel so that on a
//! Redis Cluster it lives on the room's slot. `claim` sets it, empty, with `NX` and a short
//! expiry (the publish in flight), so across the fleet one publish at a time wins it; a retry
//! that finds the key still empty (the first is in flight, or its node died before Redis ran
//! it) is told to try again, and the short expiry bounds that.
//!
//! The outcome, `+` and the message's position (what a duplicate's reply gives back), is kept
//! for the whole window. In a room with one shard (every durable room, and plain rooms unless
//! sharded) the publish writes it itself, in the same script call that publishes
//! (`Broadcast::once`), and publishes nothing when the key holds an outcome already: no node
//! death between publishing and recording can let a retry send the message again. In a
//! sharded room the channel (chosen by the sending socket) may live on another slot than the
//! key, so the node records it after Redis answered (`done`), and a node that dies in between
//! leaves the key to expire. A publish that failed frees the key (`settle`), unless it holds an
//! outcome: then the message went out after all (a lost reply, or another node's retry).

use std::sync::LazyLock;
use std::time::Duration;

use redis::Value;
use tokio::time::timeout;

use crate::bus::Bus;
use crate::bus::script::{self, Script, int, items, room_key_base, text, ttl_ms, unexpected};
use crate::channel;
use crate::error::Error;
use crate::room::RoomName;

static DEDUPE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if ARGV[1] == 'claim' then
  if redis.call('SET', KEYS[1], '', 'NX', 'PX', ARGV[2]) then return {1} end
  return {0, redis.call('GET', KEYS[1]) or ''}
elseif ARGV[1] == 'done' then
  redis.call('SET', KEYS[1], '+' .. ARGV[2], 'PX', ARGV[3])
  return {1}
end
local held = redis.call('GET', KEYS[1])
if held and string.byte(held, 1) == 43 then return {0, held} end
redis.call('DEL', KEYS[1])
return {1}
",
    )
});

/// What `claim` found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Claim {
    /// This publish is the first with its key: send it.
    First,
    /// A publish with this key was accepted before; its position (`"E:S"`) in a durable
    /// room, else empty.
    Duplicate(String),
    /// A publish with this key is in flight (or its node died before recording it).
    InFlight,
}

/// A publish's key in Redis, and who records the publish's outcome there.
#[derive(Debug)]
pub(super) struct PublishKey {
    pub(super) key: String,
    /// The publish does, in the same step (`Broadcast::once`): a room with one shard.
    /// Otherwise the node does once Redis answered (`done`).
    pub(super) atomic: bool,
}

/// The key for `user`'s publish `key` to `room`.
pub(super) fn key_of(bus: &Bus, room: &RoomName, user: &str, key: &str) -> PublishKey {
    let config = bus.config();
    let base = room_key_base(&channel::for_sender(config, room, 0));
    // Lengths first: a user name that holds a ':' cannot make two pairs share a key.
    PublishKey {
        key: format!("{base}:pubkey:{}:{user}:{key}", user.len()),
        // Shard 0's channel is every sender's then: the key shares its slot.
        atomic: channel::shards(config, room.as_str()) == 1,
    }
}

async fn run(bus: &Bus, key: &str, mode: &str, args: [String; 2]) -> Result<Value, Error> {
    let wait = bus.config().publish_timeout;
    let call = async {
        let mut conns = bus.connections();
        let conn = conns
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Error::closed())?
            .clone();
        let Some(mut conn) = conn else {
            return Err(Error::closed());
        };
        let mut inv = DEDUPE.call();
        inv.key(key).arg(mode).arg(&args[0]).arg(&args[1]);
        script::run(&mut conn, &inv).await.map_err(Error::redis)
    };
    match timeout(wait, call).await {
        Ok(reply) => reply,
        Err(_) => Err(Error::publish_timeout(true, "the publish-key script")),
    }
}

/// How long a claim holds while its publish is in flight: twice the publish timeout, so a
/// claim whose node died frees the key soon.
fn in_flight(bus: &Bus) -> Duration {
    bus.config().publish_timeout * 2 + Duration::from_secs(1)
}

/// Claims `key`: whether this publish is the first with it.
pub(super) async fn claim(bus: &Bus, key: &str) -> Result<Claim, Error> {
    let ttl = ttl_ms(in_flight(bus)).to_string();
    let reply = run(bus, key, "claim", [ttl, String::new()]).await?;
    match items(&reply) {
        [first] if int(first) == Some(1) => Ok(Claim::First),
        [_, stored] => match text(stored).unwrap_or_default().strip_prefix('+') {
            Some(position) => Ok(Claim::Duplicate(position.to_owned())),
            None => Ok(Claim::InFlight),
        },
        _ => Err(unexpected("publish-key")),
    }
}

/// The claimed publish went out: keep its position (empty outside durable rooms) for
/// `window`.
pub(super) async fn done(
    bus: &Bus,
    key: &str,
    position: String,
    window: Duration,
) -> Result<(), Error> {
    let ttl = ttl_ms(window).to_string();
    run(bus, key, "done", [position, ttl]).await.map(drop)
}

/// The claimed publish failed: frees the key for the retry, unless it holds an outcome
/// (the message went out after all): then that outcome's position (`"E:S"`, or empty).
pub(super) async fn settle(bus: &Bus, key: &str) -> Result<Option<String>, Error> {
    let reply = run(bus, key, "settle", [String::new(), String::new()]).await?;
    match items(&reply) {
        [freed] if int(freed) == Some(1) => Ok(None),
        [_, held] => Ok(text(held)
            .as_deref()
            .and_then(|h| h.strip_prefix('+'))
            .map(str::to_owned)),
        _ => Err(unexpected("publish-key")),
    }
}
