//! Redis Sentinel: the `redis+sentinel://` URL, finding the master through the sentinels, and
//! leaving a server that stops being the master.
//!
//! A node under Sentinel talks to the master as to a single server (PUBLISH / SUBSCRIBE, the
//! same RESP3 connection with the same settings): only *where* it connects changes. Each
//! connect asks the sentinels in turn (each bounded by the connect timeout) for the master's
//! address, connects there, and checks that the server says it is the master; a sentinel that
//! still names a demoted master during a failover thus makes a failed connect, retried with the
//! caller's backoff like any other. A failover is a link loss: Sentinel closes the demoted
//! master's clients (or the master died with them), and the node reconnects, resubscribes,
//! repairs, exactly as after a Redis restart.
//!
//! A connection that survives a demotion (Sentinel's `CLIENT KILL` lost, an operator's
//! `REPLICAOF`) must not go on publishing to a replica, which accepts PUBLISH and delivers it to
//! its own subscribers only. So each connection's server is asked its role every
//! [`ROLE_CHECK`]; when it is no longer the master, the connection's owner is told it was
//! disconnected (the push a closed connection sends), and it reconnects through the sentinels.
//!
//! Discovery is our own rather than redis-rs's `sentinel` feature: that one has no per-sentinel
//! deadline, and needs `&mut` access to one shared client from both of the node's tasks.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, ConnectionAddr, ConnectionInfo, PushInfo, PushKind, RedisError, Value,
};
use tokio::time::timeout;

use super::backend::{Push, ServerConn, server_config};
use super::client::client;
use crate::config::Connect;
use crate::error::Error;

/// How often a connection found through Sentinel asks its server whether it is still the
/// master. A `HELLO` every second on each of a node's two connections costs Redis nothing, and
/// bounds how long a connection that survived a demotion keeps publishing to a replica.
pub(super) const ROLE_CHECK: Duration = Duration::from_secs(1);

/// A sentinel's port when the URL names none (Sentinel's own default).
const DEFAULT_PORT: u16 = 26379;

/// What a `redis+sentinel://` URL says, before any client is built.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct SentinelUrl {
    /// `rediss+sentinel://`: TLS to the sentinels and to the master.
    tls: bool,
    /// The master's user name and password as written (percent-encoded), without the `@`.
    userinfo: Option<String>,
    sentinels: Vec<(String, u16)>,
    /// The name the sentinels monitor the master under (`sentinel monitor NAME ...`).
    master: String,
    db: Option<i64>,
    sentinel_username: Option<String>,
    sentinel_password: Option<String>,
}

/// Whether `url` is a Sentinel URL (`redis+sentinel://` or `rediss+sentinel://`).
pub(super) fn is_sentinel_url(url: &str) -> bool {
    url.split_once("://").is_some_and(|(scheme, _)| {
        scheme.eq_ignore_ascii_case("redis+sentinel")
            || scheme.eq_ignore_ascii_case("rediss+sentinel")
    })
}

fn invalid(why: &str) -> Error {
    Error::invalid_url(format!(
        "{why} (expected redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER, e.g. \
         redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster)"
    ))
}

impl SentinelUrl {
    /// Parses `redis[s]+sentinel://[USER[:PASSWORD]@]HOST[:PORT][,HOST[:PORT]...]/MASTER[/DB]
    /// [?sentinel_username=U&sentinel_password=P]`. Error messages never repeat a part of the
    /// URL that might hold a password.
    pub(super) fn parse(url: &str) -> Result<Self, Error> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(invalid("not a url"));
        };
        if !is_sentinel_url(url) {
            return Err(invalid("not a redis+sentinel:// url"));
        }
        let tls = scheme.eq_ignore_ascii_case("rediss+sentinel");
        if rest.contains('#') {
            return Err(invalid(
                "a sentinel url takes no #fragment (#insecure is not supported; percent-encode \
                 `#` in a password as %23)",
            ));
        }
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo.to_owned()), hosts),
            None => (None, authority),
        };
        let sentinels = hosts
            .split(',')
            .enumerate()
            .map(|(i, entry)| host_port(entry.trim(), i))
            .collect::<Result<Vec<_>, _>>()?;
        if sentinels.len() == 1 && sentinels[0].0.is_empty() {
            return Err(invalid("no sentinel address"));
        }
        let (path, query) = tail.split_once('?').unwrap_or((tail, ""));
        let mut segments = path.strip_prefix('/').unwrap_or(path).split('/');
        let master = segments.next().unwrap_or("").to_owned();
        if master.is_empty() {
            return Err(invalid(
                "no master name after the sentinel addresses (the NAME of `sentinel monitor NAME`)",
            ));
        }
        let db = match segments.next() {
            None | Some("") => None,
            Some(db) => Some(db.parse::<i64>().map_err(|_| {
                invalid("the database after the master name must be a number (/MASTER/DB)")
            })?),
        };
        if segments.next().is_some() {
            return Err(invalid(
                "too many path segments: only /MASTER or /MASTER/DB",
            ));
        }
        let (mut sentinel_username, mut sentinel_password) = (None, None);
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            match &*key {
                "sentinel_username" => sentinel_username = Some(value.into_owned()),
                "sentinel_password" => sentinel_password = Some(value.into_owned()),
                _ => {
                    return Err(invalid(
                        "unknown query parameter: a sentinel url takes only sentinel_username \
                         and sentinel_password",
                    ));
                }
            }
        }
        Ok(Self {
            tls,
            userinfo,
            sentinels,
            master,
            db,
            sentinel_username,
            sentinel_password,
        })
    }

    /// The URL again with every password replaced by `***`, for logs and `Debug`.
    fn redacted(&self) -> String {
        let scheme = if self.tls {
            "rediss+sentinel"
        } else {
            "redis+sentinel"
        };
        let user = match self.userinfo.as_deref().map(|u| u.split_once(':')) {
            None => String::new(),
            Some(None) => format!("{}@", self.userinfo.as_deref().unwrap_or("")),
            Some(Some((user, _))) => format!("{user}:***@"),
        };
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|(host, port)| format!("{host}:{port}"))
            .collect();
        let db = self.db.map(|db| format!("/{db}")).unwrap_or_default();
        let mut query = Vec::new();
        if let Some(user) = &self.sentinel_username {
            query.push(format!("sentinel_username={user}"));
        }
        if self.sentinel_password.is_some() {
            query.push("sentinel_password=***".to_owned());
        }
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{}", query.join("&"))
        };
        format!(
            "{scheme}://{user}{}/{}{db}{query}",
            hosts.join(","),
            self.master
        )
    }
}

/// Said with every malformed address: a password's unencoded `/` ends the address list early.
const ENCODE: &str = "; percent-encode `/ ? # @` in a password";

/// One sentinel address, `HOST`, `HOST:PORT` or `[IPv6]:PORT`; `i` numbers it in errors.
fn host_port(entry: &str, i: usize) -> Result<(String, u16), Error> {
    let nth = i + 1;
    let (host, port) = if let Some(v6) = entry.strip_prefix('[') {
        let Some((host, rest)) = v6.split_once(']') else {
            return Err(invalid(&format!(
                "sentinel address {nth}: unclosed [ of an IPv6 address{ENCODE}"
            )));
        };
        (host, rest.strip_prefix(':'))
    } else {
        match entry.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (entry, None),
        }
    };
    if host.is_empty() {
        if i == 0 && port.is_none() {
            return Ok((String::new(), 0)); // an empty list: the caller says so
        }
        return Err(invalid(&format!(
            "sentinel address {nth} has no host{ENCODE}"
        )));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                invalid(&format!(
                    "sentinel address {nth} has no valid port (HOST:PORT, 1 to 65535){ENCODE}"
                ))
            })?,
    };
    Ok((host.to_owned(), port))
}

/// `url` with its passwords hidden, or only its scheme when it does not parse.
pub(super) fn redacted(url: &str) -> String {
    match SentinelUrl::parse(url) {
        Ok(parsed) => parsed.redacted(),
        Err(_) => {
            let scheme = url.split_once("://").map_or("", |(s, _)| s);
            format!("{scheme}://(unparsable; hidden)")
        }
    }
}

/// The master of a Sentinel deployment, found again on every connect.
pub(crate) struct Sentinel {
    /// Each sentinel's connection settings (TLS, RESP3, TCP, its own credentials).
    sentinels: Vec<ConnectionInfo>,
    master_name: String,
    /// The master's connection settings (credentials, database, TLS, RESP3, TCP), built once as
    /// for a single server's URL; each connect puts the address the sentinels name in.
    master: ConnectionInfo,
    /// The sentinel that answered last, asked first next time: a dead one costs a connect
    /// timeout once, not on every reconnect.
    preferred: AtomicUsize,
    /// The URL without passwords, for `Debug`.
    shown: String,
}

impl std::fmt::Debug for Sentinel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl Sentinel {
    /// Parses `url` and builds the settings of the master's and the sentinels' connections
    /// exactly as for a single server's URL (scheme, `tls` feature, root certificate, RESP3,
    /// TCP settings).
    pub(super) fn new(connect: &Connect, url: &str) -> Result<Self, Error> {
        let parsed = SentinelUrl::parse(url)?;
        let scheme = if parsed.tls { "rediss" } else { "redis" };
        let userinfo = parsed
            .userinfo
            .as_deref()
            .map(|u| format!("{u}@"))
            .unwrap_or_default();
        let db = parsed.db.unwrap_or(0);
        // The address is a placeholder: every connect replaces it.
        let master = client(
            connect,
            &format!("{scheme}://{userinfo}127.0.0.1:6379/{db}"),
        )?
        .get_connection_info()
        .clone();
        let template = client(connect, &format!("{scheme}://127.0.0.1:{DEFAULT_PORT}"))?
            .get_connection_info()
            .clone();
        let mut login = template.redis_settings().clone();
        if let Some(user) = &parsed.sentinel_username {
            login = login.set_username(user);
        }
        if let Some(password) = &parsed.sentinel_password {
            login = login.set_password(password);
        }
        let template = template.set_redis_settings(login);
        let sentinels = parsed
            .sentinels
            .iter()
            .map(|(host, port)| at(&template, host, *port))
            .collect();
        Ok(Self {
            sentinels,
            master_name: parsed.master.clone(),
            master,
            preferred: AtomicUsize::new(0),
            shown: parsed.redacted(),
        })
    }

    /// Asks the sentinels in turn for the master, each within `wait`, and connects to the
    /// first address named that is the master. Fails with the last error when none is (no
    /// sentinel answered, or the one named refused or is a replica: a failover is under way).
    pub(super) async fn connect(
        &self,
        wait: Duration,
        push: Push,
    ) -> Result<ServerConn, RedisError> {
        let n = self.sentinels.len();
        let first = self.preferred.load(Ordering::Relaxed);
        let mut tried: Vec<(String, u16)> = Vec::new();
        let mut last = None;
        for k in (0..n).map(|i| (first + i) % n) {
            let sentinel = &self.sentinels[k];
            let named = match timeout(wait, self.ask(sentinel, wait)).await {
                Ok(Ok(named)) => named,
                Ok(Err(e)) => {
                    last = Some(e);
                    continue;
                }
                Err(_) => {
                    last = Some(failed(format!(
                        "sentinel {} did not answer in time",
                        sentinel.addr()
                    )));
                    continue;
                }
            };
            self.preferred.store(k, Ordering::Relaxed);
            if tried.contains(&named) {
                continue;
            }
            tried.push(named.clone());
            match self.connect_master(&named, wait, push.clone()).await {
                Ok(conn) => return Ok(conn),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| failed("no sentinel configured".to_owned())))
    }

    /// `SENTINEL get-master-addr-by-name` on one sentinel.
    async fn ask(
        &self,
        sentinel: &ConnectionInfo,
        wait: Duration,
    ) -> Result<(String, u16), RedisError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(wait))
            .set_response_timeout(Some(wait));
        let mut conn = redis::Client::open(sentinel.clone())?
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let named: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.master_name)
            .query_async(&mut conn)
            .await?;
        named.ok_or_else(|| {
            failed(format!(
                "sentinel {} knows no master named {:?} (the name of `sentinel monitor`)",
                sentinel.addr(),
                self.master_name
            ))
        })
    }

    /// Connects to the server the sentinels named, with the single-server settings, and keeps
    /// the connection only if the server says it is the master.
    async fn connect_master(
        &self,
        (host, port): &(String, u16),
        wait: Duration,
        push: Push,
    ) -> Result<ServerConn, RedisError> {
        let client = redis::Client::open(at(&self.master, host, *port))?;
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&server_config(wait, push.clone()))
            .await?;
        let role = match timeout(wait, role_of(&mut conn)).await {
            Ok(role) => role?,
            Err(_) => {
                return Err(failed(format!(
                    "{host}:{port} did not say its role in time"
                )));
            }
        };
        if role != "master" {
            return Err(failed(format!(
                "the sentinels name {host}:{port} as master {:?} but it is a {role}: a failover \
                 is under way",
                self.master_name
            )));
        }
        let watch = tokio::spawn(watch_role(
            conn.clone(),
            push,
            wait,
            format!("{host}:{port}"),
        ));
        Ok(ServerConn::watched(conn, RoleWatch(watch.abort_handle())))
    }
}

/// `info` with its address replaced by `host:port`, keeping TLS and its parameters.
fn at(info: &ConnectionInfo, host: &str, port: u16) -> ConnectionInfo {
    let addr = match info.addr().clone() {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure,
            tls_params,
        },
        _ => ConnectionAddr::Tcp(host.to_owned(), port),
    };
    info.clone().set_addr(addr)
}

fn failed(why: String) -> RedisError {
    RedisError::from(std::io::Error::new(std::io::ErrorKind::NotConnected, why))
}

/// The server's replication role, from `HELLO 3`'s reply (`master` or `replica`). `HELLO`,
/// unlike `ROLE`, is allowed to every ACL user (its category is `@connection`, not `@admin`),
/// and on this RESP3 connection it changes nothing.
async fn role_of(conn: &mut MultiplexedConnection) -> Result<String, RedisError> {
    let reply: Value = redis::cmd("HELLO").arg(3).query_async(conn).await?;
    role_in(&reply).ok_or_else(|| failed("HELLO's reply names no role".to_owned()))
}

fn role_in(reply: &Value) -> Option<String> {
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let pairs: Vec<(&Value, &Value)> = match reply {
        Value::Map(pairs) => pairs.iter().map(|(k, v)| (k, v)).collect(),
        Value::Array(items) => items.chunks_exact(2).map(|kv| (&kv[0], &kv[1])).collect(),
        _ => return None,
    };
    pairs
        .into_iter()
        .find(|(k, _)| text(k).as_deref() == Some("role"))
        .and_then(|(_, v)| text(v))
}

/// The task that checks a connection's server is still the master; aborted when the
/// connection's last clone is dropped (see [`ServerConn`]).
#[derive(Debug)]
pub(super) struct RoleWatch(tokio::task::AbortHandle);

impl Drop for RoleWatch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Every [`ROLE_CHECK`], asks the server its role; once it is not the master, tells the
/// connection's owner it was disconnected, and ends. Ends too when the connection fails (its
/// owner is told by the connection itself). A slow answer is left to the owner's own deadlines.
async fn watch_role(mut conn: MultiplexedConnection, push: Push, wait: Duration, at: String) {
    let mut every = tokio::time::interval(ROLE_CHECK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await; // the first tick is immediate: the role was checked just now
    loop {
        every.tick().await;
        match timeout(wait, role_of(&mut conn)).await {
            Ok(Ok(role)) if role == "master" => {}
            Ok(Ok(role)) => {
                tracing::warn!(
                    server = %at,
                    %role,
                    "the server is no longer the master: leaving it to find the new one"
                );
                let _ = push(PushInfo {
                    kind: PushKind::Disconnection,
                    data: Vec::new(),
                });
                return;
            }
            Ok(Err(_)) => return,
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> SentinelUrl {
        SentinelUrl::parse(url).unwrap_or_else(|e| panic!("{url}: {e:?}"))
    }

    fn error(url: &str) -> String {
        let err = SentinelUrl::parse(url).expect_err(url);
        assert!(err.is_invalid_url());
        std::error::Error::source(&err).expect("cause").to_string()
    }

    #[test]
    fn sentinel_urls_are_parsed() {
        let url = parse(
            "redis+sentinel://alice:p%40ss@10.0.0.1:26380, 10.0.0.2,[::1]:5000/mymaster/2\
             ?sentinel_username=sam&sentinel_password=s%26cret",
        );
        assert_eq!(
            url,
            SentinelUrl {
                tls: false,
                userinfo: Some("alice:p%40ss".to_owned()),
                sentinels: vec![
                    ("10.0.0.1".to_owned(), 26380),
                    ("10.0.0.2".to_owned(), 26379),
                    ("::1".to_owned(), 5000),
                ],
                master: "mymaster".to_owned(),
                db: Some(2),
                sentinel_username: Some("sam".to_owned()),
                sentinel_password: Some("s&cret".to_owned()),
            }
        );
        let plain = parse("REDISS+SENTINEL://h:1/m");
        assert!(plain.tls);
        assert_eq!(plain.userinfo, None);
        assert_eq!(plain.db, None);
        assert!(is_sentinel_url("Redis+Sentinel://h/m"));
        assert!(!is_sentinel_url("redis://h:1"));
    }

    #[test]
    fn bad_sentinel_urls_say_what_is_wrong_without_the_password() {
        for (url, says) in [
            ("redis+sentinel:///m", "no sentinel address"),
            ("redis+sentinel://:pw@/m", "no sentinel address"),
            ("redis+sentinel://h:1", "no master name"),
            ("redis+sentinel://h:1/", "no master name"),
            (
                "redis+sentinel://h:1,,h:2/m",
                "sentinel address 2 has no host",
            ),
            (
                "redis+sentinel://h:x/m",
                "sentinel address 1 has no valid port",
            ),
            (
                "redis+sentinel://h:1,h:70000/m",
                "sentinel address 2 has no valid port",
            ),
            ("redis+sentinel://h:0/m", "no valid port"),
            ("redis+sentinel://[::1/m", "unclosed ["),
            ("redis+sentinel://h/m/zero", "must be a number"),
            ("redis+sentinel://h/m/0/x", "too many path segments"),
            ("redis+sentinel://h/m?password=x", "unknown query parameter"),
            ("redis+sentinel://h/m#insecure", "no #fragment"),
            (
                "redis+sentinel://:se/cret@h/m",
                "has no host; percent-encode",
            ),
        ] {
            let cause = error(url);
            assert!(cause.contains(says), "{url}: {cause}");
            assert!(
                cause.contains("redis+sentinel://10.0.0.1:26379"),
                "{url}: {cause}"
            );
            assert!(!cause.contains("cret"), "{url}: {cause}");
        }
    }

    #[test]
    fn passwords_are_hidden_from_the_shown_url() {
        for (url, shown) in [
            (
                "redis+sentinel://h1:1,h2:2/m",
                "redis+sentinel://h1:1,h2:2/m",
            ),
            (
                "rediss+sentinel://alice:pw@h:1/m/3?sentinel_username=sam&sentinel_password=spw",
                "rediss+sentinel://alice:***@h:1/m/3?sentinel_username=sam&sentinel_password=***",
            ),
            (
                "redis+sentinel://:p@w@h/m",
                "redis+sentinel://:***@h:26379/m",
            ),
            (
                "redis+sentinel://alice@h/m",
                "redis+sentinel://alice@h:26379/m",
            ),
            (
                "redis+sentinel://:se/cret@h/m",
                "redis+sentinel://(unparsable; hidden)",
            ),
        ] {
            assert_eq!(redacted(url), shown, "{url}");
        }
    }

    #[test]
    fn the_role_is_read_from_hellos_reply() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let map = Value::Map(vec![
            (bulk("server"), bulk("redis")),
            (bulk("role"), bulk("replica")),
        ]);
        assert_eq!(role_in(&map).as_deref(), Some("replica"));
        let resp2 = Value::Array(vec![
            bulk("proto"),
            Value::Int(2),
            bulk("role"),
            bulk("master"),
        ]);
        assert_eq!(role_in(&resp2).as_deref(), Some("master"));
        assert_eq!(role_in(&Value::Nil), None);
    }
}
