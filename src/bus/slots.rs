//! Redis Cluster hash slots: which slot a channel lives in, which master serves a slot, and
//! commands split by slot (one SSUBSCRIBE naming channels of two slots is refused with
//! CROSSSLOT).

#[cfg(feature = "cluster")]
use redis::RedisError;

/// Runs `command` once per hash slot with that slot's channels, concurrently (one SSUBSCRIBE
/// naming channels of two slots is refused with CROSSSLOT).
#[cfg(feature = "cluster")]
pub(super) async fn per_slot<'a, F, Fut>(
    conn: &redis::cluster_async::ClusterConnection,
    channels: &'a [String],
    command: F,
) -> Result<(), RedisError>
where
    F: Fn(redis::cluster_async::ClusterConnection, Vec<&'a str>) -> Fut,
    Fut: std::future::Future<Output = Result<(), RedisError>>,
{
    let mut groups: std::collections::BTreeMap<u16, Vec<&str>> = Default::default();
    for channel in channels {
        groups
            .entry(key_slot(channel.as_bytes()))
            .or_default()
            .push(channel);
    }
    let commands = groups
        .into_values()
        .map(|group| command(conn.clone(), group));
    futures_util::future::try_join_all(commands).await.map(drop)
}

/// `CLUSTER SLOTS` as `(first slot, last slot, master address)`; entries it cannot read are
/// skipped.
#[cfg(feature = "cluster")]
pub(super) fn master_slot_ranges(reply: &redis::Value) -> Vec<(u16, u16, String)> {
    use redis::Value;
    let Value::Array(entries) = reply else {
        return Vec::new();
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    entries
        .iter()
        .filter_map(|entry| {
            let Value::Array(fields) = entry else {
                return None;
            };
            let (Value::Int(first), Value::Int(last), Value::Array(master)) =
                (fields.first()?, fields.get(1)?, fields.get(2)?)
            else {
                return None;
            };
            let port = match master.get(1)? {
                Value::Int(port) => *port,
                _ => return None,
            };
            let address = format!("{}:{port}", text(master.first()?)?);
            Some((
                u16::try_from(*first).ok()?,
                u16::try_from(*last).ok()?,
                address,
            ))
        })
        .collect()
}

/// One probe channel per master: `base:<n>` with the smallest `n` whose slot that master
/// serves. A `{tag}` in `base` pins every candidate to one slot; the search then gives up on
/// the other masters after a bounded number of tries (they are still watched through their
/// disconnection), and at least `base:0` is always probed.
#[cfg(feature = "cluster")]
pub(super) fn probe_channels_for(base: &str, ranges: &[(u16, u16, String)]) -> Vec<String> {
    let mut masters: Vec<&str> = ranges.iter().map(|(_, _, m)| m.as_str()).collect();
    masters.sort_unstable();
    masters.dedup();
    let mut channels = Vec::with_capacity(masters.len());
    for master in masters {
        let found = (0..10_000u32)
            .map(|n| format!("{base}:{n}"))
            .find(|channel| {
                let slot = key_slot(channel.as_bytes());
                ranges
                    .iter()
                    .any(|(first, last, m)| m == master && (*first..=*last).contains(&slot))
            });
        channels.extend(found.filter(|c| !channels.contains(c)));
    }
    if channels.is_empty() {
        channels.push(format!("{base}:0"));
    }
    channels
}

/// Number of hash slots in a Redis Cluster.
#[cfg(any(feature = "cluster", test))]
pub(crate) const SLOTS: u16 = 16384;

/// The cluster hash slot of `key`: CRC16 (XMODEM) of the key, or of its hash tag (the part
/// between the first `{` and the next `}`, when not empty), modulo 16384, as Redis computes it.
#[cfg(any(feature = "cluster", test))]
pub(crate) fn key_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16(hashed) % SLOTS
}

#[cfg(any(feature = "cluster", test))]
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slots_match_redis() {
        // Reference values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"{user1000}.followers"), key_slot(b"user1000"));
        // An empty tag, or no closing brace, hashes the whole key.
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_eq!(key_slot(b"foo{bar"), crc16(b"foo{bar") % SLOTS);
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
    }

    #[cfg(feature = "cluster")]
    #[test]
    fn one_probe_channel_per_master_in_a_slot_it_serves() {
        let ranges = vec![
            (0, 5460, "a:1".to_owned()),
            (5461, 10922, "b:2".to_owned()),
            (10923, 16383, "c:3".to_owned()),
        ];
        let channels = probe_channels_for("__axum_fanout:probe:n1", &ranges);
        assert_eq!(channels.len(), 3, "{channels:?}");
        let mut slots: Vec<u16> = channels.iter().map(|c| key_slot(c.as_bytes())).collect();
        slots.sort_unstable();
        assert!(slots[0] <= 5460 && (5461..=10922).contains(&slots[1]) && slots[2] >= 10923);
        // A hash tag pins every candidate to one slot: one channel, not a search forever.
        let pinned = probe_channels_for("{tag}probe", &ranges);
        assert_eq!(pinned.len(), 1, "{pinned:?}");
        // Nothing readable from CLUSTER SLOTS: still one channel to probe.
        assert_eq!(probe_channels_for("p", &[]), ["p:0"]);
    }

    #[cfg(feature = "cluster")]
    #[test]
    fn cluster_slots_replies_are_read_leniently() {
        use redis::Value;
        let node = |host: &str, port| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![Value::Int(0), Value::Int(100), node("10.0.0.1", 7000)]),
            Value::Array(vec![
                Value::Int(101),
                Value::Int(16383),
                node("10.0.0.2", 7001),
            ]),
            Value::Array(vec![Value::Nil]),
            Value::Int(3),
        ]);
        assert_eq!(
            master_slot_ranges(&reply),
            [
                (0, 100, "10.0.0.1:7000".to_owned()),
                (101, 16383, "10.0.0.2:7001".to_owned())
            ]
        );
        assert!(master_slot_ranges(&Value::Nil).is_empty());
    }
}
