//! Storing durable rooms' messages: the script that stores and publishes a group of one room's
//! messages in one atomic step, and the pieces the publisher builds its pipelines of such calls
//! from. The keys are `history`'s (see its module docs).
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
//! `PEXPIRE`s) was most of its cost. Redis spent 14 us of CPU per message with a call each, 9.4
//! with groups of 2 and 6.5 with groups of 8 (redis-benchmark, 256 B, 3 subscribers;
//! BENCHMARKS.md). A busy room's messages queue up while the previous pipeline is in flight,
//! so under load groups grow by themselves; a lone message is a group of one, sent at once.
//!
//! A message the stream refuses ends its group: those before it were stored and published and
//! are reported so; its seq and those of the rest are given back (no hole is left behind); it
//! gets the error, and the rest are reported unsent.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use redis::{Cmd, RedisError, Value};

use super::history::{EPOCH_LUA, keys};
use super::script::{Script, Scripting, int, is_noscript, text, ttl_ms, unexpected};
use crate::config::Durability;
use crate::error::Error;
use crate::position::Position;

/// Room for the position the script writes in front of an envelope:
/// `{"pos":{"epoch":"<16 hex>","seq":<up to 20 digits>},`.
pub(super) const POS_BYTES: usize = 64;

/// Most messages in one script call. Redis runs nothing else while a script runs: 64 messages
/// are a few hundred microseconds.
pub(super) const GROUP: usize = 64;

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

/// Messages of one durable room for one [`store_call`]: stored and published on `channel`, in
/// their order.
pub(super) struct Group<'a> {
    pub(super) channel: &'a str,
    /// The epoch the room starts if it has none (new, or its history was lost). One per
    /// pipeline is enough: within one, a room's history is created at most once.
    pub(super) epoch: &'a str,
    pub(super) settings: &'a Durability,
    pub(super) envelopes: Vec<&'a [u8]>,
}

/// The script call that stores and publishes `group` in one atomic step: an `EVALSHA` of
/// `STORE_SCRIPT`, so that many of them can share a pipeline (Redis runs a pipeline in order,
/// so a room's seq order is queue order). When Redis does not know the script any more, each
/// call fails with NOSCRIPT: see [`to_retry`] and [`load_store_script`].
pub(super) fn store_call(publish_command: &str, group: &Group<'_>) -> Cmd {
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

/// Teaches Redis the store script again (every master of a cluster), after a call failed with
/// NOSCRIPT: Redis restarted, failed over to a replica that never ran it, or someone ran
/// `SCRIPT FLUSH`.
pub(super) async fn load_store_script(conn: &mut impl Scripting) -> Result<(), RedisError> {
    conn.load(&STORE_SCRIPT).await
}

/// The reply to a [`store_call`] of `n` messages, per message in their order: its position and
/// the number of nodes subscribed to the room, or why it was not stored.
pub(super) fn stored(reply: &Value, n: usize) -> Vec<Result<(Position, usize), Error>> {
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

/// Splits `run` into groups on one channel each, at most `max` long, each channel's items in
/// their order; the groups come in the order of their first item.
pub(super) fn group_by_channel<T>(
    run: Vec<T>,
    channel: impl Fn(&T) -> &str,
    max: usize,
) -> Vec<Vec<T>> {
    let mut sizes: Vec<usize> = Vec::new();
    let slots: Vec<usize> = {
        // A channel's group that still has room.
        let mut open: HashMap<&str, usize> = HashMap::new();
        run.iter()
            .map(|item| {
                let c = channel(item);
                match open.get(c) {
                    Some(&g) if sizes[g] < max => {
                        sizes[g] += 1;
                        g
                    }
                    _ => {
                        sizes.push(1);
                        open.insert(c, sizes.len() - 1);
                        sizes.len() - 1
                    }
                }
            })
            .collect()
    };
    let mut groups: Vec<Vec<T>> = sizes.iter().map(|&n| Vec::with_capacity(n)).collect();
    for (item, g) in run.into_iter().zip(slots) {
        groups[g].push(item);
    }
    groups
}

/// Which calls of a pipeline of [`store_call`]s (on `channels`, in order) to send again once
/// the script is loaded: those refused with NOSCRIPT, unless a later call on the same channel
/// succeeded. That one already took the next seqs: sent again, the refused messages would be
/// numbered after it, out of queue order, so they fail instead. A script cache that empties (a
/// flush) refuses a run's tail; one that fills meanwhile (another node loaded the script)
/// refuses its head, and only then is anything refused for good.
pub(super) fn to_retry<T>(channels: &[&str], replies: &[Result<T, RedisError>]) -> Vec<bool> {
    let mut later_success = HashSet::new();
    let mut retry = vec![false; replies.len()];
    for (i, (channel, reply)) in channels.iter().zip(replies).enumerate().rev() {
        match reply {
            Ok(_) => {
                later_success.insert(*channel);
            }
            Err(e) => retry[i] = is_noscript(e) && !later_success.contains(channel),
        }
    }
    retry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_keep_each_channels_order_and_their_size_limit() {
        let run = vec!["a1", "b1", "a2", "c1", "a3", "b2", "a4"];
        let groups = group_by_channel(run, |s| &s[..1], 3);
        assert_eq!(
            groups,
            [
                vec!["a1", "a2", "a3"],
                vec!["b1", "b2"],
                vec!["c1"],
                vec!["a4"]
            ]
        );
        assert!(group_by_channel(Vec::<&str>::new(), |s| s, 3).is_empty());
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

    #[test]
    fn only_refused_calls_no_later_call_of_their_room_overtook_are_sent_again() {
        use redis::{ErrorKind, ServerErrorKind};
        let noscript =
            || -> Result<(), RedisError> { Err(super::super::script::testing::noscript()) };
        let other = || -> Result<(), RedisError> {
            Err((ErrorKind::Server(ServerErrorKind::ResponseError), "OOM").into())
        };
        // A flush mid-run: the tail is refused and sent again.
        assert_eq!(
            to_retry(
                &["a", "b", "a", "b"],
                &[Ok(()), Ok(()), noscript(), noscript()]
            ),
            [false, false, true, true]
        );
        // Another node loaded the script mid-run: `a`'s first group cannot follow its
        // second (numbered already), `b`'s can.
        assert_eq!(
            to_retry(&["a", "b", "a"], &[noscript(), noscript(), Ok(())]),
            [false, true, false]
        );
        // Other errors are final.
        assert_eq!(to_retry(&["a", "a"], &[other(), noscript()]), [false, true]);
    }
}
