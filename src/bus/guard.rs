//! Publishing at most once: a message with a [`Guard`] is published only if the guard's key
//! does not hold an outcome yet, and its outcome is written there in the same script call, so
//! no crash between the two can leave a published message unrecorded.
//!
//! The publisher runs a plain room's guarded messages with [`GuardedPublish`] (a [`Store`] that
//! stores nothing), and a durable room's with the room's own store, which honours the guards
//! the same way. Who chooses the keys, and what a caller does with a message that was not
//! published, is the caller's.
//!
//! An outcome is a value that starts with `+` (a durable room's store writes `+E:S`, its
//! position; a plain room's publish writes `+`). Anything else in the key (a caller's claim,
//! say) does not stop the publish, and is replaced by the outcome.

use std::sync::LazyLock;
use std::time::Duration;

use redis::{Cmd, RedisError, Value};

use super::receipt::Published;
use super::script::{Script, ttl_ms, unexpected};
use super::{Group, Store};
use crate::error::Error;

/// A key that makes one message's publish happen at most once while the key lives.
///
/// The key must hash to the slot of the channel the message goes to (`{channel}...`, see
/// `script::room_key_base`), so that on a Redis Cluster one script call may read it, write it
/// and publish on the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Guard {
    pub(crate) key: String,
    /// How long the key keeps the outcome: as long as a retry may come.
    pub(crate) ttl: Duration,
}

/// Most messages in one call: as the durable rooms' store.
const GROUP: usize = 64;

/// `KEYS`: one guard key per message. `ARGV`: the publish command, the channel, then each
/// message's guard TTL (ms) and envelope. Per message: the subscriber count, or an error when
/// its key holds an outcome (or an earlier message of the call had the same key).
static GUARD_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local reply, seen = {}, {}
for i = 1, #KEYS do
  local key = KEYS[i]
  local held = redis.call('GET', key)
  if seen[key] or (held and string.byte(held, 1) == 43) then
    reply[i] = redis.error_reply('GUARDED published already under this key')
  else
    seen[key] = true
    reply[i] = redis.call(ARGV[1], ARGV[2], ARGV[2 + 2 * i])
    redis.call('SET', key, '+', 'PX', ARGV[1 + 2 * i])
  end
end
return reply
",
    )
});

/// A plain room's guarded messages, as the publisher runs them.
#[derive(Debug, Default)]
pub(crate) struct GuardedPublish;

impl Store for GuardedPublish {
    fn script(&self) -> &Script {
        &GUARD_SCRIPT
    }
    fn added_bytes(&self) -> usize {
        0
    }
    fn group_max(&self) -> usize {
        GROUP
    }
    fn call(&self, publish_command: &str, group: &Group<'_>) -> Cmd {
        let mut call = GUARD_SCRIPT.call();
        call.arg(publish_command).arg(group.channel);
        // Every message of a plain room that comes here has a guard (the others are plain
        // PUBLISHes); one without would have no key to stand for it.
        for (envelope, guard) in group.envelopes.iter().zip(&group.guards) {
            if let Some(guard) = guard {
                call.key(&guard.key).arg(ttl_ms(guard.ttl)).arg(*envelope);
            }
        }
        call.cmd()
    }
    fn replies(&self, reply: &Value, n: usize) -> Vec<Result<Published, Error>> {
        let items = match reply {
            Value::Array(items) if items.len() == n => items,
            _ => return (0..n).map(|_| Err(unexpected("guarded publish"))).collect(),
        };
        items
            .iter()
            .map(|item| match item {
                Value::Int(count) => Ok(Published::new(usize::try_from(*count).unwrap_or(0), None)),
                Value::ServerError(e) => Err(Error::redis(RedisError::from(e.clone()))),
                _ => Err(unexpected("guarded publish")),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_names_each_key_and_pairs_each_ttl_with_its_envelope() {
        let (a, b) = (
            Guard {
                key: "{c}:k1".into(),
                ttl: Duration::from_secs(2),
            },
            Guard {
                key: "{c}:k2".into(),
                ttl: Duration::from_millis(5),
            },
        );
        let group = Group {
            channel: "c",
            epoch: "e",
            settings: None,
            envelopes: vec![b"one", b"two"],
            guards: vec![Some(&a), Some(&b)],
        };
        let cmd = GuardedPublish.call("PUBLISH", &group);
        let words: Vec<String> = cmd
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                _ => String::new(),
            })
            .collect();
        assert_eq!(
            words[2..],
            [
                "2", "{c}:k1", "{c}:k2", "PUBLISH", "c", "2000", "one", "5", "two"
            ]
        );
    }

    #[test]
    fn a_reply_gives_each_message_its_count_or_why_it_was_not_sent() {
        let reply = Value::Array(vec![Value::Int(3)]);
        let out = GuardedPublish.replies(&reply, 1);
        assert_eq!(out[0].as_ref().ok().map(Published::nodes), Some(3));
        assert!(GuardedPublish.replies(&reply, 2).iter().all(Result::is_err));
    }
}
