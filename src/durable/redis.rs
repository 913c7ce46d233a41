//! Durable rooms in Redis: history reads, the epoch fork, and the task that reads back the
//! gaps the node's members missed. Storing and publishing is `store`'s (a script the bus's
//! publisher runs). With `bus/`, the only place that names Redis for durable rooms.
//!
//! # Keys
//!
//! A durable room on channel `C` keeps two keys: `{C}:meta`, a hash with the room's `epoch`
//! and last `seq`, and `{C}:history`, a stream whose entry `S-0` holds the envelope of message
//! `S` (field `e`). The braces are a Redis Cluster hash tag: both keys hash like the channel
//! itself, so they live in the channel's slot and the store script may SPUBLISH on it. When
//! `C` holds a hash tag of its own (a room or prefix with `{tag}`), the keys use that tag
//! instead (`{tag}C:meta`), which Redis hashes the same way. A channel Redis hashes whole but
//! that holds a `}` (e.g. room `a}b`) cannot share a slot with any key: on a cluster, such a
//! durable room's broadcasts fail (CROSSSLOT); on one server it does not matter.
//!
//! # Reads
//!
//! `READ_SCRIPT` reads the position and entries in one step, creating the epoch when the meta
//! key is missing as the store script does, so every node reports the same epoch even for a
//! room with no message. A read is one EVALSHA that loads the script and retries on NOSCRIPT
//! (a restarted Redis forgot it).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, MutexGuard, PoisonError};

use redis::Value;
use tokio::sync::{SemaphorePermit, mpsc, watch};
use tokio::time::{Instant, timeout_at};

mod store;

pub(crate) use store::StoreScript;

use super::{Durable, Page, Repair};
use crate::bus::script::{self, Script, int, room_key_base, text, ttl_ms, unexpected};
use crate::bus::{Bus, Repairs};
use crate::channel;
use crate::config::Durability;
use crate::error::Error;
use crate::position::Position;
use crate::random;
use crate::room::RoomName;

/// Concurrent history reads per node, at most: a flood of resumes (every client of a node
/// reconnecting at once) queues here instead of hitting Redis all at once. Each read returns at
/// most the replay limit of entries.
pub(crate) const READS: usize = 16;

/// The start of the scripts that write or read a room's history: the room's epoch, created
/// (`ARGV[1]`) when the meta key is missing, the room being new or its history lost. The
/// stream is then deleted, so no entry of a lost epoch survives into the new one.
const EPOCH_LUA: &str = r#"
local meta, stream = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'epoch')
local created = not epoch
if created then
  epoch = ARGV[1]
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', epoch, 'seq', 0)
end
"#;

static READ_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{EPOCH_LUA}{}",
        r#"
if created then
  redis.call('PEXPIRE', meta, ARGV[2])
end
local top = tonumber(redis.call('HGET', meta, 'seq'))
local entries = {}
if ARGV[3] == 'last' then
  entries = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', ARGV[4])
elseif ARGV[3] == 'after' then
  local after, limit = tonumber(ARGV[4]), tonumber(ARGV[5])
  if epoch == ARGV[6] and after < top and top - after <= limit then
    entries = redis.call('XRANGE', stream, tostring(after + 1), '+', 'COUNT', limit)
  end
end
return {epoch, top, entries}
"#
    ))
});

/// Starts a new epoch for a room whose history lost messages that were delivered: when the
/// room is still at epoch `ARGV[1]` and its last seq is below `ARGV[2]` (a failover to a
/// replica that had not received the last writes), the history is dropped and the room
/// numbers on from seq 1 in epoch `ARGV[3]`. Otherwise (another node forked it already, or
/// the history caught up) nothing changes. Returns the room's epoch after the call.
static FORK_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local meta, stream = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'epoch')
local top = tonumber(redis.call('HGET', meta, 'seq') or '0')
if epoch == ARGV[1] and top < tonumber(ARGV[2]) then
  epoch = ARGV[3]
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', epoch, 'seq', 0)
  redis.call('PEXPIRE', meta, ARGV[4])
end
return epoch
"#,
    )
});

/// What to read from a room's history.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Read {
    /// Only the position.
    Top,
    /// The last `n` messages.
    Last(usize),
    /// Every message after the position, when there are at most `n`.
    After(Position, usize),
}

/// The keys of the room on `channel`: `(meta, stream)` (see the module docs).
fn keys(channel: &str) -> (String, String) {
    let base = room_key_base(channel);
    (format!("{base}:meta"), format!("{base}:history"))
}

/// Stream entries `[[id, [field, value, ...]], ...]` as `(seq, envelope)`.
fn entries(value: &Value) -> Option<Vec<(u64, Vec<u8>)>> {
    let Value::Array(items) = value else {
        return Some(Vec::new()); // Lua's empty table comes back as an empty array, or nil
    };
    items
        .iter()
        .map(|item| {
            let Value::Array(parts) = item else {
                return None;
            };
            let (id, fields) = (parts.first()?, parts.get(1)?);
            let seq = text(id)?.split('-').next()?.parse().ok()?;
            let Value::Array(fields) = fields else {
                return None;
            };
            match fields.get(1)? {
                Value::BulkString(env) => Some((seq, env.clone())),
                _ => None,
            }
        })
        .collect()
}

impl Repairs for Durable {
    fn repairs(&self, room: &str) -> bool {
        self.is_durable(room)
    }
    fn resubscribed(&self, rooms: &[RoomName]) {
        self.repair_resubscribed(rooms);
    }
}

/// A read being assembled: resumes of the same room from the same place that arrive before it
/// is sent share it (see [`Durable::read`]).
pub(crate) type OpenReads = HashMap<(RoomName, Read), watch::Receiver<Option<Option<Page>>>>;

/// Takes a read out of the open ones when dropped: once sent (or given up), later resumes
/// start their own.
struct Closes<'a> {
    durable: &'a Durable,
    key: Option<(RoomName, Read)>,
}

impl Drop for Closes<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.durable.open_reads().remove(&key);
        }
    }
}

impl Durable {
    fn open_reads(&self) -> MutexGuard<'_, OpenReads> {
        // A map insert or remove at a time: consistent whatever panicked.
        self.open_reads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads durable `room`'s position and the entries `read` asks for, oldest first. At most
    /// [`READS`] reads run at once per node; the others wait their turn.
    ///
    /// A resume storm (every client of a restarted node resuming the same room from the same
    /// place on another) shares reads: a read of the same room and place that is still
    /// waiting for its turn takes this one along, and both get its page. Only while it waits:
    /// a read already sent may have been answered by Redis before this caller's socket began
    /// holding the room's live messages, and sharing it could skip what came between.
    pub(crate) async fn read(
        &self,
        bus: &Bus,
        room: &RoomName,
        settings: &Durability,
        read: Read,
    ) -> Result<Page, Error> {
        if !bus.is_configured() {
            return Err(Error::no_redis());
        }
        let deadline = Instant::now() + self.config.subscribe_timeout;
        let key = (room.clone(), read.clone());
        let joined = {
            let mut open = self.open_reads();
            match open.get(&key) {
                Some(rx) => Err(rx.clone()),
                None => {
                    let (tx, rx) = watch::channel(None);
                    open.insert(key.clone(), rx);
                    Ok(tx)
                }
            }
        };
        let shared = match joined {
            Ok(shared) => shared,
            Err(mut rx) => {
                if let Ok(Ok(page)) = timeout_at(deadline, rx.wait_for(Option::is_some)).await
                    && let Some(Some(page)) = page.as_ref()
                {
                    return Ok(page.clone());
                }
                // The read this one joined failed or was given up: read alone.
                let turn = self.turn(deadline).await?;
                return self
                    .read_now(bus, room, settings, read, deadline, turn)
                    .await;
            }
        };
        let closes = Closes {
            durable: self,
            key: Some(key),
        };
        let turn = self.turn(deadline).await?;
        drop(closes);
        let result = self
            .read_now(bus, room, settings, read, deadline, turn)
            .await;
        shared.send_replace(Some(result.as_ref().ok().cloned()));
        result
    }

    /// A turn among the [`READS`] reads a node runs at once.
    async fn turn(&self, deadline: Instant) -> Result<SemaphorePermit<'_>, Error> {
        match timeout_at(deadline, self.reads.acquire()).await {
            Ok(Ok(turn)) => Ok(turn),
            Ok(Err(_)) => Err(Error::closed()),
            Err(_) => Err(Error::publish_timeout(true, "EVALSHA")),
        }
    }

    /// One read, sent now (the caller holds its turn).
    async fn read_now(
        &self,
        bus: &Bus,
        room: &RoomName,
        settings: &Durability,
        read: Read,
        deadline: Instant,
        _turn: SemaphorePermit<'_>,
    ) -> Result<Page, Error> {
        let cfg = &self.config;
        self.counters.history_reads.add(1);
        let channel = channel::for_sender(cfg, room, 0);
        let (meta, stream) = keys(&channel);
        let mut script = READ_SCRIPT.call();
        script
            .key(meta)
            .key(stream)
            .arg(random::hex_id())
            .arg(ttl_ms(settings.ttl));
        let newest_first = matches!(read, Read::Last(_));
        match read {
            Read::Top => script.arg("top").arg(0).arg(0).arg(""),
            Read::Last(n) => script.arg("last").arg(n).arg(0).arg(""),
            Read::After(after, n) => script
                .arg("after")
                .arg(after.seq())
                .arg(n)
                .arg(after.epoch()),
        };
        let mut conn = bus.connection(deadline).await?;
        let reply = match timeout_at(deadline, script::run(&mut conn, &script)).await {
            Ok(Ok(Value::Array(reply))) => reply,
            Ok(Ok(_)) => return Err(unexpected("read")),
            Ok(Err(e)) => return Err(Error::redis(e)),
            Err(_) => return Err(Error::publish_timeout(true, "EVALSHA")),
        };
        let [epoch, top, found] = reply.as_slice() else {
            return Err(unexpected("read"));
        };
        let (Some(epoch), Some(top), Some(mut entries)) = (text(epoch), int(top), entries(found))
        else {
            return Err(unexpected("read"));
        };
        if newest_first {
            entries.reverse();
        }
        Ok(Page {
            top: Position::new(epoch, top),
            entries,
        })
    }

    /// Gives durable `room` a new epoch if its history is still at `delivered`'s epoch but
    /// behind it (see [`FORK_SCRIPT`]): the seqs the history lost would otherwise be numbered
    /// again for other messages, and a socket resuming from one of them would skip those
    /// without being told. Returns the room's epoch afterwards.
    async fn fork_epoch(
        &self,
        bus: &Bus,
        room: &RoomName,
        settings: &Durability,
        delivered: &Position,
    ) -> Result<String, Error> {
        let deadline = Instant::now() + self.config.subscribe_timeout;
        let (meta, stream) = keys(&channel::for_sender(&self.config, room, 0));
        let mut script = FORK_SCRIPT.call();
        script
            .key(meta)
            .key(stream)
            .arg(delivered.epoch())
            .arg(delivered.seq())
            .arg(random::hex_id())
            .arg(ttl_ms(settings.ttl));
        let mut conn = bus.connection(deadline).await?;
        match timeout_at(deadline, script::run(&mut conn, &script)).await {
            Ok(Ok(reply)) => text(&reply).ok_or_else(|| unexpected("fork")),
            Ok(Err(e)) => Err(Error::redis(e)),
            Err(_) => Err(Error::publish_timeout(true, "EVALSHA")),
        }
    }
}

/// Spawns the task that reads back the gaps of the node's durable rooms (once; it ends when
/// `stop` changes or is dropped).
pub(crate) fn start(
    durable: &Arc<Durable>,
    bus: &Arc<Bus>,
    runtime: &tokio::runtime::Handle,
    stop: &watch::Sender<()>,
) {
    if !bus.is_configured() {
        return;
    }
    if let Some(repairs) = durable.take_repairs() {
        runtime.spawn(repair_loop(
            durable.clone(),
            bus.clone(),
            repairs,
            stop.subscribe(),
        ));
    }
}

/// Reads back the gaps the node's durable rooms asked for, each in a task of its own (the
/// reads themselves wait for a turn, see [`READS`]), until the node stops.
async fn repair_loop(
    durable: Arc<Durable>,
    bus: Arc<Bus>,
    mut repairs: mpsc::UnboundedReceiver<Repair>,
    mut stop: watch::Receiver<()>,
) {
    loop {
        let repair = tokio::select! {
            repair = repairs.recv() => repair,
            _ = stop.changed() => return,
        };
        let Some(Repair { room, after }) = repair else {
            return;
        };
        let (durable, bus) = (durable.clone(), bus.clone());
        tokio::spawn(async move {
            let settings = durable.settings(room.as_str());
            let read = Read::After(after.clone(), settings.replay_limit.get());
            let page = durable
                .read(&bus, &room, &settings, read)
                .await
                .inspect_err(|e| tracing::warn!(room = %room, error = %e, "could not read a durable room's gap"))
                .ok();
            let Some(lost) = durable.repaired(&room, &after, page) else {
                return;
            };
            match durable.fork_epoch(&bus, &room, &settings, &lost).await {
                Ok(epoch) => {
                    tracing::warn!(room = %room, delivered = %lost, epoch, "a durable room's history lost delivered messages; it goes on in a new epoch")
                }
                // The next repair that finds the history behind tries again.
                Err(e) => {
                    tracing::warn!(room = %room, error = %e, "could not start a new epoch for a durable room whose history lost messages")
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_channels_hash_slot() {
        assert_eq!(
            keys("ws:room:lobby"),
            (
                "{ws:room:lobby}:meta".to_owned(),
                "{ws:room:lobby}:history".to_owned()
            )
        );
        assert_eq!(keys("ws:room:a{t}b").0, "{t}ws:room:a{t}b:meta");
    }
}
