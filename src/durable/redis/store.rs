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
//!
//! A message with a guard (the bus's `Guard`: a key that makes it at most once) is checked
//! before any seq is taken: when its key holds an outcome already (`+...`), or an earlier
//! message of the group has the same key, it is skipped (an error in its place, no seq, the
//! others numbered on without a hole); otherwise its position is written to its key (`+E:S`)
//! right after it was stored and published, in the same call. A group without guards is
//! called exactly as before they existed.

use std::sync::LazyLock;

use redis::{Cmd, RedisError, Value};

use super::{EPOCH_LUA, keys};
use crate::bus::script::{Script, int, text, ttl_ms, unexpected};
use crate::bus::{Group, Published, Store};
use crate::error::Error;
use crate::position::Position;

/// Room for the position the script writes in front of an envelope:
/// `{"pos":{"epoch":"<16 hex>","seq":<up to 20 digits>},`.
const POS_BYTES: usize = 64;

/// Most messages in one script call. Redis runs nothing else while a script runs: 64 messages
/// are a few hundred microseconds.
const GROUP: usize = 64;

/// `KEYS`: meta, stream, then the group's guard keys in order. `ARGV`: the epoch to create,
/// the stream's length, the keys' idle TTL, the publish command, the channel; with guards,
/// then a flag per message (`1`: it has the next guard key) and each guard's TTL; then the
/// envelopes.
static STORE_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{EPOCH_LUA}{}",
        r#"
local g = #KEYS - 2
local base = 5
if g > 0 then base = 6 + g end
local n = #ARGV - base
local guard, m = {}, n
if g > 0 then
  local k, seen = 0, {}
  for i = 1, n do
    if string.byte(ARGV[6], i) == 49 then
      k = k + 1
      local key = KEYS[2 + k]
      local held = redis.call('GET', key)
      if seen[key] or (held and string.byte(held, 1) == 43) then
        guard[i], m = false, m - 1
      else
        guard[i], seen[key] = k, true
      end
    end
  end
end
local first = redis.call('HINCRBY', meta, 'seq', m) - m + 1
local head = '{"pos":{"epoch":"' .. epoch .. '","seq":'
local reply = {epoch, first}
local seq = first
for i = 1, n do
  if guard[i] == false then
    reply[2 + i] = redis.error_reply('GUARDED published already under this key')
  else
    local env = head .. seq .. '},' .. string.sub(ARGV[base + i], 2)
    local added = redis.pcall('XADD', stream, 'MAXLEN', '~', ARGV[2], seq .. '-0', 'e', env)
    if type(added) == 'table' and added.err then
      redis.call('HINCRBY', meta, 'seq', seq - first - m)
      reply[2 + i] = added
      break
    end
    reply[2 + i] = redis.call(ARGV[4], ARGV[5], env)
    if guard[i] then
      redis.call('SET', KEYS[2 + guard[i]], '+' .. epoch .. ':' .. seq, 'PX', ARGV[6 + guard[i]])
    end
    seq = seq + 1
  end
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
    // A durable room's group always has its settings.
    let settings = group.settings.copied().unwrap_or_default();
    let mut call = STORE_SCRIPT.call();
    call.key(meta)
        .key(stream)
        .arg(group.epoch)
        .arg(settings.history.get())
        .arg(ttl_ms(settings.ttl))
        .arg(publish_command)
        .arg(group.channel);
    if group.guards.iter().any(Option::is_some) {
        let flags: String = group
            .guards
            .iter()
            .map(|g| if g.is_some() { '1' } else { '0' })
            .collect();
        call.arg(flags);
        for guard in group.guards.iter().flatten() {
            call.key(&guard.key);
        }
        for guard in group.guards.iter().flatten() {
            call.arg(ttl_ms(guard.ttl));
        }
    }
    for envelope in &group.envelopes {
        call.arg(*envelope);
    }
    call.cmd()
}

/// The reply to a [`store_call`] of `n` messages, per message in their order: the number of
/// nodes subscribed to the room and its position, or why it was not stored. Seqs follow each
/// other over the stored messages only: a skipped one (guarded) took none.
fn stored(reply: &Value, n: usize) -> Vec<Result<Published, Error>> {
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
    let mut seq = first;
    (0..n)
        .map(|i| match nodes.get(i) {
            Some(Value::Int(count)) => {
                seq += 1;
                let position = Position::new(epoch.clone(), seq - 1);
                Ok(Published::new(
                    usize::try_from(*count).unwrap_or(0),
                    Some(position),
                ))
            }
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
    fn replies(&self, reply: &Value, n: usize) -> Vec<Result<Published, Error>> {
        stored(reply, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcomes(out: &[Result<Published, Error>]) -> Vec<Option<(String, usize)>> {
        out.iter()
            .map(|r| {
                let p = r.as_ref().ok()?;
                Some((p.position()?.to_string(), p.nodes()))
            })
            .collect()
    }

    #[test]
    fn a_group_reply_gives_each_message_its_position_or_its_error() {
        let reply = Value::Array(vec![
            Value::BulkString(b"e1".to_vec()),
            Value::Int(7),
            Value::Int(3),
            Value::Int(2),
        ]);
        let out = stored(&reply, 3);
        assert_eq!(
            outcomes(&out),
            [
                Some(("e1:7".to_owned(), 3)),
                Some(("e1:8".to_owned(), 2)),
                // Not stored: the script stopped before it.
                None
            ]
        );
        assert!(stored(&Value::Nil, 2).iter().all(Result::is_err));
    }

    #[test]
    fn a_skipped_guarded_message_takes_no_seq() {
        let skipped = redis::parse_redis_value(b"-GUARDED published already\r\n").expect("parsed");
        let reply = Value::Array(vec![
            Value::BulkString(b"e1".to_vec()),
            Value::Int(7),
            Value::Int(1),
            skipped,
            Value::Int(1),
        ]);
        assert_eq!(
            outcomes(&stored(&reply, 3)),
            [
                Some(("e1:7".to_owned(), 1)),
                None,
                Some(("e1:8".to_owned(), 1))
            ]
        );
    }
}
