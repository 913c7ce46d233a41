//! The protocol's Redis half: idempotent publish keys.
//!
//! One key per (room, user, client key), hash-tagged with the room's channel so that on a
//! Redis Cluster it lives on the room's shard. `claim` sets it, empty, with `NX` and a short
//! expiry (the publish in flight), so across the fleet exactly one publish wins it; the winner
//! then stores `+` and the message's position in it for the whole window (`done`), which is
//! what a duplicate's reply gives back, or deletes it when the publish failed (`release`), so
//! the retry goes out. A retry that finds the key still empty (the first is in flight, or its
//! node died before it could say) is told to try again; the short expiry bounds that.

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

/// The key for `user`'s publish `key` to `room`.
pub(super) fn key_of(bus: &Bus, room: &RoomName, user: &str, key: &str) -> String {
    let base = room_key_base(&channel::for_sender(bus.config(), room, 0));
    // Lengths first: a user name that holds a ':' cannot make two pairs share a key.
    format!("{base}:pubkey:{}:{user}:{key}", user.len())
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

/// The claimed publish failed: free the key for the retry.
pub(super) async fn release(bus: &Bus, key: &str) -> Result<(), Error> {
    run(bus, key, "release", [String::new(), String::new()])
        .await
        .map(drop)
}
