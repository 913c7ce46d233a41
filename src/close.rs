//! The WebSocket close codes the node sends, and the ones it documents for handlers, each with
//! the fixed reasons the node sends with it.
//!
//! A client that wants to tell why it was closed matches on these; a handler that closes a
//! socket itself ([`FanoutSocket::close`](crate::FanoutSocket::close)) may use them too, as the
//! examples do. The values are RFC 6455's (and IANA's, for 1013); axum's
//! [`close_code`](axum::extract::ws::close_code) names the same numbers more tersely.
//!
//! ```
//! use axum_fanout::close;
//!
//! fn explain(code: u16, reason: &str) -> &'static str {
//!     match (code, reason) {
//!         (close::TRY_AGAIN_LATER, close::SLOW_CONSUMER_REASON) => "reconnect, and read faster",
//!         (close::TRY_AGAIN_LATER, _) => "reconnect, maybe to another node",
//!         (close::GOING_AWAY, _) => "reconnect",
//!         _ => "give up",
//!     }
//! }
//! # assert_eq!(explain(1013, "node full"), "reconnect, maybe to another node");
//! ```

/// Declares each code, then its fixed reasons, once. The README's close-code table is checked
/// against the list this also makes (see the tests below), so a code or reason added here and
/// not documented there fails a test.
macro_rules! codes {
    ($(
        $(#[$code_doc:meta])*
        $code:ident = $value:literal {
            $( $(#[$reason_doc:meta])* $reason:ident = $text:literal, )*
        }
    )*) => {
        $(
            $(#[$code_doc])*
            pub const $code: u16 = $value;
            $(
                $(#[$reason_doc])*
                pub const $reason: &str = $text;
            )*
        )*

        /// Every code: the name it is declared under, its value and its fixed reasons.
        #[cfg(test)]
        const ALL: &[(&str, u16, &[&str])] = &[$((stringify!($code), $value, &[$($text),*])),*];
    };
}

codes! {
    /// 1000, normal closure: a handler dropped its [`FanoutSocket`](crate::FanoutSocket),
    /// after what was queued for it was written. Sent with an empty reason.
    NORMAL = 1000 {}

    /// 1001, going away: the node is shutting down, or the client stopped answering pings.
    GOING_AWAY = 1001 {
        /// Sent with [`GOING_AWAY`] to every socket when the node shuts down
        /// ([`RoomHandle::shutdown`](crate::RoomHandle::shutdown), spread over the drain
        /// window), and to a socket attached while it does: the server is restarting or going
        /// away, reconnect (to another node) with the position you hold.
        SHUTTING_DOWN_REASON = "server restarting; reconnect",
        /// Sent with [`GOING_AWAY`] to a client that sent nothing, not even a pong, for
        /// [`ping_interval`](crate::FanoutBuilder::ping_interval) +
        /// [`pong_timeout`](crate::FanoutBuilder::pong_timeout).
        NO_PONG_REASON = "no pong received",
    }

    /// 1003, unsupported data. The node never sends it; the chat example closes a client that
    /// sends a binary frame with it.
    UNSUPPORTED_DATA = 1003 {}

    /// 1007, invalid frame payload data. The node never sends it; the examples close a client
    /// whose text frame is not JSON with it.
    INVALID_DATA = 1007 {}

    /// 1008, policy violation: the client sent faster than the message rate limit, or a
    /// [`protocol`](crate::protocol) socket did not send its credentials in time. The
    /// examples also close with it a socket whose room or user they refuse, with the rule it
    /// broke as the reason.
    POLICY_VIOLATION = 1008 {
        /// Sent with [`POLICY_VIOLATION`] to a client over
        /// [`messages_per_second`](crate::FanoutBuilder::messages_per_second) (and its burst).
        RATE_LIMIT_REASON = "rate limit exceeded",
        /// Sent with [`POLICY_VIOLATION`] to a [`protocol`](crate::protocol) socket whose
        /// upgrade carried no credentials and that sent no successful `connect` within
        /// [`Protocol::connect_timeout`](crate::protocol::Protocol::connect_timeout).
        NO_CREDENTIALS_REASON = "credentials not sent in time",
    }

    /// 1009, message too big: a client message over
    /// [`max_message_size`](crate::FanoutBuilder::max_message_size), closed before it is
    /// buffered.
    MESSAGE_TOO_BIG = 1009 {
        /// Sent with [`MESSAGE_TOO_BIG`].
        MESSAGE_TOO_BIG_REASON = "message too big",
    }

    /// 1011, internal error. The node sends it only if a socket's writing half went missing,
    /// which is a bug; the examples close with it a socket whose join Redis could not
    /// confirm.
    INTERNAL_ERROR = 1011 {
        /// Sent with [`INTERNAL_ERROR`] by the node (never by the examples).
        INTERNAL_ERROR_REASON = "internal error",
    }

    /// 1013, try again later: the client could not keep up, or the node was full.
    TRY_AGAIN_LATER = 1013 {
        /// Sent with [`TRY_AGAIN_LATER`] to a client whose queue overflowed under
        /// [`OverflowPolicy::Disconnect`](crate::OverflowPolicy::Disconnect), or whose write
        /// took longer than [`write_timeout`](crate::FanoutBuilder::write_timeout).
        SLOW_CONSUMER_REASON = "slow consumer",
        /// Sent with [`TRY_AGAIN_LATER`] to a socket attached by hand
        /// ([`RoomHandle::attach`](crate::RoomHandle::attach)) to a node that already holds
        /// [`max_connections`](crate::FanoutBuilder::max_connections);
        /// [`RoomHandle::on_upgrade`](crate::RoomHandle::on_upgrade) answers 503 instead.
        NODE_FULL_REASON = "node full",
    }

    /// 4000, disconnected by the application, fleet-wide
    /// ([`RoomHandle::disconnect_user`](crate::RoomHandle::disconnect_user) and its kin): a
    /// logout or a ban. A client must not reconnect by itself. The reason is the application's.
    DISCONNECTED = 4000 {
        /// The reason sent with [`DISCONNECTED`] when the application gives none.
        DISCONNECTED_REASON = "disconnected",
    }

    /// 4001, the socket's credentials expired
    /// ([`FanoutSocket::expire_in`](crate::FanoutSocket::expire_in), and the
    /// [`protocol`](crate::protocol) endpoint's credentials) before they were refreshed:
    /// reconnect with new credentials.
    CREDENTIALS_EXPIRED = 4001 {
        /// Sent with [`CREDENTIALS_EXPIRED`].
        CREDENTIALS_EXPIRED_REASON = "credentials expired",
    }

    /// 4002, disconnected by the application with a hint to reconnect
    /// ([`Disconnect::reconnect`](crate::users::Disconnect::reconnect)): the server moved the
    /// client on (a rebalance, a changed permission). Reconnect, with a backoff.
    RECONNECT = 4002 {}
}

#[cfg(test)]
mod tests {
    use super::ALL;

    /// The rows of the README's table under `## Close codes`, split into cells.
    fn readme_rows() -> Vec<Vec<String>> {
        let readme = include_str!("../README.md");
        let (_, section) = readme
            .split_once("\n## Close codes\n")
            .expect("the README has a `## Close codes` section");
        section
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            // The header and the `|---|` line under it.
            .skip(2)
            .map(|l| {
                l.trim_matches('|')
                    .split('|')
                    .map(|c| c.trim().to_owned())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn the_readme_table_lists_every_code_and_reason_and_no_other_code() {
        let rows = readme_rows();
        assert!(!rows.is_empty(), "the close-code table has no rows");
        for (name, code, reasons) in ALL {
            let row: Vec<_> = rows.iter().filter(|r| r[0] == code.to_string()).collect();
            let [row] = row[..] else {
                panic!("the README's close-code table needs one row for {code}, not {row:?}");
            };
            let [_, names, sent, _] = &row[..] else {
                panic!("a close-code row has four cells (code, name, reasons, when): {row:?}");
            };
            assert!(
                names.contains(&format!("`{name}`")),
                "{code}'s row names `{name}`: {row:?}"
            );
            let quoted: Vec<_> = reasons.iter().map(|r| format!("`\"{r}\"`")).collect();
            for reason in &quoted {
                assert!(
                    sent.contains(reason),
                    "{code}'s row gives the reason {reason}: {row:?}"
                );
            }
            // And no reason the node does not send: the cell is the node's, not the examples'.
            assert_eq!(
                sent.matches("`\"").count(),
                quoted.len(),
                "{code}'s row gives only the reasons `close` declares: {row:?}"
            );
        }
        for row in &rows {
            assert!(
                ALL.iter().any(|(_, code, _)| row[0] == code.to_string()),
                "the README lists close code {} that `close` does not declare",
                row[0]
            );
        }
    }
}
