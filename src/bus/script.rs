//! Lua scripts in Redis: one way to run them for every feature that keeps state there
//! (durable rooms, presence), the parsers of their replies, and the names of their keys.
//!
//! A [`Script`] is run by its SHA1 (`EVALSHA`, computed here). When Redis does not know it
//! (it restarted, failed over to a replica that never ran it, or was told `SCRIPT FLUSH`), the
//! runner loads it (`SCRIPT LOAD`) and runs the call once more: [`run`] for one call,
//! [`run_pipeline`] for a pipeline or transaction that holds one. A pipeline of many calls (the
//! publisher's) decides per call what may be sent again, and loads with [`Scripting::load`].
//!
//! What the runner needs of a connection is the small [`Scripting`] trait, so that the rules
//! built on it are unit-tested with an in-memory stand-in.

use redis::{Cmd, ErrorKind, Pipeline, RedisError, ServerErrorKind, ToRedisArgs, Value};

use super::backend::Conn;
use crate::error::Error;

/// One Lua script.
#[derive(Debug)]
pub(crate) struct Script(redis::Script);

impl Script {
    pub(crate) fn new(body: &str) -> Self {
        Self(redis::Script::new(body))
    }

    /// Its SHA1, the name `EVALSHA` runs it by.
    pub(crate) fn hash(&self) -> &str {
        self.0.get_hash()
    }

    /// A call to add keys and arguments to.
    pub(crate) fn call(&self) -> Call<'_> {
        Call {
            script: self,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }
}

/// One call of a [`Script`]: its `KEYS` and `ARGV`.
#[derive(Debug)]
pub(crate) struct Call<'a> {
    script: &'a Script,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl<'a> Call<'a> {
    pub(crate) fn key(&mut self, key: impl ToRedisArgs) -> &mut Self {
        key.write_redis_args(&mut self.keys);
        self
    }

    pub(crate) fn arg(&mut self, arg: impl ToRedisArgs) -> &mut Self {
        arg.write_redis_args(&mut self.args);
        self
    }

    pub(crate) fn script(&self) -> &'a Script {
        self.script
    }

    /// The `EVALSHA` command, for a pipeline or to run on its own.
    pub(crate) fn cmd(&self) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.hash())
            .arg(self.keys.len())
            .arg(&self.keys)
            .arg(&self.args);
        cmd
    }
}

/// What the runner needs of a connection. [`Conn`] is the real one.
pub(crate) trait Scripting {
    /// Runs one command.
    async fn query(&mut self, cmd: &Cmd) -> Result<Value, RedisError>;
    /// Runs a pipeline (or a `MULTI` transaction) and returns its replies.
    async fn query_pipeline(&mut self, pipe: &Pipeline) -> Result<Value, RedisError>;
    /// Teaches Redis `script` (on a cluster: every master).
    async fn load(&mut self, script: &Script) -> Result<(), RedisError>;
}

impl Scripting for Conn {
    async fn query(&mut self, cmd: &Cmd) -> Result<Value, RedisError> {
        match self {
            Conn::Server(conn) => cmd.query_async(conn).await,
            // Routed by the call's first key to the master owning its slot.
            #[cfg(feature = "cluster")]
            Conn::Cluster(conn) => cmd.query_async(conn).await,
        }
    }

    async fn query_pipeline(&mut self, pipe: &Pipeline) -> Result<Value, RedisError> {
        match self {
            Conn::Server(conn) => pipe.query_async(conn).await,
            #[cfg(feature = "cluster")]
            Conn::Cluster(conn) => pipe.query_async(conn).await,
        }
    }

    async fn load(&mut self, script: &Script) -> Result<(), RedisError> {
        self.load_script(&script.0).await
    }
}

/// Runs `call`, loading its script first when Redis does not know it (then once more; a
/// second NOSCRIPT is returned: only something wrong, a flush after every load, repeats it).
pub(crate) async fn run(conn: &mut impl Scripting, call: &Call<'_>) -> Result<Value, RedisError> {
    let cmd = call.cmd();
    match conn.query(&cmd).await {
        Err(e) if is_noscript(&e) => {
            conn.load(call.script()).await?;
            conn.query(&cmd).await
        }
        other => other,
    }
}

/// Like [`run`], for a pipeline or `MULTI` transaction that calls `script`.
pub(crate) async fn run_pipeline(
    conn: &mut impl Scripting,
    script: &Script,
    pipe: &Pipeline,
) -> Result<Value, RedisError> {
    match conn.query_pipeline(pipe).await {
        Err(e) if is_noscript(&e) => {
            conn.load(script).await?;
            conn.query_pipeline(pipe).await
        }
        other => other,
    }
}

/// Whether Redis refused a call because it does not know the script. By the error's code, as
/// Redis sends it: the one check every feature uses.
pub(crate) fn is_noscript(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) || e.code() == Some("NOSCRIPT")
}

/// A script's reply that is not what the script returns.
pub(crate) fn unexpected(what: &str) -> Error {
    Error::redis(format!("unexpected reply from the {what} script"))
}

/// A reply element as a non-negative integer: a Redis integer, or the digits of a string (Lua
/// numbers in tables come back as integers, strings as bulk strings).
pub(crate) fn int(value: &Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(*n).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

/// A reply element as text.
pub(crate) fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// The elements of an array reply; none for anything else (Lua's empty table comes back as an
/// empty array, or nil).
pub(crate) fn items(value: &Value) -> &[Value] {
    match value {
        Value::Array(items) => items,
        _ => &[],
    }
}

/// The start of every key a feature keeps for the room on `channel`: `{channel}`, a Redis
/// Cluster hash tag, so the keys live in the channel's slot (a script may then publish on the
/// channel and touch the keys in one step). When the channel holds a hash tag of its own (a
/// room or prefix with `{tag}`), the keys use that tag instead (`{tag}channel`), which Redis
/// hashes the same way. A channel Redis hashes whole but that holds a `}` (room `a}b`) cannot
/// share a slot with any key; on one server that does not matter.
pub(crate) fn room_key_base(channel: &str) -> String {
    let tag = hash_tag(channel);
    if tag.len() == channel.len() {
        format!("{{{channel}}}")
    } else {
        format!("{{{tag}}}{channel}")
    }
}

/// The part of `name` Redis Cluster hashes: the text between the first `{` and the first `}`
/// after it when that is not empty, else the whole name.
pub(crate) fn hash_tag(name: &str) -> &str {
    if let Some(open) = name.find('{')
        && let Some(len) = name[open + 1..].find('}')
        && len > 0
    {
        return &name[open + 1..open + 1 + len];
    }
    name
}

/// The Redis Cluster hash slot of `key` (of its hash tag, when it has one).
#[cfg(feature = "cluster")]
pub(crate) fn key_slot(key: &str) -> u16 {
    super::slots::key_slot(key.as_bytes())
}

/// Milliseconds for a `PEXPIRE`, at least 1.
pub(crate) fn ttl_ms(ttl: std::time::Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
pub(crate) mod testing {
    //! An in-memory stand-in for a connection that runs scripts: it records every command and
    //! answers from a queue of replies, or NOSCRIPT until the script is loaded.

    use std::collections::{HashSet, VecDeque};

    use super::*;

    /// Every command sent, as text; replies are taken from `replies` in order (a missing one
    /// answers `OK`). Scripts not in `known` are refused with NOSCRIPT.
    #[derive(Debug, Default)]
    pub(crate) struct FakeRedis {
        pub(crate) sent: Vec<String>,
        pub(crate) replies: VecDeque<Result<Value, RedisError>>,
        pub(crate) known: HashSet<String>,
        pub(crate) loads: usize,
    }

    pub(crate) fn noscript() -> RedisError {
        (
            ErrorKind::Server(ServerErrorKind::NoScript),
            "NOSCRIPT No matching script",
        )
            .into()
    }

    fn words(cmd: &Cmd) -> Vec<String> {
        cmd.args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                _ => "<cursor>".to_owned(),
            })
            .collect()
    }

    impl FakeRedis {
        fn answer(&mut self, cmd: &Cmd) -> Result<Value, RedisError> {
            let words = words(cmd);
            let text = words.join(" ");
            self.sent.push(text);
            if words.first().map(String::as_str) == Some("EVALSHA")
                && !words.get(1).is_some_and(|h| self.known.contains(h))
            {
                return Err(noscript());
            }
            self.replies.pop_front().unwrap_or(Ok(Value::Okay))
        }
    }

    impl Scripting for FakeRedis {
        async fn query(&mut self, cmd: &Cmd) -> Result<Value, RedisError> {
            self.answer(cmd)
        }
        async fn query_pipeline(&mut self, pipe: &Pipeline) -> Result<Value, RedisError> {
            let replies: Result<Vec<Value>, RedisError> =
                pipe.cmd_iter().map(|c| self.answer(c)).collect();
            replies.map(Value::Array)
        }
        async fn load(&mut self, script: &Script) -> Result<(), RedisError> {
            self.loads += 1;
            self.known.insert(script.hash().to_owned());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::FakeRedis;
    use super::*;

    #[tokio::test]
    async fn a_call_redis_does_not_know_is_loaded_and_run_once_more() {
        let script = Script::new("return ARGV[1]");
        let mut call = script.call();
        call.key("k").arg("hello");
        let mut redis = FakeRedis::default();
        redis
            .replies
            .push_back(Ok(Value::BulkString(b"hello".to_vec())));
        let reply = run(&mut redis, &call).await.expect("ran after the load");
        assert_eq!(text(&reply).as_deref(), Some("hello"));
        assert_eq!(redis.loads, 1);
        let evalsha = format!("EVALSHA {} 1 k hello", script.hash());
        assert_eq!(redis.sent, [evalsha.clone(), evalsha]);
        // Known now: one call, no load.
        run(&mut redis, &call).await.expect("ran");
        assert_eq!((redis.loads, redis.sent.len()), (1, 3));
    }

    #[tokio::test]
    async fn other_errors_are_not_retried() {
        let script = Script::new("return 1");
        let mut redis = FakeRedis::default();
        redis.known.insert(script.hash().to_owned());
        redis.replies.push_back(Err((
            ErrorKind::Server(ServerErrorKind::ResponseError),
            "OOM",
        )
            .into()));
        assert!(run(&mut redis, &script.call()).await.is_err());
        assert_eq!((redis.loads, redis.sent.len()), (0, 1));
    }

    #[test]
    fn noscript_is_told_by_its_code() {
        assert!(is_noscript(&testing::noscript()));
        let other: RedisError = (ErrorKind::Server(ServerErrorKind::ResponseError), "OOM").into();
        assert!(!is_noscript(&other));
    }

    #[test]
    fn replies_parse_integers_from_numbers_and_digits_only() {
        assert_eq!(int(&Value::Int(7)), Some(7));
        assert_eq!(int(&Value::BulkString(b"42".to_vec())), Some(42));
        assert_eq!(int(&Value::Int(-1)), None);
        assert_eq!(int(&Value::BulkString(b"x".to_vec())), None);
        assert_eq!(int(&Value::Nil), None);
        assert_eq!(items(&Value::Nil), &[] as &[Value]);
    }

    #[test]
    fn room_keys_share_the_channels_hash_slot() {
        assert_eq!(room_key_base("ws:room:lobby"), "{ws:room:lobby}");
        assert_eq!(room_key_base("ws:room:a{t}b"), "{t}ws:room:a{t}b");
        assert_eq!(hash_tag("ws:room:a{}b"), "ws:room:a{}b");
        assert_eq!(hash_tag(&room_key_base("ws:room:x{y}")), "y");
        assert_eq!(hash_tag(&room_key_base("ws:room:lobby")), "ws:room:lobby");
    }
}
