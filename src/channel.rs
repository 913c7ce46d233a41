//! Redis channel names: which channels carry a room, and which room a channel carries.
//!
//! A room with one shard lives on `<prefix><room>`; a room split over `n` shards lives on
//! `<prefix><room>:shard0` .. `<prefix><room>:shard<n-1>` (the seed's naming). The mapping is
//! injective because [`RoomName`] rejects names that end in `:shard<digits>`: a channel that
//! ends so is always a shard channel, and stripping the suffix gives its room back. Without
//! that rule, room `42:shard1` and shard 1 of room `42` would share a channel.
//!
//! A broadcast goes to one shard, chosen by a hash of its sender, so each sender's messages
//! stay in order; every node that holds the room subscribes to all of its shards.

use std::borrow::Cow;

use crate::config::Config;
use crate::room::{RoomName, USER_MARK, has_shard_suffix, user_of};

/// Where users' channels start: `__axum_fanout:user:<prefix><user>`. Outside the room prefix,
/// so no room name can reach a user's channel, and with the fleet's prefix, so that two fleets
/// on one Redis stay apart (as presence's keys do).
const USER_CHANNELS: &str = "__axum_fanout:user:";

/// Number of channels `room` is split over: always one for a durable room (one order) and for
/// a user's room (one order per sender, whoever the sender is).
pub(crate) fn shards(config: &Config, room: &str) -> u16 {
    if user_of(room).is_some() || config.durable_for(room).is_some() {
        return 1;
    }
    if config.room_shards.is_empty() {
        return config.shard_count.get();
    }
    config
        .room_shards
        .get(room)
        .map_or(config.shard_count.get(), |n| n.get())
}

fn name(config: &Config, room: &str, shard: Option<u16>) -> String {
    if let Some(user) = user_of(room) {
        return format!("{USER_CHANNELS}{}{user}", config.channel_prefix);
    }
    let mut channel = String::with_capacity(config.channel_prefix.len() + room.len() + 12);
    channel.push_str(&config.channel_prefix);
    channel.push_str(room);
    if let Some(shard) = shard {
        channel.push_str(":shard");
        channel.push_str(&shard.to_string());
    }
    channel
}

/// Every channel that carries `room`: what a node holding the room subscribes to.
pub(crate) fn all(config: &Config, room: &RoomName) -> Vec<String> {
    match shards(config, room.as_str()) {
        1 => vec![name(config, room.as_str(), None)],
        n => (0..n)
            .map(|shard| name(config, room.as_str(), Some(shard)))
            .collect(),
    }
}

/// The channel a broadcast to `room` from `sender` goes to.
pub(crate) fn for_sender(config: &Config, room: &RoomName, sender: u64) -> String {
    match shards(config, room.as_str()) {
        1 => name(config, room.as_str(), None),
        n => name(config, room.as_str(), Some((sender % u64::from(n)) as u16)),
    }
}

/// The room `channel` carries, if it is one of ours (a user's channel: that user's room).
pub(crate) fn room_of<'a>(config: &Config, channel: &'a [u8]) -> Option<Cow<'a, str>> {
    let channel = std::str::from_utf8(channel).ok()?;
    if let Some(user) = channel
        .strip_prefix(USER_CHANNELS)
        .and_then(|rest| rest.strip_prefix(config.channel_prefix.as_str()))
    {
        return Some(Cow::Owned(format!("{USER_MARK}{user}")));
    }
    let rest = channel.strip_prefix(config.channel_prefix.as_str())?;
    if has_shard_suffix(rest) {
        // Room names never end in `:shard<digits>`, so this is the shard suffix.
        let cut = rest.rfind(":shard")?;
        Some(Cow::Borrowed(&rest[..cut]))
    } else {
        Some(Cow::Borrowed(rest))
    }
}

/// A stable 64-bit hash (FNV-1a) of a sender identity, so that the shard of a sender does not
/// depend on the process (std's hasher is randomly seeded).
pub(crate) fn sender_key(node_id: &str, socket: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in node_id.bytes().chain(socket.to_le_bytes()) {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::num::NonZeroU16;

    use super::*;
    use crate::config::FanoutBuilder;

    fn config(shards: u16) -> Config {
        FanoutBuilder::new("redis://unused")
            .shard_count(NonZeroU16::new(shards).expect("non-zero"))
            .into_config_for_tests()
    }

    fn room(s: &str) -> RoomName {
        RoomName::new(s).expect("valid")
    }

    #[test]
    fn a_users_room_has_one_channel_outside_the_rooms_prefix_and_maps_back() {
        let c = config(4);
        let user = RoomName::of_user("alice");
        assert_eq!(all(&c, &user), ["__axum_fanout:user:ws:room:alice"]);
        assert_eq!(for_sender(&c, &user, 7), "__axum_fanout:user:ws:room:alice");
        let back = room_of(&c, b"__axum_fanout:user:ws:room:alice");
        assert_eq!(back.as_deref(), Some(user.as_str()));
        // A room may be called like a user's channel; it stays a room.
        let room = RoomName::new("__axum_fanout:user:x").expect("valid");
        let channels = all(&c, &room);
        assert!(
            channels.iter().all(|ch| ch.starts_with("ws:room:")),
            "{channels:?}"
        );
    }

    #[test]
    fn one_shard_is_the_seed_channel() {
        let c = config(1);
        assert_eq!(all(&c, &room("42")), ["ws:room:42"]);
        assert_eq!(for_sender(&c, &room("42"), 99), "ws:room:42");
        assert_eq!(room_of(&c, b"ws:room:42").as_deref(), Some("42"));
    }

    #[test]
    fn shards_follow_the_seed_naming_and_map_back_to_their_room() {
        let c = config(4);
        let channels = all(&c, &room("42"));
        assert_eq!(
            channels,
            [
                "ws:room:42:shard0",
                "ws:room:42:shard1",
                "ws:room:42:shard2",
                "ws:room:42:shard3"
            ]
        );
        for ch in &channels {
            assert_eq!(room_of(&c, ch.as_bytes()).as_deref(), Some("42"));
        }
        assert!(channels.contains(&for_sender(&c, &room("42"), sender_key("n1", 7))));
        assert_eq!(room_of(&c, b"other:42"), None);
    }

    #[test]
    fn names_are_injective_for_tricky_rooms() {
        let c = config(4);
        let rooms = [
            "42",
            "42:shard",
            "42:",
            "4",
            "42:shardx1",
            ":shard",
            "a:shard:b",
        ];
        let mut seen = HashSet::new();
        for r in rooms {
            for ch in all(&c, &room(r)) {
                assert_eq!(room_of(&c, ch.as_bytes()).as_deref(), Some(r), "{ch}");
                assert!(seen.insert(ch.clone()), "{ch} named twice");
            }
        }
        assert!(
            RoomName::new("42:shard1").is_err(),
            "the one name that would collide"
        );
    }

    #[test]
    fn a_sender_always_lands_on_the_same_shard() {
        let c = config(16);
        let key = sender_key("node-a", 12345);
        assert_eq!(key, sender_key("node-a", 12345));
        let first = for_sender(&c, &room("hot"), key);
        assert!((0..10).all(|_| for_sender(&c, &room("hot"), key) == first));
        let spread: HashSet<String> = (0..200)
            .map(|s| for_sender(&c, &room("hot"), sender_key("node-a", s)))
            .collect();
        assert!(
            spread.len() > 8,
            "senders spread over the shards: {}",
            spread.len()
        );
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            /// Validation never panics, and what it accepts maps to channels and back.
            #[test]
            fn any_valid_room_round_trips_through_its_channels(name in ".{0,140}", shards in 1u16..20) {
                let Ok(room) = RoomName::new(&name) else { return Ok(()) };
                let c = config(shards);
                for ch in all(&c, &room) {
                    let back = room_of(&c, ch.as_bytes());
                    prop_assert_eq!(back.as_deref(), Some(room.as_str()));
                }
                let picked = for_sender(&c, &room, sender_key("n", 1));
                prop_assert!(all(&c, &room).contains(&picked));
            }

            /// Two different rooms never share a channel, whatever they contain.
            #[test]
            fn different_rooms_never_share_a_channel(
                a in "[a-z0-9:]{1,12}(:shard[0-9]{0,2})?",
                b in "[a-z0-9:]{1,12}(:shard[0-9]{0,2})?",
                shards in 1u16..6,
            ) {
                let (Ok(a), Ok(b)) = (RoomName::new(&a), RoomName::new(&b)) else { return Ok(()) };
                prop_assume!(a != b);
                let c = config(shards);
                let ours: HashSet<String> = all(&c, &a).into_iter().collect();
                prop_assert!(all(&c, &b).iter().all(|ch| !ours.contains(ch)));
            }
        }
    }
}
