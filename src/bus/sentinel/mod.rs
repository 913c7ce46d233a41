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
//! While the subscriber link waits to reconnect, [`Sentinel::switched`] listens for the
//! sentinels' `+switch-master`, so that the node tries the new master as soon as one is
//! announced rather than after its reconnect pause.
//!
//! A connection that survives a demotion (Sentinel's `CLIENT KILL` lost, an operator's
//! `REPLICAOF`) must not go on publishing to a replica, which accepts PUBLISH and delivers it to
//! its own subscribers only. So each connection's server is asked its role every
//! [`ROLE_CHECK`]; when it is no longer the master, the connection's owner is told it was
//! disconnected (the push a closed connection sends), and it reconnects through the sentinels.
//!
//! Discovery is our own rather than redis-rs's `sentinel` feature: that one has no per-sentinel
//! deadline, and needs `&mut` access to one shared client from both of the node's tasks.
//!
//! `url` parses the `redis+sentinel://` URL and hides its passwords for logs.

mod url;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, ConnectionAddr, ConnectionInfo, PushInfo, PushKind, RedisError, Value,
};
use tokio::time::timeout;

use super::server::{Push, RoleWatch, ServerConn, client, server_config};
use crate::config::Connect;
use crate::error::Error;
use url::{DEFAULT_PORT, SentinelUrl};
pub(super) use url::{is_sentinel_url, redacted};

/// How often a connection found through Sentinel asks its server whether it is still the
/// master. A `HELLO` every second on each of a node's two connections costs Redis nothing, and
/// bounds how long a connection that survived a demotion keeps publishing to a replica.
pub(super) const ROLE_CHECK: Duration = Duration::from_secs(1);

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
                    last = Some(failed(format!("sentinel {}: {e}", sentinel.addr())));
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
                Err(e) => {
                    let (host, port) = &named;
                    let by = sentinel.addr();
                    last = Some(failed(format!("master {host}:{port} (named by {by}): {e}")));
                }
            }
        }
        Err(last.unwrap_or_else(|| failed("no sentinel configured".to_owned())))
    }

    /// Resolves when a sentinel announces that the master changed (`+switch-master`), so that
    /// a node waiting to reconnect tries at once rather than after its pause. Listens to every
    /// sentinel: the elected one announces first, the others once they learn of it. Never
    /// resolves otherwise (a sentinel that cannot be listened to is left out): the caller races
    /// it against its pause, and dropping it closes the connections.
    pub(super) async fn switched(&self) {
        let listens = self.sentinels.iter().map(|s| Box::pin(self.switch_on(s)));
        let listens: Vec<_> = listens.collect();
        if listens.is_empty() {
            return std::future::pending().await;
        }
        futures_util::future::select_all(listens).await;
    }

    async fn switch_on(&self, sentinel: &ConnectionInfo) {
        use futures_util::StreamExt;
        let listen = async {
            let mut pubsub = redis::Client::open(sentinel.clone())?
                .get_async_pubsub()
                .await?;
            pubsub.subscribe("+switch-master").await?;
            let mut messages = pubsub.on_message();
            while let Some(message) = messages.next().await {
                // `<master name> <old ip> <old port> <new ip> <new port>`
                let text = String::from_utf8_lossy(message.get_payload_bytes()).into_owned();
                if text.split(' ').next() == Some(self.master_name.as_str()) {
                    tracing::info!(sentinel = %sentinel.addr(), switch = %text, "sentinel announced a new master; reconnecting now");
                    return Ok(());
                }
            }
            Err(failed("the sentinel closed the connection".to_owned()))
        };
        let heard: Result<(), RedisError> = listen.await;
        if heard.is_err() {
            std::future::pending::<()>().await;
        }
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
            Err(_) => return Err(failed("it did not say its role in time".to_owned())),
        };
        if role != "master" {
            return Err(failed(format!(
                "named master {:?} but it is a {role}: a failover is under way",
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

    fn connect(url: &str) -> Connect {
        Connect {
            target: crate::config::Target::Server(url.to_owned()),
            #[cfg(feature = "tls")]
            tls_root_certificate: None,
        }
    }

    #[test]
    fn the_master_gets_the_named_address_and_keeps_credentials_and_tls() {
        let url = "redis+sentinel://alice:pw@s1:26380,s2/mymaster/3?sentinel_password=spw";
        let sentinel = Sentinel::new(&connect(url), url).expect("valid");
        let master = at(&sentinel.master, "10.0.0.9", 6390);
        assert!(matches!(master.addr(), ConnectionAddr::Tcp(h, 6390) if h == "10.0.0.9"));
        let login = master.redis_settings();
        assert_eq!(
            (login.username(), login.password()),
            (Some("alice"), Some("pw"))
        );
        assert_eq!(login.db(), 3);
        assert_eq!(login.protocol(), redis::ProtocolVersion::RESP3);
        let asked: Vec<String> = sentinel
            .sentinels
            .iter()
            .map(|s| s.addr().to_string())
            .collect();
        assert_eq!(asked, ["s1:26380", "s2:26379"]);
        let login = sentinel.sentinels[0].redis_settings();
        assert_eq!((login.username(), login.password()), (None, Some("spw")));
        assert_eq!(
            format!("{sentinel:?}"),
            "redis+sentinel://alice:***@s1:26380,s2:26379/mymaster/3?sentinel_password=***"
        );
    }

    #[test]
    #[cfg(feature = "tls")]
    fn rediss_sentinel_speaks_tls_to_the_master_and_the_sentinels() {
        let url = "rediss+sentinel://s1:26380/m";
        let sentinel = Sentinel::new(&connect(url), url).expect("valid");
        let master = at(&sentinel.master, "10.0.0.9", 6390);
        assert!(matches!(
            master.addr(),
            ConnectionAddr::TcpTls { host, port: 6390, insecure: false, .. } if host == "10.0.0.9"
        ));
        assert!(matches!(
            sentinel.sentinels[0].addr(),
            ConnectionAddr::TcpTls { .. }
        ));
    }

    #[test]
    #[cfg(not(feature = "tls"))]
    fn rediss_sentinel_without_the_tls_feature_says_to_enable_it() {
        let url = "rediss+sentinel://s1:26380/m";
        let err = Sentinel::new(&connect(url), url).expect_err("no tls");
        let cause = std::error::Error::source(&err).expect("cause").to_string();
        assert!(cause.contains("`tls` feature"), "{cause}");
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
