//! One Redis server's connections: the client settings every connection to a server gets
//! (RESP3, TCP settings, TLS and its root certificate, credentials), the connection handle
//! ([`ServerConn`]) and what its pushes go to. Used for a plain server and for the master found
//! through Sentinel alike (`backend`, `sentinel`, `client` build on it).

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ProtocolVersion, PushInfo, RedisError};

use crate::config::Connect;
use crate::error::Error;

/// A server's multiplexed connection. Cheap to clone: clones share it. Found through
/// Sentinel, it also holds the task that leaves the server once it is no longer the master,
/// which ends with the last clone.
#[derive(Clone)]
pub(crate) struct ServerConn {
    conn: MultiplexedConnection,
    _role_watch: Option<Arc<RoleWatch>>,
}

impl ServerConn {
    /// A plain server's connection: nothing to watch.
    pub(super) fn plain(conn: MultiplexedConnection) -> Self {
        Self {
            conn,
            _role_watch: None,
        }
    }

    pub(super) fn watched(conn: MultiplexedConnection, watch: RoleWatch) -> Self {
        Self {
            conn,
            _role_watch: Some(Arc::new(watch)),
        }
    }
}

impl Deref for ServerConn {
    type Target = MultiplexedConnection;
    fn deref(&self) -> &MultiplexedConnection {
        &self.conn
    }
}

impl DerefMut for ServerConn {
    fn deref_mut(&mut self) -> &mut MultiplexedConnection {
        &mut self.conn
    }
}

impl redis::aio::ConnectionLike for ServerConn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        self.conn.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        self.conn.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }
}

/// Where a connection's pushes go: messages, and a `Disconnection` when it closes (or, under
/// Sentinel, when its server stops being the master). Must never block.
pub(super) type Push = Arc<dyn Fn(PushInfo) -> Result<(), ()> + Send + Sync>;

/// The settings of every connection to one server, found through Sentinel or not.
pub(super) fn server_config(connect_timeout: Duration, push: Push) -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        // Deadlines are applied per operation by the callers.
        .set_response_timeout(None)
        .set_push_sender(move |info| push(info))
}

/// The task that checks a connection's server is still the master; aborted when the
/// connection's last clone is dropped (see [`ServerConn`]).
#[derive(Debug)]
pub(super) struct RoleWatch(pub(super) tokio::task::AbortHandle);

impl Drop for RoleWatch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A client for the same server, speaking RESP3 (pushes arrive on the same connection as
/// command replies, so one multiplexed connection can subscribe and be watched for loss), with
/// TCP_NODELAY (a PUBLISH must not wait for Nagle's algorithm) and TCP keepalive (a peer that
/// vanished without a FIN is noticed even on an idle link).
///
/// Everything else of the client's connection info is kept: the address (with its TLS
/// parameters and root certificate for `rediss://`), the user name and password (redis-rs sends
/// `HELLO 3 AUTH` / `AUTH` with them on every connection, publisher and subscriber alike) and
/// the database.
fn resp3(client: &redis::Client) -> Result<redis::Client, redis::RedisError> {
    let info = client.get_connection_info().clone();
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    redis::Client::open(
        info.set_redis_settings(settings)
            .set_tcp_settings(tcp_settings()),
    )
}

/// TCP_NODELAY and keepalive, for every connection to Redis (see [`resp3`]).
pub(super) fn tcp_settings() -> redis::io::tcp::TcpSettings {
    use redis::io::tcp::{TcpSettings, socket2::TcpKeepalive};
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5));
    TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive)
}

/// Installs rustls' `ring` provider as the process-wide default unless one is installed.
///
/// redis-rs builds its rustls configuration with the process default provider and enables
/// none itself; without one the first TLS connect would panic. An application that installs
/// its own provider (e.g. aws-lc-rs) does so before it builds the layer, and keeps it.
#[cfg(feature = "tls")]
fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // An error means another thread installed one in the meantime: there is one either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// The client for one server URL: scheme and TLS feature checked, `#insecure` refused, the
/// root certificate attached, RESP3 and our TCP settings applied.
pub(super) fn client(connect: &Connect, url: &str) -> Result<redis::Client, Error> {
    if is_tls_url(url) && !cfg!(feature = "tls") {
        return Err(Error::invalid_url(format!(
            "a rediss:// (TLS) url needs the `tls` feature of axum-fanout: \
             axum-fanout = {{ version = \"{}\", features = [\"tls\"] }}",
            env!("CARGO_PKG_VERSION")
        )));
    }
    let client = redis::Client::open(url).map_err(|e| invalid_url(&e))?;
    #[cfg(feature = "tls")]
    let client = with_tls(connect, client)?;
    #[cfg(not(feature = "tls"))]
    let _ = connect;
    resp3(&client).map_err(|e| invalid_url(&e))
}

pub(super) fn invalid_url(e: &RedisError) -> Error {
    Error::invalid_url(format!("{e} (expected e.g. redis://127.0.0.1:6379)"))
}

/// `rediss://` or `valkeys://`: redis-rs connects over TLS.
pub(super) fn is_tls_url(url: &str) -> bool {
    url.split_once("://").is_some_and(|(scheme, _)| {
        scheme.eq_ignore_ascii_case("rediss") || scheme.eq_ignore_ascii_case("valkeys")
    })
}

/// For a `rediss://` client: refuses `#insecure`, makes sure rustls has a crypto provider, and
/// attaches the root certificate if one was given.
#[cfg(feature = "tls")]
fn with_tls(connect: &Connect, client: redis::Client) -> Result<redis::Client, Error> {
    let redis::ConnectionAddr::TcpTls { insecure, .. } = client.get_connection_info().addr() else {
        return match connect.tls_root_certificate {
            Some(_) => Err(Error::invalid_url(
                "tls_root_certificate is set but the url is not rediss://",
            )),
            None => Ok(client),
        };
    };
    if *insecure {
        return Err(Error::invalid_url(
            "rediss://..#insecure (no certificate verification) is not supported; trust the \
             server's CA with FanoutBuilder::tls_root_certificate instead",
        ));
    }
    ensure_crypto_provider();
    let Some(pem) = &connect.tls_root_certificate else {
        return Ok(client);
    };
    const PEM_HEADER: &[u8] = b"-----BEGIN CERTIFICATE-----";
    if !pem.windows(PEM_HEADER.len()).any(|w| w == PEM_HEADER) {
        return Err(Error::invalid_url(
            "tls_root_certificate holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        ));
    }
    let certificates = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem.clone()),
    };
    redis::Client::build_with_tls(client.get_connection_info().clone(), certificates)
        .map_err(|e| Error::invalid_url(format!("tls_root_certificate: {e}")))
}
