//! The rules of a pipeline of script calls, each on one room's channel: how a run of messages
//! is split into calls, and which calls Redis refused (NOSCRIPT) may be sent again. The
//! publisher applies them to durable rooms' messages; the feature says what a call is.

use std::collections::{HashMap, HashSet};

use redis::RedisError;

use super::script::is_noscript;

/// Splits `run` into groups on one channel each, at most `max` long, each channel's items in
/// their order; the groups come in the order of their first item.
pub(crate) fn group_by_channel<T>(
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
pub(crate) fn to_retry<T>(channels: &[&str], replies: &[Result<T, RedisError>]) -> Vec<bool> {
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
