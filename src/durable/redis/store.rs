//! Storing durable rooms' messages: the script that stores and publishes a group of one room's
//! messages in one atomic step ([`StoreScript`], the bus's `Store`: the bus's publisher
//! pipelines its calls). The keys are the parent module's.
//!
//! # The script
//!
//! `STORE_SCRIPT` runs atomically in Redis, once per *group*: up to [`GROUP`] messages on one
//! room's channel, in queue order. It creates the epoch when the meta key is missing (the
//! history was lost, or the room is new; the stream is then deleted, so no entry of a lost
//! epoch survives into the new one), takes the group's seqs with one `HINCRBY`, writes each
//! envelope with its position into the stream (`XADD ... MAXLEN ~ N`) and publishes the same
//! envelope on the room's channel, then refreshes the idle TTL of both keys. So no message is
//! delivered live without being in the history, nor stored without being published, and seq
//! order is queue order.
//!
//! Why groups: the script's fixed part (the call itself, reading the epoch, taking the seqs, two
//! `PEXPIRE`s) was most of its cost, so Redis's CPU per message falls as groups grow
//! (BENCHMARKS.md has the measure). A busy room's messages queue up while the previous pipeline is in flight,
//! so under load groups grow by themselves; a lone message is a group of one, sent at once.
//!
//! A message the stream refuses ends its group: those before it were stored and published and
//! are reported so; its seq and those of the rest are given back (no hole is left behind); it
//! gets the error, and the rest are reported unsent.

use std::sync::LazyLock;

use redis::{Cmd, RedisError, Value};

use super::{EPOCH_LUA, keys};
use crate::bus::script::{Script, int, text, ttl_ms, unexpected};
use crate::bus::{Group, Store};
use crate::error::Error;
use crate::position::Position;

/// Room for the position the script writes in front of an envelope:
/// `{"pos":{"epoch":"<16 hex>","seq":<up to 20 digits>},`.
const POS_BYTES: usize = 64;

/// Most messages in one script call. Redis runs nothing else while a script runs: 64 messages
/// are a few hundred microseconds.
const GROUP: usize = 64;

static STORE_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{EPOCH_LUA}{}",
        r#"
local n = #ARGV - 5
local first = redis.call('HINCRBY', meta, 'seq', n) - n + 1
local head = '{"pos":{"epoch":"' .. epoch .. '","seq":'
local reply = {epoch, first}
for i = 1, n do
  local seq = first + i - 1
  local env = head .. seq .. '},' .. string.sub(ARGV[5 + i], 2)
  local added = redis.pcall('XADD', stream, 'MAXLEN', '~', ARGV[2], seq .. '-0', 'e', env)
  if type(added) == 'table' and added.err then
    redis.call('HINCRBY', meta, 'seq', i - n - 1)
    reply[2 + i] = added
    break
  end
  reply[2 + i] = redis.call(ARGV[4], ARGV[5], env)
end
redis.call('PEXPIRE', meta, ARGV[3])
redis.call('PEXPIRE', stream, ARGV[3])
return reply
"#
    ))
});

/// The script call that stores and publishes `group` in one atomic step: an `EVALSHA` of
/// `STORE_SCRIPT`, so that many of them can share a pipeline (Redis runs a pipeline in order,
/// so a room's seq order is queue order). When Redis does not know the script any more, each
/// call fails with NOSCRIPT: see [`to_retry`] and [`load_store_script`].
fn store_call(publish_command: &str, group: &Group<'_>) -> Cmd {
    let (meta, stream) = keys(group.channel);
    let mut call = STORE_SCRIPT.call();
    call.key(meta)
        .key(stream)
        .arg(group.epoch)
        .arg(group.settings.history.get())
        .arg(ttl_ms(group.settings.ttl))
        .arg(publish_command)
        .arg(group.channel);
    for envelope in &group.envelopes {
        call.arg(*envelope);
    }
    call.cmd()
}

/// The reply to a [`store_call`] of `n` messages, per message in their order: its position and
/// the number of nodes subscribed to the room, or why it was not stored.
fn stored(reply: &Value, n: usize) -> Vec<Result<(Position, usize), Error>> {
    let parsed = match reply {
        Value::Array(items) => match items.as_slice() {
            [epoch, first, nodes @ ..] => text(epoch).zip(int(first)).map(|(e, f)| (e, f, nodes)),
            _ => None,
        },
        _ => None,
    };
    let Some((epoch, first, nodes)) = parsed else {
        return (0..n).map(|_| Err(unexpected("store"))).collect();
    };
    let epoch: std::sync::Arc<str> = epoch.into();
    (0..n)
        .map(|i| match nodes.get(i) {
            Some(Value::Int(count)) => Ok((
                Position::new(epoch.clone(), first + i as u64),
                usize::try_from(*count).unwrap_or(0),
            )),
            Some(Value::ServerError(e)) => Err(Error::redis(RedisError::from(e.clone()))),
            Some(_) => Err(unexpected("store")),
            None => Err(Error::redis(
                "not stored: redis refused an earlier message of the same room in the same call",
            )),
        })
        .collect()
}

/// The durable rooms' store, as the bus's publisher runs it.
#[derive(Debug, Default)]
pub(crate) struct StoreScript;

impl Store for StoreScript {
    fn script(&self) -> &Script {
        &STORE_SCRIPT
    }
    fn added_bytes(&self) -> usize {
        POS_BYTES
    }
    fn group_max(&self) -> usize {
        GROUP
    }
    fn call(&self, publish_command: &str, group: &Group<'_>) -> Cmd {
        store_call(publish_command, group)
    }
    fn replies(&self, reply: &Value, n: usize) -> Vec<Result<(Position, usize), Error>> {
        stored(reply, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_reply_gives_each_message_its_position_or_its_error() {
        let reply = Value::Array(vec![
            Value::BulkString(b"e1".to_vec()),
            Value::Int(7),
            Value::Int(3),
            Value::Int(2),
        ]);
        let out = stored(&reply, 3);
        let ok: Vec<_> = out
            .iter()
            .take(2)
            .map(|r| r.as_ref().map(|(p, n)| (p.to_string(), *n)).ok())
            .collect();
        assert_eq!(
            ok,
            [Some(("e1:7".to_owned(), 3)), Some(("e1:8".to_owned(), 2))]
        );
        // The third was not stored: the script stopped before it.
        assert!(out[2].is_err());
        assert!(stored(&Value::Nil, 2).iter().all(Result::is_err));
    }
}
